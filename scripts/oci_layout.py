"""Deterministic OCI image layout archives, standard library only.

Shared by build-image.py (moat's image) and build-test-images.py (the end-to-end test images).
Everything that could differ between two builds of the same inputs is fixed: entries sorted by
name, owners 0:0 without user or group names, the mtime the caller gives, gzip headers without
a file name and with mtime 0, JSON with sorted keys and no spaces. The same inputs therefore
give the same bytes, and so the same digests.
"""
import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time

# Debian (dpkg) and kernel (uname -m) architecture names to the OCI (Go) names.
GOARCH = {
    "x86_64": "amd64", "amd64": "amd64",
    "aarch64": "arm64", "arm64": "arm64",
    "armv7l": "arm", "armhf": "arm", "armel": "arm",
    "i386": "386", "i686": "386",
    "ppc64le": "ppc64le", "ppc64el": "ppc64le",
    "s390x": "s390x", "riscv64": "riscv64",
}


def goarch():
    """The OCI architecture name of this machine."""
    try:
        deb = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        deb = ""
    for candidate in (deb, platform.machine()):
        if candidate in GOARCH:
            return GOARCH[candidate]
    sys.exit("oci_layout: unknown architecture %r/%r" % (deb, platform.machine()))


def rfc3339(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def gzip_bytes(data):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


class Layer:
    """A filesystem layer built in memory; `tar()` writes its entries sorted by name."""

    def __init__(self, mtime):
        self.mtime = mtime
        self.entries = {}

    def _add(self, name, type_, mode, data=b"", linkname=""):
        if name in self.entries:
            sys.exit("oci_layout: %s added twice" % name)
        self.entries[name] = (type_, mode, data, linkname)

    def dir(self, name, mode=0o755):
        self._add(name, tarfile.DIRTYPE, mode)

    def file(self, name, data, mode=0o644):
        self._add(name, tarfile.REGTYPE, mode, data)

    def symlink(self, name, target):
        self._add(name, tarfile.SYMTYPE, 0o777, linkname=target)

    def tar(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            # A parent sorts before its children ("etc" < "etc/passwd").
            for name in sorted(self.entries):
                type_, mode, data, linkname = self.entries[name]
                info = tarfile.TarInfo(name)
                info.type = type_
                info.mode = mode
                info.mtime = self.mtime
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.linkname = linkname
                info.size = len(data) if type_ == tarfile.REGTYPE else 0
                tar.addfile(info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)
        return buf.getvalue()


def write_archive(path, *, ref_name, config, created, created_by, layer_raw, arch,
                  image_name=None, labels=None):
    """Writes an OCI image layout archive of one image with one gzip layer; returns the digest
    of its manifest (what a runtime reports as the image's digest).

    `ref_name` becomes the `org.opencontainers.image.ref.name` annotation of the manifest in
    index.json, `image_name` (if given) containerd's `io.containerd.image.name`; `labels` are
    both the config's labels and the manifest's annotations."""
    layer_gz = gzip_bytes(layer_raw)
    labels = dict(labels or {})
    image_config = {
        "architecture": arch,
        "os": "linux",
        "created": rfc3339(created),
        "config": dict(config, **({"Labels": labels} if labels else {})),
        "rootfs": {"type": "layers", "diff_ids": [digest(layer_raw)]},
        "history": [{"created": rfc3339(created), "created_by": created_by}],
    }
    config_blob = canonical(image_config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config_blob), "size": len(config_blob)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(layer_gz), "size": len(layer_gz)}],
    }
    if labels:
        manifest["annotations"] = labels
    manifest_blob = canonical(manifest)
    annotations = {"org.opencontainers.image.ref.name": ref_name}
    if image_name:
        annotations["io.containerd.image.name"] = image_name
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(manifest_blob),
            "size": len(manifest_blob),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": annotations,
        }],
    }
    files = [
        ("oci-layout", canonical({"imageLayoutVersion": "1.0.0"})),
        ("index.json", canonical(index)),
    ]
    for blob in sorted((config_blob, manifest_blob, layer_gz), key=digest):
        files.append(("blobs/sha256/" + digest(blob)[len("sha256:"):], blob))

    tmp = path + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, created
            tar.addfile(info)
        for fname, data in files:
            info = tarfile.TarInfo(fname)
            info.size, info.mode, info.mtime = len(data), 0o644, created
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return digest(manifest_blob)
