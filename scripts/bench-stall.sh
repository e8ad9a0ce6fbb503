#!/usr/bin/env bash
# What a tenant annotating pods for an identity nobody registered costs other pods on the node:
# on a real containerd 1.7 with the identity agent, another pod's container create+start latency
# without and with the tenant looping (docs/identity-agent.md, "No node held by one tenant").
# Needs root and what scripts/test.sh installs (it installs containerd the same way).
#
#   scripts/bench-stall.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-containerd.sh
dir=$(mktemp -d /tmp/moat-stall.XXXXXX)
scripts/build-test-images.sh "$dir/images" >/dev/null
pid=$(scripts/start-test-containerd.sh "$dir/containerd" "$dir/images" 2>"$dir/start.log") || {
  cat "$dir/start.log" >&2
  exit 1
}
cleanup() {
  kill "$pid" 2>/dev/null || true
  pkill -f -- "$dir/containerd" 2>/dev/null || true
  sleep 0.5
  grep -o " $dir/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$dir" 2>/dev/null || true
}
trap cleanup EXIT
MOAT_E2E_CONTAINERD_DIR="$dir/containerd" \
  cargo test -q -p moat-identity --test e2e_containerd -- --ignored --nocapture \
  a_tenant_whose_identity_is_never_issued_does_not_hold_the_node 2>&1 | grep -E "another pod|test result"
