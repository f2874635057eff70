"""Copy bytes both ways between the reversed provider connection and a local SMTP server.

This is the "external ODMR support" pattern: after ATRN the local server
greets, the provider drives, and we only move bytes. One thread, non-blocking
sockets and a selector; large reads, whole-buffer writes, TCP_NODELAY on both
sockets (so a final "." never waits for a delayed ACK), back-pressure when
one side reads slower than the other writes, half-close passed through.

TLS sockets work too: data OpenSSL has already decrypted (`pending()`) is
read before the selector is asked again, or it would sit there unnoticed.

Only the last bytes of each direction are kept, to tell afterwards whether
the session ended cleanly (the provider's last command was QUIT and the
local server's last reply was 221). On the way the provider's commands are
followed (MAIL, RCPT, DATA and where its data ends, BDAT chunks; it may
pipeline them) and each of the local server's replies is matched to the
command it answers, in order, so that the run can be reported in messages
and recipients (`odmr.fetch_tally`), not in reply lines.
"""
from __future__ import annotations

import selectors
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Deque, Optional, Tuple

from odmr.fetch_tally import DATA, END, GREETING, Tally

SPLICE_READ_SIZE = 256 * 1024  # bytes per read of either side of the splice
HIGH_WATER = 4 * 1024 * 1024    # stop reading a side while this much waits for the other
TAIL = 512
IDLE_TIMEOUT = 660.0            # the provider may wait 10 minutes for the reply to the final "."
LINGER = 30.0                   # once one direction has ended, how long the other may take
KEEP = 200                      # bytes of a command or reply line kept for following the session
HELD_MAX = 1024 * 1024          # provider bytes held while its DATA awaits the reply


@dataclass
class SpliceResult:
    clean: bool                 # provider said QUIT and the local server said 221
    reason: str                 # how it ended, for the log
    from_provider: int          # bytes
    from_local: int
    tally: Tally = field(default_factory=Tally)   # messages and recipients, by outcome


class _Side:
    def __init__(self, name: str, sock: socket.socket):
        self.name = name
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.out = bytearray()          # bytes waiting to be written to this side
        self.reading = True             # False after EOF or error from this side
        self.writing = True             # False after we half-closed it or it failed
        self.tail = b""
        self.count = 0
        self.error = ""
        self.events = 0                 # what the selector watches for now
        self.other: "_Side" = self
        self.follow: Callable[[bytes], None] = lambda data: None

    def fileno(self) -> int:
        return self.sock.fileno()


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _last_line(tail: bytes) -> bytes:
    lines = tail.rstrip(b"\r\n").rsplit(b"\n", 1)
    return lines[-1].lstrip(b"\r") if lines else b""


def splice(provider: socket.socket, local: socket.socket, reader: Optional[BinaryIO] = None,
           idle_timeout: float = IDLE_TIMEOUT,
           progress: Optional[Callable[[str], None]] = None) -> SpliceResult:
    """Move bytes until both directions have ended, first what `reader` (the ATRN
    negotiation's Turnaround.file, the provider's side) already holds; never raises
    for network trouble."""
    follower = _Follower()
    p, l = _pair(provider, local, follower)
    held = _held_by(reader)
    follower.from_provider(held)
    l.out += held
    deadline_reason = _pump(p, l, idle_timeout)
    clean = _last_line(p.tail).upper() == b"QUIT" and _last_line(l.tail)[:3] == b"221"
    reason = deadline_reason or p.error or l.error or "closed"
    if progress:
        progress("splice ended (%s): %d bytes from provider, %d from local server"
                 % (reason, p.count, l.count))
    return SpliceResult(clean=clean, reason=reason, from_provider=p.count, from_local=l.count,
                        tally=follower.tally)


def _held_by(reader: Optional[BinaryIO]) -> bytes:
    """What the provider sent that the reader has read already (the selector will
    never report it). The socket is non-blocking by now: when the reader holds
    nothing, one read takes what is ready, or fails at once and is left to the loop."""
    if reader is None:
        return b""
    try:
        return reader.read1(SPLICE_READ_SIZE) or b""
    except (OSError, ValueError):
        return b""


