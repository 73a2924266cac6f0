#!/usr/bin/env python3
"""What the ingress quota check costs redis-server per message for many senders
(issue 21 item 4): the check script of relay/src/quota/ingress/lua/ (assembled from
the same files, in the same order, as redis.rs does for a check that runs alone) is
sent for K distinct keys, each with one quota of the given windows, the way a relay
that remembers none of them sends it (the slow path; a relay's memory of a key only
helps from its second check on, and a sender seen once is never remembered).

Passes, each over the K keys: 1 (first check: Redis has never seen the key) and 2
(second check, key stored, relay does not remember it). Per pass: redis-server CPU
(used_cpu_user + used_cpu_sys from INFO, whole process) per check, and the commands
the scripts ran (INFO commandstats, minus EVALSHA itself) per check.

    quota_first_check.py PORT [K] [LIMITS]      LIMITS e.g. "1000/1m,10000/1h,100000/1d"

Needs a private redis-server on 127.0.0.1:PORT (it is flushed). No Python packages.
"""
import json
import os
import socket
import struct
import sys
import time

LUA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "relay", "src",
                   "quota", "ingress", "lua")
BUCKETS = 60
UNITS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class Resp:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.f = self.s.makefile("rb")

    @staticmethod
    def encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, str):
                a = a.encode()
            elif isinstance(a, int):
                a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def read(self):
        line = self.f.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)[:-2]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RuntimeError("bad reply %r" % line)

    def call(self, *args):
        self.s.sendall(self.encode(args))
        return self.read()

    def pipeline(self, cmds):
        self.s.sendall(b"".join(self.encode(c) for c in cmds))
        return [self.read() for _ in cmds]


def fnv(data):
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & ((1 << 46) - 1)


def window_tag(quota, w_ms, b_ms):
    return fnv(quota.encode() + b"\xff" + struct.pack("<QQ", w_ms, b_ms))


def quota_id(quota):
    return fnv(quota.encode() + b"\xfe")


def doubles(vals):
    return ("<" + "d" * len(vals)).encode(), struct.pack("<%dd" % len(vals), *vals)


def script():
    if os.environ.get("QFC_SCRIPT"):
        return open(os.environ["QFC_SCRIPT"]).read()
    parts = ["args.lua", "doubles.lua", "common.lua", "charge.lua", "charge_main.lua"]
    return "".join(open(os.path.join(LUA, p)).read() for p in parts)


def parse_limits(text):
    out = []
    for item in text.split(","):
        count, win = item.strip().split("/")
        n = "".join(c for c in win if c.isdigit()) or "1"
        out.append((int(count), int(n) * UNITS[win.strip()[-1]]))
    return out


def check_args(key, quota, windows):
    specs = [(lim, w, -(-w // BUCKETS)) for lim, w in windows]
    ttl = max(w + b for _, w, b in specs)
    F = [1, 0, 0, 0, 1, 0, 0, 0]
    N = [ttl, 1, 1, quota_id(quota), len(specs)]
    S = []
    for lim, w, b in specs:
        N += [window_tag(quota, w, b), lim]
        S += [w, b]
    keys = ["mr:{mr:quota}:c:" + key, "mr:{mr:quota}:keys"]
    args = [""]
    for lst in (F, N, S):
        args += list(doubles(lst))
    args.append(key)
    return keys, args


def info(r, section):
    text = r.call("INFO", section).decode()
    return dict(l.split(":", 1) for l in text.splitlines() if ":" in l and not l.startswith("#"))


def cpu(r):
    i = info(r, "cpu")
    return float(i["used_cpu_user"]) + float(i["used_cpu_sys"])


def commands(r):
    out = {}
    for k, v in info(r, "commandstats").items():
        fields = dict(f.split("=") for f in v.split(","))
        out[k.replace("cmdstat_", "")] = (int(fields["calls"]), float(fields["usec"]))
    return out


def main():
    port = int(sys.argv[1])
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    windows = parse_limits(sys.argv[3] if len(sys.argv) > 3 else "1000/1m,10000/1h,100000/1d")
    r = Resp(port)
    r.call("FLUSHALL")
    sha = r.call("SCRIPT", "LOAD", script()).decode()
    result = {"keys": k, "windows": len(windows), "passes": []}
    for p in (1, 2):
        r.call("CONFIG", "RESETSTAT")
        c0, t0 = cpu(r), time.time()
        batch = []
        for i in range(k):
            keys, args = check_args("s%d@example.com" % i, "per-sender", windows)
            batch.append(["EVALSHA", sha, len(keys)] + keys + args)
            if len(batch) == 100:
                for rep in r.pipeline(batch):
                    assert isinstance(rep, bytes), rep
                batch = []
        for rep in r.pipeline(batch):
            assert isinstance(rep, bytes), rep
        c1, t1 = cpu(r), time.time()
        stats = commands(r)
        inner = {c: round(n / k, 2) for c, (n, _) in stats.items()
                 if c not in ("evalsha", "config", "info")}
        result["passes"].append({
            "pass": p,
            "cpu_us_per_check": round((c1 - c0) * 1e6 / k, 1),
            "evalsha_usec_per_call": round(stats["evalsha"][1] / stats["evalsha"][0], 1),
            "commands_per_check": inner,
            "wall_s": round(t1 - t0, 2),
        })
    mem = info(r, "memory")
    result["used_memory_per_key"] = round(int(mem["used_memory"]) / k)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
