#!/usr/bin/env bash
# Measures a standalone Herald with loadgen, one scenario after another, and
# prints one line per run. Reproduces the tables of docs/benchmarks.md:
#
#   bash bench/loadgen-table.sh            # the fixed scenarios
#   bash bench/loadgen-table.sh ladder     # 1k subscribers, rising rates
#   bash bench/loadgen-table.sh idle       # RSS per idle connection at 10k
#   bash bench/loadgen-table.sh redis      # one node local, one and two nodes through Redis
#   bash bench/loadgen-table.sh channels   # 1,000 channels x 2 subscribers: local against Redis
#   bash bench/loadgen-table.sh cluster    # the same through a Redis Cluster of 3 masters
#   bash bench/loadgen-table.sh ceiling    # rising rates until loss or p99 > 20 ms: local, Redis, cluster
#   bash bench/loadgen-table.sh history    # the cost of history: history_size 100 (default) against 0
#   bash bench/loadgen-table.sh history-redis  # the same through Redis, with Redis's CPU, and a stream's memory
#   bash bench/loadgen-table.sh storm      # 1,000 clients reconnecting at once, with and without recovery
#   bash bench/loadgen-table.sh storm-redis    # the same through Redis, recovering what another node published
#
# Herald and loadgen share the machine; each run's JSON is kept in
# target/loadgen-table/.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p herald -p herald-loadgen -p herald-bench
out=target/loadgen-table
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

port=${PORT:-18080}
target/release/herald --listen "127.0.0.1:$port" >"$out/herald.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

ws="ws://127.0.0.1:$port/ws?channel={channel}"
sse="http://127.0.0.1:$port/sse?channel={channel}"

run() {
  local name=$1
  shift
  # The default --server-pid is the local Herald; a run may name others.
  local pids=(--server-pid "$pid")
  [[ " $* " == *" --server-pid "* ]] && pids=()
  target/release/loadgen fanout --quiet "${pids[@]}" --json "$out/$name.json" "$@" >"$out/$name.txt"
  python3 - "$out/$name.json" "$name" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
d, c = r["delivery_latency_us"], r["completion_latency_us"]
print(f"{sys.argv[2]:<14} subs {r['subscribers']:>5} {r['transport']:<3} rate {r['rate']:>7.0f}/s  "
      f"deliv/s {r['deliveries_per_s']:>9.0f}  lost {r['lost']:>6}  "
      f"deliv p50/p99 {d['p50']/1000:7.2f}/{d['p99']/1000:7.2f} ms  complete p50/p99 {c['p50']/1000:7.2f}/{c['p99']/1000:7.2f} ms  "
      f"server {r.get('server_cpu_us_per_delivery') or 0:5.2f} us/d  client {r['client_cpu_us_per_delivery']:5.2f} us/d  "
      f"hiccup p99 {r['machine_hiccup_us']['p99']/1000:6.2f} ms  saturated {r['client_saturated']}")
EOF
}

# Starts a redis-server of its own (pid in $rpid) and N Herald nodes using
# it on ports port+1… (pids in rnodes); everything is stopped at exit.
redis_nodes() {
  local rport=${REDIS_PORT:-16379}
  redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >"$out/redis.log" 2>&1 &
  rpid=$!
  rnodes=()
  for i in $(seq "$1"); do
    target/release/herald --listen "127.0.0.1:$((port + i))" --redis "redis://127.0.0.1:$rport" >"$out/herald-r$i.log" 2>&1 &
    rnodes+=($!)
  done
  trap 'kill $pid ${rnodes[*]} $rpid 2>/dev/null; wait 2>/dev/null || true' EXIT
  sleep 1
}

# Starts a Redis Cluster of three masters of its own (pids in $cpids) and
# one Herald node using it on port+3 (pid in $cnode).
cluster_node() {
  local base=${CLUSTER_PORT:-16381} seeds=() addrs=()
  cpids=()
  for i in 0 1 2; do
    local p=$((base + i)) d="$out/cluster-$((base + i))"
    rm -rf "$d" && mkdir -p "$d"
    (cd "$d" && exec redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000) >"$d/log" 2>&1 &
    cpids+=($!)
    seeds+=("redis://127.0.0.1:$p")
    addrs+=("127.0.0.1:$p")
  done
  for _ in $(seq 50); do redis-cli -p "$((base + 2))" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli --cluster create "${addrs[@]}" --cluster-yes >"$out/cluster-create.log" 2>&1
  for _ in $(seq 100); do
    redis-cli -p "$base" cluster info 2>/dev/null | grep -q cluster_state:ok && break
    sleep 0.1
  done
  target/release/herald --listen "127.0.0.1:$((port + 3))" --redis-cluster "$(IFS=,; echo "${seeds[*]}")" >"$out/herald-c.log" 2>&1 &
  cnode=$!
  trap 'kill $pid ${rnodes[*]:-} ${rpid:-} ${cpids[*]} $cnode 2>/dev/null; wait 2>/dev/null || true' EXIT
  sleep 1
}

