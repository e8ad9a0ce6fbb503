#!/usr/bin/env bash
# Starts a real control plane on loopback for the tests: etcd, kube-apiserver (real TLS, RBAC,
# service-account tokens) and kube-controller-manager (service accounts and their tokens, the
# aggregated `edit` role, Deployments' ReplicaSets and pods), from the binaries
# scripts/build-kube.sh caches. Writes
# DIR/admin.kubeconfig (system:masters) and DIR/env (KUBECONFIG, MOAT_KUBE_VERSION, the
# binaries' directory), waits until the API server is ready, and prints the pids to stop.
#
#   scripts/start-test-kube.sh DIR v1.37.2
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: scripts/start-test-kube.sh DIR VERSION}
version=${2:?usage: scripts/start-test-kube.sh DIR VERSION}
kube=$(scripts/build-kube.sh "$version")
etcd=$(scripts/build-kube.sh etcd)
mkdir -p "$dir/pki" "$dir/etcd"
pki=$dir/pki

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port); kcm_port=$(free_port)

# A CA, the API server's serving certificate for loopback, an admin client certificate and
# the service-account signing key (all short-lived test material, 0600).
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=moat-test-ca \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
sign() { # NAME SUBJECT [EXT]
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" \
    -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
    ${3:+-extfile <(printf '%s' "$3")} -out "$pki/$1.crt" 2>/dev/null
}
sign apiserver /CN=kube-apiserver "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc"
sign admin "/O=system:masters/CN=moat-test-admin" "extendedKeyUsage=clientAuth"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/sa.key" 2>/dev/null
openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

"$etcd/etcd" --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
  --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "default=http://127.0.0.1:$peer_port" \
  --unsafe-no-fsync --log-level error >"$dir/etcd.log" 2>&1 &
etcd_pid=$!

minor=${version#v1.}; minor=${minor%%.*}
extra=()
if [ "$minor" -lt 36 ]; then
  # MutatingAdmissionPolicy is beta and off by default before 1.36, image volumes before 1.35.
  extra+=(--feature-gates=MutatingAdmissionPolicy=true,ImageVolume=true --runtime-config=admissionregistration.k8s.io/v1beta1=true)
fi
"$kube/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" --authorization-mode Node,RBAC \
  --service-account-issuer https://kubernetes.default.svc \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-cluster-ip-range 10.96.0.0/24 --allow-privileged=true \
  --endpoint-reconciler-type none \
  "${extra[@]}" >"$dir/apiserver.log" 2>&1 &
api_pid=$!

kubeconfig=$dir/admin.kubeconfig
cat >"$kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$pki/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$pki/admin.crt", client-key: "$pki/admin.key"}
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
KC
{
  echo "export KUBECONFIG=$kubeconfig"
  echo "export MOAT_KUBE_VERSION=$version"
  echo "export MOAT_KUBE_BIN=$kube"
  echo "export PATH=$kube:\$PATH"
} >"$dir/env"

kubectl() { "$kube/kubectl" --kubeconfig "$kubeconfig" "$@"; }
fail() { # MESSAGE LOG
  echo "start-test-kube: $1; the end of $2:" >&2
  tail -30 "$dir/$2" >&2
  kill "$api_pid" "$etcd_pid" ${kcm_pid:-} 2>/dev/null || true
  exit 1
}
ready=""
for _ in $(seq 1 120); do
  if kubectl get --raw /readyz >/dev/null 2>&1; then ready=1; break; fi
  kill -0 "$api_pid" 2>/dev/null || break
  sleep 0.5
done
[ -n "$ready" ] || fail "kube-apiserver $version did not become ready" apiserver.log
got=$(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')
[ "$got" = "$version" ] || fail "the API server reports $got, not $version" apiserver.log

# The controllers the tests rely on run with the admin's credentials (test material only).
"$kube/kube-controller-manager" --kubeconfig "$kubeconfig" --authentication-kubeconfig "$kubeconfig" \
  --authorization-kubeconfig "$kubeconfig" --bind-address 127.0.0.1 --secure-port "$kcm_port" \
  --leader-elect=false --service-account-private-key-file "$pki/sa.key" \
  --root-ca-file "$pki/ca.crt" --cluster-signing-cert-file "$pki/ca.crt" \
  --cluster-signing-key-file "$pki/ca.key" >"$dir/controller-manager.log" 2>&1 &
kcm_pid=$!
# Ready for the tests: the default service account exists (pods need it) and the aggregated
# `edit` role has its rules (tenants act with it).
ready=""
for _ in $(seq 1 120); do
  if kubectl get serviceaccount default -n default >/dev/null 2>&1 &&
    [ "$(kubectl get clusterrole edit -o jsonpath='{.rules[*].verbs}' 2>/dev/null)" != "" ]; then
    ready=1; break
  fi
  kill -0 "$kcm_pid" 2>/dev/null || break
  sleep 0.5
done
[ -n "$ready" ] || fail "kube-controller-manager $version did not make the default service account and the edit role" controller-manager.log
echo "$etcd_pid $api_pid $kcm_pid"
