#!/usr/bin/env bash
# bench/relay_callgrind.sh — relay instructions per message end to end (accept, queue,
# deliver), counted by callgrind: stable on a shared, noisy machine where wall time is not.
#
# For each QUEUE in $QUEUES (embedded redis) it starts the relay binary under
# `valgrind --tool=callgrind` with delivery on, ROUTE=mx as in bench/e2e.sh (MX lookup of
# example.net at a private dnsmasq, port_override to a smtp-sink; 50 connections, 100
# messages per connection), sends N messages of SIZE bytes over SESSIONS sessions with
# smtp-source, waits until the sink has all N and the queue is empty, stops the relay
# with SIGTERM and prints the total instructions (Ir). A run with N=0 per queue gives the
# start-up and shutdown cost, subtracted to get instructions per message. Only the relay
# process is counted (redis-server and the load tools are not).
#
#   bash bench/relay_callgrind.sh                         # target/release/mailrelay, N=2000
#   RELAY_BIN=/work/mailrelay-stop14-release QUEUES=embedded bash bench/relay_callgrind.sh
#   callgrind_annotate --inclusive=yes $WORK/embedded.cg.out | head -60
# Knobs: RELAY_BIN N SIZE SESSIONS QUEUES WORK TOOL (callgrind; "none" = instructions are
# not counted, for a quick functional pass) and the ports SMTP_PORT ADMIN_PORT SINK_PORT
# REDIS_PORT DNS_PORT (14625 14626 14636 16679 14653).
set -euo pipefail
cd "$(dirname "$0")/.."
RELAY_BIN=${RELAY_BIN:-${CARGO_TARGET_DIR:-target}/release/mailrelay}
N=${N:-2000}
SIZE=${SIZE:-1024}
SESSIONS=${SESSIONS:-20}
QUEUES=${QUEUES:-"embedded redis"}
WORK=${WORK:-/var/tmp/mailrelay-relay-callgrind}
SMTP_PORT=${SMTP_PORT:-14625} ADMIN_PORT=${ADMIN_PORT:-14626} SINK_PORT=${SINK_PORT:-14636}
REDIS_PORT=${REDIS_PORT:-16679} DNS_PORT=${DNS_PORT:-14653}
for t in valgrind smtp-source smtp-sink redis-server curl; do
  command -v $t >/dev/null || [ -x /usr/sbin/$t ] || { echo "needs $t" >&2; exit 1; }
done
[ -x /usr/sbin/dnsmasq ] || { echo "needs dnsmasq (dnsmasq-base)" >&2; exit 1; }
mkdir -p "$WORK"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

/usr/sbin/dnsmasq --keep-in-foreground --port="$DNS_PORT" --listen-address=127.0.0.1 \
  --bind-interfaces --no-resolv --no-hosts --conf-file=/dev/null --pid-file \
  --log-facility="$WORK/dnsmasq.log" --local=/example.net/ --local-ttl=300 \
  --mx-host=example.net,mx.example.net,10 --host-record=mx.example.net,127.0.0.1 &
PIDS+=($!)
: > "$WORK/sink.out"
smtp-sink -c -u nobody -h sink.bench.test "127.0.0.1:$SINK_PORT" 1024 >> "$WORK/sink.out" 2>/dev/null &
PIDS+=($!)
if [[ " $QUEUES " == *" redis "* ]]; then
  mkdir -p "$WORK/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --appendonly yes \
    --appendfsync everysec --save '' --daemonize no --logfile "$WORK/redis.log" &
  PIDS+=($!)
fi
sleep 1

sink_count() { python3 bench/timer.py --sink-count "$WORK/sink.out"; }
metric() { curl -fs "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v m="$1" '$1 == m && !f {print $2; f = 1}'; }

run() {  # run QUEUE N -> total Ir
  local queue=$1 n=$2 q="$WORK/queue" pid got base left qsec
  rm -rf "$q"
  if [ "$queue" = redis ]; then
    redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
    qsec="queue: {backend: redis, redis: {url: \"redis://127.0.0.1:$REDIS_PORT/0\"}}"
  else
    qsec="queue: {backend: embedded, path: $q}"
  fi
  {
    printf 'hostname: relay.bench.test\nlisteners:\n  - {name: smtp, address: "127.0.0.1:%s", tls: none}\n' "$SMTP_PORT"
    printf 'relay_networks: [127.0.0.0/8]\n%s\n' "$qsec"
    printf 'delivery:\n  enabled: true\n  max_concurrency: 50\n  per_destination_concurrency: 50\n'
    printf '  max_messages_per_connection: 100\n  tls: disabled\n'
    printf '  dns: {nameservers: ["127.0.0.1:%s"], port_override: %s}\n' "$DNS_PORT" "$SINK_PORT"
    printf 'admin: {address: "127.0.0.1:%s"}\nlog: {level: warn}\nshutdown_grace: 5s\n' "$ADMIN_PORT"
  } > "$WORK/$queue.yaml"
  local pre=()
  [ "${TOOL:-callgrind}" = none ] || pre=(valgrind --tool=callgrind --callgrind-out-file="$WORK/$queue-$n.cg.out")
  "${pre[@]}" "$RELAY_BIN" serve --config "$WORK/$queue.yaml" > "$WORK/$queue.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
  base=$(sink_count)
  [ "$n" = 0 ] || smtp-source -s "$SESSIONS" -m "$n" -l "$SIZE" -f sender@example.com -t rcpt@example.net \
    -M bench.local "127.0.0.1:$SMTP_PORT"
  for _ in $(seq 1 1200); do [ $(( $(sink_count) - base )) -ge "$n" ] && break; sleep 0.25; done
  for _ in $(seq 1 600); do
    left=$(curl -fs "http://127.0.0.1:$ADMIN_PORT/api/v1/queue/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')
    [ "$left" = 0 ] && break; sleep 0.2
  done
  got=$(metric mailrelay_smtp_messages_accepted_total)
  kill -TERM "$pid"; wait "$pid" || true
  [ "${got:-0}" = "$n" ] || { echo "$queue: accepted ${got:-0} of $n" >&2; exit 1; }
  [ $(( $(sink_count) - base )) = "$n" ] || { echo "$queue: sink got $(( $(sink_count) - base )) of $n" >&2; exit 1; }
  [ "$left" = 0 ] || { echo "$queue: $left messages left in the queue" >&2; exit 1; }
  if [ "${TOOL:-callgrind}" = none ]; then echo 0; return; fi
  grep -E '^(summary|totals):' "$WORK/$queue-$n.cg.out" | head -1 | awk '{print $2}'
}

echo "relay: $RELAY_BIN; N=$N SIZE=$SIZE SESSIONS=$SESSIONS; load: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-9s %14s %14s %12s\n' queue "Ir start-up" "Ir total" "Ir/msg"
for qk in $QUEUES; do
  b=$(run "$qk" 0)
  t=$(run "$qk" "$N")
  printf '%-9s %14s %14s %12s\n' "$qk" "$b" "$t" "$(( (t - b) / N ))"
done
