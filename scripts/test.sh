#!/usr/bin/env bash
# Runs every test moat has, installing what the tests need first. `.ci/run` calls this.
#
#   scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== format"
cargo fmt --all --check
echo "== lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
cargo test --workspace --locked
