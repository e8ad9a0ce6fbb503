#!/usr/bin/env bash
# Instructions per review of the whole server process (TLS, HTTP, read, decide, answer), moat
# and the load test's floor (crates/moat-server/examples/ceiling.rs), counted by valgrind's
# callgrind: each server serves FEW and then MANY mutate reviews of the load test's 6.7 KB Pod
# CREATE over one keep-alive HTTP/1.1 TLS connection (curl), and the difference is divided by
# MANY - FEW, so start-up (key generation, TLS handshake) cancels out. User-space instructions
# only: the kernel's share of the CPU (sockets) is not counted.
#
# TRUST=1 (with the test registry's env file sourced, as for scripts/loadtest.sh) counts moat
# and moat with images.trust on the review with its images moved to that registry, pushed and
# signed (scripts/trust-fixture.py): the cost of verified, pinned images from a warm cache.
#
#   scripts/instructions-server.sh [FEW] [MANY]      (default 200 1200)
set -euo pipefail
few=${1:-200}
many=${2:-1200}
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release --locked -p moat --bin moat
cargo build --release --locked -p moat-server --example ceiling
dir=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
python3 -c 'import json,sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2],"w"), separators=(",",":"))' \
  crates/moat-server/tests/data/pod-create-isolated.json "$dir/review.json"
port=18453
servers="floor moat"
if [ -n "${TRUST:-}" ]; then
  : "${MOAT_TEST_REGISTRY:?TRUST=1 needs the test registry: source the env file scripts/start-test-registry.sh wrote}"
  mkdir -p "$dir/trust"
  python3 scripts/trust-fixture.py "$target/release/moat" "$dir/review.json" "$dir/trust"
  cp "$dir/trust/review.json" "$dir/review.json"
  servers="moat moat+trust"
fi

count() { # server reviews
  local server=$1 n=$2
  rm -f "$dir/ca.pem" "$dir/cg.out"
  case $server in
    moat) valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$target/release/moat" serve \
            --self-signed --ca-out "$dir/ca.pem" --addr "127.0.0.1:$port" \
            --metrics-addr 127.0.0.1:19453 --log-level warn >"$dir/log" 2>&1 & ;;
    moat+trust) valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$target/release/moat" serve \
            --self-signed --ca-out "$dir/ca.pem" --addr "127.0.0.1:$port" \
            --metrics-addr 127.0.0.1:19453 --log-level warn --config "$dir/trust/trust.yaml" >"$dir/log" 2>&1 & ;;
    floor) valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" \
             "$target/release/examples/ceiling" "127.0.0.1:$port" "$dir/ca.pem" floor >"$dir/log" 2>&1 & ;;
  esac
  pid=$!
  for _ in $(seq 300); do
    [ -s "$dir/ca.pem" ] && curl -s -o /dev/null --cacert "$dir/ca.pem" -H 'content-type: application/json' \
      --data-binary @"$dir/review.json" "https://127.0.0.1:$port/mutate" && break
    sleep 0.2
  done
  for _ in $(seq $((n - 1))); do
    printf 'url = "https://127.0.0.1:%s/mutate"\noutput = "/dev/null"\n' "$port"
  done >"$dir/curl.cfg"
  curl -s --http1.1 --cacert "$dir/ca.pem" -H 'content-type: application/json' \
    --data-binary @"$dir/review.json" -K "$dir/curl.cfg" -w '%{http_code}\n' | grep -qv 200 &&
    { echo "a review was not answered 200" >&2; exit 1; }
  kill -INT "$pid"; sleep 0.5; kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  pid=
  awk '/Collected/ {print $4}' "$dir/log"
}
for server in $servers; do
  a=$(count "$server" "$few")
  b=$(count "$server" "$many")
  echo "$server: $(( (b - a) / (many - few) )) instructions per review"
done
