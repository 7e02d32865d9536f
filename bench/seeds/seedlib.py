"""Shared parts of the papers' experiments (bench/seeds/): processes started
and stopped by pid, fio and nbdcopy runs, the report, the chart and the
experiment's section in BENCHMARKS.md. The settings (BENCH_QUICK, BENCH_REPS,
BENCH_RUNTIME, BENCH_SIZE_MIB, BLOCKWAYD, BENCH_TMPDIR) come from bench/lib.sh
through bench/lib.py, so they mean what they mean for every other script."""

import atexit
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import lib  # noqa: E402  (bench/lib.py)

REPO = lib.REPO
RESULTS_DIR = os.path.join(REPO, "bench", "results")
# Debian's tools first: the pyenv python3 on PATH has no matplotlib.
os.environ["PATH"] = "/usr/bin:/bin:/usr/sbin:/sbin:" + os.environ.get("PATH", "")


def die(msg):
    print(f"{os.path.basename(sys.argv[0])}: {msg}", file=sys.stderr)
    sys.exit(1)


class Bench:
    """One experiment's run: a temp dir (removed at exit), the processes it
    started (stopped at exit, newest first, by pid) and its results."""

    def __init__(self, name, runtime, reps, size_mib):
        self.name = name
        s = lib.settings(runtime, reps, size_mib)
        self.quick = s["QUICK"] == 1
        self.runtime, self.reps, self.size_mib = s["RUNTIME"], s["REPS"], s["SIZE_MIB"]
        self.tmp = tempfile.mkdtemp(prefix=f"seeds-{name}.", dir=s["TMPBASE"])
        self.procs = []          # [(Popen, label, log path)]
        self.finished = {}       # pid -> log path of the processes stopped
        self.started = 0
        self.rows = []           # (who, test, round, value)
        self.load_start = open("/proc/loadavg").read().split()[:3]
        self.loads = []          # 1-minute load average at each round
        orig = s["BLOCKWAYD"]
        if not os.access(orig, os.X_OK):
            die(f"no daemon at {orig} (build it: ninja -C build blockwayd)")
        # A private copy: a rebuild of build/ during the run cannot mix versions.
        self.blockwayd = os.path.join(self.tmp, "blockwayd")
        shutil.copy2(orig, self.blockwayd)
        self.blockwayd_orig = orig
        atexit.register(self.cleanup)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    # ---- processes -------------------------------------------------------
    def start(self, label, cmd, **kw):
        self.started += 1
        log = os.path.join(self.tmp, f"{label}.{self.started}.log")
        p = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, **kw)
        self.procs.append((p, label, log))
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=10):
        """Stops a process this run started; returns its exit status."""
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"warning: pid {p.pid} did not stop in {timeout} s; killing it", file=sys.stderr)
                p.kill()
                p.wait()
        self.finished.update({e[0].pid: e[2] for e in self.procs if e[0] is p})
        self.procs = [e for e in self.procs if e[0] is not p]
        return p.returncode

    def stop_all(self):
        for p, _, _ in reversed(list(self.procs)):
            self.stop(p)

    def log_of(self, p):
        for q, _, log in self.procs:
            if q is p:
                return log
        return self.finished.get(p.pid)

    def cleanup(self):
        self.stop_all()
        if os.environ.get("SEEDS_KEEP_TMP") != "1":
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- helpers ---------------------------------------------------------
    @staticmethod
    def free_port():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def wait_nbd(self, uri, p=None, seconds=20):
        end = time.time() + seconds
        while time.time() < end:
            if p is not None and p.poll() is not None:
                die(f"process {p.args[0]} exited ({p.returncode}) before {uri} answered; log {self.log_of(p)}:\n"
                    + self.tail(p))
            if subprocess.run(["nbdinfo", "--size", uri], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0:
                return
            time.sleep(0.05)
        die(f"nothing answers on {uri} after {seconds} s")

    def tail(self, p, n=20):
        log = self.log_of(p)
        if not log or not os.path.exists(log):
            return ""
        return "".join(open(log, errors="replace").readlines()[-n:])

    def fio(self, uri, rw, bs, timed=True, size_mib=None, extra=()):
        """fio's nbd engine at QD16: timed (RUNTIME s) or one pass over the
        image; returns (IOPS, MB/s) of the direction that moved data."""
        out = os.path.join(self.tmp, "fio.json")
        cmd = ["fio", f"--name={rw}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
               "--iodepth=16", "--numjobs=1", f"--size={size_mib or self.size_mib}M",
               "--output-format=json", f"--output={out}", *extra]
        if timed:
            cmd += ["--time_based", f"--runtime={self.runtime}"]
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
            die(f"fio {rw} {bs} on {uri} failed")
        j = json.load(open(out))["jobs"][0]
        if j["error"]:
            die(f"fio {rw} {bs} on {uri} reported error {j['error']}")
        d = j["read" if "read" in rw else "write"]
        return d["iops"], d["bw_bytes"] / 1e6

    def nbdcopy(self, uri):
        """MB/s of one nbdcopy pass of the whole image to null:."""
        t0 = time.time()
        if subprocess.run(["nbdcopy", "--requests=64", "--connections=4", uri, "null:"]).returncode != 0:
            die(f"nbdcopy {uri} failed")
        return self.size_mib * 1048576 / 1e6 / (time.time() - t0)

    def record(self, who, test, rnd, value):
        self.rows.append((who, test, rnd, float(value)))
        print(f"  round {rnd} {who} {test}: {value:.1f}", file=sys.stderr)

    def note_load(self):
        self.loads.append(float(open("/proc/loadavg").read().split()[0]))

    # ---- results ---------------------------------------------------------
    def data(self):
        d = {}
        for who, test, rnd, v in self.rows:
            d.setdefault((who, test), {})[rnd] = v
        return d

    def med(self, who, test):
        d = self.data().get((who, test))
        return statistics.median(d.values()) if d else None

    def ratio(self, a, b):
        """(ratio of medians, median of per-round ratios) of (who, test) pairs."""
        d = self.data()
        da, db = d.get(a, {}), d.get(b, {})
        if not da or not db:
            return None, None
        per = [da[r] / db[r] for r in da if r in db and db[r] > 0]
        return statistics.median(da.values()) / statistics.median(db.values()), statistics.median(per)

    def load_line(self):
        end = open("/proc/loadavg").read().split()[:3]
        seen = f"{min(self.loads):.1f}-{max(self.loads):.1f}" if self.loads else "?"
        return (f"load average at start {' '.join(self.load_start)}, at end {' '.join(end)}, "
                f"1-minute load at each round {seen} ({os.cpu_count()} cores)")

    def machine_lines(self, extra=()):
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                              text=True).stdout.strip()
        # What the run itself writes (results, BENCHMARKS.md) does not make the code dirty.
        dirty = subprocess.run(["git", "-C", REPO, "diff", "--quiet", "--", ".", ":!BENCHMARKS.md",
                                ":!bench/results"]).returncode != 0
        lines = [f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
                 f"nproc {os.cpu_count()}; CPU {cpu}; kernel {os.uname().release}",
                 f"blockwayd {self.blockwayd_orig} (repo at {head}{'+dirty' if dirty else ''})",
                 f"{self.reps} round(s), interleaved; medians; image {self.size_mib} MiB;"
                 f" timed runs {self.runtime} s" + (" (BENCH_QUICK)" if self.quick else "")]
        return lines + list(extra)

    def all_runs_table(self, keep=None):
        """Every figure recorded, of the contenders keep(who) accepts (all by default)."""
        d = self.data()
        out = ["| who | test | runs (round order) |", "| --- | --- | --- |"]
        for (who, test) in sorted(d):
            if keep is not None and not keep(who):
                continue
            out.append(f"| {who} | {test} | " + ", ".join(f"{d[(who, test)][r]:.1f}" for r in sorted(d[(who, test)])) + " |")
        return out

    def out_name(self, ext, name=None):
        """bench/results/seeds-NAME[-quick].EXT; NAME is the experiment's
        unless an experiment with several reports names one."""
        return os.path.join(RESULTS_DIR, f"seeds-{name or self.name}{'-quick' if self.quick else ''}.{ext}")

    def publish(self, report_lines, section_lines, name=None):
        """Writes the full report to bench/results/seeds-NAME.md and, unless
        quick, replaces the section seeds:NAME in BENCHMARKS.md (between its
        markers; appended the first time). NAME as for out_name."""
        name = name or self.name
        md = self.out_name("md", name)
        with open(md, "w") as f:
            f.write("\n".join(report_lines) + "\n")
        print(f"report: {md}", file=sys.stderr)
        if self.quick:
            print("BENCH_QUICK: BENCHMARKS.md left alone; its section would read:\n", file=sys.stderr)
            print("\n".join(section_lines))
            return
        path = os.path.join(REPO, "BENCHMARKS.md")
        begin, end = f"<!-- seeds:{name} begin -->", f"<!-- seeds:{name} end -->"
        text = open(path).read()
        block = begin + "\n" + "\n".join(section_lines) + "\n" + end
        if begin in text and end in text:
            text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        open(path, "w").write(text)
        print(f"BENCHMARKS.md: section seeds:{name} updated", file=sys.stderr)


def bar_chart(path, title, panels):
    """A PNG of grouped bars: panels is [(subtitle, unit, [(label, value)])]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    palette = ["#4477aa", "#66ccee", "#228833", "#ccbb44", "#ee6677", "#aa3377", "#bbbbbb"]
    color = {}   # one color per label in every panel
    for _, _, bars in panels:
        for label, _ in bars:
            color.setdefault(label, palette[len(color) % len(palette)])
    for ax, (sub, unit, bars) in zip(axes[0], panels):
        labels = [b[0] for b in bars]
        vals = [b[1] if b[1] is not None else 0 for b in bars]
        rects = ax.bar(range(len(vals)), vals, color=[color[lb] for lb in labels])
        for r, v in zip(rects, vals):
            ax.annotate(f"{v:.0f}" if v >= 10 else f"{v:.2f}", (r.get_x() + r.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(sub, fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"chart: {path}", file=sys.stderr)
