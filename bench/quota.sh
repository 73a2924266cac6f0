#!/usr/bin/env bash
# bench/quota.sh — what ingress send quotas cost: accept rate and added latency of
# mailrelay (Redis queue, release build) with 0, 1, 10 and 100 quotas that every
# message matches (each with two windows by default, see LIMITS).
#
# A benchmark, not a test. For each quota count Q in $QUOTAS, REPS times:
#   - a fresh mailrelay with Q quotas, each `{match: {senders: ['*@example.com']},
#     limits: [1000000000/1m, 1000000000/1h]}` (per sender; the limits are never
#     reached, so every message is checked, charged and accepted), on a private
#     redis-server (--appendonly yes --appendfsync everysec --save ''), flushed and
#     with its stats reset (CONFIG RESETSTAT) before the run;
#   - accept rate = N / wall time of
#       smtp-source -s SESSIONS -m N -l SIZE -f sender@example.com -t rcpt@example.net \
#                   -M bench.local 127.0.0.1:PORT
#     (one message per session, as in bench/ingress.sh), timed by bench/timer.py,
#     which also accounts the CPU of mailrelay + redis-server;
#   - Redis round trips: `INFO commandstats` EVALSHA calls / N. The queue write is one
#     EVALSHA per message, and with quotas the check runs inside that same script, so
#     the target "one round trip per message" reads 1.00 at every Q (nothing else is
#     sent to Redis per message: the checks at MAIL/RCPT use what the relay last
#     learned, no IO);
#   - quota check time: mailrelay_quota_check_seconds sum / count from /metrics
#     (with a standalone Redis the check runs inside the enqueue script, so this is
#     the time of check plus queue write, waits on the shared connection included);
#   - added latency: bench/quota_probe.py sends PROBE messages one after another
#     in one session and reports MAIL-to-final-reply percentiles (the final reply
#     waits for the quota check and the queue write);
#   - correctness: /api/v1/queue/stats messages = N + PROBE and every probe reply 250.
# Markdown report on stdout and in $WORK/report.md; raw rows in $WORK/runs.jsonl.
#
# Run (as root, Debian 12):   bash bench/quota.sh
# Knobs (environment), defaults in brackets:
#   N [10000] SESSIONS [20] SIZE [1024] REPS [3] QUOTAS ["0 1 10 100"] PROBE [500]
#   LIMITS ["1000000000/1m, 1000000000/1h"] (the windows of each quota)
#   BUILD [1] (cargo build --release -p mailrelay first; honours CARGO_TARGET_DIR)
#   RELAY_BIN [${CARGO_TARGET_DIR:-target}/release/mailrelay]
#   QUIET_BUSY [25] QUIET_WAIT [30] (wait for a quiet second before each rep)
#   WORK [/var/tmp/mailrelay-bench-quota]
#   SMTP_PORT [12625] ADMIN_PORT [19425] REDIS_PORT [16479]
# Side effects: none outside $WORK. Refuses to run if a port is busy. Stops every
# process it started (by PID) on exit, also on error or Ctrl-C.
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
N=${N:-10000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-1024}
REPS=${REPS:-3}
QUOTAS=${QUOTAS:-"0 1 10 100"}
PROBE=${PROBE:-500}
LIMITS=${LIMITS:-"1000000000/1m, 1000000000/1h"}
BUILD=${BUILD:-1}
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
RELAY_BIN=${RELAY_BIN:-$TARGET/release/mailrelay}
QUIET_BUSY=${QUIET_BUSY:-25}
QUIET_WAIT=${QUIET_WAIT:-30}
WORK=${WORK:-/var/tmp/mailrelay-bench-quota}
SMTP_PORT=${SMTP_PORT:-12625}
ADMIN_PORT=${ADMIN_PORT:-19425}
REDIS_PORT=${REDIS_PORT:-16479}

die() { echo "quota.sh: $*" >&2; exit 2; }
for p in "$SMTP_PORT" "$ADMIN_PORT" "$REDIS_PORT"; do
  ss -Hltn "sport = :$p" | grep -q . && die "port $p is already in use (set *_PORT to free ones)"
done
command -v smtp-source >/dev/null || [ -x /usr/sbin/smtp-source ] || die "smtp-source missing (apt-get install postfix)"
SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
command -v redis-server >/dev/null || die "redis-server missing"

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {  # wait_port PORT WHAT
  for _ in $(seq 1 300); do
    ss -Hltn "sport = :$1" | grep -q . && return 0
    sleep 0.1
  done
  die "$2 did not listen on port $1"
}

rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

if [ "$BUILD" = 1 ]; then
  (cd "$REPO" && cargo build --release -p mailrelay >&2)
fi
[ -x "$RELAY_BIN" ] || die "no relay binary at $RELAY_BIN"

rm -rf "$WORK"
mkdir -p "$WORK/redis"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
UPTIME_BEFORE=$(uptime)

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --save '' \
  --appendonly yes --appendfsync everysec --daemonize no --logfile "$WORK/redis/redis.log" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT" redis-server

config() {  # config Q -> path
  local q=$1 f="$WORK/relay-q$1.yaml"
  {
    echo "hostname: bench.local"
    echo "listeners: [{name: smtp, address: '127.0.0.1:$SMTP_PORT'}]"
    echo "admin: {address: '127.0.0.1:$ADMIN_PORT'}"
    echo "queue: {redis: {url: 'redis://127.0.0.1:$REDIS_PORT', key_prefix: bench}}"
    echo "delivery: {enabled: false}"
    echo "log: {level: warn}"
    echo "limits: {max_connections_per_ip: 1000}"
    if [ "$q" -gt 0 ]; then
      echo "quotas:"
      for i in $(seq 1 "$q"); do
        echo "  - {name: q$i, direction: ingress, match: {senders: ['*@example.com']}, limits: [$LIMITS]}"
      done
    fi
  } >"$f"
  echo "$f"
}

metric() {  # metric NAME -> value from /metrics (0 if absent)
  curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v n="$1" '$1 == n {print $2; found=1} END {if (!found) print 0}'
}

: >"$WORK/runs.jsonl"
# Reps go round-robin over the quota counts, so that a burst of load from
# elsewhere on a shared machine spreads over all rows instead of skewing one.
for rep in $(seq 1 "$REPS"); do
  for q in $QUOTAS; do
    cfg=$(config "$q")
    rcli FLUSHALL >/dev/null
    rcli CONFIG RESETSTAT >/dev/null
    "$RELAY_BIN" serve --config "$cfg" 2>>"$WORK/relay-q$q.log" &
    RELAY_PID=$!
    PIDS+=("$RELAY_PID")
    wait_port "$SMTP_PORT" mailrelay
    # Warm-up session: connections to Redis made, scripts loaded.
    python3 "$BENCH_DIR/quota_probe.py" 127.0.0.1 "$SMTP_PORT" 20 "$SIZE" >/dev/null
    rcli CONFIG RESETSTAT >/dev/null
    timing=$(python3 "$BENCH_DIR/timer.py" --timeout 300 --server-pids "$RELAY_PID,$REDIS_PID" \
      --quiet-busy "$QUIET_BUSY" --quiet-wait "$QUIET_WAIT" -- \
      "$SMTP_SOURCE" -s "$SESSIONS" -m "$N" -l "$SIZE" -f sender@example.com \
      -t rcpt@example.net -M bench.local "127.0.0.1:$SMTP_PORT")
    evalsha=$(rcli INFO commandstats | tr -d '\r' | awk -F'[=,]' '/^cmdstat_evalsha:/ {print $2}')
    check_sum=$(metric mailrelay_quota_check_seconds_sum)
    check_count=$(metric mailrelay_quota_check_seconds_count)
    probe=$(python3 "$BENCH_DIR/quota_probe.py" 127.0.0.1 "$SMTP_PORT" "$PROBE" "$SIZE")
    queued=$(curl -s "http://127.0.0.1:$ADMIN_PORT/api/v1/queue/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')
    kill "$RELAY_PID"; wait "$RELAY_PID" 2>/dev/null || true
    python3 - "$q" "$rep" "$N" "$PROBE" "${evalsha:-0}" "$check_sum" "$check_count" "$queued" "$timing" "$probe" >>"$WORK/runs.jsonl" <<'EOF'
import json, sys
q, rep, n, probe_n, evalsha, csum, ccount, queued = sys.argv[1:9]
t, p = json.loads(sys.argv[9]), json.loads(sys.argv[10])
n, probe_n = int(n), int(probe_n)
ok = t["status"] == "ok" and int(queued) == n + 20 + probe_n and p["codes"] == {"250": probe_n}
print(json.dumps({
    "quotas": int(q), "rep": int(rep), "n": n, "ok": ok, "queued": int(queued),
    "msg_s": n / t["t_accept"], "t_accept": t["t_accept"],
    "server_cpu_ms_msg": 1000 * t["server_cpu"] / n, "total_cpu_ms_msg": 1000 * t["total_cpu"] / n,
    "evalsha_per_msg": int(evalsha) / n,
    "check_us": 1e6 * float(csum) / float(ccount) if float(ccount) else None,
    "probe": p, "pre_busy": t["pre_busy_pct"], "load1": t["load1"], "status": t["status"],
}))
EOF
    tail -n1 "$WORK/runs.jsonl" >&2
  done
done

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
REDIS_VERSION=$(redis-server --version | awk '{print $3}')
GIT_REV=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)

