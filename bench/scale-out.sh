#!/usr/bin/env bash
# bench/scale-out.sh — does the cost of a message stay put when relays and Redis
# shards are added? (issue 21 item 6: the check of docs/capacity.md's model). A
# benchmark, not a test.
#
# On a 2-core machine, 3 relays cannot run faster than 1, so wall-clock rates say
# little; what the model needs is CPU seconds per message per process, which stay
# put however busy the machine is. For every topology in $TOPOLOGIES and every relay
# count R in $RELAYS, $REPS times:
#   single   one redis-server (--appendonly yes --appendfsync everysec --save '')
#   cluster  a 3-master Redis Cluster (no replicas, the same persistence), relays
#            with `queue.redis.cluster: true` and all three nodes as seeds
#   - FLUSHALL and CONFIG RESETSTAT on every Redis node;
#   - R relay processes (same key prefix: one shared queue), each on its own SMTP
#     and admin port, delivering to one smtp-sink through `delivery.smarthost`;
#   - R load generators in parallel (bench/smtp_senders.c, built with cc), generator
#     i sending N/R messages of SIZE octets over SESSIONS/R sessions to relay i, from
#     $SENDERS distinct envelope senders;
#   - until the sink has counted N more and the queue is empty; then per process:
#       relay i      CPU seconds (utime + stime of /proc/PID/stat, all threads, also
#                    exited ones) over the run / N  -> ms per message of the total
#       redis node   the same for each redis-server, plus INFO commandstats calls
#                    (all commands) / N and used_memory after the run
#     and the sums over relays and over Redis nodes. The model holds when the sums
#     per message stay flat as R grows (no hidden per-relay coordination cost) and
#     the per-node shares show how evenly the cluster spreads the work.
# Checks on every rep (a failing rep is reported invalid, exit 1): the sink counts
# exactly N more, every relay's accepted counter is its share, the queue ends empty.
#
# Run (as root, Debian 12):   bash bench/scale-out.sh
#   smaller:                  N=6000 RELAYS="1 3" TOPOLOGIES=single bash bench/scale-out.sh
# Knobs (environment), defaults in brackets:
#   N [18000] (a multiple of every R keeps the shares equal) SESSIONS [24] SIZE [1024]
#   SENDERS [1000] REPS [2] RELAYS ["1 2 3"] TOPOLOGIES ["single cluster"]
#   QUOTA [0] 1: every relay has one per-sender ingress quota (never reached)
#   RELAY_THREADS [unset: one per CPU] each relay's worker threads (runtime.worker_threads)
#   RELAY_BIN [${CARGO_TARGET_DIR:-target}/release/mailrelay] BUILD [0]
#   IDLE [5] s: before the load, the relays idle this long, and the Redis commands/s
#   and CPU they cause (queue polling) are reported
#   TIMEOUT [600] s per rep   WORK [/var/tmp/mailrelay-scale-out]
#   SMTP_BASE [15525] ADMIN_BASE [15425] SINK_PORT [15536] REDIS_BASE [15479]
#   (relay i uses SMTP_BASE+i, ADMIN_BASE+i; Redis nodes REDIS_BASE+0..2, cluster bus
#   ports REDIS_BASE+100..102)
# Side effects: none outside $WORK. Refuses to run if a port is busy. Stops every
# process it started, by PID, on exit (also on error or Ctrl-C).
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
N=${N:-18000}
SESSIONS=${SESSIONS:-24}
SIZE=${SIZE:-1024}
SENDERS=${SENDERS:-1000}
REPS=${REPS:-2}
RELAYS=${RELAYS:-"1 2 3"}
TOPOLOGIES=${TOPOLOGIES:-"single cluster"}
QUOTA=${QUOTA:-0}
BUILD=${BUILD:-0}
RELAY_BIN=${RELAY_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/mailrelay}
TIMEOUT=${TIMEOUT:-600}
IDLE=${IDLE:-5}
WORK=${WORK:-/var/tmp/mailrelay-scale-out}
SMTP_BASE=${SMTP_BASE:-15525}
ADMIN_BASE=${ADMIN_BASE:-15425}
SINK_PORT=${SINK_PORT:-15536}
REDIS_BASE=${REDIS_BASE:-15479}
# lib.sh reads these
SMTP_PORT=$SMTP_BASE ADMIN_PORT=$ADMIN_BASE REDIS_PORT=$REDIS_BASE PF_PORT=0 BENCH_NAME=scale-out.sh
ADMIN_URL="http://127.0.0.1:$ADMIN_BASE"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root"
for r in $RELAYS; do
  [[ $r =~ ^[1-9]$ ]] || die "RELAYS: '$r' is not a relay count 1-9"
  [ $((N % r)) = 0 ] || die "N=$N is not a multiple of $r (every relay must get an equal share)"
