#!/usr/bin/env bash
# The whole test suite. On Debian/Ubuntu as root with no Vulkan driver, installs Mesa's software
# driver (lavapipe) first, so the GPU tests run anywhere. GPU tests fail, never skip, without an
# adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-vulkan.sh
# Snapshots are reviewed, not accepted: a changed shader fails the run.
export INSTA_UPDATE=no
cargo test --release "$@"
