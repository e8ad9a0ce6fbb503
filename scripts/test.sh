#!/usr/bin/env bash
# Runs every test moat has, installing what the tests need first. `.ci/run` calls this.
#
#   scripts/test.sh
#
# Installs (Debian packages, needs root): containerd 1.7 with NRI, runc and busybox-static for
# the end-to-end tests, runsc (gVisor) for the identity agent's sandboxed one, protoc for
# the CRI client they use, and docker-registry, skopeo and cosign for the image-trust tests
# (scripts/install-registry-tools.sh), which run against two registries started on loopback
# (scripts/start-test-registry.sh). Then builds the test images and moat's image (scripts/build-image.sh),
# starts a containerd of its own under a temporary directory, runs the whole suite, then the
# end-to-end tests of the identity agent (runc and gVisor) and of the image (ignored in a plain
# `cargo test`) with MOAT_E2E_CONTAINERD_DIR pointing at that containerd and
# MOAT_E2E_IMAGE_ARCHIVE at the image. Last, `moat install` on a real kube-apiserver of each
# supported version (built from k8s.io/kubernetes by scripts/build-kube.sh, cached per version
# under ~/.cache/moat; started on loopback by scripts/start-test-kube.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== prerequisites"
scripts/install-containerd.sh
scripts/install-registry-tools.sh
if ! command -v runsc >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runsc >/dev/null
fi
if ! command -v curl >/dev/null; then
  # The server test that checks what curl users see of an oversized body over HTTP/2.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
fi
if ! command -v protoc >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
fi

echo "== the real control plane (k8s.io/kubernetes from its Go modules, cached per version)"
# The versions moat supports, newest and oldest (docs/server.md, "Supported Kubernetes").
kube_versions="v1.37.2 v1.34.4"
for v in $kube_versions etcd; do scripts/build-kube.sh "$v" >/dev/null; done

echo "== format"
cargo fmt --all --check
echo "== lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== containerd for the end-to-end tests"
e2e=$(mktemp -d /tmp/moat-e2e.XXXXXX)
echo "== moat's image"
scripts/build-image.sh "$e2e/moat-image" >/dev/null
scripts/build-test-images.sh "$e2e/images" >/dev/null
containerd_pid=$(scripts/start-test-containerd.sh "$e2e/containerd" "$e2e/images" 2>"$e2e/start.log") || {
  cat "$e2e/start.log" >&2
  exit 1
}
registry_pids=""
kube_pids=""
cleanup() {
  kill "$containerd_pid" 2>/dev/null || true
  for pid in $kube_pids; do kill "$pid" 2>/dev/null || true; done
  for pid in $registry_pids; do kill "$pid" 2>/dev/null || true; done
  # Shims and containers a failed test left behind, then their mounts.
  pkill -f -- "$e2e/containerd" 2>/dev/null || true
  sleep 0.5
  grep -o " $e2e/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$e2e" 2>/dev/null || true
}
trap cleanup EXIT
echo "== registries for the image-trust tests"
registry_pids=$(scripts/start-test-registry.sh "$e2e/registry")

echo "== tests"
cargo test --workspace --locked
echo "== identity agent on a real containerd (runc, and gVisor through its runsc handler)"
# One at a time: the tests share containerd's NRI socket.
MOAT_E2E_CONTAINERD_DIR="$e2e/containerd" \
  cargo test -p moat-identity --locked --test e2e_containerd -- --ignored --test-threads=1
echo "== moat's image on a real containerd"
MOAT_E2E_CONTAINERD_DIR="$e2e/containerd" MOAT_E2E_IMAGE_ARCHIVE=$(echo "$e2e"/moat-image/moat-*.oci.tar) \
  cargo test -p moat --locked --test e2e_image -- --ignored
echo "== image trust against real registries (distribution, skopeo, cosign)"
(
  . "$e2e/registry/env"
  cargo test -p moat-registry --locked --test real_registry -- --ignored
  cargo test -p moat-server --locked --test registry -- --ignored
)
echo "== moat install on real kube-apiservers ($kube_versions)"
for v in $kube_versions; do
  kube_pids=$(scripts/start-test-kube.sh "$e2e/kube-$v" "$v")
  (
    . "$e2e/kube-$v/env"
    cargo test -p moat --locked --test real_apiserver -- --ignored --test-threads=1
  )
  for pid in $kube_pids; do kill "$pid" 2>/dev/null || true; done
  kube_pids=""
done
