#!/usr/bin/env bash
# Installs containerd 1.7 (with NRI) and runc for the identity agent's end-to-end tests, and
# busybox-static for the test images. Debian bookworm ships containerd 1.6 (no NRI); trixie's
# containerd runs on bookworm (trixie's runc does not: it needs glibc 2.38, so runc stays
# bookworm's). The trixie source is derived from this machine's own apt configuration (same
# mirror and keyring, another suite), pinned so that only containerd comes from it. Idempotent; does not start containerd (tests start their own).
#
#   scripts/install-containerd.sh
set -euo pipefail

want_version() { containerd --version 2>/dev/null | grep -qE ' v?(1\.7|[2-9]\.[0-9]+)\.'; }
if want_version && command -v runc >/dev/null && command -v busybox >/dev/null; then
  containerd --version
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-containerd: run as root (apt-get install)" >&2
  exit 1
fi

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
sources=/etc/apt/sources.list.d/moat-trixie.sources
if [ "$codename" != trixie ] && [ ! -f "$sources" ]; then
  # The first deb822 stanza that serves the machine's own release (not its security suite).
  read -r uri keyring < <(python3 - "$codename" <<'PY'
import glob, sys
codename = sys.argv[1]
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
        suites = fields.get("Suites", "").split()
        if fields.get("Types", "").split()[:1] == ["deb"] and codename in suites:
            print(fields["URIs"].split()[0], fields.get("Signed-By", "-"))
            sys.exit(0)
sys.exit("no deb822 source for " + codename + " found")
PY
  )
  {
    echo "Types: deb"
    echo "URIs: $uri"
    echo "Suites: trixie"
    echo "Components: main"
    if [ "$keyring" != - ]; then echo "Signed-By: $keyring"; fi
  } >"$sources"
  cat >/etc/apt/preferences.d/moat-trixie <<'PIN'
# Only containerd comes from trixie (scripts/install-containerd.sh).
Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: containerd
Pin: release n=trixie
Pin-Priority: 990
PIN
fi

# No init system here, but a package's maintainer script must not start a daemon either.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq containerd runc busybox-static >/dev/null
want_version || { echo "install-containerd: containerd 1.7 or newer was not installed" >&2; exit 1; }
containerd --version
runc --version | head -1