def _pair(provider: socket.socket, local: socket.socket, follower: "_Follower") -> Tuple[_Side, _Side]:
    """The two sides, each the other's destination and followed by `follower`,
    made non-blocking with TCP_NODELAY."""
    p = _Side("provider", provider)
    l = _Side("local", local)
    p.other, l.other = l, p
    p.follow, l.follow = follower.from_provider, follower.from_local
    for side in (p, l):
        _nodelay(side.sock)
        side.sock.setblocking(False)
    return p, l


def _pump(p: _Side, l: _Side, idle_timeout: float) -> str:
    """The selector loop: "" once both directions have ended, else why it gave up
    ("timeout": idle or lingering too long; "stalled": nothing left to wait for)."""
    sides = (p, l)
    tls_sides = [side for side in sides if side.tls]
    sel = selectors.DefaultSelector()
    last_activity = time.monotonic()
    linger_from: Optional[float] = None
    try:
        for side in sides:
            _update(sel, side)
        while not (_ended(p, l) and _ended(l, p)):
            now = time.monotonic()
            if linger_from is None and (_ended(p, l) or _ended(l, p)):
                linger_from = now
            limit = last_activity + idle_timeout
            if linger_from is not None:
                limit = min(limit, linger_from + LINGER)
            if now >= limit:
                return "timeout"
            # Data OpenSSL holds already decrypted is invisible to the selector: take it first.
            ready = [s for s in tls_sides if s.reading and _may_read(s) and _pending(s)]
            if not ready and not (p.events or l.events):
                return "stalled"
            events = sel.select(0 if ready else limit - now)
            if events or ready:
                last_activity = now
            for key, mask in events:
                side = key.data
                if mask & selectors.EVENT_WRITE:
                    _flush(side)
                if mask & selectors.EVENT_READ and side not in ready:
                    _read(side)
            for side in ready:
                _read(side)
            for side in sides:
                _update(sel, side)
    finally:
        sel.close()
    return ""


