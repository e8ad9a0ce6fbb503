#!/usr/bin/env python3
"""Builds the end-to-end tests' OCI image archives from busybox-static, without a registry.

    scripts/build-test-images.py OUTDIR [BUSYBOX]

Writes OUTDIR/busybox.tar (localhost/moat-test/busybox:e2e) and OUTDIR/pause.tar
(localhost/moat-test/pause:e2e), each an OCI image layout (oci-layout, index.json,
blobs/sha256/...) with a single gzip layer: /bin/busybox, a symlink in /bin for each applet,
/etc/passwd and /etc/group (root, nobody 65534), /tmp. The output is deterministic
(scripts/oci_layout.py). Import with `ctr -n k8s.io images import FILE`; the index annotations
name the image. Standard library only.
"""
import os
import subprocess
import sys

import oci_layout

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


def applets(busybox):
    out = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout
    names = sorted({n for n in out.split() if n and "/" not in n and n != "busybox"})
    missing = [a for a in REQUIRED_APPLETS if a not in names]
    if missing:
        sys.exit("build-test-images: busybox lacks applets: " + " ".join(missing))
    return names


def layer_tar(busybox):
    layer = oci_layout.Layer(MTIME)
    for d in ("bin", "dev", "etc", "proc", "root", "run", "sys", "var"):
        layer.dir(d)
    layer.dir("tmp", 0o1777)
    layer.dir("var/tmp", 0o1777)
    with open(busybox, "rb") as f:
        layer.file("bin/busybox", f.read(), 0o755)
    for name in applets(busybox):
        layer.symlink("bin/" + name, "busybox")
    layer.file("etc/passwd",
               b"root:x:0:0:root:/root:/bin/sh\n"
               b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    layer.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return layer.tar()


def write_archive(path, name, config_extra, layer_raw, arch):
    dgst = oci_layout.write_archive(
        path,
        ref_name=name.rsplit(":", 1)[1],
        image_name=name,
        config=dict({"Env": ["PATH=/bin"], "WorkingDir": "/"}, **config_extra),
        created=MTIME,
        created_by="scripts/build-test-images.py (busybox-static)",
        layer_raw=layer_raw,
        arch=arch,
    )
    print("%s %s %s" % (path, name, dgst))


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: build-test-images.py OUTDIR [BUSYBOX]")
    outdir = sys.argv[1]
    busybox = sys.argv[2] if len(sys.argv) == 3 else "/bin/busybox"
    os.makedirs(outdir, exist_ok=True)
    arch = oci_layout.goarch()
    layer_raw = layer_tar(busybox)
    write_archive(os.path.join(outdir, "busybox.tar"), BUSYBOX_NAME,
                  {"Cmd": ["/bin/sh"]}, layer_raw, arch)
    write_archive(os.path.join(outdir, "pause.tar"), PAUSE_NAME,
                  {"Entrypoint": ["/bin/sh", "-c", PAUSE_SCRIPT]}, layer_raw, arch)


if __name__ == "__main__":
    main()
