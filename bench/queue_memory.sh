#!/usr/bin/env bash
# bench/queue_memory.sh — resident memory of a relay on the embedded queue through a
# large enqueue and drain (issue 15, item 4). A benchmark, not a test.
#
# Each phase in $MODES runs relay processes on the embedded redb queue (smarthost =
# smtp-sink) and samples their VmRSS every second from /proc, with the count accepted,
# the sink's count and the queue depth beside it:
#   mixed  one relay takes N messages from `smtp-source` (SIZE bytes, SESSIONS
#          sessions) while it delivers them, until the queue is empty
#   split  one relay with delivery off takes N messages (a backlog of N), is stopped,
#          and a fresh relay with delivery on drains the whole queue (the case the
#          issue measured: 46 -> 183 MB over a 100,000-message drain)
#
# Report ($WORK/report.md, raw samples $WORK/PHASE-*.csv): per process, RSS at start,
# min, max, after the drain, the growth over the second half of the messages (bytes
# per message), and a row per 10% of N. "Flat" means the maximum does not grow with
# N: compare N=100000 with N=1000000.
#
# Run (as root, Debian 12):     bash bench/queue_memory.sh
#   shorter:                    N=100000 bash bench/queue_memory.sh
#   old behaviour for contrast: CACHE_SIZE=1073741824 bash bench/queue_memory.sh
# Knobs: N [1000000] MODES ["mixed split"] SIZE [1024] SESSIONS [20]
#   CACHE_SIZE [relay default, 32 MiB]
#   BUILD [1] RELAY_BIN [$CARGO_TARGET_DIR/release/mailrelay] TIMEOUT [3600]
#   WORK [/var/tmp/mailrelay-qmem] SMTP_PORT [14525] ADMIN_PORT [19525] SINK_PORT [14536]
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
N=${N:-1000000}
MODES=${MODES:-"mixed split"}
SIZE=${SIZE:-1024}
SESSIONS=${SESSIONS:-20}
CACHE_SIZE=${CACHE_SIZE:-}
BUILD=${BUILD:-1}
TIMEOUT=${TIMEOUT:-3600}
WORK=${WORK:-/var/tmp/mailrelay-qmem}
SMTP_PORT=${SMTP_PORT:-14525}
ADMIN_PORT=${ADMIN_PORT:-19525}
SINK_PORT=${SINK_PORT:-14536}
# lib.sh reads these
export REDIS_PORT=0 PF_PORT=0 BENCH_NAME=queue_memory.sh
ADMIN_URL="http://127.0.0.1:$ADMIN_PORT"
RELAY_BIN=${RELAY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/mailrelay}

