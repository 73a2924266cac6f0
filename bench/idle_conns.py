#!/usr/bin/env python3
"""Memory cost of idle SMTP connections: open COUNT connections to a relay, read
the 220 greeting, send EHLO, read the whole 250 reply, then leave every connection
idle; measure the relay's RSS before and while they are open.

Used by bench/ingress.sh; prints one JSON object on stdout. Needs `ulimit -n`
above COUNT (plus a little) in this process and in the relay.

    idle_conns.py --pid RELAY_PID --port 12525 --count 10000 \
        --sources 127.0.0.2,127.0.0.3 --metrics http://127.0.0.1:19325/metrics

Connections are spread round-robin over --sources (client addresses 127.0.0.x, so
that neither the ephemeral port range of one address nor a per-IP limit gets in
the way). The baseline is taken after a warm-up of --warmup full sessions (so
lazily created runtime state is not charged to the idle connections), and after
the connections are up the script waits --settle seconds before reading
VmRSS/VmHWM. The relay's own gauge `mailrelay_smtp_connections_active` (from
--metrics) must equal the number of connections we hold, or the run is invalid.
"""
import argparse
import asyncio
import json
import re
import sys
import time
import urllib.request


def status(pid):
    out = {}
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            k, _, v = line.partition(':')
            if k in ('VmRSS', 'VmHWM', 'RssAnon', 'RssFile', 'Threads'):
                out[k] = int(v.split()[0])
    return out


def active(metrics_url):
    if not metrics_url:
        return None
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    m = re.search(r'^mailrelay_smtp_connections_active (\d+)', text, re.M)
    return int(m.group(1)) if m else None


async def read_reply(reader):
    """One (possibly multi-line) SMTP reply; returns its code."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError('closed by relay')
        if len(line) < 4 or line[3:4] != b'-':
            return int(line[:3])


async def open_one(host, port, src, sem, held, errors):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=(src, 0)), 30)
            code = await asyncio.wait_for(read_reply(reader), 30)
            if code != 220:
                raise ConnectionError(f'greeting {code}')
            writer.write(b'EHLO idle.bench.local\r\n')
            code = await asyncio.wait_for(read_reply(reader), 30)
            if code != 250:
                raise ConnectionError(f'EHLO {code}')
            held.append((reader, writer))
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors[type(e).__name__ + ': ' + str(e)[:60]] = errors.get(type(e).__name__ + ': ' + str(e)[:60], 0) + 1


async def full_session(host, port):
    reader, writer = await asyncio.open_connection(host, port)
    await read_reply(reader)
    for cmd in (b'EHLO warm.bench.local', b'QUIT'):
        writer.write(cmd + b'\r\n')
        await read_reply(reader)
    writer.close()
    await writer.wait_closed()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--pid', type=int, required=True)
    ap.add_argument('--host', default='127.0.0.1')
    ap.add_argument('--port', type=int, required=True)
    ap.add_argument('--count', type=int, default=10000)
    ap.add_argument('--sources', default='127.0.0.1')
    ap.add_argument('--metrics', default='')
    ap.add_argument('--parallel', type=int, default=256, help='handshakes in flight')
    ap.add_argument('--warmup', type=int, default=50)
    ap.add_argument('--settle', type=float, default=3.0)
    ap.add_argument('--hold', type=float, default=2.0, help='seconds to hold after measuring')
    a = ap.parse_args()
    sources = [s for s in a.sources.split(',') if s]

    for _ in range(a.warmup):
        await full_session(a.host, a.port)
    await asyncio.sleep(a.settle)
    before = status(a.pid)
    active_before = active(a.metrics)

    held, errors = [], {}
    sem = asyncio.Semaphore(a.parallel)
    t0 = time.monotonic()
    await asyncio.gather(*(open_one(a.host, a.port, sources[i % len(sources)], sem, held, errors)
                           for i in range(a.count)))
    t_open = time.monotonic() - t0
    await asyncio.sleep(a.settle)
    during = status(a.pid)
    active_during = active(a.metrics)
    await asyncio.sleep(a.hold)
    during2 = status(a.pid)

    # every held connection must still be open (the relay did not time them out)
    alive = sum(1 for r, _ in held if not r.at_eof())
    for _, w in held:
        w.close()
    await asyncio.sleep(1.0)
    after_close = status(a.pid)

    n = len(held)
    delta_kb = during['VmRSS'] - before['VmRSS']
    res = {
        'requested': a.count,
        'held': n,
        'alive_at_end': alive,
        'errors': errors,
        'sources': len(sources),
        'open_seconds': round(t_open, 2),
        'active_before': active_before,
        'active_during': active_during,
        'rss_before_kb': before['VmRSS'],
        'rss_with_kb': during['VmRSS'],
        'rss_with_later_kb': during2['VmRSS'],
        'hwm_with_kb': during2['VmHWM'],
        'rss_after_close_kb': after_close['VmRSS'],
        'anon_before_kb': before.get('RssAnon'),
        'anon_with_kb': during.get('RssAnon'),
        'threads': during.get('Threads'),
        'kb_per_conn': round(delta_kb / n, 2) if n else None,
        'hwm_kb_per_conn': round((during2['VmHWM'] - before['VmRSS']) / n, 2) if n else None,
    }
    res['valid'] = (n == a.count and alive == n
                    and (active_during is None or active_during - (active_before or 0) == n))
    print(json.dumps(res))
    return 0 if res['valid'] else 1


if __name__ == '__main__':
    sys.exit(asyncio.run(main()))
