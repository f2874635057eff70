"""Mail loop detection (RFC 5321 §6.3): the Received: fields of a message's header.

In ODMR a loop is easy to build by mistake: a customer MTA that relays its own
domain back to the provider's MX sends every message round again at each ATRN.
Two limits catch it while the text streams in (only the header is looked at):
all Received: fields (`[smtp] max_received_headers`, like Exim's 30), and the
ones this provider wrote itself (`by <hostname> (odmrd`), a few of which already
mean the message keeps coming back here.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Optional

from odmr import replies
from odmr.replies import Reply

MAX_OWN_HOPS = 3                    # our own Received: fields a message may already carry
_MAX_LINE = 4096                    # of a header line kept for looking at
_MAX_HEADER = 1024 * 1024           # beyond this the header is not read further
_RECEIVED = re.compile(rb"received[ \t]*:", re.IGNORECASE)
_LINES_AT_ONCE = 32
_MAY_MATTER = b"Rr \t\r"          # first octets of a Received: line, a continuation, an empty line
_FOR = re.compile(rb" for <[^<>]*@([^<>@ ]+)>")


class TooManyHops(Exception):
    """The message has passed too many hosts, or this one too often: a mail loop."""

    def __init__(self, reply: Reply):
        super().__init__(reply[1])          # str(): the reply's text
        self.reply = reply


class HopCount:
    """Counts the Received: fields of a header fed in pieces of any size.

    Our own fields count for the message's `domains` only: one whose `for` clause
    names another domain is another delivery (a list at one customer sending to
    subscribers at another is no loop); one without `for` (several recipients)
    counts for every domain."""

    def __init__(self, hostname: str, max_received: int, max_own: int = MAX_OWN_HOPS,
                 domains: Iterable[str] = ()):
        self.max_received = max_received
        self.max_own = max_own
        self.domains = {d.lower() for d in domains}
        self.received = 0
        self.own = 0
        self.done = False
        self._marker = ("by %s (odmrd" % hostname.lower()).encode("utf-8", "replace")
        self._line = b""                # the start of the line being read (what fits)
        self._field: Optional[bytes] = None     # the Received: field being read
        self._seen = 0

    def feed(self, piece: bytes) -> None:
        """Look at the next piece of the text; stops looking after the header."""
        if self.done:
            return
        self._seen += len(piece)
        blank = piece.find(b"\n\r\n")      # the empty line (the text is CRLF by now)
        if blank >= 0:
            piece = piece[:blank + 3]       # the body is never split up nor copied
        while piece and not self.done:
            lines = piece.split(b"\n", _LINES_AT_ONCE)        # the body is not split up
            piece = b""
            if len(lines) > _LINES_AT_ONCE:
                piece = lines.pop()         # the rest, from a line's start
                lines.append(b"")
            self._take_lines(lines)
        if self._seen > _MAX_HEADER:
            self._finish()

    def _take_lines(self, lines: List[bytes]) -> None:
        """`lines`: each but the last ended by a line break; the last is a line begun."""
        partial = lines.pop()
        for line in lines:
            if self._line:
                line, self._line = self._line + line, b""
            elif self._field is None and line[:1] not in _MAY_MATTER:
                continue        # another field's line: nothing to count, nothing to end
            self._line_ended(line[:_MAX_LINE])
            if self.done:
                return
        self._keep(partial)

    def verdict(self) -> Optional[Reply]:
        """Why the message is refused (the reply), or None."""
        if self.received > self.max_received:
            code, text = replies.TOO_MANY_HOPS
            return code, text % (self.received, self.max_received)
        if self.own >= self.max_own:
            code, text = replies.MAIL_LOOP
            return code, text % self.own
        return None

    def _keep(self, data: bytes) -> None:
        room = _MAX_LINE - len(self._line)
        if room > 0:
            self._line += data[:room]

    def _line_ended(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t") and line.strip():
            if self._field is not None:
                self._field += b" " + line.strip()
            return
        self._field_ended()
        if not line:
            self._finish()
        elif _RECEIVED.match(line):
            self.received += 1
            self._field = line

    def _field_ended(self) -> None:
        if self._field is not None:
            words = b" ".join(self._field.lower().split())
            if self._marker in words and self._for_us(words):
                self.own += 1
            self._field = None

    def _for_us(self, words: bytes) -> bool:
        named = _FOR.search(words)
        if named is None or not self.domains:
            return True
        return named.group(1).decode("utf-8", "replace").rstrip(".") in self.domains

    def _finish(self) -> None:
        self._field_ended()
        self.done = True
