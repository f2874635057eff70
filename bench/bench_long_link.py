#!/usr/bin/env python3
"""ATRN drain over a long link (SPEC section 9): round trips per message by RTT and delivery window.

For each RTT (default 0, 20 and 80 ms) and each `[odmr] delivery_window`
(default 1, 8 and 32): a fresh `odmrd serve -f` with a backlog of 10 KB
messages for example.org, a delaying proxy (bench/delay_proxy.py, its own
process: D = RTT/2 each way) in front of its ODMR port, and a customer that
logs in through the proxy (EHLO, AUTH CRAM-MD5, ATRN) and then serves SMTP on
the reversed connection offering PIPELINING, CHUNKING, 8BITMIME and SIZE.
The customer answers each read of pipelined commands with one write
(RFC 2920) and never waits on a disk, so the link is the only thing it adds.

Prints, per run: msgs/s and round trips per message (seconds from ATRN's 250 to
the provider's QUIT / RTT / messages) beside the same RTT's window-1 figure,
and whether every message arrived exactly once (Message-ID counted, spool empty).
Reference: <= 0.1 round trips per message at RTT 20 ms with window 32; odmrd
before the window 1.1; Exim 4.99 4.5.

The backlog is --messages (200), but capped per RTT so that a window-1 run at
today's ~1.1 round trips per message lasts about --budget seconds (10): at
80 ms that is 100 messages. --budget 0 removes the cap.

Usage: python3 bench/bench_long_link.py [--messages 200] [--rtt 0,20,80]
       [--windows 1,8,32] [--size 10240] [--budget 10] [--keep]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from common import PASSWORD, ROOT, Server, cram_md5_response, free_port, workdir  # noqa: E402
from odmr.spool import Envelope, Recipient, new_id  # noqa: E402

DOMAIN = "example.org"
TARGET_RT = 0.1          # SPEC section 9: RTT 20 ms, delivery_window = 32
BEFORE_RT = 1.1          # odmrd before CHUNKING and the window
EXIM_RT = 4.5            # Exim 4.99 ATRN over the same proxy
SILENCE = 30.0           # seconds without a byte from the provider: the run failed
MESSAGE_ID = re.compile(rb"^Message-ID: <bench-(\d+)@sender\.test>\r?$", re.M | re.I)


# -- the backlog ------------------------------------------------------------------
def message_text(n: int, size: int) -> bytes:
    """A message of `size` bytes whose Message-ID carries its number."""
    head = (b"From: bench@sender.test\r\nTo: user@example.org\r\nMessage-ID: <bench-%d@sender.test>\r\n"
            b"Subject: long link %d\r\n\r\n" % (n, n))
    line = b"x" * 76 + b"\r\n"
    text = head + line * ((size - len(head)) // len(line) + 1)
    return text[:size - 2] + b"\r\n"


def queue_backlog(spool_dir: str, count: int, size: int) -> None:
    """Messages straight in the spool format, before the daemon starts (set-up, not measured)."""
    directory = os.path.join(spool_dir, DOMAIN)
    os.makedirs(os.path.join(directory, "tmp"), mode=0o700, exist_ok=True)
    for n in range(count):
        msg_id = new_id()
        env = Envelope(sender="bench@sender.test", recipients=[Recipient("user@%s" % DOMAIN)])
        with open(os.path.join(directory, msg_id), "wb") as fh:
            fh.write(env.header_bytes(msg_id))
            fh.write(message_text(n, size))
    os.sync()


def left_in_spool(spool_dir: str) -> int:
    directory = os.path.join(spool_dir, DOMAIN)
    return sum(1 for name in os.listdir(directory)
               if 13 < len(name) <= 40 and all(c in "0123456789abcdef" for c in name))


# -- the delaying proxy -----------------------------------------------------------
class DelayProxy:
    """bench/delay_proxy.py in its own process, in front of one port."""

    def __init__(self, target_port: int, rtt_ms: float):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "bench", "delay_proxy.py"), "--listen", str(self.port),
             "--to", str(target_port), "--delay-ms", str(rtt_ms / 2.0)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError("the delaying proxy did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- the customer -----------------------------------------------------------------
class LineReader:
    """Replies from a socket; whatever was read past them stays in `buffer`."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def reply(self) -> Tuple[int, List[str]]:
        lines = []
        while True:
            while b"\n" not in self.buffer:
                data = self.sock.recv(4096)
                if not data:
                    raise RuntimeError("provider closed the connection before the turnaround")
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\n", 1)
            text = line.decode("utf-8", "replace").rstrip("\r")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines


def atrn(sock: socket.socket, user: str, password: str) -> bytes:
    """EHLO, AUTH CRAM-MD5, ATRN; return what arrived after ATRN's 250 (normally nothing)."""
    r = LineReader(sock)

    def expect(code: int, what: str) -> List[str]:
        got, lines = r.reply()
        if got != code:
            raise RuntimeError("%s: expected %d, got %d %s" % (what, code, got, " / ".join(lines)))
        return lines

    expect(220, "greeting")
    sock.sendall(b"EHLO customer.bench\r\n")
    expect(250, "EHLO")
    sock.sendall(b"AUTH CRAM-MD5\r\n")
    challenge = expect(334, "AUTH")[0]
    sock.sendall(cram_md5_response(user, password, challenge).encode() + b"\r\n")
    expect(235, "AUTH response")
    sock.sendall(("ATRN %s\r\n" % DOMAIN).encode())
    expect(250, "ATRN")
    return r.buffer


@dataclass
class Received:
    counts: Counter = field(default_factory=Counter)   # Message-ID number -> deliveries
    anonymous: int = 0                                  # messages without a bench Message-ID
    quit_at: Optional[float] = None                     # when the provider's QUIT arrived


class Customer:
    """The customer's SMTP server on the reversed connection.

    One thread, blocking reads: every complete command in a read is answered,
    and all the answers go out in one write before the next read (RFC 2920)."""

    EHLO = (b"250-customer.bench\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n"
            b"250 SIZE 104857600\r\n")

    def __init__(self, sock: socket.socket, pending: bytes):
        self.sock = sock
        self.buf = bytearray(pending)
        self.out: List[bytes] = []
        self.got = Received()
        self.mail = False
        self.rcpts = 0
        self.in_data = False
        self.scan = 0                      # where to resume looking for the end of DATA
        self.bdat_left = 0                 # octets of the current BDAT chunk still to come
        self.bdat_last = False
        self.chunks: List[bytes] = []
        self.done = False

    def run(self) -> Received:
        self.sock.settimeout(SILENCE)
        self.sock.sendall(b"220 customer.bench ESMTP bench\r\n")
        while not self.done:
            self._consume()
            if self.out:
                self.sock.sendall(b"".join(self.out))
                self.out = []
            if self.done:
                break
            data = self.sock.recv(1 << 18)
            if not data:
                break
            self.buf += data
        return self.got

    def _consume(self) -> None:
        """Act on everything complete in the buffer; leave a partial line or chunk there."""
        while not self.done:
            if self.bdat_left:
                if not self._bdat_data():
                    return
            elif self.in_data:
                if not self._data_text():
                    return
            else:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                self._command(line)

    def _command(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if verb == b"EHLO":
            self._reset()
            self.out.append(self.EHLO)
        elif verb in (b"HELO", b"NOOP"):
            self.out.append(b"250 customer.bench\r\n")
        elif verb == b"MAIL":
            self._reset()
            self.mail = True
            self.out.append(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            if not self.mail:
                self.out.append(b"503 5.5.1 MAIL first\r\n")
                return
            self.rcpts += 1
            self.out.append(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            if not self.rcpts:
                self.out.append(b"554 5.5.1 No valid recipients\r\n")
                return
            self.in_data, self.scan = True, 0
            self.out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"BDAT":
            self._bdat_command(arg)
        elif verb == b"RSET":
            self._reset()
            self.out.append(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            self.got.quit_at = time.monotonic()
            self.out.append(b"221 2.0.0 Bye\r\n")
            self.done = True
        else:
            self.out.append(b"500 5.5.2 Unknown command\r\n")

    def _reset(self) -> None:
        self.mail, self.rcpts, self.chunks = False, 0, []

    def _bdat_command(self, arg: bytes) -> None:
        parts = arg.split()
        if not parts or not parts[0].isdigit() or len(parts) > 2 or (len(parts) == 2 and parts[1].upper() != b"LAST"):
            self.out.append(b"501 5.5.4 Syntax: BDAT size [LAST]\r\n")
            return
        self.bdat_left, self.bdat_last = int(parts[0]), len(parts) == 2
        if self.bdat_left == 0:
            self._bdat_chunk_done()

    def _bdat_data(self) -> bool:
        """Take the current chunk's octets; False while some are still to come."""
        take = min(self.bdat_left, len(self.buf))
        if take:
            self.chunks.append(bytes(self.buf[:take]))
            del self.buf[:take]
            self.bdat_left -= take
        if self.bdat_left:
            return False
        self._bdat_chunk_done()
        return True

    def _bdat_chunk_done(self) -> None:
        if not self.rcpts:                          # RFC 3030: the chunk is read, then refused
            self.chunks = []
            self.out.append(b"503 5.5.1 No valid recipients\r\n")
            return
        if not self.bdat_last:
            self.out.append(b"250 2.0.0 %d octets received\r\n" % sum(map(len, self.chunks)))
            return
        self._delivered(b"".join(self.chunks))
        self._reset()
        self.out.append(b"250 2.0.0 Ok: message accepted\r\n")

    def _data_text(self) -> bool:
        """Look for the end of DATA; False while it has not arrived."""
        if self.buf.startswith(b".\r\n"):
            end, text = 3, b""
        else:
            at = self.buf.find(b"\r\n.\r\n", max(self.scan - 4, 0))
            if at < 0:
                self.scan = len(self.buf)
                return False
            end, text = at + 5, bytes(self.buf[:at + 2])
        del self.buf[:end]
        self.in_data = False
        self._delivered(text)             # dot-stuffing does not touch the headers looked at
        self._reset()
        self.out.append(b"250 2.0.0 Ok: message accepted\r\n")
        return True

    def _delivered(self, text: bytes) -> None:
        head = text[:4096]
        found = MESSAGE_ID.search(head)
        if found is None:
            self.got.anonymous += 1
        else:
            self.got.counts[int(found.group(1))] += 1


# -- one run ------------------------------------------------------------------------
@dataclass
class Run:
    rtt_ms: float
    window: int
    messages: int
    seconds: float = 0.0
    once: bool = False
    note: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def round_trips(self) -> Optional[float]:
        if not self.rtt_ms or not self.seconds:
            return None
        return self.seconds / (self.rtt_ms / 1000.0) / self.messages


def drain(proxy_port: int) -> Tuple[float, Received]:
    """Log in through the proxy, ATRN, serve the reversed connection; seconds from ATRN's 250 to QUIT."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=SILENCE)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = atrn(sock, "alice", PASSWORD)
        start = time.monotonic()
        got = Customer(sock, pending).run()
    finally:
        sock.close()
    if got.quit_at is None:
        raise RuntimeError("the provider went away without QUIT")
    return got.quit_at - start, got


def run_once(base: str, run: Run, size: int, keep: bool) -> Run:
    """A fresh daemon with the window, the backlog, the proxy; one drain; the checks."""
    directory = os.path.join(base, "rtt%g-w%d" % (run.rtt_ms, run.window))
    os.makedirs(directory)
    server = Server(directory, odmr_extra="delivery_window = %d" % run.window)
    server.add_user("alice", [DOMAIN])
    queue_backlog(server.spool_dir, run.messages, size)
    proxy = None
    try:
        server.start()
        proxy = DelayProxy(server.odmr_port, run.rtt_ms)
        run.seconds, got = drain(proxy.port)
        server.stop()                      # whatever it still had to retire is done when it exits
        left = left_in_spool(server.spool_dir)
        wrong = {n: c for n, c in got.counts.items() if c != 1 or not 0 <= n < run.messages}
        missing = run.messages - sum(1 for n in range(run.messages) if got.counts.get(n))
        run.once = not (wrong or missing or left or got.anonymous)
        if not run.once:
            run.note = "%d missing, %d duplicated or unknown, %d without id, %d left in the spool" % (
                missing, len(wrong), got.anonymous, left)
    except (OSError, RuntimeError) as exc:
        run.note = "failed: %s (log: %s)" % (exc, server.log_path)
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
        if not keep and not run.note.startswith("failed"):
            shutil.rmtree(directory, ignore_errors=True)
    return run


# -- the report -----------------------------------------------------------------------
def backlog_for(rtt_ms: float, messages: int, budget: float) -> int:
    """--messages, or fewer where a window-1 run at ~1.1 round trips each would outlast the budget."""
    if not rtt_ms or not budget:
        return messages
    fits = int(budget / (1.2 * rtt_ms / 1000.0)) // 10 * 10
    return max(10, min(messages, fits))


def fmt_rt(value: Optional[float]) -> str:
    return "-" if value is None else "%.3f" % value


def report(runs: List[Run]) -> None:
    print()
    print("%7s %7s %9s %9s %9s %9s %16s  %s"
          % ("RTT", "window", "messages", "seconds", "msgs/s", "RT/msg", "window-1 RT/msg", "exactly once"))
    for run in runs:
        base = next((r for r in runs if r.rtt_ms == run.rtt_ms and r.window == 1 and r.seconds), None)
        beside = fmt_rt(base.round_trips) if base is not None else "-"
        if base is not None and base is not run and run.seconds and base.rate:
            beside += " (%.1fx)" % (run.rate / base.rate)
        print("%4g ms %7d %9d %9.2f %9.0f %9s %16s  %s%s"
              % (run.rtt_ms, run.window, run.messages, run.seconds, run.rate, fmt_rt(run.round_trips),
                 beside, "yes" if run.once else "no", "  (%s)" % run.note if run.note else ""))
    print()
    print("reference (SPEC section 9): RTT 20 ms, delivery_window 32: <= %.1f round trips per message"
          " (>= 500 msgs/s);" % TARGET_RT)
    print("           odmrd before the window %.1f, Exim 4.99 %.1f" % (BEFORE_RT, EXIM_RT))
    for run in runs:
        if run.rtt_ms == 20 and run.window == 32 and run.round_trips is not None:
            print("this run:  RTT 20 ms, window 32: %.3f round trips per message (%s)"
                  % (run.round_trips, "target met" if run.round_trips <= TARGET_RT else "above target"))
    print("delivered exactly once: %s" % ("yes" if runs and all(r.once for r in runs) else "no"))


def numbers(text: str) -> List[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of numbers: %r" % text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200, help="backlog per run (default 200)")
    parser.add_argument("--rtt", type=numbers, default=[0, 20, 80], help="round trips in ms (0,20,80)")
    parser.add_argument("--windows", type=numbers, default=[1, 8, 32], help="delivery_window values (1,8,32)")
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes (10240)")
    parser.add_argument("--budget", type=float, default=10.0,
                        help="cap the backlog so a window-1 run lasts about this many seconds (0: no cap)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.messages < 1 or args.size < 200 or any(r < 0 for r in args.rtt) or any(w < 1 for w in args.windows):
        parser.error("--messages >= 1, --size >= 200, --rtt >= 0, --windows >= 1")

    work = workdir("odmrd-bench-long-link-")
    os.chmod(work, 0o755)
    runs: List[Run] = []
    try:
        for rtt in args.rtt:
            for window in args.windows:
                run = Run(rtt, int(window), backlog_for(rtt, args.messages, args.budget))
                print("RTT %g ms, window %d, %d messages ..." % (rtt, run.window, run.messages), flush=True)
                runs.append(run_once(work, run, args.size, args.keep))
        report(runs)
    finally:
        if args.keep or any(r.note.startswith("failed") for r in runs):
            print("work directory kept:", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.once for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
