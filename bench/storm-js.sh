#!/usr/bin/env bash
# A reconnect storm of herald.js clients: 1,000 in Node on one node of a
# Redis; the node is killed (SIGKILL) and restarted while another node
# publishes. Prints the reconnect delays after the node is back and how
# many clients recovered every message once, in order.
#
#   bash bench/storm-js.sh            # CLIENTS=1000
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
port=${PORT:-18480}
rport=$((port + 10))
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
rpid=$!
trap 'kill $rpid 2>/dev/null; wait 2>/dev/null || true' EXIT
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
node --experimental-websocket --no-warnings bench/storm-js.mjs target/release/herald "$port" "$((port + 1))" \
  "redis://127.0.0.1:$rport" "${CLIENTS:-1000}"
