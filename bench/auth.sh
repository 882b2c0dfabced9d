#!/usr/bin/env bash
# The cost of connection tokens: connect rate and server CPU per handshake
# without [auth], with HS256 tokens and with ES256 tokens (loadgen connect,
# the token in the URL as a browser sends it), interleaved; then CPU per
# delivery at 1,000 WebSocket subscribers x 50 msg/s with and without
# [auth] (checks happen at subscribe, not per delivery).
#
#   bash bench/auth.sh        # ROUNDS=3 CONNECTIONS=5000 RATE=2500
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald -p herald-loadgen -p herald-bench
out=target/auth-bench
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
secret=bench-secret-of-some-length-0123456789
key=engine/tests/fixtures
port=${PORT:-18280}
target/release/herald --listen "127.0.0.1:$port" >"$out/none.log" 2>&1 &
p0=$!
target/release/herald --listen "127.0.0.1:$((port + 1))" --auth-hmac-secret "$secret" >"$out/hs.log" 2>&1 &
p1=$!
target/release/herald --listen "127.0.0.1:$((port + 2))" --auth-public-key-file "$key/jwt-es256.pub" >"$out/es.log" 2>&1 &
p2=$!
trap 'kill $p0 $p1 $p2 2>/dev/null; wait 2>/dev/null || true' EXIT
sleep 0.5
hs=$(target/release/mint hs256 "$secret")
es=$(target/release/mint es256 "$key/jwt-es256.key")
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
connect() {
  local name=$1 pid=$2 url=$3
  local before after
  before=$(ticks "$pid")
  target/release/loadgen connect --quiet --url "$url" --connections "${CONNECTIONS:-5000}" --rate "${RATE:-2500}" \
    --hold 1 --json "$out/$name.json" >/dev/null
  after=$(ticks "$pid")
  python3 - "$out/$name.json" "$name" "$before" "$after" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); name = sys.argv[2]
cpu = (int(sys.argv[4]) - int(sys.argv[3])) / 100
l = r["connect_latency_us"]
print(f"{name:<8} opened {r['opened']:>5} errors {r['connect_errors']:>3}  {r['opened_per_s']:7.0f}/s  "
      f"connect p50/p99 {l['p50']/1000:6.2f}/{l['p99']/1000:6.2f} ms  server CPU {cpu:5.2f} s = {cpu*1e6/max(r['opened'],1):6.1f} us per connection")
PY
}
for round in $(seq "${ROUNDS:-3}"); do
  connect "none-$round" "$p0" "ws://127.0.0.1:$port/ws?channel=idle"
  connect "hs256-$round" "$p1" "ws://127.0.0.1:$((port + 1))/ws?channel=idle&token=$hs"
  connect "es256-$round" "$p2" "ws://127.0.0.1:$((port + 2))/ws?channel=idle&token=$es"
done
for round in $(seq "${ROUNDS:-3}"); do
  for side in none hs256; do
    pid=$p0 url="ws://127.0.0.1:$port/ws?channel={channel}"
    [[ $side == hs256 ]] && pid=$p1 url="ws://127.0.0.1:$((port + 1))/ws?channel={channel}&token=$hs"
    target/release/loadgen fanout --quiet --url "$url" --publish-url "http://127.0.0.1:$([[ $side == hs256 ]] && echo $((port + 1)) || echo $port)/publish/{channel}" \
      --subscribers 1000 --rate 50 --duration 8 --warmup 2 --server-pid "$pid" --json "$out/fanout-$side-$round.json" >/dev/null
    python3 -c "import json; r=json.load(open('$out/fanout-$side-$round.json')); print(f'fanout $side round $round: server {r[\"server_cpu_us_per_delivery\"]:.2f} us/delivery, lost {r[\"lost\"]}, p99 {r[\"delivery_latency_us\"][\"p99\"]/1000:.2f} ms')"
  done
done
