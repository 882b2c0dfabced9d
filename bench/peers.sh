#!/usr/bin/env bash
# Herald against its peers, side by side on this machine, with loadgen:
#
#   bash bench/peers.sh            # every scenario (about 2 minutes per server)
#   bash bench/peers.sh ws-1k      # one of: ws-1k ws-5k sse-1k ladder idle
#
# Servers, all on loopback and started by this script:
#   herald  - release build, 2 shards
#   careful - the careful hand-written axum + tungstenite + tokio broadcast
#             server (bench/src/careful.rs): envelope encoded once per
#             message, batched writes; 2 runtime threads. The baseline.
#   naive   - naive (per-subscriber JSON): the same stack encoding the
#             envelope in every subscriber's task (bench/src/naive.rs),
#             2 runtime threads; kept for reference
#   nchan   - nginx + nchan, 2 workers (Debian packages nginx and
#             libnginx-mod-nchan, installed when missing)
#   node-ws - Node.js with the `ws` package (bench/peers/node-ws, npm install
#             when missing); one process, as Node runs
#   floor   - no engine: pre-encoded bytes written to every socket from 2
#             threads (bench/src/floor.rs); what the kernel costs
#   sockudo - Sockudo (Rust, Pusher protocol), local adapter, 2 runtime
#             threads, rate limits off: subscribers send pusher:subscribe,
#             the publisher signs Pusher HTTP API calls, one request per
#             connection (Sockudo closes each). Not built here when missing
#             (about an hour on 2 cores): `cargo install sockudo --locked
#             --root target/peers/sockudo` (needs protobuf-compiler), or set
#             SOCKUDO to its binary. Skipped when absent.
#
# Each scenario runs `loadgen compare` (targets interleaved, 2 rounds,
# medians, ratios to Herald); the ladder raises the rate with 1,000
# subscribers until a server loses messages or its delivery p99 passes
# 100 ms. JSON lands in target/peers/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/target/peers
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release -q -p herald -p herald-loadgen -p herald-bench