class _Follower:
    """The provider's commands and the local server's replies, matched in order.

    Only bytes that were read anyway pass through here; at most a line's
    first KEEP bytes are copied. Message data is skipped by searching for its
    end (CRLF.CRLF; it is dot-stuffed, so that is the end) or counting a BDAT
    chunk. The provider must wait for the reply to DATA before its data: what
    it sends meanwhile is held until that reply says whether it is data."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.owed: Deque[str] = deque([GREETING])   # what each next reply answers
        self.mode = "commands"      # commands | held (DATA awaits its reply) | data | chunk
        self.line = b""             # start of the provider's unfinished command line
        self.tail = b""             # data: its last bytes, to find CRLF.CRLF across reads
        self.chunk_left = 0         # BDAT: bytes of the chunk still to come
        self.held = bytearray()
        self.reply_line = b""       # start of the local server's unfinished reply line

    def from_provider(self, data: bytes) -> None:
        start = 0
        while start < len(data):
            if self.mode == "commands":
                start = self._command(data, start)
            elif self.mode == "data":
                start = self._data(data, start)
            elif self.mode == "chunk":
                take = min(self.chunk_left, len(data) - start)
                self.chunk_left -= take
                start += take
                if not self.chunk_left:
                    self.mode = "commands"
            else:
                self.held += data[start:]
                if len(self.held) > HELD_MAX:       # it did not wait: that must be data
                    self._data_reply(354)
                return

    def _command(self, data: bytes, start: int) -> int:
        end = data.find(b"\n", start)
        if end < 0:
            self.line = (self.line + data[start:start + KEEP])[:KEEP]
            return len(data)
        line = (self.line + data[start:min(end, start + KEEP)])[:KEEP]
        self.line = b""
        words = line.split()
        verb = words[0].upper().decode("ascii", "replace") if words else ""
        if verb == "BDAT" and len(words) > 1 and words[1].isdigit():
            self.owed.append(END if len(words) > 2 and words[2].upper() == b"LAST" else "BDAT")
            self.chunk_left = int(words[1])
            self.mode = "chunk" if self.chunk_left else "commands"
        else:
            self.owed.append(verb)
            if verb == DATA:
                self.mode = "held"
        return end + 1

    def _data(self, data: bytes, start: int) -> int:
        edge = self.tail + data[start:start + 4]
        found = edge.find(b"\r\n.\r\n")
        if found >= 0:
            end = start + found + 5 - len(self.tail)
        else:
            found = data.find(b"\r\n.\r\n", start)
            if found < 0:
                self.tail = edge[-4:] if len(data) - start < 4 else data[-4:]
                return len(data)
            end = found + 5
        self.owed.append(END)
        self.mode, self.tail = "commands", b""
        return end

    def _data_reply(self, code: int) -> None:
        held, self.held = bytes(self.held), bytearray()
        self.mode = "data" if code == 354 else "commands"
        self.tail = b"\r\n"                 # the DATA line's own CRLF: "." at once is an empty message
        self.from_provider(held)

    def from_local(self, data: bytes) -> None:
        lines = data.split(b"\n")
        for piece in lines[:-1]:
            line = (self.reply_line + piece[:KEEP])[:KEEP].rstrip(b"\r")
            self.reply_line = b""
            self._reply(line)
        self.reply_line = (self.reply_line + lines[-1][:KEEP])[:KEEP]

    def _reply(self, line: bytes) -> None:
        """A final reply line ("250 ok", "250"; not "250-") answers the oldest command."""
        if not (line[:3].isdigit() and line[3:4] in (b" ", b"")):
            return
        what = self.owed.popleft() if self.owed else ""     # nobody asked: a 421 at a timeout
        code = int(line[:3])
        self.tally.reply(DATA if what == "BDAT" else what, code, line.decode("utf-8", "replace"))
        if what == DATA and self.mode == "held":
            self._data_reply(code)


def _may_read(side: _Side) -> bool:
    return len(side.other.out) < HIGH_WATER


def _pending(side: _Side) -> bool:
    try:
        return side.sock.pending() > 0
    except (OSError, ValueError):
        return False


def _ended(a: _Side, b: _Side) -> bool:
    """Direction a -> b is over: a sent EOF and b has everything."""
    return not a.reading and (not b.out or not b.writing)


def _update(sel: selectors.BaseSelector, side: _Side) -> None:
    """Pass on a half-close, then ask the selector for exactly what this side needs now."""
    if not side.other.reading and not side.out and side.writing:
        _half_close(side)
    if not side.writing:
        side.out.clear()
    want = 0
    if side.reading and _may_read(side):
        want |= selectors.EVENT_READ
    if side.out and side.writing:
        want |= selectors.EVENT_WRITE
    if want == side.events:
        return
    if not side.events:
        sel.register(side.sock, want, side)
    elif not want:
        sel.unregister(side.sock)
    else:
        sel.modify(side.sock, want, side)
    side.events = want


def _read(side: _Side) -> None:
    """Read what is there and forward it at once (one wakeup per hop)."""
    other = side.other
    while side.reading and len(other.out) < HIGH_WATER:
        try:
            data = side.sock.recv(SPLICE_READ_SIZE)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            break
        except (OSError, ValueError) as exc:
            side.reading = False
            side.error = "%s: %s" % (side.name, exc)
            break
        if not data:
            side.reading = False
            break
        side.count += len(data)
        side.tail = (side.tail + data)[-TAIL:]
        side.follow(data)
        if other.writing:
            other.out += data
        if not side.tls or not _pending(side):
            break
    if other.out:
        _flush(other)


def _flush(side: _Side) -> None:
    while side.out and side.writing:
        try:
            sent = side.sock.send(side.out)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        except (OSError, ValueError) as exc:
            side.writing = False
            side.reading = False
            side.error = side.error or "%s: %s" % (side.name, exc)
            side.out.clear()
            return
        del side.out[:sent]


def _half_close(side: _Side) -> None:
    """The other direction is over: tell this side we will write no more."""
    side.writing = False
    if side.tls:
        # TLS has no half-close: this side would never learn that the other one is
        # gone, and could only time out. Nothing it sends now could be passed on
        # either, so stop listening and let the connection be closed at once.
        side.reading = False
        return
    try:
        side.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass

