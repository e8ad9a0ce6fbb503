#!/usr/bin/env bash
# Installs containerd 1.7 (with NRI) and runc for the identity agent's end-to-end tests, and
# busybox-static for the test images. Debian bookworm ships containerd 1.6 (no NRI); trixie's
# containerd runs on bookworm (trixie's runc does not: it needs glibc 2.38, so runc stays
# bookworm's). The trixie source is derived from this machine's own apt configuration
# (scripts/trixie-source.sh), pinned so that only containerd comes from it. Idempotent; does not start containerd (tests start their own).
#
#   scripts/install-containerd.sh
set -euo pipefail

want_version() { containerd --version 2>/dev/null | grep -qE ' v?(1\.7|[2-9]\.[0-9]+)\.'; }
if want_version && command -v runc >/dev/null && command -v busybox >/dev/null; then
  containerd --version
  exit 0
fi
"$(dirname "$0")/trixie-source.sh" containerd
"$(dirname "$0")/apt-install.sh" containerd runc busybox-static
want_version || { echo "install-containerd: containerd 1.7 or newer was not installed" >&2; exit 1; }
containerd --version
runc --version | head -1
