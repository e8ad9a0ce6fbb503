#!/usr/bin/env bash
# Starts two distribution registries (Debian's docker-registry) on loopback for moat's
# real-registry tests: one anonymous, one with HTTP Basic authentication (htpasswd), both over
# TLS with a certificate from a CA made here. Writes DIR/env (sourced by scripts/test.sh) with
# what the tests read:
#
#   MOAT_TEST_REGISTRY        host:port of the anonymous registry
#   MOAT_TEST_REGISTRY_AUTH   host:port of the one that asks for credentials
#   MOAT_TEST_REGISTRY_USER, MOAT_TEST_REGISTRY_PASSWORD   its login
#   MOAT_TEST_REGISTRY_CA     the CA's PEM certificate
#   MOAT_TEST_REGISTRY_CERT_DIR   the CA as skopeo's --dest-cert-dir wants it
#
# Prints the registries' process ids, one a line (the caller stops them).
#
#   scripts/start-test-registry.sh DIR
set -euo pipefail
dir=${1:?usage: start-test-registry.sh DIR}
mkdir -p "$dir/certs"
registry=$(command -v docker-registry || command -v registry || true)
if [ -z "$registry" ]; then
  echo "start-test-registry: docker-registry not installed (apt-get install docker-registry)" >&2
  exit 1
fi

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=moat test registry CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$dir/leaf.key" -out "$dir/leaf.csr" 2>/dev/null
openssl x509 -req -in "$dir/leaf.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 2 -out "$dir/leaf.pem" \
  -extfile <(printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n') 2>/dev/null
cp "$dir/ca.pem" "$dir/certs/ca.crt"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
user=moat
password=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
htpasswd -Bbn "$user" "$password" >"$dir/htpasswd" 2>/dev/null

start() { # name port auth
  local name=$1 port=$2 auth=$3
  mkdir -p "$dir/$name"
  {
    echo "version: 0.1"
    echo "log: {level: warn, accesslog: {disabled: true}}"
    echo "storage: {filesystem: {rootdirectory: $dir/$name/data}, delete: {enabled: true}}"
    echo "http: {addr: 127.0.0.1:$port, tls: {certificate: $dir/leaf.pem, key: $dir/leaf.key}}"
    if [ "$auth" = yes ]; then echo "auth: {htpasswd: {realm: moat-test, path: $dir/htpasswd}}"; fi
  } >"$dir/$name/config.yml"
  "$registry" serve "$dir/$name/config.yml" >"$dir/$name/log" 2>&1 &
  echo $!
  for _ in $(seq 100); do
    if curl -s -o /dev/null --cacert "$dir/ca.pem" "https://127.0.0.1:$port/v2/"; then return 0; fi
    sleep 0.1
  done
  echo "start-test-registry: $name did not start:" >&2
  cat "$dir/$name/log" >&2
  return 1
}
anon=$(free_port)
start anonymous "$anon" no
authed=$(free_port)
start authenticated "$authed" yes
cat >"$dir/env" <<ENV
export MOAT_TEST_REGISTRY=127.0.0.1:$anon
export MOAT_TEST_REGISTRY_AUTH=127.0.0.1:$authed
export MOAT_TEST_REGISTRY_USER=$user
export MOAT_TEST_REGISTRY_PASSWORD=$password
export MOAT_TEST_REGISTRY_CA=$dir/ca.pem
export MOAT_TEST_REGISTRY_CERT_DIR=$dir/certs
ENV
