#!/usr/bin/env python3
"""Latency probe for bench/quota.sh: one SMTP session, COUNT messages one after
another, each timed from MAIL FROM to the reply after the final dot (the reply that
waits for the quota check and the queue write). Prints one JSON line:
{"count", "p50_ms", "p90_ms", "p99_ms", "max_ms", "codes": {code: n}}.

    quota_probe.py HOST PORT COUNT [SIZE]
"""
import json
import smtplib
import sys
import time


def main():
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 1024
    body = "Subject: probe\r\n\r\n" + ("x" * 76 + "\r\n") * max(1, size // 78)
    conn = smtplib.SMTP(host, port, timeout=60)
    conn.ehlo("probe.bench")
    times, codes = [], {}
    for _ in range(count):
        t0 = time.perf_counter()
        code, _ = conn.mail("sender@example.com")
        if code == 250:
            conn.rcpt("rcpt@example.net")
            code, _ = conn.data(body)
        else:
            conn.rset()
        times.append((time.perf_counter() - t0) * 1000.0)
        codes[str(code)] = codes.get(str(code), 0) + 1
    conn.quit()
    times.sort()

    def pct(p):
        return round(times[min(len(times) - 1, int(len(times) * p))], 3)

    print(json.dumps({"count": count, "p50_ms": pct(0.50), "p90_ms": pct(0.90),
                      "p99_ms": pct(0.99), "max_ms": round(times[-1], 3), "codes": codes}))


if __name__ == "__main__":
    main()
