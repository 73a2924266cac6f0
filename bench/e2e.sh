#!/usr/bin/env bash
# bench/e2e.sh — end-to-end benchmark: smtp-source -> relay -> smtp-sink, mailrelay
# beside Postfix, in one run.
#
# A benchmark, not a test. Measures on this machine, in one run:
#
# 1. End-to-end rate = N / wall time from starting one `smtp-source` run until
#    smtp-sink has received all N messages (counted by smtp-sink itself: `smtp-sink
#    -c` prints a running count per message). One message per SMTP session into
#    the relay (smtp-source's default), exactly as the Postfix anchor
#    (/work/shared/bench/postfix-anchor.sh) defines its end-to-end figure:
#       smtp-source -s S -m N -l L -f sender@example.com -t rcpt@example.net \
#                   -M bench.local 127.0.0.1:PORT
#    for every scenario SIZE:SESSIONS in $SCENARIOS, REPS times, against ($BACKENDS):
#      direct        smtp-source -> smtp-sink, no relay: the ceiling of the load tools
#      embedded      mailrelay, embedded redb queue (fsync per group commit); fresh
#                    relay process and queue directory per rep
#      redis         mailrelay, Redis queue; a private redis-server with
#                    --appendonly yes --appendfsync everysec --save ''
#      redis-always  the same Redis switched to --appendfsync always
#      postfix       Postfix configured exactly like the anchor (relayhost =
#                    [127.0.0.1]:smtp-sink, default_destination_concurrency_limit
#                    = 50, connection cache on demand, queue fsync, ...), as a
#                    private instance (`postfix -c $WORK/postfix/etc`)
#    Peers besides Postfix, from $PEERS (../shared/bench/peers: builds and policies with a
#    README), set up like the anchor: everything to the same smtp-sink, 50 outbound
#    connections, 100 messages per connection; fresh process and spool per rep:
#      kumomta       KumoMTA (kumod from $PEERS/kumomta/kumod.gz, policy relay.lua: RocksDB
#                    spool); unpacked once into $PEER_DIR. Checks: the sink count and
#                    kumod's total_messages_received = N, nothing left ready/scheduled
#      haraka        Haraka $HARAKA_VERSION (npm install once into $PEER_DIR/haraka; config
#                    and mx_static plugin from $PEERS/haraka; nodes=cpus: one worker per
#                    core, all counted as server CPU). Its outbound queue does not fsync.
#                    Checks: the sink count and an empty outbound queue directory
#    A peer whose files (or node/npm for Haraka) are missing is skipped with one line
#    saying so; the rest of the run goes on.
#    DKIM signing (the messages' From: is $SENDER, in $DKIM_DOMAIN; keys made per run
#    with openssl genpkey in $WORK/dkim):
#      dkim-ed25519  mailrelay, embedded queue, signing with an Ed25519 key
#      dkim-rsa      the same with an RSA-2048 key
#      dkim-both     the same with both keys (two signatures per message)
#      postfix-dkim  Postfix as above + Debian's OpenDKIM as its milter (smtpd_milters,
#                    milter_default_action = tempfail), signing with the same RSA-2048 key
#      postfix-dkim-ed25519  the same with the Ed25519 key
#    Provider presets (issue 18; the relay must have the shaping engine):
#      presets       mailrelay, embedded queue, with `providers: { presets: [all] }` and one
#                    user response rule whose destination selects the sink's route (so every
#                    delivery goes through rule selection; the sink answers 250, so no rule
#                    fires). The built-in presets select real providers' MX hosts/domains,
#                    not the sink: the figure is the cost of having them loaded and consulted.
#      redis-presets the same on the Redis queue (rule state shares its round trip)
#    Many senders (issue 21 item 4; SENDERS=K): the load comes from bench/smtp_senders.c
#    (built with cc into $WORK), which sends like smtp-source but message i from
#    s<i mod K>@example.com, so a per-sender quota sees K distinct keys:
#      quota         mailrelay, embedded queue, with one SendQuota-like ingress quota per
#                    sender: `{match: {senders: ['*@example.com']}, scope: per_key, key:
#                    sender, limits: [$QUOTA_LIMITS]}` (never reached: every message is
#                    checked, charged and accepted)
#      redis-quota   the same on the Redis queue (the check runs inside the enqueue script)
#    Delivery events (issue 19; `embedded`/`redis` have the event log on, its default):
#      events-off        mailrelay, embedded queue, `events: {enabled: false}`
#      events-hook       embedded queue, events on and a webhook (all tenants) posting
#                        every event to a local plain-HTTP receiver (Python,
#                        ThreadingHTTPServer answering 204; `allow_http: true`, the
#                        config's test-only switch); its POST count is in the row's note
#      redis-events-off  the same as events-off on the Redis queue
#      redis-events-hook the same as events-hook on the Redis queue
#    Published transport-security policies (issue 20; STS=1, which sets ROUTE=mx):
#      sts-off       mailrelay, embedded queue, `tls: opportunistic` with DANE off: STARTTLS
#                    to the sink, its certificate checked and recorded (not enforced)
#      sts-on        the same with `tls: auto`: DANE asked first (dnsmasq passes no DNSSEC,
#                    so after one failed probe a minute DANE is "unavailable"), then the
#                    MTA-STS policy of example.net (`_mta-sts` TXT at dnsmasq, the policy
#                    `mode: enforce, mx: mx.example.net` from a local Python HTTPS server
#                    with a per-run test CA): enforced, so every message goes over verified
#                    TLS. Checks: one policy fetch per rep, no MTA-STS failure
#    With STS=1 the sink is bench/tls_sink.c (built with cc into $WORK; OpenSSL, one thread
#    per connection, counts like `smtp-sink -c`) presenting a certificate for
#    mx.example.net from that CA, for both backends; reps interleave (INTERLEAVE=1).
#    Before the reps of every backend one message goes through it into a smtp-sink that
#    keeps it (-d): its DKIM-Signature a= tags must be the expected ones (none for the
#    unsigned embedded/postfix) and each signature must verify (dkimpy, keys from
#    $WORK/dkim); otherwise the backend's reps are skipped as invalid. mailrelay's
#    mailrelay_dkim_signatures_total{algorithm} must also be N per algorithm every rep.
#    CPU of opendkim (whole process, /proc/PID/stat) counts as server CPU.
#    mailrelay delivers to the same smtp-sink. ROUTE=smarthost (default): through
#    `delivery.smarthost` = 127.0.0.1:SINK_PORT, tls disabled — what Postfix's
#    bracketed relayhost does (no DNS). ROUTE=mx: by MX lookup of example.net at a
#    private dnsmasq (MX 10 mx.example.net, A 127.0.0.1, TTL $DNS_TTL s) with
#    delivery.dns.port_override = SINK_PORT (mailrelay only; Postfix keeps its
#    relayhost). mailrelay's delivery settings: $DELIVERY_YAML_EXTRA plus
#    max_concurrency=$DELIVERY_CONCURRENCY, per_destination_concurrency=$PER_DEST
#    (Postfix's limit for the relayhost is 50), max_messages_per_connection=$MSGS_PER_CONN.
#    Ratio = mailrelay median / Postfix median of the same scenario in the same run.
#    Target: >= 3x Postfix.
#
# 2. Drain of a DRAIN_N (100,000) message queue, per backend in $DRAIN_BACKENDS:
#    enqueue DRAIN_N messages (DRAIN_SIZE bytes, DRAIN_SESSIONS sessions) with
#    delivery off — mailrelay: a relay with `delivery.enabled: false`; Postfix: every
#    message put on hold (the anchor's accept-only split) — then start delivery and
#    time until smtp-sink has all DRAIN_N. mailrelay: the timer starts a fresh relay
#    process with delivery enabled on that queue (start-up included in the time);
#    Postfix: `postsuper -H ALL` (untimed: hold -> deferred), then the timer runs
#    `postqueue -f`. Drain rate = DRAIN_N / drain time.
#
# Correctness is checked on every rep; a rep that fails a check is excluded and the
# script exits 1: smtp-sink must count exactly N more messages (a later one is a
# duplicate; it watches SETTLE s more), mailrelay's mailrelay_smtp_messages_accepted_total
# must be N and its queue must end empty (/api/v1/queue/stats "messages" = 0, every
# message finished), Postfix's queue must end empty; for a drain the queue must hold
# exactly DRAIN_N before delivery starts.
#
# Output: a markdown report on stdout and in $WORK/report.md (raw rows
# $WORK/runs.jsonl, machine facts $WORK/facts.json, logs in $WORK). Every row carries
# the load average (`uptime`) taken right before it.
#
# Run (as root, Debian 12):                  bash bench/e2e.sh
#   quick correctness pass (~3 min):         QUICK=1 bash bench/e2e.sh
#   a subset:                                BACKENDS="embedded postfix" SCENARIOS="1024:20" DRAIN=0 bash bench/e2e.sh
#   the provider-preset cost:                PRESETS=1 bash bench/e2e.sh
#     (= SCENARIOS=1024:20 REPS=3 DRAIN=0 BACKENDS="embedded presets redis redis-presets", unless set)
#   ingress quotas with 10,000 senders:     SENDERS=10000 bash bench/e2e.sh
#     (= N=20000 SCENARIOS=1024:20 REPS=3 DRAIN=0 INTERLEAVE=1 BACKENDS="direct embedded
#        quota redis redis-quota", unless set)
#   the DKIM comparison:                     DKIM=1 bash bench/e2e.sh
#     (= SCENARIOS=1024:20 REPS=2 DRAIN=0 BACKENDS="embedded dkim-ed25519 dkim-rsa dkim-both
#        postfix postfix-dkim postfix-dkim-ed25519", unless set)
#   the event log's cost (10 % budget):      EVENTS=1 bash bench/e2e.sh
#     (= SCENARIOS=1024:20 REPS=2 DRAIN=0 BACKENDS="events-off embedded events-hook
#        redis-events-off redis redis-events-hook", unless set)
# Knobs (environment), defaults in brackets:
#   N [10000]  REPS [3]  SCENARIOS ["1024:20 1024:100 10240:20"] (SIZE:SESSIONS)
#   BACKENDS ["direct embedded redis redis-always postfix kumomta haraka"]
#   PEERS [$REPO/../shared/bench/peers]  PEER_DIR [/var/tmp/mailrelay-peers] (unpacked kumod,
#   Haraka's npm install; kept between runs)  HARAKA_VERSION [3.3.4]
#   DRAIN [1]  DRAIN_N [100000]  DRAIN_SIZE [1024]  DRAIN_SESSIONS [100]
#   DRAIN_BACKENDS ["embedded redis postfix"]
#   ROUTE [smarthost] (or mx)  DNS_TTL [300]
#   DELIVERY_CONCURRENCY [50]  PER_DEST [50]  MSGS_PER_CONN [100]
#   DELIVERY_YAML_EXTRA [""] more `delivery:` keys, e.g. "  poll_interval: 200ms"
#   RELAY_THREADS [1] the relay's worker threads; empty: one per CPU (tokio's default).
#                    One by default: on this 2-core machine the load tools and Redis take
#                    the other core, and a second thread costs more than it brings
#                    (docs/capacity.md, "Worker threads"); the report says which ran
#   RELAY_YAML_EXTRA [""] more top-level relay config, e.g. "events: {enabled: false}"
#                    (what the delivery event log costs: run with and without)
#   BUILD [1] (cargo build --release -p mailrelay first)  RELAY_BIN [$CARGO_TARGET_DIR/release/mailrelay]
#   COOLDOWN [2]  RUN_TIMEOUT [300]  DRAIN_TIMEOUT [1800]  SETTLE [1] s
#   QUIET_BUSY [25] QUIET_WAIT [30] (wait for a quiet second before each rep)
#   WORK [/var/tmp/mailrelay-e2e]
#   SMTP_PORT [13525] ADMIN_PORT [19425] PF_PORT [13535] SINK_PORT [13536]
#   REDIS_PORT [16479] DNS_PORT [13553] MILTER_PORT [13537] PEER_PORT [13545] PEER_HTTP_PORT [13580] HOOK_PORT [13538]
#   REDIS_ARGS [the chart's Redis tuning, bench/lib.sh]: more redis-server arguments; set
#   and empty for Redis's own defaults
#   SENDER [sender@bench.example with a DKIM backend, else sender@example.com]
#   SENDERS [0: smtp-source, one sender] K>0: bench/smtp_senders with K senders
#   INTERLEAVE [0] 1: reps round-robin over the backends (rep 1 of each, then rep 2, ...)
#   QUOTA_LIMITS ["1000/1m, 10000/1h, 100000/1d"] (per sender; the quota backends)
#   QUICK=1 -> N=1000 REPS=1 DRAIN_N=5000 COOLDOWN=1 (unless set explicitly)
#   STS [0] 1: the policies-on bench (BACKENDS "sts-off sts-on", ROUTE=mx, SCENARIOS 1024:20,
#   REPS 3, DRAIN 0, INTERLEAVE 1)  STS_PORT [13543] (the MTA-STS HTTPS server)
#
# Side effects: none outside $WORK, but OpenDKIM's configuration and key copy in
# $OPENDKIM_DIR (lib.sh; removed when opendkim stops). Refuses to run if a port is busy.
# Starts mailrelay, redis-server, smtp-sink, dnsmasq (ROUTE=mx), its private Postfix
# and opendkim, and stops each of them by PID (`postfix -c DIR stop`) on exit, also on
# error, Ctrl-C or SIGTERM.
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)