case "${1:-table}" in
table)
  run ws-1k --url "$ws" --subscribers 1000 --rate 100 --duration 10 --warmup 2
  run ws-5k --url "$ws" --subscribers 5000 --rate 20 --duration 10 --warmup 2
  run sse-1k --url "$sse" --transport sse --subscribers 1000 --rate 100 --duration 10 --warmup 2
  ;;
ladder)
  for rate in ${RATES:-100 200 400 800 1600 3200}; do
    run "ladder-$rate" --url "$ws" --subscribers 1000 --rate "$rate" --duration 5 --warmup 1
  done
  ;;
redis)
  # A redis-server of its own, and two more Herald nodes using it.
  redis_nodes 2
  r1=${rnodes[0]} r2=${rnodes[1]}
  n1="ws://127.0.0.1:$((port + 1))/ws?channel={channel}"
  n2="ws://127.0.0.1:$((port + 2))/ws?channel={channel}"
  common=(--subscribers 1000 --rate "${RATE:-200}" --duration 10 --warmup 2)
  for round in 1 2; do
    run "local-$round" --url "$ws" "${common[@]}"
    run "redis-1node-$round" --url "$n1" --server-pid "$r1" --server-pid "$rpid" "${common[@]}"
    run "redis-2nodes-$round" --url "$n1" --url "$n2" --server-pid "$r1" --server-pid "$r2" --server-pid "$rpid" "${common[@]}"
  done
  ;;
channels)
  # Many channels, few subscribers each: the shape of per-user and
  # per-document channels. Herald's CPU only (--server-pid of Herald
  # alone), so "server us/d" compares the brokers' cost in Herald.
  redis_nodes 1
  r1=${rnodes[0]}
  n1="ws://127.0.0.1:$((port + 1))/ws?channel={channel}"
  for rate in ${RATES:-1000 20000}; do
    for conns in ${PUBLISH_CONNECTIONS:-4 16}; do
      common=(--channels 1000 --subscribers 2000 --rate "$rate" --duration 10 --warmup 2 --publish-connections "$conns")
      run "local-$rate-c$conns" --url "$ws" "${common[@]}"
      run "redis-$rate-c$conns" --url "$n1" --server-pid "$r1" "${common[@]}"
    done
  done
  ;;
cluster)
  cluster_node
  c1="ws://127.0.0.1:$((port + 3))/ws?channel={channel}"
  for rate in ${RATES:-1000 20000}; do
    common=(--channels 1000 --subscribers 2000 --rate "$rate" --duration 10 --warmup 2 --publish-connections "${PUBLISH_CONNECTIONS:-16}")
    run "local-$rate" --url "$ws" "${common[@]}"
    run "cluster-$rate" --url "$c1" --server-pid "$cnode" "${common[@]}"
  done
  ;;
ceiling)
  # Rising rates over 1,000 channels x 2 subscribers, each broker in turn
  # at each rate; HTTP publishes on 16 connections, or Herald's WebSocket
  # publish command (PUBLISH=ws, one pipelined connection).
  redis_nodes 1
  r1=${rnodes[0]}
  cluster_node
  publish=(--publish-connections 16)
  [ "${PUBLISH:-http}" = ws ] && publish=(--publish ws)
  for rate in ${RATES:-20000 30000 40000 50000 60000}; do
    common=(--channels 1000 --subscribers 2000 --rate "$rate" --duration 5 --warmup 1 "${publish[@]}")
    run "local-$rate" --url "$ws" "${common[@]}"
    run "redis-$rate" --url "ws://127.0.0.1:$((port + 1))/ws?channel={channel}" --server-pid "$r1" "${common[@]}"
    run "cluster-$rate" --url "ws://127.0.0.1:$((port + 3))/ws?channel={channel}" --server-pid "$cnode" "${common[@]}"
  done
  ;;
