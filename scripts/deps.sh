#!/bin/bash
# Install kasd's build, run and test dependencies from Debian 12's packages (idempotent: apt-get
# runs only when something is missing). Needs root.
set -euo pipefail

KASD_PACKAGES=(
  gcc libc6-dev pkg-config meson ninja-build
  liburing-dev libyaml-dev libnghttp2-dev libwolfssl-dev libssl-dev
  libh2o-evloop-dev   # observability listener (core/httpd.c)
  libprotobuf-c-dev protobuf-c-compiler
  libhiredis-dev      # RESP2 codec only (core/resp.c); kasd does the Redis I/O itself
  zlib1g-dev          # gRPC message compression (core/compress.c)
  redis-server
  python3
)
KASD_TEST_PACKAGES=(
  libcriterion-dev
  python3-grpcio python3-protobuf protobuf-compiler   # interop tests with real gRPC peers
  haproxy                    # the S1 peer baseline of the bench harness (smoke-tested)
  nginx                      # the S1/S7 grpc_pass peer baseline of the bench harness (smoke-tested)
  clang libclang-rt-14-dev   # libFuzzer drivers
  curl
  iproute2                   # network namespaces: the fleet link-cut test (fleet_netns_test.py)
  # grpc-go test peers (test/go, built offline in GOPATH mode): agentk's transport for real
  golang-go golang-google-grpc-dev golang-google-protobuf-dev protoc-gen-go protoc-gen-go-grpc
  golang-github-gorilla-websocket-dev
)

kasd_install() {
  local missing=()
  for p in "$@"; do
    # strip trailing comments from the arrays above
    [[ "$p" == \#* ]] && break
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
      echo "kasd: missing packages (${missing[*]}); run as root to install them" >&2
      exit 1
    fi
    echo "kasd: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# Debian's kubectl (package kubernetes-client), for the Kubernetes API front door tests. Installed
# normally when nothing else owns /usr/bin/kubectl; on machines where another package does (Google
# Cloud SDK's `kubectl` dispatcher), the Debian package is unpacked under /var/lib/kasd-test
# instead, so the tests still run the Debian binary. Prints the path of that kubectl.
kasd_kubectl() {
  if dpkg-query -W -f='${Status}' kubernetes-client 2>/dev/null | grep -q "install ok installed"; then
    echo /usr/bin/kubectl
    return
  fi
  local dir=/var/lib/kasd-test/kubernetes-client
  if [[ ! -x $dir/usr/bin/kubectl ]]; then
    if ! dpkg -S /usr/bin/kubectl >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]] &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null 2>&1; then
      echo /usr/bin/kubectl
      return
    fi
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq kubernetes-client >/dev/null 2>&1) ||
      (apt-get update -qq && cd "$tmp" && apt-get download -qq kubernetes-client >/dev/null)
    mkdir -p "$dir"
    dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$dir"
    rm -rf "$tmp"
  fi
  echo "$dir/usr/bin/kubectl"
}
