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
master_alive() { [ -s "$MASTER_PID_FILE" ] && kill -0 "$(tr -d ' ' < "$MASTER_PID_FILE")" 2>/dev/null; }
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
GIT_DIRTY=$(cd "$REPO" && git status --porcelain 2>/dev/null | grep -v '^??' | grep -c . || true)

# ---------------------------------------------------------------- lifecycle
RELAY_PID=""; REDIS_PID=""; SINK_PID=""; MASTER_PID=0
stop_pid() {          # stop_pid PID: SIGTERM, wait up to 10 s, then SIGKILL
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
}
wait_port() {         # wait_port PORT WHAT
  for _ in $(seq 1 100); do ss -Hltn "sport = :$1" | grep -q . && return 0; sleep 0.1; done
  die "$2 did not listen on port $1"
}

# mailrelay: start_relay BACKEND(embedded|redis) QUEUE_DIR
start_relay() {
  local backend=$1 qdir=$2 cfg="$WORK/relay-$1.yaml" queue
  if [ "$backend" = embedded ]; then
    queue="  backend: embedded
  path: $qdir"
  else
    queue="  backend: redis
  redis:
    url: redis://127.0.0.1:$REDIS_PORT/0"
  fi
  cat > "$cfg" <<EOF
# written by bench/ingress.sh
hostname: relay.bench.test
listeners:
  - name: smtp
    address: 127.0.0.1:$SMTP_PORT
    tls: none
relay_networks: [127.0.0.0/8]
limits:
  max_connections: $((IDLE_CONNS + 1000))
  max_connections_per_ip: $((IDLE_CONNS + 1000))
  max_message_size: 10485760
queue:
$queue
admin:
  address: 127.0.0.1:$ADMIN_PORT
log:
  level: warn
shutdown_grace: 5s
EOF
  "$RELAY_BIN" serve --config "$cfg" >>"$WORK/relay.log" 2>&1 &
  RELAY_PID=$!
  for _ in $(seq 1 100); do
    curl -fs "$ADMIN_URL/readyz" >/dev/null 2>&1 && ss -Hltn "sport = :$SMTP_PORT" | grep -q . && return 0
    kill -0 "$RELAY_PID" 2>/dev/null || die "mailrelay exited: $(tail -5 "$WORK/relay.log")"
    sleep 0.1
  done
  die "mailrelay not ready: $(tail -5 "$WORK/relay.log")"
}
stop_relay() { stop_pid "$RELAY_PID"; RELAY_PID=""; }

start_redis() {
  mkdir -p "$WORK/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" \
    --appendonly yes --appendfsync everysec --save '' --auto-aof-rewrite-percentage 0 \
    --daemonize no --logfile "$WORK/redis.log" &
  REDIS_PID=$!
  wait_port "$REDIS_PORT" redis-server
}
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }
redis_reset() {       # empty Redis and its AOF outside the timed window
  rcli FLUSHALL >/dev/null
  rcli BGREWRITEAOF >/dev/null
  for _ in $(seq 1 300); do
    rcli INFO persistence | tr -d '\r' | grep -Eq '^aof_rewrite_in_progress:0' &&
      rcli INFO persistence | tr -d '\r' | grep -Eq '^aof_rewrite_scheduled:0' && return 0
    sleep 0.1
  done
  die "redis AOF rewrite did not finish"
}

start_sink() {
  smtp-sink -c -u nobody -h sink.bench.test "127.0.0.1:$SINK_PORT" 1024 >> "$WORK/sink.out" 2>> "$WORK/sink.err" &
  SINK_PID=$!
  wait_port "$SINK_PORT" smtp-sink
}
sink_count() {        # messages smtp-sink has received so far (last complete record)
  python3 - "$WORK/sink.out" <<'PY'
import re, sys
d = open(sys.argv[1], 'rb').read()[-600:].decode('ascii', 'replace')
m = [re.search(r'mesg=(\d+)', r) for r in d.split('\r')[:-1]]
m = [x for x in m if x]
print(m[-1].group(1) if m else 0)
PY
}