if [ "${QUICK:-0}" = 1 ]; then
  N=${N:-1000}; REPS=${REPS:-1}; DRAIN_N=${DRAIN_N:-5000}; COOLDOWN=${COOLDOWN:-1}
fi
if [ "${PRESETS:-0}" = 1 ]; then
  SCENARIOS=${SCENARIOS:-1024:20}; REPS=${REPS:-3}; DRAIN=${DRAIN:-0}
  BACKENDS=${BACKENDS:-"embedded presets redis redis-presets"}
fi
if [ "${EVENTS:-0}" = 1 ]; then
  SCENARIOS=${SCENARIOS:-1024:20}; REPS=${REPS:-2}; DRAIN=${DRAIN:-0}
  BACKENDS=${BACKENDS:-"events-off embedded events-hook redis-events-off redis redis-events-hook"}
fi
if [ "${STS:-0}" = 1 ]; then
  ROUTE=mx; SCENARIOS=${SCENARIOS:-1024:20}; REPS=${REPS:-3}; DRAIN=${DRAIN:-0}; INTERLEAVE=${INTERLEAVE:-1}
  BACKENDS=${BACKENDS:-"sts-off sts-on"}
fi
STS=${STS:-0}
if [ "${SENDERS:-0}" -gt 0 ]; then
  N=${N:-20000}; SCENARIOS=${SCENARIOS:-1024:20}; REPS=${REPS:-3}; DRAIN=${DRAIN:-0}; INTERLEAVE=${INTERLEAVE:-1}
  BACKENDS=${BACKENDS:-"direct embedded quota redis redis-quota"}
fi
SENDERS=${SENDERS:-0}
INTERLEAVE=${INTERLEAVE:-0}
QUOTA_LIMITS=${QUOTA_LIMITS:-"1000/1m, 10000/1h, 100000/1d"}
if [ "${DKIM:-0}" = 1 ]; then
  SCENARIOS=${SCENARIOS:-1024:20}; REPS=${REPS:-2}; DRAIN=${DRAIN:-0}
  BACKENDS=${BACKENDS:-"embedded dkim-ed25519 dkim-rsa dkim-both postfix postfix-dkim postfix-dkim-ed25519"}
