#!/usr/bin/env bash
# Load benchmark of `moat serve` against two references on the same TLS and HTTP stack
# (crates/moat-server/examples/ceiling.rs): the floor (read the body, find the uid by a byte
# scan, answer a fixed allow: the least any correct webhook can do) and a generic responder
# (parse the body into a JSON tree, echo the uid). All run on loopback over TLS with keep-alive;
# the load generator (oha, installed with cargo when missing) shares the machine's cores, so
# figures are reported as ratios to the references measured in the same run, interleaved.
#
#   scripts/loadtest.sh [SECONDS_PER_RUN] [ROUNDS]      (CLIENTS="1 16 128" for more levels)
#
# Prints, per protocol (HTTP/1.1, HTTP/2) and concurrency: reviews/s, p50/p99/p99.9 latency,
# server CPU time per review; then peak resident memory and resident memory over a sustained
# run.
#
# TRUST=1 adds a fourth server, `moat` with images.trust (every image resolved and its cosign
# signature verified, from a warm cache), on the same review with its images moved to the test
# registry (start scripts/start-test-registry.sh first and source its env file; the review's
# images are pushed and signed by scripts/trust-fixture.py), and prints its cost against plain
# moat's on that same body.
set -euo pipefail
seconds=${1:-10}
rounds=${2:-2}
clients_levels=${CLIENTS:-16}
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
# The servers drain for a few seconds after SIGTERM, reading their configuration files until
# they exit: the files go only once they have.
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

# A realistic review: a 3-container Pod CREATE as the API server sends it, compact JSON.
python3 -c 'import json,sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2],"w"), separators=(",",":"))' \
  crates/moat-server/tests/data/pod-create-isolated.json "$dir/review.json"
if [ -n "${TRUST:-}" ]; then
  : "${MOAT_TEST_REGISTRY:?TRUST=1 needs the test registry: source the env file scripts/start-test-registry.sh wrote}"
  mkdir -p "$dir/trust"
  python3 scripts/trust-fixture.py target/release/moat "$dir/review.json" "$dir/trust"
  cp "$dir/trust/review.json" "$dir/review.json"
fi
echo "review body: $(wc -c <"$dir/review.json") bytes"

target/release/moat serve --self-signed --ca-out "$dir/moat-ca.pem" --addr 127.0.0.1:18443 \
  --metrics-addr 127.0.0.1:19090 --log-level warn &
pids+=($!); moat_pid=$!
target/release/examples/ceiling 127.0.0.1:18444 "$dir/generic-ca.pem" generic 2>/dev/null &
pids+=($!); generic_pid=$!
target/release/examples/ceiling 127.0.0.1:18445 "$dir/floor-ca.pem" floor 2>/dev/null &
pids+=($!); floor_pid=$!
trusted_pid=""
if [ -n "${TRUST:-}" ]; then
  target/release/moat serve --self-signed --ca-out "$dir/trust-ca.pem" --addr 127.0.0.1:18446 \
    --metrics-addr 127.0.0.1:19091 --log-level warn --config "$dir/trust/trust.yaml" &
  pids+=($!); trusted_pid=$!
fi
for _ in $(seq 50); do
  [ -s "$dir/moat-ca.pem" ] && [ -s "$dir/generic-ca.pem" ] && [ -s "$dir/floor-ca.pem" ] \
    && { [ -z "$trusted_pid" ] || [ -s "$dir/trust-ca.pem" ]; } && break
  sleep 0.1
done
sleep 0.5

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk=$(getconf CLK_TCK)

