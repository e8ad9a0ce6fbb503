#!/usr/bin/env bash
# Starts a containerd of the tests' own (root, state, sockets and NRI socket under DIR), with NRI
# enabled and the CRI plugin usable without CNI (host-network pods) and without
# CAP_SYS_RESOURCE. The CRI sandbox (pause) image is localhost/moat-test/pause:e2e, built by
# scripts/build-test-images.sh; with IMAGEDIR, the archives IMAGEDIR/*.tar are imported into the
# k8s.io namespace once the daemon is up. Prints the PID; stop it with `kill PID` (shims keep
# running until their containers are removed). Logs go to DIR/containerd.log.
#
#   scripts/start-test-containerd.sh DIR [IMAGEDIR]
set -euo pipefail
dir=${1:?usage: start-test-containerd.sh DIR [IMAGEDIR]}
images=${2:-}
mkdir -p "$dir"/{root,state,cni-conf,cni-bin}
dir=$(cd "$dir" && pwd)
cat >"$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"

[grpc]
  address = "$dir/containerd.sock"

[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[plugins."io.containerd.nri.v1.nri"]
  disable = false
  disable_connections = false
  socket_path = "$dir/nri.sock"
  plugin_path = "$dir/nri-plugins"
  plugin_config_path = "$dir/nri-conf"
  plugin_registration_timeout = "5s"
  plugin_request_timeout = "2s"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "localhost/moat-test/pause:e2e"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni-bin"
    conf_dir = "$dir/cni-conf"
TOML
containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  [ -S "$dir/containerd.sock" ] && [ -S "$dir/nri.sock" ] && break
  if ! kill -0 "$pid" 2>/dev/null; then
    tail -20 "$dir/containerd.log" >&2
    exit 1
  fi
  sleep 0.1
done
if [ ! -S "$dir/nri.sock" ]; then
  echo "start-test-containerd: no NRI socket after 10 s" >&2
  tail -20 "$dir/containerd.log" >&2
  kill "$pid"
  exit 1
fi
if [ -n "$images" ]; then
  for image in "$images"/*.tar; do
    if ! ctr --address "$dir/containerd.sock" -n k8s.io images import "$image" >&2; then
      echo "start-test-containerd: importing $image failed" >&2
      kill "$pid"
      exit 1
    fi
  done
fi
echo "$pid"