python3 - "$WORK/runs.jsonl" "$N" "$SESSIONS" "$SIZE" "$REPS" "$PROBE" "$LOAD_BEFORE" "$LOAD_AFTER" "$UPTIME_BEFORE" "$REDIS_VERSION" "$GIT_REV" "$LIMITS" <<'EOF' | tee "$WORK/report.md"
import json, statistics, sys, time
path, n, sessions, size, reps, probe, lb, la, up, rv, rev, limits = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
qs = sorted({r["quotas"] for r in rows})
def med(xs): return statistics.median(xs) if xs else float("nan")
base = med([r["msg_s"] for r in rows if r["quotas"] == 0 and r["ok"]])
base_p50 = med([r["probe"]["p50_ms"] for r in rows if r["quotas"] == 0 and r["ok"]])
print(f"## bench/quota.sh — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
print(f"mailrelay {rev} (release), Redis {rv} (AOF everysec), Redis queue; smtp-source -s {sessions} -m {n} -l {size}, "
      f"one message per session; {reps} reps per row (median [min-max]); latency probe: {probe} sequential messages in one session. "
      f"Each quota: `limits: [{limits}]`, matching every message (per sender).")
print(f"Load average before / after: {lb} / {la} (`uptime` before: {up.strip()}).\n")
base_cpu = med([r["total_cpu_ms_msg"] for r in rows if r["quotas"] == 0 and r["ok"]])
print("| matching quotas | ok/runs | accept msg/s | vs 0 quotas | Redis EVALSHA per msg | quota check incl. queue write (mean, µs) | "
      "MAIL→final reply p50 / p99 (ms) | added p50 (ms) | CPU ms/msg relay+redis | CPU ms/msg whole machine (vs 0) | pre-busy % max |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for q in qs:
    rs = [r for r in rows if r["quotas"] == q]
    ok = [r for r in rs if r["ok"]]
    rate = [r["msg_s"] for r in ok]
    m = med(rate)
    checks = [r["check_us"] for r in ok if r["check_us"] is not None]
    p50 = med([r["probe"]["p50_ms"] for r in ok])
    p99 = med([r["probe"]["p99_ms"] for r in ok])
    print(f"| {q} | {len(ok)}/{len(rs)} | {m:,.0f} [{min(rate):,.0f}-{max(rate):,.0f}] | "
          f"{(m / base - 1) * 100:+.1f} % | {med([r['evalsha_per_msg'] for r in ok]):.2f} | "
          f"{med(checks):.0f} | {p50:.2f} / {p99:.2f} | {p50 - base_p50:+.2f} | "
          f"{med([r['server_cpu_ms_msg'] for r in ok]):.3f} | "
          f"{med([r['total_cpu_ms_msg'] for r in ok]):.3f} ({(med([r['total_cpu_ms_msg'] for r in ok]) / base_cpu - 1) * 100:+.0f} %) | "
          f"{max(r['pre_busy'] for r in rs):.0f} |"
          if checks else
          f"| {q} | {len(ok)}/{len(rs)} | {m:,.0f} [{min(rate):,.0f}-{max(rate):,.0f}] | — | "
          f"{med([r['evalsha_per_msg'] for r in ok]):.2f} | — | {p50:.2f} / {p99:.2f} | — | "
          f"{med([r['server_cpu_ms_msg'] for r in ok]):.3f} | {med([r['total_cpu_ms_msg'] for r in ok]):.3f} | "
          f"{max(r['pre_busy'] for r in rs):.0f} |")
bad = [r for r in rows if not r["ok"]]
if bad:
    print(f"\n{len(bad)} rep(s) failed their correctness check: {bad}")
    sys.exit(1)
EOF
