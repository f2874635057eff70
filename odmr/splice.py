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
local server's last reply was 221).
"""
from __future__ import annotations

import selectors
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

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
    l.out += leftover
    for side in (p, l):
        _nodelay(side.sock)
        side.sock.setblocking(False)
    sel = selectors.DefaultSelector()
    registered = {}
    deadline_reason = ""
    last_activity = time.monotonic()
    linger_from: Optional[float] = None
    try:
        while True:
            if _finished(p, l):
                break
            if linger_from is None and (_ended(p, l) or _ended(l, p)):
                linger_from = time.monotonic()
            # Data OpenSSL holds already decrypted: read it before sleeping.
            ready_now = [s for s in (p, l) if s.tls and s.reading and _may_read(s, l if s is p else p)
                         and _pending(s)]
            for side in (p, l):
                other = l if side is p else p
                events = 0
                if side.reading and _may_read(side, other):
                    events |= selectors.EVENT_READ
                if side.out and side.writing:
                    events |= selectors.EVENT_WRITE
                _register(sel, registered, side, events)
            now = time.monotonic()
            limit = last_activity + idle_timeout
            if linger_from is not None:
                limit = min(limit, linger_from + LINGER)
            if now >= limit:
                deadline_reason = "timeout"
                break
            if not registered and not ready_now:
                deadline_reason = "stalled"
                break
            timeout = 0 if ready_now else limit - now
            events = sel.select(timeout) if registered else []
            if not events and not ready_now:
                if time.monotonic() >= limit:
                    deadline_reason = "timeout"
                    break
                continue
            last_activity = time.monotonic()
            sides = {id(key.data): (key.data, mask) for key, mask in events}
            for side in ready_now:
                sides.setdefault(id(side), (side, selectors.EVENT_READ))
            for side, mask in sides.values():
                other = l if side is p else p
                if mask & selectors.EVENT_WRITE:
                    _flush(side)
                if mask & selectors.EVENT_READ:
                    _read(side, other)
                    if other.out and other.writing:
                        _flush(other)       # forward at once: one wakeup per hop
            for side in (p, l):
                other = l if side is p else p
                if not other.reading and not side.out and side.writing:
                    _half_close(side)
                if not side.writing:
                    side.out.clear()
    finally:
        sel.close()
    clean = _last_line(p.tail).upper() == b"QUIT" and _last_line(l.tail)[:3] == b"221"
    reason = deadline_reason or p.error or l.error or "closed"
    if progress:
        progress("splice ended (%s): %d bytes from provider, %d from local server"
                 % (reason, p.count, l.count))
    return SpliceResult(clean=clean, reason=reason, from_provider=p.count, from_local=l.count)


def _may_read(side: _Side, other: _Side) -> bool:
    return len(other.out) < HIGH_WATER


def _pending(side: _Side) -> bool:
    try:
        return side.sock.pending() > 0
    except (OSError, ValueError):
        return False


def _ended(a: _Side, b: _Side) -> bool:
    """Direction a -> b is over: a sent EOF and b has everything."""
    return not a.reading and (not b.out or not b.writing)


def _finished(p: _Side, l: _Side) -> bool:
    return _ended(p, l) and _ended(l, p)


def _register(sel, registered, side: _Side, events: int) -> None:
    key = registered.get(id(side))
    if events == 0:
        if key is not None:
            sel.unregister(side.sock)
            del registered[id(side)]
        return
    if key is None:
        registered[id(side)] = sel.register(side.sock, events, side)
    elif key.events != events:
        registered[id(side)] = sel.modify(side.sock, events, side)


def _read(side: _Side, other: _Side) -> None:
    while side.reading and len(other.out) < HIGH_WATER:
        try:
            data = side.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (OSError, ValueError) as exc:
            side.reading = False
            side.error = "%s: %s" % (side.name, exc)
            return
        if not data:
            side.reading = False
            return
        side.count += len(data)
        side.tail = (side.tail + data)[-TAIL:]
        if other.writing:
            other.out += data
        if not side.tls or not _pending(side):
            return


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
        return          # TLS has no half-close; the connection is closed at the end
    try:
        side.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def close_quietly(socks: List[socket.socket]) -> None:
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass
