#!/usr/bin/env bash
# The cost of the application's hooks and of presence, side by side in one
# run (Herald, loadgen, the example backend and Redis share this machine):
#
#   bash bench/hooks.sh publish    # client publishes through the publish hook (engine/examples/sync_backend) against none
#   bash bench/hooks.sh presence   # server CPU per connection (subscribe + unsubscribe) with presence on and off, local and Redis
#   bash bench/hooks.sh joinleave  # join/leave fan-out: a channel of 1,000 subscribers, 100 joins (and leaves) per second
#   bash bench/hooks.sh            # all three
#
# ROUNDS (default 2) interleaves the sides; each run's JSON is kept in
# target/hooks-bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald -p herald-loadgen
cargo build --release -q -p herald --example sync_backend
out=target/hooks-bench
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
port=${PORT:-18380}
bport=$((port + 50))
rounds=${ROUNDS:-2}
pids=()
trap 'kill ${pids[*]:-} 2>/dev/null; wait 2>/dev/null || true' EXIT

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
wait_http() { for _ in $(seq 100); do curl -s -o /dev/null "$1" && return; sleep 0.05; done; echo "no answer from $1" >&2; exit 1; }

# herald NAME PORT [ARGS…]: starts a node; its pid in $last.
herald() {
  local name=$1 p=$2
  shift 2
  target/release/herald --listen "127.0.0.1:$p" "$@" >"$out/$name.log" 2>&1 &
  last=$!
  pids+=("$last")
  wait_http "http://127.0.0.1:$p/healthz"
}

backend() {
  target/release/examples/sync_backend "127.0.0.1:$bport" >"$out/backend.log" 2>&1 &
  bpid=$!
  pids+=("$bpid")
  wait_http "http://127.0.0.1:$bport/boards/x"
}

# summary JSON NAME BACKEND_CPU_S: one line per run (Herald's CPU is
# loadgen's, over the measured window; the backend's over the whole run,
# per publish).
summary() {
  python3 - "$@" <<'PY'
import json, sys
path, name, backend_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
r = json.load(open(path))
d, rtt = r["delivery_latency_us"], r["publish_rtt_us"]
published = max(r["messages_per_s"] * (r["duration_s"] + r["warmup_s"]), 1)
print(f"{name:<14} rate {r['rate']:>6.0f}/s published {r['messages_per_s']:>7.0f}/s  lost {r['lost']:>5}  "
      f"delivery p50/p99 {d['p50']/1000:6.2f}/{d['p99']/1000:6.2f} ms  publish rtt p50/p99 {rtt['p50']/1000:6.2f}/{rtt['p99']/1000:6.2f} ms  "
      f"herald {r.get('server_cpu_us_per_delivery') or 0:5.2f} us/delivery  backend {backend_s*1e6/published:5.1f} us/publish")
PY
}

publish_mode() {
  backend
  cat >"$out/hooks.toml" <<EOF
[proxy]
publish_url = "http://127.0.0.1:$bport/herald/publish"
timeout_ms = 1000
[namespaces.hook]
publish_proxy = true
EOF
  herald publish "$port" --config "$out/hooks.toml"
  local hpid=$last
  echo "== client publishes (WebSocket publish command), 100 subscribers over 10 channels: through the publish hook against none"
  for round in $(seq "$rounds"); do
    for rate in 1000 4000 8000; do
      for side in plain hook; do
        local name="publish-$side-$rate-$round" b0
        b0=$(ticks "$bpid")
        target/release/loadgen fanout --quiet --url "ws://127.0.0.1:$port/ws?channel={channel}" --publish ws \
          --channel-prefix "$side:" --subscribers 100 --channels 10 --rate "$rate" --duration 8 --warmup 2 \
          --server-pid "$hpid" --json "$out/$name.json" >/dev/null
        summary "$out/$name.json" "$side $rate" "$(( $(ticks "$bpid") - b0 ))e-2"
      done
    done
    # Closed loop: one publish in flight at a time, as a client that waits
    # for each reply: the publishes per second are 1 / (round trip).
    for side in plain hook; do
      local name="closed-$side-$round" b0
      b0=$(ticks "$bpid")
      target/release/loadgen fanout --quiet --url "ws://127.0.0.1:$port/ws?channel={channel}" --publish ws --publish-inflight 1 \
        --channel-prefix "$side:" --subscribers 10 --channels 10 --rate 50000 --duration 6 --warmup 2 \
        --server-pid "$hpid" --json "$out/$name.json" >/dev/null || true
      summary "$out/$name.json" "$side closed" "$(( $(ticks "$bpid") - b0 ))e-2"
    done
  done
}

# churn NAME PID URL [REDIS_PID]: 5,000 connections at 2,500/s, each
# subscribing to one of 100 channels (in its query) and closing after 1 s.
churn() {
  local name=$1 pid=$2 url=$3 rpid=${4:-} h0 r0=0
  h0=$(ticks "$pid")
  [[ -n $rpid ]] && r0=$(ticks "$rpid")
  target/release/loadgen connect --quiet --url "$url" --connections 5000 --rate 2500 --hold 1 --channels 100 \
    --json "$out/$name.json" >/dev/null
  local h=$(( $(ticks "$pid") - h0 )) r=0
  [[ -n $rpid ]] && r=$(( $(ticks "$rpid") - r0 ))
  python3 - "$out/$name.json" "$name" "$h" "$r" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); n = max(r["opened"], 1)
