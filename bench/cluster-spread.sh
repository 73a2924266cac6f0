#!/usr/bin/env bash
# bench/cluster-spread.sh — how evenly a mixed workload spreads over the masters of a
# Redis Cluster (issue 21 item 3). A benchmark, not a test: counts that stay put on a
# busy machine (INFO commandstats calls and usec per master), not wall-clock.
#
# For every relay binary in $BINS (label=path: an old and a new build in one run),
# $REPS reps, against one private 3-master Redis Cluster (no replicas, slots spread
# by `redis-cli --cluster create`):
#   FLUSHALL + CONFIG RESETSTAT on every master, one relay (queue on the cluster,
#   delivery on), $SENDERS smtp-source processes at once, process i sending $PER
#   messages from its own sender (s<i>@s<i>.example, its own ingress counter) to its
#   own destination domain (d<i>.example.net, MX mx<i>.example.net at a private
#   dnsmasq: its own MX site, its own egress pacing and lease keys), until smtp-sink
#   has all of them and the queue is empty. Quotas (limits far above the load, so
#   nothing waits):
#     ingress  per-sender   key: sender,  1000000000/1m
#     egress   per-site     key: mx_site, 1000000000/1m, max_connections: 50
#   SHARED=1 adds one `scope: shared` quota each way (one counter for all mail:
#   one slot by nature, whatever the layout).
# Per master: calls and usec of all commands (INFO commandstats), and of EVALSHA;
# the spread is max/min over the masters of the calls (target < 2).
#
# Checks on every rep (an invalid rep makes the script exit 1): smtp-sink counts
# exactly SENDERS*PER more, the relay accepted that many, the queue ends empty.
#
# Output: a markdown table on stdout and in $WORK/report.md; raw rows (every
# command per master) in $WORK/rows.jsonl.
#
# Run (as root, Debian 12):
#   BINS="before=/work/mailrelay-stop14-release after=target/release/mailrelay" \
#     BUILD=0 bash bench/cluster-spread.sh
# Knobs: SENDERS [32] PER [100] SESSIONS [1] (per smtp-source) SHARED [0] REPS [1]
#   BINS ["current=$RELAY_BIN"] BUILD [1] RUN_TIMEOUT [600] WORK [/var/tmp/mailrelay-cspread]
#   SMTP_PORT [15925] ADMIN_PORT [19925] SINK_PORT [15936] CLUSTER_PORT [16919]
#   (masters on CLUSTER_PORT..+2, their bus ports +100) DNS_PORT [15953]
# Starts the masters, smtp-sink, dnsmasq and the relays, and stops each by PID on
# exit. Refuses to run if a port is busy.
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
SENDERS=${SENDERS:-32}
PER=${PER:-100}
SESSIONS=${SESSIONS:-1}
SHARED=${SHARED:-0}
REPS=${REPS:-1}
BUILD=${BUILD:-1}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
WORK=${WORK:-/var/tmp/mailrelay-cspread}
SMTP_PORT=${SMTP_PORT:-15925}
ADMIN_PORT=${ADMIN_PORT:-19925}
SINK_PORT=${SINK_PORT:-15936}
CLUSTER_PORT=${CLUSTER_PORT:-16919}
DNS_PORT=${DNS_PORT:-15953}
REDIS_PORT=$CLUSTER_PORT   # lib.sh's rcli: the first master
RELAY_BIN=${RELAY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/mailrelay}
BINS=${BINS:-"current=$RELAY_BIN"}
ADMIN_URL="http://127.0.0.1:$ADMIN_PORT"
N=$((SENDERS * PER))
MASTERS=($CLUSTER_PORT $((CLUSTER_PORT + 1)) $((CLUSTER_PORT + 2)))
export PF_PORT=0 BENCH_NAME=cluster-spread.sh

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
. "$BENCH_DIR/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root"
install_tools python3:python3 curl:curl smtp-source:postfix redis-server:redis-server \
  redis-cli:redis-tools dnsmasq:dnsmasq-base
for p in "$SMTP_PORT" "$ADMIN_PORT" "$SINK_PORT" "$DNS_PORT" "${MASTERS[@]}"; do
  port_busy "$p" && die "port $p is already in use (set *_PORT to free ones)"