if [ ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
  echo "installing nginx and nchan (Debian packages)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light libnginx-mod-nchan >/dev/null \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx libnginx-mod-nchan >/dev/null
fi
if [ ! -d bench/peers/node-ws/node_modules/ws ]; then
  echo "installing the ws package (npm)" >&2
  (cd bench/peers/node-ws && npm install --silent --no-audit --no-fund)
fi

H=18400 N=18401 X=18402 J=18403 F=18404 C=18405 S=18406
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$out/nginx/nginx.pid" ] && kill "$(cat "$out/nginx/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

target/release/herald --listen "127.0.0.1:$H" --shards 2 >"$out/herald.log" 2>&1 &
hpid=$!
pids+=($hpid)
target/release/careful --listen "127.0.0.1:$C" --threads 2 >"$out/careful.log" 2>&1 &
cpid=$!
pids+=($cpid)
target/release/naive --listen "127.0.0.1:$N" --threads 2 >"$out/naive.log" 2>&1 &
npid=$!
pids+=($npid)
node bench/peers/node-ws/server.js "$J" >"$out/node.log" 2>&1 &
jpid=$!
pids+=($jpid)
target/release/floor --listen "127.0.0.1:$F" --threads 2 >"$out/floor.log" 2>&1 &
fpid=$!
pids+=($fpid)
sockudo=${SOCKUDO:-$root/target/peers/sockudo/bin/sockudo}
[ -x "$sockudo" ] || sockudo=$(command -v sockudo || true)
spid=
if [ -n "$sockudo" ]; then
  sed -e "s|PORT|$S|g" bench/peers/sockudo.toml >"$out/sockudo.toml"
  # Sockudo keeps its defaults (0.0.0.0, rate limits) when its config does
  # not load, silently: check that it listens on loopback alone below.
  RUST_LOG=warn TOKIO_WORKER_THREADS=2 "$sockudo" --config "$out/sockudo.toml" >"$out/sockudo.log" 2>&1 &
  spid=$!
  pids+=($spid)
else
  echo "sockudo not found: skipped (see the header of $0)" >&2
fi
mkdir -p "$out/nginx"
sed -e "s|PORT|$X|g" -e "s|PREFIX|$out/nginx|g" bench/peers/nchan.conf >"$out/nginx/nginx.conf"
nginx -c "$out/nginx/nginx.conf" -p "$out/nginx"
sleep 1
if [ -n "$spid" ] && ! ss -ltnH "sport = :$S" | grep -q "127.0.0.1:$S"; then
  echo "sockudo is not listening on 127.0.0.1:$S (its config did not load?): stopping" >&2
  exit 1
fi
xmaster=$(cat "$out/nginx/nginx.pid")
xpids=$(pgrep -P "$xmaster" | tr '\n' ' ')

# One entry per server: name, WebSocket URL, SSE URL (or -), publish URL
# (or - for Herald's own), format, server pids, and loadgen target keys of
# its own (or -). nchan's CPU and RSS are its workers'.
servers=(
  "herald|ws://127.0.0.1:$H/ws?channel={channel}|http://127.0.0.1:$H/sse?channel={channel}|-|herald|$hpid"
  "careful|ws://127.0.0.1:$C/ws?channel={channel}|http://127.0.0.1:$C/sse?channel={channel}|http://127.0.0.1:$C/publish/{channel}|herald|$cpid"
  "naive|ws://127.0.0.1:$N/ws?channel={channel}|http://127.0.0.1:$N/sse?channel={channel}|http://127.0.0.1:$N/publish/{channel}|herald|$npid"
  "nchan|ws://127.0.0.1:$X/sub?channel={channel}|http://127.0.0.1:$X/sub?channel={channel}|http://127.0.0.1:$X/publish/{channel}|raw|$xpids"
  "node-ws|ws://127.0.0.1:$J/ws?channel={channel}|-|http://127.0.0.1:$J/publish/{channel}|raw|$jpid"
  "floor|ws://127.0.0.1:$F/ws|-|http://127.0.0.1:$F/publish/{channel}|raw|$fpid"
)
if [ -n "$spid" ]; then
  pusher='subscribe-message={"event":"pusher:subscribe","data":{"channel":"{channel}"}}'
  pusher+=' publish-sign=pusher:app-key:app-secret publish-content-type=application/json'
  pusher+=' publish-body={"name":"lg","channel":"{channel}","data":"{payload}"} publish-inflight=1 publish-connections=8'
  servers+=("sockudo|ws://127.0.0.1:$S/app/app-key?protocol=7|-|http://127.0.0.1:$S/apps/app-id/events|raw|$spid|$pusher")
fi
targets() { # transport
  local line name ws sse pub fmt pidlist extra url spec
  for line in "${servers[@]}"; do
    IFS='|' read -r name ws sse pub fmt pidlist extra <<<"$line"
    url=$ws
    [ "$1" = sse ] && url=$sse
    [ "$url" = - ] && continue
    spec="name=$name url=$url format=$fmt"
    [ "$pub" != - ] && spec="$spec publish-url=$pub"
    [ -n "$extra" ] && [ "$extra" != - ] && spec="$spec $extra"
    for p in $pidlist; do spec="$spec pid=$p"; done
    printf '%s\n' --target "$spec"
  done
}
mapfile -t ws_targets < <(targets ws)
mapfile -t sse_targets < <(targets sse)

# How a server is named in this script's own lines (loadgen's tables take
# names without spaces, so its rows say plain `naive`).
label() {
  case $1 in
  naive) echo "naive (per-subscriber JSON)" ;;
  *) echo "$1" ;;
  esac
}

compare() {
  local name=$1
  shift
  echo "== $name"
  echo "   (naive: $(label naive), kept for reference; careful: the hand-written baseline)"
  target/release/loadgen compare --quiet --rounds "${ROUNDS:-2}" --json "$out/$name.json" "$@" | tee "$out/$name.txt"
}

ladder() {
  echo "== ladder: 1,000 WebSocket subscribers, highest rate with 0 lost and delivery p99 < 100 ms"
  local line name ws sse pub fmt pidlist extra kv
  for line in "${servers[@]}"; do
    IFS='|' read -r name ws sse pub fmt pidlist extra <<<"$line"
    local args=(--url "$ws" --format "$fmt")
    [ "$pub" != - ] && args+=(--publish-url "$pub")
    # The server's own target keys, as flags.
    for kv in ${extra:-}; do args+=("--${kv%%=*}" "${kv#*=}"); done
    for p in $pidlist; do args+=(--server-pid "$p"); done
    local best=0 best_d=0 verdict
    for rate in ${RATES:-100 200 400 800 1600 3200 6400}; do
      local j="$out/ladder-$name-$rate.json"
      target/release/loadgen fanout --quiet "${args[@]}" --subscribers 1000 --rate "$rate" --duration 5 --warmup 1 --drain 2 \
        --channel-prefix "ladder-$name-$rate-" --json "$j" >/dev/null || break
      verdict=$(python3 - "$j" "$(label "$name")" "$rate" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
p99 = r["delivery_latency_us"]["p99"]
ok = r["lost"] == 0 and p99 < 100_000 and r["sent"] > 0
print(f"  {sys.argv[2]:<27} {sys.argv[3]:>6} msg/s  lost {r['lost']:<8} p99 {p99 / 1000:8.1f} ms  "
      f"{r['deliveries_per_s']:10.0f} deliveries/s  server {r.get('server_cpu_us_per_delivery') or 0:.2f} us/d", file=sys.stderr)
print(f"{'ok' if ok else 'stop'} {r['deliveries_per_s']:.0f}")
PY
)
      [ "${verdict%% *}" = ok ] || break
      best=$rate
      best_d=${verdict#* }
    done
    printf '%-27s highest clean rate %s msg/s (%s deliveries/s)\n' "$(label "$name")" "$best" "$best_d" | tee -a "$out/ladder.txt"
  done
}

idle() {
  echo "== idle: 5,000 WebSocket connections held, server RSS per connection"
  local line name ws sse pub fmt pidlist extra kv
  for line in "${servers[@]}"; do
    IFS='|' read -r name ws sse pub fmt pidlist extra <<<"$line"
    local args=()
    for p in $pidlist; do args+=(--server-pid "$p"); done
    for kv in ${extra:-}; do
      [ "${kv%%=*}" = subscribe-message ] && args+=(--subscribe-message "${kv#*=}")
    done
    target/release/loadgen connect --quiet --url "${ws//\{channel\}/idle-$name}" --connections 5000 --rate 2000 --hold 2 \
      "${args[@]}" --json "$out/idle-$name.json" >/dev/null
    python3 - "$out/idle-$name.json" "$(label "$name")" <<'PY' | tee -a "$out/idle.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<27} opened {r['opened']:>5}  RSS per connection {r['server_rss_per_connection_kib']:.2f} KiB")
PY
  done
}

rm -f "$out/ladder.txt" "$out/idle.txt"
what=${1:-all}
case $what in
all | ws-1k) compare ws-1k "${ws_targets[@]}" --subscribers 1000 --rate 100 --duration 10 --warmup 2 ;;&
all | ws-5k) compare ws-5k "${ws_targets[@]}" --subscribers 5000 --rate 20 --duration 10 --warmup 2 --connect-rate 2500 ;;&
all | cpu) compare ws-1k-50 "${ws_targets[@]}" --subscribers 1000 --rate 50 --duration 10 --warmup 2 ;;&
all | sse-1k) compare sse-1k "${sse_targets[@]}" --transport sse --subscribers 1000 --rate 100 --duration 10 --warmup 2 ;;&
all | ladder) ladder ;;&
all | idle) idle ;;&
all | ws-1k | ws-5k | cpu | sse-1k | ladder | idle) ;;
*)
  echo "usage: $0 [all|ws-1k|ws-5k|cpu|sse-1k|ladder|idle]" >&2
  exit 2
  ;;
esac