run() { # name pid port clients proto
  local name=$1 pid=$2 port=$3 clients=$4 proto=$5 before after flags=()
  [ "$proto" = h2 ] && flags=(--http2)
  before=$(ticks "$pid")
  "$oha" -z "${seconds}s" -c "$clients" "${flags[@]}" --no-tui --output-format json -m POST \
    -H 'content-type: application/json' -D "$dir/review.json" --insecure \
    "https://127.0.0.1:$port/mutate" >"$dir/out.json"
  after=$(ticks "$pid")
  python3 - "$dir/out.json" "$name" "$clients" "$((after - before))" "$clk" "$proto" >>"$dir/results.tsv" <<'PY'
import json, sys
out, name, clients, ticks, clk, proto = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
r = json.load(open(out))
codes = r.get("statusCodeDistribution", {})
ok = int(codes.get("200", 0))
total = sum(int(v) for v in codes.values())
p = r["latencyPercentiles"]
cpu_us = ticks / clk * 1e6 / ok if ok else float("nan")
print(f"{proto}\t{name}\t{clients}\t{r['summary']['requestsPerSec']:.0f}\t{p['p50']*1e3:.3f}\t{p['p99']*1e3:.3f}\t{p['p99.9']*1e3:.3f}\t{cpu_us:.1f}\t{ok}\t{total}")
PY
}

: >"$dir/results.tsv"
for round in $(seq "$rounds"); do
  for proto in h1 h2; do
    for clients in $clients_levels; do
      run floor "$floor_pid" 18445 "$clients" "$proto"
      run generic "$generic_pid" 18444 "$clients" "$proto"
      run moat "$moat_pid" 18443 "$clients" "$proto"
      if [ -n "$trusted_pid" ]; then run moat+trust "$trusted_pid" 18446 "$clients" "$proto"; fi
    done
  done
done

python3 - "$dir/results.tsv" <<'PY'
import sys, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = {}
for proto, name, c, rps, p50, p99, p999, cpu, ok, total in rows:
    by.setdefault((proto, int(c), name), []).append(tuple(map(float, (rps, p50, p99, p999, cpu, ok, total))))
print(f"{'proto':5} {'server':10} {'clients':>7} {'reviews/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'CPU µs/review':>14} {'non-200':>8}")
med = {}
for key, runs in sorted(by.items()):
    m = [statistics.median(x) for x in zip(*runs)]
    med[key] = m
    bad = sum(r[6] - r[5] for r in runs)
    proto, c, name = key
    print(f"{proto:5} {name:10} {c:7d} {m[0]:10.0f} {m[1]:8.3f} {m[2]:8.3f} {m[3]:9.3f} {m[4]:14.1f} {bad:8.0f}")
print()
for (proto, c, name), m in sorted(med.items()):
    if name == "moat+trust" and (proto, c, "moat") in med:
        k = med[(proto, c, "moat")]
        print(f"{proto} clients {c:3d}: moat+trust/moat throughput {m[0]/k[0]:.2f}, CPU per review {m[4]/k[4]:.3f}x, p99 {m[2]/k[2]:.2f}x")
    if name != "moat":
        continue
    for ref in ("floor", "generic"):
        k = med.get((proto, c, ref))
        if k:
            print(f"{proto} clients {c:3d}: moat/{ref:7} throughput {m[0]/k[0]:.2f}, CPU per review {m[4]/k[4]:.2f}x, p99 {m[2]/k[2]:.2f}x")
PY

hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
echo
echo "peak RSS: moat $(( $(hwm "$moat_pid") / 1024 )) MiB, generic $(( $(hwm "$generic_pid") / 1024 )) MiB, floor $(( $(hwm "$floor_pid") / 1024 )) MiB"
echo "sustained run, moat at 16 clients for $((seconds * 6)) s, RSS every $seconds s (KiB):"
"$oha" -z "$((seconds * 6))s" -c 16 --no-tui --output-format json -m POST -H 'content-type: application/json' \
  -D "$dir/review.json" --insecure https://127.0.0.1:18443/mutate >/dev/null &
load=$!
samples=""
for _ in $(seq 6); do sleep "$seconds"; samples="$samples $(rss "$moat_pid")"; done
wait "$load" || true
echo " $samples"
