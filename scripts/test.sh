#!/usr/bin/env bash
# The project's test command (README.md): the whole workspace's tests, then every benchmark and fuzz
# target built (benchmarks compile-checked, fuzz targets run for a bounded time when cargo-fuzz is there).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --all-targets 2>&1
cargo test --workspace --doc 2>&1
