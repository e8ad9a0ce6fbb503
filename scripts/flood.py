#!/usr/bin/env python3
"""Adversarial load harness for `moat serve` and `moat identity-agent` (issue 15).

Run through scripts/flood.sh, which builds or picks the binary and raises the descriptor limit:

    scripts/flood.sh [SECONDS] [ATTACK...]

For each attack a fresh `moat serve` is started (so no attack inherits another's leftovers), the
attack is ramped up, and then, for SECONDS, well-behaved clients measure what the API server (and
a Prometheus scraper) would see, each from its own loopback source address. moat's resident
memory and open descriptors are sampled every 100 ms for the whole attack. One line is printed
per attack with the goal beside the figures; the exit status is 1 when any goal is missed.

Attacks (make_attack() says why each exists): idle-tcp, idle-tls, slow-handshake (connection
caps), h2-streams (request slots), trickle-bodies (buffered body memory), metrics-unfinished and
agent-metrics-unfinished (the plain-HTTP metrics ports of moat and of the identity agent, the
latter run against a stand-in for containerd's NRI socket), request-flood (per-source fairness),
and image trust (issue 30: moat serve with `images.trust` and an HTTPS registry of the harness's
own on loopback, see FakeRegistry): registry-missing-tags (one namespace's lookups starving
another's), registry-hostile (a tenant's registry growing moat's memory), registry-cache-flush
(references needing no lookup flushing the cache). In those the good client is another
namespace whose every review names a fresh signed tag (registry-cache-flush: the same one, so
it must be answered from the cache), and it counts only reviews that admit the image.

Everything is loopback-only and bounded: counts are fixed below, every attack stops after its
window and closes its sockets. Attack sockets are bound to source addresses in 127.0.0.0/8
(Linux answers the whole /8 on lo), so one machine plays many tenant pods. Python standard
library only.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import multiprocessing
import os
import re
import resource
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"
# Well-behaved clients, each from an address no attacker uses.
GOOD_REVIEW_SRC = "127.0.0.200"
GOOD_SCRAPE_SRC = "127.0.0.201"
GOOD_AGENT_SCRAPE_SRC = "127.0.0.202"

GOAL_SUCCESS = 100.0
GOAL_P99_MS = 100.0
# The API server gives a webhook call at most this long (moat install's timeoutSeconds).
CLIENT_TIMEOUT_S = 10.0
# How long an attack may take to reach its full size before the measurement starts anyway.
RAMP_MAX_S = 20.0


def attack_addr(attack_no: int, i: int) -> str:
    """The i-th source address of attack number attack_no: 127.(10+attack_no).x.y, so attacks never
    share addresses with each other or with the good clients (127.0.0.x)."""
    return f"127.{10 + attack_no}.{i // 250}.{i % 250 + 1}"


# Linux: bind() picks no port, connect() does. Binding thousands of sockets to (address, 0)
# otherwise makes the kernel search its bind table for each one, costing far more CPU than the
# connections themselves.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def bound_socket(src: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((src, 0))
    except OSError:
        s.close()
        raise
    return s


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


# ---------------------------------------------------------------------------------------------
# Good clients. They run in a separate process (multiprocessing, spawn) so that the attackers'
# threads in this process never delay them through the GIL: their latencies are moat's, not
# Python's.
# ---------------------------------------------------------------------------------------------


def _closed_while_idle(conn: http.client.HTTPConnection | None) -> bool:
    """Whether the server closed this kept-alive connection since its last answer. Go's HTTP
    client (the API server's, Prometheus's) notices that in its connection pool and dials anew
    instead of sending on it; Python's does not, so the good clients look before reusing one."""
    if conn is None or conn.sock is None:
        return False
    try:
        readable, _, _ = select.select([conn.sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _review_client(c: dict, end: float, out: dict) -> None:
    """The API server: reviews over TLS, HTTP/1.1 keep-alive, a fresh connection every
    `reconnect` requests (and after any failure), paced at `rate` per second."""
    ctx = ssl.create_default_context(cafile=c["ca"])
    ctx.set_alpn_protocols(["http/1.1"])
    lat, errors, ok, idle_closed = [], collections.Counter(), 0, 0
    conn, used = None, 0
    interval = 1.0 / c["rate"]
    next_t = time.monotonic()
    while time.monotonic() < end:
        now = time.monotonic()
        if next_t > now:
            time.sleep(next_t - now)
        next_t = max(next_t + interval, time.monotonic())
        t0 = time.monotonic()
        good = False
        try:
            if _closed_while_idle(conn):
                idle_closed += 1
                used = c["reconnect"]
            if conn is None or used >= c["reconnect"]:
                if conn is not None:
                    conn.close()
                conn = http.client.HTTPSConnection(
                    HOST, c["port"], context=ctx, timeout=CLIENT_TIMEOUT_S, source_address=(c["src"], 0)
                )
                used = 0
            used += 1
            body = c["body"]
            if c.get("fresh"):
                body = body.replace(b"@FRESH@", str(len(lat)).encode())
            conn.request("POST", c["path"], body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            response = json.loads(data).get("response", {}) if r.status == 200 else {}
            if r.status != 200:
                errors[f"HTTP {r.status}"] += 1
            elif "allowed" not in response:
                errors["no response.allowed"] += 1
            elif c.get("want_allowed") and response.get("allowed") is not True:
                message = response.get("status", {}).get("message", "")
                errors["denied: " + re.sub(r"[0-9a-f]{64}|\d+", "N", message)[-90:]] += 1
            else:
                good = True
        except Exception as e:  # every failure the API server could see counts
            errors[type(e).__name__] += 1
        lat.append((time.monotonic() - t0) * 1e3)
        if good:
            ok += 1
        elif conn is not None:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    out.update(n=len(lat), ok=ok, lat=lat, errors=dict(errors), idle_closed=idle_closed)


def _scrape_client(c: dict, end: float, out: dict) -> None:
    """A Prometheus scraper: plain HTTP GET /metrics, keep-alive, a fresh connection every
    `reconnect` scrapes (and after any failure), paced at `rate` per second."""
    lat, errors, ok, idle_closed = [], collections.Counter(), 0, 0
    conn, used = None, 0
    interval = 1.0 / c["rate"]
    next_t = time.monotonic()
    while time.monotonic() < end:
        now = time.monotonic()
        if next_t > now:
            time.sleep(next_t - now)
        next_t = max(next_t + interval, time.monotonic())
        t0 = time.monotonic()
        good = False
        try:
            if _closed_while_idle(conn):
                idle_closed += 1
                used = c["reconnect"]
            if conn is None or used >= c["reconnect"]:
                if conn is not None:
                    conn.close()
                conn = http.client.HTTPConnection(
                    HOST, c["port"], timeout=CLIENT_TIMEOUT_S, source_address=(c["src"], 0)
                )
                used = 0
            used += 1
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            data = r.read()
            if r.status != 200 or b"moat_" not in data:
                errors[f"HTTP {r.status}"] += 1
            else:
                good = True
        except Exception as e:
            errors[type(e).__name__] += 1
        lat.append((time.monotonic() - t0) * 1e3)
        if good:
            ok += 1
        elif conn is not None:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    out.update(n=len(lat), ok=ok, lat=lat, errors=dict(errors), idle_closed=idle_closed)


def _measure_main(clients: dict, seconds: float, queue) -> None:
    end = time.monotonic() + seconds
    results = {name: {} for name in clients}
    threads = []
    for name, c in clients.items():
        fn = _review_client if c["kind"] == "review" else _scrape_client
        t = threading.Thread(target=fn, args=(c, end, results[name]), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    queue.put(results)


def measure(clients: dict, seconds: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure_main, args=(clients, seconds, q), daemon=True)
    p.start()
    try:
        results = q.get(timeout=seconds + CLIENT_TIMEOUT_S + 30)
    except Exception:
        results = {name: {"n": 0, "ok": 0, "lat": [], "errors": {"measurement process lost": 1}} for name in clients}
    p.join(5)
    if p.is_alive():
        p.kill()
    return results


def summarize(r: dict) -> dict:
    lat = sorted(r.get("lat", []))
    n, ok = r.get("n", 0), r.get("ok", 0)
    return {
        "n": n,
        "ok": ok,
        "pct": 100.0 * ok / n if n else 0.0,
        "p50": percentile(lat, 0.50),
        "p99": percentile(lat, 0.99),
        "max": lat[-1] if lat else float("nan"),
        "errors": r.get("errors", {}),
        "idle_closed": r.get("idle_closed", 0),
    }


# ---------------------------------------------------------------------------------------------
# Processes under test and their resource use.
# ---------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def read_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    """Peak VmRSS and open descriptors of the given processes, every 100 ms."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.pids = pids
        self.stop_event = threading.Event()
        self.peak_rss = {k: 0 for k in pids}
        self.start_rss = {k: read_rss_kib(p) or 0 for k, p in pids.items()}
        self.peak_fds = {k: 0 for k in pids}
        self.cpu = {k: cpu_seconds(p) for k, p in pids.items()}
        self.own_cpu = time.process_time()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for k, pid in self.pids.items():
                rss = read_rss_kib(pid)
                if rss is not None:
                    self.peak_rss[k] = max(self.peak_rss[k], rss)
                try:
                    self.peak_fds[k] = max(self.peak_fds[k], len(os.listdir(f"/proc/{pid}/fd")))
                except OSError:
                    pass
            self.stop_event.wait(0.1)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.cpu = {k: cpu_seconds(p) - self.cpu[k] for k, p in self.pids.items()}
        self.own_cpu = time.process_time() - self.own_cpu


def wait_http(port: int, path: str, proc: subprocess.Popen, ca: str | None = None, timeout: float = 30) -> bool:
    """Waits for a 200 on GET path (over TLS when a CA is given): a whole request, so the probe is
    not itself counted as an abandoned connection."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            if ca:
                conn = http.client.HTTPSConnection(HOST, port, timeout=2, source_address=("127.0.0.199", 0),
                                                   context=ssl.create_default_context(cafile=ca))
            else:
                conn = http.client.HTTPConnection(HOST, port, timeout=2, source_address=("127.0.0.199", 0))
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Moat:
    """A fresh `moat serve` on loopback with a throwaway CA."""

    def __init__(self, binary: str, workdir: str, port: int, mport: int, config: str | None = None):
        self.port, self.mport = port, mport
        self.ca = os.path.join(workdir, "ca.pem")
        if os.path.exists(self.ca):
            os.unlink(self.ca)
        self.log = open(os.path.join(workdir, "moat.log"), "ab")
        self.proc = subprocess.Popen(
            [binary, "serve", "--self-signed", "--ca-out", self.ca, "--addr", f"{HOST}:{port}",
             "--metrics-addr", f"{HOST}:{mport}", "--log-level", "error"]
            + (["--config", config] if config else []),
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
        )
        end = time.monotonic() + 30
        while not (os.path.exists(self.ca) and os.path.getsize(self.ca) > 0):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"moat serve did not start (status {self.proc.poll()}); see {workdir}/moat.log")
            time.sleep(0.05)
        if not (wait_http(port, "/healthz", self.proc, ca=self.ca) and wait_http(mport, "/metrics", self.proc)):
            raise RuntimeError(f"moat serve does not listen (status {self.proc.poll()}); see {workdir}/moat.log")

    def refusal_counters(self) -> list[str]:
        """Lines of moat's metrics that count refusals, budgets or displaced connections."""
        try:
            conn = http.client.HTTPConnection(HOST, self.mport, timeout=5, source_address=(GOOD_SCRAPE_SRC, 0))
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode(errors="replace")
            conn.close()
        except Exception as e:
            return [f"(metrics not scraped: {type(e).__name__}: {e})"]
        return [l for l in text.splitlines()
                if l.startswith("moat_") and re.search(r"refus|budget|displac|registry_failures", l)]

    def stop(self) -> int | None:
        died = self.proc.poll()
        stop_process(self.proc)
        self.log.close()
        return died


class NriStandIn(threading.Thread):
    """Just enough of containerd's NRI side for `moat identity-agent` to run without a runtime:
    accepts the agent's connection on a Unix socket, answers every ttrpc call the agent makes
    (RegisterPlugin) with an empty success, and then holds the connection (the agent exits when
    the runtime hangs up). Wire format (crates/moat-identity/src/mux.rs, ttrpc.rs): mux frames of
    [conn id u32 BE][length u32 BE][payload]; each connection carries ttrpc messages of
    [length u32][stream id u32][type u8: 1 request, 2 response][flags u8][protobuf]. An empty
    response protobuf means status OK with an empty payload (nri Empty)."""

    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.path = path
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        self.srv.listen(1)
        self.srv.settimeout(0.5)
        self.stop_event = threading.Event()
        self.calls = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                conn, _ = self.srv.accept()
            except socket.timeout:
                continue
            conn.settimeout(0.5)
            buf, streams = b"", collections.defaultdict(bytes)
            while not self.stop_event.is_set():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                buf += data
                while len(buf) >= 8:
                    cid, length = struct.unpack(">II", buf[:8])
                    if len(buf) < 8 + length:
                        break
                    streams[cid] += buf[8:8 + length]
                    buf = buf[8 + length:]
                    while len(streams[cid]) >= 10:
                        mlen, sid, kind, _flags = struct.unpack(">IIBB", streams[cid][:10])
                        if len(streams[cid]) < 10 + mlen:
                            break
                        msg, streams[cid] = streams[cid][10:10 + mlen], streams[cid][10 + mlen:]
                        if kind == 1:
                            self.calls.append(msg[:80])
                            conn.sendall(struct.pack(">II", cid, 10) + struct.pack(">IIBB", 0, sid, 2, 0))
            conn.close()
        self.srv.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(2)


class Agent:
    """`moat identity-agent` with the NRI stand-in as its runtime and a SPIRE socket that does
    not exist (no container is ever created, so SPIRE is never asked)."""

    def __init__(self, binary: str, workdir: str, mport: int):
        self.mport = mport
        sock = os.path.join(workdir, "nri.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        self.nri = NriStandIn(sock)
        self.nri.start()
        self.log = open(os.path.join(workdir, "agent.log"), "ab")
        self.proc = subprocess.Popen(
            [binary, "identity-agent", "--nri-socket", sock,
             "--spire-admin-socket", os.path.join(workdir, "spire-admin.sock"),
             "--artifact-dir", os.path.join(workdir, "identity"),
             "--runtime-bundle-dir", os.path.join(workdir, "bundles"),
             "--metrics-addr", f"{HOST}:{mport}", "--log-level", "error"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
        )
        if not wait_http(mport, "/healthz", self.proc):
            status = self.proc.poll()
            self.stop()
            raise RuntimeError(f"identity agent did not listen on {HOST}:{mport} (status {status}); see {workdir}/agent.log")
        # Registered means it is running as it would on a node, not about to exit.
        end = time.monotonic() + 10
        while not self.nri.calls and time.monotonic() < end and self.proc.poll() is None:
            time.sleep(0.05)
        if not self.nri.calls or self.proc.poll() is not None:
            status = self.proc.poll()
            self.stop()
            raise RuntimeError(f"identity agent did not register with the NRI stand-in (status {status}); see {workdir}/agent.log")

    def stop(self) -> int | None:
        died = self.proc.poll()
        stop_process(self.proc)
        self.nri.stop()
        self.log.close()
        return died


def trust_limit_mib(binary: str, workdir: str) -> float | None:
    """The Deployment's memory limit `moat install` writes when images.trust is on."""
    cfg = os.path.join(workdir, "trust-limit.yaml")
    with open(cfg, "w") as f:
        f.write("images: {trust: {unmatched: pin}}\n")
    try:
        out = subprocess.run([binary, "install", "--config", cfg], capture_output=True, text=True, timeout=60).stdout
    except Exception:
        return None
    for doc in re.split(r"^---\s*$", out, flags=re.M):
        if re.search(r"^kind:\s*Deployment", doc, flags=re.M):
            m = re.search(r"\n(\s*)limits:\s*\n\1\s+memory:\s*['\"]?(\d+)Mi", doc)
            return float(m.group(2)) if m else None
    return None


def install_limits_mib(binary: str) -> tuple[float | None, float | None]:
    """The memory limits `moat install --identity-agent` writes: (Deployment, DaemonSet), MiB."""

    def parse(doc: str) -> float | None:
        m = re.search(r"\n(\s*)limits:\s*\n\1\s+memory:\s*['\"]?(\d+(?:\.\d+)?)(Ki|Mi|Gi|K|M|G)?", doc)
        if not m:
            return None
        scale = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "K": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20,
                 None: 1 / 2**20}
        return float(m.group(2)) * scale[m.group(3)]

    try:
        out = subprocess.run([binary, "install", "--identity-agent"], capture_output=True, text=True,
                             timeout=60).stdout
    except Exception:
        return None, None
    limits = {}
    for doc in re.split(r"^---\s*$", out, flags=re.M):
        kind = re.search(r"^kind:\s*(\S+)", doc, flags=re.M)
        if kind and kind.group(1) in ("Deployment", "DaemonSet"):
            limits[kind.group(1)] = parse(doc)
    return limits.get("Deployment"), limits.get("DaemonSet")


# ---------------------------------------------------------------------------------------------
# Image trust (issue 30): an HTTPS registry of the harness's own, signed images, moat's config.
# ---------------------------------------------------------------------------------------------

REGISTRY_DELAY_S = 0.02  # every answer of the fake registry, as if across a network
GOOD_NAMESPACE = "shop"


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=True).stdout


def _sha256(b: bytes) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(b).hexdigest()


class FakeRegistry:
    """An HTTPS distribution registry on loopback (threads, Python's ssl; certificates and the
    cosign key made with the openssl CLI): `shop/api` answers every tag with one image signed
    as `cosign sign` stores it (manifest, `sha256-<hex>.sig` manifest, payload blob); `junk/*`
    has no tag at all; `hostile/<kind>/*` answers as a tenant's registry trying to make moat hold
    memory (kind: token, hugetoken, challenge, huge, slow). Every answer waits REGISTRY_DELAY_S.
    """

    def __init__(self, workdir: str):
        import base64
        import http.server
        d = os.path.join(workdir, "registry")
        os.makedirs(d, exist_ok=True)
        ca_key, ca, key, csr, leaf = (os.path.join(d, n) for n in ("ca.key", "ca.pem", "leaf.key", "leaf.csr", "leaf.pem"))
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                 "-subj", "/CN=moat flood registry CA", "-keyout", ca_key, "-out", ca,
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=127.0.0.1",
                 "-keyout", key, "-out", csr)
        ext = os.path.join(d, "ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
        _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
                 "-out", leaf, "-extfile", ext)
        sign_key = os.path.join(d, "cosign.key")
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", sign_key)
        self.public_key = _openssl("ec", "-in", sign_key, "-pubout").decode()
        with open(ca) as f:
            self.ca = f.read()
        sock = socket.socket()
        sock.bind((HOST, 0))
        self.addr = f"{HOST}:{sock.getsockname()[1]}"
        sock.close()
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": "sha256:" + "1" * 64, "size": 2}, "layers": []}).encode()
        digest = _sha256(manifest)
        payload = json.dumps({"critical": {"identity": {"docker-reference": f"{self.addr}/shop/api"},
                                           "image": {"docker-manifest-digest": digest},
                                           "type": "cosign container image signature"}, "optional": None}).encode()
        payload_file = os.path.join(d, "payload")
        with open(payload_file, "wb") as f:
            f.write(payload)
        signature = _openssl("dgst", "-sha256", "-sign", sign_key, payload_file)
        sig_manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                   "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                                               "digest": _sha256(payload), "size": len(payload),
                                               "annotations": {"dev.cosignproject.cosign/signature":
                                                               base64.b64encode(signature).decode()}}]}).encode()
        self.paths = {
            f"/v2/shop/api/manifests/sha256-{digest[7:]}.sig": sig_manifest,
            f"/v2/shop/api/blobs/{_sha256(payload)}": payload,
        }
        self.manifest = manifest
        addr = self.addr
        big_token = json.dumps({"token": "t" * 250_000, "expires_in": 300}).encode()
        ok_token = json.dumps({"token": "t" * 16 * 1024, "expires_in": 300}).encode()
        chunk = b"{" * 65536
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                time.sleep(REGISTRY_DELAY_S)
                path = self.path
                if path.startswith("/token"):
                    return self._send(200, big_token if "huge" in path else ok_token)
                if path in registry.paths:
                    return self._send(200, registry.paths[path])
                if path.startswith("/v2/shop/api/manifests/"):
                    return self._send(200, registry.manifest, {"Docker-Content-Digest": digest})
                kind = path.split("/")[3] if path.startswith("/v2/hostile/") else ""
                if kind in ("token", "hugetoken"):
                    which = "huge" if kind == "hugetoken" else "ok"
                    return self._send(401, b"", {"WWW-Authenticate": f'Bearer realm="https://{addr}/token?{which}",service="s"'})
                if kind == "challenge":
                    return self._send(401, b"", {"WWW-Authenticate": 'Bearer realm="https://x/' + "c" * 60_000 + '"'})
                if kind in ("huge", "slow"):
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    if kind == "slow":
                        self.send_header("Content-Length", str(200 * 1024))
                    self.end_headers()
                    try:
                        for _ in range(160 if kind == "huge" else 40):
                            self.wfile.write(chunk if kind == "huge" else chunk[:1024])
                            if kind == "slow":
                                time.sleep(0.05)
                    except OSError:
                        pass
                    return
                return self._send(404)

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(leaf, key)
        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # moat hangs up on hostile answers mid-body: expected, not worth a traceback

        self.server = Server((HOST, int(self.addr.split(":")[1])), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def config(self, workdir: str) -> str:
        """moat's configuration: signatures required for shop/, pinned only for the rest of this
        registry, and any other registry pinned (`unmatched: pin`, so tenants may name their own)."""
        indent = lambda text, n: "".join(" " * n + l + "\n" for l in text.strip().splitlines())  # noqa: E731
        path = os.path.join(workdir, "trust.yaml")
        with open(path, "w") as f:
            f.write("images:\n  trust:\n    unmatched: pin\n    caCertificates: |\n" + indent(self.ca, 6)
                    + f"    rules:\n      - repositories: [{self.addr}/shop]\n        keys:\n"
                    + "          - name: flood\n            publicKey: |\n" + indent(self.public_key, 14)
                    + f"      - repositories: [{self.addr}/junk]\n        signatures: off\n")
        return path

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def pod_review(namespace: str, images: list[str], uid: str = "flood") -> bytes:
    """An AdmissionReview creating a pod in `namespace` with one container per image."""
    containers = [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "namespace": namespace, "operation": "CREATE",
                    "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                    "object": {"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": "p", "namespace": namespace},
                               "spec": {"containers": containers}}},
    }, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------
