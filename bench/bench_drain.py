#!/usr/bin/env python3
"""ATRN drain speed (SPEC section 9): a 10,000-message backlog to a PIPELINING customer.

Runs, side by side on this machine:
  1. the reference: Postfix smtp-source, one connection, into smtp-sink;
  2. odmrd: `odmrd serve -f` (a separate process) with the backlog spooled for
     example.org; a small relay customer authenticates (CRAM-MD5), sends ATRN and
     splices the reversed connection to the same smtp-sink.
Prints msgs/s beside the reference, the 2x target and Exim's 86 msgs/s.

Usage: python3 bench/bench_drain.py [--messages 10000] [--size 10240] [--keep]
Needs /usr/sbin/smtp-sink and smtp-source (Debian package postfix).
"""
from __future__ import annotations

import argparse
import base64
import hmac
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import select
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from odmr.spool import Envelope, Recipient, new_id  # noqa: E402
from common import PASSWORD, Server, free_port, stop_process, wait_port  # noqa: E402

EXIM_DRAIN = 86.0
SINK = "/usr/sbin/smtp-sink"
SOURCE = "/usr/sbin/smtp-source"


def body(size: int, n: int) -> bytes:
    head = b"From: bench@sender.test\r\nTo: user@example.org\r\nSubject: drain %d\r\n\r\n" % n
    line = b"x" * 76 + b"\r\n"
    text = head + line * ((size - len(head)) // len(line) + 1)
    return text[:size - 2] + b"\r\n"


def fill_spool(spool_dir: str, domain: str, count: int, size: int) -> None:
    """Write the backlog straight into the spool format (no fsync: this is set-up, not the test)."""
    directory = os.path.join(spool_dir, domain)
    os.makedirs(os.path.join(directory, "tmp"), mode=0o700, exist_ok=True)
    for n in range(count):
        msg_id = new_id()
        env = Envelope(sender="bench@sender.test", recipients=[Recipient("user@%s" % domain)])
        with open(os.path.join(directory, msg_id), "wb") as fh:
            fh.write(env.header_bytes(msg_id))
            fh.write(body(size, n))
    os.sync()


def start_sink(workdir: str, port: int) -> subprocess.Popen:
    cmd = [SINK, "-c", "127.0.0.1:%d" % port, "256"]
    if os.getuid() == 0:
        cmd[1:1] = ["-u", "nobody"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir)
    wait_port(port, what="no smtp-sink")
    return proc


def reference_rate(port: int, messages: int, size: int) -> float:
    start = time.monotonic()
    subprocess.run([SOURCE, "-s", "1", "-m", str(messages), "-l", str(size), "-d",
                    "-f", "bench@sender.test", "-t", "user@example.org", "127.0.0.1:%d" % port],
                   check=True, timeout=600, stdout=subprocess.DEVNULL)
    return messages / (time.monotonic() - start)


class Reply:
    def __init__(self, sock: socket.socket):
        self.file = sock.makefile("rb", buffering=0)

    def read(self):
        lines = []
        while True:
            line = b""
            while not line.endswith(b"\n"):
                ch = self.file.read(1)          # byte at a time: nothing read past the ATRN reply
                if not ch:
                    raise SystemExit("provider closed the connection")
                line += ch
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), [l[4:] for l in lines]


