#!/usr/bin/env bash
# Instructions per review on the review path without the network (read the AdmissionReview,
# decide at the mutate stage, write the answer), counted by valgrind's callgrind: repeatable on
# a shared machine where times are not. The review is the load test's (a 3-container Pod CREATE,
# compact JSON), then the API server's second mutating call for the same pod (after the
# RuntimeClass admission plugin: the object as moat's first answer patched it).
#
#   scripts/instructions.sh [REVIEWS]      (default 2000)
set -euo pipefail
n=${1:-2000}
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release --locked -p moat-server --example reviews
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 -c 'import json,sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2],"w"), separators=(",",":"))' \
  crates/moat-server/tests/data/pod-create-isolated.json "$dir/review.json"
count() { # reviews [reinvoked]
  valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$target/release/examples/reviews" "$@" 2>&1 |
    awk '/Collected/ {print $4}'
}
for call in first reinvoked; do
  arg=(); [ "$call" = reinvoked ] && arg=(reinvoked)
  base=$(count 0 "$dir/review.json" "${arg[@]}")
  total=$(count "$n" "$dir/review.json" "${arg[@]}")
  echo "$call mutating call: $(( (total - base) / n )) instructions per review ($n reviews)"
done