fi
N=${N:-10000}
REPS=${REPS:-3}
SCENARIOS=${SCENARIOS:-"1024:20 1024:100 10240:20"}
BACKENDS=${BACKENDS:-"direct embedded redis redis-always postfix kumomta haraka"}
PEERS=${PEERS:-$REPO/../shared/bench/peers}
PEER_DIR=${PEER_DIR:-/var/tmp/mailrelay-peers}
HARAKA_VERSION=${HARAKA_VERSION:-3.3.4}
DRAIN=${DRAIN:-1}
DRAIN_N=${DRAIN_N:-100000}
DRAIN_SIZE=${DRAIN_SIZE:-1024}
DRAIN_SESSIONS=${DRAIN_SESSIONS:-100}
DRAIN_BACKENDS=${DRAIN_BACKENDS:-"embedded redis postfix"}
ROUTE=${ROUTE:-smarthost}
DNS_TTL=${DNS_TTL:-300}
DELIVERY_CONCURRENCY=${DELIVERY_CONCURRENCY:-50}
PER_DEST=${PER_DEST:-50}
MSGS_PER_CONN=${MSGS_PER_CONN:-100}
DELIVERY_YAML_EXTRA=${DELIVERY_YAML_EXTRA:-}
RELAY_YAML_EXTRA=${RELAY_YAML_EXTRA:-}
RELAY_THREADS=${RELAY_THREADS-1}
export RELAY_THREADS
BUILD=${BUILD:-1}
RELAY_BIN=${RELAY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/mailrelay}
COOLDOWN=${COOLDOWN:-2}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-1800}
SETTLE=${SETTLE:-1}
QUIET_BUSY=${QUIET_BUSY:-25}
QUIET_WAIT=${QUIET_WAIT:-30}
WORK=${WORK:-/var/tmp/mailrelay-e2e}
SMTP_PORT=${SMTP_PORT:-13525}
ADMIN_PORT=${ADMIN_PORT:-19425}
PF_PORT=${PF_PORT:-13535}
SINK_PORT=${SINK_PORT:-13536}
REDIS_PORT=${REDIS_PORT:-16479}
DNS_PORT=${DNS_PORT:-13553}
MILTER_PORT=${MILTER_PORT:-13537}
PEER_PORT=${PEER_PORT:-13545}
PEER_HTTP_PORT=${PEER_HTTP_PORT:-13580}
HOOK_PORT=${HOOK_PORT:-13538}
STS_PORT=${STS_PORT:-13543}
STS_PID=""
HOOK_PID=""
DKIM_DOMAIN=bench.example
case " $BACKENDS " in *" dkim-"*|*" postfix-dkim"*) ANY_DKIM=1 ;; *) ANY_DKIM=0 ;; esac
if [ "$ANY_DKIM" = 1 ]; then SENDER=${SENDER:-sender@$DKIM_DOMAIN}; else SENDER=${SENDER:-sender@example.com}; fi
PFDIR=$WORK/postfix                 # private Postfix instance: etc/, spool/, data/, maillog
PFC=$PFDIR/etc
MAILLOG=$PFDIR/maillog
MASTER_PID_FILE=$PFDIR/spool/pid/master.pid
SRC_ID=(-M bench.local -f "$SENDER" -t rcpt@example.net)
ADMIN_URL="http://127.0.0.1:$ADMIN_PORT"
BG_PID_FILE=$WORK/relay-bg.pid      # a relay started by timer.py --background

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
has() { [[ " $1 " == *" $2 "* ]]; }   # has LIST WORD
any_pf() { has "$BACKENDS" postfix || has "$BACKENDS" postfix-dkim || has "$BACKENDS" postfix-dkim-ed25519 || { [ "$DRAIN" = 1 ] && has "$DRAIN_BACKENDS" postfix; }; }
any_redis() { has "$BACKENDS" redis || has "$BACKENDS" redis-always || has "$BACKENDS" redis-presets || has "$BACKENDS" redis-quota || has "$BACKENDS" redis-events-off || has "$BACKENDS" redis-events-hook || { [ "$DRAIN" = 1 ] && has "$DRAIN_BACKENDS" redis; }; }
BENCH_NAME=e2e.sh
# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root"
INVALID=0
DNS_PID=""
PEER_PID=""

# ---------------------------------------------------------------- tools + preflight
install_tools "$([ "$STS" = 1 ] && echo openssl:openssl || echo true:coreutils)" python3:python3 curl:curl postconf:postfix smtp-source:postfix redis-server:redis-server \
  "$([ "$ROUTE" = mx ] && echo dnsmasq:dnsmasq-base || echo true:coreutils)" \
  "$([ "$ANY_DKIM" = 1 ] && echo openssl:openssl || echo true:coreutils)" \
  "$(case " $BACKENDS " in *" postfix-dkim"*) echo opendkim:opendkim opendkim-testkey:opendkim-tools ;; *) echo true:coreutils ;; esac)"
for b in /usr/sbin/smtp-source /usr/sbin/smtp-sink; do [ -x "$b" ] || die "missing $b (Debian package postfix)"; done
case $ROUTE in smarthost|mx) ;; *) die "ROUTE must be smarthost or mx";; esac
if any_pf; then
  master_alive && die "a Postfix of a previous run is still running (pid $(tr -d ' ' < "$MASTER_PID_FILE")): postfix -c $PFC stop"
fi
for p in "$SMTP_PORT" "$ADMIN_PORT" "$PF_PORT" "$SINK_PORT" "$REDIS_PORT" "$DNS_PORT" "$MILTER_PORT" "$PEER_PORT" "$PEER_HTTP_PORT" "$HOOK_PORT" "$STS_PORT"; do
  port_busy "$p" && die "port $p is already in use (set *_PORT to free ones)"
done
for sc in $SCENARIOS; do [[ $sc =~ ^[0-9]+:[0-9]+$ ]] || die "bad scenario '$sc' (want SIZE:SESSIONS)"; done
for b in $BACKENDS; do case $b in direct|embedded|redis|redis-always|postfix|dkim-ed25519|dkim-rsa|dkim-both|postfix-dkim|postfix-dkim-ed25519|presets|redis-presets|quota|redis-quota|kumomta|haraka|events-off|events-hook|redis-events-off|redis-events-hook|sts-off|sts-on) ;; *) die "unknown backend $b";; esac; done
if has "$BACKENDS" sts-off || has "$BACKENDS" sts-on; then
  [ "$STS" = 1 ] || die "the sts-* backends need STS=1 (TLS sink, MTA-STS server)"
fi
for b in $DRAIN_BACKENDS; do case $b in embedded|redis|redis-always|postfix) ;; *) die "unknown drain backend $b";; esac; done
ulimit -n 65536 2>/dev/null || true

