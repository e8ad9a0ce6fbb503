#!/usr/bin/env bash
# Builds the identity agent's end-to-end test images without a registry or docker: OCI image
# archives OUTDIR/busybox.tar (localhost/moat-test/busybox:e2e, Cmd /bin/sh) and
# OUTDIR/pause.tar (localhost/moat-test/pause:e2e, the CRI sandbox image: sleeps, exits on
# SIGTERM as PID 1), both from Debian's busybox-static (scripts/install-containerd.sh installs
# it). Deterministic. Import with `ctr -n k8s.io images import OUTDIR/busybox.tar`, or pass
# OUTDIR to scripts/start-test-containerd.sh.
#
#   scripts/build-test-images.sh OUTDIR
set -euo pipefail
out=${1:?usage: build-test-images.sh OUTDIR}
busybox=${BUSYBOX:-/bin/busybox}
if [ ! -x "$busybox" ]; then
  echo "build-test-images: $busybox not found (apt-get install busybox-static)" >&2
  exit 1
fi
# ldd exits 1 for a static binary.
ldd_out=$(LC_ALL=C ldd "$busybox" 2>&1 || true)
if ! grep -qE 'not a dynamic|statically linked' <<<"$ldd_out"; then
  echo "build-test-images: $busybox is not statically linked (install busybox-static)" >&2
  exit 1
fi
exec python3 "$(dirname "$0")/build-test-images.py" "$out" "$busybox"
