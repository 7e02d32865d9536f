"""The Python benchmark scripts' side of bench/lib.sh: the same settings,
read by running lib.sh's bench_settings, so there is one definition."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))


def settings(runtime, reps, size_mib=1024):
    """{QUICK, RUNTIME, REPS, SIZE_MIB, BLOCKWAYD, TMPBASE} as bench_settings
    sets them from BENCH_QUICK, BENCH_RUNTIME, BENCH_REPS, BENCH_SIZE_MIB,
    BLOCKWAYD and BENCH_TMPDIR."""
    names = ["QUICK", "RUNTIME", "REPS", "SIZE_MIB", "BLOCKWAYD", "TMPBASE"]
    script = 'repo="$1"; source "$2"; bench_settings "$3" "$4" "$5"; printf "%s\\n" ' + \
        " ".join('"$%s"' % n for n in names)
    out = subprocess.run(["bash", "-c", script, "bash", REPO, os.path.join(HERE, "lib.sh"),
                          str(runtime), str(reps), str(size_mib)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout.split("\n")
    values = dict(zip(names, out))
    for n in ("QUICK", "RUNTIME", "REPS", "SIZE_MIB"):
        values[n] = int(values[n])
    return values


def read_results(path):
    """A script's results.tsv, one "WHO TEST ROUND VALUE" row per figure:
    returns (rows, data, med), where data[(WHO, TEST)] lists the values in
    round order and med[(WHO, TEST)] is their median."""
    import statistics
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    data = {}
    for who, test, _rnd, val in rows:
        data.setdefault((who, test), []).append(float(val))
    return rows, data, {k: statistics.median(v) for k, v in data.items()}
