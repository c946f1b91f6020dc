#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: system OpenBLAS (the CPU backend's BLAS),
# a release build, and the embedded default model fetched into codespot's cache.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenblas-dev >/dev/null
fi
cargo build --release --quiet
./target/release/codespot fetch default >/dev/null
