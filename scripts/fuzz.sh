#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60): image references, the configuration
# loader, the whole decision, the identity agent's annotations and its certificate reading
# (x509-parser). Installs cargo-fuzz when missing. A crash leaves its input in
# fuzz/artifacts/<target>/ and fails the script; copy it to fuzz/seeds/<target>/ so the
# regression tests (crates/moat-core/tests/fuzz_seeds.rs, crates/moat-identity/tests/fuzz_seeds.rs)
# replay it on every test run.
#
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
seconds=${1:-60}
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# cargo-fuzz builds with sanitizer flags that only nightly accepts; the machine has one stable
# toolchain, which accepts them when bootstrapping is allowed.
export RUSTC_BOOTSTRAP=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in image_ref config decide identity_annotation identity_der; do
  mkdir -p "fuzz/corpus/$target"
  echo "== fuzz $target for ${seconds}s"
  if ! cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
      -max_total_time="$seconds" -max_len=8192 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz $target failed; crash inputs are in fuzz/artifacts/$target" >&2
    exit 1
  fi
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+.*(DONE|cov:))' "$log" | tail -3
done
