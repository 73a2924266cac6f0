#!/usr/bin/env python3
"""Markdown report of bench/ingress.sh: report.py WORKDIR (reads runs.jsonl, rss.json,
facts.json there) -> stdout."""
import json
import os
import statistics as st
import sys

work = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(work, 'runs.jsonl')) if l.strip()]
facts = json.load(open(os.path.join(work, 'facts.json')))
rss_path = os.path.join(work, 'rss.json')
rss = None
if os.path.exists(rss_path) and os.path.getsize(rss_path):
    try:
        rss = json.load(open(rss_path))
    except ValueError:
        rss = None

LABEL = {
    'direct': 'smtp-source→smtp-sink (tool ceiling)',
    'embedded': 'mailrelay, embedded redb (fsync per group commit)',
    'redis': 'mailrelay, Redis AOF everysec',
    'redis-always': 'mailrelay, Redis AOF always (fsync per write)',
    'postfix': 'Postfix (anchor: accepts + delivers)',
    'postfix-hold': 'Postfix accept-only (HOLD, anchor split)',
}
RELAY = ('embedded', 'redis', 'redis-always')


def size_name(b):
    return f'{b // 1024} KB' if b % 1024 == 0 else f'{b} B'


def scen_name(k):
    return f"{size_name(k[0]).replace(' ', '').lower()}-s{k[1]}"


def fmt(v):
    return f'{v:,.0f}'


def rate(r):
    return r['n'] / r['t_accept']


def server_ms(r):
    if r['backend'] == 'direct':
        return None
    v = r['server_cpu']
    if r['backend'].startswith('postfix') and v <= 0:   # older rows: all but the load tools
        v = r['total_cpu'] - r['src_cpu'] - r['tool_cpu']
    return 1000 * v / r['n']


scen = []
for r in rows:
    k = (r['size'], r['sessions'])
    if k not in scen:
        scen.append(k)
backends = []
for r in rows:
    if r['backend'] not in backends:
        backends.append(r['backend'])


def group(k, b):
    return [r for r in rows if (r['size'], r['sessions']) == k and r['backend'] == b]


def ok(rs):
    return [r for r in rs if r['status'] == 'ok']


med = {}
for k in scen:
    for b in backends:
        g = ok(group(k, b))
        if g:
            med[(k, b)] = st.median(rate(r) for r in g)

print(f"## mailrelay ingress benchmark — {facts['date']}")
print()
print(f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['mem']}, kernel {facts['kernel']}, {facts['os']}; "
      f"Postfix {facts['postfix']}, Redis {facts['redis']}, mailrelay {facts['mailrelay']}.")
print(f"fsync probe (same filesystem as the queues: {facts['queue_fs_same_as_postfix_spool']}): {facts['fsync_probe']}.")
kn = facts['knobs']
print(f"Knobs: N={kn['N']} (bodies < 100 KB), N_BIG={kn['N_BIG']} (100 KB), REPS={kn['REPS']}, QUICK={kn['QUICK']}; "
      "one message per SMTP session; `smtp-source -s S -m N -l L -f sender@example.com -t rcpt@example.net -M bench.local`.")
print()
print('### 1. Accept rate')
print()
print('accept = N / wall time until smtp-source exited (every message got its 250). ratio = median / median of the')
print('same scenario. CPU ms/msg: "all" = whole machine busy time (/proc/stat) per message, load tools included;')
print('"server" = the mailrelay process (+ redis-server for the Redis rows; thread schedstat), for Postfix its')
print('master and every daemon it ran, alive or reaped (tick resolution). pre-busy = CPU busy % in the second')
print('before a rep (other users of the box); busy % = whole machine during the rep.')
print()
print('| scenario | backend | sessions | size | msgs | ok/runs | accept msg/s median [min-max] | vs Postfix | vs Postfix accept-only | CPU ms/msg all | CPU ms/msg server | CPU ms/msg smtp-source | busy % (iowait %) | pre-busy % max |')
print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
for k in scen:
    size, sess = k
    name = scen_name(k)
    for b in backends:
        rs = group(k, b)
        if not rs:
            continue
        g = ok(rs)
        n = rs[0]['n']
        if not g:
            print(f"| {name} | {LABEL.get(b, b)} | {sess} | {size_name(size)} | {n} | 0/{len(rs)} | INVALID: {rs[0]['status']} {rs[0]['stderr'][:80]} | | | | | | | |")
            continue
        xs = [rate(r) for r in g]
        m = st.median(xs)
        ratios = []
        for ref in ('postfix', 'postfix-hold'):
            if b.startswith('postfix') or (k, ref) not in med:
                ratios.append('—' if b != ref else '1.00×')
            else:
                ratios.append(f"**{m / med[(k, ref)]:.2f}×**" if b in RELAY else f"{m / med[(k, ref)]:.2f}×")
        allms = st.median(1000 * r['total_cpu'] / r['n'] for r in g)
        sv = [server_ms(r) for r in g]
        svs = '—' if sv[0] is None else f'{st.median(sv):.3f}'
        srcms = st.median(1000 * r['src_cpu'] / r['n'] for r in g)
        busy = st.median(r['busy_pct'] for r in g)
        iow = st.median(r['iowait_pct'] for r in g)
        pre = max(r['pre_busy_pct'] for r in rs)
        print(f"| {name} | {LABEL.get(b, b)} | {sess} | {size_name(size)} | {n:,} | {len(g)}/{len(rs)} | "
              f"{fmt(m)} [{fmt(min(xs))}-{fmt(max(xs))}] | {ratios[0]} | {ratios[1]} | {allms:.3f} | {svs} | {srcms:.3f} | {busy:.0f} ({iow:.0f}) | {pre:.0f} |")

