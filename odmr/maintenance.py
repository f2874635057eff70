"""Periodic work of a running provider, on one background thread.

- expiry: every EXPIRE_EVERY seconds, `queueops.expire` returns messages older
  than `[queue] max_age` to their senders (DSN), exactly as `odmrd queue expire`;
- delay notices: when `[queue] warn_after` > 0, one "delayed" DSN per message
  that has waited that long (remembered in its state, so never twice);
- the bounce relay: DSNs for senders outside the hosted domains wait in the
  OUTBOUND queue; they are handed to `[queue] bounce_relay` (host:port) with
  smtplib, retried with exponential backoff. A bounce is never bounced: one
  refused for good, or still undelivered after max_age, is dropped with an
  error line in the log.

Everything a pass changes in a domain happens under that domain's delivery
claim, so it never races an ATRN session nor another `odmrd serve` process on
the same spool; a busy domain is simply tried again at the next pass.
"""
from __future__ import annotations

import logging
import re
import smtplib
import threading
import time
from typing import Callable, Dict, List, Optional

from odmr import queueops
from odmr.config import parse_hostport
from odmr.queuemgr import notify_delayed, under_claim
from odmr.runtime import Runtime
from odmr.spool import OUTBOUND, DomainBusy, LinkRefused, Message, SpoolError

log = logging.getLogger("odmrd.maintenance")

# Module-level so tests (and only tests) can make time pass faster.
TICK = 5.0                  # seconds between looks at the OUTBOUND queue
EXPIRE_EVERY = 300.0        # seconds between expiry / delay-notice passes
EXPIRE_FIRST = 60.0         # the first pass waits this long: start-up (and ATRN) come first
RELAY_BACKOFF = 60.0        # first retry delay for the bounce relay; doubles per attempt
RELAY_BACKOFF_MAX = 3600.0
RELAY_TIMEOUT = 60.0        # per SMTP command to the bounce relay


def relay_delay(attempts: int) -> float:
    """Wait before the next try after `attempts` failed ones."""
    if attempts <= 0:
        return 0.0
    return min(RELAY_BACKOFF * (2 ** (attempts - 1)), RELAY_BACKOFF_MAX)


class Maintenance:
    """The background thread; `runtime` is called for the current snapshot (reloads)."""

    def __init__(self, runtime: Callable[[], Runtime]):
        self._runtime = runtime
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._next_expiry = time.monotonic() + EXPIRE_FIRST
        self._warned_no_relay = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="maintenance", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wake(self) -> None:
        """Run a pass now (the relay queue and, if due, expiry)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:   # the thread must survive anything a pass meets
                log.exception("maintenance: pass failed")
            self._wake.wait(TICK)
            self._wake.clear()

    def run_once(self, now: Optional[float] = None, force_expiry: bool = False) -> Dict[str, int]:
        """One pass: expiry and delay notices when due, then the bounce relay."""
        runtime = self._runtime()
        clock = time.monotonic()
        counts: Dict[str, int] = {}
        if force_expiry or clock >= self._next_expiry:
            self._next_expiry = clock + EXPIRE_EVERY
            counts.update(queueops.expire(runtime, now))
            if runtime.settings.queue.warn_after > 0:
                counts["warned"] = warn_delayed(runtime, now)
        if not self._stop.is_set():
            counts.update(self.relay(runtime, now))
        return counts

    def relay(self, runtime: Runtime, now: Optional[float] = None) -> Dict[str, int]:
        target = runtime.settings.queue.bounce_relay
        if not runtime.spool.has_mail(OUTBOUND):
            return {}
        if not target:
            if not self._warned_no_relay:
                log.warning("maintenance: bounces for outside senders are waiting in %s/%s but "
                            "[queue] bounce_relay is not set; they are dropped after max_age",
                            runtime.spool.root, OUTBOUND)
                self._warned_no_relay = True
            return {}
        self._warned_no_relay = False
        return relay_outbound(runtime, target, now)


# -- delay notices ------------------------------------------------------------
def _delay_reason(last_error: str) -> str:
    """A 4xx reply for an `Action: delayed` DSN (RFC 3464 wants a 4.x.x status there)."""
    if re.match(r"4\d\d ", last_error):
        return last_error
    if last_error and not last_error[:1].isdigit():         # e.g. "connection lost during delivery"
        return "451 4.4.1 " + last_error
    return "451 4.4.1 waiting for the recipient's server to collect it (ATRN)"


def warn_delayed(runtime: Runtime, now: Optional[float] = None) -> int:
    """Send one delay notice per message waiting longer than warn_after; returns how many."""
    now = time.time() if now is None else now
    warn_after = runtime.settings.queue.warn_after
    max_age = runtime.settings.queue.max_age
    spool = runtime.spool
    sent = 0

    def due(message: Message) -> bool:
        age = now - message.envelope.arrival
        return (not message.state.warned and age >= warn_after
                and not (max_age > 0 and age >= max_age) and bool(message.pending()))

    def warn(message: Message) -> None:
        nonlocal sent
        reason = _delay_reason(message.state.last_error)
        try:
            if notify_delayed(runtime, message, reason):
                sent += 1
        except (SpoolError, OSError) as exc:
            log.error("maintenance: cannot queue a delay notice for %s/%s: %s",
                      message.domain, message.id, exc)
            return
        message.state.warned = True
        spool.save_state(message)

    for domain in spool.domains():
        try:
            under_claim(spool, domain, due, warn, "maintenance: %s/%s unreadable: %s")
        except (DomainBusy, LinkRefused):      # a link where the lock belongs: logged by the spool
            continue
    return sent


# -- the bounce relay ---------------------------------------------------------
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
                outcome = _relay_one(spool, client, message, now)
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


def _relay_one(spool, client: smtplib.SMTP, message: Message, now: float) -> str:
    pending = [r.address for r in message.pending()]
    options: List[str] = []
    if message.envelope.smtputf8 or not all(r.isascii() for r in pending):
        options.append("SMTPUTF8")
    if message.envelope.body == "8BITMIME" and client.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    try:
        refused = client.sendmail("", pending, message.read_data(), mail_options=options)
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
    state = message.state
    temporary = []
    for rcpt in pending:
        if rcpt not in refused:
            state.done[rcpt] = "250 relayed"
            continue
        code, text = refused[rcpt]
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        reply = "%d %s" % (code, " ".join(text.split()))
        if 500 <= code < 600:
            state.failed[rcpt] = reply
            log.error("maintenance: bounce %s to <%s> refused by the relay: %s; dropped "
                      "(a bounce is never bounced)", message.id, rcpt, reply)
        else:
            temporary.append(reply)
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
