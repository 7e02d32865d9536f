# Makes one man page: fills the @@SECTION@@ lines of the scdoc source SOURCE
# with `blockwayd --help-man SECTION` (and @@usage@@ with `blockway --help`,
# as a literal block), then runs scdoc, and gzips the page. Run by the build
# (CMakeLists.txt here):
#   cmake -DSOURCE=... -DOUTPUT=... -DBLOCKWAYD=... -DBLOCKWAY=... -DSCDOC=... -P generate.cmake
file(STRINGS ${SOURCE} lines)
set(text "")
foreach(line IN LISTS lines)
  if(line MATCHES "^@@usage@@$")
    execute_process(COMMAND ${BLOCKWAY} --help OUTPUT_VARIABLE out RESULT_VARIABLE rc)
    string(APPEND text "```\n${out}```\n")
  elseif(line MATCHES "^@@([a-z-]+)@@$")
    execute_process(COMMAND ${BLOCKWAYD} --help-man ${CMAKE_MATCH_1} OUTPUT_VARIABLE out RESULT_VARIABLE rc)
    string(APPEND text "${out}\n")
  else()
    set(rc 0)
    string(APPEND text "${line}\n")
  endif()
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${line}: the generator failed (${rc})")
  endif()
endforeach()
# file(STRINGS) and the list above mangle ';' and a trailing '\': none of the
# sources use them.
file(WRITE ${OUTPUT}.scd "${text}")
execute_process(COMMAND ${SCDOC} INPUT_FILE ${OUTPUT}.scd OUTPUT_FILE ${OUTPUT} RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "scdoc ${OUTPUT}.scd: ${err}")
endif()
# Installed compressed, as Debian policy asks (gzip -9n: no name, no time).
execute_process(COMMAND gzip -9n -c ${OUTPUT} OUTPUT_FILE ${OUTPUT}.gz RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "gzip ${OUTPUT}: ${rc}")
endif()
