#!/usr/bin/env bash
# Build the native receive front end frontend/ketanode-scp.cc (DCMTK 3.6.7).
# Usage: scripts/build-frontend.sh [OUTPUT]   (default /usr/local/bin/ketanode-scp)
# Installs libdcmtk-dev and g++ only if they are missing; rebuilds only when the binary
# was not built from this source (its SHA-256 is kept beside it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/../frontend/ketanode-scp.cc"
out="${1:-/usr/local/bin/ketanode-scp}"

if [[ ! -f /usr/include/dcmtk/dcmnet/scppool.h ]] || ! command -v g++ >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libdcmtk-dev g++ >/dev/null
fi

# Up to date when the binary was built from this very source (its hash beside the binary;
# modification times say nothing in a fresh clone).
digest="$(sha256sum "$src" | cut -d' ' -f1)"
if [[ -x "$out" && -f "$out.source-sha256" && "$(cat "$out.source-sha256")" == "$digest" ]]; then
    echo "ketanode-scp up to date: $out"
    exit 0
fi

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
g++ -std=c++17 -O2 -Wall -pthread -o "$tmp" "$src" \
    -ldcmnet -ldcmdata -loflog -lofstd -lpthread
mv -f "$tmp" "$out"
echo "$digest" > "$out.source-sha256"
echo "built $out"