mkdir -p "$WORK"
rm -rf "$WORK"/queue-* "$WORK"/redis "$WORK"/*.log "$WORK"/runs.jsonl "$WORK"/report.md "$WORK"/sink.* "$BG_PID_FILE" \
  "$WORK"/samples.jsonl "$WORK"/sample-* "$WORK"/samples-*.csv "$WORK"/dkim "$WORK"/opendkim-*.conf
: > "$WORK/runs.jsonl"
[ "$ANY_DKIM" = 1 ] && dkim_keys "$WORK/dkim"

# ---------------------------------------------------------------- build
if [ "$BUILD" = 1 ]; then
  log "cargo build --release -p mailrelay"
  (cd "$REPO" && cargo build --release -p mailrelay) >"$WORK/build.log" 2>&1 || die "build failed: $(tail -20 "$WORK/build.log")"
fi
[ -x "$RELAY_BIN" ] || die "no relay binary at $RELAY_BIN (BUILD=1 builds it)"
if [ "$SENDERS" -gt 0 ]; then
  cc -O2 -o "$WORK/smtp_senders" "$BENCH_DIR/smtp_senders.c" || die "cc bench/smtp_senders.c failed"
fi
GIT_REV=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
# shellcheck disable=SC2015  # `|| true`: grep -c exits 1 on a count of 0
GIT_DIRTY=$(cd "$REPO" && git status --porcelain 2>/dev/null | grep -v '^??' | grep -c . || true)

# ---------------------------------------------------------------- peers (KumoMTA, Haraka)
# Each peer is prepared once (unpack / npm install into $PEER_DIR, kept between runs) and
# dropped from BACKENDS, with one line saying why, when its files or tools are missing.
PEERS_SKIPPED=""
PEER_PIDS=""
skip_peer() {         # skip_peer BACKEND WHY
  log "$1: skipped ($2)"
  PEERS_SKIPPED="$PEERS_SKIPPED$1: $2; "
  BACKENDS=$(printf ' %s ' "$BACKENDS" | sed "s/ $1 / /g; s/^ *//; s/ *$//")
}
prepare_kumomta() {
  if [ ! -f "$PEERS/kumomta/kumod.gz" ] || [ ! -f "$PEERS/kumomta/relay.lua" ]; then
    skip_peer kumomta "no $PEERS/kumomta/kumod.gz + relay.lua (../shared absent)"; return 0
  fi
  mkdir -p "$PEER_DIR"
  if [ ! -x "$PEER_DIR/kumod" ] || [ "$PEERS/kumomta/kumod.gz" -nt "$PEER_DIR/kumod" ]; then
    gunzip -c "$PEERS/kumomta/kumod.gz" > "$PEER_DIR/kumod.tmp" && chmod 755 "$PEER_DIR/kumod.tmp" &&
      mv "$PEER_DIR/kumod.tmp" "$PEER_DIR/kumod"
  fi
  KUMO_VERSION=$("$PEER_DIR/kumod" --version 2>/dev/null) ||
    { skip_peer kumomta "$PEER_DIR/kumod does not run (needs libssl3 and libsqlite3-0)"; return 0; }
  log "kumomta: $KUMO_VERSION"
}
HARAKA_HOME=$PEER_DIR/haraka
HARAKA_INST=$WORK/haraka-instance
prepare_haraka() {
  local f
  for f in mx_static.js plugins smtp.ini outbound.ini relay.ini relay_acl_allow log.ini; do
    [ -f "$PEERS/haraka/$f" ] || { skip_peer haraka "no $PEERS/haraka/$f (../shared absent)"; return 0; }
  done
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    skip_peer haraka "node and npm are missing (Debian: nodejs npm)"; return 0
  fi
  if ! grep -qs "\"version\": \"$HARAKA_VERSION\"" "$HARAKA_HOME/node_modules/Haraka/package.json"; then
    log "haraka: npm install Haraka@$HARAKA_VERSION into $HARAKA_HOME"
    mkdir -p "$HARAKA_HOME"
    (cd "$HARAKA_HOME" && npm install --no-audit --no-fund "Haraka@$HARAKA_VERSION") > "$WORK/npm.log" 2>&1 ||
      { skip_peer haraka "npm install Haraka@$HARAKA_VERSION failed: $(tail -2 "$WORK/npm.log")"; return 0; }
  fi
  # the instance: Haraka's defaults plus the peer set-up's files, listening on PEER_PORT
  rm -rf "$HARAKA_INST"
  "$HARAKA_HOME/node_modules/.bin/haraka" -i "$HARAKA_INST" > "$WORK/haraka-install.log" 2>&1 ||
    { skip_peer haraka "haraka -i failed: $(tail -2 "$WORK/haraka-install.log")"; return 0; }
  chmod -R u+w "$HARAKA_INST"
  for f in plugins smtp.ini outbound.ini relay.ini relay_acl_allow log.ini; do
    cp "$PEERS/haraka/$f" "$HARAKA_INST/config/$f"
  done
  chmod -R u+w "$HARAKA_INST/config"
  mkdir -p "$HARAKA_INST/plugins"; cp "$PEERS/haraka/mx_static.js" "$HARAKA_INST/plugins/"
  sed -i "s/^listen=.*/listen=127.0.0.1:$PEER_PORT/" "$HARAKA_INST/config/smtp.ini"
  HARAKA_VERSION_RUN=$(node -p "require('$HARAKA_HOME/node_modules/Haraka/package.json').version")
  log "haraka: $HARAKA_VERSION_RUN (node $(node --version))"
}
start_peer() {        # start_peer BACKEND: fresh spool/queue; sets PEER_PID and PEER_PIDS (server CPU)
  case $1 in
    kumomta)
      rm -rf "$WORK/kumo-spool"; mkdir -p "$WORK/kumo-spool"; chown nobody "$WORK/kumo-spool"; chmod 755 "$WORK"
      SMTP_PORT=$PEER_PORT HTTP_PORT=$PEER_HTTP_PORT SINK_PORT=$SINK_PORT KUMO_SPOOL=$WORK/kumo-spool \
        "$PEER_DIR/kumod" --policy "$PEERS/kumomta/relay.lua" --user nobody >> "$WORK/kumod.log" 2>&1 &
      PEER_PID=$!
      wait_port "$PEER_PORT" kumod; wait_port "$PEER_HTTP_PORT" "kumod (http)"
      PEER_PIDS=$PEER_PID
      ;;
    haraka)
      rm -rf "$HARAKA_INST/queue"
      SINK_PORT=$SINK_PORT "$HARAKA_HOME/node_modules/.bin/haraka" -c "$HARAKA_INST" >> "$WORK/haraka.log" 2>&1 &
      PEER_PID=$!
      wait_port "$PEER_PORT" haraka
      sleep 1                                  # the other workers start beside the first
      # the master and its workers (nodes=cpus): listed, not matched by name
      PEER_PIDS=$(printf '%s' "$PEER_PID"; ps -o pid= --ppid "$PEER_PID" | tr -d ' ' | sed 's/^/,/' | tr -d '\n')
      ;;
  esac
}
stop_peer() {
  local p
  stop_pid "$PEER_PID"; PEER_PID=""
  for p in ${PEER_PIDS//,/ }; do stop_pid "$p"; done
  PEER_PIDS=""
}
peer_check() {        # peer_check BACKEND N -> "" or what is wrong (after the sink has all N)
  local n=$2 v left
  case $1 in
    kumomta)
      v=$(curl -fs "http://127.0.0.1:$PEER_HTTP_PORT/metrics" |
        awk '$1 == "total_messages_received{service=\"esmtp_listener\"}" {r = $2}
             $1 == "total_messages_delivered{service=\"smtp_client\"}" {d = $2} END {print r + 0, d + 0}')
      [ "$v" = "$n $n" ] || printf '; kumod received/delivered %s != %s' "$v" "$n"
      ;;
    haraka)
      for _ in $(seq 1 100); do
        left=$(find "$HARAKA_INST/queue" -type f 2>/dev/null | wc -l); [ "$left" = 0 ] && break; sleep 0.1
      done
      [ "$left" = 0 ] || printf '; haraka queue still holds %s files' "$left"
      ;;
  esac
}
has "$BACKENDS" kumomta && prepare_kumomta
has "$BACKENDS" haraka && prepare_haraka

# ---------------------------------------------------------------- relay delivery settings
if [ "$ROUTE" = smarthost ]; then
  ROUTE_YAML="  smarthost:
    host: 127.0.0.1
    port: $SINK_PORT
    tls: disabled"
