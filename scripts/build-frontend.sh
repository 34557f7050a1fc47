#!/usr/bin/env bash
# Build the native receive front end frontend/ketanode-scp.cc (DCMTK 3.6.7).
# Usage: scripts/build-frontend.sh [OUTPUT]   (default /usr/local/bin/ketanode-scp)
# Installs libdcmtk-dev and g++ only if they are missing; rebuilds only if the
# source is newer than the binary.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/../frontend/ketanode-scp.cc"
out="${1:-/usr/local/bin/ketanode-scp}"

if [[ ! -f /usr/include/dcmtk/dcmnet/scppool.h ]] || ! command -v g++ >/dev/null 2>&1; then
    apt-get install -y libdcmtk-dev g++
fi

if [[ -x "$out" && ! "$src" -nt "$out" ]]; then
    echo "ketanode-scp up to date: $out"
    exit 0
fi

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
g++ -std=c++17 -O2 -Wall -pthread -o "$tmp" "$src" \
    -ldcmnet -ldcmdata -loflog -lofstd -lpthread
mv -f "$tmp" "$out"
echo "built $out"
