#!/usr/bin/env bash
# bench/ingress.sh — ingress benchmark: mailrelay vs Postfix, side by side, one run.
#
# A benchmark, not a test. Measures on this machine, in one run:
#
# 1. Accept rate = N / wall time of one `smtp-source` run until it exits, i.e. until
#    every one of its N messages got its final reply (250 after DATA) and QUIT. One
#    message per SMTP session (smtp-source's default), like the Postfix anchor
#    (/work/shared/bench/postfix-anchor.sh):
#       smtp-source -s S -m N -l L -f sender@example.com -t rcpt@example.net \
#                   -M bench.local 127.0.0.1:PORT
#    for every scenario SIZE:SESSIONS in $SCENARIOS (default 1 KB and 100 KB bodies,
#    20 and 100 sessions; N=10000 for 1 KB, N_BIG=2000 for 100 KB so that one rep
#    stays short), REPS times each, against these backends ($BACKENDS):
#      direct        smtp-source -> smtp-sink, no relay: the ceiling of the load tools
#      embedded      mailrelay, embedded redb queue (group commit + fsync); a fresh
#                    relay process and a fresh queue directory for every rep
#      redis         mailrelay, Redis queue; a private redis-server with
#                    --appendonly yes --appendfsync everysec --save '' (data may lose
#                    up to ~1 s on a power cut: NOT fsync-per-message)
#      redis-always  the same Redis switched to --appendfsync always (fsync before
#                    every reply: the apples-to-apples durability comparison)
#      postfix       Postfix configured exactly like the anchor (relayhost =
#                    smtp-sink; every main.cf/master.cf setting copied from
#                    postfix-anchor.sh), run as a private instance (`postfix -c
#                    $WORK/postfix/etc`, queue in $WORK/postfix/spool on the same
#                    filesystem as /var/spool/postfix) so that nobody's `postfix stop`
#                    (.ci/install-deps runs one) hits it and /etc/postfix is untouched;
#                    "accept" = smtp-source finished, exactly as the anchor defines it.
#                    Postfix delivers to smtp-sink while it accepts, so this figure
#                    includes delivery competing for the CPU.
#      postfix-hold  the anchor's accept-only split: same Postfix, every message put
#                    on hold (smtpd_client_restrictions = check_client_access
#                    static:HOLD), so nothing is delivered during the run — the
#                    apples-to-apples figure while mailrelay has no delivery
#    Ratios mailrelay/Postfix are per scenario, on medians. Target: >= 3x Postfix.
#    Correctness is checked on every rep, a rep that fails a check is invalid and
#    excluded (and the script exits 1): mailrelay's /metrics
#    mailrelay_smtp_messages_accepted_total and /api/v1/queue/stats "messages" must
#    both equal N; Postfix: smtp-sink must receive exactly N more messages (postfix)
#    or the hold queue must hold exactly N (postfix-hold); smtp-source must exit 0.
#
# 2. Memory per idle connection: a fresh mailrelay (embedded queue), bench/idle_conns.py
#    opens IDLE_CONNS (10,000) connections from several 127.0.0.x addresses, reads
#    the 220, sends EHLO, reads the 250, then idles. KB per idle connection =
#    (VmRSS with - VmRSS before) / IDLE_CONNS (the relay's /proc/PID/status, the
#    baseline taken after 50 warm-up sessions). Target: <= 20 KB. The relay's
#    mailrelay_smtp_connections_active must equal the number held.
#
# 3. A markdown report on stdout and in $WORK/report.md (raw rows: $WORK/runs.jsonl,
#    $WORK/rss.json, $WORK/facts.json, logs in $WORK), with machine facts and an
#    fsync probe identical to the anchor's.
#
# Run (as root, Debian 12, from anywhere):   bash bench/ingress.sh
#   quick sanity pass (~2 min):              QUICK=1 bash bench/ingress.sh
#   only some parts:                         BACKENDS="embedded postfix" SCENARIOS="1024:20" RSS=0 bash bench/ingress.sh
# Knobs (environment), defaults in brackets:
#   N [10000] messages per rep for bodies < 100 KB; N_BIG [2000] for bodies >= 100 KB
#   REPS [3]  SCENARIOS ["1024:20 1024:100 102400:20 102400:100"] (SIZE:SESSIONS)
#   BACKENDS ["direct embedded redis redis-always postfix postfix-hold"]
#   RSS [1]  IDLE_CONNS [10000]  IDLE_SOURCES [10] (client addresses 127.0.0.2..)
#   BUILD [1] (cargo build --release -p mailrelay first)  RELAY_BIN [target/release/mailrelay]
#   COOLDOWN [2] s between reps  RUN_TIMEOUT [300] s per rep
#   QUIET_BUSY [25] QUIET_WAIT [30]: before each rep wait up to QUIET_WAIT s for a
#     second in which the CPUs are less than QUIET_BUSY % busy (the box may be shared;
#     the busy % of the last second before the rep is reported as "pre-busy")
#   WORK [/var/tmp/mailrelay-bench]
#   SMTP_PORT [12525] ADMIN_PORT [19325] PF_PORT [12535] SINK_PORT [12536] REDIS_PORT [16379]
#   QUICK=1 → N=1000 N_BIG=200 REPS=1 IDLE_CONNS=2000 COOLDOWN=1 (unless set explicitly)
#
# Side effects: none outside $WORK (the machine's Postfix configuration and queue are
# neither read nor changed). Refuses to run if a port is busy. Starts mailrelay,
# redis-server, smtp-sink and its private Postfix itself and stops each of them (by
# PID / `postfix -c DIR stop`) on exit, also on error, Ctrl-C or SIGTERM. Needs `ulimit -n` >=
# IDLE_CONNS + 1000 to be reachable (the hard limit is used).
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)

