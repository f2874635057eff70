#!/usr/bin/env python3
"""Relay throughput of `odmrd fetch --relay` (SPEC section 6 and 9).

Starts a provider (`odmrd serve -f`) on free loopback ports, spools N messages of SIZE bytes for
one domain, starts Postfix `smtp-sink` as the customer's local SMTP server,
then times `odmrd fetch --tls none --relay ...` draining the backlog through
the splice. Prints msgs/s beside the references: fetchmail ~23 msgs/s (one
line per write, no TCP_NODELAY), target >= 1,000 msgs/s. Then (--local N)
times local delivery of N messages into a Maildir and into an mbox, each
message fsync'd before its 250.

    python3 bench/bench_relay.py [-n 2000] [--size 10240] [--local 500]
"""
from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import subprocess
import sys
import time
from typing import Dict, List, Tuple

from common import (PASSWORD, ROOT, Server, cpu_seconds, free_port, spooled, stop_process,
                    wait_port, which, workdir)

FETCHMAIL_RATE = 23.0
TARGET_RATE = 1000.0
DURABLE_FILE_RATE = 500         # SPEC section 9: create+fsync+rename+dir-fsync ~2 ms


def message(index: int, size: int) -> bytes:
    head = b"From: bench@remote.test\r\nTo: user@example.org\r\nSubject: bench %d\r\n\r\n" % index
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def enqueue(port: int, count: int, size: int) -> float:
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for i in range(count):
            client.sendmail("bench@remote.test", ["user@example.org"], message(i, size))
    return time.monotonic() - started


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--local", type=int, default=500, metavar="N",
                        help="then N messages each into --maildir and --mbox (0: skip)")
    return parser.parse_args()


def start_sink(sink_bin: str) -> Tuple[subprocess.Popen, int]:
    """smtp-sink as the customer's local SMTP server, on a free port."""
    sink_port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    # -c prints counters on stdout: a pipe nobody reads would fill up and stall the sink
    sink = subprocess.Popen([sink_bin] + user + ["-c", "127.0.0.1:%d" % sink_port, "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(sink_port, what="no smtp-sink")
    return sink, sink_port


def fetch_command(provider: Server) -> List[str]:
    """`odmrd fetch` for alice's example.org, without TLS and without a destination yet."""
    # BENCH_PY_ARGS="-m cProfile -o prof.out" profiles the fetch process.
    return [sys.executable] + os.environ.get("BENCH_PY_ARGS", "").split() + [
        os.path.join(ROOT, "odmrd.py"), "fetch",
        "--server", "127.0.0.1:%d" % provider.odmr_port, "--user", "alice",
        "--tls", "none", "--domain", "example.org"]


def time_relay(provider: Server, base: List[str], env: Dict[str, str], sink_port: int,
               messages: int) -> bool:
    """Drain the backlog with --relay into the sink; print the rate and CPU beside the references."""
    command = base + ["--relay", "127.0.0.1:%d" % sink_port]
    started = time.monotonic()
    before, provider_before = os.times(), sum(cpu_seconds(provider.pid))
    result = subprocess.run(command, env=env, capture_output=True, timeout=3600)
    after, provider_after = os.times(), sum(cpu_seconds(provider.pid))
    elapsed = time.monotonic() - started
    left = spooled(provider.spool_dir, "example.org")
    if result.returncode != 0 or left:
        print("fetch exited %d, %d messages left in the spool: %s"
              % (result.returncode, left, result.stderr.decode(errors="replace").strip()))
        return False
    rate = messages / elapsed
    cpu = (after.children_user - before.children_user) + \
        (after.children_system - before.children_system)
    print("CPU: fetch process %.2fs, provider process %.2fs, of %.2fs wall"
          % (cpu, provider_after - provider_before, elapsed))
    print("odmrd fetch --relay into smtp-sink: %d msgs in %.2fs (process start included)"
          % (messages, elapsed))
    print("%-34s %10s %10s" % ("figure", "measured", "reference"))
    print("%-34s %10.0f %10.0f" % ("relay msgs/s (fetchmail)", rate, FETCHMAIL_RATE))
    print("%-34s %10.0f %10.0f  %s" % ("relay msgs/s (target)", rate, TARGET_RATE,
                                        "ok" if rate >= TARGET_RATE else "BELOW TARGET"))
    return True


def time_local(provider: Server, base: List[str], env: Dict[str, str], work: str,
               args: argparse.Namespace) -> bool:
    """--local messages into a Maildir, then as many into an mbox, each fsync'd before its 250."""
    for flag, path in (("--maildir", os.path.join(work, "Maildir")),
                       ("--mbox", os.path.join(work, "mbox"))):
        enqueue(provider.smtp_port, args.local, args.size)
        started = time.monotonic()
        result = subprocess.run(base + [flag, path], env=env, capture_output=True, timeout=3600)
        elapsed = time.monotonic() - started
        if result.returncode != 0 or spooled(provider.spool_dir, "example.org"):
            print("fetch %s exited %d: %s" % (flag, result.returncode,
                                               result.stderr.decode(errors="replace").strip()))
            return False
        print("%-34s %10.0f %10.0f  (fetchmail; one durable file ~2 ms => ~%d)"
              % ("%s msgs/s (fsync each)" % flag, args.local / elapsed, FETCHMAIL_RATE,
                 DURABLE_FILE_RATE))
    return True


def main() -> int:
    args = parse_args()
    sink_bin = which("smtp-sink")
    if not sink_bin:
        print("smtp-sink (postfix) is not installed", file=sys.stderr)
        return 69

    work = workdir("bench-relay-")
    provider = Server(work)
    provider.add_user("alice", ["example.org"])
    provider.start()
    sink = None
    try:
        took = enqueue(provider.smtp_port, args.messages, args.size)
        print("enqueued %d x %d bytes in %.1fs" % (args.messages, args.size, took))
        sink, sink_port = start_sink(sink_bin)
        env = dict(os.environ, ODMR_PASSWORD=PASSWORD)
        env.pop("ODMRD_CONFIG", None)
        base = fetch_command(provider)
        if not time_relay(provider, base, env, sink_port, args.messages):
            return 1
        if args.local and not time_local(provider, base, env, work, args):
            return 1
        return 0
    finally:
        stop_process(sink, 5)
        provider.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
