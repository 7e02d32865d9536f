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

# The nbdkit plugin is a package of its own, nbdkit-plugin-blockway, from the
# same set-up: `cpack -G DEB -D BLOCKWAY_PACKAGE=nbdkit-plugin` (and -G RPM).
# It holds the plugin only, depends on nbdkit (1.30: block_size, after_fork
# and cleanup), and has none of the daemon's scripts or configuration.
if(BLOCKWAY_PACKAGE STREQUAL "nbdkit-plugin")
  set(CPACK_COMPONENTS_ALL nbdkit_plugin)
  set(CPACK_PACKAGE_NAME nbdkit-plugin-blockway)
  set(CPACK_DEBIAN_PACKAGE_NAME nbdkit-plugin-blockway)
  set(CPACK_RPM_PACKAGE_NAME nbdkit-plugin-blockway)
  set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "nbdkit plugin: blockway's export stack (backends, local-disk cache, prefetch)")
  set(CPACK_PACKAGE_DESCRIPTION
      "nbdkit-blockway-plugin serves a remote disk image (file, NBD, iSCSI, NFS, AoE, Ceph RBD) through blockway's export stack inside nbdkit: retry, a crash-safe local-disk cache with write modes, prefetch and detach, under nbdkit's filters.")
  set(CPACK_RPM_PACKAGE_DESCRIPTION ${CPACK_PACKAGE_DESCRIPTION})
  set(CPACK_DEBIAN_PACKAGE_SECTION libs)
  set(CPACK_DEBIAN_PACKAGE_DEPENDS "nbdkit (>= 1.30)")
  unset(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA)
  set(CPACK_RPM_PACKAGE_REQUIRES "nbdkit-server >= 1.30, libnbd, libiscsi, libnfs, sqlite-libs, spdlog, fmt")
  unset(CPACK_RPM_USER_FILELIST)
  unset(CPACK_RPM_POST_INSTALL_SCRIPT_FILE)
  unset(CPACK_RPM_PRE_UNINSTALL_SCRIPT_FILE)
  unset(CPACK_RPM_POST_UNINSTALL_SCRIPT_FILE)
  # nbdkit owns its plugin directory and the ones above it.
  get_filename_component(_nbdkit_dir ${CPACK_BLOCKWAY_NBDKIT_PLUGINDIR} DIRECTORY)
  get_filename_component(_lib_dir ${_nbdkit_dir} DIRECTORY)
  list(APPEND CPACK_RPM_EXCLUDE_FROM_AUTO_FILELIST_ADDITION ${CPACK_BLOCKWAY_NBDKIT_PLUGINDIR} ${_nbdkit_dir} ${_lib_dir})
endif()
