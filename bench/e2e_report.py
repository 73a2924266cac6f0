#!/usr/bin/env python3
"""Markdown report of bench/e2e.sh: e2e_report.py WORKDIR (reads runs.jsonl and
facts.json there) -> stdout."""
import json
import os
import statistics as st
import sys

work = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(work, 'runs.jsonl')) if l.strip()]
facts = json.load(open(os.path.join(work, 'facts.json')))
kn = facts['knobs']

LABEL = {
    'direct': 'smtp-source→smtp-sink (tool ceiling)',
    'embedded': 'mailrelay, embedded redb',
    'redis': 'mailrelay, Redis AOF everysec',
    'redis-always': 'mailrelay, Redis AOF always',
    'postfix': 'Postfix (anchor settings)',
    'dkim-ed25519': 'mailrelay, embedded, DKIM ed25519',
    'dkim-rsa': 'mailrelay, embedded, DKIM rsa-2048',
    'dkim-both': 'mailrelay, embedded, DKIM rsa-2048 + ed25519',
    'postfix-dkim': 'Postfix + OpenDKIM rsa-2048',
    'postfix-dkim-ed25519': 'Postfix + OpenDKIM ed25519',
    'presets': 'mailrelay, embedded, all provider presets',
    'redis-presets': 'mailrelay, Redis AOF everysec, all provider presets',
    'quota': 'mailrelay, embedded, per-sender ingress quota',
    'redis-quota': 'mailrelay, Redis AOF everysec, per-sender ingress quota',
    'events-off': 'mailrelay, embedded, event log off',
    'events-hook': 'mailrelay, embedded, events + webhook consumer',
    'redis-events-off': 'mailrelay, Redis AOF everysec, event log off',
    'redis-events-hook': 'mailrelay, Redis AOF everysec, events + webhook consumer',
    'sts-off': 'mailrelay, embedded, ROUTE=mx, STARTTLS opportunistic, DANE off (STS=1)',
    'sts-on': 'mailrelay, embedded, ROUTE=mx, tls: auto (DANE, MTA-STS enforce) (STS=1)',
    'kumomta': 'KumoMTA (peer: RocksDB spool)',
    'haraka': 'Haraka (peer: queue without fsync)',
}
PEERS = ('kumomta', 'haraka')
RELAY = ('embedded', 'redis', 'redis-always', 'dkim-ed25519', 'dkim-rsa', 'dkim-both', 'presets', 'redis-presets',
         'quota', 'redis-quota', 'events-off', 'events-hook', 'redis-events-off', 'redis-events-hook',
         'sts-off', 'sts-on')
if int(kn.get('SENDERS', 0) or 0) > 0:
    LABEL['direct'] = 'smtp_senders→smtp-sink (tool ceiling)'


def size_name(b):
    return f'{b // 1024} KB' if b % 1024 == 0 else f'{b} B'


def scen_name(k):
    return f"{size_name(k[0]).replace(' ', '').lower()}-s{k[1]}"


def fmt(v):
    return f'{v:,.0f}'


def ok(rs):
    return [r for r in rs if r['status'] == 'ok']


def e2e_rate(r):
    return r['n'] / r['t_e2e']


def server_ms(r):
    return None if r['backend'] == 'direct' else 1000 * r['server_cpu'] / r['n']


def loads(rs):
    return ' / '.join(r['loadavg'].split()[0] for r in rs)


print(f"## mailrelay end-to-end benchmark — {facts['date']}")
print()
print(f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['mem']}, kernel {facts['kernel']}, {facts['os']}; "
      f"Postfix {facts['postfix']}, Redis {facts['redis']}, mailrelay {facts['mailrelay']}.")
