#!/usr/bin/env bash
# bench/redis-cost.sh — what one message costs Redis (and the relay) over its whole
# lifecycle, in measures that stay put on a busy machine. A benchmark, not a test.
#
# For every relay binary in $BINS (label=path, so an old and a new build compare in
# one run), every body size in $SIZES and $REPS reps, against one private
# redis-server (--appendonly yes --appendfsync everysec, as bench/e2e.sh):
#
# lifecycle  FLUSHALL + CONFIG RESETSTAT, a relay with delivery on (ROUTE=mx: MX
#            lookup at a private dnsmasq, delivery to smtp-sink, as e2e.sh ROUTE=mx;
#            ROUTE=smarthost: straight to smtp-sink), N messages from smtp-source
#            (SESSIONS sessions), until smtp-sink has all N and the queue is empty
#            (enqueue, lease, finish; the final status record stays for the
#            retention). Per message:
#              redis CPU    used_cpu_user + used_cpu_sys deltas (INFO cpu), whole process
#                           (the raw rows and the log line give used_cpu_sys apart)
#              cmd µs       sum of INFO commandstats usec (the commands' own time)
#              evalsha      calls and usec_per_call of cmdstat_evalsha; calls of every
#                           other command per message in the raw rows
#              retained     used_memory after the drain minus before: the final records
#              relay CPU    utime + stime of the relay process (/proc/PID/stat)
#              relay Ir     with CALLGRIND containing "relay": instructions the relay
#                           executed (valgrind --tool=callgrind, counters zeroed once
#                           it is ready, dumped once the queue is empty), stable
#                           between runs where CPU time is not
#              redis Ir     with CALLGRIND containing "redis": the same for
#                           redis-server (started under callgrind), all its threads
# memory     FLUSHALL, a relay with delivery off, N messages enqueued; per message:
#              (used_memory after - before - stored body bytes) / N, where the body
#              bytes are the queue's own count (/api/v1/queue/stats "bytes"): Redis
#              memory a queued message costs beyond its body; and the costs above
#              of the enqueue alone
# drain      (with memory) then a fresh relay with delivery on drains that queue: the
#              costs of lease + finish alone, with full batches (the mixed lifecycle's
#              batches, and so its per-message costs, depend on timing; these do not).
#              The relay's CPU and Ir count from its start (it delivers before it is
#              ready to be measured), so they include its start-up
#
# Checks on every rep (a rep that fails one is reported as invalid and the script
# exits 1): smtp-sink counts exactly N more (lifecycle) or none (memory), the relay's
# accepted counter is N, the queue ends empty (lifecycle) or holds N (memory).
#
# Output: a markdown table on stdout and in $WORK/report.md; raw rows in
# $WORK/rows.jsonl (with every command's calls per message); Redis memory by key
# type (MEMORY USAGE per index per message, per message key) in $WORK/keys.jsonl.
#
# Run (as root, Debian 12):  bash bench/redis-cost.sh
#   old vs new binaries:     BINS="old=/path/a new=/path/b" BUILD=0 bash bench/redis-cost.sh
#   instruction counts:      CALLGRIND="relay redis" N=2000 SIZES=1024 MODES=lifecycle bash bench/redis-cost.sh
# Knobs: MODES ["lifecycle memory drain"] SIZES ["1024 102400"] N [5000] SESSIONS [20] REPS [1]
#   ROUTE [mx] (or smarthost) BINS ["current=$RELAY_BIN"] BUILD [1] CALLGRIND [""] ("relay", "redis" or both)
#   CALLGRIND_SETTLE [5] seconds after the relay is ready before its counters are zeroed
#   RUN_TIMEOUT [600] WORK [/var/tmp/mailrelay-rcost]
#   RELAY_YAML_EXTRA [""] more top-level relay config, e.g. "events: {enabled: false}"
#   (the queue's own memory, without the `accepted` event the enqueue also writes)
#   SMTP_PORT [15525] ADMIN_PORT [19625] SINK_PORT [15536] REDIS_PORT [16579] DNS_PORT [15553]
#   REDIS_ARGS [the chart's Redis tuning: "--zset-max-listpack-entries 32
#   --hash-max-listpack-entries 32"; bench/lib.sh]: more redis-server arguments; set and
#   empty for Redis's own defaults
# Starts redis-server, smtp-sink, dnsmasq (ROUTE=mx) and the relays, and stops each by
# PID on exit. Refuses to run if a port is busy.
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
MODES=${MODES:-"lifecycle memory drain"}
SIZES=${SIZES:-"1024 102400"}
N=${N:-5000}
SESSIONS=${SESSIONS:-20}
REPS=${REPS:-1}
ROUTE=${ROUTE:-mx}
BUILD=${BUILD:-1}
CALLGRIND=${CALLGRIND:-}
CALLGRIND_SETTLE=${CALLGRIND_SETTLE:-5}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
WORK=${WORK:-/var/tmp/mailrelay-rcost}
SMTP_PORT=${SMTP_PORT:-15525}
ADMIN_PORT=${ADMIN_PORT:-19625}
SINK_PORT=${SINK_PORT:-15536}
REDIS_PORT=${REDIS_PORT:-16579}
DNS_PORT=${DNS_PORT:-15553}
RELAY_BIN=${RELAY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/mailrelay}
RELAY_YAML_EXTRA=${RELAY_YAML_EXTRA:-}
BINS=${BINS:-"current=$RELAY_BIN"}
ADMIN_URL="http://127.0.0.1:$ADMIN_PORT"
# lib.sh reads these
export PF_PORT=0 BENCH_NAME=redis-cost.sh

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
has() { [[ " $1 " == *" $2 "* ]]; }   # has LIST WORD
# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root"
install_tools python3:python3 curl:curl smtp-source:postfix redis-server:redis-server \
  "$([ "$ROUTE" = mx ] && echo dnsmasq:dnsmasq-base || echo true:coreutils)" \
  "$([ -n "$CALLGRIND" ] && echo valgrind:valgrind || echo true:coreutils)"
