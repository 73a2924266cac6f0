# shellcheck shell=bash
# The PIDs set here are read by the sourcing script, and RELAY_BIN is set by it:
# shellcheck disable=SC2034,SC2153
# bench/lib.sh — shared parts of the benchmarks (sourced by ingress.sh and e2e.sh).
#
# The caller sets, before sourcing: WORK, SMTP_PORT, ADMIN_PORT, PF_PORT, SINK_PORT,
# REDIS_PORT, RELAY_BIN, ADMIN_URL, PFDIR, PFC, MAILLOG, MASTER_PID_FILE, BENCH_NAME,
# and defines log() and die(). The lifecycle functions keep the PIDs they start in
# RELAY_PID, REDIS_PID, SINK_PID and MASTER_PID, so the caller's EXIT trap can stop
# exactly those processes (by PID, never by name).

RELAY_PID=""; REDIS_PID=""; SINK_PID=""; MASTER_PID=0

# More redis-server arguments. The default is what the chart's bundled Redis sets besides
# persistence (docs/operations.md, "Other Redis settings that matter"); REDIS_ARGS= (set,
# empty) runs Redis with its own defaults.
REDIS_ARGS=${REDIS_ARGS---zset-max-listpack-entries 32 --hash-max-listpack-entries 32}

# install_tools PKG_FOR_CMD...: "cmd:package" pairs; installs the packages of missing commands
install_tools() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair##*:}")
  done
  [ ${#need[@]} -gt 0 ] || return 0
  log "installing: ${need[*]}"
  echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
  echo 'postfix postfix/mailname string relay.bench.test' | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}

stop_pid() {          # stop_pid PID: SIGTERM, wait up to 10 s, then SIGKILL
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
  # not our child (started by timer.py --background): wait until it is really gone
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
}
wait_port() {         # wait_port PORT WHAT
  for _ in $(seq 1 100); do ss -Hltn "sport = :$1" | grep -q . && return 0; sleep 0.1; done
  die "$2 did not listen on port $1"
}
port_busy() { ss -Hltn "sport = :$1" | grep -q .; }

# RELAY_THREADS [unset or empty: one per CPU]: the relay's worker threads (runtime.worker_threads)
# relay_config BACKEND(embedded|redis) QUEUE_DIR DELIVERY_YAML [EXTRA_YAML] -> path of the
# written config. DELIVERY_YAML is the body of the `delivery:` section, indented by two
# spaces; EXTRA_YAML more top-level sections (e.g. `dkim:`), appended as they are.
relay_config() {
  local backend=$1 qdir=$2 delivery=$3 extra=${4:-} cfg="$WORK/relay-$1.yaml" queue
  if [ "$backend" = embedded ]; then
    queue="  backend: embedded
  path: $qdir"
  else
    queue="  backend: redis
  redis:
    url: redis://127.0.0.1:$REDIS_PORT/0"
  fi
  cat > "$cfg" <<EOF
# written by bench/$BENCH_NAME
hostname: relay.bench.test
listeners:
  - name: smtp
    address: 127.0.0.1:$SMTP_PORT
    tls: none
relay_networks: [127.0.0.0/8]
limits:
  max_connections: ${RELAY_MAX_CONNECTIONS:-11000}
  max_connections_per_ip: ${RELAY_MAX_CONNECTIONS:-11000}
  max_message_size: 10485760
queue:
$queue
delivery:
$delivery
admin:
  address: 127.0.0.1:$ADMIN_PORT
log:
  level: warn
shutdown_grace: 5s
EOF
  [ -z "${RELAY_THREADS:-}" ] || printf 'runtime:\n  worker_threads: %s\n' "$RELAY_THREADS" >> "$cfg"
  [ -z "$extra" ] || printf '%s\n' "$extra" >> "$cfg"
  echo "$cfg"
}
relay_wait_ready() {  # relay_wait_ready PID [TENTHS_OF_A_SECOND, default 100]
  for _ in $(seq 1 "${2:-100}"); do
    curl -fs "$ADMIN_URL/readyz" >/dev/null 2>&1 && port_busy "$SMTP_PORT" && return 0
    kill -0 "$1" 2>/dev/null || die "mailrelay exited: $(tail -5 "$WORK/relay.log")"
    sleep 0.1
  done
  die "mailrelay not ready: $(tail -5 "$WORK/relay.log")"
}
# start_relay BACKEND QUEUE_DIR [DELIVERY_YAML [EXTRA_YAML]]: default delivery section = disabled
start_relay() {
  local cfg
  cfg=$(relay_config "$1" "$2" "${3:-  enabled: false}" "${4:-}")
  "$RELAY_BIN" serve --config "$cfg" >>"$WORK/relay.log" 2>&1 &
  RELAY_PID=$!
  relay_wait_ready "$RELAY_PID"
}
stop_relay() { stop_pid "$RELAY_PID"; RELAY_PID=""; }
metric() {            # metric NAME: value from the relay's /metrics
  # awk reads all its input: exiting early would fail curl (SIGPIPE) under pipefail
  curl -fs "$ADMIN_URL/metrics" | awk -v m="$1" '$1 == m && !found {print $2; found = 1}'
}
queue_messages() {    # queued (not final) messages, from the relay's admin API
  curl -fs "$ADMIN_URL/api/v1/queue/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])'
}

start_redis() {
  mkdir -p "$WORK/redis"
  local extra
  read -ra extra <<<"$REDIS_ARGS"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" \
    --appendonly yes --appendfsync everysec --save '' --auto-aof-rewrite-percentage 0 \
    --daemonize no --logfile "$WORK/redis.log" "${extra[@]}" &
  REDIS_PID=$!
  wait_port "$REDIS_PORT" redis-server
}
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }
redis_reset() {       # empty Redis and its AOF outside the timed window
  rcli FLUSHALL >/dev/null
  rcli BGREWRITEAOF >/dev/null
  for _ in $(seq 1 600); do
    rcli INFO persistence | tr -d '\r' | grep -Eq '^aof_rewrite_in_progress:0' &&
      rcli INFO persistence | tr -d '\r' | grep -Eq '^aof_rewrite_scheduled:0' && return 0
    sleep 0.1
  done
  die "redis AOF rewrite did not finish"
}

