#!/usr/bin/python3
"""Turns a blockway trace (docs/traces.md) into two PNG pictures:

  PREFIX-heatmap.png   offset x time: how many requests touched each cell
                       (reads and writes together; flushes have no offset)
  PREFIX-latency.png   latency histogram per operation (log-scaled x axis)

Usage: bench/trace_plot.py TRACE.csv PREFIX [--bins-time N] [--bins-offset N]

Needs python3-matplotlib (scripts/install-deps.sh installs it with the test
packages)."""

import argparse
import csv
import math
import sys

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt  # noqa: E402

MAGIC = "# blockway trace v1"
COLUMNS = ["start_ns", "op", "offset", "length", "latency_ns", "cache", "error"]


def read_trace(path):
    """(header, rows) with rows as dicts of ints (op and cache as strings)."""
    with open(path) as f:
        first = f.readline().rstrip("\n")
        if not first.startswith(MAGIC):
            raise SystemExit("%s: not a blockway trace (no %r line)" % (path, MAGIC))
        cols = f.readline().rstrip("\n").split(",")
        if cols != COLUMNS:
            raise SystemExit("%s: line 2 is not the column names %s" % (path, ",".join(COLUMNS)))
        rows = []
        for rec in csv.reader(line for line in f if line.strip() and not line.startswith("#")):
            r = dict(zip(COLUMNS, rec))
            for k in ("start_ns", "offset", "length", "latency_ns", "error"):
                r[k] = int(r[k])
            rows.append(r)
    size = 0
    for field in first[len(MAGIC):].split():
        if field.startswith("size="):
            size = int(field[5:])
    return first[len(MAGIC):].strip(), size, rows


def heatmap(rows, size, out, bins_time, bins_offset, title):
    ranged = [r for r in rows if r["op"] != "flush"]
    if not ranged:
        raise SystemExit("the trace has no requests with an offset: nothing to draw")
    t_max = max(r["start_ns"] for r in ranged) / 1e9 or 1e-9
    o_max = size or max(r["offset"] + r["length"] for r in ranged)
    grid = [[0] * bins_time for _ in range(bins_offset)]
    for r in ranged:
        t = min(int(r["start_ns"] / 1e9 / t_max * bins_time), bins_time - 1)
        o = min(int(r["offset"] / o_max * bins_offset), bins_offset - 1)
        grid[o][t] += 1
    fig, ax = plt.subplots(figsize=(10, 5))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="inferno", interpolation="nearest",
                   extent=[0, t_max, 0, o_max / 2**20])
    ax.set_xlabel("time since the trace began (s)")
    ax.set_ylabel("offset (MiB)")
    ax.set_title(title + ": requests per cell")
    fig.colorbar(im, ax=ax, label="requests")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def latency_histogram(rows, out, title):
    by_op = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(max(r["latency_ns"], 1) / 1e3)
    lo = min(min(v) for v in by_op.values())
    hi = max(max(v) for v in by_op.values())
    lo_e, hi_e = math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + (1 if lo == hi else 0)
    bins = [10 ** (lo_e + i * (hi_e - lo_e) / 60) for i in range(61)]
    fig, ax = plt.subplots(figsize=(10, 5))
    for op, v in sorted(by_op.items()):
        ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label="%s (%d)" % (op, len(v)))
    ax.set_xscale("log")
    ax.set_xlabel("latency (us)")
    ax.set_ylabel("requests")
    ax.set_title(title + ": latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("prefix")
    p.add_argument("--bins-time", type=int, default=200)
    p.add_argument("--bins-offset", type=int, default=128)
    a = p.parse_args(argv)
    if a.bins_time < 1 or a.bins_offset < 1:
        p.error("bins must be at least 1")
    header, size, rows = read_trace(a.trace)
    if not rows:
        raise SystemExit("%s: the trace holds no records" % a.trace)
    heatmap(rows, size, a.prefix + "-heatmap.png", a.bins_time, a.bins_offset, header)
    latency_histogram(rows, a.prefix + "-latency.png", header)
    print("%s-heatmap.png %s-latency.png: %d records" % (a.prefix, a.prefix, len(rows)))


if __name__ == "__main__":
    main(sys.argv[1:])
