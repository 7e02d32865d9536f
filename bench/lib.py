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


# ---- what a process spent: shared by remote_ab.py and cycles.py ----------------

import signal  # noqa: E402
import time  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    """utime + stime of process pid in seconds (its threads, dead ones too);
    0 for no pid or a process gone."""
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / HZ
    except (FileNotFoundError, TypeError):
        return 0.0


def run_child(cmd):
    """Runs cmd to its end: (wall seconds, CPU seconds of the child and of its
    children); a failure ends the benchmark with its stderr."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"failed: {cmd}: {p.stderr.read().decode()[-500:]}")
    return time.time() - t0, ru.ru_utime + ru.ru_stime


class PerfStat:
    """`perf stat -p` on running processes (pids: one or a list, counted
    together) from now to stop(). events defaults to $PEV or
    instructions,cycles. stop() returns one float per event, at least two,
    0.0 for an event this machine does not count (no PMU in a VM)."""

    def __init__(self, pid, tmp, events=None):
        self.out = f"{tmp}/pstat.txt"
        self.p = None
        pids = [p for p in (pid if isinstance(pid, (list, tuple)) else [pid]) if p]
        if pids:
            events = events or os.environ.get("PEV", "instructions,cycles")
            self.p = subprocess.Popen(["perf", "stat", "-x,", "-e", events, "-p", ",".join(map(str, pids)),
                                       "-o", self.out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)

    def stop(self):
        if not self.p:
            return [0.0, 0.0]
        self.p.send_signal(signal.SIGINT)
        self.p.wait()
        vals = []
        for line in open(self.out):
            f = line.split(",")
            if len(f) > 3 and not line.startswith("#"):
                try:
                    vals.append(float(f[0]))
                except ValueError:
                    vals.append(0.0)
        return vals + [0.0] * max(0, 2 - len(vals))


def stop_child(p, timeout=20):
    """SIGTERM to a Popen we started, then SIGKILL after timeout; reaps it."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
