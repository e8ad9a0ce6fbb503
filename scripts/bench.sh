#!/usr/bin/env bash
# Reproduces the figures in the README: criterion benchmarks of the policy core and of
# `moat review`, then the release binary over 10,000 generated pods with its peak memory.
#
#   scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo bench -p moat-core --bench decide 2>&1 | grep -E '^decide|time:|thrpt:'
cargo bench -p moat --bench review 2>&1 | grep -E '^review|time:|thrpt:'

cargo build --release -p moat --locked
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 - "$dir/pods.yaml" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(10000):
        image = [f"ghcr.io/acme/app{i}:1.{i}", "nginx", f"registry.example.com:5000/svc{i}:2", "busybox:latest"][i % 4]
        runtime = "  runtimeClassName: runc\n" if i % 3 == 0 else ""
        labels = "    moat.dev/class: untrusted\n" if i % 2 == 0 else ""
        f.write(f"---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{i}\n  namespace: ns-{i % 50}\n  labels:\n    app: web\n{labels}spec:\n{runtime}  containers:\n  - name: app\n    image: {image}\n  - name: sidecar\n    image: envoyproxy/envoy:v1.31.2\n")
PY
# The same pods as one List, as `kubectl get pods -A -o json` prints them.
python3 - "$dir/pods.yaml" "$dir/list.json" <<'PY'
import json, sys
docs = [d for d in open(sys.argv[1]).read().split("---\n") if d.strip()]
items = []
for d in docs:
    # The generator's YAML is simple enough to rebuild as JSON without a YAML library.
    lines = d.splitlines()
    name = next(l.split(": ")[1] for l in lines if l.startswith("  name: "))
    ns = next(l.split(": ")[1] for l in lines if l.startswith("  namespace: "))
    labels = {"app": "web"}
    if "    moat.dev/class: untrusted" in lines:
        labels["moat.dev/class"] = "untrusted"
    images = [l.split("image: ")[1] for l in lines if "image: " in l]
    spec = {"containers": [{"name": n, "image": i} for n, i in zip(["app", "sidecar"], images)]}
    if "  runtimeClassName: runc" in lines:
        spec["runtimeClassName"] = "runc"
    items.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": spec})
json.dump({"apiVersion": "v1", "items": items, "kind": "List", "metadata": {"resourceVersion": ""}}, open(sys.argv[2], "w"), indent=4)
PY
for input in pods.yaml list.json; do
  for format in text json; do
    /usr/bin/time -f "moat review 10000 pods ($input), $format output: %e s wall, %U s user, %M KiB peak RSS" \
      target/release/moat review -o "$format" "$dir/$input" >/dev/null 2>"$dir/err" || true
    tail -1 "$dir/err"
  done
done
