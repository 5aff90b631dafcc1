#!/bin/bash
# Build bench/peers/kaslike (kasd-kaslike, the kas-like peer of bench/run) for the meson build
# (bench/peers/kaslike/meson.build), the way test/go/build.sh builds the grpc-go test peers:
# offline, with Debian's Go packages only (GOPATH mode over /usr/share/gocode: grpc-go 1.33,
# protobuf-go), no module proxy. Everything lands in the build directory:
#   OUTDIR/gopath/src/kasdpb/...   Go code generated from the project's proto/ files
#   OUTDIR/gopath/src/kaslike      a copy of main.go
#   OUTDIR/gocache                 Go's build cache
#
# usage: build.sh --src DIR --proto-dir PROTO_DIR --outdir DIR --out BINARY PROTO...
# PROTO: .proto paths relative to PROTO_DIR (proto_files of proto/meson.build).
set -euo pipefail

src= proto_dir= outdir= out=
protos=()
while (($#)); do
  case "$1" in
    --src) src=$2; shift 2 ;;
    --proto-dir) proto_dir=$2; shift 2 ;;
    --outdir) outdir=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    *) protos+=("$1"); shift ;;
  esac
done
[[ -n $src && -n $proto_dir && -n $outdir && -n $out ]] || { echo "build.sh: missing arguments" >&2; exit 2; }

for tool in go gofmt protoc protoc-gen-go; do
  command -v "$tool" >/dev/null || {
    echo "build.sh: $tool not found (scripts/deps.sh installs the test packages)" >&2; exit 1; }
done

outdir=$(realpath "$outdir")
out=$(realpath -m "$out")
src=$(realpath "$src")
proto_dir=$(realpath "$proto_dir")
gopath=$outdir/gopath
export GO111MODULE=off GOFLAGS= GOPROXY=off GOPATH=$gopath:/usr/share/gocode \
       GOCACHE=$outdir/gocache GOTOOLCHAIN=local CGO_ENABLED=0

# 1. Go messages from the protos (no go_package option in them: M<file>=<import path>;<name>).
rm -rf "$gopath/src"
mkdir -p "$gopath/src"
opts=() gen=()
for p in "${protos[@]}"; do
  case "$p" in
    google/protobuf/descriptor.proto) opts+=("--go_opt=M$p=google.golang.org/protobuf/types/descriptorpb") ;;
    google/protobuf/*.proto)
      base=$(basename "$p" .proto)
      opts+=("--go_opt=M$p=google.golang.org/protobuf/types/known/${base//_/}pb") ;;
    *)
      dir=$(dirname "$p")
      name=${dir#gitlab/agent/}
      name=${name//\//}; name=${name//_/}
      opts+=("--go_opt=M$p=kasdpb/$dir;$name")
      gen+=("$p") ;;
  esac
done
protoc -I "$proto_dir" --go_out="$gopath/src" "${opts[@]}" "${gen[@]}"

# 2. Our source, gofmt-clean.
unformatted=$(gofmt -l "$src/main.go")
if [[ -n $unformatted ]]; then
  echo "build.sh: not gofmt-formatted (run gofmt -w): $unformatted" >&2
  exit 1
fi
mkdir -p "$gopath/src/kaslike"
cp "$src/main.go" "$gopath/src/kaslike/"

# 3. Vet and build.
cd "$gopath/src"
go vet kaslike
go build -o "$out.tmp" kaslike
mv -f "$out.tmp" "$out"
