"""The queue manager: what happens to queued mail, as Postfix's qmgr does for its agents.

It hands a delivery session the messages of its claimed domains (read by the
spool's one reader), takes back one result per recipient and records it:
2xx done, 5xx failed (a DSN goes to the sender), 4xx kept for the next ATRN
(`Recorder`; the bounce relay records its answers the same way).
A message leaves the queue when every recipient has a final result: retired
with one rename, its directory fsync'd behind it by a removal-sync thread (a
few removals per fsync), its blocks freed later by the reaper thread. Expiry,
delay notices and `queue bounce` go through the same DSN hand-off, and act
only on what they re-read and re-check under the domain's claim.

Its own module rather than part of `spool`: the spool is the file format and
its durable transitions and knows nothing of SMTP replies or DSNs; this module
is the policy over it (what a reply means for a message, when to bounce, when
to retire), and it imports `bounce`, which imports `spool`. `delivery` is the
SMTP client only: it asks this module for messages and gives back replies; it
never touches a file.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import logging
import os
import queue
import re
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from odmr.background import lower_this_thread
from odmr.bounce import send_dsn
from odmr.logline import escape_for_log
from odmr.runtime import Runtime
from odmr.spool import (FILE_IO_SIZE, OUTBOUND, DomainBusy, LinkRefused, Message, Spool, SpoolError,
                        State, describe_error)

log = logging.getLogger("odmrd.delivery")
log_queue = logging.getLogger("odmrd.queue")       # the lines of `queue` commands and expiry
log_maintenance = logging.getLogger("odmrd.maintenance")   # delay notices

MAX_UNSYNCED = 32              # removals not yet fsync'd before delivery waits (power-loss bound)
SYNC_GATHER = 0.002            # seconds the syncer waits to cover several removals with one fsync
REAP_BACKLOG = 20000           # retired files the reaper lets pile up while sessions run

Reply = Tuple[int, str]


def reply_text(code: int, text: str) -> str:
    """A customer's reply as stored (last_error), logged and quoted in DSNs: one line of at
    most 500 characters, its control and format characters escaped (they would reach an
    operator's terminal through `queue list`)."""
    return escape_for_log("%d %s" % (code, " ".join(text.split())))[:500]


class QueueManager:
    """The queue of one spool and the threads that make its removals durable and free
    their blocks. The service owns it and stops it (after its sessions ended).

    It also holds, for every session of the process, the results that could not be
    written to the spool (a full or read-only disk, EIO...): such a message is never
    offered again for what the customer already accepted, and the writing is tried
    again before the next ATRN's 250 for its domain (`trouble`)."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.reaper = _Reaper(spool)
        self._syncs: Set["_RemovalSync"] = set()
        self._guard = threading.Lock()
        self._unrecorded: Dict[Tuple[str, str], Message] = {}    # (domain, id) -> as delivered

    def remember(self, message: Message) -> None:
        with self._guard:
            self._unrecorded[(message.domain, message.id)] = message

    def forget(self, message: Message) -> None:
        with self._guard:
            self._unrecorded.pop((message.domain, message.id), None)

    def remembered(self, domain: str) -> Dict[str, Message]:
        """The domain's messages whose latest results are held here only, by id."""
        with self._guard:
            return {i: m for (d, i), m in self._unrecorded.items() if d == domain}

    def trouble(self, runtime: Runtime, domains: Sequence[str]) -> Optional[str]:
        """Why results for these (claimed) domains could not be recorded now, or None.

        Retries first what earlier sessions could not write. A full disk is no reason
        to refuse: delivery frees space, and what is held here is not offered again."""
        for domain in domains:
            try:
                self.spool.probe(domain)
            except OSError as exc:
                if not _no_space(exc):
                    return "the spool directory of %s cannot be changed: %s" % (
                        domain, describe_error(exc))
            for message in self.remembered(domain).values():
                try:
                    self.settle(runtime, message)
                except (OSError, SpoolError) as exc:
                    if not _no_space(exc):
                        return "the results of %s/%s still cannot be recorded: %s" % (
                            domain, message.id, exc)
                    log.warning("delivery: results of %s/%s still not recorded (%s); "
                                "kept in memory", domain, message.id, exc)
        return None

    def settle(self, runtime: Runtime, message: Message) -> None:
        """Write what a session could not: the DSN owed, then the state or the retirement.
        Raises OSError or SpoolError (the message stays remembered)."""
        state = message.state
        if state.failed and not state.bounced:
            notify_failed(runtime, message, dict(state.failed))
            state.bounced = True
        if message.pending():
            message.has_state = True
            self.spool.save_state(message)
        else:
            retired = self.spool.retire(message, message.has_state)
            if retired:
                self.reaper.put(message.domain, retired)
            self.spool.sync_domain(message.domain)
        self.forget(message)
        log.info("delivery: results of %s/%s recorded at last", message.domain, message.id)

    def drain(self, runtime: Runtime, domains: Sequence[str], peer: str) -> "Drain":
        """A delivery session takes its messages and gives its results through this, so
        that the SMTP client never touches the spool; `domains` must be claimed already,
        or another session could deliver the same messages at the same time. `peer`:
        the customer, for `odmrd status`."""
        return Drain(self, runtime, domains, peer)

    def _removal_sync(self) -> "_RemovalSync":
        sync = _RemovalSync(self.spool)
        with self._guard:
            self._syncs.add(sync)
        return sync

    def _closed(self, sync: "_RemovalSync") -> None:
        with self._guard:
            self._syncs.discard(sync)

    def stop(self) -> None:
        """Make every removal durable and free what was retired; later ones are freed at once."""
        with self._guard:
            syncs = list(self._syncs)
        for sync in syncs:
            sync.close()
        self.reaper.stop()


class Recorder:
    """Records what one attempt's replies mean for a message, the one way for everything
    that sends queued mail (a delivery session, the bounce relay): 2xx done, 5xx failed
    (a DSN to the sender, as RFC 3461 NOTIFY asks; a message whose DSN cannot be queued
    stays queued), 4xx kept for the next attempt. A message leaves the queue once every
    recipient has a final result. Subclasses say what they log and how a message leaves."""

    who = "delivery"                            # the log lines' prefix
    log = log                                   # and their logger

    def __init__(self, runtime: Runtime, spool: Spool):
        self.runtime = runtime
        self.spool = spool
        self.delivered = self.deferred = self.failed = 0
        self._dsn_failed: Set[str] = set()      # ids whose DSN failed: one attempt per session

    def record(self, message: Message, results: Dict[str, Reply],
               now: Optional[float] = None) -> None:
        """One attempt's replies, per recipient; the message leaves once all are final."""
        state = message.state
        self._attempted(message, now)
        outcomes: Dict[Tuple[str, str], List[str]] = {}
        errors: List[str] = []                  # temporary: why recipients are still waiting
        permanent: List[str] = []
        newly_failed: Dict[str, str] = {}
        delivered: Dict[str, str] = {}
        for rcpt, (code, text) in results.items():
            reply = reply_text(code, text)
            if 200 <= code < 300:
                state.done[rcpt] = delivered[rcpt] = reply
                kind = "delivered"
                self.delivered += 1
            elif 500 <= code < 600:
                state.failed[rcpt] = reply
                newly_failed[rcpt] = reply
                permanent.append(reply)
                kind = "bounced"
                self.failed += 1
            else:
                if code < 400:  # garbage or an impossible code: treat as temporary
                    reply = "451 4.5.0 unusable reply: %s" % reply
                errors.append(reply)
                kind = "deferred"
                self.deferred += 1
            outcomes.setdefault((kind, reply), []).append(rcpt)
        if errors or permanent:
            # what keeps the message queued, not another recipient's final refusal
            state.last_error = (errors or permanent)[0]
        self._noted(message, outcomes)
        if newly_failed:
            # tell the sender now about the recipients that failed for good, not when the
            # others are finally collected (state.bounced: every failure so far was notified)
            self._bounce(message, newly_failed if state.bounced else dict(state.failed))
        if delivered and self._owes_success_notices() \
                and any(r.notify for r in message.envelope.recipients):
            self._relayed(message, delivered)
        self._counted(message, results)
        if not message.pending():
            self.finish(message)
        else:
            self._save(message)

    def _attempted(self, message: Message, now: Optional[float] = None) -> None:
        message.state.attempts += 1
        message.state.last_attempt = time.time() if now is None else now

    def _noted(self, message: Message, outcomes: Dict[Tuple[str, str], List[str]]) -> None:
        """Log one attempt's outcomes: {(kind, reply): recipients}."""
        for (kind, reply), rcpts in outcomes.items():
            self.log.info("%s: %s id=%s domain=%s to=%s reply=%r", self.who, kind, message.id,
                     message.domain, ",".join("<%s>" % r for r in rcpts), reply)

    def _owes_success_notices(self) -> bool:
        """Are NOTIFY=SUCCESS notices ours (the receiver did not take them over)?"""
        return True

    def _counted(self, message: Message, results: Dict[str, Reply]) -> None:
        """For the metrics of those that count there."""

    def _relayed(self, message: Message, delivered: Dict[str, str]) -> None:
        """A success notice asked for (NOTIFY=SUCCESS) and owed by us: a courtesy, so a
        spool that cannot take it is logged, and the delivery stands."""
        try:
            notify_relayed(self.runtime, message, delivered)
        except (SpoolError, OSError) as exc:
            self.log.error("%s: cannot queue the relayed DSN for id=%s: %s", self.who, message.id, str(exc))

    def _bounce(self, message: Message, failed: Dict[str, str]) -> bool:
        """Queue the DSN for `failed`; False (and state.bounced unset) when it could not be.
        Tried once per session: a spool that refused it will refuse it again."""
        state = message.state
        state.bounced = False
        if message.id in self._dsn_failed:
            return False
        try:
            notify_failed(self.runtime, message, failed)
        except (SpoolError, OSError) as exc:
            self.log.error("%s: cannot queue DSN for id=%s: %s; message kept", self.who, message.id, str(exc))
            self._dsn_failed.add(message.id)
            self._unrecorded(message, "its DSN could not be queued")
            return False
        state.bounced = True
        return True

    def finish(self, message: Message) -> None:
        """Take a message whose recipients are all final out of the queue, once the DSN
        owed for its failures is queued (else it stays, the failures recorded)."""
        state = message.state
        if state.failed and not state.bounced:
            if not self._bounce(message, dict(state.failed)):
                self._save(message)
                return
        self._retire(message)

    def _retire(self, message: Message) -> bool:
        """Take the message out of the queue now; False when the spool would not."""
        return self._changed(message, self.spool.remove, "cannot take it out of the queue")

    def _save(self, message: Message) -> bool:
        message.has_state = True
        return self._changed(message, self.spool.save_state, "cannot save its state")

    def _changed(self, message: Message, change: Callable[[Message], None], failing: str) -> bool:
        """One write of the message's results; False (and `_unrecorded`) when refused."""
        try:
            change(message)
        except OSError as exc:
            self._unrecorded(message, "%s: %s" % (failing, describe_error(exc)))
            return False
        return True

    def _unrecorded(self, message: Message, why: str) -> None:
        """A result the spool would not take: the message stays as the spool has it."""
        self.log.error("%s: results of %s/%s not recorded: %s", self.who, message.domain,
                  message.id, why)


class Drain(Recorder):
    """One delivery session's dealings with the queue: messages out, results in."""

    def __init__(self, manager: QueueManager, runtime: Runtime, domains: Sequence[str], peer: str):
        super().__init__(runtime, manager.spool)
        self.manager = manager
        self.domains = list(domains)
        self.peer = peer
        self.defer_logs = False                 # the pipelined loop logs while replies travel
        # set when a result could not be recorded: delivery sends nothing more, reads the
        # replies still owed, and QUITs (SPEC §7: no message delivered twice)
        self.must_stop = False
        self.customer_dsn = False              # the customer offered DSN: it sends success notices
        self._log_later: List[tuple] = []
        self._removals = manager._removal_sync()
        manager.reaper.session(+1)
        runtime.metrics.activity.delivery_began(self)

    def messages(self, inline: int) -> Iterator[Tuple[Message, Optional[bytes], List[str]]]:
        """Each message still to deliver, oldest first per domain: the message, its text
        when at most `inline` bytes, its pending recipients. One whose recipients are all
        final (a crash came before its removal) is retired here."""
        for domain in self.domains:
            held = self.manager.remembered(domain)
            for message, body in self.spool.walk(domain, "quarantine", inline):
                kept = held.get(message.id)
                if kept is not None:             # results the spool does not have yet
                    message.state = _overlaid(message.state, kept.state)
                pending = message.pending()
                if not pending:
                    if kept is None:             # (a remembered one is retried at ATRN)
                        self.finish(message)
                    continue
                yield message, body, [r.address for r in pending]

    def text(self, message: Message) -> Iterator[bytes]:
        """A text too big to be held (`messages` gives the small ones whole) streamed in
        FILE_IO_SIZE-sized pieces: memory stays bounded whatever the size, and delivery still
        opens no file."""
        with message.open_data() as fh:
            while True:
                chunk = fh.read(FILE_IO_SIZE)
                if not chunk:
                    return
                yield chunk

    def close(self) -> None:
        """Every removal made durable before the session reports back."""
        self._removals.close()
        self.manager._closed(self._removals)

    def end(self) -> None:
        """The session is over: the reaper may go on; the domains' directories are synced."""
        self.close()
        self.manager.reaper.session(-1)
        self.runtime.metrics.activity.delivery_ended(self)
        for domain in self.domains:
            try:
                self.spool.sync_domain(domain)
            except OSError:
                pass

    # -- results ----------------------------------------------------------------
    def lost(self, message: Message, rcpts: int, error: str) -> None:
        """The connection broke with the message in flight: an attempt, nothing final."""
        self._attempted(message)
        message.state.last_error = error
        log.warning("delivery: deferred id=%s domain=%s: %s", message.id, message.domain, error)
        self.deferred += rcpts
        self.runtime.metrics.delivery_lost(self, rcpts)
        self._save(message)

    def flush_logs(self) -> None:
        """Log lines of recorded results (the pipelined loop writes them while replies travel)."""
        entries, self._log_later = self._log_later, []
        for kind, msg_id, domain, rcpts, reply in entries:
            log.info("delivery: %s id=%s domain=%s to=%s reply=%r", kind, msg_id, domain,
                     ",".join("<%s>" % r for r in rcpts), reply)

    def _noted(self, message: Message, outcomes: Dict[Tuple[str, str], List[str]]) -> None:
        for (kind, reply), rcpts in outcomes.items():
            self._log_later.append((kind, message.id, message.domain, rcpts, reply))
        if not self.defer_logs:
            self.flush_logs()

    def _owes_success_notices(self) -> bool:
        return not self.customer_dsn

    def _counted(self, message: Message, results: Dict[str, Reply]) -> None:
        self.runtime.metrics.delivery_recorded(self, message, results)

    def _retire(self, message: Message) -> bool:
        """Retired with one rename; the reaper frees it, the removal sync makes it durable."""
        try:
            retired = self.spool.retire(message, message.has_state)
        except OSError as exc:
            self._unrecorded(message, "cannot take it out of the queue: %s" % describe_error(exc))
            return False
        self.manager.forget(message)
        if retired:
            self.manager.reaper.put(message.domain, retired)
        self._removals.note(message.domain)
        return True

    def _save(self, message: Message) -> bool:
        if not super()._save(message):
            return False
        if not (message.state.failed and not message.state.bounced):
            self.manager.forget(message)         # (a DSN still owed keeps it remembered)
        return True

    def _unrecorded(self, message: Message, why: str) -> None:
        """A result the spool would not take: held in memory and the session ended (SPEC §7)."""
        self.manager.remember(message)
        log.error("delivery: results of %s/%s not recorded: %s; kept in memory, not offered "
                  "again, retried at the next ATRN; this session stops", message.domain,
                  message.id, why)
        self.must_stop = True


def _no_space(exc: Exception) -> bool:
    """A full disk or quota (which delivery itself relieves), not a spool that refuses changes."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)          # SpoolError from intake keeps only the reason's text
    return os.strerror(errno.ENOSPC) in text or os.strerror(errno.EDQUOT) in text


def _overlaid(state: State, kept: State) -> State:
    """The state a session holds in memory (`kept`), with anything the file has besides."""
    merged = copy.deepcopy(kept)
    for rcpt, reply in state.done.items():
        merged.done.setdefault(rcpt, reply)
    for rcpt, reply in state.failed.items():
        if rcpt not in merged.done:
            merged.failed.setdefault(rcpt, reply)
    merged.attempts = max(merged.attempts, state.attempts)
    merged.warned = merged.warned or state.warned
    return merged


# -- DSN hand-off ---------------------------------------------------------------
def notify_failed(runtime: Runtime, message: Message, failed: Dict[str, str]) -> None:
    """Queue a failure DSN for the recipients of `failed` whose sender wants one (RFC 3461
    NOTIFY). Raises SpoolError or OSError when it cannot be queued."""
    wanted = _dsn_wanted(message, failed)
    if wanted:
        send_dsn(runtime.spool, runtime.hosted_domains(), runtime.hostname, message, wanted)


def notify_delayed(runtime: Runtime, message: Message, reason: str) -> bool:
    """Queue an `Action: delayed` DSN for the pending recipients whose sender did not
    ask otherwise (RFC 3461 NOTIFY without DELAY, or NEVER); False if none was wanted."""
    wanted = {r.address: reason for r in message.pending()
              if not r.notify or "DELAY" in r.notify.upper()}
    return bool(wanted) and bool(send_dsn(runtime.spool, runtime.hosted_domains(),
                                          runtime.hostname, message, wanted, action="delayed"))


def notify_relayed(runtime: Runtime, message: Message, delivered: Dict[str, str]) -> None:
    """RFC 3461 §6.2.2.2: a customer without DSN took recipients whose sender asked for
    NOTIFY=SUCCESS; the notice that the message left DSN's reach is ours to send."""
    wanted = {r.address: delivered[r.address] for r in message.envelope.recipients
              if r.address in delivered and "SUCCESS" in r.notify.upper()}
    if wanted:
        send_dsn(runtime.spool, runtime.hosted_domains(), runtime.hostname, message, wanted,
                 action="relayed")


def return_to_sender(runtime: Runtime, message: Message, reply: str) -> None:
    """Take a message out of the queue, with a DSN for every recipient not yet notified
    (none for a bounce waiting in OUTBOUND: a bounce is never bounced)."""
    results = {r.address: reply for r in message.pending()}
    results.update({} if message.state.bounced else message.state.failed)
    if results and message.domain != OUTBOUND:
        send_dsn(runtime.spool, runtime.hosted_domains(), runtime.hostname, message, results)
    runtime.spool.remove(message)
    log_queue.info("queue: bounced id=%s domain=%s: %s", message.id, message.domain, reply)


def _dsn_wanted(message: Message, failed: Dict[str, str]) -> Dict[str, str]:
    """Failed recipients whose sender asked for failure notices (RFC 3461 NOTIFY)."""
    notify = {r.address: r.notify.upper() for r in message.envelope.recipients}
    wanted = {}
    for rcpt, reply in failed.items():
        flags = notify.get(rcpt, "")
        if flags and ("NEVER" in flags or "FAILURE" not in flags):
            continue
        wanted[rcpt] = reply
    return wanted


# -- acting on what a scan found --------------------------------------------------
def under_claim(spool: Spool, queue_name: str, wanted: Callable[[Message], bool],
                act: Callable[[Message], None], unreadable: Optional[str],
                found: Optional[List[str]] = None) -> List[Message]:
    """Scan a queue without its claim (ATRN is not kept waiting by a scan), then claim it
    and call `act` on each message found `wanted`, read again and re-checked under the
    claim (a session may have delivered or changed it meanwhile); returns those acted on.
    `found`: the ids to look at, instead of a scan. `unreadable`: the log line (domain,
    id, error) for a message that cannot be read again; None: raise its SpoolError.
    Raises DomainBusy, or LinkRefused for a link where the queue's lock belongs (logged
    by the spool)."""
    if found is None:
        found = [m.id for m, _ in spool.walk(queue_name, "skip") if wanted(m)]
    acted: List[Message] = []
    if not found:
        return acted
    with spool.claim([queue_name]):
        for msg_id in found:
            try:
                message = spool.load(queue_name, msg_id)
            except (FileNotFoundError, LinkRefused):     # gone, or a link (logged by the spool)
                continue
            except SpoolError as exc:   # CorruptMessage included: quarantine is delivery's business
                if unreadable is None:
                    raise
                log.error(unreadable, queue_name, msg_id, str(exc))
                continue
            if wanted(message):
                act(message)
                acted.append(message)
    return acted


# -- operator and maintenance changes (each called under the queue's claim) ----------
def drop(spool: Spool, message: Message) -> None:
    """Take a message out of the queue without a notice (`queue delete`, an expired bounce)."""
    spool.remove(message)


def drop_unusable(spool: Spool, queue_name: str, msg_id: str) -> None:
    """Take out a file that cannot be read or parsed (`queue delete` of a corrupt one)."""
    spool.discard(queue_name, msg_id)


def warn(runtime: Runtime, message: Message, reason: str) -> bool:
    """Send the one delay notice a message gets and remember it in its state; False when
    none was wanted or it could not be queued (then it is not remembered: tried again)."""
    try:
        sent = notify_delayed(runtime, message, reason)
    except (SpoolError, OSError) as exc:
        log_maintenance.error("maintenance: cannot queue a delay notice for %s/%s: %s",
                              message.domain, message.id, exc)
        return False
    message.state.warned = True
    runtime.spool.save_state(message)
    return sent


def expire_message(runtime: Runtime, message: Message, waited: str) -> bool:
    """A message not collected within max_age (`waited`, in words): returned to its sender
    with a DSN; True. A bounce waiting for the relay is dropped with an error line
    instead (a bounce is never bounced); False."""
    if message.domain == OUTBOUND:
        log_queue.error("queue: bounce id=%s to %s dropped: the bounce relay did not take "
                        "it within %s (last error: %s)", message.id,
                        ",".join(r.address for r in message.pending()), waited,
                        message.state.last_error or "none")
        drop(runtime.spool, message)
        return False
    reason = "550 5.4.7 Delivery time expired: not collected within %s" % waited
    if message.state.last_error:
        reason += " (last error: %s)" % message.state.last_error
    return_to_sender(runtime, message, reason)
    return True


# -- every queue, each under its claim (`queue expire`, the maintenance thread) --------
def _each_queue(spool: Spool, queue_names: Sequence[str], wanted: Callable[[Message], bool],
                act: Callable[[Message], None], unreadable: str) -> Dict[str, int]:
    """under_claim for each queue in turn; a busy queue (or a link where its lock
    belongs, logged by the spool) is left for the next pass: {"busy": n, "refused": n}."""
    skipped = {"busy": 0, "refused": 0}
    for queue_name in queue_names:
        try:
            under_claim(spool, queue_name, wanted, act, unreadable)
        except DomainBusy:
            skipped["busy"] += 1
        except LinkRefused:
            skipped["refused"] += 1
    return skipped


def expire_all(runtime: Runtime, now: Optional[float] = None) -> Dict[str, int]:
    """Bounce every message older than max_age; returns counts. Busy domains are skipped.
    Bounces waiting for the bounce relay (OUTBOUND) that old are dropped with an error
    line: a bounce is never bounced."""
    now = time.time() if now is None else now
    max_age = runtime.settings.queue.max_age
    counts = {"expired": 0, "busy": 0, "dropped": 0, "refused": 0}
    if max_age <= 0:
        return counts
    spool = runtime.spool
    waited = _in_words(max_age)

    def old(message: Message) -> bool:
        return now - message.envelope.arrival >= max_age

    def act(message: Message) -> None:
        counts["expired" if expire_message(runtime, message, waited) else "dropped"] += 1

    counts.update(_each_queue(spool, spool.domains() + [OUTBOUND], old, act,
                              "queue: %s/%s unreadable during expiry: %s"))
    return counts


def _in_words(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return "%g %s" % (round(seconds / size, 1), unit)
    return "%d seconds" % seconds


def warn_all(runtime: Runtime, now: Optional[float] = None) -> int:
    """Send one delay notice per message waiting longer than warn_after; returns how many."""
    now = time.time() if now is None else now
    warn_after = runtime.settings.queue.warn_after
    max_age = runtime.settings.queue.max_age
    sent = 0

    def due(message: Message) -> bool:
        age = now - message.envelope.arrival
        return (not message.state.warned and age >= warn_after
                and not (max_age > 0 and age >= max_age) and bool(message.pending()))

    def warn_one(message: Message) -> None:
        nonlocal sent
        if warn(runtime, message, _delay_reason(message.state.last_error)):
            sent += 1

    _each_queue(runtime.spool, runtime.spool.domains(), due, warn_one,
                "maintenance: %s/%s unreadable: %s")
    return sent


def _delay_reason(last_error: str) -> str:
    """A 4xx reply for an `Action: delayed` DSN (RFC 3464 wants a 4.x.x status there)."""
    if re.match(r"4\d\d ", last_error):
        return last_error
    if last_error and not last_error[:1].isdigit():         # e.g. "connection lost during delivery"
        return "451 4.4.1 " + last_error
    return "451 4.4.1 waiting for the recipient's server to collect it (ATRN)"


# -- background threads -------------------------------------------------------------
class _RemovalSync:
    """Makes removals durable on its own thread, a directory fsync covering every
    removal before it; `note()` blocks only while more than MAX_UNSYNCED wait."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self._cond = threading.Condition()
        self._pending: Dict[str, int] = {}
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    def note(self, domain: str) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="removal-sync", daemon=True)
                self._thread.start()
            self._pending[domain] = self._pending.get(domain, 0) + 1
            total = sum(self._pending.values())
            if total == 1 or total == MAX_UNSYNCED // 2:
                self._cond.notify_all()         # wake the syncer only when it has work to start
            while total > MAX_UNSYNCED and self._thread.is_alive():
                self._cond.wait(1.0)
                total = sum(self._pending.values())

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                # gather a few removals per fsync: each wake-up costs the delivery thread
                # a GIL hand-over, which is what limits the drain rate
                deadline = time.monotonic() + SYNC_GATHER
                while (not self._closed and sum(self._pending.values()) < MAX_UNSYNCED // 2
                       and time.monotonic() < deadline):
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
                batch = dict(self._pending)
            self._sync(batch)

    def _sync(self, batch: Dict[str, int]) -> None:
        for domain in batch:
            try:
                self.spool.sync_domain(domain)
            except OSError as exc:
                log.error("delivery: cannot sync spool directory of %s: %s", domain, str(exc))
        with self._cond:
            for domain, count in batch.items():
                left = self._pending.get(domain, 0) - count
                if left > 0:
                    self._pending[domain] = left
                else:
                    self._pending.pop(domain, None)
            self._cond.notify_all()

    def close(self) -> None:
        """Wait until every noted removal is durable, then let the thread end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


class _Reaper:
    """Unlinks retired messages on its own low-priority thread.

    Freeing a file's blocks is slow (ext4: ~0.15 ms of kernel time), so while
    any delivery session runs the reaper waits (up to REAP_BACKLOG files) and
    leaves the CPU to the sessions and the customers; the space comes back
    right after the drain."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self._queue: "queue.SimpleQueue[Optional[Tuple[str, str]]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._guard = threading.Lock()
        self._sessions = 0
        self._quiet = threading.Event()
        self._quiet.set()
        self._stopped = False

    def session(self, delta: int) -> None:
        """A delivery session starts (+1) or ends (-1)."""
        with self._guard:
            self._sessions += delta
            if self._sessions > 0:
                self._quiet.clear()
            else:
                self._quiet.set()

    def put(self, domain: str, name: str) -> None:
        """Unlink `name` in the domain's tmp/ later (a name Spool.retire returned)."""
        if self._stopped:
            self.spool.unlink_retired(domain, name)
            return
        self._queue.put((domain, name))
        if self._thread is None:
            with self._guard:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        lower_this_thread()
        while True:
            item = self._queue.get()
            if item is None:
                return
            while not self._quiet.is_set() and not self._stopped \
                    and self._queue.qsize() < REAP_BACKLOG:
                self._quiet.wait(1.0)
            self.spool.unlink_retired(*item)

    def stop(self) -> None:
        """Unlink whatever is still queued (so a clean stop leaves no debris); the thread ends."""
        self._stopped = True
        self._queue.put(None)
        with self._guard:
            thread = self._thread
        if thread is not None:
            thread.join(5.0)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self.spool.unlink_retired(*item)


# -- the bounce relay's share of the queue ----------------------------------------
@contextlib.contextmanager
def outbound_due(spool: Spool, now: float, delay: Callable[[int], float]
                 ) -> Iterator[Optional[Iterator[Tuple[Message, bool]]]]:
    """The bounces waiting for `[queue] bounce_relay`, under the OUTBOUND claim: each as
    (message, final) for those already final (their DSN was owed, or a crash came) and
    those due for another try after `delay(attempts)`. None when another process holds
    the queue: the relay only speaks SMTP and hands its results to a `Recorder`."""
    try:
        claim = spool.claim([OUTBOUND])
    except (DomainBusy, LinkRefused):
        yield None
        return
    with claim:
        yield _due(spool, now, delay)


def _due(spool: Spool, now: float, delay: Callable[[int], float]
         ) -> Iterator[Tuple[Message, bool]]:
    for message in spool.messages(OUTBOUND):
        state = message.state
        if not message.pending():
            yield message, True
        elif not state.attempts or now >= state.last_attempt + delay(state.attempts):
            yield message, False


def whole_text(message: Message) -> bytes:
    """A bounce's text in one piece (DSNs are small; the relay sends it with smtplib)."""
    return message.read_data()
