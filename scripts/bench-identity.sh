#!/usr/bin/env bash
# Identity agent figures: resident memory with 1, 100 and 1,000 tracked containers, the latency
# the agent adds to CreateContainer and StartContainer (driven through the NRI protocol by the
# runtime double, SVIDs from the SPIRE double), and the sidecar it replaces. Release builds.
#
#   scripts/bench-identity.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build -q --release -p moat
cargo build -q --release -p moat-identity --features doubles --example identity_load
"$target/release/examples/identity_load" "$target/release/moat"
