#!/usr/bin/python3
"""Long SIGKILL crash soak for the cache (not part of ctest).

    ROUNDS=300 MODES=writeback-local,writeback,writethrough SEED=123 \
        BLOCKWAYD=build/blockwayd /usr/bin/python3 bench/crash_soak.py

ROUNDS defaults to bench/lib.sh's BENCH_REPS with a default of 200 (1 with
BENCH_QUICK=1); BLOCKWAYD to build/blockwayd.

Each round: random writes with random FLUSH/FUA through blockwayd, SIGKILL at
a random moment, restart on the same cache and catalogue, verify (see
tests/integration/crash_common.py). Stops at the first problem and keeps the
work directory for inspection; exit status 1 then.
"""

import os
import shutil
import sys
import tempfile
import time

import lib  # bench/lib.py: settings; puts tests/integration on sys.path

SETTINGS = lib.settings(0, 200)
os.environ["BLOCKWAYD"] = SETTINGS["BLOCKWAYD"]
import crash_common  # noqa: E402

rounds = int(os.environ.get("ROUNDS", SETTINGS["REPS"]))
modes = os.environ.get("MODES", "writeback-local,writeback,writethrough").split(",")
seed = int(os.environ["SEED"]) if "SEED" in os.environ else None
max_delay = float(os.environ.get("MAX_DELAY", "2.0"))
failed = False
for mode in modes:
    workdir = tempfile.mkdtemp(prefix="bw-soak-%s-" % mode, dir="/tmp")
    run = crash_common.CrashRun(workdir, mode, size=int(os.environ.get("SIZE_MIB", "16")) << 20, seed=seed)
    t0 = time.monotonic()
    problems = run.run(rounds, max_delay=max_delay)
    took = time.monotonic() - t0
    if problems:
        failed = True
        print("FAIL %s after %.0fs:\n  %s\n  kept %s" % (mode, took, "\n  ".join(problems), workdir))
    else:
        print("ok   %s: %d rounds, %d writes, %.0fs (seed %d)" % (mode, rounds, run.next_id - 1, took, run.seed))
        shutil.rmtree(workdir, ignore_errors=True)
sys.exit(1 if failed else 0)
