#!/usr/bin/env bash
# What TLS costs a connection storm: `loadgen connect` opens CONNS
# WebSockets as fast as it can against three Herald nodes, side by side,
# round by round:
#
#   plain   ws://
#   ecdsa   wss://, an ECDSA P-256 certificate
#   rsa     wss://, an RSA-2048 certificate
#
#   bash bench/tls.sh            # ROUNDS=3 CONNS=5000
#
# Each side reports connections opened per second, connect latency
# (TCP + TLS + WebSocket handshake, as the client sees it), server RSS
# per held connection (first round) and loadgen's own CPU. loadgen runs on the same machine and does the
# client half of every handshake: the rates are the machine's, both
# halves together. JSON reports in target/tls-bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p herald -p herald-loadgen
out=target/tls-bench
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
rounds=${ROUNDS:-3}
conns=${CONNS:-5000}
# Self-signed leaf certificates (CA:FALSE: rustls refuses a CA certificate
# presented as a server's own).
for kind in ecdsa rsa; do
  case $kind in
    ecdsa) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
    rsa) newkey=(-newkey rsa:2048) ;;
  esac
  openssl req -x509 "${newkey[@]}" -nodes -keyout "$out/$kind.key" -out "$out/$kind.pem" -days 2 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" 2>/dev/null
done
H=target/release/herald
L=target/release/loadgen
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
$H --listen 127.0.0.1:18601 2>"$out/plain.log" & pids+=($!)
$H --listen 127.0.0.1:18602 --tls-cert "$out/ecdsa.pem" --tls-key "$out/ecdsa.key" 2>"$out/ecdsa.log" & pids+=($!)
$H --listen 127.0.0.1:18603 --tls-cert "$out/rsa.pem" --tls-key "$out/rsa.key" 2>"$out/rsa.log" & pids+=($!)
sleep 1
for r in $(seq 1 "$rounds"); do
  for side in plain ecdsa rsa; do
    case $side in
      plain) url="ws://127.0.0.1:18601/ws?channel=c"; pid=${pids[0]}; ca=() ;;
      ecdsa) url="wss://localhost:18602/ws?channel=c"; pid=${pids[1]}; ca=(--tls-ca "$out/ecdsa.pem") ;;
      rsa) url="wss://localhost:18603/ws?channel=c"; pid=${pids[2]}; ca=(--tls-ca "$out/rsa.pem") ;;
    esac
    $L connect --url "$url" "${ca[@]}" --connections "$conns" --rate 1000000 --hold 1s --server-pid "$pid" --quiet \
      --json "$out/$side-$r.json" >/dev/null
  done
done
python3 - "$out" "$rounds" <<'EOF'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
for side in ["plain", "ecdsa", "rsa"]:
    rs = [json.load(open(f"{out}/{side}-{r}.json")) for r in range(1, rounds + 1)]
    rows[side] = {
        "rate": statistics.median(r["opened_per_s"] for r in rs),
        "rates": [round(r["opened_per_s"]) for r in rs],
        "p50": statistics.median(r["connect_latency_us"]["p50"] for r in rs) / 1000,
        "p99": statistics.median(r["connect_latency_us"]["p99"] for r in rs) / 1000,
        "errors": sum(r["connect_errors"] for r in rs),
        # The first round's: later rounds reuse memory the allocator kept.
        "rss": rs[0]["server_rss_per_connection_kib"],
        "client_cpu": statistics.median(r["client_cpu_s"] for r in rs),
    }
base = rows["plain"]["rate"]
print(f"{'side':<7} {'opened/s (median)':>18} {'× plain':>8} {'rounds':>22} {'connect p50':>12} {'connect p99':>12} {'RSS/conn':>9} {'loadgen CPU':>12} {'errors':>7}")
for side, v in rows.items():
    print(f"{side:<7} {v['rate']:>18,.0f} {v['rate'] / base:>8.2f} {str(v['rates']):>22} {v['p50']:>9.1f} ms {v['p99']:>9.1f} ms"
          f" {v['rss']:>5.1f} KiB {v['client_cpu']:>10.2f} s {v['errors']:>7}")
EOF
