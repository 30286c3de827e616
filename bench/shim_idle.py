#!/usr/bin/env python3
"""The stdio shim's start-up and idle memory against a warm pool.

Spawns the shim as a host would, times spawn -> `initialize` answer (15
runs), then keeps one shim, makes 20 calls, waits 2 s and reads its memory
from /proc. Needs a broker serving a pool of mcp-fixture (tool `echo`).

usage: shim_idle.py SOCKET POOL SHIM_COMMAND...
e.g.   shim_idle.py /tmp/b.sock fx target/dist/mcp-broker-connect
       shim_idle.py /tmp/b.sock fx target/dist/mcp-broker connect
"""
import json
import statistics
import subprocess
import sys
import time

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "shim_idle", "version": "1"}}}


def send(p, msg):
    p.stdin.write(json.dumps(msg).encode() + b"\n")
    p.stdin.flush()


def start(cmd, socket, pool, calls):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd + ["--pool", pool, "--socket", socket],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    send(p, INIT)
    line = p.stdout.readline()
    ms = (time.perf_counter() - t0) * 1e3
    if b'"result"' not in line:
        sys.exit(f"initialize failed: {line!r}")
    send(p, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    for i in range(calls):
        send(p, {"jsonrpc": "2.0", "id": 10 + i, "method": "tools/call",
                 "params": {"name": "echo", "arguments": {"text": "x"}}})
        line = p.stdout.readline()
        if b'"result"' not in line:
            sys.exit(f"call failed: {line!r}")
    return p, ms


def memory(pid):
    out = {}
    for path, keys in ((f"/proc/{pid}/status", ("VmRSS", "RssAnon", "RssFile", "Threads")),
                       (f"/proc/{pid}/smaps_rollup", ("Pss", "Shared_Clean", "Private_Dirty"))):
        for line in open(path):
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = v.strip()
    return out


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    socket, pool, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    times = []
    for _ in range(15):
        p, ms = start(cmd, socket, pool, 1)
        times.append(ms)
        p.stdin.close()
        p.wait(10)
    p, _ = start(cmd, socket, pool, 20)
    time.sleep(2)
    mem = memory(p.pid)
    p.stdin.close()
    p.wait(10)
    print(f"{' '.join(cmd)}: spawn -> initialize p50 {statistics.median(times):.1f} ms "
          f"(min {min(times):.1f}, max {max(times):.1f}); idle {mem}")


if __name__ == "__main__":
    main()
