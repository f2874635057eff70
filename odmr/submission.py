"""The one way into the queue, like Postfix's cleanup: intake, `odmrd enqueue`, DSNs.

Whatever hands a message over keeps its own protocol at the edge (SMTP
replies, exit codes, its own checks); what the message becomes in the spool
is decided here once:

- recipients (already judged by `Hosting.classify_recipient`) are kept once
  per mailbox (`names.mailbox_key`), in the order given;
- a message for several domains becomes one copy per domain, each envelope
  with only that domain's recipients;
- each copy starts with its own trace header, made for its id and recipients;
- the text is streamed into every copy at once under a size limit, and the
  copies are committed together, durably, before anyone is told "queued".

Senders and recipients are judged here too (`accept_sender`,
`Submission.accept_recipient`), so intake and enqueue take the same ones: each
gets a `Decision`, which intake sends as its SMTP reply and enqueue turns into
an exit code and one line. A domain with a quota is checked again at commit,
on a fresh count and under its `.quota.lock`, whoever commits.

This module knows no protocol: it never replies and never exits.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Protocol, Set, Tuple

from odmr import replies
from odmr.hops import HopCount, TooManyHops
from odmr.names import mailbox_key, normalize_domain
from odmr.spool import OUTBOUND, Envelope, IncomingMessage, Recipient, Spool, SpoolError

MAX_ADDRESS = 256               # octets of a sender or recipient address we take

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


class Policy(Protocol):
    """What judging and committing ask of the hosting policy (an `odmr.hosting.Hosting`)."""

    def sender_routing(self, sender: str) -> Optional[str]: ...

    def classify_recipient(self, address: str, utf8_allowed: bool, configured: bool = False,
                           route: str = "") -> Tuple[Optional[str], int, str]: ...

    def postmaster_recipient(self, utf8_allowed: bool, route: str = "") -> Tuple[str, tuple]: ...

    def quota_domains(self, domains: Iterable[str]) -> List[str]: ...

    def quota_ok(self, domain: str, incoming_size: int = 0, fresh: bool = False) -> bool: ...


@dataclass(frozen=True)
class Decision:
    """A sender or recipient judged: the SMTP reply intake gives (`code`, `text` with
    its enhanced status code), and for an accepted recipient the domain and address it
    is spooled for. `detail` is what a log line or an error line adds (a route)."""
    code: int
    text: str
    domain: Optional[str] = None
    address: str = ""
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.code < 400

    @property
    def reply(self) -> replies.Reply:
        return self.code, self.text

    @property
    def status(self) -> str:
        """The enhanced status code alone ("5.1.7")."""
        return self.text.partition(" ")[0]

    @property
    def reason(self) -> str:
        """The words after the enhanced status code."""
        return self.text.partition(" ")[2]


def accept_sender(policy: Policy, sender: str) -> Decision:
    """MAIL's sender: it needs a domain, fits MAX_ADDRESS, and carries no route into a
    hosted domain (its DSNs would be spooled for a customer whose MTA follows it)."""
    if sender and "@" not in sender:
        return Decision(*replies.SENDER_NEEDS_DOMAIN)
    if len(sender) > MAX_ADDRESS:
        return Decision(*replies.SENDER_TOO_LONG)
    bad_domain = sender and sender_domain_problem(sender.rpartition("@")[2])
    if bad_domain:
        code, text = replies.SENDER_BAD_DOMAIN
        return Decision(code, text % bad_domain, detail=bad_domain)
    routed = sender and policy.sender_routing(sender)
    if routed:
        code, text = replies.ROUTING_REFUSED
        return Decision(code, text % routed, detail=routed)
    return Decision(*replies.MAIL_OK)


def sender_domain_problem(domain: str) -> str:
    """Why a sender's domain is refused, or "". Its DSNs are routed by its domain, so
    a name IDNA 2008 refuses (an invisible character, a deviation the codec would map)
    must not come in (SPEC §4). Plain ASCII names are left to the sender's MTA, as
    other MTAs do; a trailing dot is no mail domain (RFC 5321 §4.1.2)."""
    if domain.startswith("["):
        return ""
    if domain.endswith("."):
        return "a mail domain has no trailing dot"
    if domain.isascii():
        return ""
    try:
        normalize_domain(domain)
    except ValueError as exc:
        return str(exc)
    return ""


class Submission:
    """The envelope of one message on its way in: sender, options, recipients by domain."""

    def __init__(self, sender: str, smtputf8: bool = False, body: str = "",
                 ret: str = "", envid: str = "", max_recipients: int = 0, declared_size: int = 0):
        self.sender = sender
        self.declared_size = declared_size          # MAIL's SIZE=, for the quota at RCPT
        self.max_recipients = max_recipients       # 0: no limit
        self.smtputf8 = smtputf8
        self.body = body
        self.ret, self.envid = ret, envid          # DSN (RFC 3461), as the client gave them
        self.recipients: Dict[str, str] = {}       # address -> domain, in order
        self._dsn: Dict[str, Tuple[str, str]] = {}     # address -> (NOTIFY, ORCPT)
        self._mailboxes: Set[str] = set()          # mailbox_key() of each, against duplicates

    def accept_recipient(self, policy: Policy, address: str, route: str = "",
                         utf8_allowed: Optional[bool] = None) -> Decision:
        """RCPT's recipient (`route`: the source route before it), judged but not added:
        too long, one too many, or not ours is refused; the domainless postmaster means
        this host's administrator (RFC 5321 §4.5.1). `utf8_allowed` defaults to SMTPUTF8."""
        if len(address) > MAX_ADDRESS:
            return Decision(*replies.RECIPIENT_TOO_LONG)
        if self.max_recipients and len(self.recipients) >= self.max_recipients:
            return Decision(*replies.TOO_MANY_RECIPIENTS)
        utf8 = self.smtputf8 if utf8_allowed is None else utf8_allowed
        if address.lower() == "postmaster":
            address, (domain, code, text) = policy.postmaster_recipient(utf8, route)
        else:
            domain, code, text = policy.classify_recipient(address, utf8, route=route)
        if domain is not None and not policy.quota_ok(domain, self.declared_size):
            code, text = replies.MAILBOX_FULL       # a quick look; the commit checks for good
            return Decision(code, text % domain, None, address, detail="over quota")
        return Decision(code, text, domain, address)

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
              limit: int = 0, hostname: str = "", max_received: int = 0,
              quotas: Optional[Policy] = None) -> "Spooling":
        """Open one spool file per domain for the text that follows. With `hostname`, a
        message whose header says it is looping (over `max_received` Received: fields, or
        our own too often) is refused: TooManyHops from `commit`. With `quotas`, `commit`
        checks the quota domains afresh: OverQuota."""
        by_domain = self.by_domain()
        hops = HopCount(hostname, max_received, domains=by_domain) if hostname else None
        return Spooling(spool, self.envelopes(client), by_domain, trace, limit, hops, quotas)


