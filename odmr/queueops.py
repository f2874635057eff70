"""Operator tooling over the spool: list, show, delete, bounce, expire.

Used by `odmrd queue ...` (and expiry by the daemon). Changes to a domain are
made while holding its delivery claim, so they never race an ATRN session.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Iterable, List, Optional

from odmr.bounce import send_dsn
from odmr.runtime import Runtime
from odmr.spool import OUTBOUND, DomainBusy, Message

log = logging.getLogger("odmrd.queue")


def describe(message: Message, now: Optional[float] = None) -> Dict[str, object]:
    """The `queue list --json` record of one message."""
    now = time.time() if now is None else now
    return {
        "id": message.id,
        "domain": message.domain,
        "size": message.size,
        "age": int(max(0, now - message.envelope.arrival)),
        "sender": message.envelope.sender,
        "recipients": [r.address for r in message.pending()],
        "attempts": message.state.attempts,
        "last_error": message.state.last_error,
    }


def list_messages(runtime: Runtime, domain: Optional[str] = None) -> List[Message]:
    spool = runtime.spool
    queues = [domain] if domain else spool.domains() + [OUTBOUND]
    found: List[Message] = []
    for queue in queues:
        found.extend(spool.messages(queue))
    return found


def _with_claim(runtime: Runtime, domain: str, action) -> None:
    if domain == OUTBOUND:
        action()
        return
    with runtime.spool.claim([domain]):
        action()


def delete(runtime: Runtime, msg_id: str) -> bool:
    message = runtime.spool.find(msg_id)
    if message is None:
        return False
    _with_claim(runtime, message.domain, lambda: runtime.spool.remove(message))
    log.info("queue: deleted id=%s domain=%s by operator", message.id, message.domain)
    return True


def bounce(runtime: Runtime, msg_id: str, reason: str = "5.0.0 returned to sender by the mail administrator") -> bool:
    message = runtime.spool.find(msg_id)
    if message is None:
        return False
    _with_claim(runtime, message.domain, lambda: _bounce_now(runtime, message, "550 " + reason))
    return True


def _bounce_now(runtime: Runtime, message: Message, reply: str) -> None:
    results = {r.address: reply for r in message.pending()}
    results.update({} if message.state.bounced else message.state.failed)
    if results and message.domain != OUTBOUND:
        send_dsn(runtime.spool, runtime.hosted_domains(), runtime.hostname, message, results)
    runtime.spool.remove(message)
    log.info("queue: bounced id=%s domain=%s: %s", message.id, message.domain, reply)


def expire(runtime: Runtime, now: Optional[float] = None) -> Dict[str, int]:
    """Bounce every message older than max_age; returns counts. Busy domains are skipped."""
    now = time.time() if now is None else now
    max_age = runtime.settings.queue.max_age
    counts = {"expired": 0, "busy": 0}
    if max_age <= 0:
        return counts
    spool = runtime.spool
    for domain in spool.domains():
        try:
            with spool.claim([domain]):
                for message in spool.messages(domain):
                    if now - message.envelope.arrival >= max_age:
                        days = max_age / 86400.0
                        _bounce_now(runtime, message,
                                    "550 5.4.7 Delivery time expired: not collected within %g days" % days)
                        counts["expired"] += 1
        except DomainBusy:
            counts["busy"] += 1
    return counts


def total(messages: Iterable[Message]) -> int:
    return sum(m.size for m in messages)