# Attacks. Each starts its own threads, sets `ready` once it is at full size, runs until stop(),
# then closes every socket it opened. summary() says what the attacker got.
# ---------------------------------------------------------------------------------------------


class Attack:
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(15)

    def summary(self) -> str:
        return ""


class Holder(Attack):
    """Holds many connections from many source addresses, one thread, nonblocking sockets and
    poll(): connect, optionally complete a TLS handshake, optionally send a few bytes, then stay
    silent. A connection the server closes is reopened a second later from the same address; with
    max_age, each connection is also replaced before it gets that old (to stay ahead of a
    server-side timeout). This is the shape of idle-tcp, idle-tls, slow-handshake and the
    unfinished-metrics attacks."""

    BATCH = 500  # sockets opened per loop turn while ramping up
    CONNECT_TIMEOUT_S = 3.0

    def __init__(self, port: int, addrs: list[str], per_addr: int, tls_ctx: ssl.SSLContext | None = None,
                 payload: bytes = b"", max_age: float | None = None, reopen_rate: float = 1000):
        super().__init__()
        self.port, self.tls_ctx, self.payload, self.max_age = port, tls_ctx, payload, max_age
        # Once at full size, connections are reopened at most this many per second: enough to keep
        # the slots filled, bounded so the harness leaves the CPU to moat (2-core machine).
        self.reopen_rate = reopen_rate
        self.slots = [a for a in addrs for _ in range(per_addr)]
        self.stats = collections.Counter()
        self.peak_held = 0
        self.held_at_end = 0
        self.threads = [threading.Thread(target=self._run, daemon=True)]

    def _run(self) -> None:
        poller = select.poll()
        conns: dict[int, list] = {}  # fd -> [sock, slot, state, born]
        pending = collections.deque(range(len(self.slots)))
        retry = collections.deque()  # (time, slot): reopened a second after the server closed it
        first_pass_at = None
        tokens, last, last_scan = 0.0, time.monotonic(), 0.0
        OPEN_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | 0x2000  # POLLRDHUP

        def drop(fd: int, requeue: bool) -> None:
            sock, slot = conns[fd][0], conns[fd][1]
            poller.unregister(fd)
            del conns[fd]
            sock.close()
            if requeue:
                retry.append((time.monotonic() + 1.0, slot))

        def opened(fd: int) -> None:
            c = conns[fd]
            c[2] = "open"
            poller.modify(fd, OPEN_EVENTS)
            if self.payload:
                try:
                    c[0].send(self.payload)
                except (OSError, ssl.SSLError):
                    pass

        def handshake(fd: int) -> None:
            sock = conns[fd][0]
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                poller.modify(fd, select.POLLIN)
                return
            except ssl.SSLWantWriteError:
                poller.modify(fd, select.POLLOUT)
                return
            except (OSError, ssl.SSLError):
                self.stats["closed by server during TLS handshake"] += 1
                drop(fd, True)
                return
            self.stats["TLS handshakes completed"] += 1
            opened(fd)

        while not self.stop_event.is_set():
            now = time.monotonic()
            while retry and retry[0][0] <= now:
                pending.append(retry.popleft()[1])
            if first_pass_at is None:
                allowed = self.BATCH
            else:
                tokens = min(self.reopen_rate, tokens + (now - last) * self.reopen_rate)
                allowed = min(self.BATCH, int(tokens))
                tokens -= min(allowed, len(pending))
            last = now
            for _ in range(min(allowed, len(pending))):
                slot = pending.popleft()
                try:
                    s = bound_socket(self.slots[slot])
                    s.setblocking(False)
                    s.connect_ex((HOST, self.port))
                except OSError:
                    self.stats["local errors"] += 1
                    retry.append((now + 1.0, slot))
                    continue
                self.stats["connections opened"] += 1
                conns[s.fileno()] = [s, slot, "connecting", now]
                poller.register(s.fileno(), select.POLLOUT)
            if not pending and first_pass_at is None:
                first_pass_at = now
            for fd, ev in poller.poll(50 if pending else 100):
                if fd not in conns:
                    continue
                sock, slot, state, _born = conns[fd]
                if state == "connecting":
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self.stats["connect failed"] += 1
                        drop(fd, True)
                    elif self.tls_ctx is not None:
                        tls = self.tls_ctx.wrap_socket(sock, server_hostname="localhost",
                                                       do_handshake_on_connect=False)
                        conns[fd][0] = tls
                        conns[fd][2] = "handshaking"
                        handshake(fd)
                    else:
                        opened(fd)
                elif state == "handshaking":
                    handshake(fd)
                else:  # open: the server sent something (a TLS session ticket, an answer) or closed
                    try:
                        data = sock.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                        continue
                    except (OSError, ssl.SSLError):
                        data = b""
                    if not data:
                        self.stats["closed by server"] += 1
                        drop(fd, True)
            # Four times a second: connections stuck connecting (accept queue full) and, with
            # max_age, old ones are replaced.
            now = time.monotonic()
            if now - last_scan < 0.25:
                continue
            last_scan = now
            for fd, (sock, slot, state, born) in list(conns.items()):
                if state == "connecting" and now - born > self.CONNECT_TIMEOUT_S:
                    self.stats["connect timed out"] += 1
                    drop(fd, False)
                    pending.append(slot)
                elif self.max_age is not None and now - born > self.max_age:
                    self.stats["renewed before timeout"] += 1
                    drop(fd, False)
                    pending.append(slot)
            held = sum(1 for c in conns.values() if c[2] == "open")
            self.peak_held = max(self.peak_held, held)
            if (not self.ready.is_set() and first_pass_at is not None
                    and (all(c[2] == "open" for c in conns.values()) or now - first_pass_at > 3.0)):
                self.ready.set()
        self.held_at_end = sum(1 for c in conns.values() if c[2] == "open")
        self.peak_held = max(self.peak_held, self.held_at_end)
        for fd in list(conns):
            drop(fd, False)

    def summary(self) -> str:
        s = self.stats
        # Open as the attacker sees it: established and not closed by the server (some may still
        # wait in the listen backlog, not yet accepted by moat; moat's fds say what it holds).
        parts = [f"{self.held_at_end} open at end (peak {self.peak_held}) of {len(self.slots)} slots",
                 f"{s['connections opened']} opened"]
        for k in ("TLS handshakes completed", "closed by server", "closed by server during TLS handshake",
                  "renewed before timeout", "connect failed", "connect timed out", "local errors"):
            if s[k]:
                parts.append(f"{s[k]} {k}")
        return "attacker: " + ", ".join(parts)


