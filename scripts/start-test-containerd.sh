#!/usr/bin/env bash
# Starts a containerd of the tests' own (root, state, sockets and NRI socket under DIR), with NRI
# enabled and the CRI plugin usable without CNI (host-network pods) and without
# CAP_SYS_RESOURCE. The CRI sandbox (pause) image is localhost/moat-test/pause:e2e, built by
# scripts/build-test-images.sh; with IMAGEDIR, the archives IMAGEDIR/*.tar are imported into the
# k8s.io namespace once the daemon is up. Prints the PID; stop it with `kill PID` (shims keep
# running until their containers are removed). Logs go to DIR/containerd.log.
#
# When runsc (gVisor) is installed, a `runsc` runtime handler is configured too: Debian's runsc
# ships no containerd shim, so the runc shim runs it under BinaryName = DIR/runsc-wrapper (see
# below). NRI_TIMEOUT (default 2s) sets NRI's plugin_request_timeout.
#
#   scripts/start-test-containerd.sh DIR [IMAGEDIR]
set -euo pipefail
dir=${1:?usage: start-test-containerd.sh DIR [IMAGEDIR]}
images=${2:-}
nri_timeout=${NRI_TIMEOUT:-2s}
mkdir -p "$dir"/{root,state,cni-conf,cni-bin}
dir=$(cd "$dir" && pwd)

runsc_handler=
if runsc=$(command -v runsc); then
  # runsc where the runc shim expects runc:
  # - ptrace platform (no KVM here) and host network (the test pods use the node's network);
  # - `start`'s stdio goes to a file, DIR/runsc-start/<container id>.log: runsc hands that
  #   process's stdio to the container (so the container's output is there, not in the CRI
  #   log), and the shim would wait for the pipe to close (StartContainer then hangs for 30 s);
  # - runsc says "sandbox is not running"/"no such process" where runc says "container not
  #   running", which is what the shim treats as already stopped (else sandbox teardown loops).
  cat >"$dir/runsc-wrapper" <<WRAPPER
#!/bin/sh
set -u
runsc=$runsc
log=$dir/runsc.log
sub=
skip=
for a in "\$@"; do
  if [ -n "\$skip" ]; then skip=; continue; fi
  case "\$a" in
    --root|--log|--log-format|--criu) skip=1 ;;
    -*) ;;
    *) sub=\$a; break ;;
  esac
done
echo "\$(date +%T.%N) \$*" >>"\$log"
case "\$sub" in
  start)
    for id in "\$@"; do :; done
    exec "\$runsc" --platform=ptrace --network=host "\$@" </dev/null >>"$dir/runsc-start/\$id.log" 2>&1 ;;
  kill)
    out=\$("\$runsc" --platform=ptrace --network=host "\$@" 2>&1); rc=\$?
    if [ \$rc -ne 0 ]; then
      echo "\$out" >>"\$log"
      case "\$out" in
        *"sandbox is not running"*|*"no such process"*|*"not running"*) echo "container not running" >&2 ;;
        *) echo "\$out" >&2 ;;
      esac
    fi
    exit \$rc ;;
  *)
    exec "\$runsc" --platform=ptrace --network=host "\$@" ;;
esac
WRAPPER
  chmod 755 "$dir/runsc-wrapper"
  mkdir -p "$dir/runsc-start"
  # Naming one runtime replaces containerd's default list: runc is named again.
  runsc_handler="
  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]
    runtime_type = \"io.containerd.runc.v2\"
  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runsc]
    runtime_type = \"io.containerd.runc.v2\"
    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runsc.options]
      BinaryName = \"$dir/runsc-wrapper\""
fi
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
  plugin_request_timeout = "$nri_timeout"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "localhost/moat-test/pause:e2e"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni-bin"
    conf_dir = "$dir/cni-conf"
$runsc_handler
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
