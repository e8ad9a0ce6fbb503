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
if [ "$(id -u)" != 0 ]; then
  echo "install-registry-tools: run as root (apt-get install)" >&2
  exit 1
fi
"$(dirname "$0")/trixie-source.sh" cosign
# The docker-registry package ships a service: its maintainer script must not start it.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends docker-registry skopeo cosign apache2-utils openssl >/dev/null
cosign version 2>/dev/null | grep -E '^GitVersion' || true
