#!/usr/bin/env bash
# Builds moat's container image without a container daemon or registry: a static moat binary
# (glibc, crt-static) in a single-layer OCI image layout archive, OUTDIR/moat-VERSION.oci.tar
# (default OUTDIR: target/image, under CARGO_TARGET_DIR when that is set). The image is named
# localhost/moat:VERSION, the default image of `moat install`. Reproducible: entry times come from
# SOURCE_DATE_EPOCH (default: the last commit's time); the archive is written twice and the two
# must be byte-identical. Prints the image's digest on the last line. Needs cargo, python3 and
# git; nothing from the network beyond crates.io.
#
#   scripts/build-image.sh [OUTDIR]
#   ctr -n k8s.io images import OUTDIR/moat-VERSION.oci.tar    # on a node, to run it
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target_dir=${CARGO_TARGET_DIR:-$root/target}
out=${1:-$target_dir/image}
triple=$(rustc -vV | sed -n 's/^host: //p')
cargo_home=${CARGO_HOME:-$HOME/.cargo}

# Package facts from cargo itself, so they cannot drift from Cargo.toml.
read -r version source licenses < <(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c '
import json, sys
pkg = next(p for p in json.load(sys.stdin)["packages"] if p["name"] == "moat")
print(pkg["version"], pkg["repository"], pkg["license"])')
revision=$(git rev-parse HEAD)
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}

echo "== static moat $version for $triple" >&2
# crt-static: glibc linked in (no libc in the image). The path remaps keep this checkout's, its
# target directory's (generated code) and this user's directories out of the binary, so it does
# not depend on where it was built.
flags=(-C target-feature=+crt-static "--remap-path-prefix=$root=/moat"
  "--remap-path-prefix=$target_dir=/target" "--remap-path-prefix=$cargo_home=/cargo")
CARGO_ENCODED_RUSTFLAGS=$(IFS=$'\x1f'; echo "${flags[*]}") \
  CFLAGS="-ffile-prefix-map=$root=/moat -ffile-prefix-map=$target_dir=/target -ffile-prefix-map=$cargo_home=/cargo" \
  cargo build --locked --profile image --target "$triple" -p moat --bin moat >&2
binary=$target_dir/$triple/image/moat
# ldd says "statically linked" or "not a dynamic executable" (and exits 1) for a static binary.
ldd_out=$(LC_ALL=C ldd "$binary" 2>&1 || true)
if ! grep -qE 'statically linked|not a dynamic executable' <<<"$ldd_out"; then
  echo "build-image: $binary is not static:" >&2
  echo "$ldd_out" >&2
  exit 1
fi

# The name `moat install` deploys by default, asked from the binary so the two cannot differ.
name=$("$binary" install | sed -n 's/^ *image: //p' | head -1)
case $name in
  */moat:"$version") ;;
  *) echo "build-image: moat install deploys '$name', not moat $version" >&2; exit 1 ;;
esac

mkdir -p "$out"
archive=$out/moat-$version.oci.tar
build() {
  python3 scripts/build-image.py --binary "$binary" --name "$name" --version "$version" \
    --source "$source" --revision "$revision" --licenses "$licenses" --epoch "$epoch" --out "$1"
}
digest=$(build "$archive")
again=$(mktemp "$out/.moat-$version.XXXXXX")
trap 'rm -f "$again"' EXIT
build "$again" >/dev/null
if ! cmp -s "$archive" "$again"; then
  echo "build-image: two builds of the archive differ; it is not reproducible" >&2
  exit 1
fi
echo "== $archive ($name, $(du -h "$archive" | cut -f1), identical when built twice)" >&2
echo "$digest"
