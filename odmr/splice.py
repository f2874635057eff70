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
local server's last reply was 221), and the local server's replies are
counted by class: a 4xx means mail stayed at the provider, which the caller
reports as "try again later".
"""
from __future__ import annotations

import selectors
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Optional

CHUNK = 256 * 1024
HIGH_WATER = 4 * 1024 * 1024    # stop reading a side while this much waits for the other
TAIL = 512
IDLE_TIMEOUT = 660.0            # the provider may wait 10 minutes for the reply to the final "."
LINGER = 30.0                   # once one direction has ended, how long the other may take


@dataclass
class SpliceResult:
    clean: bool                 # provider said QUIT and the local server said 221
    reason: str                 # how it ended, for the log
    from_provider: int          # bytes
    from_local: int
    local_4xx: int = 0          # final reply lines of the local server, by class
    local_5xx: int = 0


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
        self.head = b""                 # first bytes of the line being received
        self.replies = {b"4": 0, b"5": 0}

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


def splice(provider: socket.socket, local: socket.socket, leftover: bytes = b"",
           idle_timeout: float = IDLE_TIMEOUT,
           progress: Optional[Callable[[str], None]] = None) -> SpliceResult:
    """Move bytes until both directions have ended; never raises for network trouble."""
    p = _Side("provider", provider)
    l = _Side("local", local)
    p.other, l.other = l, p
    sides = (p, l)
    tls_sides = [side for side in sides if side.tls]
    l.out += leftover
    for side in sides:
        _nodelay(side.sock)
        side.sock.setblocking(False)
    sel = selectors.DefaultSelector()
    deadline_reason = ""
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
                deadline_reason = "timeout"
                break
            # Data OpenSSL holds already decrypted is invisible to the selector: take it first.
            ready = [s for s in tls_sides if s.reading and _may_read(s) and _pending(s)]
            if not ready and not (p.events or l.events):
                deadline_reason = "stalled"
                break
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
    clean = _last_line(p.tail).upper() == b"QUIT" and _last_line(l.tail)[:3] == b"221"
    reason = deadline_reason or p.error or l.error or "closed"
    if progress:
        progress("splice ended (%s): %d bytes from provider, %d from local server"
                 % (reason, p.count, l.count))
    return SpliceResult(clean=clean, reason=reason, from_provider=p.count, from_local=l.count,
                        local_4xx=l.replies[b"4"], local_5xx=l.replies[b"5"])


def _count_replies(side: _Side, data: bytes) -> None:
    """Count final reply lines ("ddd " or "ddd<CRLF>", not "ddd-") by their first digit."""
    lines = data.split(b"\n")
    for line in lines[:-1]:
        head = (side.head + line[:4])[:4]
        side.head = b""
        if head[:3].isdigit() and head[3:4] != b"-" and head[:1] in side.replies:
            side.replies[head[:1]] += 1
    side.head = (side.head + lines[-1][:4])[:4]


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
            data = side.sock.recv(CHUNK)
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
        if side.name == "local":
            _count_replies(side, data)
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

