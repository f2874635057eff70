#!/usr/bin/env python3
"""Scale: a provider with a large queue over many domains, as SPEC §9 sizes it.

Queues --messages (1,000,000) over --domains (10,000) hosted domains, written
straight in the documented spool format (durable writes of a million files
would only measure the disk, for an hour), then starts a real `odmrd serve -f`
and times what an operator and a customer feel: the daemon's start and its
memory, ATRN to the first MAIL FROM, `queue list DOMAIN`, `queue summary`,
`status` and a `/metrics` request, and with --full-list the whole queue's
`queue list --json`. SPEC §9: `queue summary` ≤ 2 s, `status` and `/metrics`
≤ 100 ms each (no spool scan on the request path), and none of the figures
measured for the SPEC (ATRN start 1 ms, RSS 34 MB, restart 0.2 s, `queue list
DOMAIN` 0.16 s, whole-queue list 126 s) gets worse.

As root with mkfs.ext4, the queue lives on a new ext4 filesystem of its own
(bench/scratch_fs.py), unmounted at the end: removing a million files from a
shared disk would take minutes and slow every file created on it for minutes
after.

Usage: python3 bench/bench_scale.py [--messages N] [--domains N] [--rounds R] [--full-list]
                                    [--base DIR | --no-fresh-fs]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Callable, Iterator, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_atrn_start import Customer, write_queue  # noqa: E402
from common import ROOT, Server, free_port, proc_status, row, workdir  # noqa: E402
import scratch_fs  # noqa: E402

from odmr import control  # noqa: E402

USERS = 100                 # accounts sharing the domains: a users file of realistic size
CUSTOMER_DOMAIN = "example.org"


def domain_names(count: int) -> List[str]:
    return [CUSTOMER_DOMAIN] + ["d%05d.test" % n for n in range(1, count)]


def host_domains(server: Server, domains: List[str]) -> None:
    """alice holds the customer's domain; the others are spread over USERS accounts."""
    server.add_user("alice", domains[:1])
    rest = domains[1:]
    per = -(-len(rest) // USERS) if rest else 0
    for n in range(USERS):
        part = rest[n * per:(n + 1) * per]
        if part:
            server.add_user("user%03d" % n, part)


def fill_queue(spool_dir: str, domains: List[str], messages: int) -> float:
    """`messages` spread evenly over `domains` in the spool format; returns seconds taken."""
    started = time.perf_counter()
    for index, domain in enumerate(domains):
        share = messages // len(domains) + (1 if index < messages % len(domains) else 0)
        write_queue(spool_dir, domain, share)
    os.sync()
    return time.perf_counter() - started


def timed(action: Callable[[], object], rounds: int = 1) -> List[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times


def odmrd(server: Server, *args: str) -> Callable[[], None]:
    """One run of an `odmrd` command against the server's configuration (output discarded)."""
    def run() -> None:
        done = subprocess.run([sys.executable, os.path.join(ROOT, "odmrd.py"), "-c", server.config]
                              + list(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError("odmrd %s: exit %d: %s" % (" ".join(args), done.returncode,
                                                          done.stderr.decode(errors="replace").strip()))
    return run


def atrn_starts(server: Server, rounds: int) -> List[float]:
    """ATRN to the first MAIL FROM, `rounds` times (the customer drops the line then)."""
    times = []
    for _ in range(rounds):
        customer = Customer(server.odmr_port)
        try:
            customer.login()
            times.append(customer.atrn_to_first_mail()[1])
        finally:
            customer.close()
        time.sleep(0.3)        # the provider notices the drop and releases the domain
    return times


def describe(values: List[float]) -> str:
    if len(values) == 1:
        return "%.3f s" % values[0] if values[0] >= 1 else "%.1f ms" % (values[0] * 1000)
    return "%.1f ms (max %.1f)" % (statistics.median(values) * 1000, max(values) * 1000)


@contextlib.contextmanager
def scratch_place(args: argparse.Namespace) -> Iterator[str]:
    if args.fresh_fs:
        base = workdir("odmrd-bench-scale-")
        try:
            inodes = int(args.messages * 1.1) + 4 * args.domains + 10000
            size = max(1 << 30, args.messages * 6144)
            with scratch_fs.fresh_ext4(base, size, inodes) as where:
                yield where
        finally:
            shutil.rmtree(base, ignore_errors=True)
    else:
        where = tempfile.mkdtemp(prefix="odmrd-bench-scale-", dir=args.base) if args.base \
            else workdir("odmrd-bench-scale-")
        try:
            yield where
        finally:
            shutil.rmtree(where, ignore_errors=True)


def measure(where: str, args: argparse.Namespace) -> None:
    metrics_port = free_port()
    server = Server(where, log_level="warning",
                    smtp_extra="[metrics]\nlisten = 127.0.0.1:%d" % metrics_port)
    domains = domain_names(args.domains)
    host_domains(server, domains)
    fill = fill_queue(server.spool_dir, domains, args.messages)
    print("Scale: %d messages over %d hosted domains (%d accounts), queued in %.0f s, spool on %s"
          % (args.messages, args.domains, USERS + 1, fill, where))
    print(row("", "measured", "reference (SPEC §9)"))
    try:
        start = timed(server.start)
        status = proc_status(server.pid)
        print(row("daemon start (until both ports answer)", describe(start), "restart 0.2 s"))
        print(row("ATRN -> first MAIL FROM (median of %d)" % args.rounds,
                  describe(atrn_starts(server, args.rounds)), "1 ms"))
        big = domains[len(domains) // 2]
        print(row("queue list %s (%d messages)" % (big, args.messages // len(domains)),
                  describe(timed(odmrd(server, "queue", "list", big))), "0.16 s"))
        print(row("queue summary", describe(timed(odmrd(server, "queue", "summary"))), "<= 2 s"))
        print(row("odmrd status (the command, Python start included)",
                  describe(timed(odmrd(server, "status"), 3)), ""))
        print(row("status request on the control socket",
                  describe(timed(lambda: control.query(os.path.realpath(server.spool_dir), [0]), args.rounds)),
                  "<= 100 ms"))
        url = "http://127.0.0.1:%d/metrics" % metrics_port
        print(row("GET /metrics", describe(timed(lambda: urllib.request.urlopen(url, timeout=30).read(),
                                                 args.rounds)), "<= 100 ms"))
        rss = proc_status(server.pid)["rss_kib"] / 1024
        print(row("daemon RSS (main process), after start / now",
                  "%.0f / %.0f MB" % (status["rss_kib"] / 1024, rss), "34 MB"))
        if args.full_list:
            print(row("queue list --json, whole queue",
                      describe(timed(odmrd(server, "queue", "list", "--json"))), "126 s"))
        server.stop()
        print(row("restart (stop, then start until both ports answer)",
                  describe(timed(server.start)), "0.2 s"))
    finally:
        server.stop()


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000000, help="messages queued (1000000)")
    parser.add_argument("--domains", type=int, default=10000, help="hosted domains they are for (10000)")
    parser.add_argument("--rounds", type=int, default=7, help="repeats of the quick requests (median)")
    parser.add_argument("--full-list", action="store_true",
                        help="also time `queue list --json` over the whole queue (minutes)")
    parser.add_argument("--base", default=None, help="directory for the scratch spool (default /var/tmp)")
    scratch_fs.add_option(parser, "the queue on a new ext4 filesystem, unmounted at the end")
    args = parser.parse_args(argv)
    if args.domains < 2 or args.messages < args.domains:
        parser.error("--domains must be at least 2 and at most --messages")
    scratch_fs.settle_option(parser, args)
    with scratch_place(args) as where:
        measure(where, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