print(f"fsync probe (same filesystem as the queues: {facts['queue_fs_same_as_postfix_spool']}): {facts['fsync_probe']}.")
print(f"Knobs: N={kn['N']}, REPS={kn['REPS']}, DRAIN_N={kn['DRAIN_N']} ({size_name(kn['DRAIN_SIZE'])}, "
      f"{kn['DRAIN_SESSIONS']} sessions), ROUTE={kn['ROUTE']}, QUICK={kn['QUICK']}; one message per SMTP session "
      f"into the relay: " + (
          f"`smtp_senders -s S -m N -l L -n {kn['SENDERS']} -d example.com -t rcpt@example.net -M bench.local` "
          f"(bench/smtp_senders.c: {kn['SENDERS']:,} envelope senders)" if int(kn.get('SENDERS', 0) or 0) > 0 else
          f"`smtp-source -s S -m N -l L -f {kn.get('SENDER', 'sender@example.com')} -t rcpt@example.net -M bench.local`") + ".")
peer_v = [f"{n} {kn[k]}" for n, k in (('KumoMTA', 'KUMOMTA'), ('Haraka', 'HARAKA')) if kn.get(k)]
if peer_v:
    print('Peers (../shared/bench/peers, set up like the anchor): ' + ', '.join(peer_v) + '.')
if kn.get('PEERS_SKIPPED'):
    print('Peers skipped: ' + kn['PEERS_SKIPPED'].strip().rstrip(';') + '.')
print('mailrelay delivery section: `' + ' '.join(l.strip() for l in kn['delivery'].splitlines()) + '`.')
threads = kn.get('RELAY_THREADS')
if threads is not None:
    print('mailrelay worker threads (RELAY_THREADS): ' + (
        f'{threads} (`runtime.worker_threads`).' if threads else 'one per CPU (tokio\'s default).'))
print()

# ---------------------------------------------------------------- end to end
e2e = [r for r in rows if r['phase'] == 'e2e']
scen, backends = [], []
for r in e2e:
    k = (r['size'], r['sessions'])
    if k not in scen:
        scen.append(k)
    if r['backend'] not in backends:
        backends.append(r['backend'])


def group(k, b):
    return [r for r in e2e if (r['size'], r['sessions']) == k and r['backend'] == b]


med = {}
for k in scen:
    for b in backends:
        g = ok(group(k, b))
        if g:
            med[(k, b)] = st.median(e2e_rate(r) for r in g)