# --- HTTP/2 by hand ---------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_DATA, H2_HEADERS, H2_RST_STREAM, H2_SETTINGS, H2_PING, H2_GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
H2_END_STREAM, H2_ACK, H2_END_HEADERS = 0x1, 0x1, 0x4
H2_MAX_CONCURRENT_STREAMS = 0x3


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream & 0x7FFFFFFF) + payload


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 5.1: an integer with an N-bit prefix; `first` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name: str, value: str) -> bytes:
    """RFC 7541 6.2.2: literal header field without indexing, new name, no Huffman coding."""
    n, v = name.encode(), value.encode()
    return b"\x00" + hpack_int(len(n), 7) + n + hpack_int(len(v), 7) + v


class H2Streams(Attack):
    """Body-less HTTP/2 requests: each connection opens as many streams as the server allows, each a
    POST /mutate announcing a 1,000,000-byte body that never comes. A server that takes a request
    slot before the body arrives gives these streams every slot; one reopened as soon as the
    server answers or resets it keeps the slots taken."""

    def __init__(self, port: int, addrs: list[str], conns_per_addr: int = 2, streams: int = 200):
        super().__init__()
        self.port, self.streams = port, streams
        self.block = b"".join(hpack_literal(k, v) for k, v in [
            (":method", "POST"), (":scheme", "https"), (":path", "/mutate"), (":authority", "localhost"),
            ("content-type", "application/json"), ("content-length", "1000000")])
        self.lock = threading.Lock()
        self.stats = collections.Counter()
        self.open_now: dict[int, int] = {}
        self.peak_open = 0
        self.max_streams_seen = set()
        self.started = 0
        self.total = len(addrs) * conns_per_addr
        self.threads = [threading.Thread(target=self._conn, args=(a, i), daemon=True)
                        for a in addrs for i in range(conns_per_addr)]

    def _count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n

    def _conn(self, src: str, i: int) -> None:
        ident = threading.get_ident()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        while not self.stop_event.is_set():
            try:
                raw = socket.create_connection((HOST, self.port), timeout=5, source_address=(src, 0))
                s = ctx.wrap_socket(raw, server_hostname="localhost")
            except (OSError, ssl.SSLError):
                self._count("connections failed")
                self.stop_event.wait(1)
                continue
            if s.selected_alpn_protocol() != "h2":
                self._count("no h2 by ALPN")
                s.close()
                return
            self._count("connections made")
            self._session(s, ident)
            s.close()
            with self.lock:
                self.open_now[ident] = 0
            self.stop_event.wait(0.5)

    def _session(self, s: ssl.SSLSocket, ident: int) -> None:
        # Our receive windows made huge so the server's answers never stall on flow control.
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, 2**31 - 1)  # no push; window
        s.sendall(H2_PREFACE + h2_frame(H2_SETTINGS, 0, 0, settings)
                  + h2_frame(0x8, 0, 0, struct.pack(">I", 2**31 - 1 - 65535)))
        s.settimeout(0.2)
        next_id, open_streams, limit, buf = 1, set(), self.streams, b""
        refused_recently = False
        opened_once = False
        # The server's SETTINGS come first: open no more streams than it says it takes.
        settings_seen, deadline = False, time.monotonic() + 2
        while not self.stop_event.is_set():
            # Streams still open after the server had a turn to answer or reset them.
            with self.lock:
                self.open_now[ident] = len(open_streams)
                self.peak_open = max(self.peak_open, sum(self.open_now.values()))
            # Top up to the limit (skipped for one turn after a refusal, so no hot loop).
            if (settings_seen or time.monotonic() >= deadline) and not refused_recently:
                out = []
                while len(open_streams) < limit and next_id < 2**31:
                    out.append(h2_frame(H2_HEADERS, H2_END_HEADERS, next_id, self.block))
                    open_streams.add(next_id)
                    next_id += 2
                if out:
                    try:
                        s.sendall(b"".join(out))
                    except (OSError, ssl.SSLError):
                        return
                    self._count("streams opened", len(out))
            refused_recently = False
            if not opened_once and next_id > 1:
                opened_once = True
                with self.lock:
                    self.started += 1
                    if self.started >= self.total:
                        self.ready.set()
            try:
                data = s.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            except (OSError, ssl.SSLError):
                self._count("connections closed by server")
                return
            if not data:
                self._count("connections closed by server")
                return
            buf += data
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length:
                    break
                kind, flags = buf[3], buf[4]
                stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                payload, buf = buf[9:9 + length], buf[9 + length:]
                reply = b""
                if kind == H2_SETTINGS and not flags & H2_ACK:
                    settings_seen = True
                    for off in range(0, len(payload) - 5, 6):
                        key, val = struct.unpack(">HI", payload[off:off + 6])
                        if key == H2_MAX_CONCURRENT_STREAMS:
                            limit = min(self.streams, val)
                            with self.lock:
                                self.max_streams_seen.add(val)
                    reply = h2_frame(H2_SETTINGS, H2_ACK, 0)
                elif kind == H2_PING and not flags & H2_ACK:
                    reply = h2_frame(H2_PING, H2_ACK, 0, payload)
                elif kind in (H2_HEADERS, H2_DATA) and flags & H2_END_STREAM and stream in open_streams:
                    open_streams.discard(stream)
                    self._count("streams answered by server")
                elif kind == H2_RST_STREAM and stream in open_streams:
                    open_streams.discard(stream)
                    code = struct.unpack(">I", payload[:4])[0] if len(payload) >= 4 else -1
                    self._count(f"streams reset (code {code})")
                    refused_recently = True
                elif kind == H2_GOAWAY:
                    self._count("GOAWAY")
                if reply:
                    try:
                        s.sendall(reply)
                    except (OSError, ssl.SSLError):
                        return

    def summary(self) -> str:
        with self.lock:
            s = dict(self.stats)
        adv = ",".join(str(v) for v in sorted(self.max_streams_seen)) or "none"
        parts = [f"{self.total} conns, peak {self.peak_open} streams open without a body "
                 f"(server max concurrent streams {adv})"]
        parts += [f"{v} {k}" for k, v in sorted(s.items())]
        return "attacker: " + ", ".join(parts)


