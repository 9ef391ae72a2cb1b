#!/usr/bin/env bash
# The project's test command (README.md). Runs:
#  1. every test of the workspace (unit, integration, property, doc; benches compiled and run once in
#     test mode). Namespace and AF_XDP tests need root and skip with a printed reason without it;
#  2. every cargo-fuzz target for FUZZ_SECONDS each (default 60) when cargo-fuzz is installed
#     (.ci/run installs it; set FUZZ_SECONDS=0 to skip);
#  3. then fuzz-control/'s (configuration files, Kubernetes objects through the control loop) for
#     FUZZ_CONTROL_SECONDS each (default 45; 0 skips them, as do FUZZ_SECONDS=0 and no cargo-fuzz), from
#     their seeds and with their dictionaries, new inputs kept in fuzz-control/corpus/ (not in git):
#     without a sanitizer, as building the whole lb crate with the fuzzer's instrumentation takes
#     about 8 minutes already (CI's whole run took about 18 of its 90 before). Where they do not
#     run, they are only checked to compile (about a minute), so they follow the code. To run one
#     longer by hand, see the doc comment of fuzz-control/fuzz_targets/config_file.rs (or k8s_translate.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$log"
cargo test --workspace --doc 2>&1 | tee -a "$log"
fuzz_seconds=${FUZZ_SECONDS:-60}
fuzz_control_seconds=${FUZZ_CONTROL_SECONDS:-45}
fuzz_control_ran=
if [ "$fuzz_seconds" -gt 0 ] && [ -f fuzz/Cargo.toml ]; then
  if cargo fuzz --version >/dev/null 2>&1; then
    # cargo-fuzz needs nightly-only sanitizer flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
    export RUSTC_BOOTSTRAP=1
    for target in $(cargo fuzz list --fuzz-dir fuzz); do
      echo "== fuzz $target for ${fuzz_seconds}s"
      cargo fuzz run --fuzz-dir fuzz "$target" -- -max_total_time="$fuzz_seconds" -rss_limit_mb=4096
    done
    if [ "$fuzz_control_seconds" -gt 0 ]; then
      for target in $(cargo fuzz list --fuzz-dir fuzz-control); do
        echo "== fuzz-control $target for ${fuzz_control_seconds}s"
        # New inputs go to corpus/ (ignored by git), never into the checked-in seeds/.
        corpora=(fuzz-control/corpus/"$target")
        mkdir -p "${corpora[0]}"
        if [ -d fuzz-control/seeds/"$target" ]; then corpora+=(fuzz-control/seeds/"$target"); fi
        # An input is judged in well under a second; one taking 10 (room for a loaded runner) is a finding.
        flags=(-max_total_time="$fuzz_control_seconds" -rss_limit_mb=4096 -timeout=10)
        if [ -f fuzz-control/dict/"$target".dict ]; then flags+=(-dict=fuzz-control/dict/"$target".dict); fi
        # Files grow to what FileSpec writes at once (see config_file.rs), not over minutes.
        if [ "$target" = config_file ]; then flags+=(-max_len=8192 -len_control=0); fi
        cargo fuzz run --fuzz-dir fuzz-control -s none -O "$target" "${corpora[@]}" -- "${flags[@]}"
      done
      fuzz_control_ran=1
    fi
  else
    echo "== fuzz: skipped (cargo-fuzz not installed: cargo install cargo-fuzz)"
  fi
fi
if [ -z "$fuzz_control_ran" ]; then
  echo "== fuzz-control: the control side's fuzz targets compile"
  cargo check --manifest-path fuzz-control/Cargo.toml --bins
fi

# One closing line over every cargo test binary above, so a reader of the log sees the whole count.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1); if ($(i) ~ /^ignored/) s += $(i-1) } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
