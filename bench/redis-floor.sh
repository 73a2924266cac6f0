#!/usr/bin/env bash
# bench/redis-floor.sh — the least Redis can spend on a message body: redis-server
# CPU per plain SET and per plain GET of a value the size of a body, with the
# persistence bench/redis-cost.sh uses (--appendonly yes --appendfsync everysec).
# A benchmark, not a test. Any queue that keeps the body in Redis stores it once
# and reads it back once, so SET + GET is a floor for bench/redis-cost.sh's
# lifecycle figure at that size (at 100 KB it is most of it).
#
# Per size in $SIZES and pipelining depth in $PIPELINES: redis-benchmark sends $N
# SETs (random keys among 1,000) over $CLIENTS connections, then $N GETs of keys it
# wrote; per op: used_cpu_user + used_cpu_sys deltas of redis-server (INFO cpu).
#
# Run (as root, Debian 12):  bash bench/redis-floor.sh
# Knobs: SIZES ["1024 102400"] PIPELINES ["1 16"] N [20000] CLIENTS [20]
#   REDIS_PORT [16591] WORK [/var/tmp/mailrelay-rfloor]
set -Eeuo pipefail

SIZES=${SIZES:-"1024 102400"}
PIPELINES=${PIPELINES:-"1 16"}
N=${N:-20000}
CLIENTS=${CLIENTS:-20}
REDIS_PORT=${REDIS_PORT:-16591}
WORK=${WORK:-/var/tmp/mailrelay-rfloor}

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
command -v redis-benchmark >/dev/null || die "redis-benchmark is missing (apt-get install redis-tools)"
ss -Hltn "sport = :$REDIS_PORT" | grep -q . && die "port $REDIS_PORT is busy (set REDIS_PORT)"

rm -rf "$WORK" && mkdir -p "$WORK"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK" --save '' \
  --appendonly yes --appendfsync everysec --daemonize yes --logfile "$WORK/redis.log"
trap 'redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true' EXIT
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

cpu() { redis-cli -p "$REDIS_PORT" info cpu | awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { printf "%.6f", s }'; }
per_op() { # per_op TEST SIZE PIPELINE: µs of redis-server CPU per op
  local before after
  before=$(cpu)
  redis-benchmark -p "$REDIS_PORT" -q -n "$N" -c "$CLIENTS" -P "$3" -d "$2" -r 1000 -t "$1" >/dev/null 2>&1
  after=$(cpu)
  python3 -c "print(f'{($after - $before) / $N * 1e6:.1f}')"
}

log "machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); $(redis-server --version | cut -d' ' -f1-3)"
echo "| size | pipeline | SET µs/op | GET µs/op | SET + GET |"
echo "|---|---|---|---|---|"
for size in $SIZES; do
  for p in $PIPELINES; do
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
    set_us=$(per_op set "$size" "$p")
    get_us=$(per_op get "$size" "$p")
    echo "| $size | $p | $set_us | $get_us | $(python3 -c "print(f'{$set_us + $get_us:.1f}')") |"
  done
done
log "load $(cut -d' ' -f1-3 /proc/loadavg)"
