"""Operator tooling over the spool: list, show, delete, bounce, the quarantine.

Used by `odmrd queue ...` (`queue expire` is the daemon's expiry,
queuemgr.expire_all). What they change, the queue manager (`queuemgr`)
changes, holding the domain's delivery claim, so they never race an ATRN session.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Tuple

from odmr.queuemgr import drop, drop_unusable, return_to_sender, under_claim
from odmr.runtime import Runtime
from odmr.spool import OUTBOUND, CorruptMessage, Message, UnreadableMessage

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


def list_messages(runtime: Runtime, domain: Optional[str] = None,
                  unreadable: Optional[List[Tuple[str, str, str]]] = None) -> List[Message]:
    """What waits, read only: a listing never moves anything (corrupt and unreadable
    files are reported, and added to `unreadable` as (queue, id, reason); the daemon
    quarantines them when it meets them)."""
    spool = runtime.spool
    queues = [domain] if domain else spool.domains() + [OUTBOUND]
    found: List[Message] = []
    for queue in queues:
        found.extend(spool.messages(queue, quarantine=False, unreadable=unreadable))
    return found


def describe_unreadable(runtime: Runtime, queue: str, msg_id: str, reason: str,
                        now: Optional[float] = None) -> Dict[str, object]:
    """A `queue list` record of a file that cannot be read: the same keys, what the
    directory tells (size, age from its mtime), the reason as its last error."""
    now = time.time() if now is None else now
    st = runtime.spool.file_stat(queue, msg_id)
    return {"id": msg_id, "domain": queue, "size": st.st_size if st else 0,
            "age": int(max(0, now - st.st_mtime)) if st else 0, "sender": "",
            "recipients": [], "attempts": 0, "last_error": "unusable: %s" % reason}


def quarantined(runtime: Runtime, now: Optional[float] = None) -> List[Dict[str, object]]:
    """The `queue list --quarantine` records: domain, id, size, when set aside, why."""
    now = time.time() if now is None else now
    return [{"id": q.id, "domain": q.domain, "size": q.size, "quarantined": int(q.when),
             "age": int(max(0, now - q.when)), "reason": q.reason}
            for q in runtime.spool.quarantined()]


def requeue(runtime: Runtime, msg_id: str) -> str:
    """Put a repaired message back into its queue (Spool.requeue); returns the queue."""
    queue = runtime.spool.requeue(msg_id)
    log.info("queue: requeued id=%s domain=%s by operator", msg_id, queue)
    return queue


def _claimed(runtime: Runtime, msg_id: str, act: Callable[[Message], None]) -> Optional[Message]:
    """Run `act(message)` holding the message's domain claim, on a copy read and checked
    under it (an ATRN session, or the bounce relay for OUTBOUND, may have changed or
    delivered it since it was found)."""
    spool = runtime.spool
    found = spool.find(msg_id)
    if found is None:
        return None
    acted = under_claim(spool, found.domain, lambda m: True, act, None, [found.id])
    return acted[0] if acted else None


def delete(runtime: Runtime, msg_id: str) -> bool:
    try:
        message = _claimed(runtime, msg_id, lambda m: drop(runtime.spool, m))
    except (CorruptMessage, UnreadableMessage):     # nobody else could use it either
        return _delete_corrupt(runtime, msg_id)
    if message is None:
        return False
    log.info("queue: deleted id=%s domain=%s by operator", message.id, message.domain)
    return True


def _delete_corrupt(runtime: Runtime, msg_id: str) -> bool:
    """An unparseable or unreadable file can still be deleted by the operator."""
    spool = runtime.spool
    domain = spool.locate(msg_id)
    if domain is None:
        return False
    with spool.claim([domain]):
        drop_unusable(spool, domain, msg_id)
    log.info("queue: deleted corrupt file id=%s domain=%s by operator", msg_id, domain)
    return True


class NotBounceable(Exception):
    """A bounce waiting for the relay: bouncing it would drop it without a trace."""


def bounce(runtime: Runtime, msg_id: str,
           reason: str = "5.0.0 returned to sender by the mail administrator") -> Optional[str]:
    """What became of the message ("bounced", or why no bounce went), None if not found."""
    if runtime.spool.locate(msg_id) == OUTBOUND:
        raise NotBounceable("%s is a bounce waiting for the bounce relay; a bounce is never "
                            "bounced: 'odmrd queue delete %s' drops it" % (msg_id, msg_id))
    message = _claimed(runtime, msg_id, lambda m: return_to_sender(runtime, m, "550 " + reason))
    if message is None:
        return None
    if not message.envelope.sender:
        return "deleted: null sender, a bounce has nowhere to go"
    return "bounced"
