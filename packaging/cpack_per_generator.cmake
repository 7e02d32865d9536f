# Read by cpack once per generator (CPACK_PROJECT_CONFIG_FILE): what differs
# between the .deb and the .rpm beyond their own CPACK_DEBIAN_*/CPACK_RPM_*.
#
# The systemd unit's directory: Debian 12 ships units in /lib/systemd/system,
# and a later version moving one to /usr/lib loses the file on upgrade under
# merged /usr (dpkg sees two paths for one file; DEP17), so the .deb keeps
# /lib. Fedora and RHEL ship them in /usr/lib/systemd/system. Each package
# takes its own install component (packaging/CMakeLists.txt).
if(CPACK_GENERATOR STREQUAL "RPM")
  set(CPACK_COMPONENTS_ALL Unspecified systemd_unit_rpm)
else()
  set(CPACK_COMPONENTS_ALL Unspecified systemd_unit_deb)
endif()