else
  ROUTE_YAML="  tls: disabled
  dns:
    nameservers: [\"127.0.0.1:$DNS_PORT\"]
    port_override: $SINK_PORT"
fi
DELIVERY_YAML="  enabled: true
  max_concurrency: $DELIVERY_CONCURRENCY
  per_destination_concurrency: $PER_DEST
  max_messages_per_connection: $MSGS_PER_CONN
$ROUTE_YAML"
[ -n "$DELIVERY_YAML_EXTRA" ] && DELIVERY_YAML="$DELIVERY_YAML
$DELIVERY_YAML_EXTRA"

start_dns() {         # dnsmasq: example.net MX 10 mx.example.net, mx.example.net A 127.0.0.1
  local sts=()
  # STS=1: example.net publishes an MTA-STS policy (its host on 127.0.0.1)
  [ "$STS" = 1 ] && sts=(--txt-record=_mta-sts.example.net,"v=STSv1; id=bench1" --host-record=mta-sts.example.net,127.0.0.1)
  /usr/sbin/dnsmasq --keep-in-foreground --port="$DNS_PORT" --listen-address=127.0.0.1 \
    --bind-interfaces --no-resolv --no-hosts --conf-file=/dev/null --pid-file \
    --log-facility="$WORK/dnsmasq.log" --local=/example.net/ --local-ttl="$DNS_TTL" \
    --mx-host=example.net,mx.example.net,10 --host-record=mx.example.net,127.0.0.1 "${sts[@]}" &
  DNS_PID=$!
  for _ in $(seq 1 100); do ss -Hlun "sport = :$DNS_PORT" | grep -q . && return 0; sleep 0.1; done
  die "dnsmasq did not listen on $DNS_PORT: $(tail -3 "$WORK/dnsmasq.log")"
}

cleanup() {
  local rc=$?
  set +e
  stop_relay
  stop_pid "$SAMPLER_PID"
  if [ -s "$BG_PID_FILE" ]; then stop_pid "$(cat "$BG_PID_FILE")"; rm -f "$BG_PID_FILE"; fi
  stop_pid "$REDIS_PID"; REDIS_PID=""
  stop_pid "$HOOK_PID"; HOOK_PID=""
  stop_postfix
  stop_pid "$SINK_PID"; SINK_PID=""
  stop_pid "$DNS_PID"; DNS_PID=""
  stop_pid "$STS_PID"; STS_PID=""
  stop_peer
  stop_opendkim
  return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'log "FATAL: command failed (rc=$?) at line $LINENO: $BASH_COMMAND"' ERR

# ---------------------------------------------------------------- one timed run
# timer TIMEOUT EXPECT SERVER_PIDS THREADS_OF PFMASTER [timer flags...] -- CMD...: JSON (stdout)
timer() {
  local timeout=$1 expect=$2 spids=$3 thr=$4 pfm=$5; shift 5
  log "  uptime: $(uptime)"
  python3 "$BENCH_DIR/timer.py" --timeout "$timeout" --server-pids "$spids" \
    --quiet-busy "$QUIET_BUSY" --quiet-wait "$QUIET_WAIT" --settle "$SETTLE" \
    --tool-pids "$SINK_PID" --threads-of "${thr:-0}" --postfix-master "${pfm:-0}" \
    --sink-out "$WORK/sink.out" --sink-expect "$expect" "$@"
}
source_cmd() {        # source_cmd SESSIONS N SIZE PORT
  if [ "$SENDERS" -gt 0 ]; then
    echo "$WORK/smtp_senders" -s "$1" -m "$2" -l "$3" -n "$SENDERS" -d example.com -t rcpt@example.net -M bench.local "127.0.0.1:$4"
    return
  fi
  echo smtp-source -s "$1" -m "$2" -l "$3" "${SRC_ID[@]}" "127.0.0.1:$4"
}
# record JSON PHASE BACKEND SIZE SESSIONS N REP VERIFY NOTE
record() {
  python3 - "$@" >> "$WORK/runs.jsonl" <<'PY'
import json, sys
t = json.loads(sys.argv[1])
t.update(phase=sys.argv[2], backend=sys.argv[3], size=int(sys.argv[4]), sessions=int(sys.argv[5]),
         n=int(sys.argv[6]), rep=int(sys.argv[7]), verify=sys.argv[8], note=sys.argv[9])
if t['status'] == 'ok' and t['verify'] != 'ok':
    t['status'] = 'invalid: ' + t['verify']
print(json.dumps(t))
PY
  local line; line=$(tail -1 "$WORK/runs.jsonl")
  python3 - "$line" >&2 <<'PY'
import json, sys
r = json.loads(sys.argv[1])
n = r['n']
parts = [f"    -> {r['status']}:"]
if r['phase'] != 'drain' and r.get('t_accept'):
    parts.append(f"accept {n / r['t_accept']:,.0f} msg/s ({r['t_accept']:.2f} s)")
if r['phase'] != 'enqueue' and r.get('t_e2e'):
    parts.append(f"{'drain' if r['phase'] == 'drain' else 'end-to-end'} {n / r['t_e2e']:,.0f} msg/s ({r['t_e2e']:.2f} s)")
if r.get('sink_at_accept') is not None and r['phase'] == 'e2e':
    parts.append(f"at accept {r['sink_at_accept']} delivered")
parts.append(f"busy {r['busy_pct']:.0f}%, cpu {1000 * r['total_cpu'] / n:.3f} ms/msg (server {1000 * r['server_cpu'] / n:.3f}), "
             f"pre-busy {r['pre_busy_pct']:.0f}%, load {r['loadavg']}, verify {r['verify']}")
if r['stderr']:
    parts.append(f"stderr: {r['stderr'][:120]}")
print(' '.join(parts))
PY
  case $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["status"])' "$line") in
    ok) ;;
    *) INVALID=$((INVALID + 1)); log "    !! rep INVALID (excluded from the figures)";;
  esac
}
check_sink() {        # check_sink JSON N -> "ok" or what is wrong
  python3 - "$1" "$2" <<'PY'
import json, sys
t = json.loads(sys.argv[1]); n = int(sys.argv[2])
got = t.get('sink_got')
print('ok' if got == n else f'sink counted {got} of {n}' + (' (duplicates)' if (got or 0) > n else ''))
PY
}
relay_wait_empty() {  # the queue must end empty: every message finished (delivered)
  local m
  for _ in $(seq 1 600); do
    m=$(queue_messages 2>/dev/null || echo '?')
    [ "$m" = 0 ] && { echo 0; return 0; }
    sleep 0.1
  done
  echo "$m"
}
prepare_backend() {   # prepare_backend BACKEND QDIR: fresh queue; sets spids note
  local backend=$1 qdir=$2
  rm -rf "$qdir"
  note="route=$ROUTE"
  if [ "$(queue_kind "$backend")" != embedded ]; then
    redis_reset
    note="$note appendfsync=$(rcli CONFIG GET appendfsync | tail -1)"
  fi
}
queue_kind() { case $1 in embedded|dkim-*|presets|quota|events-off|events-hook|sts-*) echo embedded ;; *) echo redis ;; esac; }
# late_sessions JSON -> JSON with sink_sessions recounted now: Postfix keeps delivery
# connections cached for up to 2 s after the last message, so they end after the rep.
late_sessions() {
  python3 - "$1" "$(python3 "$BENCH_DIR/timer.py" --sink-sessions "$WORK/sink.out")" <<'PY'
import json, sys
t = json.loads(sys.argv[1])
if t.get('sink_sess0') is not None:
    t['sink_sessions'] = int(sys.argv[2]) - t['sink_sess0']
print(json.dumps(t))
PY
}

