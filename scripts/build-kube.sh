#!/usr/bin/env bash
# Builds the real Kubernetes control plane the test suite runs (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl) and etcd, from their published Go modules,
# and caches them per version. Prints the directory holding the binaries.
#
#   scripts/build-kube.sh v1.37.2     # or v1.34.4; etcd: scripts/build-kube.sh etcd
#
# Each version is a Go module of its own under tools/ (test tooling only): tools/kube-v1.37
# requires k8s.io/kubernetes v1.37.2 with every staging module (k8s.io/api, apiserver,
# client-go, ...) replaced by its published v0.37.2, and names the four commands as `tool`s.
# The binaries are stamped with the version (component-base's gitVersion), checked after the
# build, and kept in $MOAT_CACHE_DIR (default ~/.cache/moat)/kube/VERSION/bin: a second run
# finds them there and returns at once. Any failure names the module, the version and the step.
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:?usage: scripts/build-kube.sh VERSION|etcd}
cache=${MOAT_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/moat}

fail() { echo "build-kube: $*" >&2; exit 1; }
command -v go >/dev/null || fail "no 'go' on PATH: the real control plane is built from Go modules (Go >= 1.26)"

if [ "$want" = etcd ]; then
  module=tools/etcd
  version=$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2}' "$module/go.mod")
  [ -n "$version" ] || fail "$module/go.mod requires no go.etcd.io/etcd/server/v3"
  out=$cache/etcd/$version/bin
  # Read whole before matching: `grep -q` quits at the match, and under pipefail the writer's
  # SIGPIPE would fail the check.
  reports() { [ -x "$out/etcd" ] && [[ $("$out/etcd" --version 2>/dev/null) == *"etcd Version: ${version#v}"* ]]; }
  if reports; then
    echo "$out"; exit 0
  fi
  mkdir -p "$out"
  tmp=$(mktemp -d "$out/.build.XXXXXX")
  (cd "$module" && GOBIN="$tmp" go install -trimpath -ldflags=-s\ -w tool) >&2 \
    || fail "step 'go install tool' of go.etcd.io/etcd/server/v3 $version failed (output above)"
  mv "$tmp/server" "$out/etcd"   # go install names go.etcd.io/etcd/server/v3 "server"
  rm -rf "$tmp"
  reports || fail "built etcd does not report version $version: $("$out/etcd" --version | head -1)"
  echo "$out"; exit 0
fi

case $want in
  v1.*.*) ;;
  *) fail "'$want' is not a Kubernetes version (vMAJOR.MINOR.PATCH) or 'etcd'" ;;
esac
minor=${want#v1.}; minor=${minor%%.*}
module=tools/kube-v1.$minor
[ -f "$module/go.mod" ] || fail "no Go module $module for Kubernetes $want (supported: $(ls -d tools/kube-v1.* | sed 's|tools/kube-||' | tr '\n' ' '))"
pinned=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$module/go.mod")
[ "$pinned" = "$want" ] || fail "$module requires k8s.io/kubernetes $pinned, not $want"
out=$cache/kube/$want/bin
commands="kube-apiserver kube-controller-manager kube-scheduler kubectl"

built() {
  for c in $commands; do [ -x "$out/$c" ] || return 1; done
  [ "$("$out/kube-apiserver" --version 2>/dev/null)" = "Kubernetes $want" ]
}
if built; then echo "$out"; exit 0; fi

mkdir -p "$out"
tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
stamp="-X k8s.io/component-base/version.gitVersion=$want"
stamp="$stamp -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
stamp="$stamp -X k8s.io/component-base/version.gitTreeState=clean"
start=$(date +%s)
echo "build-kube: building k8s.io/kubernetes $want ($commands) in $module" >&2
(cd "$module" && GOBIN="$tmp" go install -trimpath -ldflags="-s -w $stamp" tool) >&2 \
  || fail "step 'go install tool' of k8s.io/kubernetes $want in $module failed (output above)"
for c in $commands; do
  [ -x "$tmp/$c" ] || fail "k8s.io/kubernetes $want: 'go install tool' made no $c"
done
got=$("$tmp/kube-apiserver" --version 2>&1 | head -1)
[ "$got" = "Kubernetes $want" ] || fail "built kube-apiserver reports '$got', not 'Kubernetes $want'"
mv "$tmp"/* "$out/"
echo "build-kube: k8s.io/kubernetes $want built in $(( $(date +%s) - start )) s" >&2
echo "$out"
