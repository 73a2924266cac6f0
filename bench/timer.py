#!/usr/bin/env python3
"""Time one load-generator run (smtp-source) and account for the CPU it cost.

Used by bench/ingress.sh; one call = one timed rep = one JSON line on stdout.

    timer.py --timeout SECS [--server-pids 123,456] [--tool-pids 789]
             [--threads-of 123] [--milter-pids 321] [--sink-out FILE --sink-expect N [--settle S]]
             [--background --pid-file FILE] -- smtp-source -s 20 -m 10000 ... 127.0.0.1:PORT
    timer.py --sink-count FILE      (prints how many messages smtp-sink -c has counted)
    timer.py --sink-sessions FILE   (prints how many SMTP sessions it has seen end)

t_accept is the wall time from starting the command until it exited, i.e. until
every one of its messages got its final reply (smtp-source waits for the reply
to "." and to QUIT in every session).

End to end (bench/e2e.sh): with --sink-out (the stdout of `smtp-sink -c`, whose
running count "mesg=N" it prints per message) t_e2e is the wall time from starting
the command until smtp-sink has counted --sink-expect more messages than at the
start; sink_at_accept is how many of them had arrived when the command exited. After
t_e2e the sink is watched --settle more seconds, and sink_got is the count after that
(more than expected = duplicates). With --background the command is a server that
keeps running (a relay started to drain its queue): it is not waited for, its pid
goes to --pid-file for the caller to stop, its CPU counts as server CPU, and only
t_e2e is measured.

CPU accounting (all in seconds over the run):
  total_cpu   busy time of the whole machine (/proc/stat, minus idle and iowait)
  src_cpu     the load generator itself (rusage of the child)
  tool_cpu    other load tools named with --tool-pids (smtp-sink)
  server_cpu  processes named with --server-pids (mailrelay, redis-server): the sum
              of their threads' /proc/PID/task/*/schedstat
              plus, with --postfix-master, every Postfix daemon (children of the
              master, alive or reaped during the run; tick resolution)
              plus, with --milter-pids, whole processes from /proc/PID/stat utime+stime
              (tick resolution; includes threads that exited during the run: a
              milter such as opendkim runs one thread per Postfix connection)
  milter_cpu  the --milter-pids part of server_cpu
  threads     per-thread-name CPU of --threads-of (mailrelay: tokio workers vs the
              queue writer), from /proc/PID/task/*/schedstat (ns resolution)
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HZ = os.sysconf('SC_CLK_TCK')


def cpu_stat():
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    # total, idle, iowait, steal (ticks)
    return sum(v), v[3], v[4], v[7]


def proc_cpu(pid):
    """On-CPU seconds of a process: the sum of its threads' schedstat (ns resolution;
    /proc/PID/stat utime+stime are whole ticks, too coarse for a 1 s run). A thread
    that exits during the run is lost, so this is a lower bound; the relay's and
    redis-server's threads are long-lived. None if the process is gone."""
    try:
        tids = os.listdir(f'/proc/{pid}/task')
    except OSError:
        return None
    total = 0.0
    for tid in tids:
        try:
            with open(f'/proc/{pid}/task/{tid}/schedstat') as f:
                total += int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
    return total


def thread_cpu(pid):
    """{thread name: on-CPU seconds} for every thread of pid (summed by name)."""
    out = {}
    try:
        tids = os.listdir(f'/proc/{pid}/task')
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f'/proc/{pid}/task/{tid}/comm') as f:
                name = f.read().strip()
            with open(f'/proc/{pid}/task/{tid}/schedstat') as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


def pf_snapshot(master):
    """Postfix: (master's utime+stime+cutime+cstime, {(pid, starttime): utime+stime}
    of the master's children), in seconds. Daemons exit after max_use and are reaped
    by the master, whose cutime then holds their CPU."""
    def stat(pid):
        with open(f'/proc/{pid}/stat') as f:
            s = f.read()
        return s[s.rindex(')') + 2:].split()
    try:
        m = stat(master)
    except OSError:
        return None
    own = sum(int(x) for x in m[11:15]) / HZ
    kids = {}
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            fl = stat(d)
        except OSError:
            continue
        if int(fl[1]) == master:
            kids[(int(d), fl[19])] = (int(fl[11]) + int(fl[12])) / HZ
    return own, kids


