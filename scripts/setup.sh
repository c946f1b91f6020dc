#!/usr/bin/env bash
# One-time set-up on a fresh machine: a release build (tests and the tool share the profile,
# so burn compiles once) and the embedded default model fetched into codespot's cache.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
./target/release/codespot fetch default >/dev/null
