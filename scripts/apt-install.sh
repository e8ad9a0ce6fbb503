#!/usr/bin/env bash
# Installs Debian packages for moat's tests (needs root) without letting their maintainer
# scripts start a service: there is no init system here, and the tests start their own daemons.
# Options before the packages go to apt-get install.
#
#   scripts/apt-install.sh [--no-install-recommends] PACKAGE...
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "$(basename "$0"): run as root (apt-get install $*)" >&2
  exit 1
fi
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "$@" >/dev/null