# Postfix: configure_postfix/start_postfix/stop_postfix/wait-for-empty-queue are
# copied from /work/shared/bench/postfix-anchor.sh with the same main.cf and master.cf
# settings. Differences, all outside the measured path: a private instance
# (postfix -c $PFC; queue_directory/data_directory under $WORK, same filesystem),
# our ports, and the log file in $PFDIR.
configure_postfix() {
  rm -rf "$PFDIR"
  mkdir -p "$PFC" "$PFDIR/spool"        # postfix start creates the queue's subdirectories
  chmod 755 "$WORK" "$PFDIR"            # daemons drop root and must reach spool and log
  cat > "$PFC/main.cf" <<EOF
# written by mailrelay bench/ingress.sh (settings of postfix-anchor.sh) — pure loopback relay
# private instance:
queue_directory = $PFDIR/spool
data_directory = $PFDIR/data
maillog_file_prefixes = $PFDIR
# --- from here on identical to postfix-anchor.sh (ports aside) ---
compatibility_level = 3.6
myhostname = relay.anchor.test
mydomain = anchor.test
myorigin = \$myhostname
# no local delivery at all
mydestination =
relay_domains =
local_recipient_maps =
local_transport = error:5.1.1 local delivery disabled
alias_maps =
alias_database =
# loopback only; relay anything for loopback clients, to one smarthost
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:$SINK_PORT
# never touch DNS: no MX/A lookups (bracketed literal relayhost), no reverse lookup of clients
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
# concurrency
default_process_limit = 200
default_destination_concurrency_limit = 50
smtp_connection_cache_on_demand = yes
# plain text, no biff, no dot-domain rewriting
smtp_tls_security_level = none
smtpd_tls_security_level = none
append_dot_mydomain = no
biff = no
# there is no syslogd on the box: log to a file through postlogd
maillog_file = $MAILLOG
# everything else (queue fsync, in_flow_delay, timeouts, qmgr limits) = Postfix defaults
EOF
  cp /usr/share/postfix/master.cf.dist "$PFC/master.cf"   # Debian's stock master.cf
  postconf -c "$PFC" -M# smtp/inet                         # no port 25 listener
  postconf -c "$PFC" -M "127.0.0.1:$PF_PORT/inet=127.0.0.1:$PF_PORT inet n - n - - smtpd"
  postconf -c "$PFC" -F '*/*/chroot = n'
  : > "$MAILLOG"
}
start_postfix() {
  postfix -c "$PFC" start >/dev/null 2>&1 || die "postfix start failed: $(tail -5 "$MAILLOG")"
  for _ in $(seq 1 100); do
    master_alive && ss -Hltn "sport = :$PF_PORT" | grep -q . && break; sleep 0.1
  done
  master_alive || die "postfix master not running: $(tail -5 "$MAILLOG")"
  MASTER_PID=$(tr -d ' ' < "$MASTER_PID_FILE")
  log "postfix master pid $MASTER_PID"
}
stop_postfix() {
  [ "$MASTER_PID" -gt 0 ] 2>/dev/null || return 0
  postfix -c "$PFC" stop >/dev/null 2>&1 || kill -TERM "$MASTER_PID" 2>/dev/null || true
  for _ in $(seq 1 150); do kill -0 "$MASTER_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$MASTER_PID" 2>/dev/null; then kill -KILL "$MASTER_PID" 2>/dev/null || true; fi
  MASTER_PID=0
}
pf_ensure_running() { # somebody may have stopped it: say so, and restart it
  if [ "$MASTER_PID" -gt 0 ] && kill -0 "$MASTER_PID" 2>/dev/null; then return 0; fi
  log "  !! Postfix master $MASTER_PID is gone; restarting it"
  MASTER_PID=0; start_postfix
}
pf_queue_empty() { postqueue -c "$PFC" -p 2>/dev/null | tail -1 | grep -q 'Mail queue is empty'; }
pf_wait_empty() {
  for _ in $(seq 1 600); do pf_queue_empty && return 0; sleep 0.5; done
  die "Postfix queue did not empty: $(postqueue -c "$PFC" -p 2>&1 | tail -1)"
}
pf_hold() {           # pf_hold on|off
  if [ "$1" = on ]; then postconf -c "$PFC" -e 'smtpd_client_restrictions = check_client_access static:HOLD'
  else postconf -c "$PFC" -X smtpd_client_restrictions; fi
  postfix -c "$PFC" reload >/dev/null 2>&1 || log "  !! postfix reload failed"
  sleep 2
}

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
metric() {            # metric NAME: value from the relay's /metrics
  curl -fs "$ADMIN_URL/metrics" | awk -v m="$1" '$1 == m {print $2; exit}'
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
fsync_probe() {       # same as postfix-anchor.sh, in $WORK (same filesystem as the queues)
  python3 - "$WORK/fsync-probe" <<'PYEOF'
import os, sys, time
d = sys.argv[1]
os.makedirs(d, exist_ok=True)
payload = b'x' * 1400; N = 2000; lat = []
t0 = time.perf_counter()
for i in range(N):
    a = time.perf_counter()
    fd = os.open(f'{d}/{i}', os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    os.write(fd, payload); os.fsync(fd); os.close(fd)
    lat.append(time.perf_counter() - a)
el = time.perf_counter() - t0
for i in range(N): os.unlink(f'{d}/{i}')
os.rmdir(d); lat.sort()
print(f'create+write 1.4KB+fsync, serial: {N/el:,.0f}/s, p50 {lat[N//2]*1e6:.0f} us, p99 {lat[int(N*.99)]*1e6:.0f} us')
PYEOF
}
same_fs() { [ "$(stat -c %d "$WORK")" = "$(stat -c %d /var/spool/postfix 2>/dev/null || echo x)" ] && echo yes || echo no; }

log "machine: $(nproc) CPUs, $(uname -r); mailrelay $GIT_REV (+$GIT_DIRTY modified tracked files)"
log "N=$N N_BIG=$N_BIG REPS=$REPS SCENARIOS='$SCENARIOS' BACKENDS='$BACKENDS' RSS=$RSS IDLE_CONNS=$IDLE_CONNS work=$WORK"
FSYNC=$(fsync_probe)
log "fsync probe ($WORK): $FSYNC"
python3 - "$WORK/facts.json" <<PY
import json, os, platform, subprocess, sys, datetime
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception: return ''
cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
json.dump({
  'date': datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z'),
  'nproc': os.cpu_count(), 'cpu': cpu, 'kernel': platform.release(),
  'os': sh(". /etc/os-release; echo \$PRETTY_NAME"),
  'mem': sh("free -g | awk '/Mem:/ {print \$2\" GiB\"}'"),
  'postfix': sh("postconf -dh mail_version"), 'postfix_instance': "private: postfix -c $PFC (anchor settings)", 'redis': sh("redis-server --version | awk '{print \$3}'"),
  'mailrelay': "$GIT_REV (+$GIT_DIRTY modified tracked files, release build)",
  'fsync_probe': "$FSYNC", 'queue_fs_same_as_postfix_spool': "$(same_fs)",
  'ulimit_n': "$(ulimit -n)", 'tcp_tw_reuse': sh('sysctl -n net.ipv4.tcp_tw_reuse'),
  'knobs': dict(N=$N, N_BIG=$N_BIG, REPS=$REPS, SCENARIOS="$SCENARIOS", BACKENDS="$BACKENDS",
                IDLE_CONNS=$IDLE_CONNS, COOLDOWN=$COOLDOWN, QUICK="${QUICK:-0}"),
}, open(sys.argv[1], 'w'), indent=1)
PY

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
