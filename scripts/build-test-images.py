#!/usr/bin/env python3
"""Builds the end-to-end tests' OCI image archives from busybox-static, without a registry.

    scripts/build-test-images.py OUTDIR [BUSYBOX]

Writes OUTDIR/busybox.tar (localhost/moat-test/busybox:e2e) and OUTDIR/pause.tar
(localhost/moat-test/pause:e2e), each an OCI image layout (oci-layout, index.json,
blobs/sha256/...) with a single gzip layer: /bin/busybox, a symlink in /bin for each applet,
/etc/passwd and /etc/group (root, nobody 65534), /tmp. The output is deterministic: fixed
mtimes, owners and ordering, gzip without name or time. Import with
`ctr -n k8s.io images import FILE`; the index annotations name the image.
Standard library only.
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

MTIME = 0  # fixed, for reproducible digests
BUSYBOX_NAME = "localhost/moat-test/busybox:e2e"
PAUSE_NAME = "localhost/moat-test/pause:e2e"
# Stays alive as PID 1 and exits at once on SIGTERM/SIGINT: a trapped signal interrupts `wait`
# (a foreground `sleep` would delay the trap until it returns). PID 1 ignores signals it has no
# handler for, so the trap is what makes SIGTERM work.
PAUSE_SCRIPT = 'trap "exit 0" TERM INT; while :; do sleep 3600 & wait $!; done'
# Applets the tests rely on; the build fails if busybox lacks one.
REQUIRED_APPLETS = (
    "sh cat sleep ls echo test grep sed base64 strings md5sum head tail stat id true false tr "
    "cut wc"
).split()

GOARCH = {
    "x86_64": "amd64", "amd64": "amd64",
    "aarch64": "arm64", "arm64": "arm64",
    "armv7l": "arm", "armhf": "arm", "armel": "arm",
    "i386": "386", "i686": "386",
    "ppc64le": "ppc64le", "ppc64el": "ppc64le",
    "s390x": "s390x", "riscv64": "riscv64",
}


def arch():
    try:
        deb = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        deb = ""
    for candidate in (deb, platform.machine()):
        if candidate in GOARCH:
            return GOARCH[candidate]
    sys.exit("build-test-images: unknown architecture %r/%r" % (deb, platform.machine()))


def applets(busybox):
    out = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout
    names = sorted({n for n in out.split() if n and "/" not in n and n != "busybox"})
    missing = [a for a in REQUIRED_APPLETS if a not in names]
    if missing:
        sys.exit("build-test-images: busybox lacks applets: " + " ".join(missing))
    return names


def layer_tar(busybox):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name, type_, mode, data=b"", linkname=""):
            info = tarfile.TarInfo(name)
            info.type = type_
            info.mode = mode
            info.mtime = MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.linkname = linkname
            info.size = len(data) if type_ == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)

        for d in ("bin", "dev", "etc", "proc", "root", "run", "sys", "var"):
            add(d, tarfile.DIRTYPE, 0o755)
        add("tmp", tarfile.DIRTYPE, 0o1777)
        add("var/tmp", tarfile.DIRTYPE, 0o1777)
        with open(busybox, "rb") as f:
            add("bin/busybox", tarfile.REGTYPE, 0o755, f.read())
        for name in applets(busybox):
            add("bin/" + name, tarfile.SYMTYPE, 0o777, linkname="busybox")
        add("etc/passwd", tarfile.REGTYPE, 0o644,
            b"root:x:0:0:root:/root:/bin/sh\n"
            b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gzip_bytes(data):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=MTIME, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_archive(path, name, config_extra, layer_raw, layer_gz, goarch):
    config = {
        "architecture": goarch,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": dict({"Env": ["PATH=/bin"], "WorkingDir": "/"}, **config_extra),
        "rootfs": {"type": "layers", "diff_ids": [digest(layer_raw)]},
        "history": [{"created": "1970-01-01T00:00:00Z",
                     "created_by": "scripts/build-test-images.py (busybox-static)"}],
    }
    config_blob = canonical(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config_blob), "size": len(config_blob)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(layer_gz), "size": len(layer_gz)}],
    }
    manifest_blob = canonical(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(manifest_blob),
            "size": len(manifest_blob),
            "platform": {"architecture": goarch, "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
            },
        }],
    }
    files = [
        ("oci-layout", canonical({"imageLayoutVersion": "1.0.0"})),
        ("index.json", canonical(index)),
    ]
    for blob in (config_blob, manifest_blob, layer_gz):
        files.append(("blobs/sha256/" + digest(blob)[len("sha256:"):], blob))

    tmp = path + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(info)
        for fname, data in files:
            info = tarfile.TarInfo(fname)
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    print("%s %s %s" % (path, name, digest(manifest_blob)))


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: build-test-images.py OUTDIR [BUSYBOX]")
    outdir = sys.argv[1]
    busybox = sys.argv[2] if len(sys.argv) == 3 else "/bin/busybox"
    os.makedirs(outdir, exist_ok=True)
    goarch = arch()
    layer_raw = layer_tar(busybox)
    layer_gz = gzip_bytes(layer_raw)
    write_archive(os.path.join(outdir, "busybox.tar"), BUSYBOX_NAME,
                  {"Cmd": ["/bin/sh"]}, layer_raw, layer_gz, goarch)
    write_archive(os.path.join(outdir, "pause.tar"), PAUSE_NAME,
                  {"Entrypoint": ["/bin/sh", "-c", PAUSE_SCRIPT]}, layer_raw, layer_gz, goarch)


if __name__ == "__main__":
    main()