# headline: worst relay/postfix ratio
lines = []
for b in RELAY:
    for ref in ('postfix', 'postfix-hold'):
        rs = [(med[(k, b)] / med[(k, ref)], k) for k in scen if (k, b) in med and (k, ref) in med]
        if rs:
            lo = min(rs)
            lines.append(f"{b} vs {ref}: {min(x for x, _ in rs):.2f}×–{max(x for x, _ in rs):.2f}× "
                         f"(lowest at {size_name(lo[1][0])}, {lo[1][1]} sessions)")
if lines:
    print()
    print('Ratio range over the scenarios (target ≥ 3×): ' + '; '.join(lines) + '.')

# where mailrelay's CPU goes
thr_rows = []
for k in scen:
    for b in RELAY:
        g = ok(group(k, b))
        if not g:
            continue
        names = sorted({t for r in g for t in r.get('threads', {})})
        parts = []
        relay_tot = []
        for r in g:
            relay_tot.append(sum(r['threads'].values()))
        for t in names:
            v = st.median(1000 * r['threads'].get(t, 0) / r['n'] for r in g)
            if v >= 0.001:
                parts.append(f'{t} {v:.3f}')
        extra = ''
        if b != 'embedded':
            rd = st.median(1000 * (r['server_cpu'] - sum(r['threads'].values())) / r['n'] for r in g)
            extra = f'; redis-server ≈ {max(0.0, rd):.3f}'
        kern = st.median(1000 * (r['total_cpu'] - r['server_cpu'] - r['src_cpu'] - r['tool_cpu']) / r['n'] for r in g)
        thr_rows.append(f"| {scen_name(k)} | {b} | {', '.join(parts)}{extra} | {kern:.3f} |")
if thr_rows:
    print()
    print('mailrelay CPU by thread, ms per message (median over reps; /proc/PID/task/*/schedstat). "rest" ≈ machine')
    print('busy time (/proc/stat, tick resolution) not charged to mailrelay, redis-server or smtp-source: softirq of')
    print('loopback TCP, other processes on the box; approximate, can come out slightly negative.')
    print()
    print('| scenario | backend | mailrelay threads (ms/msg) | rest ≈ ms/msg |')
    print('|---|---|---|---|')
    for l in thr_rows:
        print(l)

print()
print('### 2. Memory per idle connection (mailrelay, embedded queue)')
print()
if rss is None:
    print('not measured (RSS=0) or failed; see idle.log')
else:
    ok_ = 'valid' if rss.get('valid') else 'INVALID'
    print(f"{rss['held']:,} of {rss['requested']:,} connections held ({ok_}; relay's connections_active "
          f"{rss['active_before']} → {rss['active_during']}; {rss['alive_at_end']:,} still open at the end; "
          f"{rss['sources']} client addresses; opened in {rss['open_seconds']} s; errors {rss['errors'] or 'none'}).")
    print()
    print('| figure | value |')
    print('|---|---|')
    print(f"| VmRSS before (after 50 warm-up sessions) | {rss['rss_before_kb']:,} KB |")
    print(f"| VmRSS with {rss['held']:,} idle connections | {rss['rss_with_kb']:,} KB |")
    print(f"| VmHWM (peak) with them | {rss['hwm_with_kb']:,} KB |")
    print(f"| **KB per idle connection** (VmRSS with − before) / {rss['held']:,} | **{rss['kb_per_conn']} KB** (target ≤ 20 KB) |")
    print(f"| peak KB per idle connection (VmHWM − VmRSS before) / {rss['held']:,} | {rss['hwm_kb_per_conn']} KB |")
    print(f"| VmRSS 1 s after closing them all | {rss['rss_after_close_kb']:,} KB |")
    print(f"| RssAnon before → with | {rss['anon_before_kb']:,} → {rss['anon_with_kb']:,} KB |")
    print(f"| threads | {rss['threads']} |")
    print()
    print('Kernel socket buffers are not in the relay\'s RSS and are not counted.')
