#!/usr/bin/env python3
"""Intake throughput: ten concurrent senders into a real `odmrd serve -f`, full durability.

Prints msgs/s beside SPEC §9 (≥ 1,000 msgs/s and ≥ 1.5× Exim 4.99), together with
this machine's own references measured in the same run: Postfix smtp-source into
smtp-sink (1,500 / 6,500 msgs/s on the reference VM) and the cost of one durable
file (~2 ms), so that a slow disk or a busy machine shows up as such. With
--exim PATH the same loads also run against that Exim binary's daemon (see
exim.py), the two servers taking turns (odmrd, Exim, Exim, odmrd), and odmrd's
rate is printed as a ratio to Exim's of the same run: the only comparison a
shared VM makes fair.

Usage: python3 bench/bench_intake.py [--messages N] [--size BYTES] [--exim PATH [--rounds N]]
                                      [--base DIR | --no-fresh-fs] [--keep]
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, List, NamedTuple, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Server, children, cpu_seconds, free_port, row, spooled, which, workdir  # noqa: E402
from exim import Exim, describe as exim_describe  # noqa: E402
import scratch_fs  # noqa: E402

SENDERS = 10
RCPT = "rcpt@example.org"


def make_message(size: int) -> bytes:
    head = (b"From: <bench@outside.test>\r\nTo: <%s>\r\nSubject: intake bench\r\n\r\n" % RCPT.encode())
    line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789.\r\n"
    body = line * (max(0, size - len(head)) // len(line) + 1)
    return head + body[:max(0, size - len(head)) - 2] + b"\r\n"


def durable_file_ms(directory: str, count: int = 200, size: int = 10240) -> float:
    """Create, write, fsync, rename and fsync the directory: the floor under one 250."""
    payload = b"x" * size
    os.makedirs(os.path.join(directory, "tmp"), exist_ok=True)
    start = time.perf_counter()
    for i in range(count):
        tmp = os.path.join(directory, "tmp", "f%d" % i)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, os.path.join(directory, "f%d" % i))
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
    return (time.perf_counter() - start) * 1000 / count


def _read_reply(fh) -> int:
    while True:
        line = fh.readline()
        if not line:
            raise EOFError("server closed the connection")
        if line[3:4] != b"-":
            return int(line[:3])


def pipelined_sender(args: Tuple[int, int, bytes]) -> int:
    """One connection; MAIL+RCPT+DATA in one write, and the next message's commands ride
    along with the previous message's final dot (RFC 2920 allows both)."""
    port, count, data = args
    stuffed = data.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    commands = b"MAIL FROM:<bench@outside.test> SIZE=%d\r\nRCPT TO:<%s>\r\nDATA\r\n" % (len(data), RCPT.encode())
    sent_ok = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        fh = sock.makefile("rb")
        assert _read_reply(fh) == 220
        sock.sendall(b"EHLO bench.test\r\n")
        assert _read_reply(fh) == 250
        sock.sendall(commands)
        for i in range(count):
            if _read_reply(fh) != 250 or _read_reply(fh) != 250 or _read_reply(fh) != 354:
                raise RuntimeError("envelope refused")
            sock.sendall(stuffed + (commands if i + 1 < count else b"QUIT\r\n"))
            if _read_reply(fh) == 250:
                sent_ok += 1
        _read_reply(fh)
    return sent_ok


