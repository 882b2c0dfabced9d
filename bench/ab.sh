#!/usr/bin/env bash
# Compares two builds of the standalone server side by side: each round runs
# the same loadgen scenarios against build A, then build B, so both see the
# same machine drift. Prints one line per run and the median of each side.
#
#   bash bench/ab.sh OLD/target/release/herald NEW/target/release/herald
#
#   ROUNDS=5                        rounds (default 3)
#   SCENARIOS="1000x50 1000x1200"   subscribers x msg/s on one channel
#   DURATION=8 WARMUP=2             seconds per run
#
# loadgen is this checkout's (built here); the server's CPU per delivery
# comes from --server-pid, the figure that stays fair when loadgen shares
# the machine. JSON reports are kept in target/ab/.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 2 ]] || { sed -n '2,15p' "$0"; exit 2; }
a=$1 b=$2
cargo build --release -q -p herald-loadgen
out=target/ab
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
port=${PORT:-18180}

serve() {
  "$1" --listen "127.0.0.1:$port" >"$out/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return
    sleep 0.05
  done
  echo "server $1 did not start" >&2
  exit 1
}

results=()
for round in $(seq "${ROUNDS:-3}"); do
  for side in A B; do
    bin=$a
    [[ $side == B ]] && bin=$b
    for sc in ${SCENARIOS:-1000x50 1000x1200}; do
      subs=${sc%x*} rate=${sc#*x}
      serve "$bin"
      json="$out/$side-$sc-$round.json"
      target/release/loadgen fanout --quiet --server-pid "$pid" --json "$json" \
        --url "ws://127.0.0.1:$port/ws?channel={channel}" --subscribers "$subs" --rate "$rate" \
        --duration "${DURATION:-8}" --warmup "${WARMUP:-2}" >/dev/null
      kill "$pid"
      wait "$pid" 2>/dev/null || true
      results+=("$side $sc $json")
      python3 - "$json" "$side" "$sc" "$round" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
c = r["completion_latency_us"]
print(f"round {sys.argv[4]} {sys.argv[2]} {sys.argv[3]:>10}  server {r['server_cpu_us_per_delivery']:5.2f} us/delivery  "
      f"completion p50/p99 {c['p50']/1000:6.2f}/{c['p99']/1000:6.2f} ms  lost {r['lost']}  "
      f"hiccup p99 {r['machine_hiccup_us']['p99']/1000:5.2f} ms  saturated {r['client_saturated']}")
EOF
    done
  done
done

printf '%s\n' "${results[@]}" | python3 -c '
import json, statistics, sys
rows = {}
for line in sys.stdin:
    side, sc, path = line.split()
    r = json.load(open(path))
    rows.setdefault((sc, side), []).append((r["server_cpu_us_per_delivery"], r["completion_latency_us"]["p99"] / 1000))
print("\nmedians (min..max)")
for sc in dict.fromkeys(k[0] for k in rows):
    line = [f"{sc:>10}"]
    for side in "AB":
        v = rows.get((sc, side), [])
        cpu, p99 = [x[0] for x in v], [x[1] for x in v]
        line.append(f"{side}: {statistics.median(cpu):5.2f} us/d ({min(cpu):.2f}..{max(cpu):.2f}), "
                    f"p99 {statistics.median(p99):6.2f} ms ({min(p99):.2f}..{max(p99):.2f})")
    print("  ".join(line))
'
