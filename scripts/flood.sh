#!/usr/bin/env bash
# What a well-behaved client (the API server) sees while tenants flood moat's review port:
# reviews/s and p50/p99 latency of 4 keep-alive clients, first alone, then during a flood of
# idle TCP connections from one source (more than the server holds in all), idle TLS
# connections from another, and trickling TLS handshakes from a third. Loopback only.
#
#   scripts/flood.sh [SECONDS]
set -euo pipefail
seconds=${1:-10}
cd "$(dirname "$0")/.."
oha=$(command -v oha || true)
if [ -z "$oha" ]; then
  cargo install --locked oha
  oha=$(command -v oha || echo "$HOME/.cargo/bin/oha")
fi
cargo build --release --locked -p moat --bin moat >/dev/null 2>&1
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
python3 -c 'import json,sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2],"w"), separators=(",",":"))' \
  crates/moat-server/tests/data/pod-create-isolated.json "$dir/review.json"
target/release/moat serve --self-signed --ca-out "$dir/ca.pem" --addr 127.0.0.1:18743 \
  --metrics-addr 127.0.0.1:19743 --log-level error &
pids+=($!)
for _ in $(seq 50); do [ -s "$dir/ca.pem" ] && break; sleep 0.1; done

measure() {
  "$oha" -z "${seconds}s" -c 4 --no-tui --output-format json -m POST -H 'content-type: application/json' \
    -D "$dir/review.json" --insecure https://127.0.0.1:18743/mutate >"$dir/out.json"
  python3 - "$dir/out.json" "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
codes = r.get("statusCodeDistribution", {})
p = r["latencyPercentiles"]
print(f"{sys.argv[2]:>6}: {r['summary']['requestsPerSec']:.0f} reviews/s, p50 {p['p50']*1e3:.2f} ms, p99 {p['p99']*1e3:.2f} ms, "
      f"{int(codes.get('200', 0))} answered 200, {sum(int(v) for k, v in codes.items() if k != '200')} other, success rate {r['summary']['successRate']:.4f}")
PY
}

measure alone
python3 - "$dir/ca.pem" "$seconds" <<'PY' &
import socket, ssl, sys, time
held = []
def conn(src):
    s = socket.socket(); s.bind((src, 0)); s.settimeout(1)
    s.connect(("127.0.0.1", 18743)); return s
for _ in range(4500):                      # idle TCP from one source
    try: held.append(conn("127.0.0.2"))
    except OSError: pass
ctx = ssl.create_default_context(cafile=sys.argv[1]); ctx.check_hostname = False
for _ in range(200):                       # idle TLS from another
    try: held.append(ctx.wrap_socket(conn("127.0.0.3"), server_hostname="localhost"))
    except OSError: pass
end = time.time() + float(sys.argv[2]) + 5
while time.time() < end:                   # trickling handshakes from a third
    for _ in range(50):
        try:
            s = conn("127.0.0.4"); s.send(b"\x16\x03\x01"); held.append(s)
        except OSError: pass
    time.sleep(1)
PY
pids+=($!)
sleep 3
measure flood
echo "connections refused: $(curl -s http://127.0.0.1:19743/metrics | grep '^moat_connections_refused_total' | tr '\n' ' ')"
