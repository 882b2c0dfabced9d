#!/usr/bin/env bash
# What permessage-deflate costs and saves, side by side in one run: 1,000
# WebSocket subscribers on one channel, 100 msg/s of 1 KiB JSON change sets
# (loadgen --payload-json), every subscriber offering compression
# (loadgen --compression), against
#
#   herald-off      Herald without compression (the offer is declined)
#   herald-shared   Herald --compression: each message deflated once, shared
#   herald-shared-l6  the same at --compression-level 6 (smaller, 3× the
#                   deflate time, paid once per message)
#   herald-per-conn Herald --compression forced to deflate once per delivery
#                   (a hidden benchmark flag): what sharing saves
#   node-ws-off     Node's ws, no compression (bench/peers/node-ws)
#   node-ws-deflate the same with ws's permessage-deflate (level 1, no server
#                   context takeover): ws deflates per socket
#
#   bash bench/compression.sh           # ROUNDS=3 SUBS=1000 RATE=100 PAYLOAD=1024 DURATION=10
#   SIDES="herald-off herald-shared" bash bench/compression.sh   # some sides only
#
# Sides are interleaved round by round. For each: bytes on the wire per
# delivery (read by the subscribers, headers included), server CPU per
# delivery, latency, loss, and for Herald the deflates per message
# (herald_frames_encoded_total{form="ws_json_deflate"} over the messages
# published). JSON reports in target/compression-bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald -p herald-loadgen
out=target/compression-bench
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
port=${PORT:-18480}
rounds=${ROUNDS:-3}
subs=${SUBS:-1000}
rate=${RATE:-100}
payload=${PAYLOAD:-1024}
duration=${DURATION:-10}
node=0
if command -v node >/dev/null; then
  if [ ! -d bench/peers/node-ws/node_modules/ws ]; then
    (cd bench/peers/node-ws && npm install --silent --no-audit --no-fund) || true
  fi
  [ -d bench/peers/node-ws/node_modules/ws ] && node=1
fi
[ "$node" = 1 ] || echo "(node or its ws package is missing: the node-ws sides are skipped)" >&2
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; wait 2>/dev/null || true' EXIT

wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done; echo "nothing on port $1" >&2; exit 1; }

start() {
  case $1 in
    herald-off) target/release/herald --listen "127.0.0.1:$port" >"$out/$1.log" 2>&1 & ;;
    herald-shared) target/release/herald --listen "127.0.0.1:$port" --compression >"$out/$1.log" 2>&1 & ;;
    herald-shared-l6) target/release/herald --listen "127.0.0.1:$port" --compression --compression-level 6 >"$out/$1.log" 2>&1 & ;;
    herald-per-conn) target/release/herald --listen "127.0.0.1:$port" --compression --bench-compression-per-connection >"$out/$1.log" 2>&1 & ;;
    node-ws-off) node bench/peers/node-ws/server.js "$port" >"$out/$1.log" 2>&1 & ;;
    node-ws-deflate) DEFLATE=1 node bench/peers/node-ws/server.js "$port" >"$out/$1.log" 2>&1 & ;;
  esac
  pid=$!
  wait_port "$port"
}

sides=${SIDES:-"herald-off herald-shared herald-shared-l6 herald-per-conn"}
[ "$node" = 1 ] && [ -z "${SIDES:-}" ] && sides="$sides node-ws-off node-ws-deflate"
echo "== $subs subscribers, $rate msg/s of $payload B JSON, every subscriber offering permessage-deflate"
for round in $(seq "$rounds"); do
  for side in $sides; do
    start "$side"
    name="$side-$round"
    case $side in
      herald-*) extra=() ;;
      node-*) extra=(--format raw --publish-url "http://127.0.0.1:$port/publish/{channel}") ;;
    esac
    target/release/loadgen fanout --quiet --url "ws://127.0.0.1:$port/ws?channel={channel}" "${extra[@]}" \
      --subscribers "$subs" --rate "$rate" --payload "$payload" --payload-json --compression \
      --duration "$duration" --warmup 2 --server-pid "$pid" --json "$out/$name.json" >/dev/null
    if [[ $side == herald-* ]]; then
      curl -s "http://127.0.0.1:$port/metrics" >"$out/$name.metrics"
    fi
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
    pid=
    python3 - "$out/$name.json" "$name" "$out/$name.metrics" <<'PY'
import json, os, sys
path, name, mpath = sys.argv[1], sys.argv[2], sys.argv[3]
r = json.load(open(path))
d = r["delivery_latency_us"]
per_msg = "-"
if os.path.exists(mpath):
    m = {}
    for line in open(mpath):
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            m[k] = float(v)
    pub = m.get("herald_messages_published_total", 0)
    # Shared: herald_frames_encoded_total{form="ws_json_deflate"} is the
    # same count; per-connection deflates are counted here only.
    built = m.get('herald_compressed_frames_total{source="message"}', 0)
    per_msg = f"{built / pub:.1f}" if pub else "-"
print(f"{name:<18} agreed {r['compressed_connections']:>5}/{r['connected']:<5} wire {r['wire_bytes_per_delivery'] or 0:7.1f} B/delivery  "
      f"server {r.get('server_cpu_us_per_delivery') or 0:6.2f} us/delivery  deflates/msg {per_msg:>6}  "
      f"p50/p99 {d['p50']/1000:6.2f}/{d['p99']/1000:7.2f} ms  lost {r['lost']}  client {r['client_cpu_us_per_delivery']:.2f} us/delivery"
      + ("  CLIENT SATURATED" if r["client_saturated"] else ""))
PY
    rm -f "$out/$name.metrics"
  done
done
