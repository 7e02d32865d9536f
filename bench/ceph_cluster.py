"""Runs the integration tests' one-node Ceph cluster (tests/integration/
remotes.CephCluster) for a benchmark script: starts it under DIR, creates
the image NAME of SIZE_MIB, writes DIR/ready, and on SIGTERM stops it.

Usage: python3 bench/ceph_cluster.py DIR NAME SIZE_MIB
"""

import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
import remotes  # noqa: E402


def main():
    workdir, name, size_mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cluster = remotes.CephCluster(workdir)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        cluster.start()
        cluster.create_image(name, size_mib << 20)
        with open(os.path.join(workdir, "ready"), "w") as f:
            f.write("%s %s\n" % (cluster.conf, cluster.keyring))
        while not stop:
            signal.pause()
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