# ---------------------------------------------------------------- DKIM
dkim_yaml() {         # dkim_yaml BACKEND: the relay's `dkim:` section ("" = unsigned)
  local sel=""
  case $1 in
    dkim-ed25519) sel="        - { selector: ed25519, algorithm: ed25519-sha256, key_file: $WORK/dkim/ed25519.pem }" ;;
    dkim-rsa) sel="        - { selector: rsa, algorithm: rsa-sha256, key_file: $WORK/dkim/rsa.pem }" ;;
    dkim-both) sel="        - { selector: rsa, algorithm: rsa-sha256, key_file: $WORK/dkim/rsa.pem }
        - { selector: ed25519, algorithm: ed25519-sha256, key_file: $WORK/dkim/ed25519.pem }" ;;
    *) return 0 ;;
  esac
  printf 'dkim:\n  canonicalization: relaxed/relaxed\n  domains:\n    - domain: %s\n      selectors:\n%s\n' "$DKIM_DOMAIN" "$sel"
}
# presets_yaml BACKEND: the relay's `providers:` and `response_rules:` sections for the
# *presets backends ("" for every other backend, so their config is unchanged).
presets_yaml() {
  case $1 in presets|redis-presets) ;; *) return 0 ;; esac
  local dest
  if [ "$ROUTE" = smarthost ]; then dest="smarthost: true"; else dest='mx_hosts: ["mx.example.net"]'; fi
  printf 'providers:\n  presets: [all]\nresponse_rules:\n  - name: bench-sink\n    destination: { %s }\n    match: { codes: [421], text: "bench: never sent by smtp-sink" }\n    action: throttle\n    scope: site\n    duration: 1m\n    throttle: { factor: 0.5 }\n' "$dest"
}
# quota_yaml BACKEND: one per-sender ingress quota for the *quota backends ("" otherwise)
quota_yaml() {
  case $1 in quota|redis-quota) ;; *) return 0 ;; esac
  printf "quotas:\n  - {name: per-sender, direction: ingress, match: {senders: ['*@example.com']}, scope: per_key, key: sender, limits: [%s]}\n" "$QUOTA_LIMITS"
}
# events_yaml BACKEND: the event log off, or a webhook to the local receiver ("" for
# every other backend: the event log on, as by default)
events_yaml() {
  case $1 in
    events-off|redis-events-off) printf 'events: {enabled: false}\n' ;;
    events-hook|redis-events-hook)
      printf 'webhooks:\n  - {name: bench, url: "http://127.0.0.1:%s/hook", secret: bench-secret-0123456789, tenants: {all: true}, allow_http: true}\n' "$HOOK_PORT" ;;
  esac
}
# start_hook / stop_hook: the webhook receiver of the *events-hook backends; it counts
# POSTs into $WORK/hook.count (read with hook_count)
start_hook() {
  : > "$WORK/hook.count"
  python3 - "$HOOK_PORT" "$WORK/hook.count" >>"$WORK/hook.log" 2>&1 <<'PY' &
import sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, out = int(sys.argv[1]), sys.argv[2]
n, lock = 0, threading.Lock()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        global n
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204); self.send_header("Content-Length", "0"); self.end_headers()
        with lock:
            n += 1
            if n % 100 == 0:
                open(out, "w").write(str(n))
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
  HOOK_PID=$!
  wait_port "$HOOK_PORT" webhook-receiver
}
stop_hook() { stop_pid "$HOOK_PID"; HOOK_PID=""; }
hook_count() { cat "$WORK/hook.count" 2>/dev/null || echo 0; }
# delivery_yaml BACKEND: the relay's `delivery:` section ($DELIVERY_YAML, but for the
# sts-* backends the TLS settings of STS=1)
delivery_yaml() {
  local tls
  case $1 in
    sts-off) tls="  tls: opportunistic
  dane: {enabled: false}" ;;
    sts-on) tls="  tls: auto
  mta_sts: {port_override: $STS_PORT}" ;;
    *) printf '%s\n' "$DELIVERY_YAML"; return 0 ;;
  esac
  printf '%s\n' "${DELIVERY_YAML/  tls: disabled/$tls
  ca_file: $WORK/pki/ca.pem}"
}
# STS=1: a test CA, the sink's certificate (mx.example.net, mta-sts.example.net),
# bench/tls_sink built, and the MTA-STS policy server
prepare_sts() {
  local d="$WORK/pki"
  rm -rf "$d"; mkdir -p "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/ca.key" \
    -out "$d/ca.pem" -days 7 -subj "/CN=mailrelay bench CA" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/leaf.key" \
    -out "$d/leaf.csr" -subj "/CN=mx.example.net" 2>/dev/null
  printf 'subjectAltName=DNS:mx.example.net,DNS:mta-sts.example.net\n' > "$d/ext"
  openssl x509 -req -in "$d/leaf.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
    -out "$d/leaf.pem" -days 7 -extfile "$d/ext" 2>/dev/null
  chmod 644 "$d"/*.key
  cc -O2 -o "$WORK/tls_sink" "$BENCH_DIR/tls_sink.c" -lssl -lcrypto -lpthread || die "cc bench/tls_sink.c failed (libssl-dev)"
  python3 - "$STS_PORT" "$d/leaf.pem" "$d/leaf.key" >>"$WORK/sts-server.log" 2>&1 <<'PY' &
import http.server, ssl, sys
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
body = b"version: STSv1\r\nmode: enforce\r\nmx: mx.example.net\r\nmax_age: 86400\r\n"
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/.well-known/mta-sts.txt"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body) if ok else 0))
        self.end_headers()
        if ok:
            self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
PY
  STS_PID=$!
  wait_port "$STS_PORT" mta-sts-server
}
# extra_yaml BACKEND: top-level config sections ($RELAY_YAML_EXTRA last, for every backend)
extra_yaml() {
  dkim_yaml "$1"
  presets_yaml "$1"
  quota_yaml "$1"
  events_yaml "$1"
  if [ -n "$RELAY_YAML_EXTRA" ]; then printf '%s\n' "$RELAY_YAML_EXTRA"; fi
}
dkim_want() {         # dkim_want BACKEND: the a= tags its mail must carry, sorted
  case $1 in
    dkim-ed25519|postfix-dkim-ed25519) echo ed25519-sha256 ;;
    dkim-rsa|postfix-dkim) echo rsa-sha256 ;;
    dkim-both) echo "ed25519-sha256 rsa-sha256" ;;
    *) echo none ;;
  esac
}
backend_begin() {     # backend_begin BACKEND: what the backend needs running for all its reps
  case $1 in
    events-hook|redis-events-hook) start_hook ;;
    postfix-dkim) start_opendkim rsa-sha256 "$WORK/dkim/rsa.pem" rsa "$DKIM_DOMAIN" "$MILTER_PORT"; pf_milter "$MILTER_PORT" ;;
    postfix-dkim-ed25519) start_opendkim ed25519-sha256 "$WORK/dkim/ed25519.pem" ed25519 "$DKIM_DOMAIN" "$MILTER_PORT"; pf_milter "$MILTER_PORT" ;;
  esac
}
backend_end() {
  case $1 in postfix-dkim*) pf_milter off; stop_opendkim ;; *events-hook) stop_hook ;; esac
}
# sample_check BACKEND: one message through BACKEND into a smtp-sink that keeps it;
# its signatures must be the expected ones and verify. Returns 1 (and counts an
# invalid run) if not, so the caller skips the backend's reps: an unsigned message
# must not pass for a signed one.
sample_check() {
  local backend=$1 want got="" f="" port dir="$WORK/sample-$1" qdir="$WORK/queue-sample"
  [ "$ANY_DKIM" = 1 ] || return 0
  case $backend in embedded|postfix|dkim-*|postfix-dkim*) ;; *) return 0 ;; esac
  want=$(dkim_want "$backend")
  rm -rf "$dir"; mkdir -p "$dir"; chmod 777 "$dir"      # smtp-sink writes as nobody
  # a fresh count in sink.out for each sink, so that the timer's start count is right
  stop_pid "$SINK_PID"; SINK_PID=""; : > "$WORK/sink.out"
  start_sink -d "$dir/m."
  case $backend in
    postfix*) pf_ensure_running; port=$PF_PORT ;;
    *) rm -rf "$qdir"; start_relay embedded "$qdir" "$DELIVERY_YAML" "$(dkim_yaml "$backend")"; port=$SMTP_PORT ;;
  esac
  smtp-source -m 1 -l 1024 "${SRC_ID[@]}" "127.0.0.1:$port" >>"$WORK/sample.log" 2>&1 || log "  !! smtp-source of the sample failed"
  for _ in $(seq 1 300); do
    f=$(find "$dir" -type f | head -1); [ -n "$f" ] && break; sleep 0.1
  done
  sleep 0.3                                             # the dump is written once the message is in
  # Postfix caches its delivery connection for 2 s: let it close before this sink goes,
  # or the next delivery over it fails and is deferred for minutes
  case $backend in postfix*) pf_wait_empty; sleep 3 ;; *) stop_relay; rm -rf "$qdir" ;; esac
  stop_pid "$SINK_PID"; SINK_PID=""; : > "$WORK/sink.out"
  start_sink
  if [ -n "$f" ]; then got=$(dkim_tags "$f" "$WORK/dkim"); else got="no message at the sink"; fi
  python3 -c 'import json,sys; print(json.dumps(dict(backend=sys.argv[1], want=sys.argv[2], got=sys.argv[3], file=sys.argv[4])))' \
    "$backend" "$want" "$got" "$f" >> "$WORK/samples.jsonl"
  if [ "$got" = "$want" ]; then
    log "sample $backend: DKIM-Signature a= $got (as expected; signatures verified)"
    return 0
  fi
  log "  !! sample $backend: want a= '$want', got '$got' ($f): its reps are skipped"
  INVALID=$((INVALID + 1))
  return 1
}
dkim_counts() {       # dkim_counts BACKEND N -> "" or what is wrong with the relay's signature counter
  local alg v
  for alg in $(dkim_want "$1"); do
    [ "$alg" = none ] && continue
    v=$(metric "mailrelay_dkim_signatures_total{algorithm=\"$alg\"}")
    [ "${v:-x}" = "$2" ] || printf '; %s signatures=%s != %s' "$alg" "${v:-?}" "$2"
  done
}

# ---------------------------------------------------------------- end-to-end rep
run_e2e() {           # run_e2e BACKEND SIZE SESSIONS N REP
  local backend=$1 size=$2 sess=$3 n=$4 rep=$5 t verdict note="" acc left qdir spids hook0
  log "e2e $backend size=$size sessions=$sess n=$n rep $rep/$REPS"
  case $backend in
    direct)
      # shellcheck disable=SC2046
      t=$(timer "$RUN_TIMEOUT" "$n" "" "" 0 -- $(source_cmd "$sess" "$n" "$size" "$SINK_PORT"))
      verdict=$(check_sink "$t" "$n")
      ;;
    embedded|redis|redis-always|dkim-*|presets|redis-presets|quota|redis-quota|events-off|events-hook|redis-events-off|redis-events-hook|sts-*)
      qdir="$WORK/queue-e2e-$backend"
      prepare_backend "$backend" "$qdir"
      hook0=$(hook_count)
      start_relay "$(queue_kind "$backend")" "$qdir" "$(delivery_yaml "$backend")" "$(extra_yaml "$backend")"
      spids=$RELAY_PID; [ "$(queue_kind "$backend")" = embedded ] || spids="$RELAY_PID,$REDIS_PID"
      # shellcheck disable=SC2046
      t=$(timer "$RUN_TIMEOUT" "$n" "$spids" "$RELAY_PID" 0 -- $(source_cmd "$sess" "$n" "$size" "$SMTP_PORT"))
      verdict=$(check_sink "$t" "$n")
      acc=$(metric mailrelay_smtp_messages_accepted_total)
      verdict="$verdict$(dkim_counts "$backend" "$n")"
      left=$(relay_wait_empty)
      [ "${acc:-x}" = "$n" ] || verdict="$verdict; accepted_total=${acc:-?} != $n"
      [ "$left" = 0 ] || verdict="$verdict; queue still holds ${left} messages"
      verdict=${verdict#ok; }
      case $backend in
        sts-on)
          local fetched failed
          fetched=$(metric 'mailrelay_mta_sts_policy_fetches_total{result="ok"}')
          failed=$(curl -fs "$ADMIN_URL/metrics" | awk '$1 ~ /^mailrelay_mta_sts_failures_total/ {s += $2} END {print s + 0}')
          note="$note sts_fetches=${fetched:-0} sts_memory_lookups=$(metric 'mailrelay_mta_sts_cache_lookups_total{source="memory"}') sts_failures=$failed"
          [ "${fetched:-0}" = 1 ] || verdict="$verdict; MTA-STS policy fetched ${fetched:-0} times, not once"
          [ "$failed" = 0 ] || verdict="$verdict; $failed MTA-STS failures"
          ;;
        *events-hook) note="$note webhook_posts_by_end=$(( $(hook_count) - hook0 )) events_written=$(curl -fs "$ADMIN_URL/metrics" | awk '$1 ~ /^mailrelay_events_written_total/ {s += $2} END {print s + 0}')" ;;
      esac
      stop_relay
      rm -rf "$qdir"
      ;;
    kumomta|haraka)
      start_peer "$backend"
      # shellcheck disable=SC2046
      t=$(timer "$RUN_TIMEOUT" "$n" "$PEER_PIDS" "" 0 -- $(source_cmd "$sess" "$n" "$size" "$PEER_PORT"))
      verdict=$(check_sink "$t" "$n")
      verdict="$verdict$(peer_check "$backend" "$n")"
      verdict=${verdict#ok; }
      stop_peer
      sleep 2; t=$(late_sessions "$t")      # connections close with the peer
      ;;
    postfix|postfix-dkim*)
      pf_ensure_running; pf_wait_empty; sleep "$COOLDOWN"
      # shellcheck disable=SC2046
      t=$(timer "$RUN_TIMEOUT" "$n" "" "" "$MASTER_PID" --milter-pids "$OPENDKIM_PID" -- \
            $(source_cmd "$sess" "$n" "$size" "$PF_PORT"))
      verdict=$(check_sink "$t" "$n")
      pf_wait_empty
      sleep 3; t=$(late_sessions "$t")      # smtp_connection_cache_time_limit = 2s
      ;;
  esac
  record "$t" e2e "$backend" "$size" "$sess" "$n" "$rep" "$verdict" "$note"
  sleep "$COOLDOWN"
}

# ---------------------------------------------------------------- drain of a full queue
# Through a drain's enqueue and delivery phases a sampler writes, once a second, to
# $WORK/samples-BACKEND-PHASE.csv: the relay's VmRSS, redis-server's used_memory and
# VmRSS, the sink's count, the queue directory's size on disk and the 1-minute load
# average (issue 21 item 5: relay RSS flat through a 1,000,000-message drain).
SAMPLER_PID=""
sampler_start() {     # sampler_start BACKEND PHASE PID_OR_PIDFILE
  local out="$WORK/samples-$1-$2.csv" who=$3 qdir="$WORK/queue-drain-$1" rpid=0
  [ "$(queue_kind "$1")" = embedded ] || rpid=${REDIS_PID:-0}
  (
    echo "t,relay_rss_kb,redis_used_memory,redis_rss_kb,sink,queue_dir_kb,load1" > "$out"
    t0=$(date +%s); pid=""
    while :; do
      # a pid file (the drain's relay) is written once the relay starts and removed
      # after it: keep the last pid read
      if [ -f "$who" ]; then pid=$(cat "$who" 2>/dev/null || true); elif [ "$who" -eq "$who" ] 2>/dev/null; then pid=$who; fi
      rss=$(awk '/^VmRSS/ {print $2}' "/proc/${pid:-0}/status" 2>/dev/null || true)
      rrss=$(awk '/^VmRSS/ {print $2}' "/proc/$rpid/status" 2>/dev/null || true)
      um=""; [ "$rpid" != 0 ] && um=$(rcli INFO memory 2>/dev/null | tr -d '\r' | awk -F: '$1 == "used_memory" {print $2}')
      sink=$(tail -c 300 "$WORK/sink.out" 2>/dev/null | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2 || true)
      qkb=$(du -sk "$qdir" 2>/dev/null | cut -f1 || true)
      echo "$(($(date +%s) - t0)),${rss:-},${um:-},${rrss:-},${sink:-},${qkb:-},$(cut -d' ' -f1 /proc/loadavg)" >> "$out"
      sleep 1
    done
  ) &
  SAMPLER_PID=$!
}
sampler_stop() { stop_pid "$SAMPLER_PID"; SAMPLER_PID=""; }
run_drain() {         # run_drain BACKEND
  local backend=$1 n=$DRAIN_N size=$DRAIN_SIZE sess=$DRAIN_SESSIONS t verdict note="" acc msgs left qdir spids held cfg
  log "drain $backend: enqueue $n messages with delivery off"
  case $backend in
    embedded|redis|redis-always)
      qdir="$WORK/queue-drain-$backend"
      prepare_backend "$backend" "$qdir"
      start_relay "$(queue_kind "$backend")" "$qdir"          # delivery disabled
      spids=$RELAY_PID; [ "$backend" = embedded ] || spids="$RELAY_PID,$REDIS_PID"
      sampler_start "$backend" enqueue "$RELAY_PID"
      # expect 0 at the sink: nothing may be delivered while enqueueing
      # shellcheck disable=SC2046
      t=$(timer "$DRAIN_TIMEOUT" 0 "$spids" "$RELAY_PID" 0 -- $(source_cmd "$sess" "$n" "$size" "$SMTP_PORT"))
      acc=$(metric mailrelay_smtp_messages_accepted_total)
      msgs=$(queue_messages)
      sampler_stop
      verdict=$(check_sink "$t" 0)
      [ "${acc:-x}" = "$n" ] || verdict="$verdict; accepted_total=${acc:-?} != $n"
      [ "${msgs:-x}" = "$n" ] || verdict="$verdict; queue holds ${msgs:-?} != $n"
      verdict=${verdict#ok; }
      record "$t" enqueue "$backend" "$size" "$sess" "$n" 1 "$verdict" "$note"
      stop_relay
      [ "$verdict" = ok ] || { rm -rf "$qdir"; return 0; }
      log "drain $backend: start a relay with delivery on, time until the sink has all $n"
      cfg=$(relay_config "$(queue_kind "$backend")" "$qdir" "$DELIVERY_YAML")
      spids=""; [ "$backend" = embedded ] || spids=$REDIS_PID
      rm -f "$BG_PID_FILE"
      sampler_start "$backend" drain "$BG_PID_FILE"
      # shellcheck disable=SC2016  # $0..$2 are the inner shell's arguments
      t=$(timer "$DRAIN_TIMEOUT" "$n" "$spids" 0 0 --background --pid-file "$BG_PID_FILE" -- \
            bash -c 'exec "$0" serve --config "$1" >>"$2" 2>&1' "$RELAY_BIN" "$cfg" "$WORK/relay.log")
      RELAY_PID=$(cat "$BG_PID_FILE"); rm -f "$BG_PID_FILE"
      verdict=$(check_sink "$t" "$n")
      left=$(relay_wait_empty)
      sampler_stop
      [ "$left" = 0 ] || verdict="$verdict; queue still holds ${left} messages"
      verdict=${verdict#ok; }
      record "$t" drain "$backend" "$size" "$sess" "$n" 1 "$verdict" "$note"
      stop_relay
      rm -rf "$qdir"
      ;;
    postfix)
      pf_ensure_running; pf_wait_empty
      pf_hold on
      # shellcheck disable=SC2046
      t=$(timer "$DRAIN_TIMEOUT" 0 "" "" "$MASTER_PID" -- $(source_cmd "$sess" "$n" "$size" "$PF_PORT"))
      held=$(find "$PFDIR/spool/hold" -type f | wc -l)
      verdict=$(check_sink "$t" 0)
      [ "$held" -eq "$n" ] || verdict="$verdict; hold queue has $held of $n"
      verdict=${verdict#ok; }
      record "$t" enqueue "$backend" "$size" "$sess" "$n" 1 "$verdict" "$note"
      pf_hold off
      [ "$verdict" = ok ] || { postsuper -c "$PFC" -d ALL hold >/dev/null 2>&1; return 0; }
      log "drain postfix: postsuper -H ALL (untimed), then time postqueue -f until the sink has all $n"
      postsuper -c "$PFC" -H ALL >/dev/null 2>&1     # hold -> deferred; does not wake qmgr
      t=$(timer "$DRAIN_TIMEOUT" "$n" "" "" "$MASTER_PID" -- postqueue -c "$PFC" -f)
      verdict=$(check_sink "$t" "$n")
      pf_wait_empty
      sleep 3; t=$(late_sessions "$t")
      record "$t" drain "$backend" "$size" "$sess" "$n" 1 "$verdict" "$note"
      ;;
  esac
  sleep "$COOLDOWN"
}

# ---------------------------------------------------------------- machine facts
log "machine: $(nproc) CPUs, $(uname -r); mailrelay $GIT_REV (+$GIT_DIRTY modified tracked files)"
log "N=$N REPS=$REPS SCENARIOS='$SCENARIOS' BACKENDS='$BACKENDS' DRAIN=$DRAIN DRAIN_N=$DRAIN_N DRAIN_BACKENDS='$DRAIN_BACKENDS' ROUTE=$ROUTE work=$WORK"
FSYNC=$(fsync_probe)
log "fsync probe ($WORK): $FSYNC"
write_facts "$WORK/facts.json" "dict(STS=$STS, SENDER='$SENDER', SENDERS=$SENDERS, INTERLEAVE=$INTERLEAVE, QUOTA_LIMITS='$QUOTA_LIMITS', N=$N, REPS=$REPS, SCENARIOS='$SCENARIOS', BACKENDS='$BACKENDS', DRAIN=$DRAIN, DRAIN_N=$DRAIN_N, DRAIN_SIZE=$DRAIN_SIZE, DRAIN_SESSIONS=$DRAIN_SESSIONS, DRAIN_BACKENDS='$DRAIN_BACKENDS', ROUTE='$ROUTE', DNS_TTL=$DNS_TTL, PEERS_SKIPPED='''$PEERS_SKIPPED''', KUMOMTA='${KUMO_VERSION:-}', HARAKA='${HARAKA_VERSION_RUN:-}', COOLDOWN=$COOLDOWN, RELAY_THREADS='$RELAY_THREADS', delivery='''$DELIVERY_YAML''')"

# ---------------------------------------------------------------- runs
if [ "$STS" = 1 ]; then
  prepare_sts
  # The TLS sink instead of smtp-sink (same count records in sink.out)
  # shellcheck disable=SC2120
  start_sink() {
    "$WORK/tls_sink" "$WORK/pki/leaf.pem" "$WORK/pki/leaf.key" "127.0.0.1:$SINK_PORT" >> "$WORK/sink.out" 2>> "$WORK/sink.err" &
    SINK_PID=$!
    wait_port "$SINK_PORT" tls_sink
  }
fi
start_sink
if any_redis; then start_redis; fi
[ "$ROUTE" = mx ] && start_dns
if any_pf; then
  configure_postfix
  start_postfix
  timeout 30 swaks --server "127.0.0.1:$PF_PORT" --from sender@example.com --to rcpt@example.net \
    --helo bench.local --silent 2 >/dev/null 2>&1 || log "  (swaks smoke test through Postfix failed or swaks missing)"
  pf_wait_empty
fi
set_appendfsync() {
  case $1 in
    redis|redis-events-off|redis-events-hook) rcli CONFIG SET appendfsync everysec >/dev/null ;;
    redis-always) rcli CONFIG SET appendfsync always >/dev/null ;;
  esac
}

# Scenario-major order: all backends of one scenario run back to back, so a drift in
# background load hits the numbers compared with each other alike.
# INTERLEAVE=1: reps go round-robin over the backends instead (rep 1 of every backend,
# then rep 2, ...), so a burst of load from elsewhere on a shared machine spreads over
# all the backends compared instead of skewing one.
SAMPLE_FAILED=""
for sc in $SCENARIOS; do
  size=${sc%%:*}; sess=${sc##*:}
  if [ "$INTERLEAVE" = 1 ]; then
    for rep in $(seq 1 "$REPS"); do
      for backend in $BACKENDS; do
        set_appendfsync "$backend"
        backend_begin "$backend"
        if [ "$rep" = 1 ] && ! sample_check "$backend"; then SAMPLE_FAILED="$SAMPLE_FAILED $backend"; fi
        has "$SAMPLE_FAILED" "$backend" || run_e2e "$backend" "$size" "$sess" "$N" "$rep"
        backend_end "$backend"
      done
    done
    continue
  fi
  for backend in $BACKENDS; do
    set_appendfsync "$backend"
    backend_begin "$backend"
    if sample_check "$backend"; then
      for rep in $(seq 1 "$REPS"); do run_e2e "$backend" "$size" "$sess" "$N" "$rep"; done
    fi
    backend_end "$backend"
  done
done
if [ "$DRAIN" = 1 ]; then
  for backend in $DRAIN_BACKENDS; do
    set_appendfsync "$backend"
    run_drain "$backend"
  done
fi

if [ "$MASTER_PID" -gt 0 ]; then
  pf_wait_empty
  pf_finish_log
  stop_postfix
  log "postfix stopped"
fi
stop_pid "$REDIS_PID"; REDIS_PID=""; rm -rf "$WORK/redis"
stop_pid "$SINK_PID"; SINK_PID=""
stop_pid "$DNS_PID"; DNS_PID=""

# ---------------------------------------------------------------- report
python3 "$BENCH_DIR/e2e_report.py" "$WORK" | tee "$WORK/report.md"
log "report: $WORK/report.md; raw: $WORK/runs.jsonl, $WORK/facts.json; logs: $WORK/*.log"
if [ "$INVALID" -gt 0 ]; then
  log "$INVALID invalid rep(s): see the table (ok/runs) and $WORK/runs.jsonl"
  exit 1
fi
