#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30), one after another, and fails
# if any of them finds a crash, a timeout or an out-of-memory input.
#
#   fuzz/run.sh [SECONDS]
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
# CARGO_TARGET_DIR, when set, is where the targets are built. What each run found
# is under fuzz/artifacts/TARGET/; see docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-30}"
targets=(relbuild_xml kiln_toml buildclient_xml client_toml progress_line api_json frames)
target_dir_args=()
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  target_dir_args=(--target-dir "$CARGO_TARGET_DIR")
fi

cargo +nightly fuzz build "${target_dir_args[@]}"

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
failed=()
for target in "${targets[@]}"; do
  echo "== $target: ${seconds}s"
  # A single allocation above 64 MiB is a finding: no input of a few KiB should ask
  # for that much, and a frame's data is at most about 1 MiB.
  if cargo +nightly fuzz run "${target_dir_args[@]}" "$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=64 \
    -timeout=10 -print_final_stats=1 >"$logs/$target" 2>&1; then
    grep -E '^Done [0-9]+ runs|^stat::(number_of_executed_units|peak_rss_mb)' "$logs/$target" || true
    grep -E '^#[0-9]+[[:space:]]+DONE' "$logs/$target" | tail -n 1 || true
  else
    failed+=("$target")
    tail -n 40 "$logs/$target"
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzzing found a problem in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
echo "all ${#targets[@]} targets ran ${seconds}s each without a crash"
