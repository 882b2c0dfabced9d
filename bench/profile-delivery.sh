#!/usr/bin/env bash
# Where one delivery's CPU goes: samples a standalone Herald with `perf`
# (the cpu-clock software event, so it works without hardware counters)
# while loadgen runs 1,000 WebSocket subscribers at 50 msg/s, then prints
# the inclusive share of the data path's stages.
#
#   bash bench/profile-delivery.sh          # RATE=50 SUBSCRIBERS=1000
#
# Needs Debian's linux-perf. The report is kept in target/profile/.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "perf is missing: apt-get install linux-perf" >&2; exit 1; }
cargo build --release -q -p herald -p herald-loadgen
out=target/profile
mkdir -p "$out"
port=${PORT:-18190}
target/release/herald --listen "127.0.0.1:$port" >"$out/herald.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.05
done
perf record -q -e cpu-clock -F 4999 -g -p "$pid" -o "$out/perf.data" -- sleep 9 >/dev/null 2>&1 &
rec=$!
target/release/loadgen fanout --quiet --server-pid "$pid" --json "$out/run.json" \
  --url "ws://127.0.0.1:$port/ws?channel={channel}" --subscribers "${SUBSCRIBERS:-1000}" --rate "${RATE:-50}" \
  --duration 6 --warmup 1 | grep -E "deliveries|server CPU"
wait "$rec" || true
perf report -i "$out/perf.data" --children --sort sym -g none 2>/dev/null | grep '%' >"$out/children.txt"
perf report -i "$out/perf.data" --no-children --sort dso -g none 2>/dev/null | grep '%' >"$out/dso.txt"
python3 - "$out/children.txt" "$out/dso.txt" "$out/run.json" <<'EOF'
import json, re, sys
incl = {}
for line in open(sys.argv[1]):
    m = re.match(r"\s*([\d.]+)%\s+([\d.]+)%\s+\[.\]\s+(\S+)", line)
    if m:
        incl.setdefault(m.group(3), float(m.group(1)))
dso = {}
for line in open(sys.argv[2]):
    m = re.match(r"\s*([\d.]+)%\s+(\S+)", line)
    if m:
        dso[m.group(2)] = float(m.group(1))
us = json.load(open(sys.argv[3]))["server_cpu_us_per_delivery"]
g = lambda s: incl.get(s, 0.0)
rx = g("net_rx_action")
stages = [
    ("writev, all of it", g("__GI___writev")),
    ("  loopback receive the sender pays for (softirq: tcp_v4_rcv, waking the reader)", rx),
    ("  TCP send (tcp_sendmsg without that receive)", g("tcp_sendmsg") - rx),
    ("  syscall and VFS layers (writev without tcp_sendmsg)", g("__GI___writev") - g("tcp_sendmsg")),
    ("Herald's own code", dso.get("herald", 0.0)),
    ("libc and vdso (clock reads)", dso.get("libc.so.6", 0.0) + dso.get("[vdso]", 0.0)),
]
print(f"server CPU per delivery: {us:.2f} us")
for name, pct in stages:
    print(f"{pct:5.1f} %  {pct / 100 * us:5.2f} us  {name}")
EOF