case $ROUTE in smarthost|mx) ;; *) die "ROUTE must be smarthost or mx";; esac
for p in "$SMTP_PORT" "$ADMIN_PORT" "$SINK_PORT" "$REDIS_PORT" "$DNS_PORT"; do
  port_busy "$p" && die "port $p is already in use (set *_PORT to free ones)"
done
mkdir -p "$WORK"
rm -rf "$WORK"/redis "$WORK"/*.log "$WORK"/rows.jsonl "$WORK"/keys.jsonl "$WORK"/report.md "$WORK"/sink.* "$WORK"/cg.*
: > "$WORK/rows.jsonl"
INVALID=0
DNS_PID=""

if [ "$BUILD" = 1 ]; then
  log "cargo build --release -p mailrelay"
  (cd "$REPO" && cargo build --release -p mailrelay) >"$WORK/build.log" 2>&1 || die "build failed: $(tail -20 "$WORK/build.log")"
fi
for b in $BINS; do [ -x "${b#*=}" ] || die "no relay binary at ${b#*=} ($b)"; done

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
  max_concurrency: 50
  per_destination_concurrency: 50
  max_messages_per_connection: 100
$ROUTE_YAML"

cleanup() {
  local rc=$?
  set +e
  stop_relay
  stop_pid "$REDIS_PID"; REDIS_PID=""
  stop_pid "$SINK_PID"; SINK_PID=""
  stop_pid "$DNS_PID"; DNS_PID=""
  return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_dns() {
  /usr/sbin/dnsmasq --keep-in-foreground --port="$DNS_PORT" --listen-address=127.0.0.1 \
    --bind-interfaces --no-resolv --no-hosts --conf-file=/dev/null --pid-file \
    --log-facility="$WORK/dnsmasq.log" --local=/example.net/ --local-ttl=300 \
    --mx-host=example.net,mx.example.net,10 --host-record=mx.example.net,127.0.0.1 &
  DNS_PID=$!
  for _ in $(seq 1 100); do ss -Hlun "sport = :$DNS_PORT" | grep -q . && return 0; sleep 0.1; done
  die "dnsmasq did not listen on $DNS_PORT"
}
# start_relay_bin BIN DELIVERY_YAML: as lib.sh's start_relay, optionally under callgrind
# (which needs a longer wait for readiness)
start_relay_bin() {
  local bin=$1 cfg
  cfg=$(relay_config redis "" "$2" "$RELAY_YAML_EXTRA")
  if has "$CALLGRIND" relay; then
    valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" \
      "$bin" serve --config "$cfg" >>"$WORK/relay.log" 2>&1 &
  else
    "$bin" serve --config "$cfg" >>"$WORK/relay.log" 2>&1 &
  fi
  RELAY_PID=$!
  relay_wait_ready "$RELAY_PID" 600
}
# snapshot: one JSON object of Redis INFO (cpu, commandstats, memory) and the relay's CPU
snapshot() {
  { rcli INFO cpu; rcli INFO commandstats; rcli INFO memory; } | tr -d '\r' |
    python3 -c '
import json, os, sys
info = {}
for line in sys.stdin:
    if ":" not in line or line.startswith("#"):
        continue
    k, v = line.strip().split(":", 1)
    if k.startswith("cmdstat_"):
        info[k] = {p.split("=")[0]: float(p.split("=")[1]) for p in v.split(",") if p.split("=")[0] in ("calls", "usec")}
    elif k in ("used_cpu_user", "used_cpu_sys", "used_memory"):
        info[k] = float(v)
pid = int(sys.argv[1] or 0)
info["relay_cpu"] = 0.0
if pid:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    info["relay_cpu"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
print(json.dumps(info))' "$RELAY_PID"
}
sink_now() { python3 "$BENCH_DIR/timer.py" --sink-count "$WORK/sink.out"; }
queue_field() { curl -fs "$ADMIN_URL/api/v1/queue/stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
# callgrind_ir WHAT(relay|redis) zero|dump: zero the process's counters, or dump them
# and print the instructions (Ir) since the zero ("null" without CALLGRIND for WHAT)
callgrind_ir() {
  local pid f
  has "$CALLGRIND" "$1" || { echo null; return 0; }
  if [ "$1" = relay ]; then pid=$RELAY_PID; else pid=$REDIS_PID; fi
  if [ "$2" = zero ]; then callgrind_control -z "$pid" >/dev/null 2>&1; echo null; return 0; fi
  callgrind_control -d "$pid" >/dev/null 2>&1
  # shellcheck disable=SC2012  # the newest dump; names are ours, no odd characters
  f=$(ls -t "$WORK/cg.$pid".* 2>/dev/null | head -1)
  [ -n "$f" ] || { echo null; return 0; }
  awk '/^(summary|totals):/ {print $2; exit}' "$f"
}

# ROW_LINE: a raw row (stdin) as one progress line
ROW_LINE='
import json, sys
r = json.loads(sys.stdin.read())
e = r["commands"].get("evalsha", {})
s = "    -> %s: redis cpu %.1f us/msg (sys %.1f), commands %.1f us/msg, evalsha %.2f/msg at %.2f us, relay cpu %.0f us/msg" % (
    r["verify"], r["redis_cpu_us"], r["redis_sys_us"], r["cmd_us"], e.get("calls_per_msg", 0), e.get("usec_per_call", 0), r["relay_cpu_us"])
if r["relay_ir"]:
    s += ", relay %s Ir/msg" % format(round(r["relay_ir"]), ",")
if r["redis_ir"]:
    s += ", redis %s Ir/msg" % format(round(r["redis_ir"]), ",")
if r["mode"] == "memory":
    s += ", memory %.0f B/msg beyond the body (%.0f B)" % (r["overhead_per_msg"], r["body_bytes_per_msg"])
else:
    s += ", retained %.0f B/msg" % r["mem_delta_per_msg"]
print(s)'
# row MODE BIN SIZE REP BEFORE AFTER BYTES VERIFY RELAY_IR REDIS_IR: appends a JSON row
row() {
  python3 - "$@" "$N" >> "$WORK/rows.jsonl" <<'PY'
import json, sys
mode, label, size, rep, b, a, body, verify, ir, rir, n = sys.argv[1:]
b, a, n = json.loads(b), json.loads(a), int(n)
cmds = {}
for k, v in a.items():
    if k.startswith("cmdstat_"):
        calls = v["calls"] - b.get(k, {}).get("calls", 0)
        usec = v["usec"] - b.get(k, {}).get("usec", 0)
        if calls:
            cmds[k[8:]] = dict(calls_per_msg=calls / n, usec_per_call=usec / calls, usec=usec)
cpu = (a["used_cpu_user"] + a["used_cpu_sys"]) - (b["used_cpu_user"] + b["used_cpu_sys"])
mem = a["used_memory"] - b["used_memory"]
r = dict(mode=mode, bin=label, size=int(size), rep=int(rep), n=n, verify=verify,
         redis_cpu_us=1e6 * cpu / n, cmd_us=sum(c["usec"] for c in cmds.values()) / n,
         redis_sys_us=1e6 * (a["used_cpu_sys"] - b["used_cpu_sys"]) / n,
         relay_cpu_us=1e6 * (a["relay_cpu"] - b["relay_cpu"]) / n,
         relay_ir=(int(ir) / n if ir not in ("null", "") else None),
         redis_ir=(int(rir) / n if rir not in ("null", "") else None),
         mem_delta_per_msg=mem / n, commands=cmds)
if mode == "memory":
    r["body_bytes_per_msg"] = int(body) / n
    r["overhead_per_msg"] = (mem - int(body)) / n
print(json.dumps(r))
PY
  tail -1 "$WORK/rows.jsonl" | python3 -c "$ROW_LINE" >&2
  case $8 in ok) ;; *) INVALID=$((INVALID + 1)); log "    !! rep INVALID: $8";; esac
}

# keys MODE LABEL SIZE: where the bytes are, by key type, per message (appended to
# $WORK/keys.jsonl and logged): MEMORY USAGE (SAMPLES 0: exact) of every queue key
# whose name ends in one of the index names, divided by N, and the average of up
# to 50 per-message keys of each kind (`:m:` queued message or old-layout hash,
# `:f:` final record, `:s:` status). Works on both key layouts.
keys() {
  python3 - "$1" "$2" "$3" "$N" "$REDIS_PORT" >> "$WORK/keys.jsonl" <<'PY'
import json, subprocess, sys
mode, label, size, n, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def cli(*a):
    return subprocess.run(["redis-cli", "-p", port, *a], capture_output=True, text=True).stdout.split()
def scan(pattern, limit):
    out, cursor = [], "0"
    while True:
        r = cli("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
        cursor, keys = r[0], r[1:]
        out += keys
        if cursor == "0" or len(out) >= limit:
            return out[:limit]
def usage(k):
    r = cli("MEMORY", "USAGE", k, "SAMPLES", "0")
    return int(r[0]) if r else 0
row = dict(mode=mode, bin=label, size=size, n=n, per_msg={}, per_key={})
for index in ("due", "fresh", "ids", "leased", "lease", "later", "stats"):
    ks = [k for k in scan("*:" + index, 100000) if k.endswith("}:" + index)]
    if ks:
        row["per_msg"][index] = round(sum(usage(k) for k in ks) / n, 1)
for kind in ("m", "f", "s"):
    ks = scan("*}:%s:*" % kind, 50)
    if ks:
        row["per_key"][kind] = round(sum(usage(k) for k in ks) / len(ks), 1)
print(json.dumps(row))
PY
  log "    keys: $(tail -1 "$WORK/keys.jsonl")"
}

wait_delivered() {    # wait_delivered SINK_COUNT_BEFORE: until the sink has N more and the queue is empty
  local deadline=$((SECONDS + RUN_TIMEOUT))
  until [ $(( $(sink_now) - $1 )) -ge "$N" ] && [ "$(queue_field messages 2>/dev/null || echo '?')" = 0 ]; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# send_n BIN DELIVERY_YAML SIZE: empty Redis, start a relay, zero the counters, take
# the "before" snapshot (into $before, the sink's count into $s0), send N messages
send_n() {
  redis_reset
  start_relay_bin "$1" "$2"
  # /readyz answers before delivery has started (it loads the CA store: ~18 M
  # instructions, 9 k per message at N=2,000): under callgrind, let start-up end
  # before the counters are zeroed, or part of it is counted, a different part each run.
  if has "$CALLGRIND" relay; then sleep "$CALLGRIND_SETTLE"; fi
  rcli CONFIG RESETSTAT >/dev/null
  callgrind_ir relay zero >/dev/null; callgrind_ir redis zero >/dev/null
  s0=$(sink_now)
  before=$(snapshot)
  smtp-source -s "$SESSIONS" -m "$N" -l "$3" -M bench.local -f sender@example.com \
    -t rcpt@example.net "127.0.0.1:$SMTP_PORT" >>"$WORK/source.log" 2>&1
}

run_lifecycle() {     # run_lifecycle LABEL BIN SIZE REP
  local label=$1 bin=$2 size=$3 rep=$4 before after s0 got verify="ok" acc ir rir
  log "lifecycle $label size=$size n=$N rep $rep"
  send_n "$bin" "$DELIVERY_YAML" "$size" || verify="smtp-source failed"
  wait_delivered "$s0" || verify="timeout: sink $(( $(sink_now) - s0 )) of $N, queue $(queue_field messages 2>/dev/null || echo '?')"
  ir=$(callgrind_ir relay dump); rir=$(callgrind_ir redis dump)
  after=$(snapshot)
  sleep 1
  got=$(( $(sink_now) - s0 ))
  acc=$(metric mailrelay_smtp_messages_accepted_total)
  [ "$got" = "$N" ] || verify="$verify; sink counted $got of $N"
  [ "${acc:-x}" = "$N" ] || verify="$verify; accepted_total=${acc:-?}"
  verify=${verify#ok; }
  stop_relay
  keys lifecycle "$label" "$size"
  row lifecycle "$label" "$size" "$rep" "$before" "$after" 0 "$verify" "$ir" "$rir"
}

run_memory() {        # run_memory LABEL BIN SIZE REP
  local label=$1 bin=$2 size=$3 rep=$4 before after s0 verify="ok" acc msgs bytes ir rir got
  log "memory $label size=$size n=$N rep $rep"
  send_n "$bin" "  enabled: false" "$size" || verify="smtp-source failed"
  ir=$(callgrind_ir relay dump); rir=$(callgrind_ir redis dump)
  after=$(snapshot)
  acc=$(metric mailrelay_smtp_messages_accepted_total)
  msgs=$(queue_field messages)
  bytes=$(queue_field bytes)
  [ "$(( $(sink_now) - s0 ))" = 0 ] || verify="$verify; the sink got messages"
  [ "${acc:-x}" = "$N" ] || verify="$verify; accepted_total=${acc:-?}"
  [ "${msgs:-x}" = "$N" ] || verify="$verify; queue holds ${msgs:-?}"
  verify=${verify#ok; }
  stop_relay
  keys memory "$label" "$size"
  row memory "$label" "$size" "$rep" "$before" "$after" "$bytes" "$verify" "$ir" "$rir"
  has "$MODES" drain && [ "$verify" = ok ] || return 0
  # drain: the same queue, a fresh relay with delivery on (so every lease finds a full
  # queue: batches that do not depend on timing, unlike the mixed lifecycle)
  log "drain $label size=$size n=$N rep $rep"
  verify=ok
  # Delivery starts with the process, before it is ready: Redis is read before the
  # start, the relay's CPU and instructions count from its start (start-up included).
  RELAY_PID=0
  callgrind_ir redis zero >/dev/null
  before=$(snapshot)
  start_relay_bin "$bin" "$DELIVERY_YAML"
  wait_delivered "$s0" || verify="timeout: sink $(( $(sink_now) - s0 )) of $N, queue $(queue_field messages 2>/dev/null || echo '?')"
  ir=$(callgrind_ir relay dump); rir=$(callgrind_ir redis dump)
  after=$(snapshot)
  sleep 1
  got=$(( $(sink_now) - s0 ))
  [ "$got" = "$N" ] || verify="$verify; sink counted $got of $N"
  verify=${verify#ok; }
  stop_relay
  row drain "$label" "$size" "$rep" "$before" "$after" 0 "$verify" "$ir" "$rir"
}

log "machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); mailrelay $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
log "MODES='$MODES' SIZES='$SIZES' N=$N SESSIONS=$SESSIONS REPS=$REPS ROUTE=$ROUTE CALLGRIND=$CALLGRIND BINS='$BINS'"
: > "$WORK/sink.out"
start_sink
if has "$CALLGRIND" redis; then
  mkdir -p "$WORK/redis"
  read -ra extra <<<"$REDIS_ARGS"
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" \
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" \
    --appendonly yes --appendfsync everysec --save '' --auto-aof-rewrite-percentage 0 \
    --daemonize no --logfile "$WORK/redis.log" "${extra[@]}" >>"$WORK/valgrind-redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 1 300); do port_busy "$REDIS_PORT" && break; sleep 0.1; done
  port_busy "$REDIS_PORT" || die "redis-server under callgrind did not listen"
else
  start_redis
fi
[ "$ROUTE" = mx ] && start_dns

for mode in $MODES; do
  for size in $SIZES; do
    for rep in $(seq 1 "$REPS"); do
      # binaries interleaved per rep, so a drift in background load hits them alike
      for b in $BINS; do
        case $mode in
          lifecycle) run_lifecycle "${b%%=*}" "${b#*=}" "$size" "$rep" ;;
          memory) run_memory "${b%%=*}" "${b#*=}" "$size" "$rep" ;;
          drain) has "$MODES" memory || die "MODES: drain follows memory (MODES=\"memory drain\")" ;;
          *) die "unknown mode $mode" ;;
        esac
      done
    done
  done
done

python3 - "$WORK/rows.jsonl" <<'PY' | tee "$WORK/report.md"
import json, sys
from statistics import median
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| mode | binary | size | reps ok | redis CPU µs/msg | commands µs/msg | EVALSHA/msg | µs/EVALSHA | relay CPU µs/msg | relay Ir/msg | redis Ir/msg | memory B/msg |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
seen = []
for r in rows:
    k = (r["mode"], r["bin"], r["size"])
    if k not in seen:
        seen.append(k)
for k in seen:
    rs = [r for r in rows if (r["mode"], r["bin"], r["size"]) == k and r["verify"] == "ok"]
    n_all = sum(1 for r in rows if (r["mode"], r["bin"], r["size"]) == k)
    if not rs:
        print(f"| {k[0]} | {k[1]} | {k[2]} | 0/{n_all} | | | | | | | | |")
        continue
    m = lambda f: median(f(r) for r in rs)
    ev = lambda r: r["commands"].get("evalsha", {})
    ir = m(lambda r: r["relay_ir"] or 0)
    rir = m(lambda r: r["redis_ir"] or 0)
    mem = m(lambda r: r["overhead_per_msg"]) if k[0] == "memory" else m(lambda r: r["mem_delta_per_msg"])
    print(f"| {k[0]} | {k[1]} | {k[2]} | {len(rs)}/{n_all} | {m(lambda r: r['redis_cpu_us']):.1f} | "
          f"{m(lambda r: r['cmd_us']):.1f} | {m(lambda r: ev(r).get('calls_per_msg', 0)):.2f} | "
          f"{m(lambda r: ev(r).get('usec_per_call', 0)):.2f} | {m(lambda r: r['relay_cpu_us']):.0f} | "
          f"{(f'{ir:,.0f}' if ir else '')} | {(f'{rir:,.0f}' if rir else '')} | {mem:.0f} |")
print()
print("memory B/msg: lifecycle = used_memory retained after the drain (final status records); "
      "memory = used_memory growth per queued message beyond its body bytes.")
PY
log "report: $WORK/report.md; raw rows: $WORK/rows.jsonl"
[ "$INVALID" = 0 ] || { log "$INVALID invalid rep(s)"; exit 1; }