if [ "${QUICK:-0}" = 1 ]; then
  N=${N:-1000}; N_BIG=${N_BIG:-200}; REPS=${REPS:-1}; IDLE_CONNS=${IDLE_CONNS:-2000}; COOLDOWN=${COOLDOWN:-1}
fi
N=${N:-10000}
N_BIG=${N_BIG:-2000}
REPS=${REPS:-3}
SCENARIOS=${SCENARIOS:-"1024:20 1024:100 102400:20 102400:100"}
BACKENDS=${BACKENDS:-"direct embedded redis redis-always postfix postfix-hold"}
RSS=${RSS:-1}
IDLE_CONNS=${IDLE_CONNS:-10000}
IDLE_SOURCES=${IDLE_SOURCES:-10}
BUILD=${BUILD:-1}
RELAY_BIN=${RELAY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/mailrelay}
COOLDOWN=${COOLDOWN:-2}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
QUIET_BUSY=${QUIET_BUSY:-25}
QUIET_WAIT=${QUIET_WAIT:-30}
WORK=${WORK:-/var/tmp/mailrelay-bench}
SMTP_PORT=${SMTP_PORT:-12525}
ADMIN_PORT=${ADMIN_PORT:-19325}
PF_PORT=${PF_PORT:-12535}
SINK_PORT=${SINK_PORT:-12536}
REDIS_PORT=${REDIS_PORT:-16379}
PFDIR=$WORK/postfix                 # private Postfix instance: etc/, spool/, data/, maillog
PFC=$PFDIR/etc
MAILLOG=$PFDIR/maillog
MASTER_PID_FILE=$PFDIR/spool/pid/master.pid
SRC_ID=(-M bench.local -f sender@example.com -t rcpt@example.net)
ADMIN_URL="http://127.0.0.1:$ADMIN_PORT"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
has() { [[ " $BACKENDS " == *" $1 "* ]]; }
BENCH_NAME=ingress.sh
RELAY_MAX_CONNECTIONS=$((IDLE_CONNS + 1000))
# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root"
INVALID=0

# ---------------------------------------------------------------- tools
need=()
command -v python3 >/dev/null || need+=(python3)
command -v curl >/dev/null || need+=(curl)
if has postfix || has postfix-hold || has direct; then
  command -v postconf >/dev/null || need+=(postfix)