history)
  # The default Herald (history_size 100) against one without history,
  # 1,000 channels x 2 subscribers at 20,000/s, interleaved.
  target/release/herald --listen "127.0.0.1:$((port + 4))" --history-size 0 >"$out/herald-h0.log" 2>&1 &
  h0=$!
  trap 'kill $pid $h0 2>/dev/null; wait 2>/dev/null || true' EXIT
  sleep 0.5
  common=(--channels 1000 --subscribers 2000 --rate "${RATE:-20000}" --duration 8 --warmup 2 --publish-connections 16)
  for round in 1 2 3; do
    run "history-0-$round" --url "ws://127.0.0.1:$((port + 4))/ws?channel={channel}" --server-pid "$h0" "${common[@]}"
    run "history-100-$round" --url "$ws" "${common[@]}"
  done
  ;;
history-redis)
  # Two nodes on one Redis, differing only in history_size (0 against the
  # default 100) and their key prefix; 1,000 channels x 2 subscribers at
  # 20,000/s, interleaved. Redis's CPU per publish is sampled around each run.
  rport=${REDIS_PORT:-16379}
  redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >"$out/redis.log" 2>&1 &
  rpid=$!
  target/release/herald --listen "127.0.0.1:$((port + 4))" --redis "redis://127.0.0.1:$rport" --redis-prefix h0: --history-size 0 >"$out/herald-rh0.log" 2>&1 &
  h0=$!
  target/release/herald --listen "127.0.0.1:$((port + 5))" --redis "redis://127.0.0.1:$rport" --redis-prefix h100: >"$out/herald-rh100.log" 2>&1 &
  h100=$!
  trap 'kill $pid $h0 $h100 $rpid 2>/dev/null; wait 2>/dev/null || true' EXIT
  sleep 1
  ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
  rate=${RATE:-20000}
  common=(--channels 1000 --subscribers 2000 --rate "$rate" --duration 8 --warmup 2 --publish-connections 16)
  for round in 1 2 3; do
    for h in 0 100; do
      node=$h0 p=$((port + 4))
      [[ $h == 100 ]] && node=$h100 p=$((port + 5))
      before=$(ticks "$rpid")
      run "redis-history-$h-$round" --url "ws://127.0.0.1:$p/ws?channel={channel}" --server-pid "$node" "${common[@]}"
      after=$(ticks "$rpid")
      python3 -c "import sys; t=($after-$before)/100; print(f'  redis-server CPU {t:.2f} s over the run, {t*1e6/($rate*10):.2f} us per publish')"
    done
  done
  # One channel's stream at history_size 100 with 64-byte payloads.
  body=$(printf 'x%.0s' $(seq 64))
  for _ in $(seq 150); do
    curl -sf -X POST --data-binary "$body" "http://127.0.0.1:$((port + 5))/publish/mem" >/dev/null
  done
  echo "stream of 'mem': $(redis-cli -p "$rport" XLEN 'h100:{mem}:history') entries, $(redis-cli -p "$rport" MEMORY USAGE 'h100:{mem}:history' SAMPLES 0) bytes (MEMORY USAGE)"
  ;;
storm)
  target/release/storm --addr "127.0.0.1:$port" --clients "${CLIENTS:-1000}" --channels 10 --missed 100 --rounds 4 --server-pid "$pid"
  ;;
storm-redis)
  # The clients leave node 1 and come back to it; the missed messages are
  # published on node 2. Herald's CPU is node 1's.
  redis_nodes 2
  target/release/storm --addr "127.0.0.1:$((port + 1))" --publish-addr "127.0.0.1:$((port + 2))" --clients "${CLIENTS:-1000}" \
    --channels 10 --missed 100 --rounds 4 --server-pid "${rnodes[0]}" --redis-pid "$rpid"
  ;;
idle)
  target/release/loadgen connect --quiet --url "ws://127.0.0.1:$port/ws?channel=idle" \
    --connections "${CONNECTIONS:-10000}" --rate 2000 --hold 3 --server-pid "$pid" --json "$out/idle.json"
  ;;
*)
  echo "usage: $0 [table|ladder|idle|redis|channels|cluster|ceiling|history|history-redis|storm|storm-redis]" >&2
  exit 2
  ;;
esac
