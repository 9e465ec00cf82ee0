#!/bin/sh
# Bulk throughput through `socks6fast gateway` + `socks6fast serve` against direct loopback
# (issue 15 item 1: target >= 0.5 x direct). One stream, loadgen's sendfile(2) source into
# its splice(2) sink, everything on 127.0.0.1; each figure is the sink's Gbit/s over
# SECONDS after a 1 s warm-up. Run from the checkout with the venv installed:
#     sh benchmarks/gateway_bulk.sh [SECONDS]
# It builds loadgen.c into a temporary directory and stops everything it started.
set -eu
SECONDS_=${1:-5}
PY=${PY:-.venv/bin/python}
DIR=$(mktemp -d)
trap 'kill $(cat "$DIR"/pids 2>/dev/null) 2>/dev/null || true; rm -rf "$DIR"' EXIT
cc -O2 -o "$DIR/lg" socks6fast/bench/loadgen.c
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { "$PY" -c "
import socket, time, sys
for _ in range(200):
    try: socket.create_connection(('127.0.0.1', $1), 0.1).close(); sys.exit(0)
    except OSError: time.sleep(0.05)
sys.exit(1)"; }
run() {  # run LABEL PROXY_PORT PROTO
    "$DIR/lg" sink --port 0 --conns 1 --warmup 1 --seconds "$SECONDS_" --max-seconds 60 > "$DIR/sink.out" &
    echo $! >> "$DIR/pids"
    sleep 0.2
    sink=$(awk '/^port/ {print $2; exit}' "$DIR/sink.out")
    "$DIR/lg" bulk --proxy "$2" --proto "$3" --target "$sink" --streams 1 --max-seconds 60 > /dev/null &
    echo $! >> "$DIR/pids"
    while ! grep -q '^done' "$DIR/sink.out"; do sleep 0.2; done
    awk -v l="$1" '/^done/ {printf "%-34s %6.2f Gbit/s\n", l, $2 * 8 / $3}' "$DIR/sink.out"
}
P=$(free_port); G=$(free_port)
"$PY" -P -m socks6fast serve --listen "127.0.0.1:$P" --log-level warning 2> "$DIR/serve.log" &
echo $! >> "$DIR/pids"
wait_port "$P"
"$PY" -P -m socks6fast gateway --listen "127.0.0.1:$G" --upstream "socks6://127.0.0.1:$P" \
    --log-level warning 2> "$DIR/gateway.log" &
echo $! >> "$DIR/pids"
wait_port "$G"
run "direct loopback" 0 none
run "socks6fast serve (SOCKS 5)" "$P" 5
run "gateway (SOCKS 5) + serve (SOCKS 6)" "$G" 5