def splice(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes (the customer's --relay pattern).

    One thread, epoll, and the kernel's splice(2) through a pipe per direction:
    no user-space copy and no hand-off between threads on every line."""
    poller = select.epoll()
    pipes = {}
    peer = {a.fileno(): b.fileno(), b.fileno(): a.fileno()}
    nonblock = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    try:
        for s in (a, b):
            pipes[s.fileno()] = os.pipe()
            s.setblocking(False)
            poller.register(s.fileno(), select.EPOLLIN)
        while True:
            for fd, _ in poller.poll(600):
                r, w = pipes[fd]
                try:
                    n = os.splice(fd, w, 1 << 20, flags=nonblock)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if n == 0:
                    return
                while n:
                    try:
                        n -= os.splice(r, peer[fd], n, flags=os.SPLICE_F_MOVE)
                    except BlockingIOError:
                        select.select([], [peer[fd]], [], 600)
                    except OSError:
                        return
    finally:
        poller.close()
        for r, w in pipes.values():
            os.close(r)
            os.close(w)


def atrn_drain(odmr_port: int, sink_port: int, domain: str) -> float:
    """Log in, ATRN, splice to the sink; return seconds from the 250 to the provider's close."""
    sock = socket.create_connection(("127.0.0.1", odmr_port), timeout=600)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    r = Reply(sock)
    assert r.read()[0] == 220
    sock.sendall(b"EHLO customer.bench\r\n")
    assert r.read()[0] == 250
    sock.sendall(b"AUTH CRAM-MD5\r\n")
    code, lines = r.read()
    assert code == 334, lines
    digest = hmac.new(PASSWORD.encode(), base64.b64decode(lines[0]), "md5").hexdigest()
    sock.sendall(base64.b64encode(("alice %s" % digest).encode()) + b"\r\n")
    assert r.read()[0] == 235
    sock.sendall(("ATRN %s\r\n" % domain).encode())
    code, lines = r.read()
    if code != 250:
        raise SystemExit("ATRN refused: %d %s" % (code, lines))
    start = time.monotonic()
    local = socket.create_connection(("127.0.0.1", sink_port), timeout=600)
    local.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    splice(sock, local)
    elapsed = time.monotonic() - start
    sock.close()
    local.close()
    return elapsed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--reference-messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args()


def report(ref_before: float, ref_after: float, messages: int, elapsed: float, left: int) -> None:
    """The drain's rate beside the two reference runs, the target and Exim."""
    ref = (ref_before + ref_after) / 2   # this machine is shared and noisy: average the two runs
    rate = messages / elapsed
    print()
    print("%-52s %10s" % ("figure", "msgs/s"))
    print("%-52s %10.0f" % ("smtp-source -> smtp-sink, 1 connection, before", ref_before))
    print("%-52s %10.0f" % ("smtp-source -> smtp-sink, 1 connection, after", ref_after))
    print("%-52s %10.0f" % ("target: 2x the mean of the two reference runs", 2 * ref))
    print("%-52s %10.0f" % ("Exim 4.99 ATRN drain (SPEC section 9)", EXIM_DRAIN))
    print("%-52s %10.0f   (%d messages in %.2f s, %d left in the spool)"
          % ("odmrd ATRN drain -> relay customer -> smtp-sink", rate, messages, elapsed, left))
    print()
    print("result: %s (%.2fx the mean reference; %.2fx the slower run, %.2fx the faster)"
          % ("PASS" if rate >= 2 * ref and not left else "BELOW TARGET", rate / ref,
             rate / min(ref_before, ref_after), rate / max(ref_before, ref_after)))


def main() -> int:
    args = parse_args()
    for tool in (SINK, SOURCE):
        if not os.access(tool, os.X_OK):
            raise SystemExit("%s is missing (install postfix)" % tool)

    work = tempfile.mkdtemp(prefix="odmrd-bench-drain-")
    os.chmod(work, 0o755)
    sink = server = None
    try:
        server = Server(work)
        sink_port = free_port()
        sink = start_sink(work, sink_port)
        ref_before = reference_rate(sink_port, args.reference_messages, args.size)
        server.add_user("alice", ["example.org"])
        t0 = time.monotonic()
        fill_spool(server.spool_dir, "example.org", args.messages, args.size)
        print("spooled %d messages of %d bytes in %.1f s" % (args.messages, args.size, time.monotonic() - t0))
        server.start()
        elapsed = atrn_drain(server.odmr_port, sink_port, "example.org")
        ref_after = reference_rate(sink_port, args.reference_messages, args.size)
        left = [n for n in os.listdir(os.path.join(server.spool_dir, "example.org")) if len(n) > 13 and "." not in n]
        report(ref_before, ref_after, args.messages, elapsed, len(left))
        return 0
    finally:
        if server is not None:
            server.stop()
        stop_process(sink, 10)
        if args.keep:
            print("work directory kept:", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