fi
if has redis || has redis-always; then command -v redis-server >/dev/null || need+=(redis-server); fi
if [ ${#need[@]} -gt 0 ]; then
  log "installing: ${need[*]}"
  echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
  echo 'postfix postfix/mailname string relay.bench.test' | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
for b in /usr/sbin/smtp-source /usr/sbin/smtp-sink; do [ -x "$b" ] || die "missing $b (Debian package postfix)"; done

# ---------------------------------------------------------------- preflight
if has postfix || has postfix-hold; then
  master_alive && die "a Postfix of a previous run is still running (pid $(tr -d ' ' < "$MASTER_PID_FILE")): postfix -c $PFC stop"
fi
for p in "$SMTP_PORT" "$ADMIN_PORT" "$PF_PORT" "$SINK_PORT" "$REDIS_PORT"; do
  ss -Hltn "sport = :$p" | grep -q . && die "port $p is already in use (set *_PORT to free ones)"
done
for sc in $SCENARIOS; do [[ $sc =~ ^[0-9]+:[0-9]+$ ]] || die "bad scenario '$sc' (want SIZE:SESSIONS)"; done

# fds: 10k idle connections need > 10k descriptors in the relay and in the client
hard=$(ulimit -Hn)
want=65536
[ "$hard" != unlimited ] && [ "$hard" -lt "$want" ] && { ulimit -Hn "$want" 2>/dev/null || want=$hard; }
ulimit -n "$want"
if [ "$RSS" = 1 ] && [ "$(ulimit -n)" -lt $((IDLE_CONNS + 1000)) ]; then
  die "ulimit -n is $(ulimit -n) (hard limit $hard, cannot raise it here); need >= $((IDLE_CONNS + 1000)) for IDLE_CONNS=$IDLE_CONNS"
fi

mkdir -p "$WORK"
rm -rf "$WORK"/queue-* "$WORK"/redis "$WORK"/*.log "$WORK"/runs.jsonl "$WORK"/rss.json "$WORK"/report.md "$WORK"/sink.*
: > "$WORK/runs.jsonl"

# ---------------------------------------------------------------- build
if [ "$BUILD" = 1 ]; then
  log "cargo build --release -p mailrelay"
  (cd "$REPO" && cargo build --release -p mailrelay) >"$WORK/build.log" 2>&1 || die "build failed: $(tail -20 "$WORK/build.log")"
fi
[ -x "$RELAY_BIN" ] || die "no relay binary at $RELAY_BIN (BUILD=1 builds it)"
GIT_REV=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
# shellcheck disable=SC2015  # `|| true`: grep -c exits 1 on a count of 0
GIT_DIRTY=$(cd "$REPO" && git status --porcelain 2>/dev/null | grep -v '^??' | grep -c . || true)

# ---------------------------------------------------------------- lifecycle
# stop_pid, wait_port, start_relay/stop_relay, metric, start_redis, redis_reset,
# start_sink, sink_count, the private Postfix instance (anchor settings): bench/lib.sh

cleanup() {
  local rc=$?
  set +e
  stop_relay
  stop_pid "$REDIS_PID"; REDIS_PID=""
  stop_postfix
  stop_pid "$SINK_PID"; SINK_PID=""
  return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'log "FATAL: command failed (rc=$?) at line $LINENO: $BASH_COMMAND"' ERR

# ---------------------------------------------------------------- one timed rep
# timed BACKEND SIZE SESSIONS N REP SERVER_PIDS THREADS_OF TARGET_PORT -> JSON of timer.py (stdout)
timed() {
  local backend=$1 size=$2 sess=$3 n=$4 rep=$5 spids=$6 thr=$7 port=$8 pfm=0
  case $backend in postfix*) pfm=$MASTER_PID;; esac
  python3 "$BENCH_DIR/timer.py" --timeout "$RUN_TIMEOUT" --server-pids "$spids" \
    --quiet-busy "$QUIET_BUSY" --quiet-wait "$QUIET_WAIT" \
    --tool-pids "$SINK_PID" --threads-of "${thr:-0}" --postfix-master "$pfm" -- \
    smtp-source -s "$sess" -m "$n" -l "$size" "${SRC_ID[@]}" "127.0.0.1:$port"
}
record() {            # record JSON_FROM_TIMER BACKEND SIZE SESSIONS N REP VERIFY_STATUS NOTE
  local t=$1 verdict=$7
  python3 - "$t" "$2" "$3" "$4" "$5" "$6" "$verdict" "$8" >> "$WORK/runs.jsonl" <<'PY'
import json, sys
t = json.loads(sys.argv[1])
t.update(backend=sys.argv[2], size=int(sys.argv[3]), sessions=int(sys.argv[4]), n=int(sys.argv[5]),
         rep=int(sys.argv[6]), verify=sys.argv[7], note=sys.argv[8])
if t['status'] == 'ok' and t['verify'] != 'ok':
    t['status'] = 'invalid: ' + t['verify']
print(json.dumps(t))
PY
  local line; line=$(tail -1 "$WORK/runs.jsonl")
  python3 - "$line" >&2 <<'PY'
import json, sys
r = json.loads(sys.argv[1])
rate = r['n'] / r['t_accept'] if r['t_accept'] else 0
srv = r['server_cpu']
print(f"    -> {r['status']}: {rate:,.0f} msg/s ({r['t_accept']:.2f} s), busy {r['busy_pct']:.0f}%, "
      f"cpu {1000*r['total_cpu']/r['n']:.3f} ms/msg (server {1000*srv/r['n']:.3f}, "
      f"smtp-source {1000*r['src_cpu']/r['n']:.3f}), pre-busy {r['pre_busy_pct']:.0f}%"
      + (f" (waited {r['quiet_waited_s']:.0f} s for quiet)" if r.get('quiet_waited_s') else '') + f", verify {r['verify']}"
      + (f", stderr: {r['stderr'][:120]}" if r['stderr'] else ''))
PY
  case $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["status"])' "$line") in
    ok) ;;
    *) INVALID=$((INVALID + 1)); log "    !! rep INVALID (excluded from the figures)";;
  esac
}

run_rep() {           # run_rep BACKEND SIZE SESSIONS N REP
  local backend=$1 size=$2 sess=$3 n=$4 rep=$5 t verdict note="" acc msgs before after held qdir spids pfm
  log "$backend size=$size sessions=$sess n=$n rep $rep/$REPS"
  case $backend in
    direct)
      before=$(sink_count)
      t=$(timed "$@" "" "" "$SINK_PORT")
      sleep 0.3; after=$(sink_count)
      verdict=ok; [ $((after - before)) -eq "$n" ] || verdict="sink got $((after - before)) of $n"
      ;;
    embedded|redis|redis-always)
      qdir="$WORK/queue-$backend-$size-$sess-$rep"
      rm -rf "$qdir"
      if [ "$backend" = embedded ]; then start_relay embedded "$qdir"
      else
        redis_reset
        note="appendfsync=$(rcli CONFIG GET appendfsync | tail -1)"
        start_relay redis ""
      fi
      spids=$RELAY_PID; [ "$backend" = embedded ] || spids="$RELAY_PID,$REDIS_PID"
      t=$(timed "$@" "$spids" "$RELAY_PID" "$SMTP_PORT")
      acc=$(metric mailrelay_smtp_messages_accepted_total)
      msgs=$(curl -fs "$ADMIN_URL/api/v1/queue/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')
      verdict=ok
      [ "${acc:-x}" = "$n" ] || verdict="accepted_total=${acc:-?} != $n"
      [ "${msgs:-x}" = "$n" ] || verdict="$verdict; queue messages=${msgs:-?} != $n"
      [ "$verdict" = ok ] || verdict=${verdict#ok; }
      stop_relay
      rm -rf "$qdir"
      ;;
    postfix)
      pf_ensure_running; pf_wait_empty; sleep "$COOLDOWN"
      before=$(sink_count); pfm=$MASTER_PID
      t=$(timed "$@" "" "" "$PF_PORT")
      pf_wait_empty
      sleep 0.5; after=$(sink_count)
      verdict=ok; [ $((after - before)) -eq "$n" ] || verdict="sink got $((after - before)) of $n"
      kill -0 "$pfm" 2>/dev/null || verdict="postfix master died during the rep; $verdict"
      ;;
    postfix-hold)
      pf_ensure_running; pf_wait_empty; sleep "$COOLDOWN"
      pfm=$MASTER_PID
      t=$(timed "$@" "" "" "$PF_PORT")
      held=$(find "$PFDIR/spool/hold" -type f | wc -l)
      verdict=ok; [ "$held" -eq "$n" ] || verdict="hold queue has $held of $n"
      kill -0 "$pfm" 2>/dev/null || verdict="postfix master died during the rep; $verdict"
      postsuper -c "$PFC" -d ALL hold >/dev/null 2>&1 || log "  !! postsuper -d ALL hold failed"
      ;;
  esac
  record "$t" "$backend" "$size" "$sess" "$n" "$rep" "$verdict" "$note"
  sleep "$COOLDOWN"
}

# ---------------------------------------------------------------- machine facts

log "machine: $(nproc) CPUs, $(uname -r); mailrelay $GIT_REV (+$GIT_DIRTY modified tracked files)"
log "N=$N N_BIG=$N_BIG REPS=$REPS SCENARIOS='$SCENARIOS' BACKENDS='$BACKENDS' RSS=$RSS IDLE_CONNS=$IDLE_CONNS work=$WORK"
FSYNC=$(fsync_probe)
log "fsync probe ($WORK): $FSYNC"
write_facts "$WORK/facts.json" "dict(N=$N, N_BIG=$N_BIG, REPS=$REPS, SCENARIOS='$SCENARIOS', BACKENDS='$BACKENDS', IDLE_CONNS=$IDLE_CONNS, COOLDOWN=$COOLDOWN)"

# ---------------------------------------------------------------- accept-rate runs
if has direct || has postfix || has postfix-hold; then start_sink; fi
if has redis || has redis-always; then start_redis; fi
if has postfix || has postfix-hold; then
  configure_postfix
  start_postfix
  timeout 30 swaks --server "127.0.0.1:$PF_PORT" --from sender@example.com --to rcpt@example.net \
    --helo bench.local --silent 2 >/dev/null || die "swaks smoke test through Postfix failed"
  pf_wait_empty
fi

# Scenario-major order: all backends of one scenario run back to back, so a drift in
# background load on the box hits the numbers that are compared with each other alike.
for sc in $SCENARIOS; do
  size=${sc%%:*}; sess=${sc##*:}
  n=$N; [ "$size" -ge 102400 ] && n=$N_BIG
  for backend in $BACKENDS; do
    case $backend in
      redis) rcli CONFIG SET appendfsync everysec >/dev/null ;;
      redis-always) rcli CONFIG SET appendfsync always >/dev/null ;;
      postfix-hold) pf_hold on ;;
      direct|embedded|postfix) ;;
      *) die "unknown backend $backend" ;;
    esac
    for rep in $(seq 1 "$REPS"); do run_rep "$backend" "$size" "$sess" "$n" "$rep"; done
    if [ "$backend" = postfix-hold ]; then pf_hold off; fi
  done
done

if [ "$MASTER_PID" -gt 0 ]; then
  pf_wait_empty
  grep -E 'warning|fatal|panic' "$MAILLOG" | sed -E 's/^.*(warning|fatal|panic)/\1/' | sort | uniq -c | sort -rn | head -5 | sed 's/^/  postfix log: /' >&2 || true
  grep -E 'warning|error|fatal|panic' "$MAILLOG" > "$WORK/maillog.warnings" || true
  tail -n 2000 "$MAILLOG" > "$WORK/maillog.tail"; : > "$MAILLOG"
  stop_postfix
  log "postfix stopped"
fi
stop_pid "$REDIS_PID"; REDIS_PID=""
stop_pid "$SINK_PID"; SINK_PID=""
rm -rf "$WORK/redis"

# ---------------------------------------------------------------- idle-connection RSS
if [ "$RSS" = 1 ]; then
  log "idle connections: $IDLE_CONNS to a fresh mailrelay (embedded), ulimit -n $(ulimit -n)"
  qdir="$WORK/queue-rss"; rm -rf "$qdir"
  start_relay embedded "$qdir"
  sources=$(seq -s, -f '127.0.0.%g' 2 $((IDLE_SOURCES + 1)))
  if python3 "$BENCH_DIR/idle_conns.py" --pid "$RELAY_PID" --port "$SMTP_PORT" --count "$IDLE_CONNS" \
       --sources "$sources" --metrics "$ADMIN_URL/metrics" > "$WORK/rss.json"; then
    log "  -> $(cat "$WORK/rss.json")"
  else
    INVALID=$((INVALID + 1)); log "  !! idle-connection run INVALID: $(cat "$WORK/rss.json")"
  fi
  stop_relay; rm -rf "$qdir"
fi

# ---------------------------------------------------------------- report
python3 "$BENCH_DIR/report.py" "$WORK" | tee "$WORK/report.md"
log "report: $WORK/report.md; raw: $WORK/runs.jsonl, $WORK/rss.json, $WORK/facts.json; logs: $WORK/*.log"
if [ "$INVALID" -gt 0 ]; then
  log "$INVALID invalid rep(s): see the table (ok/runs) and $WORK/runs.jsonl"
  exit 1
fi
