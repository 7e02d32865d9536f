#!/usr/bin/python3
"""A/B cost of blockwayd builds or options in front of tgt (iSCSI) or ganesha (NFS).

On a shared, loaded machine wall-clock throughput moves by 2x between runs,
so this alternates the variants (ABAB..., the order reversed every other
round) and reports, besides the rate, what each unit of work cost: blockwayd's
instructions and cycles (perf stat -p), and the CPU seconds (utime + stime)
of blockwayd, the server and the client. Medians over the rounds.

Usage (as root):
    bench/remote_ab.py iscsi REPS TESTS LABEL=BINARY[|OPTS] ...
    bench/remote_ab.py nfs   REPS TESTS LABEL=BINARY[|OPTS] ...   (LABEL=direct: qemu's own nfs driver)
TESTS, comma-separated: iscsi: seqread, seqwrite (nbdcopy --requests=64
--connections=4), randread, randwrite (fio nbd, 4k, QD16); nfs: qread,
qwrite (qemu-img bench -d 16 -s 4k), seqread (nbdcopy to null: / nfs-cp to /dev/shm).
OPTS are appended to the export URI, e.g. 'new=build/blockwayd|,sessions=1'.
Environment (bench/lib.sh's settings): BENCH_SIZE_MIB (default 512),
BENCH_RUNTIME (fio seconds, 4), BENCH_QUICK=1 (256 MiB, 2 s, 20000 requests),
BENCH_TMPDIR; COUNT (qemu-img bench requests, 100000), PEV (perf events,
default instructions,cycles; e.g. instructions,raw_syscalls:sys_enter).
Units: rate in GB/s or M requests/s; Gins/Gcyc (second PEV event) and CPU
seconds per GB or per M requests.

NFS runs in a private network and mount namespace (its own rpcbind, /run
and port 2049), so it does not meet other NFS tests on this machine. The
peers are the integration tests' (tests/integration/remotes.py).
"""
import json, os, statistics, subprocess, sys, tempfile, time

import lib  # bench/lib.py: settings; puts tests/integration on sys.path
from harness import free_port  # noqa: E402
import remotes  # noqa: E402

SETTINGS = lib.settings(4, 1, 512)

cpu, run_child, PerfStat, stop = lib.cpu, lib.run_child, lib.PerfStat, lib.stop_child


def start_bw(binary, export, tmp):
    port = free_port()
    pidf = f"{tmp}/bw.{port}.pid"
    p = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}", "--export", f"bench={export}", "--pid-file", pidf],
                         stdout=open(f"{tmp}/blockwayd.log", "a"), stderr=subprocess.STDOUT)
    for _ in range(400):
        if os.path.exists(pidf) and os.path.getsize(pidf) > 0:
            return p, f"nbd://127.0.0.1:{port}/bench"
        if p.poll() is not None:
            raise SystemExit(f"blockwayd exited; see {tmp}/blockwayd.log")
        time.sleep(0.05)
    raise SystemExit("blockwayd did not start")


def one_test(test, uri, size, tmp):  # -> wall, client CPU, work units
    runtime = SETTINGS["RUNTIME"]
    count = int(os.environ.get("COUNT", "20000" if SETTINGS["QUICK"] else "100000"))
    if test == "seqread":
        if uri.startswith("nbd:"):
            return (*run_child(["nbdcopy", "--requests=64", "--connections=4", uri, "null:"]), size / 1e9)
        out = f"/dev/shm/remote-ab.{os.getpid()}.raw"  # nfs-cp cannot write to /dev/null
        try:
            return (*run_child(["nfs-cp", uri, out]), size / 1e9)
        finally:
            if os.path.exists(out):
                os.unlink(out)
    if test == "seqwrite":
        return (*run_child(["nbdcopy", "--requests=64", "--connections=4", f"{tmp}/src.raw", uri]), size / 1e9)
    if test in ("randread", "randwrite"):
        out = f"{tmp}/fio.json"
        wall, c = run_child(["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={test}", "--bs=4k",
                             "--iodepth=16", f"--size={size}", "--time_based", f"--runtime={runtime}",
                             "--output-format=json", f"--output={out}"])
        key = "read" if test == "randread" else "write"
        return wall, c, json.load(open(out))["jobs"][0][key]["total_ios"] / 1e6
    if test in ("qread", "qwrite"):
        cmd = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", "16", "-s", "4k"] + \
              (["-w"] if test == "qwrite" else []) + [uri]
        return (*run_child(cmd), count / 1e6)
    raise SystemExit(f"unknown test {test}")


