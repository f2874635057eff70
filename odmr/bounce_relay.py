"""The bounce relay: a small delivery agent for the OUTBOUND queue.

DSNs for senders outside the hosted domains wait in OUTBOUND, and so does mail
for the domainless <postmaster> when `[smtp] postmaster` is not in a hosted
domain; the daemon's maintenance thread hands them to `[queue] bounce_relay`
(host:port) with smtplib, retried with exponential backoff. A bounce is never
bounced: one refused for good, or still undelivered after max_age, is dropped
with an error line in the log (the postmaster's mail gets a DSN instead).
Only the SMTP side is here: the relay's answers are recorded by the queue
manager (`queuemgr.Recorder`), the same way as a customer's.
"""
from __future__ import annotations

import logging
import smtplib
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

from odmr.config import parse_hostport
from odmr.folding import break_long_lines
from odmr.runtime import Runtime
from odmr.queuemgr import Recorder, outbound_due, whole_text
from odmr.spool import Message
from odmr.transport import needs_smtputf8, untransportable

log = logging.getLogger("odmrd.maintenance")

@dataclass(frozen=True)
class RelayTimings:
    """The bounce relay's retry backoff and SMTP timeout (seconds); the service hands its
    own to the maintenance thread (tests give their provider a shorter set)."""
    backoff: float = 60.0           # the first retry delay; doubles per attempt
    backoff_max: float = 3600.0
    timeout: float = 60.0           # per SMTP command to the relay

    def delay(self, attempts: int) -> float:
        """Wait before the next try after `attempts` failed ones."""
        if attempts <= 0:
            return 0.0
        return min(self.backoff * (2 ** (attempts - 1)), self.backoff_max)


def relay_outbound(runtime: Runtime, target: str, now: Optional[float] = None,
                   timings: RelayTimings = RelayTimings()) -> Dict[str, int]:
    """Hand every due OUTBOUND message to the bounce relay over one SMTP connection."""
    now = time.time() if now is None else now
    counts = {"relayed": 0, "relay_deferred": 0, "relay_dropped": 0}
    try:
        host, port = parse_hostport(target, 25)
    except ValueError as exc:
        log.error("maintenance: bad [queue] bounce_relay %r: %s", target, str(exc))
        return counts
    relay = _RelayConnection(target, host, port, runtime.hostname, timings.timeout)
    results = RelayResults(runtime, timings)
    with outbound_due(runtime.spool, now, timings.delay) as work:
        if work is None:
            return counts                   # another process relays them now
        try:
            for message, final in work:
                counts[_hand_over(relay, results, message, final, now)] += 1
        finally:
            relay.quit()
    if any(counts.values()):
        log.info("maintenance: bounce relay %s: %d relayed, %d deferred, %d dropped", target,
                 counts["relayed"], counts["relay_deferred"], counts["relay_dropped"])
    return counts


def _hand_over(relay: "_RelayConnection", results: "RelayResults", message: Message, final: bool,
               now: float) -> str:
    """One due message to the relay (or only its result recorded); the count it goes into."""
    if final:                               # its DSN was owed, or a crash came
        results.finish(message)
        return results.outcome(message)
    client = relay.connection()
    if client is None:
        results.lost(message, relay.broken, now)
        return "relay_deferred"
    outcome = _relay_one(results, client, message, now)
    if outcome == "relay_deferred" and _closed(client):
        relay.forget()
    return outcome


class _RelayConnection:
    """The one connection of a run, opened when the first message needs it (and again
    after the relay closed it); once it cannot be opened, `broken` says why and the
    run's other messages wait for the next one."""

    def __init__(self, target: str, host: str, port: int, hostname: str, timeout: float):
        self.target, self.host, self.port, self.hostname = target, host, port, hostname
        self.timeout = timeout
        self.client: Optional[smtplib.SMTP] = None
        self.broken = ""

    def connection(self) -> Optional[smtplib.SMTP]:
        if self.client is None and not self.broken:
            try:
                client = smtplib.SMTP(self.host, self.port, local_hostname=self.hostname,
                                      timeout=self.timeout)
                client.ehlo_or_helo_if_needed()
                self.client = client
            except (OSError, smtplib.SMTPException) as exc:
                self.broken = "bounce relay %s unreachable: %s" % (self.target, exc)
        return self.client

    def forget(self) -> None:
        self.client = None

    def quit(self) -> None:
        if self.client is not None:
            try:
                self.client.quit()
            except (OSError, smtplib.SMTPException):
                pass


