"""The one way into the queue, like Postfix's cleanup: intake, `odmrd enqueue`, DSNs.

Whatever hands a message over keeps its own protocol at the edge (SMTP
replies, exit codes, its own checks); what the message becomes in the spool
is decided here once:

- recipients (already judged by `Runtime.classify_recipient`) are kept once
  per mailbox (`names.mailbox_key`), in the order given;
- a message for several domains becomes one copy per domain, each envelope
  with only that domain's recipients;
- each copy starts with its own trace header, made for its id and recipients;
- the text is streamed into every copy at once under a size limit, and the
  copies are committed together, durably, before anyone is told "queued".

This module knows no protocol: it never replies and never exits.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from odmr.hops import HopCount, TooManyHops
from odmr.names import mailbox_key
from odmr.spool import OUTBOUND, Envelope, IncomingMessage, Recipient, Spool, SpoolError

# (the copy's id, its recipients) -> the trace header that starts that copy
TraceHeader = Callable[[str, List[str]], bytes]


class TooBig(Exception):
    """The text went over the size limit; nothing of it was kept."""

    def __init__(self, limit: int):
        super().__init__("message exceeds the size limit of %d bytes" % limit)
        self.limit = limit


class OverQuota(Exception):
    """A domain's quota was reached while the text came in; nothing of it was kept."""

    def __init__(self, domain: str):
        super().__init__("domain %s is over quota" % domain)
        self.domain = domain


class Submission:
    """The envelope of one message on its way in: sender, options, recipients by domain."""

    def __init__(self, sender: str, smtputf8: bool = False, body: str = "",
                 ret: str = "", envid: str = ""):
        self.sender = sender
        self.smtputf8 = smtputf8
        self.body = body
        self.ret, self.envid = ret, envid          # DSN (RFC 3461), as the client gave them
        self.recipients: Dict[str, str] = {}       # address -> domain, in order
        self._dsn: Dict[str, Tuple[str, str]] = {}     # address -> (NOTIFY, ORCPT)
        self._mailboxes: Set[str] = set()          # mailbox_key() of each, against duplicates

    def add(self, address: str, domain: str, notify: str = "", orcpt: str = "") -> None:
        """Take an accepted recipient; the same mailbox twice is delivered once. It is
        spooled and delivered with the domain's A-label: a customer without SMTPUTF8 can
        take it, and no IDNA 2003 MTA downstream can map it onto another domain. (A bounce
        waiting for the relay keeps its address: OUTBOUND is a queue, not its domain.)"""
        key = mailbox_key(address, domain)
        if key not in self._mailboxes:
            self._mailboxes.add(key)
            stored = key if domain != OUTBOUND else address
            self.recipients[stored] = domain
            if notify or orcpt:
                self._dsn[stored] = (notify, orcpt)

    def by_domain(self) -> Dict[str, List[str]]:
        """{domain: [addresses]} in first-seen order: one spool copy each."""
        grouped: Dict[str, List[str]] = {}
        for address, domain in self.recipients.items():
            grouped.setdefault(domain, []).append(address)
        return grouped

    def envelopes(self, client: str, arrival: Optional[float] = None) -> Dict[str, Envelope]:
        """One envelope per domain, each naming only that domain's recipients."""
        now = time.time() if arrival is None else arrival
        return {domain: Envelope(sender=self.sender,
                                 recipients=[Recipient(a, *self._dsn.get(a, ("", ""))) for a in addresses],
                                 body=self.body, smtputf8=self.smtputf8, ret=self.ret, envid=self.envid,
                                 arrival=now, client=client)
                for domain, addresses in self.by_domain().items()}

    def start(self, spool: Spool, client: str, trace: Optional[TraceHeader] = None,
              limit: int = 0, hops: Optional[HopCount] = None) -> "Spooling":
        """Open one spool file per domain for the text that follows; `hops` refuses a
        message whose header says it is looping (TooManyHops from `commit`)."""
        return Spooling(spool, self.envelopes(client), self.by_domain(), trace, limit, hops)


class Spooling:
    """The text of one submitted message on its way to disk, into every copy at once.

    A storage error or the size limit (0: none) ends the keeping, not the
    reading: SMTP must still read DATA to its end before it may answer, while
    `enqueue` stops at once; so `write` never raises, and `failure` (also
    raised by `commit`) says what went wrong."""

    def __init__(self, spool: Spool, envelopes: Dict[str, Envelope], by_domain: Dict[str, List[str]],
                 trace: Optional[TraceHeader] = None, limit: int = 0,
                 hops: Optional[HopCount] = None):
        self.limit = limit
        self._hops = hops
        self.size = 0                              # of the text, as received
        self.failure: Optional[Exception] = None
        self.header_sizes: Dict[str, int] = {}
        self._by_domain = by_domain
        self._trace = trace
        self._incoming: Optional[IncomingMessage] = None
        self._last = b"\n"                         # the last byte written
        try:
            self._incoming = spool.begin(envelopes, self._prefix if trace is not None else None)
        except SpoolError as exc:
            self.failure = exc

    def _prefix(self, domain: str, msg_id: str) -> bytes:
        header = self._trace(msg_id, self._by_domain[domain])
        self.header_sizes[domain] = len(header)
        return header

    def write(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.failure is not None:
            return
        if self.limit and self.size > self.limit:
            self.failure = TooBig(self.limit)
            self._incoming.abort()
            return
        if self._hops is not None and not self._hops.done:
            self._hops.feed(piece)
            loop = self._hops.verdict()
            if loop:
                self.failure = TooManyHops(loop)
                self._incoming.abort()
                return
        try:
            self._incoming.write(piece)
        except SpoolError as exc:
            self.failure = exc
        self._last = piece[-1:] or self._last

    def end_line(self) -> None:
        """End the text with a line break if it does not (a pipe's input may not);
        the break is the spool's, not the sender's, so it does not count against the limit."""
        if self.failure is None and self._last != b"\n":
            try:
                self._incoming.write(b"\r\n")
            except SpoolError as exc:
                self.failure = exc

    def commit_within(self, spool: Spool, gated: List[str], room: Callable[[str, int], bool]
                      ) -> List[Tuple[str, str]]:
        """`commit`, with the quota of each `gated` domain checked afresh under its quota
        lock, held until the copies are in place. Raises OverQuota (nothing kept) too."""
        with contextlib.ExitStack() as held:
            for domain in sorted(gated):
                held.enter_context(spool.quota_lock(domain))
            for domain in gated:
                if self.failure is None and not room(domain, self.stored_size(domain)):
                    self.failure = OverQuota(domain)
            return self.commit()

    def commit(self) -> List[Tuple[str, str]]:
        """Make every copy durable; [(domain, id)]. Raises TooBig, TooManyHops or
        SpoolError, all undone."""
        if self.failure is None:
            try:
                return self._incoming.commit()
            except SpoolError as exc:
                self.failure = exc
        self.abort()
        raise self.failure

    def abort(self) -> None:
        """Leave nothing behind (the client vanished, or the caller gave up)."""
        if self._incoming is not None:
            self._incoming.abort()

    def stored_size(self, domain: str) -> int:
        """The size of the copy for `domain` with its trace header, as `queue list` shows it."""
        return self.size + self.header_sizes.get(domain, 0)


def store(spool: Spool, submission: Submission, client: str, data: bytes) -> List[Tuple[str, str]]:
    """Spool a whole message held in memory (a DSN); raises SpoolError."""
    spooling = submission.start(spool, client)
    spooling.write(data)
    return spooling.commit()