log() { echo "[$(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"

SOURCE_PID=""; SAMPLER_PID=""
cleanup() {
  if [ -n "$SOURCE_PID" ]; then kill "$SOURCE_PID" 2>/dev/null || true; fi
  if [ -n "$SAMPLER_PID" ]; then kill "$SAMPLER_PID" 2>/dev/null || true; fi
  stop_relay
  stop_pid "$SINK_PID"
}
trap cleanup EXIT

install_tools python3:python3 curl:curl smtp-source:postfix
for p in "$SMTP_PORT" "$ADMIN_PORT" "$SINK_PORT"; do port_busy "$p" && die "port $p is busy"; done
if [ "$BUILD" = 1 ]; then
  (cd "$REPO" && cargo build --release -p mailrelay >&2)
fi
[ -x "$RELAY_BIN" ] || die "no relay binary at $RELAY_BIN"

rm -rf "$WORK"; mkdir -p "$WORK"
: > "$WORK/relay.log"
COMMIT=$(git -C "$REPO" rev-parse --short HEAD)
DELIVERY_ON="  enabled: true
  smarthost:
    host: 127.0.0.1
    port: $SINK_PORT
    tls: disabled
  max_concurrency: 50
  per_destination_concurrency: 50
  max_messages_per_connection: 100"

relay_up() {          # relay_up QUEUE_DIR DELIVERY_YAML
  local cfg
  cfg=$(relay_config embedded "$1" "$2")
  if [ -n "$CACHE_SIZE" ]; then
    sed -i "s|^  path: $1\$|&\n  cache_size: $CACHE_SIZE|" "$cfg"
  fi
  "$RELAY_BIN" serve --config "$cfg" >>"$WORK/relay.log" 2>&1 &
  RELAY_PID=$!
  relay_wait_ready "$RELAY_PID"
}
sampler_start() {     # sampler_start CSV: seconds,rss_kib,accepted,delivered,queued
  python3 - "$RELAY_PID" "$ADMIN_URL" "$WORK/sink.out" "$BENCH_DIR/timer.py" > "$1" <<'PY' &
import json, subprocess, sys, time, urllib.request
pid, admin, sink_out, timer = sys.argv[1:5]
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
def accepted():
    for line in urllib.request.urlopen(admin + "/metrics", timeout=5).read().decode().splitlines():
        if line.startswith("mailrelay_smtp_messages_accepted_total "):
            return int(float(line.split()[1]))
    return 0
def queued():
    return json.load(urllib.request.urlopen(admin + "/api/v1/queue/stats", timeout=5))["messages"]
def delivered():
    out = subprocess.run([sys.executable, timer, "--sink-count", sink_out], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)
t0 = time.monotonic()
print("seconds,rss_kib,accepted,delivered,queued", flush=True)
while True:
    try:
        print(f"{time.monotonic() - t0:.0f},{rss()},{accepted()},{delivered()},{queued()}", flush=True)
    except (OSError, ValueError, TypeError):
        break
    time.sleep(1)
PY
  SAMPLER_PID=$!
}
sampler_stop() { sleep 3; kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=""; }
send_all() {
  log "sending $N messages of $SIZE bytes over $SESSIONS sessions"
  smtp-source -s "$SESSIONS" -m "$N" -l "$SIZE" -f sender@example.com -t rcpt@example.net \
    -M bench.local "127.0.0.1:$SMTP_PORT" &
  SOURCE_PID=$!
  wait "$SOURCE_PID" || die "smtp-source failed"
  SOURCE_PID=""
  local accepted
  accepted=$(metric mailrelay_smtp_messages_accepted_total)
  [ "${accepted%.*}" = "$N" ] || die "relay accepted $accepted, expected $N"
}
wait_drained() {
  local deadline=$((SECONDS + TIMEOUT))
  until [ "$(sink_count)" -ge "$N" ] && [ "$(queue_messages)" = 0 ]; do
    [ $SECONDS -lt $deadline ] || die "not drained after ${TIMEOUT}s: sink $(sink_count), queued $(queue_messages)"
    sleep 2
  done
  sleep 2
  [ "$(sink_count)" = "$N" ] || die "sink received $(sink_count), expected $N (duplicates?)"
}
fresh_sink() { stop_pid "$SINK_PID"; : > "$WORK/sink.out"; start_sink; }

for mode in $MODES; do
  fresh_sink
  case $mode in
    mixed)
      relay_up "$WORK/q-mixed" "$DELIVERY_ON"
      sampler_start "$WORK/mixed-relay.csv"
      send_all; log "all sent; draining"; wait_drained
      sampler_stop; stop_relay ;;
    split)
      relay_up "$WORK/q-split" "  enabled: false"
      sampler_start "$WORK/split-enqueue.csv"
      send_all
      [ "$(queue_messages)" = "$N" ] || die "queue holds $(queue_messages), expected $N"
      sampler_stop; stop_relay
      log "queue of $N built; draining with a fresh relay"
      relay_up "$WORK/q-split" "$DELIVERY_ON"
      sampler_start "$WORK/split-drain.csv"
      wait_drained
      sampler_stop; stop_relay ;;
    *) die "unknown mode $mode (mixed, split)" ;;
  esac
done

python3 - "$WORK" "$N" "$SIZE" "$SESSIONS" "${CACHE_SIZE:-default (32 MiB)}" "$COMMIT" "$MODES" > "$WORK/report.md" <<'PY'
import csv, os, sys
work, n, size, sessions, cache, commit, modes = sys.argv[1:]
modes = modes.split()
n = int(n)
mib = lambda kib: f"{kib / 1024:.1f}"
print(f"# Embedded queue memory: {n:,} messages of {size} B, {sessions} sessions, cache {cache}, commit {commit}\n")
phases = {"mixed": [("mixed-relay", "accepted")], "split": [("split-enqueue", "accepted"), ("split-drain", "delivered")]}
for mode in modes:
    for name, by in phases[mode]:
        rows = [{k: int(v) for k, v in r.items()} for r in csv.DictReader(open(os.path.join(work, name + ".csv")))]
        rss = [r["rss_kib"] for r in rows]
        half = max([r["rss_kib"] for r in rows if r[by] <= n // 2] or [rss[0]])
        print(f"## {name} ({len(rows)} samples, one per second; progress by messages {by})\n")
        print(f"- RSS at start {mib(rss[0])} MiB, min {mib(min(rss))} MiB, max {mib(max(rss))} MiB, at the end {mib(rss[-1])} MiB")
        print(f"- largest backlog {max(r['queued'] for r in rows):,} messages")
        print(f"- max RSS over the first half {mib(half)} MiB; growth over the second half "
              f"{(max(rss) - half) * 1024 / (n / 2):.1f} B per message\n")
        print(f"| {by} | queued | RSS MiB |\n|---:|---:|---:|")
        step, nxt = max(n // 10, 1), 0
        for r in rows:
            if r[by] >= nxt:
                print(f"| {r[by]:,} | {r['queued']:,} | {mib(r['rss_kib'])} |")
                nxt = (r[by] // step + 1) * step
        print(f"| {rows[-1][by]:,} | {rows[-1]['queued']:,} | {mib(rows[-1]['rss_kib'])} |\n")
PY
cat "$WORK/report.md"