class TrickleBodies(Attack):
    """Near-limit HTTP/1.1 bodies held open: each request announces Content-Length just under the
    4 MiB body limit, sends all but the last few bytes at once and then waits. A server that
    buffers bodies holds ~4 MiB per request; 120+ of them exceed the installed memory limit. When
    the server answers or closes (body timeout), the request is sent again."""

    BODY_LEN = 4 * 1024 * 1024 - 100
    HOLD_BACK = 5

    def __init__(self, port: int, addrs: list[str], per_addr: int = 32):
        super().__init__()
        self.port = port
        self.lock = threading.Lock()
        self.stats = collections.Counter()
        self.holding = 0
        self.peak_holding = 0
        self.total = len(addrs) * per_addr
        self.done_first = 0
        self.chunk = b" " * 65536
        self.threads = [threading.Thread(target=self._one, args=(a,), daemon=True)
                        for a in addrs for _ in range(per_addr)]

    def _count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n

    def _first_done(self) -> None:
        with self.lock:
            self.done_first += 1
            if self.done_first >= self.total:
                self.ready.set()

    def _one(self, src: str) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        head = (f"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                f"Content-Length: {self.BODY_LEN}\r\n\r\n").encode()
        first = True
        while not self.stop_event.is_set():
            holding, raw, s = False, None, None
            try:
                raw = socket.create_connection((HOST, self.port), timeout=10, source_address=(src, 0))
                s = ctx.wrap_socket(raw, server_hostname="localhost")
                s.sendall(head)
                left = self.BODY_LEN - self.HOLD_BACK
                while left > 0 and not self.stop_event.is_set():
                    n = min(left, len(self.chunk))
                    s.sendall(self.chunk[:n])
                    left -= n
                self._count("bodies sent but for the last bytes")
                with self.lock:
                    self.holding += 1
                    self.peak_holding = max(self.peak_holding, self.holding)
                holding = True
                if first:
                    first = False
                    self._first_done()
                s.settimeout(0.25)
                answer = b""
                while not self.stop_event.is_set():
                    try:
                        data = s.recv(4096)
                    except socket.timeout:
                        continue
                    if not data:
                        break
                    answer += data
                    if b"\r\n" in answer:
                        break
                if answer:
                    self._count(f"answered {answer.split(b' ', 2)[1].decode(errors='replace')}"
                                if answer.startswith(b"HTTP/") else "answered ?")
                elif not self.stop_event.is_set():
                    self._count("closed by server")
            except (OSError, ssl.SSLError) as e:
                self._count(f"{type(e).__name__}")
                if first:
                    first = False
                    self._first_done()
            finally:
                for sock in (s, raw):  # raw is detached once wrapped; closing it is harmless
                    if sock is not None:
                        sock.close()
                if holding:
                    with self.lock:
                        self.holding -= 1
            # Renewed once a second at most: the attack stays sustained, the harness's TLS
            # encryption of 4 MiB bodies stays a modest share of the 2 cores.
            self.stop_event.wait(1.0)

    def summary(self) -> str:
        with self.lock:
            s = dict(self.stats)
        return (f"attacker: {self.total} requests, peak {self.peak_holding} held with "
                f"{self.BODY_LEN - self.HOLD_BACK} of {self.BODY_LEN} body bytes sent, "
                + ", ".join(f"{v} {k}" for k, v in sorted(s.items())))


class RequestFlood(Attack):
    """Well-formed reviews as fast as 8 threads from one address can send them (HTTP/1.1
    keep-alive, 16 requests pipelined per write so that Python is not the bottleneck): one tenant
    trying to take the server's CPU and request slots. A fair server serves the other sources
    first-come, whatever this one sends."""

    PIPELINE = 16

    def __init__(self, port: int, src: str, body: bytes, threads: int = 8):
        super().__init__()
        self.port, self.src = port, src
        req = (f"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.batch = req * self.PIPELINE
        self.lock = threading.Lock()
        self.stats = collections.Counter()
        self.t0 = self.t1 = 0.0
        self.threads = [threading.Thread(target=self._one, daemon=True) for _ in range(threads)]

    def start(self) -> None:
        self.t0 = time.monotonic()
        super().start()
        self.ready.set()

    def stop(self) -> None:
        super().stop()
        self.t1 = time.monotonic()

    def _one(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        status_re = re.compile(rb"HTTP/1\.1 (\d{3})")
        while not self.stop_event.is_set():
            try:
                raw = socket.create_connection((HOST, self.port), timeout=10, source_address=(self.src, 0))
                s = ctx.wrap_socket(raw, server_hostname="localhost")
                while not self.stop_event.is_set():
                    s.sendall(self.batch)
                    got, buf, codes = 0, b"", collections.Counter()
                    while got < self.PIPELINE:
                        data = s.recv(262144)
                        if not data:
                            raise ConnectionResetError("closed")
                        buf += data
                        while True:  # one whole response at a time: headers, then Content-Length bytes
                            end = buf.find(b"\r\n\r\n")
                            if end < 0:
                                break
                            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", buf[:end])
                            blen = int(m.group(1)) if m else 0
                            if len(buf) < end + 4 + blen:
                                break
                            sm = status_re.match(buf)
                            codes[sm.group(1).decode() if sm else "?"] += 1
                            buf = buf[end + 4 + blen:]
                            got += 1
                    with self.lock:
                        for k, v in codes.items():
                            self.stats[f"HTTP {k}"] += v
            except (OSError, ssl.SSLError) as e:
                with self.lock:
                    self.stats[type(e).__name__] += 1
                self.stop_event.wait(0.2)

    def summary(self) -> str:
        with self.lock:
            s = dict(self.stats)
        n = sum(v for k, v in s.items() if k.startswith("HTTP "))
        rate = n / (self.t1 - self.t0) if self.t1 > self.t0 else 0
        return (f"attacker: {len(self.threads)} threads from {self.src}, {n} answers ({rate:.0f}/s): "
                + ", ".join(f"{v} {k}" for k, v in sorted(s.items())))


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------

class RegistryReviews(Attack):
    """Reviews from tenant namespaces whose pods make moat ask registries: `threads` threads, each
    sending pods of `images(thread, round)` in namespace `namespace(thread)`, as fast as the
    answers come back (the API server in front sends the next after an answer)."""

    def __init__(self, port: int, src: str, threads: int, namespace, images):
        super().__init__()
        self.port, self.src, self.namespace, self.images = port, src, namespace, images
        self.stats = collections.Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._one, args=(i,), daemon=True) for i in range(threads)]

    def _one(self, i: int) -> None:
        ctx = tls_attack_ctx()
        ctx.set_alpn_protocols(["http/1.1"])
        rounds = 0
        while not self.stop_event.is_set():
            body = pod_review(self.namespace(i), self.images(i, rounds))
            try:
                conn = http.client.HTTPSConnection(HOST, self.port, context=ctx, timeout=CLIENT_TIMEOUT_S,
                                                   source_address=(self.src, 0))
                conn.request("POST", "/mutate", body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                allowed = json.loads(r.read()).get("response", {}).get("allowed")
                conn.close()
                with self.lock:
                    self.stats["allowed" if allowed else "denied"] += 1
            except Exception as e:
                with self.lock:
                    self.stats[type(e).__name__] += 1
                time.sleep(0.1)
            rounds += 1
            if rounds >= 2:
                self.ready.set()

    def summary(self) -> str:
        return "attacker reviews: " + ", ".join(f"{v} {k}" for k, v in sorted(self.stats.items()))


def registry_attack(name: str, no: int, port: int, registry: FakeRegistry) -> Attack:
    src = attack_addr(no, 0)
    reg = registry.addr
    if name == "registry-missing-tags":
        # Issue 30, item 2: 8 reviews at a time of 256 tags that do not exist (new ones every
        # round, so nothing is cached), at the registry the good namespace's signed images
        # come from.
        return RegistryReviews(port, src, 8, lambda i: "evil",
                               lambda i, r: [f"{reg}/junk/x:miss-{i}-{r}-{k}" for k in range(256)])
    if name == "registry-hostile":
        # Issue 30, item 3: 20 namespaces asking the tenant's registry for distinct repositories
        # whose answers are 250 KB tokens, 16 KiB tokens (kept), 60 KB challenges, 10 MiB
        # manifests without a length and slow bodies.
        kinds = ["token", "hugetoken", "challenge", "huge", "slow"]
        return RegistryReviews(port, src, 20, lambda i: f"evil-{i}",
                               lambda i, r: [f"{reg}/hostile/{kinds[(i + k) % 5]}/r{r}-n{i}-{k}:1" for k in range(64)])
    if name == "registry-cache-flush":
        # Issue 30, item 4: references that already name a digest under `unmatched: pin` (no
        # lookup at all), 256 new ones a review; before, each was a cache entry, oldest first out.
        return RegistryReviews(port, src, 4, lambda i: "evil",
                               lambda i, r: [f"{reg}/x{k}@sha256:{i:08x}{r:024x}{k:032x}" for k in range(256)])
    raise ValueError(name)


ATTACKS = ["idle-tcp", "idle-tls", "slow-handshake", "h2-streams", "trickle-bodies",
           "metrics-unfinished", "agent-metrics-unfinished", "request-flood",
           "registry-missing-tags", "registry-hostile", "registry-cache-flush"]
REGISTRY_ATTACKS = {"registry-missing-tags", "registry-hostile", "registry-cache-flush"}
# With a registry call in every good review the goal is the registry budget (REGISTRY_BUDGET,
# moat-server/src/limits.rs), inside the webhook timeout; a cached one must stay at the usual goal.
GOAL_REGISTRY_P99_MS = 2000.0


def tls_attack_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def make_attack(name: str, no: int, port: int, mport: int, aport: int, body: bytes) -> Attack:
    addrs = lambda n: [attack_addr(no, i) for i in range(n)]  # noqa: E731
    unfinished_get = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
    if name == "idle-tcp":
        # More idle connections than the server holds in all (4,096), spread below the per-source
        # cap (128): a cap per source alone does not stop it; the server must still let the API
        # server in. Reopened when closed (the server's handshake timeout), so they stay held.
        return Holder(port, addrs(60), 100)
    if name == "idle-tls":
        # Completed handshakes, then silence: each costs the server a TLS session; 4,400 from 44
        # addresses fill the total cap without exceeding any per-source cap (issue 15, item 4).
        return Holder(port, addrs(44), 100, tls_ctx=tls_attack_ctx(), reopen_rate=250)
    if name == "slow-handshake":
        # The first 3 bytes of a TLS record and nothing more, each connection replaced before the
        # 5 s handshake timeout would close it: connections that never finish a handshake and
        # are never timed out. 4,500 from 45 addresses: more than the total cap, below the
        # per-source cap, so only a server that lets a new connection in at the cap survives it.
        return Holder(port, addrs(45), 100, payload=b"\x16\x03\x01", max_age=4.0, reopen_rate=1200)
    if name == "h2-streams":
        # Request slots held by streams without a body (issue 15, item 1): 2 HTTP/2 connections
        # from each of 3 addresses, up to 200 streams each.
        return H2Streams(port, addrs(3), conns_per_addr=2, streams=200)
    if name == "trickle-bodies":
        # Memory held by buffered bodies (issue 15, item 2): 128 near-4 MiB bodies from 4
        # addresses, all but 5 bytes sent.
        return TrickleBodies(port, addrs(4), per_addr=32)
    if name == "metrics-unfinished":
        # The metrics port (issue 15, item 3): 10,000 connections from 100 addresses, each with a
        # request line and a header but never the blank line that ends the request.
        return Holder(mport, addrs(100), 100, payload=unfinished_get)
    if name == "agent-metrics-unfinished":
        # The same against the identity agent's metrics port: an agent killed for memory is an
        # unregistered NRI plugin, and containers then start without identity.
        return Holder(aport, addrs(100), 100, payload=unfinished_get)
    if name == "request-flood":
        # One source, 8 threads, well-formed reviews as fast as they go.
        return RequestFlood(port, attack_addr(no, 0), body, threads=8)
    raise ValueError(name)


def fmt_ms(v: float) -> str:
    return "n/a" if v != v else f"{v:.1f}"


def fmt_client(label: str, s: dict) -> str:
    text = f"{label} {s['pct']:.2f}% ({s['ok']}/{s['n']}) p50 {fmt_ms(s['p50'])} ms p99 {fmt_ms(s['p99'])} ms max {fmt_ms(s['max'])} ms"
    if s["errors"]:
        top = sorted(s["errors"].items(), key=lambda kv: -kv[1])[:3]
        text += " [" + ", ".join(f"{v} {k}" for k, v in top) + "]"
    if s["idle_closed"]:
        text += f" ({s['idle_closed']} kept-alive connections closed by the server while idle, redialled)"
    return text


def client_ok(s: dict) -> bool:
    return s["n"] > 0 and s["pct"] >= GOAL_SUCCESS and s["p99"] <= GOAL_P99_MS


def mib_text(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.0f}"


def run_one(name: str, no: int, opts, body: bytes, moat_limit: float | None, agent_limit: float | None,
            workdir: str) -> tuple[str, bool, list[str]]:
    """One attack (or the baseline) against a fresh moat: its line, whether it met the goals, and
    moat's refusal counters afterwards."""
    registry = FakeRegistry(workdir) if name in REGISTRY_ATTACKS else None
    try:
        moat = Moat(opts.bin, workdir, opts.port, opts.metrics_port,
                    config=registry.config(workdir) if registry else None)
    except Exception:
        if registry is not None:
            registry.stop()
        raise
    agent = sampler = attack = None
    p99_goal = GOAL_P99_MS
    try:
        review = {"kind": "review", "port": opts.port, "ca": moat.ca, "src": GOOD_REVIEW_SRC,
                  "path": "/mutate", "body": body, "rate": opts.rate, "reconnect": 20}
        if registry is not None:
            cached = name == "registry-cache-flush"
            tag = "fresh-0" if cached else "fresh-@FRESH@"
            review.update(body=pod_review(GOOD_NAMESPACE, [f"{registry.addr}/shop/api:{tag}"]),
                          fresh=not cached, want_allowed=True, rate=min(opts.rate, 10))
            if not cached:
                p99_goal = GOAL_REGISTRY_P99_MS
        clients = {"review": review}
        pids = {"moat": moat.proc.pid}
        if name == "metrics-unfinished":
            clients["scrape"] = {"kind": "scrape", "port": opts.metrics_port, "src": GOOD_SCRAPE_SRC,
                                 "rate": 10, "reconnect": 20}
        if name == "agent-metrics-unfinished":
            try:
                agent = Agent(opts.bin, workdir, opts.agent_metrics_port)
            except RuntimeError as e:
                return f"{name:<25} SKIPPED (counted as failed): the identity agent could not be started: {e}", False, []
            clients["agent"] = {"kind": "scrape", "port": opts.agent_metrics_port, "src": GOOD_AGENT_SCRAPE_SRC,
                                "rate": 10, "reconnect": 20}
            pids["agent"] = agent.proc.pid
        sampler = Sampler(pids)
        sampler.start()
        if registry is not None:
            attack = registry_attack(name, no, opts.port, registry)
            attack.start()
            if not attack.ready.wait(RAMP_MAX_S):
                print(f"  ({name}: not at full size after {RAMP_MAX_S:.0f} s; measuring anyway)", flush=True)
        elif name != "baseline":
            attack = make_attack(name, no, opts.port, opts.metrics_port, opts.agent_metrics_port, body)
            attack.start()
            if not attack.ready.wait(RAMP_MAX_S):
                print(f"  ({name}: not at full size after {RAMP_MAX_S:.0f} s; measuring anyway)", flush=True)
        results = {k: summarize(v) for k, v in measure(clients, opts.seconds).items()}
        attack_summary = ""
        if attack is not None:
            attack.stop()
            attack_summary = attack.summary()
            attack = None
        time.sleep(0.3)
        sampler.stop()
        refusals = moat.refusal_counters()
    finally:
        if attack is not None:
            attack.stop()
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        moat_died = moat.stop()
        agent_died = agent.stop() if agent is not None else None
        if registry is not None:
            registry.stop()

    rss = sampler.peak_rss["moat"] / 1024
    if registry is not None:
        # The memory limit `moat install` writes with images.trust on.
        moat_limit = opts.trust_limit
    review_ok = results["review"]["n"] > 0 and results["review"]["pct"] >= GOAL_SUCCESS \
        and results["review"]["p99"] <= p99_goal
    ok = review_ok and (moat_limit is None or rss < moat_limit) and moat_died is None
    line = (f"{name:<25} {fmt_client('good', results['review'])} | moat RSS peak {rss:.0f} MiB "
            f"(start {sampler.start_rss['moat'] / 1024:.0f}), fds peak {sampler.peak_fds['moat']}, "
            f"CPU s: moat {sampler.cpu['moat']:.1f}, attacker {sampler.own_cpu:.1f}")
    if moat_died is not None:
        line += f" | moat EXITED with status {moat_died} during the attack"
    if "scrape" in results:
        ok = ok and client_ok(results["scrape"])
        line += f" | {fmt_client('scraper', results['scrape'])}"
    if "agent" in results:
        arss = sampler.peak_rss["agent"] / 1024
        ok = ok and client_ok(results["agent"]) and (agent_limit is None or arss < agent_limit) \
            and agent_died is None
        line += (f" | {fmt_client('agent scraper', results['agent'])}, agent RSS peak {arss:.0f} MiB "
                 f"(start {sampler.start_rss['agent'] / 1024:.0f}), fds peak {sampler.peak_fds['agent']}")
        if agent_died is not None:
            line += f", agent EXITED with status {agent_died}"
    if attack_summary:
        line += f" | {attack_summary}"
    line += f" | goal: {GOAL_SUCCESS:.0f}% success, p99 <= {p99_goal:.0f} ms, RSS < {mib_text(moat_limit)} MiB"
    if "scrape" in results:
        line += ", scraper 100% success, p99 <= 100 ms"
    if "agent" in results:
        line += f", agent scraper 100% success, p99 <= 100 ms, agent RSS < {mib_text(agent_limit)} MiB"
    line += " | " + ("PASS" if ok else "FAIL")
    return line, ok, refusals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the moat binary")
    ap.add_argument("--review", default=None, help="AdmissionReview JSON sent by the good client")
    ap.add_argument("--port", type=int, default=int(os.environ.get("FLOOD_PORT", 18743)))
    ap.add_argument("--metrics-port", type=int, default=int(os.environ.get("FLOOD_METRICS_PORT", 19743)))
    ap.add_argument("--agent-metrics-port", type=int, default=int(os.environ.get("FLOOD_AGENT_METRICS_PORT", 19744)))
    ap.add_argument("--rate", type=float, default=float(os.environ.get("FLOOD_GOOD_RATE", 50)),
                    help="good client's reviews per second (default 50)")
    ap.add_argument("args", nargs="*", metavar="[SECONDS] [ATTACK...]")
    opts = ap.parse_args()

    seconds, names = 10.0, []
    for i, a in enumerate(opts.args):
        if i == 0 and re.fullmatch(r"\d+(\.\d+)?", a):
            seconds = float(a)
        elif a in ATTACKS:
            names.append(a)
        else:
            ap.error(f"unknown attack '{a}'; attacks: {' '.join(ATTACKS)}")
    names = names or ATTACKS
    opts.seconds = seconds

    nofile = raise_nofile()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    review_path = opts.review or os.path.join(root, "crates/moat-server/tests/data/pod-create-isolated.json")
    with open(review_path) as f:
        body = json.dumps(json.load(f), separators=(",", ":")).encode()
    moat_limit, agent_limit = install_limits_mib(opts.bin)
    opts.trust_limit = trust_limit_mib(opts.bin, workdir_for_limits := tempfile.mkdtemp(prefix="moat-flood-limit-"))
    shutil.rmtree(workdir_for_limits, ignore_errors=True)
    print(f"moat flood: {opts.bin}, {seconds:g} s per attack, good client {opts.rate:g} reviews/s from "
          f"{GOOD_REVIEW_SRC} (HTTP/1.1 keep-alive, new connection every 20), review {len(body)} bytes, "
          f"descriptor limit {nofile}; installed memory limits: moat {mib_text(moat_limit)} MiB, "
          f"agent {mib_text(agent_limit)} MiB", flush=True)

    workdir = tempfile.mkdtemp(prefix="moat-flood-")
    failed = False
    counters: list[tuple[str, list[str]]] = []

    for no, name in enumerate(["baseline"] + names):
        try:
            line, ok, refusals = run_one(name, no, opts, body, moat_limit, agent_limit, workdir)
        except Exception as e:  # a broken run is a failed line, never a missing one
            line, ok, refusals = f"{name:<25} FAIL: the run itself failed: {type(e).__name__}: {e}", False, []
        counters.append((name, refusals))
        failed = failed or not ok
        print(line, flush=True)

    print("refusal counters scraped from moat's metrics port at the end of each run "
          "(lines starting moat_ with refus/budget/displac):")
    for name, lines in counters:
        print(f"  {name}: " + ("; ".join(lines) if lines else "(none)"))
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
