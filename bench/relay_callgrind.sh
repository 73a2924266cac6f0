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
#   EVENTS="off on hook" bash bench/relay_callgrind.sh   # the event log's cost (issue 19)
# Knobs: RELAY_BIN N SIZE SESSIONS QUEUES WORK TOOL (callgrind; "none" = instructions are
# not counted, for a quick functional pass), EVENTS (space-separated modes, default "on":
# the relay's default config; "off" = `events: {enabled: false}`; "hook" = events on and
# one webhook for all tenants posting to a local Python receiver, counted; RELAY_YAML_HOOK
# adds keys to that webhook's entry, e.g. "batch: {max_events: 1}") and the ports SMTP_PORT
# ADMIN_PORT SINK_PORT REDIS_PORT DNS_PORT HOOK_PORT (14625 14626 14636 16679 14653 14637).
# Each run also prints the CPU ticks of the relay (its own process only with TOOL=none) and,
# on Redis, of redis-server during the run, and writes redis-server's `INFO commandstats`
# for the run to $WORK/redis-EVENTS-N.cmdstats (what the webhook consumer costs Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
RELAY_BIN=${RELAY_BIN:-${CARGO_TARGET_DIR:-target}/release/mailrelay}
N=${N:-2000}
SIZE=${SIZE:-1024}
SESSIONS=${SESSIONS:-20}
QUEUES=${QUEUES:-"embedded redis"}
WORK=${WORK:-/var/tmp/mailrelay-relay-callgrind}
SMTP_PORT=${SMTP_PORT:-14625} ADMIN_PORT=${ADMIN_PORT:-14626} SINK_PORT=${SINK_PORT:-14636}
REDIS_PORT=${REDIS_PORT:-16679} DNS_PORT=${DNS_PORT:-14653} HOOK_PORT=${HOOK_PORT:-14637}
EVENTS=${EVENTS:-on}
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
  REDIS_PID=$!
fi
if [[ " $EVENTS " == *" hook "* ]]; then
  # Counts events (a batch's array or one event) and POSTs.
  python3 - "$HOOK_PORT" "$WORK/hook.count" >"$WORK/hook.log" 2>&1 <<'PY' &
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, out = int(sys.argv[1]), sys.argv[2]
events, posts, lock = 0, 0, threading.Lock()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        global events, posts
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.send_response(204); self.send_header("Content-Length", "0"); self.end_headers()
        with lock:
            posts += 1
            events += len(body) if isinstance(body, list) else 1
            open(out, "w").write(f"{events} {posts}")
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
  PIDS+=($!)
fi
sleep 1

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hook_count() { cat "$WORK/hook.count" 2>/dev/null || echo "0 0"; }
sink_count() { python3 bench/timer.py --sink-count "$WORK/sink.out"; }
metric() { curl -fs "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v m="$1" '$1 == m && !f {print $2; f = 1}'; }

run() {  # run QUEUE N EVENTS -> total Ir
  local queue=$1 n=$2 ev=$3 q="$WORK/queue" pid got base left qsec h0 h1
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
    case $ev in
      off) printf 'events: {enabled: false}\n' ;;
      hook) printf 'webhooks:\n  - {name: bench, url: "http://127.0.0.1:%s/hook", secret: bench-secret-0123456789, tenants: {all: true}, allow_http: true%s}\n' \
              "$HOOK_PORT" "${RELAY_YAML_HOOK:+, $RELAY_YAML_HOOK}" ;;
    esac
  } > "$WORK/$queue.yaml"
  local pre=()
  [ "${TOOL:-callgrind}" = none ] || pre=(valgrind --tool=callgrind --callgrind-out-file="$WORK/$queue-$ev-$n.cg.out")
  "${pre[@]}" "$RELAY_BIN" serve --config "$WORK/$queue.yaml" > "$WORK/$queue.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
  base=$(sink_count)
  h0=$(hook_count)
  r0=0
  [ "$queue" != redis ] || { redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null; r0=$(cpu_ticks "$REDIS_PID"); }
  [ "$n" = 0 ] || smtp-source -s "$SESSIONS" -m "$n" -l "$SIZE" -f sender@example.com -t rcpt@example.net \
    -M bench.local "127.0.0.1:$SMTP_PORT"
  for _ in $(seq 1 1200); do [ $(( $(sink_count) - base )) -ge "$n" ] && break; sleep 0.25; done
  for _ in $(seq 1 600); do
    left=$(curl -fs "http://127.0.0.1:$ADMIN_PORT/api/v1/queue/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')
    [ "$left" = 0 ] && break; sleep 0.2
  done
  if [ "$ev" = hook ]; then
    # Every message makes two events (accepted, delivered): wait for the webhook too.
    for _ in $(seq 1 1200); do
      h1=$(hook_count); [ $(( ${h1% *} - ${h0% *} )) -ge $(( 2 * n )) ] && break; sleep 0.25
    done
    echo "$queue hook N=$n: $(( ${h1% *} - ${h0% *} )) events in $(( ${h1#* } - ${h0#* } )) POSTs" >&2
  fi
  got=$(metric mailrelay_smtp_messages_accepted_total)
  # CPU of the relay process (meaningful with TOOL=none) and of redis-server, whole run.
  local rcpu=""
  [ "$queue" != redis ] || rcpu=", redis-server $(( $(cpu_ticks "$REDIS_PID") - r0 ))"
  echo "$queue $ev N=$n: CPU ticks (1/100 s): relay $(cpu_ticks "$pid")$rcpu" >&2
  # redis-server's side (calls and usec per command), e.g. what the webhook consumer costs.
  [ "$queue" != redis ] || redis-cli -p "$REDIS_PORT" INFO commandstats > "$WORK/$queue-$ev-$n.cmdstats"
  kill -TERM "$pid"; wait "$pid" || true
  [ "${got:-0}" = "$n" ] || { echo "$queue: accepted ${got:-0} of $n" >&2; exit 1; }
  [ $(( $(sink_count) - base )) = "$n" ] || { echo "$queue: sink got $(( $(sink_count) - base )) of $n" >&2; exit 1; }
  [ "$left" = 0 ] || { echo "$queue: $left messages left in the queue" >&2; exit 1; }
  if [ "${TOOL:-callgrind}" = none ]; then echo 0; return; fi
  grep -E '^(summary|totals):' "$WORK/$queue-$ev-$n.cg.out" | head -1 | awk '{print $2}'
}

echo "relay: $RELAY_BIN; N=$N SIZE=$SIZE SESSIONS=$SESSIONS; load: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-9s %-6s %14s %14s %12s\n' queue events "Ir start-up" "Ir total" "Ir/msg"
for qk in $QUEUES; do
  for ev in $EVENTS; do
    b=$(run "$qk" 0 "$ev")
    t=$(run "$qk" "$N" "$ev")
    printf '%-9s %-6s %14s %14s %12s\n' "$qk" "$ev" "$b" "$t" "$(( (t - b) / N ))"
  done
done