done
for p in "${MASTERS[@]}"; do port_busy $((p + 100)) && die "port $((p + 100)) is in use"; done
mkdir -p "$WORK"
rm -rf "$WORK"/node* "$WORK"/*.log "$WORK"/rows.jsonl "$WORK"/report.md "$WORK"/sink.*
: > "$WORK/rows.jsonl"
INVALID=0
DNS_PID=""
NODE_PIDS=()

if [ "$BUILD" = 1 ]; then
  log "cargo build --release -p mailrelay"
  (cd "$REPO" && cargo build --release -p mailrelay) >"$WORK/build.log" 2>&1 || die "build failed: $(tail -20 "$WORK/build.log")"
fi
for b in $BINS; do [ -x "${b#*=}" ] || die "no relay binary at ${b#*=} ($b)"; done

cleanup() {
  local rc=$?
  set +e
  stop_relay
  for p in "${NODE_PIDS[@]}"; do stop_pid "$p"; done
  stop_pid "$SINK_PID"; SINK_PID=""
  stop_pid "$DNS_PID"; DNS_PID=""
  return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_cluster() {
  local p addrs=()
  for p in "${MASTERS[@]}"; do
    mkdir -p "$WORK/node$p"
    redis-server --port "$p" --bind 127.0.0.1 --dir "$WORK/node$p" --save '' --appendonly no \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-port $((p + 100)) \
      --daemonize no --logfile "$WORK/node$p.log" &
    NODE_PIDS+=($!)
    wait_port "$p" redis-server
    addrs+=("127.0.0.1:$p")
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >"$WORK/create.log" 2>&1 ||
    die "redis-cli --cluster create: $(tail -5 "$WORK/create.log")"
  for p in "${MASTERS[@]}"; do
    for _ in $(seq 1 100); do
      redis-cli -p "$p" CLUSTER INFO | tr -d '\r' | grep -q '^cluster_state:ok' && break
      sleep 0.1
    done
  done
}
start_dns() {
  local args=() i
  for i in $(seq 1 "$SENDERS"); do
    args+=(--mx-host="d$i.example.net,mx$i.example.net,10" --host-record="mx$i.example.net,127.0.0.1")
  done
  /usr/sbin/dnsmasq --keep-in-foreground --port="$DNS_PORT" --listen-address=127.0.0.1 \
    --bind-interfaces --no-resolv --no-hosts --conf-file=/dev/null --pid-file \
    --log-facility="$WORK/dnsmasq.log" --local=/example.net/ --local-ttl=300 "${args[@]}" &
  DNS_PID=$!
  for _ in $(seq 1 100); do ss -Hlun "sport = :$DNS_PORT" | grep -q . && return 0; sleep 0.1; done
  die "dnsmasq did not listen on $DNS_PORT"
}
config() {
  local cfg="$WORK/relay.yaml" shared=""
  [ "$SHARED" = 1 ] && shared="
  - {name: all-in, direction: ingress, scope: shared, limits: [1000000000/1m]}
  - {name: all-out, direction: egress, scope: shared, limits: [1000000000/1m]}"
  cat > "$cfg" <<EOF
# written by bench/$BENCH_NAME
hostname: relay.bench.test
listeners:
  - name: smtp
    address: 127.0.0.1:$SMTP_PORT
    tls: none
relay_networks: [127.0.0.0/8]
limits:
  max_connections: 11000
  max_connections_per_ip: 11000
  max_message_size: 10485760
queue:
  backend: redis
  redis:
    url: redis://127.0.0.1:${MASTERS[0]}
    cluster: true
    cluster_nodes: [redis://127.0.0.1:${MASTERS[1]}, redis://127.0.0.1:${MASTERS[2]}]
delivery:
  enabled: true
  max_concurrency: 50
  per_destination_concurrency: 50
  max_messages_per_connection: 100
  tls: disabled
  dns:
    nameservers: ["127.0.0.1:$DNS_PORT"]
    port_override: $SINK_PORT
quotas:
  - {name: per-sender, direction: ingress, key: sender, limits: [1000000000/1m]}
  - {name: per-site, direction: egress, key: mx_site, limits: [1000000000/1m], max_connections: 50}$shared
admin:
  address: 127.0.0.1:$ADMIN_PORT
log:
  level: warn
shutdown_grace: 5s
EOF
  echo "$cfg"
}
masters_json() {   # INFO commandstats of every master, as {port: {cmd: [calls, usec]}}
  for p in "${MASTERS[@]}"; do
    echo "== $p"
    redis-cli -p "$p" INFO commandstats | tr -d '\r'
  done | python3 -c '
import json, sys
out, port = {}, None
for line in sys.stdin:
    line = line.strip()
    if line.startswith("== "):
        port = line[3:]; out[port] = {}
    elif line.startswith("cmdstat_"):
        k, v = line.split(":", 1)
        f = dict(p.split("=") for p in v.split(","))
        out[port][k[8:]] = [int(f["calls"]), int(float(f["usec"]))]
print(json.dumps(out))'
}
sink_now() { python3 "$BENCH_DIR/timer.py" --sink-count "$WORK/sink.out"; }
queue_field() { curl -fs "$ADMIN_URL/api/v1/queue/stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

run() {   # run LABEL BIN REP
  local label=$1 bin=$2 rep=$3 s0 verify=ok got acc i pids=() deadline
  log "$label rep $rep: $SENDERS senders x $PER messages to $SENDERS MX sites"
  for p in "${MASTERS[@]}"; do redis-cli -p "$p" FLUSHALL >/dev/null; done
  "$bin" serve --config "$(config)" >>"$WORK/relay.log" 2>&1 &
  RELAY_PID=$!
  relay_wait_ready "$RELAY_PID" 600
  for p in "${MASTERS[@]}"; do redis-cli -p "$p" CONFIG RESETSTAT >/dev/null; done
  s0=$(sink_now)
  for i in $(seq 1 "$SENDERS"); do
    smtp-source -s "$SESSIONS" -m "$PER" -l 1024 -M bench.local -f "s$i@s$i.example" \
      -t "rcpt@d$i.example.net" "127.0.0.1:$SMTP_PORT" >>"$WORK/source.log" 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || verify="smtp-source failed"; done
  deadline=$((SECONDS + RUN_TIMEOUT))
  until [ $(( $(sink_now) - s0 )) -ge "$N" ] && [ "$(queue_field messages 2>/dev/null || echo '?')" = 0 ]; do
    [ "$SECONDS" -lt "$deadline" ] || { verify="timeout: sink $(( $(sink_now) - s0 )) of $N"; break; }
    sleep 0.2
  done
  local stats; stats=$(masters_json)
  sleep 1
  got=$(( $(sink_now) - s0 ))
  acc=$(metric mailrelay_smtp_messages_accepted_total)
  [ "$got" = "$N" ] || verify="$verify; sink counted $got of $N"
  [ "${acc:-x}" = "$N" ] || verify="$verify; accepted_total=${acc:-?}"
  verify=${verify#ok; }
  stop_relay
  python3 - "$label" "$rep" "$N" "$verify" "$stats" >> "$WORK/rows.jsonl" <<'PY'
import json, sys
label, rep, n, verify, stats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
masters = {}
for port, cmds in stats.items():
    masters[port] = dict(
        calls=sum(c[0] for c in cmds.values()), usec=sum(c[1] for c in cmds.values()),
        evalsha=cmds.get("evalsha", [0, 0])[0], evalsha_usec=cmds.get("evalsha", [0, 0])[1],
        commands=cmds)
calls = [m["calls"] for m in masters.values()]
usec = [m["usec"] for m in masters.values()]
print(json.dumps(dict(bin=label, rep=rep, n=n, verify=verify, masters=masters,
    calls_ratio=max(calls) / max(min(calls), 1), usec_ratio=max(usec) / max(min(usec), 1))))
PY
  tail -1 "$WORK/rows.jsonl" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("    -> %s: calls per master %s (max/min %.2f), usec %s (max/min %.2f)" % (r["verify"],
  [m["calls"] for m in r["masters"].values()], r["calls_ratio"],
  [m["usec"] for m in r["masters"].values()], r["usec_ratio"]))' >&2
  [ "$verify" = ok ] || { INVALID=$((INVALID + 1)); log "    !! rep INVALID: $verify"; }
}

log "machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); mailrelay $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
log "SENDERS=$SENDERS PER=$PER SESSIONS=$SESSIONS SHARED=$SHARED REPS=$REPS BINS='$BINS'"
: > "$WORK/sink.out"
start_sink
start_dns
start_cluster
for rep in $(seq 1 "$REPS"); do
  for b in $BINS; do run "${b%%=*}" "${b#*=}" "$rep"; done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$WORK/rows.jsonl" "$LOAD_AFTER" "$SENDERS" "$PER" "$SHARED" <<'PY' | tee "$WORK/report.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
load, senders, per, shared = sys.argv[2:]
print(f"{senders} senders x {per} messages (1 KB), each sender to its own MX site; "
      f"quotas: ingress per sender, egress per MX site{' + one shared quota each way' if shared == '1' else ''}. "
      f"Load average after: {load}.\n")
print("| binary | rep | ok | calls per master (all commands) | max/min calls | usec per master | max/min usec | EVALSHA per master |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    m = list(r["masters"].values())
    print(f"| {r['bin']} | {r['rep']} | {r['verify']} | {' / '.join(str(x['calls']) for x in m)} | "
          f"{r['calls_ratio']:.2f} | {' / '.join(str(x['usec']) for x in m)} | {r['usec_ratio']:.2f} | "
          f"{' / '.join(str(x['evalsha']) for x in m)} |")
PY
[ "$INVALID" = 0 ] || die "$INVALID invalid rep(s)"
