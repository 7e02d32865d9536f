"""The quick SIGKILL crash test: a few rounds per write mode (see
crash_common.py; bench/crash_soak.py runs hundreds)."""

import os
import sys
import tempfile
import shutil
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import crash_common  # noqa: E402

ROUNDS = int(os.environ.get("CRASH_ROUNDS", "4"))


class CrashTest(unittest.TestCase):
    def run_mode(self, mode):
        workdir = tempfile.mkdtemp(prefix="bw-crash-", dir="/tmp")
        run = crash_common.CrashRun(workdir, mode)
        problems = run.run(ROUNDS, max_delay=1.2)
        if problems:
            self.fail("\n".join(problems) + "\nlog of the last start:\n" + run.daemon.log()[-3000:])
        shutil.rmtree(workdir, ignore_errors=True)

    def test_writeback_local(self):
        self.run_mode("writeback-local")

    def test_writeback(self):
        self.run_mode("writeback")

    def test_writethrough(self):
        self.run_mode("writethrough")


if __name__ == "__main__":
    unittest.main()
