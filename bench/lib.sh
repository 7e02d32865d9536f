# Shared set-up of the benchmark scripts (sourced, not run):
#   bench_settings DEFAULT_RUNTIME DEFAULT_REPS
# sets QUICK, RUNTIME, REPS, SIZE_MIB from BENCH_QUICK / BENCH_RUNTIME /
# BENCH_REPS / BENCH_SIZE_MIB (quick mode: 2 s runs, 1 round, 256 MiB; else
# the defaults given and 1 GiB), BLOCKWAYD (default: build/blockwayd),
# TMPBASE (BENCH_TMPDIR, default /var/tmp) and PY (Debian's python3: the
# pyenv shim may not be there for every user). Also defines free_port, now
# and mbps. The caller sets `repo` and `die` first.

bench_settings() {
    QUICK=${BENCH_QUICK:-0}
    if [[ $QUICK == 1 ]]; then
        RUNTIME=${BENCH_RUNTIME:-2}; REPS=${BENCH_REPS:-1}; SIZE_MIB=${BENCH_SIZE_MIB:-256}
    else
        RUNTIME=${BENCH_RUNTIME:-$1}; REPS=${BENCH_REPS:-$2}; SIZE_MIB=${BENCH_SIZE_MIB:-1024}
    fi
    BLOCKWAYD=${BLOCKWAYD:-$repo/build/blockwayd}
    TMPBASE=${BENCH_TMPDIR:-/var/tmp}
    PY=python3
    [[ -x /usr/bin/python3 ]] && PY=/usr/bin/python3
    return 0
}

# A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon after).
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
now() { date +%s.%N; }
# mbps BYTES T0 T1: MB/s (10^6 bytes) between two `now` stamps.
mbps() { "$PY" -c "import sys; print('%.0f' % ($1 / 1e6 / ($3 - $2)))"; }
