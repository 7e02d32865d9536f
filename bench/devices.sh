#!/bin/bash
# Kernel devices: socketpair (blockway connect) vs nbd-client over TCP, and
# the I/O pause of a daemon restart, in a TCG guest. See bench/devices.py.
exec python3 "$(dirname "$0")/devices.py" "$@"
