#!/usr/bin/env python3
"""Intake throughput: ten concurrent senders into a real `odmrd serve -f`, full durability.

Prints msgs/s beside SPEC §9 (≥ 1,000 msgs/s; Exim 400–1,200), together with this
machine's own references measured in the same run: Postfix smtp-source into
smtp-sink (1,500 / 6,500 msgs/s on the reference VM) and the cost of one durable
file (~2 ms), so that a slow disk or a busy machine shows up as such.

Usage: python3 bench/bench_intake.py [--messages N] [--size BYTES] [--keep]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Server, free_port, row, which, workdir  # noqa: E402

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


def _stat(pid: int) -> list:
    with open("/proc/%d/stat" % pid) as fh:
        return fh.read().rsplit(")", 1)[1].split()


def children(pid: int) -> list:
    """The live child processes of `pid` (odmrd's intake workers)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and int(_stat(int(name))[1]) == pid:
                found.append(int(name))
        except (OSError, IndexError):
            continue
    return found


def cpu_seconds(*pids: int) -> Tuple[float, float]:
    """(user, system) CPU seconds of processes so far, from /proc/PID/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for pid in pids:
        try:
            fields = _stat(pid)
        except OSError:
            continue
        user += int(fields[11]) / tick
        system += int(fields[12]) / tick
    return user, system


def cpu_used(before: Tuple[float, float], pids: list, elapsed: float) -> Tuple[float, float]:
    after = cpu_seconds(*pids)
    return (after[0] - before[0]) / elapsed, (after[1] - before[1]) / elapsed


def spooled(spool_dir: str, domain: str) -> int:
    try:
        return sum(1 for n in os.listdir(os.path.join(spool_dir, domain)) if len(n) > 13 and "." not in n)
    except FileNotFoundError:
        return 0


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000, help="messages per run (default 10000)")
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes (default 10240)")
    parser.add_argument("--base", default=None,
                        help="directory for the scratch spool (default /var/tmp; /dev/shm shows the "
                             "CPU-only ceiling, without disk flushes)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--workers", default="auto",
                        help="the provider's [smtp] workers (default auto; 1: sessions in the main process)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the provider's log_level (default info, as in production)")
    args = parser.parse_args(argv)

    base = tempfile.mkdtemp(prefix="odmrd-bench-intake-", dir=args.base) if args.base \
        else workdir("odmrd-bench-intake-")
    source, sink = which("smtp-source"), which("smtp-sink")
    data = make_message(args.size)
    server = Server(base, smtp_extra="max_sessions_per_address = 100\nworkers = %s" % args.workers,
                    log_level=args.log_level)
    # Each run fills its own domain: deleting the first run's files just before the
    # second would slow its file creation (ext4 without a journal skips recently
    # freed inodes one by one), which measures the bench, not odmrd.
    server.add_user("alice", ["example.org", "example.com"])
    results = []
    try:
        fsync_ms = durable_file_ms(tempfile.mkdtemp(dir=base))
        if source and sink:
            ref_one, ref_ten = sink_reference(source, sink, args.size)
        else:
            ref_one = ref_ten = None
        server.start()

        pids = [server.pid] + children(server.pid)      # the main process and its intake workers
        cpu = cpu_seconds(*pids)
        elapsed, done = run_pipelined(server.smtp_port, args.messages, data)
        cpu = cpu_used(cpu, pids, elapsed)
        stored = spooled(server.spool_dir, "example.org")
        results.append(("odmrd intake, 10 pipelined Python senders", done / elapsed, done, stored, cpu))

        if source:
            cpu = cpu_seconds(*pids)
            elapsed = run_smtp_source(source, server.smtp_port, SENDERS, args.messages, args.size,
                                      "rcpt@example.com")
            cpu = cpu_used(cpu, pids, elapsed)
            stored = spooled(server.spool_dir, "example.com")
            results.append(("odmrd intake, smtp-source -s 10 -d", args.messages / elapsed, args.messages,
                            stored, cpu))
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    print("Intake: %d messages of %d bytes per run, spool on %s (%s); [smtp] workers = %s"
          % (args.messages, args.size, base, "kept" if args.keep else "removed", args.workers))
    print(row("", "measured", "reference (SPEC §9)"))
    print(row("one durable file (create+fsync+rename+dir fsync)", "%.2f ms" % fsync_ms, "~2 ms"))
    if ref_one is not None:
        print(row("smtp-source -> smtp-sink, 1 session", "%.0f msgs/s" % ref_one, "~1,500 msgs/s"))
        print(row("smtp-source -> smtp-sink, 10 sessions", "%.0f msgs/s" % ref_ten, "~6,500 msgs/s"))
    else:
        print("  (smtp-source/smtp-sink not installed: machine reference skipped)")
    ok = True
    for label, rate, sent, stored, load in results:
        print(row(label, "%.0f msgs/s" % rate, ">= 1,000 msgs/s and >= 1.5x Exim 4.99"))
        if ref_ten:
            print("     %.2fx smtp-source -> smtp-sink (10 sessions) of this run; Exim 4.99 measured "
                  "1,230-2,150 msgs/s here" % (rate / ref_ten))
        print("     odmrd's CPU (all its processes): %.0f%% user + %.0f%% system of one core (%d cores here)"
              % (load[0] * 100, load[1] * 100, os.cpu_count() or 0))
        if stored != sent:
            print("  !! %s: %d acknowledged but %d found in the spool" % (label, sent, stored))
            ok = False
        else:
            print("     %d acknowledged, %d durable files in the spool" % (sent, stored))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
