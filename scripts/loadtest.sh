#!/usr/bin/env bash
# Load benchmark of `moat serve` against a ceiling: a minimal responder on the same TLS and HTTP
# stack that parses the body and echoes the uid with no policy
# (crates/moat-server/examples/ceiling.rs). Both run on loopback over TLS with keep-alive; the
# load generator (oha, installed with cargo when missing) shares the machine's cores, so figures
# are reported as ratios to the ceiling measured in the same run, interleaved.
#
#   scripts/loadtest.sh [SECONDS_PER_RUN] [ROUNDS]
#
# Prints, per concurrency (1, 16, 128): reviews/s, p50/p99/p99.9 latency, server CPU time per
# review; then peak resident memory and resident memory over a sustained run.
set -euo pipefail
seconds=${1:-10}
rounds=${2:-2}
cd "$(dirname "$0")/.."

oha=$(command -v oha || true)
if [ -z "$oha" ]; then
  cargo install --locked oha
  oha=$(command -v oha || echo "$HOME/.cargo/bin/oha")
fi
cargo build --release --locked -p moat --bin moat
cargo build --release --locked -p moat-server --example ceiling

dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

# A realistic review: a 3-container Pod CREATE as the API server sends it, compact JSON.
python3 -c 'import json,sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2],"w"), separators=(",",":"))' \
  crates/moat-server/tests/data/pod-create-isolated.json "$dir/review.json"
echo "review body: $(wc -c <"$dir/review.json") bytes"

target/release/moat serve --self-signed --ca-out "$dir/moat-ca.pem" --addr 127.0.0.1:18443 \
  --metrics-addr 127.0.0.1:19090 --log-level warn &
pids+=($!); moat_pid=$!
target/release/examples/ceiling 127.0.0.1:18444 "$dir/ceiling-ca.pem" 2>/dev/null &
pids+=($!); ceiling_pid=$!
for _ in $(seq 50); do
  [ -s "$dir/moat-ca.pem" ] && [ -s "$dir/ceiling-ca.pem" ] && break
  sleep 0.1
done
sleep 0.5

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk=$(getconf CLK_TCK)

run() { # name pid port clients
  local name=$1 pid=$2 port=$3 clients=$4 before after
  before=$(ticks "$pid")
  "$oha" -z "${seconds}s" -c "$clients" --no-tui --output-format json -m POST \
    -H 'content-type: application/json' -D "$dir/review.json" --insecure \
    "https://127.0.0.1:$port/mutate" >"$dir/out.json"
  after=$(ticks "$pid")
  python3 - "$dir/out.json" "$name" "$clients" "$((after - before))" "$clk" >>"$dir/results.tsv" <<'PY'
import json, sys
out, name, clients, ticks, clk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
r = json.load(open(out))
codes = r.get("statusCodeDistribution", {})
ok = int(codes.get("200", 0))
total = sum(int(v) for v in codes.values())
p = r["latencyPercentiles"]
cpu_us = ticks / clk * 1e6 / ok if ok else float("nan")
print(f"{name}\t{clients}\t{r['summary']['requestsPerSec']:.0f}\t{p['p50']*1e3:.3f}\t{p['p99']*1e3:.3f}\t{p['p99.9']*1e3:.3f}\t{cpu_us:.1f}\t{ok}\t{total}")
PY
}

: >"$dir/results.tsv"
for round in $(seq "$rounds"); do
  for clients in 1 16 128; do
    run ceiling "$ceiling_pid" 18444 "$clients"
    run moat "$moat_pid" 18443 "$clients"
  done
done

python3 - "$dir/results.tsv" <<'PY'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = {}
for name, c, rps, p50, p99, p999, cpu, ok, total in rows:
    by.setdefault((name, int(c)), []).append(tuple(map(float, (rps, p50, p99, p999, cpu, ok, total))))
print(f"{'server':8} {'clients':>7} {'reviews/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'CPU µs/review':>14} {'non-200':>8}")
med = {}
for (name, c), runs in sorted(by.items(), key=lambda k: (k[0][1], k[0][0])):
    m = [statistics.median(x) for x in zip(*runs)]
    med[(name, c)] = m
    bad = sum(r[6] - r[5] for r in runs)
    print(f"{name:8} {c:7d} {m[0]:10.0f} {m[1]:8.3f} {m[2]:8.3f} {m[3]:9.3f} {m[4]:14.1f} {bad:8.0f}")
print()
for c in (1, 16, 128):
    if ("moat", c) in med and ("ceiling", c) in med:
        m, k = med[("moat", c)], med[("ceiling", c)]
        print(f"clients {c:3d}: moat/ceiling throughput {m[0]/k[0]:.2f}, CPU per review {m[4]/k[4]:.2f}x, p99 {m[2]/k[2]:.2f}x")
PY

hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
echo
echo "peak RSS: moat $(( $(hwm "$moat_pid") / 1024 )) MiB, ceiling $(( $(hwm "$ceiling_pid") / 1024 )) MiB"
echo "sustained run, moat at 16 clients for $((seconds * 6)) s, RSS every $seconds s (KiB):"
"$oha" -z "$((seconds * 6))s" -c 16 --no-tui --output-format json -m POST -H 'content-type: application/json' \
  -D "$dir/review.json" --insecure https://127.0.0.1:18443/mutate >/dev/null &
load=$!
samples=""
for _ in $(seq 6); do sleep "$seconds"; samples="$samples $(rss "$moat_pid")"; done
wait "$load" || true
echo " $samples"
