#!/usr/bin/env bash
# Installs what the real-registry tests need (Debian packages, needs root): docker-registry
# (distribution 2.8) to serve images, skopeo to push them, cosign 2.5 to sign them (bookworm
# has no cosign: it comes from trixie, scripts/trixie-source.sh), and htpasswd and openssl
# for scripts/start-test-registry.sh. Idempotent; starts no registry (the tests start their own).
#
#   scripts/install-registry-tools.sh
set -euo pipefail
if command -v docker-registry >/dev/null && command -v skopeo >/dev/null && command -v cosign >/dev/null \
  && command -v htpasswd >/dev/null && command -v openssl >/dev/null; then
  exit 0
fi
"$(dirname "$0")/trixie-source.sh" cosign
# docker-registry ships a service, which apt-install.sh keeps from starting.
"$(dirname "$0")/apt-install.sh" --no-install-recommends docker-registry skopeo cosign apache2-utils openssl
cosign version 2>/dev/null | grep -E '^GitVersion' || true
