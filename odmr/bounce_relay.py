"""The bounce relay: a small delivery agent for the OUTBOUND queue.

DSNs for senders outside the hosted domains wait in OUTBOUND, and so does mail
for the domainless <postmaster> when `[smtp] postmaster` is not in a hosted
domain; the daemon's maintenance thread hands them to `[queue] bounce_relay`
(host:port) with smtplib, retried with exponential backoff. A bounce is never
bounced: one refused for good, or still undelivered after max_age, is dropped
with an error line in the log (the postmaster's mail gets a DSN instead).
"""
from __future__ import annotations

import logging
import smtplib
import time
from typing import Dict, List, Optional, Tuple

from odmr.bounce import send_dsn
from odmr.config import parse_hostport
from odmr.delivery import needs_smtputf8, untransportable
from odmr.folding import break_long_lines
from odmr.runtime import Runtime
from odmr.spool import OUTBOUND, DomainBusy, LinkRefused, Message, SpoolError

log = logging.getLogger("odmrd.maintenance")

RELAY_BACKOFF = 60.0        # first retry delay for the bounce relay; doubles per attempt
RELAY_BACKOFF_MAX = 3600.0
RELAY_TIMEOUT = 60.0        # per SMTP command to the bounce relay


def relay_delay(attempts: int) -> float:
    """Wait before the next try after `attempts` failed ones."""
    if attempts <= 0:
        return 0.0
    return min(RELAY_BACKOFF * (2 ** (attempts - 1)), RELAY_BACKOFF_MAX)


def relay_outbound(runtime: Runtime, target: str, now: Optional[float] = None) -> Dict[str, int]:
    """Hand every due OUTBOUND message to the bounce relay over one SMTP connection."""
    now = time.time() if now is None else now
    spool = runtime.spool
    counts = {"relayed": 0, "relay_deferred": 0, "relay_dropped": 0}
    try:
        host, port = parse_hostport(target, 25)
    except ValueError as exc:
        log.error("maintenance: bad [queue] bounce_relay %r: %s", target, exc)
        return counts
    try:
        claim = spool.claim([OUTBOUND])
    except (DomainBusy, LinkRefused):
        return counts
    client: Optional[smtplib.SMTP] = None
    broken = ""
    with claim:
        try:
            for message in spool.messages(OUTBOUND):
                state = message.state
                if state.attempts and now < state.last_attempt + relay_delay(state.attempts):
                    continue
                if broken:
                    _relay_failed(spool, message, broken, now)
                    counts["relay_deferred"] += 1
                    continue
                if client is None:
                    try:
                        client = smtplib.SMTP(host, port, local_hostname=runtime.hostname,
                                              timeout=RELAY_TIMEOUT)
                        client.ehlo_or_helo_if_needed()
                    except (OSError, smtplib.SMTPException) as exc:
                        broken = "bounce relay %s unreachable: %s" % (target, exc)
                        client = None
                        _relay_failed(spool, message, broken, now)
                        counts["relay_deferred"] += 1
                        continue
                outcome = _relay_one(runtime, client, message, now)
                counts[outcome] += 1
                if outcome == "relay_deferred" and _closed(client):
                    client = None
        finally:
            if client is not None:
                try:
                    client.quit()
                except (OSError, smtplib.SMTPException):
                    pass
    if any(counts.values()):
        log.info("maintenance: bounce relay %s: %d relayed, %d deferred, %d dropped", target,
                 counts["relayed"], counts["relay_deferred"], counts["relay_dropped"])
    return counts


def _closed(client: smtplib.SMTP) -> bool:
    return client.sock is None


def _relay_one(runtime: Runtime, client: smtplib.SMTP, message: Message, now: float) -> str:
    spool = runtime.spool
    pending = [r.address for r in message.pending()]
    data = break_long_lines(message.read_data())      # RFC 5321 §4.5.3.1.6, as for customers
    refusal, options = _transport(client, message, pending, data)
    try:
        if refusal is not None:
            refused = {r: refusal for r in pending}
        else:
            refused = client.sendmail(message.envelope.sender, pending, data, mail_options=options)
    except smtplib.SMTPRecipientsRefused as exc:
        refused = exc.recipients
    except smtplib.SMTPResponseException as exc:
        text = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) \
            else str(exc.smtp_error)
        refused = {r: (exc.smtp_code, text) for r in pending}
        _reset(client)
    except (OSError, smtplib.SMTPException) as exc:
        _relay_failed(spool, message, "bounce relay: %s" % exc, now)
        try:
            client.close()
        except OSError:
            pass
        return "relay_deferred"
    return _record(runtime, message, pending, refused, now)


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


def _record(runtime: Runtime, message: Message, pending: List[str],
            refused: Dict[str, Tuple[int, object]], now: float) -> str:
    """The relay's answers: done, failed for good (a DSN only for a message that has a
    sender: a bounce is never bounced), or tried again later."""
    spool = runtime.spool
    state = message.state
    temporary = []
    failed: Dict[str, str] = {}
    for rcpt in pending:
        if rcpt not in refused:
            state.done[rcpt] = "250 relayed"
            continue
        code, text = refused[rcpt]
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        reply = "%d %s" % (code, " ".join(text.split()))
        if 500 <= code < 600:
            state.failed[rcpt] = failed[rcpt] = reply
            if not message.envelope.sender:
                log.error("maintenance: bounce %s to <%s> refused by the relay: %s; dropped "
                          "(a bounce is never bounced)", message.id, rcpt, reply)
        else:
            temporary.append(reply)
    if failed and message.envelope.sender:
        log.error("maintenance: %s to %s refused by the relay: %s", message.id,
                  ",".join(failed), next(iter(failed.values())))
        try:
            send_dsn(spool, runtime.hosted_domains(), runtime.hostname, message, failed)
        except (SpoolError, OSError) as exc:
            log.error("maintenance: cannot queue the DSN for %s: %s", message.id, exc)
    if not message.pending():
        spool.remove(message)
        if state.done:
            log.info("maintenance: bounce %s relayed to %s", message.id, ",".join(state.done))
        return "relayed" if state.done else "relay_dropped"
    _relay_failed(spool, message, temporary[0] if temporary else "temporary failure", now)
    return "relay_deferred"


def _reset(client: smtplib.SMTP) -> None:
    try:
        client.rset()
    except (OSError, smtplib.SMTPException):
        try:
            client.close()
        except OSError:
            pass


def _relay_failed(spool, message: Message, error: str, now: float) -> None:
    state = message.state
    state.attempts += 1
    state.last_attempt = now
    state.last_error = error[:500]
    log.warning("maintenance: bounce %s deferred (attempt %d, next in %ds): %s", message.id,
                state.attempts, int(relay_delay(state.attempts)), state.last_error)
    try:
        spool.save_state(message)
    except OSError as exc:
        log.error("maintenance: cannot save state of bounce %s: %s", message.id, exc)
