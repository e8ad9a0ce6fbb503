#!/usr/bin/env bash
# Makes Debian trixie's packages installable on this machine (bookworm) for the few packages
# moat's tests need from it, and only those: an apt source derived from this machine's own apt
# configuration (same mirror and keyring, another suite), every trixie package pinned below
# bookworm's, and each PACKAGE named here pinned to trixie. Idempotent; needs root; does not
# run apt-get update.
#
#   scripts/trixie-source.sh PACKAGE...
set -euo pipefail
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ "$codename" = trixie ] && exit 0
sources=/etc/apt/sources.list.d/moat-trixie.sources
if [ ! -f "$sources" ]; then
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
fi
base=/etc/apt/preferences.d/moat-trixie
if [ ! -f "$base" ]; then
  cat >"$base" <<'PIN'
# Trixie's packages only when asked for by name (scripts/trixie-source.sh).
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
fi
for package in "$@"; do
  cat >"/etc/apt/preferences.d/moat-trixie-$package" <<PIN
# $package comes from trixie (scripts/trixie-source.sh).
Package: $package
Pin: release n=trixie
Pin-Priority: 990
PIN
done