done
for t in $TOPOLOGIES; do case $t in single|cluster) ;; *) die "TOPOLOGIES: unknown '$t' (single or cluster)";; esac; done
install_tools python3:python3 curl:curl smtp-sink:postfix redis-server:redis-server cc:gcc
ports=("$SINK_PORT")
for i in 0 1 2 3 4 5 6 7 8; do ports+=("$((SMTP_BASE + i))" "$((ADMIN_BASE + i))"); done
for i in 0 1 2; do ports+=("$((REDIS_BASE + i))" "$((REDIS_BASE + 100 + i))"); done
for p in "${ports[@]}"; do port_busy "$p" && die "port $p is already in use (set the *_BASE / *_PORT knobs)"; done
ulimit -n 65536 2>/dev/null || true

if [ "$BUILD" = 1 ]; then
  (cd "$REPO" && cargo build --release -p mailrelay) >&2 || die "build failed"
fi
[ -x "$RELAY_BIN" ] || die "no relay binary at $RELAY_BIN (BUILD=1 builds it)"
GIT_REV=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)

rm -rf "$WORK"; mkdir -p "$WORK"
cc -O2 -o "$WORK/smtp_senders" "$BENCH_DIR/smtp_senders.c" || die "cc bench/smtp_senders.c failed"
: > "$WORK/runs.jsonl"