def stat_cpu(pid):
    """utime+stime of a whole process in seconds (/proc/PID/stat: every thread, also the
    ones that have exited); None if the process is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            s = f.read()
    except OSError:
        return None
    fl = s[s.rindex(')') + 2:].split()
    return (int(fl[11]) + int(fl[12])) / HZ


def pf_cpu(a, b):
    """CPU of the Postfix daemons between two pf_snapshot()s."""
    if a is None or b is None:
        return None
    (m0, k0), (m1, k1) = a, b
    v = m1 - m0                                         # master + reaped children
    v += sum(c - k0.get(k, 0.0) for k, c in k1.items())  # alive at the end
    v -= sum(c for k, c in k0.items() if k not in k1)    # reaped, but counted before t0
    return v


def sink_counters(path):
    """(messages, sessions) smtp-sink -c has counted in PATH: the last complete record
    "sess=S quit=Q mesg=M" (records end with a carriage return; the last one may be
    half written)."""
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 600))
            data = f.read().decode('ascii', 'replace')
    except OSError:
        return 0, 0
    def field(rec, name):
        i = rec.find(name + '=')
        if i < 0:
            return None
        digits = ''
        for c in rec[i + len(name) + 1:]:
            if not c.isdigit():
                break
            digits += c
        return int(digits) if digits else None
    for rec in reversed(data.split('\r')[:-1]):
        m = field(rec, 'mesg')
        if m is not None:
            return m, field(rec, 'sess') or 0
    return 0, 0


def sink_count(path):
    return sink_counters(path)[0]


def pids(arg):
    return [int(p) for p in arg.split(',') if p.strip()] if arg else []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--timeout', type=float, default=300)
    ap.add_argument('--server-pids', default='')
    ap.add_argument('--tool-pids', default='')
    ap.add_argument('--threads-of', type=int, default=0)
    ap.add_argument('--postfix-master', type=int, default=0)
    ap.add_argument('--milter-pids', default='')
    ap.add_argument('--quiet-busy', type=float, default=25.0)
    ap.add_argument('--quiet-wait', type=float, default=0.0)
    ap.add_argument('--sink-out', default='')
    ap.add_argument('--sink-expect', type=int, default=0)
    ap.add_argument('--settle', type=float, default=1.0)
    ap.add_argument('--background', action='store_true')
    ap.add_argument('--pid-file', default='')
    ap.add_argument('--sink-count', default='')
    ap.add_argument('--sink-sessions', default='')
    ap.add_argument('cmd', nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.sink_count:
        print(sink_count(a.sink_count))
        return 0
    if a.sink_sessions:
        print(sink_counters(a.sink_sessions)[1])
        return 0
    if a.background and not (a.sink_out and a.pid_file):
        ap.error('--background needs --sink-out, --sink-expect and --pid-file')
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == '--' else a.cmd
    servers, tools, milters = pids(a.server_pids), pids(a.tool_pids), pids(a.milter_pids)

    # Is anybody else using the CPUs right before we start? The box may be shared:
    # wait (up to --quiet-wait s) for a second with less than --quiet-busy % busy.
    waited = 0.0
    while True:
        x = cpu_stat(); time.sleep(1.0); y = cpu_stat()
        pre_busy = 100.0 * ((y[0] - x[0]) - (y[1] - x[1]) - (y[2] - x[2])) / max(1, y[0] - x[0])
        if pre_busy < a.quiet_busy or waited >= a.quiet_wait:
            break
        waited += 1.0
    loadavg = ' '.join(open('/proc/loadavg').read().split()[:3])   # as `uptime` shows it
    load1 = loadavg.split()[0]

    s0 = {p: proc_cpu(p) for p in servers}
    k0 = {p: proc_cpu(p) for p in tools}
    mi0 = {p: stat_cpu(p) for p in milters}
    th0 = thread_cpu(a.threads_of) if a.threads_of else {}
    pf0 = pf_snapshot(a.postfix_master) if a.postfix_master else None
    sink0, sess0 = sink_counters(a.sink_out) if a.sink_out else (0, 0)
    tot0, idle0, iow0, st0 = cpu_stat()
    t0 = time.monotonic()
    status = 'ok'
    t_e2e = None
    sink_at_accept = None
    err = b''
    if a.background:
        # The server's output goes to a file, not to a pipe nobody reads after we exit.
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        with open(a.pid_file, 'w') as f:
            f.write(f'{p.pid}\n')
        servers.append(p.pid)
        s0[p.pid] = 0.0
        th_bg = p.pid
    else:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        th_bg = 0
    t_accept = None
    # Poll both: the command's exit (t_accept) and the sink's count (t_e2e).
    while True:
        now = time.monotonic() - t0
        if t_accept is None and not a.background and p.poll() is not None:
            t_accept = now
            if a.sink_out:
                sink_at_accept = sink_count(a.sink_out) - sink0
        if a.sink_out and t_e2e is None and sink_count(a.sink_out) - sink0 >= a.sink_expect:
            t_e2e = now
        done_accept = a.background or t_accept is not None
        done_e2e = not a.sink_out or t_e2e is not None
        if done_accept and done_e2e:
            break
        if t_accept is not None and p.returncode != 0:
            break
        if a.background and p.poll() is not None:
            status = f'server exited rc={p.returncode}'
            break
        if now > a.timeout:
            status = 'timeout'
            break
        time.sleep(0.005 if a.sink_out else 0.02)
    if not a.background:
        if p.poll() is None:
            p.kill()
        err = p.communicate()[1] or b''
        if t_accept is None:
            t_accept = time.monotonic() - t0
    tot1, idle1, iow1, st1 = cpu_stat()
    # rusage of the (only) waited-for child
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    src_cpu = r.ru_utime + r.ru_stime
    s1 = {p_: proc_cpu(p_) for p_ in servers}
    k1 = {p_: proc_cpu(p_) for p_ in tools}
    mi1 = {p_: stat_cpu(p_) for p_ in milters}
    th1 = thread_cpu(a.threads_of or th_bg) if (a.threads_of or th_bg) else {}
    pf1 = pf_snapshot(a.postfix_master) if a.postfix_master else None
    sink_got = sink_sessions = None
    if a.sink_out:
        time.sleep(a.settle)          # anything more arriving would be a duplicate
        m1, s1_ = sink_counters(a.sink_out)
        sink_got = m1 - sink0
        sink_sessions = s1_ - sess0   # SMTP sessions the sink saw: messages per connection

    if status == 'ok' and not a.background and p.returncode != 0:
        status = f'rc={p.returncode}'
    dt = (tot1 - tot0) or 1
    total_cpu = (dt - (idle1 - idle0) - (iow1 - iow0)) / HZ
    server_cpu = sum((s1[q] or 0) - (s0[q] or 0) for q in servers if s0[q] is not None)
    postfix = pf_cpu(pf0, pf1)
    if postfix is not None:
        server_cpu += postfix
    milter_cpu = sum((mi1[q] or 0) - (mi0[q] or 0) for q in milters if mi0[q] is not None)
    server_cpu += milter_cpu
    tool_cpu = sum((k1[q] or 0) - (k0[q] or 0) for q in tools if k0[q] is not None)
    threads = {}
    for name, v in th1.items():
        d = v - th0.get(name, 0.0)
        if d > 0.0005:
            threads[name] = round(d, 3)
    print(json.dumps({
        'status': status,
        't_accept': round(t_accept, 4) if t_accept is not None else None,
        't_e2e': round(t_e2e, 4) if t_e2e is not None else None,
        'sink_at_accept': sink_at_accept,
        'sink_got': sink_got,
        'sink_sessions': sink_sessions,
        'sink_sess0': sess0 if a.sink_out else None,
        'busy_pct': round(100.0 * (dt - (idle1 - idle0) - (iow1 - iow0)) / dt, 1),
        'iowait_pct': round(100.0 * (iow1 - iow0) / dt, 1),
        'steal_pct': round(100.0 * (st1 - st0) / dt, 1),
        'total_cpu': round(total_cpu, 3),
        'src_cpu': round(src_cpu, 3),
        'tool_cpu': round(tool_cpu, 3),
        'server_cpu': round(server_cpu, 3),
        'milter_cpu': round(milter_cpu, 3),
        'threads': threads,
        'pre_busy_pct': round(pre_busy, 1),
        'quiet_waited_s': waited,
        'load1': load1,
        'loadavg': loadavg,
        'stderr': err.decode(errors='replace').strip()[:300],
    }))


if __name__ == '__main__':
    sys.exit(main())