h, rd = int(sys.argv[3]) / 100, int(sys.argv[4]) / 100
print(f"{sys.argv[2]:<22} opened {r['opened']:>5} errors {r['connect_errors']:>3}  herald {h*1e6/n:6.1f} us/connection  redis {rd*1e6/n:6.1f} us/connection")
PY
}

presence_mode() {
  printf '[namespaces.default]\npresence = true\n' >"$out/presence.toml"
  local rport=$((port + 60))
  redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >"$out/redis.log" 2>&1 &
  local rpid=$!
  pids+=("$rpid")
  for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
  herald off "$((port + 1))"
  local off=$last
  herald on "$((port + 2))" --config "$out/presence.toml"
  local on=$last
  herald redis-off "$((port + 3))" --redis "redis://127.0.0.1:$rport"
  local roff=$last
  herald redis-on "$((port + 4))" --redis "redis://127.0.0.1:$rport" --config "$out/presence.toml"
  local ron=$last
  echo "== presence: 5,000 connections, each subscribing to one of 100 channels and leaving; server CPU per connection"
  for round in $(seq "$rounds"); do
    churn "local-off-$round" "$off" "ws://127.0.0.1:$((port + 1))/ws?channel={channel}"
    churn "local-presence-$round" "$on" "ws://127.0.0.1:$((port + 2))/ws?channel={channel}"
    churn "redis-off-$round" "$roff" "ws://127.0.0.1:$((port + 3))/ws?channel={channel}" "$rpid"
    churn "redis-presence-$round" "$ron" "ws://127.0.0.1:$((port + 4))/ws?channel={channel}" "$rpid"
  done
  echo "presence hashes left in Redis (every connection left: none), and the nodes' sets (they expire after presence_ttl_s):"
  echo "  $(redis-cli -p "$rport" --scan --pattern 'herald:*:presence' | wc -l) hashes, $(redis-cli -p "$rport" --scan --pattern 'herald:*:presence:nodes' | wc -l) sets"
}

joinleave_mode() {
  backend
  for jl in true false; do
    cat >"$out/joinleave-$jl.toml" <<EOF
[proxy]
connect_url = "http://127.0.0.1:$bport/herald/connect"
# The backend grants every user board:*.
[namespaces.board]
presence = true
join_leave = $jl
EOF
  done
  herald joinleave "$((port + 5))" --config "$out/joinleave-true.toml"
  local jon=$last
  herald presence-only "$((port + 6))" --config "$out/joinleave-false.toml"
  local joff=$last
  echo "== join/leave: 1,000 subscribers of board:room0 (10 msg/s), 1,000 other users joining at 100/s, each leaving 1 s later"
  for round in $(seq "$rounds"); do
    for side in on off; do
      local p=$((port + 5)) pid=$jon
      [[ $side == off ]] && p=$((port + 6)) pid=$joff
      local name="joinleave-$side-$round"
      target/release/loadgen fanout --quiet --url "ws://127.0.0.1:$p/ws?channel={channel}&token=watcher" \
        --channel-prefix board:room --channels 1 --subscribers 1000 --rate 10 --duration 16 --warmup 2 \
        --json "$out/$name-fanout.json" >/dev/null &
      local fan=$!
      sleep 4
      local e0 h0
      e0=$(curl -s "http://127.0.0.1:$p/metrics" | awk '/^herald_presence_events_total/ {s += $2} END {print s + 0}')
      h0=$(ticks "$pid")
      target/release/loadgen connect --quiet --url "ws://127.0.0.1:$p/ws?channel=board:room0&token=u{conn}" \
        --connections 1000 --rate 100 --hold 1 --json "$out/$name-connect.json" >/dev/null
      local h=$(( $(ticks "$pid") - h0 )) e
      e=$(curl -s "http://127.0.0.1:$p/metrics" | awk '/^herald_presence_events_total/ {s += $2} END {print s + 0}')
      wait "$fan"
      python3 - "$out/$name-fanout.json" "$out/$name-connect.json" "$side" "$h" "$((e - e0))" <<'PY'
import json, sys
f, c = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
side, cpu, events = sys.argv[3], int(sys.argv[4]) / 100, int(sys.argv[5])
d = f["delivery_latency_us"]
window = c.get("open_s", 10) + 2
fanned = events * 1000
print(f"join_leave {side:<3} churn {c['opened']:>4} connections  events {events:>5} (x1,000 subscribers = {fanned:>8} frames)  "
      f"herald CPU {cpu:5.2f} s = {cpu*100/window:4.0f}% of a core  "
      f"messages meanwhile: lost {f['lost']} p50/p99 {d['p50']/1000:.2f}/{d['p99']/1000:.2f} ms")
PY
    done
  done
}

case "${1:-all}" in
  publish) publish_mode ;;
  presence) presence_mode ;;
  joinleave) joinleave_mode ;;
  all)
    publish_mode
    presence_mode
    joinleave_mode
    ;;
  *)
    echo "usage: bash bench/hooks.sh [publish|presence|joinleave]" >&2
    exit 2
    ;;
esac