RELAY_PIDS=(); REDIS_PIDS=(); GEN_PIDS=()
cleanup() {
  local rc=$? p
  set +e
  for p in "${GEN_PIDS[@]}" "${RELAY_PIDS[@]}" "${REDIS_PIDS[@]}"; do stop_pid "$p"; done
  stop_pid "$SINK_PID"
  return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- Redis
redis_ports() { if [ "$1" = cluster ]; then echo "$REDIS_BASE $((REDIS_BASE + 1)) $((REDIS_BASE + 2))"; else echo "$REDIS_BASE"; fi; }
start_redis_topology() {  # start_redis_topology single|cluster
  local i=0 p extra=()
  for p in $(redis_ports "$1"); do
    mkdir -p "$WORK/redis-$p"
    if [ "$1" = cluster ]; then
      extra=(--cluster-enabled yes --cluster-config-file nodes.conf --cluster-port "$((REDIS_BASE + 100 + i))"
             --cluster-node-timeout 5000)
    fi
    redis-server --port "$p" --bind 127.0.0.1 --dir "$WORK/redis-$p" --appendonly yes --appendfsync everysec \
      --save '' --auto-aof-rewrite-percentage 0 --daemonize no --logfile "$WORK/redis-$p.log" "${extra[@]}" &
    REDIS_PIDS+=($!)
    wait_port "$p" "redis-server $p"
    i=$((i + 1))
  done
  if [ "$1" = cluster ]; then
    # shellcheck disable=SC2046
    redis-cli --cluster create $(for p in $(redis_ports cluster); do printf '127.0.0.1:%s ' "$p"; done) \
      --cluster-replicas 0 --cluster-yes >"$WORK/cluster-create.log" 2>&1 || die "redis-cli --cluster create: $(tail -3 "$WORK/cluster-create.log")"
    for p in $(redis_ports cluster); do
      for _ in $(seq 1 100); do
        redis-cli -p "$p" CLUSTER INFO | tr -d '\r' | grep -qx 'cluster_state:ok' && break; sleep 0.1
      done
    done
  fi
}
stop_redis_topology() {
  local p
  for p in "${REDIS_PIDS[@]}"; do stop_pid "$p"; done
  REDIS_PIDS=()
  rm -rf "$WORK"/redis-*/
}
redis_reset_all() {       # empty every node (masters only: no replicas here) and reset its stats
  local p
  for p in $(redis_ports "$1"); do
    redis-cli -p "$p" FLUSHALL >/dev/null
    redis-cli -p "$p" CONFIG RESETSTAT >/dev/null
  done
}

# ---------------------------------------------------------------- relays
relay_yaml() {            # relay_yaml TOPOLOGY I -> config path
  local topo=$1 i=$2 f="$WORK/relay-$1-$2.yaml" redis seeds="" p
  if [ "$topo" = cluster ]; then
    for p in $(redis_ports cluster); do seeds="$seeds${seeds:+, }\"redis://127.0.0.1:$p\""; done
    redis="{url: \"redis://127.0.0.1:$REDIS_BASE\", cluster: true, cluster_nodes: [$seeds], key_prefix: bench}"
  else
    redis="{url: \"redis://127.0.0.1:$REDIS_BASE/0\", key_prefix: bench}"
  fi
  cat > "$f" <<EOF
# written by bench/scale-out.sh
hostname: relay$i.bench.test
listeners: [{name: smtp, address: "127.0.0.1:$((SMTP_BASE + i))", tls: none}]
relay_networks: [127.0.0.0/8]
limits: {max_connections: 11000, max_connections_per_ip: 11000, max_message_size: 10485760}
queue: {backend: redis, redis: $redis}
delivery:
  enabled: true
  max_concurrency: 50
  per_destination_concurrency: 50
  max_messages_per_connection: 100
  smarthost: {host: 127.0.0.1, port: $SINK_PORT, tls: disabled}
admin: {address: "127.0.0.1:$((ADMIN_BASE + i))"}
log: {level: warn}
shutdown_grace: 5s
EOF
  [ -z "${RELAY_THREADS:-}" ] || echo "runtime: {worker_threads: $RELAY_THREADS}" >> "$f"
  if [ "$QUOTA" = 1 ]; then
    echo "quotas: [{name: per-sender, direction: ingress, match: {senders: ['*@example.com']}, scope: per_key, key: sender, limits: [1000/1m, 10000/1h, 100000/1d]}]" >> "$f"
  fi
  echo "$f"
}
start_relays() {          # start_relays TOPOLOGY R
  local i cfg
  RELAY_PIDS=()
  for i in $(seq 0 $(($2 - 1))); do
    cfg=$(relay_yaml "$1" "$i")
    "$RELAY_BIN" serve --config "$cfg" >>"$WORK/relay-$i.log" 2>&1 &
    RELAY_PIDS+=($!)
  done
  for i in $(seq 0 $(($2 - 1))); do
    for _ in $(seq 1 200); do
      curl -fs "http://127.0.0.1:$((ADMIN_BASE + i))/readyz" >/dev/null 2>&1 && port_busy "$((SMTP_BASE + i))" && break
      kill -0 "${RELAY_PIDS[$i]}" 2>/dev/null || die "relay $i exited: $(tail -5 "$WORK/relay-$i.log")"
      sleep 0.1
    done
    curl -fs "http://127.0.0.1:$((ADMIN_BASE + i))/readyz" >/dev/null 2>&1 || die "relay $i not ready: $(tail -5 "$WORK/relay-$i.log")"
  done
}
stop_relays() { local p; for p in "${RELAY_PIDS[@]}"; do stop_pid "$p"; done; RELAY_PIDS=(); }
relay_metric() {          # relay_metric I NAME
  curl -fs "http://127.0.0.1:$((ADMIN_BASE + $1))/metrics" | awk -v m="$2" '$1 == m && !f {print $2; f = 1}'
}
relay_queue() { curl -fs "http://127.0.0.1:$((ADMIN_BASE + $1))/api/v1/queue/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])'; }

# ---------------------------------------------------------------- accounting
# snapshot TOPOLOGY -> JSON: CPU seconds of every relay and redis-server (utime+stime,
# /proc/PID/stat: every thread, also ones that exited), and per Redis node its
# commandstats calls, used_memory and keys
snapshot() {
  python3 - "$1" "${RELAY_PIDS[*]}" "${REDIS_PIDS[*]}" "$(redis_ports "$1")" <<'PY'
import json, os, subprocess, sys
topo, relays, redis, ports = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
hz = os.sysconf('SC_CLK_TCK')
def cpu(pid):
    f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / hz
def info(port, section):
    out = subprocess.run(['redis-cli', '-p', port, 'INFO', section], capture_output=True, text=True).stdout
    return dict(l.split(':', 1) for l in out.replace('\r', '').splitlines() if ':' in l)
nodes = []
for pid, port in zip(redis, ports):
    cs = info(port, 'commandstats')
    calls = sum(int(v.split('calls=')[1].split(',')[0]) for k, v in cs.items() if k.startswith('cmdstat_'))
    evalsha = sum(int(v.split('calls=')[1].split(',')[0]) for k, v in cs.items() if k in ('cmdstat_evalsha', 'cmdstat_eval'))
    mem = info(port, 'memory')
    keys = subprocess.run(['redis-cli', '-p', port, 'DBSIZE'], capture_output=True, text=True).stdout.strip()
    cmds = {k[len('cmdstat_'):]: [int(v.split('calls=')[1].split(',')[0]), int(v.split('usec=')[1].split(',')[0])]
            for k, v in cs.items() if k.startswith('cmdstat_')}
    nodes.append(dict(port=port, cpu=cpu(pid), calls=calls, evalsha=evalsha, cmds=cmds,
                      used_memory=int(mem['used_memory']), keys=int(keys or 0)))
print(json.dumps(dict(relays=[cpu(p) for p in relays], redis=nodes)))
PY
}

# ---------------------------------------------------------------- one rep
run_rep() {               # run_rep TOPOLOGY R REP
  local topo=$1 r=$2 rep=$3 share=$((N / $2)) sess i s0 s1 t0 t1 got0 got want verdict="ok" acc left load0 load1 gen_out
  sess=$((SESSIONS / r)); [ "$sess" -ge 1 ] || sess=1
  log "$topo: $r relay(s), rep $rep: $N messages ($share per relay, $sess sessions each)"
  redis_reset_all "$topo"
  start_relays "$topo" "$r"
  got0=$(sink_count); want=$((got0 + N))
  # idle: what R waiting relays cost Redis (polling) before any mail comes
  si0=$(snapshot "$topo"); sleep "$IDLE"; si1=$(snapshot "$topo")
  load0=$(cut -d' ' -f1-3 /proc/loadavg)
  s0=$(snapshot "$topo")
  t0=$(date +%s.%N)
  GEN_PIDS=()
  for i in $(seq 0 $((r - 1))); do
    "$WORK/smtp_senders" -s "$sess" -m "$share" -l "$SIZE" -n "$SENDERS" -d example.com -t rcpt@example.net \
      -M bench.local "127.0.0.1:$((SMTP_BASE + i))" 2>"$WORK/gen-$i.json" &
    GEN_PIDS+=($!)
  done
  for i in "${!GEN_PIDS[@]}"; do
    wait "${GEN_PIDS[$i]}" || verdict="generator $i: $(tail -c 300 "$WORK/gen-$i.json")"
  done
  GEN_PIDS=()
  got=$got0
  for _ in $(seq 1 $((TIMEOUT * 10))); do
    got=$(sink_count); [ "$got" -ge "$want" ] && break; sleep 0.1
  done
  t1=$(date +%s.%N)
  left="?"
  for _ in $(seq 1 300); do left=$(relay_queue 0 2>/dev/null || echo '?'); [ "$left" = 0 ] && break; sleep 0.1; done
  s1=$(snapshot "$topo")
  load1=$(cut -d' ' -f1-3 /proc/loadavg)
  sleep 1; got=$(sink_count)
  [ "$got" = "$want" ] || verdict="$verdict; sink counted $((got - got0)) of $N"
  for i in $(seq 0 $((r - 1))); do
    acc=$(relay_metric "$i" mailrelay_smtp_messages_accepted_total)
    [ "${acc:-x}" = "$share" ] || verdict="$verdict; relay $i accepted ${acc:-?} != $share"
  done
  [ "$left" = 0 ] || verdict="$verdict; queue still holds $left"
  verdict=${verdict#ok; }
  stop_relays
  gen_out=$(cat "$WORK"/gen-*.json | python3 -c 'import json,sys; print(json.dumps([json.loads(l) for l in sys.stdin if l.strip()]))')
  rm -f "$WORK"/gen-*.json
  python3 - "$topo" "$r" "$rep" "$N" "$t0" "$t1" "$s0" "$s1" "$verdict" "$load0" "$load1" "$gen_out" "$si0" "$si1" "$IDLE" >> "$WORK/runs.jsonl" <<'PY'
import json, sys
topo, r, rep, n, t0, t1, s0, s1, verdict, l0, l1, gen, si0, si1, idle = sys.argv[1:]
n = int(n); s0, s1 = json.loads(s0), json.loads(s1)
si0, si1, idle = json.loads(si0), json.loads(si1), float(idle)
idle_calls = sum(b['calls'] - a['calls'] for a, b in zip(si0['redis'], si1['redis'])) / idle
idle_redis_cpu = sum(b['cpu'] - a['cpu'] for a, b in zip(si0['redis'], si1['redis'])) / idle
idle_relay_cpu = sum(b - a for a, b in zip(si0['relays'], si1['relays'])) / idle
relay_ms = [1000 * (b - a) / n for a, b in zip(s0['relays'], s1['relays'])]
def cmd_delta(a, b):  # {command: [calls per message, µs of Redis time per message]}
    return {k: [(v[0] - a.get(k, [0, 0])[0]) / n, (v[1] - a.get(k, [0, 0])[1]) / n]
            for k, v in b.items() if v[0] != a.get(k, [0, 0])[0]}
redis = [dict(port=b['port'], cpu_ms=1000 * (b['cpu'] - a['cpu']) / n, calls=(b['calls'] - a['calls']) / n,
              cmds=cmd_delta(a['cmds'], b['cmds']),
              evalsha=(b['evalsha'] - a['evalsha']) / n, used_memory=b['used_memory'], keys=b['keys'])
         for a, b in zip(s0['redis'], s1['redis'])]
gen = json.loads(gen)
print(json.dumps(dict(topology=topo, relays=int(r), rep=int(rep), n=n, wall=float(t1) - float(t0),
                      relay_ms=relay_ms, redis=redis, gen_ms=sum(g['gen_cpu_s'] for g in gen) * 1000 / n,
                      idle_calls_s=idle_calls, idle_redis_cpu=idle_redis_cpu, idle_relay_cpu=idle_relay_cpu,
                      load_before=l0, load_after=l1, status='ok' if verdict == 'ok' else 'invalid: ' + verdict)))
PY
  python3 - "$(tail -1 "$WORK/runs.jsonl")" >&2 <<'PY'
import json, sys
r = json.loads(sys.argv[1])
rc = ' + '.join('%.3f' % x['cpu_ms'] for x in r['redis'])
calls = ' + '.join('%.2f' % x['calls'] for x in r['redis'])
print(f"    -> {r['status']}: {r['n'] / r['wall']:,.0f} msg/s wall; relay CPU ms/msg "
      f"{' + '.join(f'{x:.3f}' for x in r['relay_ms'])} = {sum(r['relay_ms']):.3f}; redis CPU ms/msg "
      f"{rc} = {sum(x['cpu_ms'] for x in r['redis']):.3f}; commands/msg {calls}; idle: {r['idle_calls_s']:,.0f} Redis commands/s, "
      f"relays {100 * r['idle_relay_cpu']:.1f} % / redis {100 * r['idle_redis_cpu']:.1f} % of a core; load {r['load_before']}")
PY
  sleep 1
}

# ---------------------------------------------------------------- runs
log "mailrelay $GIT_REV ($RELAY_BIN); N=$N SESSIONS=$SESSIONS SIZE=$SIZE SENDERS=$SENDERS REPS=$REPS RELAYS='$RELAYS' TOPOLOGIES='$TOPOLOGIES' QUOTA=$QUOTA"
start_sink
for topo in $TOPOLOGIES; do
  start_redis_topology "$topo"
  # reps round-robin over the relay counts: a burst of load from elsewhere hits every row alike
  for rep in $(seq 1 "$REPS"); do
    for r in $RELAYS; do run_rep "$topo" "$r" "$rep"; done
  done
  stop_redis_topology
done
stop_pid "$SINK_PID"; SINK_PID=""

# ---------------------------------------------------------------- report
python3 - "$WORK/runs.jsonl" "$GIT_REV" "$N" "$SIZE" "$SESSIONS" "$SENDERS" "$QUOTA" "$(redis-server --version | awk '{print $3}')" <<'PY' | tee "$WORK/report.md"
import json, statistics as st, sys, time
path, rev, n, size, sess, senders, quota, rv = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
print(f"## bench/scale-out.sh — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, mailrelay {rev}, Redis {rv}\n")
print(f"{n} messages of {size} B per rep, {sess} sessions in all, {senders} senders, "
      f"{'one per-sender ingress quota' if quota == '1' else 'no quota'}; smtp-sink through delivery.smarthost. "
      "CPU = utime + stime per process (/proc/PID/stat) over the run, per message of the total; medians over reps. "
      "Redis: AOF everysec.\n")
print('| Redis | relays | ok/runs | relay CPU ms/msg, each | relays Σ | redis-server CPU ms/msg, each node | Redis Σ | '
      'Redis commands/msg, each node | EVALSHA/msg Σ | max/min node commands | idle: Redis commands/s, relays / Redis % of a core | '
      'generators ms/msg | wall msg/s | load1 before |')
print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
med = lambda xs: st.median(xs) if xs else float('nan')
for topo in ('single', 'cluster'):
    for r in sorted({x['relays'] for x in rows if x['topology'] == topo}):
        rs = [x for x in rows if x['topology'] == topo and x['relays'] == r]
        g = [x for x in rs if x['status'] == 'ok']
        if not g:
            print(f"| {topo} | {r} | 0/{len(rs)} | INVALID: {rs[0]['status'][:100]} | | | | | | | | | | |")
            continue
        each = [med([x['relay_ms'][i] for x in g]) for i in range(r)]
        nodes = len(g[0]['redis'])
        rcpu = [med([x['redis'][i]['cpu_ms'] for x in g]) for i in range(nodes)]
        calls = [med([x['redis'][i]['calls'] for x in g]) for i in range(nodes)]
        ev = med([sum(y['evalsha'] for y in x['redis']) for x in g])
        spread = f"{max(calls) / min(calls):.2f}×" if nodes > 1 and min(calls) > 0 else '—'
        print(f"| {topo} | {r} | {len(g)}/{len(rs)} | {' / '.join(f'{v:.3f}' for v in each)} | **{med([sum(x['relay_ms']) for x in g]):.3f}** | "
              f"{' / '.join(f'{v:.3f}' for v in rcpu)} | **{med([sum(y['cpu_ms'] for y in x['redis']) for x in g]):.3f}** | "
              f"{' / '.join(f'{v:.2f}' for v in calls)} | {ev:.2f} | {spread} | "
              f"{med([x['idle_calls_s'] for x in g]):,.0f}, {100 * med([x['idle_relay_cpu'] for x in g]):.1f} / {100 * med([x['idle_redis_cpu'] for x in g]):.1f} | "
              f"{med([x['gen_ms'] for x in g]):.3f} | "
              f"{med([x['n'] / x['wall'] for x in g]):,.0f} | {' / '.join(x['load_before'].split()[0] for x in rs)} |")
bad = [x for x in rows if x['status'] != 'ok']
if bad:
    print(f"\n{len(bad)} rep(s) failed their checks (excluded): " + '; '.join(x['status'] for x in bad))
    sys.exit(1)
PY
log "report: $WORK/report.md; raw: $WORK/runs.jsonl"
