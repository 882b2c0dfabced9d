#!/usr/bin/env bash
# Autobahn|Testsuite (fuzzingclient) against Herald's WebSocket endpoint.
#
#   bash engine/tests/autobahn/run.sh           # sections 1-7, 9, 10, 12 and 13
#   CASES='["1.*"]' bash engine/tests/autobahn/run.sh
#
# Herald runs with `--echo` (GET /echo sends every data message back),
# `--compression` (sections 12 and 13: permessage-deflate), and with a
# 16 MiB message limit, since section 9 sends messages that large.
# Exits non-zero on any case whose result is FAILED or whose close is
# UNCLEAN. The suite is Python 2.7 only: it is installed with pyenv's
# 2.7.18 into target/autobahn/py; without Python 2.7 this script fails
# loudly. Reports: target/autobahn/reports/index.html.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=$PWD/target/autobahn
mkdir -p "$out"

py2() { PYENV_VERSION=2.7.18 python "$@"; }
if ! py2 -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null; then
  echo "!!! Autobahn|Testsuite needs Python 2.7 (pyenv 2.7.18), which this machine lacks: NOT RUN" >&2
  exit 1
fi
if [ ! -x "$out/py/bin/wstest" ]; then
  echo "installing autobahntestsuite for Python 2.7 into $out/py" >&2
  py2 -m pip install --quiet --disable-pip-version-check --target "$out/py" autobahntestsuite==25.10.1
fi
# zope.interface is a namespace package that --target installs leave
# without its __init__.py.
touch "$out/py/zope/__init__.py"

cargo build -q -p herald
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/debug/herald --listen "127.0.0.1:$port" --echo --compression --max-message-bytes 16777216 \
  --outbound-queue-bytes 134217728 >"$out/herald.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

cases=${CASES:-'["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*", "12.*", "13.*"]'}
cat >"$out/spec.json" <<EOF
{
  "outdir": "$out/reports",
  "servers": [{"agent": "herald", "url": "ws://127.0.0.1:$port/echo"}],
  "cases": $cases,
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
EOF
rm -rf "$out/reports"
(cd "$out" && PYTHONPATH="$out/py" PYENV_VERSION=2.7.18 python "$out/py/bin/wstest" -m fuzzingclient -s "$out/spec.json") \
  >"$out/wstest.log" 2>&1

python3 - "$out/reports/index.json" <<'PY'
import collections, json, sys
results = json.load(open(sys.argv[1]))["herald"]
by = collections.Counter(r["behavior"] for r in results.values())
close = collections.Counter(r["behaviorClose"] for r in results.values())
print(f"Autobahn: {len(results)} cases; behavior {dict(sorted(by.items()))}; close {dict(sorted(close.items()))}")
bad = sorted((c for c, r in results.items() if r["behavior"] == "FAILED" or r["behaviorClose"] == "UNCLEAN"),
             key=lambda c: [int(x) for x in c.split(".")])
if bad:
    print("FAILED or UNCLEAN:", " ".join(bad))
    sys.exit(1)
PY
