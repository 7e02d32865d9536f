#!/bin/bash
# Cost of the metrics endpoint: 4k random reads (fio's nbd engine, QD16) on a
# file export in /dev/shm, with --metrics off and with --metrics on and
# scraped every second (curl, as Prometheus would), alternating ROUNDS times
# (the order flips every round); each figure is one fio run on a fresh daemon.
# With BASE_BLOCKWAYD set, a third column runs that build (e.g. main before
# the per-operation latency histograms) the same way, metrics off.
#
#   bench/metrics.sh [ROUNDS]        (as root)
#
# Knobs: BENCH_QUICK=1, BENCH_RUNTIME (s per fio run, default 10), BENCH_REPS
# (rounds, default 5), BENCH_SIZE_MIB (image, default 256), BENCH_TMPDIR
# (default /dev/shm), BASE_BLOCKWAYD, SCRAPE_ONLY=1 (only the second part).
# Writes the report to stdout.
#
# Second part, robust against a loaded machine: the daemon's own CPU time
# (utime+stime from /proc) for 1000 scrapes over one keep-alive connection,
# with 8 exports (one with a cache) after some I/O: CPU per scrape, i.e. the
# share of one core that a scrape every second takes.
#
# With BASE_BLOCKWAYD and CPU_ONLY=1: instead of IOPS, the daemon's CPU time
# per request (utime+stime over 200000 4k random reads, QD16) of this build
# and the base build, alternated ROUNDS times: the cost of the per-request
# counters, latency clock reads and histogram, which load blurs less than IOPS.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_settings 10 5 256
rounds=${1:-$REPS}
TMPBASE=${BENCH_TMPDIR:-/dev/shm}
bench_tmpdir bw-metrics
bench_private_daemon
bench_cleanup_trap
base=${BASE_BLOCKWAYD:-}
if [[ -n $base ]]; then cp "$base" "$TMP/blockwayd-base"; base=$TMP/blockwayd-base; fi
dd if=/dev/urandom of="$TMP/img" bs=1M count="$SIZE_MIB" status=none
results=$TMP/results.tsv
scrapes=0

run() {  # WHO ROUND
  local who=$1 bin=$BLOCKWAYD port mport extra=() scraper= iops
  [[ $who == base ]] && bin=$base
  port=$(free_port)
  if [[ $who == on ]]; then mport=$(free_port); extra=(--metrics "$mport"); fi
  bench_start "$TMP/daemon.log" "$bin" --control-socket off --listen "127.0.0.1:$port" \
      --export "d=file://$TMP/img" --pid-file "$TMP/pid" "${extra[@]}"
  local pid=$BG_PID
  wait_pid_file "$TMP/pid" "$pid"
  if [[ $who == on ]]; then
    curl -sf "http://127.0.0.1:$mport/metrics" >/dev/null || die "no metrics on port $mport"
    bench_start "$TMP/scraper.log" bash -c \
        "while :; do curl -sf -o /dev/null http://127.0.0.1:$mport/metrics && echo ok; sleep 1; done"
    scraper=$BG_PID
  fi
  iops=$(fio_nbd "nbd://127.0.0.1:$port/d" randread 4k | cut -d' ' -f1)
  if [[ -n $scraper ]]; then stop_pid "$scraper"; fi
  stop_pid "$pid"
  rm -f "$TMP/pid"
  printf '%s\trandread-4k\t%s\t%s\n' "$who" "$2" "$iops" >>"$results"
  echo "round $2 $who: $iops IOPS" >&2
}

scrape_cost() {
  local port mport pid exports=() n
  port=$(free_port); mport=$(free_port)
  for n in 1 2 3 4 5 6 7; do truncate -s 64M "$TMP/e$n.img"; exports+=(--export "e$n=file://$TMP/e$n.img"); done
  bench_start "$TMP/daemon.log" "$BLOCKWAYD" --control-socket off --listen "127.0.0.1:$port" --metrics "$mport" \
      --export "d=file://$TMP/img,cache=$TMP/cache,chunk=64k" "${exports[@]}" --pid-file "$TMP/pid"
  pid=$BG_PID
  wait_pid_file "$TMP/pid" "$pid"
  RUNTIME=2 fio_nbd "nbd://127.0.0.1:$port/d" randread 4k >/dev/null
  "$PY" - "$pid" "$mport" <<'PY'
import http.client, os, sys
pid, port = int(sys.argv[1]), int(sys.argv[2])
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
c.request("GET", "/metrics"); body = c.getresponse().read()
n = 1000
before = cpu()
for _ in range(n):
    c.request("GET", "/metrics")
    r = c.getresponse(); r.read()
    assert r.status == 200
used = cpu() - before
print("scrape: %d bytes, %d lines, 8 exports; daemon CPU for %d scrapes: %.2f s = %.2f ms per scrape "
      "(%.3f %% of one core at one scrape per second)" % (len(body), body.count(b"\n"), n, used, used / n * 1e3,
                                                          used / n * 100))
PY
  stop_pid "$pid"
  rm -f "$TMP/pid"
}

