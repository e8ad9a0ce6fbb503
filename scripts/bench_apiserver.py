#!/usr/bin/env python3
"""Pod CREATEs through a real kube-apiserver, one after another, timed from the client.

    bench_apiserver.py DIR NAMESPACE COUNT

DIR is a control plane of scripts/start-test-kube.sh (its admin certificate and CA). Creates
COUNT pods in NAMESPACE over one keep-alive HTTPS connection, each pinned and runtime-less
(moat, when installed, sets the runtime), and prints one line of JSON: the count, and the
p50, p90 and p99 in milliseconds.
"""
import http.client
import json
import re
import ssl
import sys
import time


def main():
    directory, namespace, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    kubeconfig = open(f"{directory}/admin.kubeconfig").read()
    server = re.search(r'server: "https://([^"]+)"', kubeconfig).group(1)
    host, port = server.rsplit(":", 1)
    context = ssl.create_default_context(cafile=f"{directory}/pki/ca.crt")
    context.load_cert_chain(f"{directory}/pki/admin.crt", f"{directory}/pki/admin.key")
    connection = http.client.HTTPSConnection(host, int(port), context=context)
    times = []
    for i in range(count):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"bench-{i}"},
            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1.0"}]},
        }
        body = json.dumps(pod)
        start = time.perf_counter()
        connection.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/pods",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        answer = response.read()
        times.append((time.perf_counter() - start) * 1000)
        if response.status != 201:
            sys.exit(f"pod {i}: HTTP {response.status}: {answer[:400]!r}")
    times.sort()

    def at(q):
        return round(times[min(len(times) - 1, int(q * len(times)))], 2)

    print(json.dumps({"count": count, "p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99)}))


if __name__ == "__main__":
    main()