if e2e:
    print('### 1. End-to-end rate')
    print()
    print('end-to-end = N / wall time from starting smtp-source until smtp-sink had counted all N (median [min-max]')
    print('over reps); vs Postfix = median / Postfix median of the same scenario in this run. accept = N / time until')
    print('smtp-source exited; "in flight at accept" = messages accepted but not yet at the sink when smtp-source')
    print('exited (median). CPU ms/msg: all = whole machine busy time per message; server = mailrelay (+ redis-server),')
    print('or Postfix master and every daemon. load1 = 1-minute load average right before each rep. msgs/conn =')
    print('N / SMTP sessions smtp-sink saw (for Postfix counted 3 s after its queue emptied, when its connection')
    print('cache has closed them).')
    print()
    print('| scenario | backend | ok/runs | end-to-end msg/s median [min-max] | vs Postfix | accept msg/s | in flight at accept | msgs/conn | CPU ms/msg all | CPU ms/msg server | busy % | pre-busy % max | load1 before each rep |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    for k in scen:
        for b in backends:
            rs = group(k, b)
            if not rs:
                continue
            g = ok(rs)
            if not g:
                print(f"| {scen_name(k)} | {LABEL.get(b, b)} | 0/{len(rs)} | INVALID: {rs[0]['status']} {rs[0]['stderr'][:80]} | | | | | | | | | {loads(rs)} |")
                continue
            xs = [e2e_rate(r) for r in g]
            m = st.median(xs)
            if b == 'postfix':
                ratio = '1.00×'
            elif (k, 'postfix') in med:
                ratio = f"{m / med[(k, 'postfix')]:.2f}×"
                if b in RELAY:
                    ratio = f'**{ratio}**'
            else:
                ratio = '—'
            acc = st.median(r['n'] / r['t_accept'] for r in g)
            inflight = st.median(r['n'] - (r['sink_at_accept'] or 0) for r in g)
            allms = st.median(1000 * r['total_cpu'] / r['n'] for r in g)
            conns = [r['n'] / r['sink_sessions'] for r in g if r.get('sink_sessions')]
            per_conn = f'{st.median(conns):.1f}' if conns else '—'
            sv = [server_ms(r) for r in g]
            svs = '—' if sv[0] is None else f'{st.median(sv):.3f}'
            busy = st.median(r['busy_pct'] for r in g)
            pre = max(r['pre_busy_pct'] for r in rs)
            print(f"| {scen_name(k)} | {LABEL.get(b, b)} | {len(g)}/{len(rs)} | {fmt(m)} [{fmt(min(xs))}-{fmt(max(xs))}] | "
                  f"{ratio} | {fmt(acc)} | {fmt(inflight)} | {per_conn} | {allms:.3f} | {svs} | {busy:.0f} | {pre:.0f} | {loads(rs)} |")
    lines = []
    for b in RELAY:
        rs = [(med[(k, b)] / med[(k, 'postfix')], k) for k in scen if (k, b) in med and (k, 'postfix') in med]
        if rs:
            lo = min(rs)
            lines.append(f"{b} {lo[0]:.2f}×–{max(x for x, _ in rs):.2f}× (lowest at {size_name(lo[1][0])}, {lo[1][1]} sessions)")
    if lines:
        print()
        print('End-to-end ratio to Postfix over the scenarios (target ≥ 3×): ' + '; '.join(lines) + '.')
    for p in PEERS:
        pl = []
        for b in RELAY:
            rs = [(med[(k, b)] / med[(k, p)], k) for k in scen if (k, b) in med and (k, p) in med]
            if rs:
                pl.append(f"{b} {min(x for x, _ in rs):.2f}×–{max(x for x, _ in rs):.2f}×")
        if pl:
            print()
            print(f"End-to-end ratio to {LABEL[p].split(' (')[0]} over the scenarios: " + '; '.join(pl) + '.')

    thr = []
    for k in scen:
        for b in RELAY:
            g = ok(group(k, b))
            if not g:
                continue
            names = sorted({t for r in g for t in r.get('threads', {})})
            parts = []
            for t in names:
                v = st.median(1000 * r['threads'].get(t, 0) / r['n'] for r in g)
                if v >= 0.001:
                    parts.append(f'{t} {v:.3f}')
            extra = ''
            if b.startswith('redis'):
                rd = st.median(1000 * (r['server_cpu'] - sum(r['threads'].values())) / r['n'] for r in g)
                extra = f'; redis-server ≈ {max(0.0, rd):.3f}'
            tools = st.median(1000 * (r['src_cpu'] + r['tool_cpu']) / r['n'] for r in g)
            thr.append(f"| {scen_name(k)} | {b} | {', '.join(parts)}{extra} | {tools:.3f} |")
    if thr:
        print()
        print('mailrelay CPU by thread, ms per message (median over reps; /proc/PID/task/*/schedstat); load tools =')
        print('smtp-source + smtp-sink.')
        print()
        print('| scenario | backend | mailrelay threads (ms/msg) | load tools ms/msg |')
        print('|---|---|---|---|')
        for l in thr:
            print(l)

# ---------------------------------------------------------------- drain
enq = {r['backend']: r for r in rows if r['phase'] == 'enqueue'}
drn = {r['backend']: r for r in rows if r['phase'] == 'drain'}
if enq:
    print()
    print('### 2. Drain of a full queue')
    print()
    print('enqueue = N / time until smtp-source exited, with delivery off (mailrelay: `delivery.enabled: false`;')
    print('Postfix: every message on hold). drain = N / time from starting delivery (mailrelay: starting a fresh')
    print('relay process on that queue; Postfix: `postqueue -f` after an untimed `postsuper -H ALL`) until')
    print('smtp-sink had counted all N. One run each; load1 before enqueue / before drain.')
    print()
    print('| backend | N | ok | enqueue msg/s | drain time s | drain msg/s | vs Postfix | msgs/conn | CPU ms/msg all (drain) | CPU ms/msg server (drain) | busy % | load1 |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    pf = drn.get('postfix')
    pf_rate = pf['n'] / pf['t_e2e'] if pf and pf['status'] == 'ok' else None
    for b, e in enq.items():
        d = drn.get(b)
        er = fmt(e['n'] / e['t_accept']) if e['status'] == 'ok' else f"INVALID: {e['status']}"
        if d is None or d['status'] != 'ok':
            st_ = 'no' if d is None else f"INVALID: {d['status']}"
            print(f"| {LABEL.get(b, b)} | {e['n']:,} | {st_} | {er} | | | | | | | | {e['loadavg'].split()[0]} |")
            continue
        rate = d['n'] / d['t_e2e']
        per_conn = f"{d['n'] / d['sink_sessions']:.1f}" if d.get('sink_sessions') else '—'
        ratio = '1.00×' if b == 'postfix' else (f'**{rate / pf_rate:.2f}×**' if pf_rate else '—')
        print(f"| {LABEL.get(b, b)} | {d['n']:,} | {'yes' if e['status'] == 'ok' else 'enqueue invalid'} | {er} | "
              f"{d['t_e2e']:.1f} | {fmt(rate)} | {ratio} | {per_conn} | {1000 * d['total_cpu'] / d['n']:.3f} | "
              f"{1000 * d['server_cpu'] / d['n']:.3f} | {d['busy_pct']:.0f} | {e['loadavg'].split()[0]} / {d['loadavg'].split()[0]} |")

# ---------------------------------------------------------------- DKIM
samples_path = os.path.join(work, 'samples.jsonl')
samples = [json.loads(l) for l in open(samples_path) if l.strip()] if os.path.exists(samples_path) else []
DK = ('embedded', 'dkim-ed25519', 'dkim-rsa', 'dkim-both', 'postfix', 'postfix-dkim', 'postfix-dkim-ed25519')
if samples or any(b.startswith(('dkim-', 'postfix-dkim')) for b in backends):
    print()
    print('### 3. DKIM signing')
    print()
    print('Same mail (From: in the signed domain), same run. "sample" = the DKIM-Signature a= tags of one message')
    print('sent through the backend before its reps and kept by smtp-sink, each signature verified with dkimpy')
    print('against the run\'s keys (a backend whose sample is wrong is not measured). CPU ms/msg server = mailrelay,')
    print('or Postfix\'s daemons + opendkim (whole process, /proc/PID/stat); milter = the opendkim part.')
    print()
    smp = {x['backend']: x for x in samples}
    for k in scen:
        print('| scenario | backend | sample a= | ok/runs | end-to-end msg/s median [min-max] | CPU ms/msg all | CPU ms/msg server | of which milter | load1 before each rep |')
        print('|---|---|---|---|---|---|---|---|---|')
        sm = {}
        for b in DK:
            rs = group(k, b)
            x = smp.get(b)
            sample = '—' if x is None else (x['got'] if x['got'] == x['want'] else f"WRONG: {x['got']} (want {x['want']})")
            if not rs:
                if x is not None:
                    print(f"| {scen_name(k)} | {LABEL[b]} | {sample} | 0/0 | not measured | | | | |")
                continue
            g = ok(rs)
            if not g:
                print(f"| {scen_name(k)} | {LABEL[b]} | {sample} | 0/{len(rs)} | INVALID: {rs[0]['status']} | | | | {loads(rs)} |")
                continue
            xs = [e2e_rate(r) for r in g]
            m = st.median(xs)
            allms = st.median(1000 * r['total_cpu'] / r['n'] for r in g)
            sv = st.median(server_ms(r) for r in g)
            mil = st.median(1000 * r.get('milter_cpu', 0) / r['n'] for r in g)
            sm[b] = (m, sv)
            print(f"| {scen_name(k)} | {LABEL[b]} | {sample} | {len(g)}/{len(rs)} | {fmt(m)} [{fmt(min(xs))}-{fmt(max(xs))}] | "
                  f"{allms:.3f} | {sv:.3f} | {'—' if not b.startswith('postfix-dkim') else f'{mil:.3f}'} | {loads(rs)} |")
        print()
        out = []
        if 'dkim-rsa' in sm and 'postfix-dkim' in sm:
            r = sm['dkim-rsa'][0] / sm['postfix-dkim'][0]
            c = sm['postfix-dkim'][1] / sm['dkim-rsa'][1]
            out.append(f"- mailrelay rsa-2048 vs Postfix+OpenDKIM rsa-2048: **{r:.2f}×** end-to-end msg/s "
                       f"(target ≥ 3×: {'met' if r >= 3 else 'NOT met'}); Postfix+OpenDKIM uses {c:.2f}× the server CPU per message")
        if 'dkim-ed25519' in sm and 'postfix-dkim-ed25519' in sm:
            r = sm['dkim-ed25519'][0] / sm['postfix-dkim-ed25519'][0]
            out.append(f"- mailrelay ed25519 vs Postfix+OpenDKIM ed25519: {r:.2f}× end-to-end msg/s")
        if 'embedded' in sm:
            u, uc = sm['embedded']
            for b in ('dkim-ed25519', 'dkim-rsa', 'dkim-both'):
                if b in sm:
                    loss = 100 * (1 - sm[b][0] / u)
                    cpu = 100 * (sm[b][1] / uc - 1)
                    tgt = f" (target < 10%: {'met' if loss < 10 else 'NOT met'})" if b == 'dkim-ed25519' else ''
                    out.append(f"- {LABEL[b]} vs unsigned mailrelay: throughput {-loss:+.1f}%{tgt}, "
                               f"server CPU per message {cpu:+.1f}% ({sm[b][1] - uc:+.3f} ms/msg)")
        if 'postfix' in sm:
            u, uc = sm['postfix']
            for b in ('postfix-dkim', 'postfix-dkim-ed25519'):
                if b in sm:
                    out.append(f"- {LABEL[b]} vs unsigned Postfix: throughput {100 * (sm[b][0] / u - 1):+.1f}%, "
                               f"server CPU per message {100 * (sm[b][1] / uc - 1):+.1f}% ({sm[b][1] - uc:+.3f} ms/msg)")
        for l in out:
            print(l)

# ---------------------------------------------------------------- provider presets
PAIRS = (('presets', 'embedded'), ('redis-presets', 'redis'))
if any(b in backends for b, _ in PAIRS):
    print()
    print('### Provider presets (issue 18)')
    print()
    print('Every preset enabled (`providers: { presets: [all] }`) plus one response rule selecting the sink\'s route,')
    print('against the same queue without them, in the same run. The sink answers 250, so no rule fires: this is the')
    print('cost of rule selection and state lookup on every delivery. Target: < 5 % end-to-end difference.')
    print()
    print('| scenario | with presets | without | end-to-end msg/s with / without (median) | difference | server CPU ms/msg with / without |')
    print('|---|---|---|---|---|---|')
    for k in scen:
        for b, base in PAIRS:
            if (k, b) not in med or (k, base) not in med:
                continue
            diff = 100 * (med[(k, b)] / med[(k, base)] - 1)
            cpu = [st.median(server_ms(r) for r in ok(group(k, x))) for x in (b, base)]
            verdict = 'met' if abs(diff) < 5 else 'NOT met'
            print(f"| {scen_name(k)} | {LABEL[b]} | {LABEL[base]} | {fmt(med[(k, b)])} / {fmt(med[(k, base)])} | "
                  f"{diff:+.1f}% (target < 5%: {verdict}) | {cpu[0]:.3f} / {cpu[1]:.3f} |")

# ---------------------------------------------------------------- many senders (issue 21 item 4)
QPAIRS = (('quota', 'embedded'), ('redis-quota', 'redis'))
if any(b in backends for b, _ in QPAIRS):
    k_senders = int(kn.get('SENDERS', 0) or 0)
    print()
    print('### Ingress quota with many senders (issue 21 item 4)')
    print()
    who = (f"{k_senders:,} distinct envelope senders (bench/smtp_senders.c: message i from s<i mod {k_senders}>@example.com)"
           if k_senders else 'one envelope sender (smtp-source)')
    print(f"Load: {who}. Quota: one per-sender ingress quota, limits `[{kn.get('QUOTA_LIMITS', '?')}]` (never reached),")
    print('against the same queue without it, in the same run. Target: < 15 % end-to-end overhead.')
    print()
    print('| scenario | with quota | without | end-to-end msg/s with / without (median) | overhead | server CPU ms/msg with / without | load generator CPU ms/msg |')
    print('|---|---|---|---|---|---|---|')
    for k in scen:
        for b, base in QPAIRS:
            if (k, b) not in med or (k, base) not in med:
                continue
            loss = 100 * (1 - med[(k, b)] / med[(k, base)])
            cpu = [st.median(server_ms(r) for r in ok(group(k, x))) for x in (b, base)]
            gen = st.median(1000 * r['src_cpu'] / r['n'] for r in ok(group(k, b)) + ok(group(k, base)))
            verdict = 'met' if loss < 15 else 'NOT met'
            print(f"| {scen_name(k)} | {LABEL[b]} | {LABEL[base]} | {fmt(med[(k, b)])} / {fmt(med[(k, base)])} | "
                  f"{loss:+.1f}% (target < 15%: {verdict}) | {cpu[0]:.3f} / {cpu[1]:.3f} | {gen:.3f} |")

# ---------------------------------------------------------------- backlog samples (issue 21 item 5)
import csv
import glob
samples = sorted(glob.glob(os.path.join(work, 'samples-*-*.csv')), key=lambda f: (f.rsplit('-', 1)[0], f.endswith('-drain.csv')))
if samples:
    print()
    print('### Memory through the drain (sampled once a second)')
    print()
    print('Relay VmRSS and redis-server used_memory / VmRSS sampled every second through the enqueue (delivery off)')
    print('and the drain (a fresh relay with delivery on) of each drain backend; load1 = 1-minute load average over the samples.')
    print()
    print('| backend | phase | samples | relay RSS MiB start / min / max / end | redis used_memory MiB start / max / end | '
          'redis RSS MiB max | queue dir MiB max | load1 min-max |')
    print('|---|---|---|---|---|---|---|---|')
    def mib(v):
        return f'{v / 1024:,.1f}'
    for f in samples:
        backend, phase = os.path.basename(f)[len('samples-'):-len('.csv')].rsplit('-', 1)
        rows_ = list(csv.DictReader(open(f)))
        def col(name, scale=1):
            return [float(r[name]) / scale for r in rows_ if r.get(name)]
        rss = col('relay_rss_kb')
        um = col('redis_used_memory', 1024)
        rr = col('redis_rss_kb')
        qd = col('queue_dir_kb')
        ld = col('load1')
        r_ = f'{mib(rss[0])} / {mib(min(rss))} / {mib(max(rss))} / {mib(rss[-1])}' if rss else '—'
        u_ = f'{mib(um[0])} / {mib(max(um))} / {mib(um[-1])}' if um else '—'
        print(f"| {LABEL.get(backend, backend)} | {phase} | {len(rows_)} | {r_} | {u_} | "
              f"{mib(max(rr)) if rr else '—'} | {mib(max(qd)) if qd else '—'} | "
              f"{min(ld):.1f}-{max(ld):.1f} |" if ld else '| — |')
