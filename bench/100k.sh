#!/usr/bin/env bash
# Many connections on one box: Herald beside the careful hand-written server
# (bench/src/careful.rs), both release builds on two threads, one loadgen,
# interleaved (`loadgen compare`, ROUNDS rounds, medians).
#
#   bash bench/100k.sh          # every scenario below
#   bash bench/100k.sh idle     # N idle WebSocket connections: RSS per connection, connect rate
#                               #     (first, on fresh servers)
#   bash bench/100k.sh wide     # (a) N subscribers over N/10 channels, RATE (10,000) msg/s
#   bash bench/100k.sh one      # (b) N subscribers on one channel, 1 msg/s: the time
#                               #     for one message to reach all of them
#
# N is 100,000 unless set. Each process needs N + 1,000 file descriptors: the
# script raises the soft limit to the hard one, and fs.nr_open and the hard
# limit where it may (root with CAP_SYS_RESOURCE). Where the hard limit stays
# lower, it runs at the largest N the limit allows and says so on the first
# line of its output. Subscribers are spread over the loopback addresses
# 127.0.0.1-127.0.0.8 (each gives ~28,000 source ports per server port).
# Reports land in target/100k/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald -p herald-loadgen -p herald-bench --bins
out=target/100k
mkdir -p "$out"

want=${N:-100000}
need=$((want + 1000))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$need" ]; then
  # Raising the hard limit needs CAP_SYS_RESOURCE; fs.nr_open caps it.
  if [ -w /proc/sys/fs/nr_open ] && [ "$(cat /proc/sys/fs/nr_open)" -lt "$need" ]; then
    echo "$need" >/proc/sys/fs/nr_open 2>/dev/null || true
  fi
  ulimit -Hn "$need" 2>/dev/null || true
fi
ulimit -n "$(ulimit -Hn)"
limit=$(ulimit -n)
n=$want
if [ "$limit" != unlimited ] && [ "$limit" -lt "$need" ]; then
  n=$((limit - 1000))
  echo "fd limit $limit (hard limit, cannot be raised here): running at N=$n instead of $want" >&2
fi
echo "N=$n connections, fd limit $limit" | tee "$out/N.txt"
if [ -w /proc/sys/net/core/somaxconn ] && [ "$(cat /proc/sys/net/core/somaxconn)" -lt 4096 ]; then
  echo 4096 >/proc/sys/net/core/somaxconn || true
fi

H=${PORT:-18500}
C=$((H + 1))
target/release/herald --listen "127.0.0.1:$H" --shards 2 --max-connections $((n + 1000)) >"$out/herald.log" 2>&1 &
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

sources=(--source-ips 127.0.0.1-127.0.0.8)
targets=(
  --target "name=herald url=ws://127.0.0.1:$H/ws?channel={channel} pid=$hp"
  --target "name=careful url=ws://127.0.0.1:$C/ws?channel={channel} publish-url=http://127.0.0.1:$C/publish/{channel} pid=$cp"
)
compare() {
  local name=$1
  shift
  echo "== $name (N=$n)"
  target/release/loadgen compare "${targets[@]}" --rounds "${ROUNDS:-2}" "${sources[@]}" \
    --connect-rate "${CONNECT_RATE:-5000}" --connect-timeout 30 --json "$out/$name.json" "$@" | tee "$out/$name.txt"
}

case "${1:-all}" in
all | idle)
  # Once, on fresh servers: memory an allocator kept from an earlier run
  # would hide the cost of a connection.
  for round in 1; do
    for t in herald:$H:$hp careful:$C:$cp; do
      IFS=: read -r name port spid <<<"$t"
      echo "== idle $name (N=$n)"
      target/release/loadgen connect --quiet --url "ws://127.0.0.1:$port/ws?channel=idle" "${sources[@]}" \
        --connections "$n" --rate "${CONNECT_RATE:-5000}" --hold 5 --connect-timeout 30 --server-pid "$spid" \
        --json "$out/idle-$name-$round.json"
      python3 - "$out/idle-$name-$round.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
c = r["connect_latency_us"]
print(f"opened {r['opened']} ({r['opened_per_s']:.0f}/s), errors {r['connect_errors']}, connect p50/p99 "
      f"{c['p50']/1000:.1f}/{c['p99']/1000:.1f} ms, RSS {r.get('server_rss_kib')} KiB, "
      f"{r.get('server_rss_per_connection_kib') or 0:.2f} KiB per connection")
EOF
    done
  done
  ;;&
all | wide)
  compare wide --subscribers "$n" --channels $((n / 10)) --rate "${RATE:-10000}" --duration 10 --warmup 2
  ;;&
all | one)
  compare one --subscribers "$n" --channels 1 --rate 1 --duration "${ONE_DURATION:-30}" --warmup 2 --drain 5
  ;;
esac
