#!/usr/bin/env python3
"""Builds moat's container image from a static `moat` binary, without a container daemon.

    scripts/build-image.py --binary FILE --name NAME --version V --source URL \
        --revision COMMIT --licenses SPDX --epoch SECONDS --out FILE.oci.tar

One OCI image layout archive (oci-layout, index.json, blobs/sha256/...) holding one image with
one gzip layer: /moat (the binary), /etc/passwd and /etc/group (image/rootfs/etc) naming root
and the unprivileged user 65532 moat runs as; nothing else (no shell, no libraries: the binary
is static). The config runs /moat as 65532:65532; labels (also manifest annotations) give the
version, source, revision and licence. `--name` (fully qualified, e.g. localhost/moat:0.1.0)
becomes the `org.opencontainers.image.ref.name` annotation in index.json, which
`ctr images import` names the image after. Entry times are `--epoch` (SOURCE_DATE_EPOCH), so
the same inputs give the same bytes (scripts/oci_layout.py). Prints the manifest digest.
scripts/build-image.sh calls this; standard library only.
"""
import argparse
import os

import oci_layout

# moat install's runAsUser and runAsGroup (crates/moat/src/install.rs, RUN_AS_ID).
RUN_AS_ID = 65532
# moat serve's default review and metrics ports.
PORTS = (8443, 9090)
# /etc/passwd and /etc/group, shared with the Containerfile: root (the identity agent) and moat
# (65532, the webhook), for tools that map ids to names. Their shell, /sbin/nologin, does not
# exist in the image, on purpose.
ROOTFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "image", "rootfs")
ACCOUNT_FILES = ("etc/passwd", "etc/group")


def layer(binary, epoch):
    layer = oci_layout.Layer(epoch)
    layer.dir("etc")
    for name in ACCOUNT_FILES:
        with open(os.path.join(ROOTFS, name), "rb") as f:
            data = f.read()
        if b":%d:" % RUN_AS_ID not in data:
            raise SystemExit("build-image: %s has no account %d" % (name, RUN_AS_ID))
        layer.file(name, data)
    with open(binary, "rb") as f:
        layer.file("moat", f.read(), 0o755)
    return layer.tar()


def main():
    p = argparse.ArgumentParser(description="Builds moat's OCI image archive.")
    p.add_argument("--binary", required=True, help="the static moat binary")
    p.add_argument("--name", required=True, help="image name and tag, e.g. localhost/moat:0.1.0")
    p.add_argument("--version", required=True)
    p.add_argument("--source", required=True, help="the repository URL")
    p.add_argument("--revision", required=True, help="the git commit")
    p.add_argument("--licenses", required=True, help="SPDX expression")
    p.add_argument("--epoch", required=True, type=int, help="SOURCE_DATE_EPOCH")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    labels = {
        "org.opencontainers.image.title": "moat",
        "org.opencontainers.image.version": a.version,
        "org.opencontainers.image.source": a.source,
        "org.opencontainers.image.revision": a.revision,
        "org.opencontainers.image.licenses": a.licenses,
        "org.opencontainers.image.created": oci_layout.rfc3339(a.epoch),
    }
    config = {
        "User": "%d:%d" % (RUN_AS_ID, RUN_AS_ID),
        "Entrypoint": ["/moat"],
        "WorkingDir": "/",
        "ExposedPorts": {"%d/tcp" % port: {} for port in PORTS},
    }
    print(oci_layout.write_archive(
        a.out,
        ref_name=a.name,
        config=config,
        created=a.epoch,
        created_by="scripts/build-image.sh",
        layer_raw=layer(a.binary, a.epoch),
        arch=oci_layout.goarch(),
        labels=labels,
    ))


if __name__ == "__main__":
    main()