class Spooling:
    """The text of one submitted message on its way to disk, into every copy at once.

    A storage error or the size limit (0: none) ends the keeping, not the
    reading: SMTP must still read DATA to its end before it may answer, while
    `enqueue` stops at once; so `write` never raises, and `failure` (also
    raised by `commit`) says what went wrong."""

    def __init__(self, spool: Spool, envelopes: Dict[str, Envelope], by_domain: Dict[str, List[str]],
                 trace: Optional[TraceHeader] = None, limit: int = 0,
                 hops: Optional[HopCount] = None, quotas: Optional[Policy] = None):
        self.limit = limit
        self._spool = spool
        self._hops = hops
        self._quotas = quotas
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

    def commit(self) -> List[Tuple[str, str]]:
        """Make every copy durable; [(domain, id)]. A domain with a quota is counted afresh
        under its quota lock, held until the copies are in place, so commits running
        together, in any process, never grow it past its quota. Raises OverQuota, TooBig,
        TooManyHops or SpoolError, all undone."""
        with contextlib.ExitStack() as held:
            gated = self._quotas.quota_domains(self._by_domain) \
                if self._quotas is not None and self.failure is None else []
            for domain in sorted(gated):
                held.enter_context(self._spool.quota_lock(domain))
            for domain in gated:
                if self.failure is None and \
                        not self._quotas.quota_ok(domain, self.stored_size(domain), fresh=True):
                    self.failure = OverQuota(domain)
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

    def log_accepted(self, log: logging.Logger, who: str, stored: List[Tuple[str, str]],
                     sender: str, origin: str) -> None:
        """SPEC §8: one line per copy accepted, the same from every way in; `origin`
        ends it ("client=<peer>", "by=<user>")."""
        for domain, msg_id in stored:
            log.info("%s: accepted id=%s domain=%s size=%d from=<%s> to=%s %s", who, msg_id, domain, self.stored_size(domain), sender,
                     ",".join("<%s>" % a for a in self._by_domain[domain]), origin)


def store(spool: Spool, submission: Submission, client: str, data: bytes) -> List[Tuple[str, str]]:
    """Spool a whole message held in memory (a DSN); raises SpoolError."""
    spooling = submission.start(spool, client)
    spooling.write(data)
    return spooling.commit()