cpu_per_request() {  # WHO BIN ROUND
  local port pid before after
  port=$(free_port)
  bench_start "$TMP/daemon.log" "$2" --control-socket off --listen "127.0.0.1:$port" \
      --export "d=file://$TMP/img" --pid-file "$TMP/pid"
  pid=$BG_PID
  wait_pid_file "$TMP/pid" "$pid"
  before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  fio --name=r --ioengine=nbd --uri="nbd://127.0.0.1:$port/d" --rw=randread --bs=4k --iodepth=16 \
      --size="${SIZE_MIB}M" --number_ios=200000 --output=/dev/null || die "fio failed"
  after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  stop_pid "$pid"
  rm -f "$TMP/pid"
  local us
  us=$("$PY" -c "import os; print('%.3f' % (($after - $before) / os.sysconf('SC_CLK_TCK') / 200000 * 1e6))")
  printf '%s\tcpu-us-per-4k-read\t%s\t%s\n' "$1" "$3" "$us" >>"$results"
  echo "round $3 $1: $us us CPU per request" >&2
}

if [[ ${CPU_ONLY:-0} == 1 ]]; then
  [[ -n $base ]] || die "CPU_ONLY=1 needs BASE_BLOCKWAYD"
  for i in $(seq "$rounds"); do
    if ((i % 2)); then order=(new base); else order=(base new); fi
    for who in "${order[@]}"; do
      if [[ $who == new ]]; then cpu_per_request new "$BLOCKWAYD" "$i"; else cpu_per_request base "$base" "$i"; fi
    done
  done
  bench_machine_info "image: ${SIZE_MIB} MiB in $TMPBASE; fio nbd engine, 200000 4k random reads QD16 per figure" \
                     "base: $BASE_BLOCKWAYD"
  "$PY" - "$results" <<'PY'
import sys
sys.path.insert(0, "bench")
import lib
rows, data, med = lib.read_results(sys.argv[1])
k = "cpu-us-per-4k-read"
print("| round | new (us CPU/request) | base | new/base |\n| --- | --- | --- | --- |")
for i, (n, b) in enumerate(zip(data[("new", k)], data[("base", k)])):
    print("| %d | %.2f | %.2f | %.3f |" % (i + 1, n, b, n / b))
print("| median | %.2f | %.2f | %.3f |" % (med[("new", k)], med[("base", k)], med[("new", k)] / med[("base", k)]))
PY
  exit 0
fi

if [[ ${SCRAPE_ONLY:-0} == 1 ]]; then
  scrape_cost
  exit 0
fi

loads=()
for i in $(seq "$rounds"); do
  loads+=("$(cut -d' ' -f1 /proc/loadavg)")
  if ((i % 2)); then order=(off on); else order=(on off); fi
  [[ -n $base ]] && order+=(base)
  for who in "${order[@]}"; do run "$who" "$i"; done
done
scrapes=$(grep -c ok "$TMP/scraper.log" || true)
cost=$(scrape_cost)

bench_machine_info "image: ${SIZE_MIB} MiB in $TMPBASE, file backend; fio nbd engine, 4k randread QD16, ${RUNTIME} s per run, $rounds rounds" \
                   "scrapes answered during the 'on' runs: $scrapes" "load average per round: ${loads[*]}" "$cost"
"$PY" - "$results" <<'PY'
import sys
sys.path.insert(0, "bench")
import lib
rows, data, med = lib.read_results(sys.argv[1])
whos = [w for w in ("off", "on", "base") if (w, "randread-4k") in data]
print("| round | " + " | ".join(whos) + " | on/off |")
print("| --- " * (len(whos) + 2) + "|")
n = len(data[("off", "randread-4k")])
for i in range(n):
    cells = [str(int(data[(w, "randread-4k")][i])) for w in whos]
    ratio = data[("on", "randread-4k")][i] / data[("off", "randread-4k")][i]
    print("| %d | %s | %.3f |" % (i + 1, " | ".join(cells), ratio))
cells = ["%d" % med[(w, "randread-4k")] for w in whos]
print("| median | %s | %.3f |" % (" | ".join(cells), med[("on", "randread-4k")] / med[("off", "randread-4k")]))
if "base" in whos:
    print("\noff/base (the always-on per-request counters and clock reads against the base build): %.3f"
          % (med[("off", "randread-4k")] / med[("base", "randread-4k")]))
PY
