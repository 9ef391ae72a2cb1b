#!/usr/bin/env bash
# The project's test command (README.md). Runs:
#  1. every test of the workspace (unit, integration, property, doc; benches compiled and run once in
#     test mode). Namespace and AF_XDP tests need root and skip with a printed reason without it;
#  2. every cargo-fuzz target for FUZZ_SECONDS each (default 60) when cargo-fuzz is installed
#     (.ci/run installs it; set FUZZ_SECONDS=0 to skip).
#     fuzz-control/ (configuration files, Kubernetes objects) is not run here: building the whole lb crate
#     with the fuzzer's instrumentation takes longer than CI can give it. Its targets are only checked to
#     compile (about a minute), so they follow the code. Run them by hand:
#     RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz-control -s none -O config_file (or k8s_translate).
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$log"
cargo test --workspace --doc 2>&1 | tee -a "$log"
echo "== fuzz-control: the control side's fuzz targets compile"
cargo check --manifest-path fuzz-control/Cargo.toml --bins

fuzz_seconds=${FUZZ_SECONDS:-60}
if [ "$fuzz_seconds" -gt 0 ] && [ -f fuzz/Cargo.toml ]; then
  if cargo fuzz --version >/dev/null 2>&1; then
    # cargo-fuzz needs nightly-only sanitizer flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
    export RUSTC_BOOTSTRAP=1
    for target in $(cargo fuzz list --fuzz-dir fuzz); do
      echo "== fuzz $target for ${fuzz_seconds}s"
      cargo fuzz run --fuzz-dir fuzz "$target" -- -max_total_time="$fuzz_seconds" -rss_limit_mb=4096
    done
  else
    echo "== fuzz: skipped (cargo-fuzz not installed: cargo install cargo-fuzz)"
  fi
fi

# One closing line over every cargo test binary above, so a reader of the log sees the whole count.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1); if ($(i) ~ /^ignored/) s += $(i-1) } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
