#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 30), one after
# another, and stops at the first finding (the crashing input is saved under
# fuzz/artifacts/<target>/). Needs the nightly toolchain and cargo-fuzz:
#
#   rustup toolchain install nightly
#   cargo install cargo-fuzz --locked
#   hack/fuzz.sh 60            # every target, 60 s each
#   hack/fuzz.sh 600 proxy     # one target
#
# New inputs go to a scratch corpus; the committed seeds in fuzz/corpus/<target>/
# are only read. To keep a finding as a seed, fix it, add a regression test in the
# normal suite, and copy the input into fuzz/corpus/<target>/ (the suite replays
# every file there: mailrelay_smtp::fuzzing and mailrelay::fuzzing).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-30}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build -O --features relay
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  echo "== $t: ${seconds}s"
  status=0
  cargo +nightly fuzz run -O --features relay "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$scratch/$t.log" 2>&1 || status=$?
  grep -E '^#[0-9]+ +DONE|^stat::(number_of_executed_units|average_exec_per_sec)' "$scratch/$t.log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$scratch/$t.log" >&2
    echo "!! $t failed: the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
