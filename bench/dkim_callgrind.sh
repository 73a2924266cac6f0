#!/usr/bin/env bash
# bench/dkim_callgrind.sh — instructions per accepted message, unsigned and DKIM-signed,
# counted by callgrind (stable on a shared, noisy machine where wall time is not).
#
# For each MODE in $MODES (none ed rsa both; rsa1024 too if asked) it starts the relay
# binary under `valgrind --tool=callgrind` (embedded queue, delivery off, the bench's
# dkim: section for bench.example, relaxed/relaxed), sends N messages of 1 KB with
# smtp-source (-s 4 sessions, From: <sender@bench.example>), checks all N were accepted,
# stops the relay with SIGTERM and prints the total instructions (Ir). A run with N=0
# gives the start-up and shutdown cost, subtracted to get instructions per message.
#
#   bash bench/dkim_callgrind.sh                          # target/release/mailrelay, N=400
#   RELAY_BIN=/path/to/old/mailrelay MODES="none ed" bash bench/dkim_callgrind.sh
# Knobs: RELAY_BIN N MODES WORK SMTP_PORT ADMIN_PORT (14525 14526).
# Profiles stay in $WORK/MODE.cg.out for callgrind_annotate --inclusive=yes.
set -euo pipefail
cd "$(dirname "$0")/.."
RELAY_BIN=${RELAY_BIN:-${CARGO_TARGET_DIR:-target}/release/mailrelay}
N=${N:-400}
MODES=${MODES:-"none ed rsa both"}
WORK=${WORK:-/var/tmp/mailrelay-dkim-callgrind}
SMTP_PORT=${SMTP_PORT:-14525} ADMIN_PORT=${ADMIN_PORT:-14526}
for t in valgrind smtp-source openssl curl; do command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }; done
mkdir -p "$WORK"
[ -f "$WORK/ed25519.pem" ] || openssl genpkey -algorithm ED25519 -out "$WORK/ed25519.pem" 2>/dev/null
[ -f "$WORK/rsa.pem" ] || openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/rsa.pem" 2>/dev/null
[ -f "$WORK/rsa1024.pem" ] || openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024 -out "$WORK/rsa1024.pem" 2>/dev/null

run() {  # run MODE N -> total Ir
  local mode=$1 n=$2 sel="" q="$WORK/queue-$1" pid got
  case $mode in
    none) ;;
    ed) sel="        - { selector: ed, algorithm: ed25519-sha256, key_file: $WORK/ed25519.pem }" ;;
    rsa) sel="        - { selector: rsa, algorithm: rsa-sha256, key_file: $WORK/rsa.pem }" ;;
    rsa1024) sel="        - { selector: rsa, algorithm: rsa-sha256, key_file: $WORK/rsa1024.pem }" ;;
    both) sel="        - { selector: rsa, algorithm: rsa-sha256, key_file: $WORK/rsa.pem }
        - { selector: ed, algorithm: ed25519-sha256, key_file: $WORK/ed25519.pem }" ;;
    *) echo "unknown mode $mode" >&2; exit 1 ;;
  esac
  rm -rf "$q"
  {
    printf 'hostname: relay.bench.test\nlisteners:\n  - {name: smtp, address: "127.0.0.1:%s", tls: none}\n' "$SMTP_PORT"
    printf 'relay_networks: [127.0.0.0/8]\nqueue: {backend: embedded, path: %s}\ndelivery: {enabled: false}\n' "$q"
    printf 'admin: {address: "127.0.0.1:%s"}\nlog: {level: warn}\nshutdown_grace: 5s\n' "$ADMIN_PORT"
    [ -z "$sel" ] || printf 'dkim:\n  canonicalization: relaxed/relaxed\n  domains:\n    - domain: bench.example\n      selectors:\n%s\n' "$sel"
  } > "$WORK/$mode.yaml"
  valgrind --tool=callgrind --callgrind-out-file="$WORK/$mode.cg.out" \
    "$RELAY_BIN" serve --config "$WORK/$mode.yaml" > "$WORK/$mode.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
  [ "$n" = 0 ] || smtp-source -s 4 -m "$n" -l 1024 -f sender@bench.example -t rcpt@example.net \
    -M bench.local "127.0.0.1:$SMTP_PORT"
  got=$(curl -fs "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '$1=="mailrelay_smtp_messages_accepted_total"{print $2}')
  kill -TERM "$pid"; wait "$pid" || true
  [ "${got:-0}" = "$n" ] || { echo "$mode: accepted ${got:-0} of $n" >&2; exit 1; }
  grep -E '^(summary|totals):' "$WORK/$mode.cg.out" | head -1 | awk '{print $2}'
}

base=$(run none 0)
echo "start-up + shutdown: $base Ir ($RELAY_BIN)"
printf '%-8s %14s %14s\n' mode "Ir total" "Ir/msg"
for m in $MODES; do
  t=$(run "$m" "$N")
  printf '%-8s %14s %14s\n' "$m" "$t" "$(( (t - base) / N ))"
done
