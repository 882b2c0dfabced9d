#!/usr/bin/env bash
# Herald beside the careful hand-written server (bench/src/careful.rs: axum +
# tungstenite + tokio broadcast, the envelope encoded once per message), both
# standalone release builds on two threads, measured by one loadgen,
# interleaved round by round (`loadgen compare`):
#
#   bash bench/careful-table.sh            # every scenario below
#   bash bench/careful-table.sh closed     # only the closed-loop publisher
#
# Scenarios: 1,000 WebSocket subscribers on one channel at 50, 300 and
# 1,200 msg/s (pipelined HTTP publisher); the same with a closed-loop
# publisher (one request in flight, as a backend publishes) at 400, 800
# and 1,600 msg/s; 10,000 subscribers at 50 msg/s. Reports in target/careful-table/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald -p herald-loadgen -p herald-bench --bins
out=target/careful-table
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
H=${PORT:-18300}
C=$((H + 1))
target/release/herald --listen "127.0.0.1:$H" --shards 2 >"$out/herald.log" 2>&1 &
hp=$!
target/release/careful --listen "127.0.0.1:$C" --threads 2 >"$out/careful.log" 2>&1 &
cp=$!
trap 'kill $hp $cp 2>/dev/null; wait 2>/dev/null || true' EXIT
for port in $H $C; do
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    sleep 0.05
  done
done

targets=(
  --target "name=herald url=ws://127.0.0.1:$H/ws?channel={channel} pid=$hp"
  --target "name=careful url=ws://127.0.0.1:$C/ws?channel={channel} publish-url=http://127.0.0.1:$C/publish/{channel} pid=$cp"
)
compare() {
  local name=$1
  shift
  echo "== $name"
  target/release/loadgen compare "${targets[@]}" --rounds "${ROUNDS:-2}" --duration 5 --warmup 2 --json "$out/$name.json" "$@" |
    tee "$out/$name.txt"
}

case "${1:-all}" in
all | open)
  for rate in 50 300 1200; do
    compare "1k-x$rate" --subscribers 1000 --rate "$rate"
  done
  ;;&
all | closed)
  for rate in ${CLOSED_RATES:-400 800 1600}; do
    compare "closed-1k-x$rate" --subscribers 1000 --rate "$rate" --publish-inflight 1 --publish-connections 1
  done
  ;;&
all | wide)
  compare "10k-x50" --subscribers 10000 --rate 50 --connect-rate 4000
  ;;
esac
