#!/usr/bin/env bash
# Latency moat adds to a pod's creation through a real kube-apiserver: a benchmark, not a test.
#
#   scripts/bench-apiserver.sh [VERSION] [COUNT]     (defaults: v1.37.2, 500)
#
# Starts a control plane (scripts/start-test-kube.sh) and `moat serve` (release build) on
# loopback, then creates COUNT pods one after another (scripts/bench_apiserver.py) twice in
# fresh namespaces: without moat, then with the default `moat install` applied and its webhooks
# pointed at the local moat by `url:` (its self-signed CA as their caBundle). Prints both
# rounds' p50/p90/p99, what moat added, and the webhook calls per pod from moat's metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-v1.37.2}
count=${2:-500}
work=$(mktemp -d /tmp/moat-bench-apiserver.XXXXXX)
pids=""
cleanup() {
  for pid in $pids; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --locked -q -p moat
moat=target/release/moat
pids=$(scripts/start-test-kube.sh "$work/kube" "$version")
. "$work/kube/env"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); metrics=$(free_port)
"$moat" serve --self-signed --ca-out "$work/ca.pem" --addr "127.0.0.1:$port" \
  --metrics-addr "127.0.0.1:$metrics" --kubeconfig "$KUBECONFIG" --log-level warn \
  >"$work/moat.log" 2>&1 &
pids="$pids $!"
for _ in $(seq 1 100); do [ -s "$work/ca.pem" ] && break; sleep 0.1; done
[ -s "$work/ca.pem" ] || { cat "$work/moat.log" >&2; exit 1; }

round() { # NAMESPACE
  kubectl create namespace "$1" >/dev/null
  until kubectl get serviceaccount default -n "$1" >/dev/null 2>&1; do sleep 0.2; done
  python3 scripts/bench_apiserver.py "$work/kube" "$1" "$count"
}
calls() { curl -s "http://127.0.0.1:$metrics/metrics" | awk '/^moat_admission_requests_total/ {n += $NF} END {print n + 0}'; }

without=$(round bench-without)
# moat's install, its webhooks calling the local moat (the in-cluster Service has no kubelet
# to run it here).
"$moat" install 2>/dev/null | kubectl create --dry-run=client -o json -f - | python3 -c '
import base64, json, sys
ca = base64.b64encode(open(sys.argv[1], "rb").read()).decode()
text, objects, at = sys.stdin.read(), [], 0
decoder = json.JSONDecoder()
while text[at:].strip():  # kubectl prints one JSON document per object
    o, at = decoder.raw_decode(text, len(text) - len(text[at:].lstrip()))
    objects.append(o)
for o in objects:
    for w in o.get("webhooks", []) if o["kind"].endswith("WebhookConfiguration") else []:
        path = w["clientConfig"]["service"]["path"]
        w["clientConfig"] = {"url": f"https://127.0.0.1:{sys.argv[2]}{path}", "caBundle": ca}
json.dump({"apiVersion": "v1", "kind": "List", "items": objects}, sys.stdout)
' "$work/ca.pem" "$port" | kubectl apply -f - >/dev/null
sleep 2 # the API server loads webhook configurations and policies asynchronously
before=$(calls)
with=$(round bench-with)
after=$(calls)
# Proof that moat answered: its mutation is on the pods (the fallback runtime).
got=$(kubectl get pod bench-0 -n bench-with -o jsonpath='{.spec.runtimeClassName}')
[ "$got" = gvisor ] || { echo "bench-apiserver: moat did not mutate the pods (runtimeClassName '$got')" >&2; exit 1; }
python3 - "$without" "$with" "$before" "$after" "$count" "$version" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
calls = (int(sys.argv[4]) - int(sys.argv[3])) / int(sys.argv[5])
print(f"kube-apiserver {sys.argv[6]}, {a['count']} sequential pod CREATEs each")
for name, r in (("without moat", a), ("with moat", b)):
    print(f"  {name:13} p50 {r['p50_ms']:7.2f} ms  p90 {r['p90_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms")
print(f"  added         p50 {b['p50_ms'] - a['p50_ms']:+7.2f} ms  p99 {b['p99_ms'] - a['p99_ms']:+7.2f} ms"
      f"  ({b['p50_ms'] / a['p50_ms']:.2f}x at p50); webhook calls per pod: {calls:.2f}")
PY
