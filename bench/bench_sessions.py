#!/usr/bin/env python3
"""1,000 concurrent idle ODMR sessions: the provider's memory, then its leftovers.

Opens N connections to a real `odmrd serve -f` (each greeted, each past EHLO,
every tenth also authenticated), reads the daemon's VmRSS from /proc beside the
SPEC §9 reference (under 300 MB), closes them all and reports the daemon's
thread and descriptor counts against those it had before, to show no leaks.

Usage: python3 bench/bench_sessions.py [--sessions N] [--keep]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import sys
import time
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PASSWORD, Server, cram_md5_response, proc_status, row, workdir  # noqa: E402


def raise_nofile(wanted: int) -> None:
    """Both ends live on this machine: the bench and the daemon (which inherits it) need fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def read_reply(fh) -> bytes:
    while True:
        line = fh.readline()
        if not line:
            raise EOFError("closed")
        if line[3:4] != b"-":
            return line


def open_session(port: int, authenticate: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    fh = sock.makefile("rb")
    greeting = read_reply(fh)
    if not greeting.startswith(b"220"):
        sock.close()
        raise RuntimeError("refused: %r" % greeting)
    sock.sendall(b"EHLO idle.bench\r\n")
    read_reply(fh)
    if authenticate:
        sock.sendall(b"AUTH CRAM-MD5\r\n")
        challenge = read_reply(fh)[4:].strip().decode()
        sock.sendall(cram_md5_response("alice", PASSWORD, challenge).encode() + b"\r\n")
        if not read_reply(fh).startswith(b"235"):
            raise RuntimeError("authentication failed")
    fh.close()
    return sock


def wait_settled(pid: int, threads: int, fds: int, timeout: float = 30.0) -> dict:
    """Poll until the daemon is back to its idle counts (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    status = proc_status(pid)
    while time.monotonic() < deadline:
        status = proc_status(pid)
        if status["threads"] <= threads and status["fds"] <= fds:
            break
        time.sleep(0.2)
    return status


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000, help="concurrent sessions (1000)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)

    raise_nofile(2 * args.sessions + 256)
    base = workdir("odmrd-bench-sessions-")
    limit = args.sessions + 100
    server = Server(base, log_level="warning",
                    odmr_extra="max_sessions = %d\nmax_sessions_per_address = %d\nidle_timeout = 10m"
                               % (limit, limit))
    server.add_user("alice", ["example.org"])
    try:
        server.start()
        figures = measure(server, args.sessions)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return report(args.sessions, figures)


def measure(server: Server, sessions: int) -> dict:
    """The daemon's figures before, with `sessions` idle sessions open, and after they close."""
    socks: List[socket.socket] = []
    try:
        time.sleep(0.5)
        before = proc_status(server.pid)
        started = time.perf_counter()
        for i in range(sessions):
            socks.append(open_session(server.odmr_port, authenticate=(i % 10 == 0)))
        opened = time.perf_counter() - started
        time.sleep(1.0)
        busy = proc_status(server.pid)
        for sock in socks:
            sock.close()
        socks = []
        after = wait_settled(server.pid, before["threads"], before["fds"])
        alive = server.proc.poll() is None
    finally:
        for sock in socks:
            sock.close()
    return {"before": before, "busy": busy, "after": after, "opened": opened, "alive": alive}


def report(n: int, figures: dict) -> int:
    """Print the table beside SPEC §9; 1 when the daemon leaked or died."""
    before, busy, after = figures["before"], figures["busy"], figures["after"]
    print("Idle sessions: %d ODMR connections opened in %.1f s (EHLO each, AUTH every tenth)"
          % (n, figures["opened"]))
    print(row("", "measured", "reference (SPEC §9)"))
    print(row("daemon RSS, idle before", "%.1f MB" % (before["rss_kib"] / 1024), ""))
    print(row("daemon RSS with %d sessions open" % n, "%.1f MB" % (busy["rss_kib"] / 1024), "< 300 MB"))
    print(row("RSS per session", "%.0f KB" % ((busy["rss_kib"] - before["rss_kib"]) / n), ""))
    print(row("threads: before / open / after close", "%d / %d / %d" % (
        before["threads"], busy["threads"], after["threads"]), "after == before"))
    print(row("open fds: before / open / after close", "%d / %d / %d" % (
        before["fds"], busy["fds"], after["fds"]), "after == before"))
    leaks = after["threads"] > before["threads"] or after["fds"] > before["fds"]
    if leaks:
        print("  !! the daemon kept threads or descriptors after every session closed")
    if not figures["alive"]:
        print("  !! the daemon died during the run")
    return 1 if leaks or not figures["alive"] else 0


if __name__ == "__main__":
    sys.exit(main())