# shellcheck disable=SC2120  # the options are optional
start_sink() {         # start_sink [smtp-sink options...]: e.g. -d TEMPLATE keeps each message
  smtp-sink -c "$@" -u nobody -h sink.bench.test "127.0.0.1:$SINK_PORT" 1024 >> "$WORK/sink.out" 2>> "$WORK/sink.err" &
  SINK_PID=$!
  wait_port "$SINK_PORT" smtp-sink
}
sink_count() {        # messages smtp-sink has received so far (last complete record)
  python3 "$BENCH_DIR/timer.py" --sink-count "$WORK/sink.out"
}

# Postfix: configure_postfix/start_postfix/stop_postfix/wait-for-empty-queue follow
# /work/shared/bench/postfix-anchor.sh with the same main.cf and master.cf settings.
# Differences, all outside the measured path: a private instance (postfix -c $PFC;
# queue_directory/data_directory under $WORK, same filesystem), our ports, and the
# log file in $PFDIR.
master_alive() { [ -s "$MASTER_PID_FILE" ] && kill -0 "$(tr -d ' ' < "$MASTER_PID_FILE")" 2>/dev/null; }
configure_postfix() {
  rm -rf "$PFDIR"
  mkdir -p "$PFC" "$PFDIR/spool"        # postfix start creates the queue's subdirectories
  chmod 755 "$WORK" "$PFDIR"            # daemons drop root and must reach spool and log
  cat > "$PFC/main.cf" <<EOF
# written by mailrelay bench/$BENCH_NAME (settings of postfix-anchor.sh) — pure loopback relay
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
    master_alive && port_busy "$PF_PORT" && break; sleep 0.1
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
  for _ in $(seq 1 1200); do pf_queue_empty && return 0; sleep 0.5; done
  die "Postfix queue did not empty: $(postqueue -c "$PFC" -p 2>&1 | tail -1)"
}
pf_hold() {           # pf_hold on|off
  if [ "$1" = on ]; then postconf -c "$PFC" -e 'smtpd_client_restrictions = check_client_access static:HOLD'
  else postconf -c "$PFC" -X smtpd_client_restrictions; fi
  postfix -c "$PFC" reload >/dev/null 2>&1 || log "  !! postfix reload failed"
  sleep 2
}
pf_finish_log() {     # keep warnings and a tail of the Postfix log, then empty it
  grep -E 'warning|fatal|panic' "$MAILLOG" | sed -E 's/^.*(warning|fatal|panic)/\1/' | sort | uniq -c | sort -rn | head -5 | sed 's/^/  postfix log: /' >&2 || true
  grep -E 'warning|error|fatal|panic' "$MAILLOG" > "$WORK/maillog.warnings" || true
  tail -n 2000 "$MAILLOG" > "$WORK/maillog.tail"; : > "$MAILLOG"
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
# write_facts FILE KNOBS_PYTHON_DICT_LITERAL: machine facts as JSON
write_facts() {
  python3 - "$1" "$2" "$PFC" "$GIT_REV" "$GIT_DIRTY" "$FSYNC" "$(same_fs)" "${QUICK:-0}" <<'PY'
import json, os, platform, subprocess, sys, datetime
out, knobs, pfc, rev, dirty, fsync, samefs, quick = sys.argv[1:9]
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception: return ''
knobs = eval(knobs, {'__builtins__': {}}, {'dict': dict})  # our own dict(...) literal
knobs['QUICK'] = quick
json.dump({
  'date': datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z'),
  'nproc': os.cpu_count(), 'cpu': sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip(),
  'kernel': platform.release(), 'os': sh(". /etc/os-release; echo $PRETTY_NAME"),
  'mem': sh("free -g | awk '/Mem:/ {print $2\" GiB\"}'"),
  'postfix': sh("postconf -dh mail_version"), 'postfix_instance': f"private: postfix -c {pfc} (anchor settings)",
  'redis': sh("redis-server --version | awk '{print $3}'"),
  'mailrelay': f"{rev} (+{dirty} modified tracked files, release build)",
  'fsync_probe': fsync, 'queue_fs_same_as_postfix_spool': samefs,
  'ulimit_n': sh('ulimit -n'), 'tcp_tw_reuse': sh('sysctl -n net.ipv4.tcp_tw_reuse'),
  'knobs': knobs,
}, open(out, 'w'), indent=1)
PY
}

# ---------------------------------------------------------------- DKIM (e2e.sh)
# dkim_keys DIR: an RSA-2048 and an Ed25519 key (PKCS#8 PEM), made fresh per run, and
# the TXT record of each (DIR/rsa.txt, DIR/ed25519.txt) for dkim_tags' verification
dkim_keys() {
  mkdir -p "$1"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1/rsa.pem" 2>/dev/null
  openssl genpkey -algorithm ED25519 -out "$1/ed25519.pem" 2>/dev/null
  chmod 600 "$1/rsa.pem" "$1/ed25519.pem"
  printf 'v=DKIM1; k=rsa; p=%s\n' "$(openssl pkey -in "$1/rsa.pem" -pubout -outform DER | base64 -w0)" > "$1/rsa.txt"
  # Ed25519: p= is the raw 32-octet key, the tail of the DER SubjectPublicKeyInfo
  printf 'v=DKIM1; k=ed25519; p=%s\n' "$(openssl pkey -in "$1/ed25519.pem" -pubout -outform DER | tail -c 32 | base64 -w0)" > "$1/ed25519.txt"
}
# OpenDKIM as a private milter in the foreground (no syslogd here, so its log goes
# nowhere: a signing failure shows at the sample check). Started per backend, stopped by PID.
# opendkim refuses a configuration or key file in a directory others may write to
# (/var/tmp, where $WORK usually is), so both go to OPENDKIM_DIR (root only, removed
# by stop_opendkim).
OPENDKIM_PID=""
OPENDKIM_DIR=${OPENDKIM_DIR:-/run/mailrelay-bench-opendkim}
# start_opendkim ALGORITHM(rsa-sha256|ed25519-sha256) KEY_FILE SELECTOR DOMAIN PORT
start_opendkim() {
  local cfg="$OPENDKIM_DIR/opendkim-$1.conf" key="$OPENDKIM_DIR/$3.pem"
  rm -rf "$OPENDKIM_DIR"; mkdir -m 700 "$OPENDKIM_DIR"
  install -m 600 "$2" "$key"
  cat > "$cfg" <<EOF
# written by bench/$BENCH_NAME: sign mail from 127.0.0.1 whose From: is in $4
Syslog no
Mode s
Domain $4
Selector $3
KeyFile $key
SignatureAlgorithm $1
Canonicalization relaxed/relaxed
InternalHosts 127.0.0.1
Socket inet:$5@127.0.0.1
UMask 007
EOF
  opendkim -f -x "$cfg" >>"$WORK/opendkim.log" 2>&1 &
  OPENDKIM_PID=$!
  for _ in $(seq 1 100); do port_busy "$5" && return 0; kill -0 "$OPENDKIM_PID" 2>/dev/null || break; sleep 0.1; done
  die "opendkim did not listen on $5: $(tail -5 "$WORK/opendkim.log")"
}
stop_opendkim() {
  stop_pid "$OPENDKIM_PID"; OPENDKIM_PID=""
  [ -n "$OPENDKIM_DIR" ] && rm -rf "$OPENDKIM_DIR"
}
# pf_milter PORT|off: Postfix's smtpd hands every message to the milter; if the milter
# fails, the message is refused with a 4xx (tempfail), never passed on unsigned.
pf_milter() {
  if [ "$1" = off ]; then postconf -c "$PFC" -X smtpd_milters milter_default_action
  else postconf -c "$PFC" -e "smtpd_milters = inet:127.0.0.1:$1" 'milter_default_action = tempfail'; fi
  postfix -c "$PFC" reload >/dev/null 2>&1 || log "  !! postfix reload failed"
  sleep 2
}
# dkim_tags FILE [KEYDIR]: the a= tag of every DKIM-Signature in a message smtp-sink -d
# dumped, sorted, space separated ("none" if there is none); with KEYDIR (dkim_keys'
# rsa.txt / ed25519.txt: selector S is looked up in KEYDIR/S.txt) each signature is verified
# with dkimpy, and one that does not verify prints as "TAG:FAIL".
dkim_tags() {
  python3 - "$1" "${2:-}" <<'PY'
import os, re, sys
raw = open(sys.argv[1], 'rb').read().replace(b'\r\n', b'\n')
keydir = sys.argv[2]
# smtp-sink's dump starts with its own X-Client-*/X-*-Args/Received lines: header
# fields no signature covers, so they do not disturb the verification.
head = raw.split(b'\n\n', 1)[0].decode('latin-1')
fields = re.split(r'\n(?=\S)', head)
sigs = [f for f in fields if f.lower().startswith('dkim-signature:')]
if not sigs:
    print('none')
    sys.exit(0)
out = []
for i, f in enumerate(sigs):
    m = re.search(r'(?:^|;)\s*a\s*=\s*([\w-]+)', re.sub(r'\s+', ' ', f.split(':', 1)[1]))
    tag = m.group(1) if m else '?'
    if keydir:
        try:
            import dkim
        except ImportError:
            dkim = None    # no dkimpy: the tag check alone
        if dkim is not None:
            def dns(name, timeout=5):
                sel = name.decode().split('._domainkey.')[0]
                return open(os.path.join(keydir, sel + '.txt'), 'rb').read().strip()
            try:
                ok = dkim.DKIM(raw.replace(b'\n', b'\r\n')).verify(idx=i, dnsfunc=dns)
            except Exception:
                ok = False
            if not ok:
                tag += ':FAIL'
    out.append(tag)
print(' '.join(sorted(out)))
PY
}
