#!/usr/bin/env bash
# Install what ketanode and its tests need on Debian 12 (run as root): the real DICOM
# peers the tests use (DCMTK, Orthanc, dicom3tools) and the Python package with its
# test extras. Idempotent; quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the dashboard's browser tests (Playwright drives it with executablePath);
# systemd: `systemd-analyze verify` of deploy/ketanode.service.
# orthanc-dicomweb and npm: the OHIF viewer test (Orthanc's DICOMweb plugin, OHIF from npm).
DEBS=(dcmtk orthanc orthanc-dicomweb dicom3tools openssl chromium systemd)
missing=()
for pkg in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Orthanc's Debian package starts a system service; the tests run their own instances.
  (service orthanc stop || true) >/dev/null 2>&1
fi
# npm (for `npm pack` below): the machine's Node.js usually brings it; Debian's otherwise.
if ! command -v npm >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
fi

# The native front end (node.receiver = "dcmtk"): ketanode-scp, compiled against Debian's
# DCMTK library (libdcmtk-dev, g++) into /usr/local/bin; rebuilt only when its source changed.
./scripts/build-frontend.sh

PYTHON=${PYTHON:-python3}
# deepbet (brain extraction) runs on torch; the CPU build is all it needs. Installed first
# and pinned, so the range in pyproject.toml installs nothing more (a plain 'torch' from PyPI
# is a CUDA build of several GB).
if ! $PYTHON -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch (CPU) for brain extraction"
  $PYTHON -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
echo "setup: installing ketanode and its test extras with $($PYTHON --version)"
$PYTHON -m pip install -q --disable-pip-version-check -e '.[test]'

# The OHIF viewer (the published build of @ohif/app, MIT, its LICENSE kept beside it) for the
# viewer test: fetched once with `npm pack` at a pinned version and checked against the
# registry's integrity hash; never at test time. tests/peers.py serves it next to Orthanc.
OHIF_VERSION=3.13.2
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
OHIF_DIR=${KETANODE_OHIF_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ketanode/ohif-$OHIF_VERSION}
if [ ! -f "$OHIF_DIR/dist/index.html" ]; then
  echo "setup: fetching the OHIF viewer $OHIF_VERSION (npm pack) into $OHIF_DIR"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  got="sha512-$(openssl dgst -sha512 -binary "$tmp/ohif-app-$OHIF_VERSION.tgz" | base64 -w0)"
  if [ "$got" != "$OHIF_INTEGRITY" ]; then
    echo "setup: OHIF tarball integrity mismatch ($got)" >&2
    exit 1
  fi
  mkdir -p "$OHIF_DIR"
  tar xzf "$tmp/ohif-app-$OHIF_VERSION.tgz" -C "$OHIF_DIR" --strip-components=1
  rm -rf "$tmp"
fi