def run_pipelined(port: int, total: int, data: bytes) -> Tuple[float, int]:
    per = [total // SENDERS + (1 if i < total % SENDERS else 0) for i in range(SENDERS)]
    # processes, not threads: the senders must not share one GIL with each other
    with multiprocessing.get_context("fork").Pool(SENDERS) as pool:
        start = time.perf_counter()
        done = sum(pool.map(pipelined_sender, [(port, n, data) for n in per]))
        elapsed = time.perf_counter() - start
    return elapsed, done


def run_smtp_source(source: str, port: int, sessions: int, messages: int, size: int,
                    rcpt: str = RCPT) -> float:
    cmd = [source, "-s", str(sessions), "-m", str(messages), "-l", str(size), "-d",
           "-f", "bench@outside.test", "-t", rcpt, "127.0.0.1:%d" % port]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def sink_reference(source: str, sink: str, size: int) -> Tuple[float, float]:
    """smtp-source into smtp-sink (which discards): one session, then ten."""
    port = free_port()
    proc = subprocess.Popen([sink, "-u", "nobody", "127.0.0.1:%d" % port, "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("smtp-sink did not start")
                time.sleep(0.05)
        one = 5000 / run_smtp_source(source, port, 1, 5000, size)
        ten = 20000 / run_smtp_source(source, port, 10, 20000, size)
        return one, ten
    finally:
        proc.kill()
        proc.wait(timeout=10)


class Result(NamedTuple):
    mta: str            # "odmrd" or "Exim"
    load: str           # LOADS key: the same load is run against both
    rate: float
    sent: int
    stored: int
    cpu: Tuple[float, float]


LOADS = {"pipelined": "10 pipelined Python senders", "smtp-source": "smtp-source -s 10 -d"}


def combined(runs: List[Result]) -> List[Result]:
    """One Result per (server, load) from several rounds: messages over total time, CPU
    averaged over that time, acknowledged and stored added up."""
    merged: List[Result] = []
    for key in dict.fromkeys((r.mta, r.load) for r in runs):
        same = [r for r in runs if (r.mta, r.load) == key]
        seconds = [r.sent / r.rate for r in same]
        total = sum(seconds)
        cpu = tuple(sum(r.cpu[i] * t for r, t in zip(same, seconds)) / total for i in (0, 1))
        merged.append(Result(key[0], key[1], sum(r.sent for r in same) / total,
                             sum(r.sent for r in same), sum(r.stored for r in same), cpu))
    return merged


DOMAIN = "example.org"


def run_load(mta: str, load: str, port: int, args: argparse.Namespace, source: Optional[str],
             cpu: Callable[[], Tuple[float, float]], stored: Callable[[], int]) -> Result:
    """One load (LOADS) against either server; `stored()` counts what the server has
    spooled once the load is over."""
    before = cpu()
    if load == "pipelined":
        elapsed, done = run_pipelined(port, args.messages, make_message(args.size))
    else:
        elapsed, done = run_smtp_source(source, port, SENDERS, args.messages, args.size,
                                        "rcpt@" + DOMAIN), args.messages
    after = cpu()
    used = ((after[0] - before[0]) / elapsed, (after[1] - before[1]) / elapsed)
    return Result(mta, load, done / elapsed, done, stored(), used)


def measure_odmrd(base: str, args: argparse.Namespace, source: Optional[str], load: str) -> Result:
    """odmrd's intake under one load, started as an operator would on an empty spool, and
    stopped before any other server runs, so that the two never share the CPU."""
    server = Server(base, smtp_extra="max_sessions_per_address = 100\nworkers = %s" % args.workers,
                    log_level=args.log_level)
    server.add_user("alice", [DOMAIN])
    try:
        server.start()
        pids = [server.pid] + children(server.pid)      # the main process and its intake workers
        return run_load("odmrd", load, server.smtp_port, args, source,
                        lambda: cpu_seconds(*pids), lambda: spooled(server.spool_dir, DOMAIN))
    finally:
        server.stop()


def measure_exim(base: str, args: argparse.Namespace, source: Optional[str], load: str) -> Result:
    """Exim's intake under the same load, on an empty spool of its own too."""
    exim = Exim(args.exim, os.path.join(base, "exim"), [DOMAIN])
    try:
        exim.start()
        return run_load("Exim", load, exim.port, args, source, exim.cpu_seconds, exim.spooled)
    finally:
        exim.stop()


def report(args: argparse.Namespace, base: str, fsync_ms: float, refs: Tuple[Optional[float], ...],
           results: List[Result]) -> bool:
    print("Intake: %d messages of %d bytes per run, spool on %s (%s); [smtp] workers = %s"
          % (args.messages, args.size, base, "kept" if args.keep else "removed", args.workers))
    print("Each load on an empty spool: a server started for it alone%s"
          % (", on a new ext4 filesystem (4 KiB blocks, a journal; loop-mounted in %s)" % base
             if args.fresh_fs else ""))
    print(row("", "measured", "reference (SPEC §9)"))
    print(row("one durable file (create+fsync+rename+dir fsync)", "%.2f ms" % fsync_ms, "~2 ms"))
    ref_one, ref_ten = refs
    if ref_one is not None:
        print(row("smtp-source -> smtp-sink, 1 session", "%.0f msgs/s" % ref_one, "~1,500 msgs/s"))
        print(row("smtp-source -> smtp-sink, 10 sessions", "%.0f msgs/s" % ref_ten, "~6,500 msgs/s"))
    else:
        print("  (smtp-source/smtp-sink not installed: machine reference skipped)")
    if args.exim:
        print(exim_describe())
    exim = {r.load: r.rate for r in results if r.mta == "Exim"}
    ok = True
    for r in results:
        ok = print_result(r, ref_ten, exim.get(r.load)) and ok
    return ok


def print_result(r: Result, ref_ten: Optional[float], exim_rate: Optional[float]) -> bool:
    label = "%s intake, %s" % (r.mta, LOADS[r.load])
    if r.mta == "odmrd":
        print(row(label, "%.0f msgs/s" % r.rate, ">= 1,000 msgs/s and >= 1.5x Exim 4.99"))
    else:
        print(row(label, "%.0f msgs/s" % r.rate, "issue 13: 1,230-2,150 msgs/s on this VM"))
    if ref_ten:
        print("     %.2fx smtp-source -> smtp-sink (10 sessions) of this run" % (r.rate / ref_ten))
    if r.mta == "odmrd" and exim_rate:
        print("     %.2fx Exim in this run, same load (goal >= 1.5x)" % (r.rate / exim_rate))
    elif r.mta == "odmrd":
        print("     (no --exim: issue 13 measured Exim 4.99 at 1,230-2,150 msgs/s on this VM)")
    print("     %s's CPU (all its processes): %.0f%% user + %.0f%% system of one core (%d cores here),"
          " %.2f + %.2f ms per message" % (r.mta, r.cpu[0] * 100, r.cpu[1] * 100, os.cpu_count() or 0,
                                           r.cpu[0] * 1000 / r.rate, r.cpu[1] * 1000 / r.rate))
    if r.stored != r.sent:
        print("  !! %s: %d acknowledged but %d found in the spool" % (label, r.sent, r.stored))
        return False
    print("     %d acknowledged, %d durable files in the spool" % (r.sent, r.stored))
    return True


def measure_rounds(base: str, args: argparse.Namespace, source: Optional[str]) -> List[Result]:
    """odmrd, then Exim, then Exim, then odmrd (and so on for --rounds): a machine that
    speeds up or slows down during the bench (a VM's disk does, for a minute after many
    files were deleted) then favours neither server. Each load starts its server afresh
    on an empty spool: a queue already holding the last load's files (Exim keeps one
    input/ directory for all) would measure the bench's order, not the server."""
    loads = [load for load in LOADS if load != "smtp-source" or source]
    results: List[Result] = []
    for round_ in range(args.rounds if args.exim else 1):
        servers = ["odmrd", "Exim"] if args.exim else ["odmrd"]
        for name in servers if round_ % 2 == 0 else reversed(servers):
            measure = measure_odmrd if name == "odmrd" else measure_exim
            for load in loads:
                with scratch_place(base, args, "%s-%d-%s" % (name, round_, load)) as where:
                    results.append(measure(where, args, source, load))
    return results


@contextlib.contextmanager
def scratch_place(base: str, args: argparse.Namespace, name: str) -> Iterator[str]:
    """Where one load keeps its server's spool: a new filesystem of its own (--fresh-fs),
    or a new directory under `base`."""
    if args.fresh_fs:
        with scratch_fs.fresh_ext4(base, scratch_fs.size_for(args.messages, args.size),
                                   scratch_fs.inodes_for(args.messages)) as where:
            yield where
    else:
        where = os.path.join(base, name)
        os.mkdir(where)
        yield where


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000, help="messages per run (default 10000)")
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes (default 10240)")
    parser.add_argument("--base", default=None,
                        help="directory for the scratch spool (default /var/tmp; /dev/shm shows the "
                             "CPU-only ceiling, without disk flushes)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    scratch_fs.add_option(parser, "each load on a new ext4 filesystem (a loop-mounted image in "
                                  "the scratch directory): no load pays for files an earlier one deleted")
    parser.add_argument("--workers", default="auto",
                        help="the provider's [smtp] workers (default auto; 1: sessions in the main process)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the provider's log_level (default info, as in production)")
    parser.add_argument("--exim", metavar="PATH", default=None,
                        help="an Exim binary: run the same loads against it, in this run, and print "
                             "odmrd's ratio to it")
    parser.add_argument("--rounds", type=int, default=2,
                        help="with --exim: rounds of both servers, in turn odmrd first and Exim first "
                             "(default 2: odmrd, Exim, Exim, odmrd); each figure is over all rounds")
    args = parser.parse_args(argv)

    scratch_fs.settle_option(parser, args, kept=args.keep)
    base = tempfile.mkdtemp(prefix="odmrd-bench-intake-", dir=args.base) if args.base \
        else workdir("odmrd-bench-intake-")
    source, sink = which("smtp-source"), which("smtp-sink")
    try:
        with scratch_place(base, args, "durable-file") as where:
            fsync_ms = durable_file_ms(where)
        refs = sink_reference(source, sink, args.size) if source and sink else (None, None)
        results = combined(measure_rounds(base, args, source))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0 if report(args, base, fsync_ms, refs, results) else 1


if __name__ == "__main__":
    sys.exit(main())