def run_rounds(reps, tests, variants, server_pid, remote_uri, size, tmp):
    res = {}
    for r in range(reps):
        for label, spec in (variants if r % 2 == 0 else variants[::-1]):
            binary, opts = (spec.split("|", 1) + [""])[:2]
            p, uri = (None, remote_uri) if binary == "direct" else start_bw(binary, remote_uri + opts, tmp)
            pid = p.pid if p else None
            for t in tests:
                ps = PerfStat(pid, tmp)
                c0b, c0s = cpu(pid), cpu(server_pid)
                wall, ccpu, work = one_test(t, uri, size, tmp)
                ev = ps.stop()
                bcpu, scpu = cpu(pid) - c0b, cpu(server_pid) - c0s
                m = dict(rate=work / wall, gins=ev[0] / work / 1e9, gev2=ev[1] / work / 1e9, bw=bcpu / work,
                         srv=scpu / work, cli=ccpu / work, tot=(bcpu + scpu + ccpu) / work)
                res.setdefault((label, t), []).append(m)
                print(f"round {r} {label:10s} {t:9s} " + " ".join(f"{k} {v:.4g}" for k, v in m.items()), flush=True)
            if p:
                stop(p)
    print(f"\nmedians of {reps} (load average {open('/proc/loadavg').read().split()[0]} at the end)")
    print("| test | variant | rate | blockwayd Gins | blockwayd 2nd event (G) | CPU s: blockwayd | server | client | all |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in tests:
        for label, _ in variants:
            ms = res[(label, t)]
            med = {k: statistics.median(m[k] for m in ms) for k in ms[0]}
            print(f"| {t} | {label} | {med['rate']:.3f} | {med['gins']:.3f} | {med['gev2']:.4f} | {med['bw']:.3f} | "
                  f"{med['srv']:.3f} | {med['cli']:.3f} | {med['tot']:.3f} |")


def iscsi(reps, tests, variants, size, tmp):
    img = f"{tmp}/lun.raw"
    subprocess.run(f"head -c {size} /dev/urandom > {img}; head -c {size} /dev/urandom > {tmp}/src.raw",
                   shell=True, check=True)
    tgt = remotes.Tgt(tmp)
    tgt.luns.append((1, img, False))
    try:
        tgt.start()
        run_rounds(reps, tests, variants, tgt.pid, tgt.uri(), size, tmp)
    finally:
        tgt.close()


def nfs(reps, tests, variants, size, tmp):
    # Already in a namespace of our own (see main): the host's peers, there.
    rpcbind, ganesha = remotes.Rpcbind(tmp), remotes.Ganesha(tmp)
    subprocess.run(f"head -c {size} /dev/urandom > {ganesha.file('img.raw')}", shell=True, check=True)
    try:
        rpcbind.start()
        ganesha.start()
        run_rounds(reps, tests, variants, ganesha.pid, ganesha.v3_uri("img.raw"), size, tmp)
    finally:
        ganesha.stop()
        rpcbind.close()


def main():
    if len(sys.argv) < 5 or sys.argv[1] not in ("iscsi", "nfs"):
        raise SystemExit(__doc__)
    kind, reps, tests = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    variants = [a.split("=", 1) for a in sys.argv[4:]]
    if kind == "nfs" and os.environ.get("REMOTE_AB_NETNS") != "1":
        # Own network and mount namespace: rpcbind's socket lives in /run.
        os.environ["REMOTE_AB_NETNS"] = "1"
        script = os.path.abspath(__file__)
        os.execvp("unshare", ["unshare", "-n", "-m", "--propagation", "private", "sh", "-c",
                              'mount -t tmpfs t /run && mkdir -p /run/rpcbind && ip link set lo up && exec "$@"',
                              "sh", sys.executable, script] + sys.argv[1:])
    size = SETTINGS["SIZE_MIB"] << 20
    tmp = tempfile.mkdtemp(dir=SETTINGS["TMPBASE"], prefix=f"remote-ab-{kind}.")
    try:
        (iscsi if kind == "iscsi" else nfs)(reps, tests, variants, size, tmp)
    finally:
        subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
