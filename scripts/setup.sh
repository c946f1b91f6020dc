#!/usr/bin/env bash
# One-time set-up on a fresh machine: a release build (tests and the tool share the profile,
# so burn compiles once) and the embedded default model fetched into codespot's cache.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
./target/release/codespot fetch default >/dev/null
# TensorBoard's own reader, for the test that reads codespot's event files back (and for users:
# target/tb-venv/bin/tensorboard --logdir runs/).
if [ ! -x target/tb-venv/bin/tensorboard ]; then
  python3 -m venv target/tb-venv
  target/tb-venv/bin/pip install --quiet --disable-pip-version-check tensorboard==2.21.0
fi
# A TrueType font for the report's plots (plotters draws text with ab_glyph).
if [ -z "${CODESPOT_FONT:-}" ] && [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  apt-get install -y --no-install-recommends fonts-dejavu-core >/dev/null || echo "warning: install fonts-dejavu-core or set CODESPOT_FONT for report plots" >&2
fi
