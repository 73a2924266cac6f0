#!/usr/bin/env bash
# bench/presets_callgrind.sh — instructions per delivered message with and without
# `providers: { presets: [all] }`, embedded queue, counted by callgrind (stable on a
# shared, noisy machine where wall time is not).
#
# For each MODE in $MODES (off presets) it starts the relay under
# `valgrind --tool=callgrind` (embedded queue, delivery to smtp-sink through the
# smarthost, no TLS), sends N messages of 1 KB with smtp-source (-s 4 sessions),
# waits until all N are delivered, stops the relay with SIGTERM and prints the total
# instructions (Ir). A run with BASE_N messages per mode is subtracted, and the
# difference divided by N - BASE_N, to get instructions per message (accepting and
# delivering it). Not N=0: part of the start-up (compiling the presets' rules)
# runs after /readyz answers, so an idle run stopped at once misses it.
#
#   bash bench/presets_callgrind.sh                       # target/release/mailrelay, N=300
#   RELAY_BIN=/work/mailrelay-stop14-release bash bench/presets_callgrind.sh
# Knobs: RELAY_BIN N BASE_N MODES WORK SMTP_PORT ADMIN_PORT SINK_PORT (14535 14536 14537).
# Profiles stay in $WORK/MODE.cg.out for callgrind_annotate --inclusive=yes.
set -euo pipefail
cd "$(dirname "$0")/.."
RELAY_BIN=${RELAY_BIN:-${CARGO_TARGET_DIR:-target}/release/mailrelay}
N=${N:-300}
BASE_N=${BASE_N:-50}
MODES=${MODES:-"off presets"}
WORK=${WORK:-/var/tmp/mailrelay-presets-callgrind}
SMTP_PORT=${SMTP_PORT:-14535} ADMIN_PORT=${ADMIN_PORT:-14536} SINK_PORT=${SINK_PORT:-14537}
for t in valgrind smtp-source smtp-sink curl; do command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }; done
mkdir -p "$WORK"

smtp-sink -c -u "$(id -un)" "127.0.0.1:$SINK_PORT" 256 >/dev/null 2>&1 &
SINK=$!
trap 'kill $SINK 2>/dev/null || true' EXIT

delivered() {
  curl -fs "http://127.0.0.1:$ADMIN_PORT/metrics" |
    awk '/^mailrelay_delivery_recipients_total/ && /result="delivered"/ {s += $2} END {print s + 0}'
}

run() {  # run MODE N -> total Ir
  local mode=$1 n=$2 q="$WORK/queue-$1" pid got=0
  rm -rf "$q"
  {
    printf 'hostname: relay.bench.test\nlisteners:\n  - {name: smtp, address: "127.0.0.1:%s", tls: none}\n' "$SMTP_PORT"
    printf 'relay_networks: [127.0.0.0/8]\nqueue: {backend: embedded, path: %s}\n' "$q"
    printf 'delivery:\n  smarthost: {host: 127.0.0.1, port: %s, tls: disabled}\n' "$SINK_PORT"
    printf 'admin: {address: "127.0.0.1:%s"}\nlog: {level: warn}\nshutdown_grace: 5s\n' "$ADMIN_PORT"
    [ "$mode" = off ] || printf 'providers:\n  presets: [all]\n'
  } > "$WORK/$mode.yaml"
  valgrind --tool=callgrind --callgrind-out-file="$WORK/$mode-$n.cg.out" \
    "$RELAY_BIN" serve --config "$WORK/$mode.yaml" > "$WORK/$mode.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
  if [ "$n" != 0 ]; then
    smtp-source -s 4 -m "$n" -l 1024 -f sender@bench.example -t rcpt@example.net \
      -M bench.local "127.0.0.1:$SMTP_PORT"
    for _ in $(seq 1 1500); do got=$(delivered); [ "$got" -ge "$n" ] && break; sleep 0.2; done
  fi
  kill -TERM "$pid"; wait "$pid" || true
  [ "$got" -ge "$n" ] || { echo "$mode: delivered $got of $n" >&2; exit 1; }
  grep -E '^(summary|totals):' "$WORK/$mode-$n.cg.out" | head -1 | awk '{print $2}'
}

echo "$RELAY_BIN, N=$N, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-8s %14s %14s %14s\n' mode "Ir (BASE_N)" "Ir (N)" "Ir/msg"
for m in $MODES; do
  base=$(run "$m" "$BASE_N")
  t=$(run "$m" "$N")
  printf '%-8s %14s %14s %14s\n' "$m" "$base" "$t" "$(( (t - base) / (N - BASE_N) ))"
done
