#!/usr/bin/env bash
# Install what ketanode and its tests need on Debian 12 (run as root): the real DICOM
# peers the tests use (DCMTK, Orthanc, dicom3tools) and the Python package with its
# test extras. Idempotent; quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the dashboard's browser tests (Playwright drives it with executablePath);
# systemd: `systemd-analyze verify` of deploy/ketanode.service.
DEBS=(dcmtk orthanc dicom3tools openssl chromium systemd)
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
