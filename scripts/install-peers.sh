#!/usr/bin/env bash
# Install the real DICOM peers the tests use (Orthanc, dcmtk, dicom3tools, gdcm) and
# systemd-analyze (the unit test) with apt, only those missing; as root, or through sudo.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
command -v storescu >/dev/null || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v gdcmconv >/dev/null || need+=(libgdcm-tools)  # the transcode tests' JPEG-LS/J2K
optional=()  # verifies deploy/cxr-node.service; without it that test skips, saying so
command -v systemd-analyze >/dev/null || optional+=(systemd)
[ $((${#need[@]} + ${#optional[@]})) -gt 0 ] || exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -q
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} with apt-get" >&2
  $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
if [ ${#optional[@]} -gt 0 ]; then
  echo "installing ${optional[*]} with apt-get (optional)" >&2
  $SUDO apt-get install -y -q --no-install-recommends "${optional[@]}" ||
    echo "could not install ${optional[*]}: the systemd unit test will skip" >&2
fi