def _closed(client: smtplib.SMTP) -> bool:
    return client.sock is None


def _relay_one(results: "RelayResults", client: smtplib.SMTP, message: Message,
               now: float) -> str:
    pending = [r.address for r in message.pending()]
    data = break_long_lines(whole_text(message))      # RFC 5321 §4.5.3.1.6, as for customers
    refusal, options = _transport(client, message, pending, data)
    try:
        if refusal is not None:
            refused = {r: refusal for r in pending}
        else:
            refused = client.sendmail(message.envelope.sender, pending, data, mail_options=options)
    except smtplib.SMTPRecipientsRefused as exc:
        refused = exc.recipients
    except smtplib.SMTPResponseException as exc:
        refused = {r: (exc.smtp_code, exc.smtp_error) for r in pending}
        _reset(client)
    except (OSError, smtplib.SMTPException) as exc:
        results.lost(message, "bounce relay: %s" % exc, now)
        try:
            client.close()
        except OSError:
            pass
        return "relay_deferred"
    replies = {r: (refused[r][0], _text(refused[r][1])) if r in refused else (250, "relayed")
               for r in pending}
    results.record(message, replies, now)
    return results.outcome(message)


def _text(reply: object) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def _transport(client: smtplib.SMTP, message: Message, pending: List[str],
               data: bytes) -> Tuple[Optional[Tuple[int, str]], List[str]]:
    """The MAIL options the text needs, or the refusal when the relay cannot take it as
    it is (the same decision as for customers)."""
    text = lambda: iter([data])         # noqa: E731
    refusal = untransportable(message, pending, text, client.has_extn("smtputf8"),
                              client.has_extn("8bitmime"), "The bounce relay")
    if refusal is not None:
        return refusal, []
    options = ["SMTPUTF8"] if needs_smtputf8(message, pending, text) else []
    if message.envelope.body == "8BITMIME" and client.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    return None, options


def _reset(client: smtplib.SMTP) -> None:
    try:
        client.rset()
    except (OSError, smtplib.SMTPException):
        try:
            client.close()
        except OSError:
            pass


class RelayResults(Recorder):
    """The relay's answers, recorded by the queue manager as a customer's are; what
    differs is said here: a bounce refused for good is dropped with an error line (a
    bounce is never bounced: its null sender gets no DSN), a message leaves OUTBOUND
    with one unlink, and the relay passes no NOTIFY on and sends no success notices."""

    who = "maintenance"
    log = log

    def __init__(self, runtime: Runtime, timings: RelayTimings):
        super().__init__(runtime, runtime.spool)
        self.timings = timings
        self._removed: Set[str] = set()

    def outcome(self, message: Message) -> str:
        """The count a relayed message goes into."""
        if message.id not in self._removed:
            return "relay_deferred"
        return "relayed" if message.state.done else "relay_dropped"

    def lost(self, message: Message, error: str, now: float) -> None:
        """No answer from the relay (unreachable, the connection broke): tried again later."""
        self._attempted(message, now)
        message.state.last_error = error[:500]
        self._deferred(message)
        self._save(message)

    def _noted(self, message: Message, outcomes: Dict[Tuple[str, str], List[str]]) -> None:
        for (kind, reply), rcpts in outcomes.items():
            if kind != "bounced":
                continue
            if message.envelope.sender:
                log.error("maintenance: %s to %s refused by the relay: %s", message.id,
                          ",".join(rcpts), reply)
                continue
            for rcpt in rcpts:
                log.error("maintenance: bounce %s to <%s> refused by the relay: %s; dropped "
                          "(a bounce is never bounced)", message.id, rcpt, reply)
        if message.pending():
            self._deferred(message)

    def _deferred(self, message: Message) -> None:
        state = message.state
        log.warning("maintenance: bounce %s deferred (attempt %d, next in %ds): %s", message.id,
                    state.attempts, int(self.timings.delay(state.attempts)), state.last_error)

    def _owes_success_notices(self) -> bool:
        return False

    def _retire(self, message: Message) -> bool:
        if not super()._retire(message):
            return False
        self._removed.add(message.id)
        if message.state.done:
            log.info("maintenance: bounce %s relayed to %s", message.id, ",".join(message.state.done))
        return True
