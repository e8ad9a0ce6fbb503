#!/usr/bin/env bash
# Adversarial load harness (issue 15): what a well-behaved client (the API server, a Prometheus
# scraper) sees while tenants attack moat's review port, its metrics port and the identity
# agent's metrics port. Loopback only, bounded in count and time; attackers use many source
# addresses in 127.0.0.0/8.
#
#   scripts/flood.sh [SECONDS] [ATTACK...]
#
#   SECONDS   measurement window per attack (default 10)
#   ATTACK    any of: idle-tcp idle-tls slow-handshake h2-streams trickle-bodies
#             metrics-unfinished agent-metrics-unfinished request-flood
#             registry-missing-tags registry-hostile registry-cache-flush   (default: all)
#
# The registry-* attacks (issue 30) start moat with images.trust and an HTTPS registry of the
# harness's own on loopback (certificates and a cosign key made with the openssl CLI); the good
# client is another namespace naming a fresh signed tag in every review (registry-cache-flush:
# the same, cached one), counted good only when the image is admitted; their goal is p99 within
# the registry budget (2 s; cached: the usual 100 ms) and RSS under the limit `moat install`
# writes with images.trust on.
#
#   MOAT_BIN=path/to/moat   use this binary (default: cargo build --release, target/release/moat)
#   FLOOD_GOOD_RATE=50      the good client's reviews per second
#   FLOOD_PORT, FLOOD_METRICS_PORT, FLOOD_AGENT_METRICS_PORT   loopback ports (18743, 19743, 19744)
#
# A fresh `moat serve` is started for a baseline (no attack) and for each attack, with the
# descriptor limit raised to the hard limit here (moat inherits it). Each attack runs in
# scripts/flood.py (Python 3 standard library): the attack ramps up, then a good client
# (127.0.0.200) sends reviews over TLS for SECONDS while moat's RSS and descriptors are sampled
# every 100 ms. One line per attack:
#
#   ATTACK  good S% (ok/n) p50 X ms p99 Y ms | moat RSS peak R MiB, fds peak F | attacker: … | goal: … | PASS/FAIL
#
# The goal is 100% success, p99 <= 100 ms and RSS under the memory limit `moat install` writes
# (plus the same for the scrapers in the metrics attacks). Refusal counters scraped from moat's
# metrics port follow. Exit status 1 when any goal is missed (after every line is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${MOAT_BIN:-}" ]; then
  bin=$MOAT_BIN
else
  cargo build --release --locked -p moat --bin moat >&2
  bin=${CARGO_TARGET_DIR:-target}/release/moat
fi
[ -x "$bin" ] || { echo "flood.sh: no moat binary at $bin" >&2; exit 2; }
# Thousands of connections on each side: moat (started by flood.py) and the attackers inherit it.
ulimit -n "$(ulimit -Hn)"
exec python3 scripts/flood.py --bin "$bin" "$@"
