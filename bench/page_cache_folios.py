#!/usr/bin/python3
"""CPU per 4 KiB buffered pwrite() into a file, by the size of the writes that
first put the file's pages in the page cache (issue 16: the cached 4k
randwrite cell of bench/plugin.sh).

Why: a profile of the nbdkit plugin and of blockwayd at cached 4 KiB random
writes (perf record -g -p PID) put 54 % (plugin) and 70 % (blockwayd) of the
samples in the kernel's ext4_block_write_begin. The cache is filled by writing
whole runs of chunks (a 1 MiB read miss writes 1 MiB at once,
cache/cache_population.cpp), and a large buffered write makes large page-cache
folios; a later 4 KiB write into such a folio walks every buffer head of it.
This measures that on the machine's own kernel and file system, with nothing
of blockway in the way: it fills a file with pwrites of FILL bytes, then
times 4 KiB pwrites at random aligned offsets (process CPU time, so other
load inflates it less than wall time).

Usage: bench/page_cache_folios.py [DIR]   (default: the current directory;
BENCH_SIZE_MIB=256, BENCH_WRITES=50000, BENCH_REPS=3; medians)
"""
import os
import random
import statistics
import sys
import time

SIZE = int(os.environ.get("BENCH_SIZE_MIB", "256")) << 20
WRITES = int(os.environ.get("BENCH_WRITES", "50000"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
FILLS = (4 << 10, 64 << 10, 1 << 20, 4 << 20)


def cpu_per_write(path: str, fill: int) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        data = os.urandom(fill)
        for off in range(0, SIZE, fill):
            os.pwrite(fd, data, off)
        small = os.urandom(4096)
        rnd = random.Random(fill)
        t0 = time.process_time()
        for _ in range(WRITES):
            os.pwrite(fd, small, rnd.randrange(SIZE // 4096) * 4096)
        return (time.process_time() - t0) / WRITES * 1e6
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    where = sys.argv[1] if len(sys.argv) > 1 else "."
    path = os.path.join(where, f"page-cache-folios-{os.getpid()}.img")
    print(f"file: {path} ({SIZE >> 20} MiB), {WRITES} random 4 KiB pwrites, median of {REPS}; "
          f"load {os.getloadavg()[0]:.2f} at start")
    print("| filled with pwrites of | CPU µs per 4 KiB pwrite (median) | rounds |")
    print("| --- | --- | --- |")
    for fill in FILLS:
        rounds = [cpu_per_write(path, fill) for _ in range(REPS)]
        print(f"| {fill >> 10} KiB | {statistics.median(rounds):.1f} | "
              f"{' '.join(f'{r:.1f}' for r in rounds)} |")
    print(f"load {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
