"""Delivery after the turnaround: odmrd is the SMTP client on the customer's connection.

Built on `smtplib.SMTP`, given the session's socket and its buffered reader
(so nothing the customer already sent is lost). One result per recipient:
2xx done, 5xx failed (a DSN goes to the sender), 4xx kept for the next ATRN.
A message leaves the spool only when all its recipients have a final result.

Speed: with PIPELINING the end-of-data dot of one message travels in the same
write as the next message's MAIL/RCPT/DATA (RFC 2920 allows commands after
the data), so a message costs one round trip instead of two. Replies are
matched to commands through a queue of expectations; any reply that cannot
belong to the command it answers ends the session with everything in flight
kept (a crash may duplicate, never lose). A fully delivered message is
retired at once, and a background thread fsyncs the directory behind it, a
few removals per fsync; delivery waits only when more than MAX_UNSYNCED
removals are not yet durable. So a process crash re-delivers at most the one
message in flight, and a power failure at most MAX_UNSYNCED messages.
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import smtplib
import socket
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Tuple

from odmr.bounce import send_dsn
from odmr.spool import CHUNK, CorruptMessage, LinkRefused, Message, Spool, SpoolError, State, parse_envelope
from odmr.logline import escape_for_log
from odmr.wire import dot_stuff

log = logging.getLogger("odmrd.delivery")

MAX_UNSYNCED = 32              # removals not yet fsync'd before delivery waits (power-loss bound)
SYNC_GATHER = 0.002            # seconds the syncer waits to cover several removals with one fsync
REAP_BACKLOG = 20000          # retired files the reaper lets pile up while sessions run
INLINE_BODY = 512 * 1024       # bodies up to this size are read whole and sent in one write
MAX_REPLY_LINE = 2048
MAX_REPLY_LINES = 100

Reply = Tuple[int, str]


@dataclass
class Timeouts:
    """RFC 5321 section 4.5.3.2 client timeouts (seconds). Tests swap in a shorter set."""
    greeting: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    quit: float = 60.0


TIMEOUTS = Timeouts()


class ConnectionLost(Exception):
    """The customer went away or stopped answering; the rest waits for the next ATRN."""


class OutOfStep(Exception):
    """A reply that cannot answer the command it is matched with: stop talking."""


# -- stopping -----------------------------------------------------------------
_stop_events: "weakref.WeakKeyDictionary[Spool, threading.Event]" = weakref.WeakKeyDictionary()
_stop_guard = threading.Lock()


def _stop_event(spool: Spool) -> threading.Event:
    with _stop_guard:
        event = _stop_events.get(spool)
        if event is None:
            event = _stop_events[spool] = threading.Event()
        return event


def request_stop(spool: Spool) -> None:
    """Graceful stop: sessions on `spool` finish the message in flight, then QUIT."""
    _stop_event(spool).set()


# -- the client ---------------------------------------------------------------
class ReversedClient(smtplib.SMTP):
    """smtplib on an already-open connection whose greeting has not been read yet."""

    ehlo_msg = "EHLO"

    def __init__(self, sock: socket.socket, rfile, local_hostname: str, one_line_per_write: bool = False):
        super().__init__(local_hostname=local_hostname, timeout=TIMEOUTS.greeting)
        self.sock = sock
        self.file = rfile
        self.one_line_per_write = one_line_per_write
        self._current_timeout: Optional[float] = None

    def putcmd(self, cmd: str, args: str = "") -> None:
        super().putcmd(cmd.upper(), args)

    def set_timeout(self, seconds: float) -> None:
        """settimeout() costs a system call; only make it when the value changes."""
        if seconds != self._current_timeout:
            self.sock.settimeout(seconds)
            self._current_timeout = seconds

    def send(self, s) -> None:
        if isinstance(s, str):
            s = s.encode("utf-8")
        try:
            if self.one_line_per_write:
                # one TLS record per line: fetchmail stalls on records carrying several lines
                for line in s.splitlines(keepends=True):
                    self.sock.sendall(line)
            else:
                self.sock.sendall(s)
        except OSError as exc:
            raise smtplib.SMTPServerDisconnected("write failed: %s" % exc) from None

    def getreply(self):
        """smtplib's hook, routed through our stricter reader (garbage -> code -1)."""
        code, text = self.read_reply()
        # never (-1, ""): smtplib's ehlo() takes that for a hang-up and closes our socket
        return code, (text or ("(empty line)" if code < 0 else "")).encode("utf-8")

    def read_reply(self) -> Reply:
        """One (possibly multi-line) reply; (-1, text) when it is not SMTP at all."""
        lines: List[str] = []
        code = b""
        try:
            while True:
                raw = self.file.readline(MAX_REPLY_LINE)
                if not raw:
                    raise ConnectionLost("connection closed by the customer")
                line = raw.rstrip(b"\r\n")
                this = line[:3]
                if len(line) < 3 or not this.isdigit() or line[3:4] not in (b"", b" ", b"-") \
                        or (code and this != code) or len(lines) >= MAX_REPLY_LINES:
                    return -1, line[:200].decode("utf-8", "replace")
                code = this
                lines.append(line[4:].decode("utf-8", "replace"))
                if line[3:4] != b"-":
                    return int(code), "\n".join(lines)
        except socket.timeout:
            raise ConnectionLost("timeout waiting for the customer's reply") from None
        except (OSError, ValueError) as exc:
            raise ConnectionLost("read failed: %s" % exc) from None

    def reply_at(self, timeout: float) -> Reply:
        self.set_timeout(timeout)
        return self.read_reply()


def _fmt(code: int, text: str) -> str:
    """A customer's reply as stored (last_error), logged and quoted in DSNs: one line, its
    control and format characters escaped (they would reach an operator's terminal)."""
    return escape_for_log("%d %s" % (code, " ".join(text.split())))[:500]


def _described(code: int, text: str) -> str:
    """A reply for a log line; garbage (code -1) said to be garbage."""
    return _fmt(code, text) if code >= 0 else ("garbage %r" % text)[:500]


def deliver_reversed(session, domains: Sequence[str]) -> None:
    """Drive the reversed connection: greeting, EHLO, every message of `domains`, QUIT."""
    runtime = session.runtime
    peer = session.peer
    one_line = bool(getattr(session, "implicit_tls", False)) and \
        runtime.settings.odmr.one_line_per_tls_record
    client = ReversedClient(session.sock, session.rfile, runtime.hostname, one_line)
    run: Optional[Run] = None
    _reaper.session(+1)
    try:
        if not _introduce(client, peer):
            return
        run = Run(client, runtime, peer)
        try:
            clean = run.deliver_all(domains)
        finally:
            run.close()
        if clean:
            _quit(client)
        log.info("delivery: %s session done: %d delivered, %d deferred, %d bounced",
                 peer, run.delivered, run.deferred, run.failed)
    except (ConnectionLost, OutOfStep, smtplib.SMTPException, OSError) as exc:
        log.warning("delivery: %s session ended: %s", peer, exc)
    finally:
        _reaper.session(-1)
        for domain in domains:
            try:
                runtime.spool.sync_domain(domain)
            except OSError:
                pass


def _introduce(client: ReversedClient, peer: str) -> bool:
    """The customer's 220, then EHLO (HELO if EHLO is refused).

    False when the customer will not have us: then nothing was sent, nothing
    counts as a delivery attempt, QUIT went out and one line was logged."""
    stage = "greeting"
    try:
        code, text = client.reply_at(TIMEOUTS.greeting)
        if code != 220:
            log.warning("delivery: %s greeted with %s; nothing sent, mail kept",
                        peer, _described(code, text))
            _quit(client)
            return False
        client.set_timeout(TIMEOUTS.mail)
        stage = "EHLO"
        ehlo = _hello(client.ehlo)
        if 200 <= ehlo[0] < 300:
            return True
        if ehlo[0] == 421 or not 400 <= ehlo[0] < 600:
            # going away, or not speaking SMTP: a HELO now could be answered out of step
            log.warning("delivery: customer at %s refused EHLO: %s; nothing sent, mail kept",
                        peer, _described(*ehlo))
            _quit(client)
            return False
        stage = "HELO"
        helo = _hello(client.helo)
        if 200 <= helo[0] < 300:
            return True
        log.warning("delivery: customer at %s refused EHLO and HELO: %s / %s; nothing sent, mail kept",
                    peer, _described(*ehlo), _described(*helo))
        _quit(client)
        return False
    except (ConnectionLost, smtplib.SMTPServerDisconnected) as exc:
        log.warning("delivery: customer at %s gone at %s: %s; nothing sent, mail kept", peer, stage, exc)
        return False


def _hello(command) -> Reply:
    """smtplib's ehlo() or helo() as (code, text); garbage is (-1, text)."""
    code, text = command()
    return code, text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def _quit(client: ReversedClient) -> None:
    try:
        client.send("QUIT\r\n")
        client.reply_at(TIMEOUTS.quit)
    except (ConnectionLost, smtplib.SMTPException, OSError):
        pass


# -- reading the queue quickly ------------------------------------------------
class Job:
    """One message on its way: the spool record, its body if small, what is left to do."""

    __slots__ = ("message", "payload", "rcpts", "results", "accepted", "mail_ok", "sent")

    def __init__(self, message: Message, body: Optional[bytes], rcpts: List[str]):
        self.message = message
        self.payload: Optional[bytes] = None   # small messages: stuffed text and terminator, ready to send
        if body is not None:
            tail = b".\r\n" if not body or body.endswith(b"\n") else b"\r\n.\r\n"
            self.payload = dot_stuff(body, True) + tail
        self.rcpts = rcpts
        self.results: Dict[str, Reply] = {}
        self.accepted: List[str] = []
        self.mail_ok = False
        self.sent = False                      # commands went out: an attempt to count if lost


def queued_messages(spool: Spool, domain: str) -> Iterator[Tuple[Message, Optional[bytes], bool]]:
    """Messages of a domain, oldest first, each read with one open().

    A corrupt file is quarantined and an unreadable one skipped (with a log line):
    neither stops the rest of the domain from being delivered. Nothing is followed
    through a symbolic link: the spool logs a link and leaves it alone."""
    directory = spool.domain_dir(domain)
    ids, with_state = spool.listing(domain)
    for msg_id in ids:
        try:
            has_state = msg_id in with_state
            message, body = _load(spool, domain, directory, msg_id, has_state)
        except (FileNotFoundError, LinkRefused):
            continue                           # removed meanwhile (queue delete), or a link (logged)
        except CorruptMessage as exc:
            spool.quarantine(domain, msg_id, str(exc))
            continue
        except IsADirectoryError:
            spool.quarantine(domain, msg_id, "a directory where a message should be")
            continue
        except (SpoolError, OSError) as exc:
            log.error("delivery: %s/%s unreadable, skipped: %s", domain, msg_id, exc)
            continue
        yield message, body, has_state


def _load(spool: Spool, domain: str, directory: str, msg_id: str,
          has_state: bool) -> Tuple[Message, Optional[bytes]]:
    path = os.path.join(directory, msg_id)
    fd = spool.open_message(domain, msg_id)
    try:
        total = os.fstat(fd).st_size
        if total <= INLINE_BODY:
            head = _read_exactly(fd, total)
            size_known = True
        else:
            head = _read_exactly(fd, CHUNK)
            size_known = False
            while b"\n\n" not in head and len(head) < 16 * CHUNK:
                more = os.read(fd, CHUNK)
                if not more:
                    break
                head += more
    finally:
        os.close(fd)
    envelope, offset = parse_envelope(domain, msg_id, head)
    state = spool.load_state(domain, msg_id) if has_state else State()
    message = Message(domain, msg_id, path, envelope, offset, total - offset, state)
    body = head[offset:] if size_known else None
    return message, body


def _read_exactly(fd: int, size: int) -> bytes:
    data = os.read(fd, size)
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            break
        data += more
    return data


# -- one session's deliveries -------------------------------------------------
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
            for domain in batch:
                try:
                    self.spool.sync_domain(domain)
                except OSError as exc:
                    log.error("delivery: cannot sync spool directory of %s: %s", domain, exc)
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
        if thread is not None:
            thread.join()


class Run:
    """Delivers every message of some domains over one reversed connection."""

    def __init__(self, client: ReversedClient, runtime, peer: str):
        self.client = client
        self.runtime = runtime
        self.spool: Spool = runtime.spool
        self.peer = peer
        features = client.esmtp_features if client.does_esmtp else {}
        self.pipelining = "pipelining" in features
        self.size = "size" in features
        self.eightbit = "8bitmime" in features
        self.smtputf8 = "smtputf8" in features
        self.dsn = "dsn" in features
        self.delivered = self.deferred = self.failed = 0
        self._stop = _stop_event(self.spool)
        self._removals = _RemovalSync(self.spool)
        self._with_state = set()                # ids that have a .state file to remove with them
        self._log_later: List[tuple] = []
        self._defer_logs = False

    # -- commands -----------------------------------------------------------
    def _mail_command(self, message: Message) -> str:
        env = message.envelope
        options = []
        if self.size:
            options.append("SIZE=%d" % message.size)
        if env.body == "8BITMIME" and self.eightbit:
            options.append("BODY=8BITMIME")
        if env.smtputf8 and self.smtputf8:
            options.append("SMTPUTF8")
        if self.dsn:
            if env.ret:
                options.append("RET=" + env.ret)
            if env.envid:
                options.append("ENVID=" + env.envid)
        return "MAIL FROM:<%s>%s\r\n" % (env.sender, "".join(" " + o for o in options))

    def _rcpt_commands(self, job: Job) -> str:
        params = {}
        if self.dsn:
            for r in job.message.envelope.recipients:
                extra = (" NOTIFY=" + r.notify if r.notify else "") + (" ORCPT=" + r.orcpt if r.orcpt else "")
                params[r.address] = extra
        return "".join("RCPT TO:<%s>%s\r\n" % (r, params.get(r, "")) for r in job.rcpts)

    # -- the queue ------------------------------------------------------------
    def _jobs(self, domains: Sequence[str]) -> Iterator[Job]:
        for domain in domains:
            for message, body, has_state in queued_messages(self.spool, domain):
                if has_state:
                    self._with_state.add(message.id)
                pending = message.pending()
                if not pending:                 # every recipient final (crash before removal)
                    self._finish(message)
                    continue
                rcpts = [r.address for r in pending]
                needs_utf8 = not message.envelope.sender.isascii() or not all(r.isascii() for r in rcpts)
                if needs_utf8 and not self.smtputf8:
                    reply = (553, "5.6.7 Customer's server does not support SMTPUTF8")
                    self._record(message, {r: reply for r in rcpts})
                    continue
                if message.envelope.body == "8BITMIME" and not self.eightbit and _has_8bit(message, body):
                    # RFC 6152 §3: convert or return it; odmrd does not rewrite MIME structure
                    reply = (554, "5.6.3 Customer's server does not support 8BITMIME; "
                                  "conversion to 7 bit not supported")
                    self._record(message, {r: reply for r in rcpts})
                    continue
                yield Job(message, body, rcpts)

    def close(self) -> None:
        """Every removal made durable before the session reports back."""
        self._removals.close()

    def deliver_all(self, domains: Sequence[str]) -> bool:
        """Deliver everything; True when the conversation is still in step (QUIT may follow)."""
        jobs = self._jobs(domains)
        if self.pipelining:
            return self._pipelined(jobs)
        for job in jobs:
            if self._stop.is_set():
                log.info("delivery: %s stopping: the rest waits for the next ATRN", self.peer)
                break
            self._serial(job)
        return True

    # -- without PIPELINING: one command, one reply ----------------------------
    def _serial(self, job: Job) -> None:
        client = self.client
        try:
            job.sent = True
            client.send(self._mail_command(job.message))
            mail = self._expect(client.reply_at(TIMEOUTS.mail), "MAIL")
            if not _ok(mail):
                job.results = {r: mail for r in job.rcpts}
                self._complete(job)
                self._after_421(mail)
                return
            job.mail_ok = True
            lines = [line + "\r\n" for line in self._rcpt_commands(job).split("\r\n") if line]
            for rcpt, line in zip(job.rcpts, lines):
                client.send(line)
                reply = self._expect(client.reply_at(TIMEOUTS.rcpt), "RCPT")
                if reply[0] == 421:             # the customer is going away: nothing more for it
                    job.results = {r: job.results.get(r, reply) for r in job.rcpts}
                    self._complete(job)
                    self._after_421(reply)
                self._rcpt_reply(job, rcpt, reply)
            if not job.accepted:
                self._complete(job)
                self._reset()
                return
            client.send("DATA\r\n")
            data = client.reply_at(TIMEOUTS.data_init)
            if data[0] != 354:
                self._expect(data, "DATA")
                if _ok(data):
                    raise OutOfStep("reply to DATA out of step: %s" % _fmt(*data))
                for r in job.accepted:
                    job.results[r] = data
                self._complete(job)
                self._after_421(data)
                self._reset()
                return
            tail = self._send_body(job)
            client.send(tail)
            final = self._expect(client.reply_at(TIMEOUTS.data_end), "end of data")
            for r in job.accepted:
                job.results[r] = final
            self._complete(job)
            self._after_421(final)
        except (ConnectionLost, OutOfStep, smtplib.SMTPException, OSError) as exc:
            self._lost([job], exc)
            raise

    def _reset(self) -> None:
        self.client.send("RSET\r\n")
        self._expect(self.client.reply_at(TIMEOUTS.mail), "RSET")

    # -- with PIPELINING: the dot travels with the next MAIL/RCPT/DATA ----------
    def _pipelined(self, jobs: Iterator[Job]) -> bool:
        client = self.client
        Expect = Tuple[str, Optional[Job], str]            # (kind, job, recipient)
        expect: Deque[Expect] = deque()                    # replies owed for what was sent
        later: List[Expect] = []                           # replies owed for what is in `outbox`
        outbox: List[bytes] = []
        in_flight: List[Job] = []
        timeouts = TIMEOUTS
        # One timeout for a whole round of replies (the longest that any of them may take):
        # RFC 5321 timeouts are lower bounds, and settimeout() is a system call.
        wait = max(timeouts.mail, timeouts.rcpt, timeouts.data_init, timeouts.data_end)
        upcoming = next(jobs, None)
        self._defer_logs = True
        try:
            while True:
                job = None
                if not self._stop.is_set():
                    job, upcoming = upcoming, None
                elif in_flight or outbox:
                    log.info("delivery: %s stopping: the rest waits for the next ATRN", self.peer)
                if job is not None:
                    job.sent = True
                    in_flight.append(job)
                    outbox.append((self._mail_command(job.message) + self._rcpt_commands(job)
                                   + "DATA\r\n").encode("utf-8"))
                    later.append(("MAIL", job, ""))
                    later.extend(("RCPT", job, r) for r in job.rcpts)
                    later.append(("DATA", job, ""))
                if not outbox:
                    return True
                client.send(b"".join(outbox))
                outbox = []
                expect.extend(later)
                later = []
                self._flush_logs()                 # while the replies travel: log, read the next message
                if job is not None:
                    upcoming = next(jobs, None)
                client.set_timeout(wait)
                while expect:
                    kind, item, rcpt = expect.popleft()
                    reply = client.read_reply()
                    if kind == "DATA" and reply[0] == 354:
                        if item.mail_ok and item.accepted:
                            outbox.append(self._send_body(item))
                            client.set_timeout(wait)
                            later.append(("FINAL", item, ""))
                            continue
                        outbox.append(b".\r\n")          # out-of-step server opened DATA anyway
                        later.append(("DISCARD", None, ""))
                    else:
                        reply = self._expect(reply, kind)
                        if kind == "DATA" and _ok(reply):
                            raise OutOfStep("reply to DATA out of step: %s" % _fmt(*reply))
                    if kind == "MAIL":
                        item.mail_ok = _ok(reply)
                        if not item.mail_ok:
                            item.results = {r: reply for r in item.rcpts}
                    elif kind == "RCPT":
                        if item.mail_ok:
                            self._rcpt_reply(item, rcpt, reply)
                    elif kind in ("DATA", "FINAL"):
                        if reply[0] != 354:
                            for r in item.accepted:
                                item.results[r] = reply
                        if kind == "DATA" and item.mail_ok and reply[0] != 421:
                            outbox.append(b"RSET\r\n")   # close the half-open transaction
                            later.append(("RSET", None, ""))
                        in_flight.remove(item)
                        # recorded (and retired) before the next end-of-data dot goes out:
                        # a crash then re-delivers at most the one message in flight
                        self._complete(item)
                    if reply[0] == 421:
                        return self._closing(in_flight, reply)
        except (ConnectionLost, OutOfStep, smtplib.SMTPException, OSError) as exc:
            self._lost(in_flight, exc)
            raise
        finally:
            self._defer_logs = False
            self._flush_logs()

    def _closing(self, in_flight: List[Job], reply: Reply) -> bool:
        """The customer said 421: it is going away; what is in flight waits."""
        self._lost(in_flight, ConnectionLost("customer closing: %s" % _fmt(*reply)))
        return False

    def _after_421(self, reply: Reply) -> None:
        if reply[0] == 421:
            raise ConnectionLost("customer closing: %s" % _fmt(*reply))

    # -- replies ----------------------------------------------------------------
    def _expect(self, reply: Reply, what: str) -> Reply:
        """A reply to a command other than DATA must be 2xx, 4xx or 5xx."""
        code = reply[0]
        if not (200 <= code < 300 or 400 <= code < 600):
            raise OutOfStep("reply to %s out of step or garbled: %s" % (what, _fmt(*reply)))
        return reply

    def _rcpt_reply(self, job: Job, rcpt: str, reply: Reply) -> None:
        if _ok(reply):
            job.accepted.append(rcpt)
        else:
            job.results[rcpt] = reply

    def _send_body(self, job: Job) -> bytes:
        """Send the message text; return the terminator (sent with the next commands)."""
        client = self.client
        if job.payload is not None:
            return job.payload
        client.set_timeout(TIMEOUTS.data_block)
        at_line_start = True
        last = b"\n"
        with job.message.open_data() as fh:
            while True:
                chunk = fh.read(CHUNK)
                if not chunk:
                    break
                client.send(dot_stuff(chunk, at_line_start))
                at_line_start = chunk.endswith(b"\n")
                last = chunk[-1:]
        return b".\r\n" if last == b"\n" else b"\r\n.\r\n"

    # -- results ----------------------------------------------------------------
    def _lost(self, jobs: List[Job], exc: BaseException) -> None:
        """The connection broke (or went out of step): count an attempt for what was in flight."""
        for job in jobs:
            if not job.sent:
                continue
            state = job.message.state
            state.attempts += 1
            state.last_attempt = time.time()
            state.last_error = "connection lost during delivery: %s" % exc
            log.warning("delivery: deferred id=%s domain=%s: %s", job.message.id, job.message.domain,
                        state.last_error)
            self.deferred += len(job.rcpts)
            job.sent = False
            self._save(job.message)
        jobs.clear()

    def _flush_logs(self) -> None:
        """Log lines of recorded results (the pipelined loop writes them while replies travel)."""
        entries, self._log_later = self._log_later, []
        for kind, msg_id, domain, rcpts, reply in entries:
            log.info("delivery: %s id=%s domain=%s to=%s reply=%r", kind, msg_id, domain,
                     ",".join("<%s>" % r for r in rcpts), reply)

    def _complete(self, job: Job) -> None:
        job.sent = False                        # results recorded: nothing left to count as lost
        self._record(job.message, job.results)

    def _record(self, message: Message, results: Dict[str, Reply]) -> None:
        state = message.state
        state.attempts += 1
        state.last_attempt = time.time()
        outcomes: Dict[Tuple[str, str], List[str]] = {}
        errors: List[str] = []                  # temporary: why recipients are still waiting
        permanent: List[str] = []
        newly_failed: Dict[str, str] = {}
        for rcpt, (code, text) in results.items():
            reply = _fmt(code, text)
            if 200 <= code < 300:
                state.done[rcpt] = reply
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
        for (kind, reply), rcpts in outcomes.items():
            self._log_later.append((kind, message.id, message.domain, rcpts, reply))
        if not self._defer_logs:
            self._flush_logs()
        if errors or permanent:
            # what keeps the message queued, not another recipient's final refusal
            state.last_error = (errors or permanent)[0]
        if newly_failed:
            # tell the sender now about the recipients that failed for good, not when the
            # others are finally collected (state.bounced: every failure so far was notified)
            self._bounce(message, newly_failed if state.bounced else dict(state.failed))
        if not message.pending():
            self._finish(message)
        else:
            self._save(message)

    def _bounce(self, message: Message, failed: Dict[str, str]) -> bool:
        """Queue the DSN for `failed`; False (and state.bounced unset) when it could not be."""
        state = message.state
        wanted = _dsn_wanted(message, failed)
        try:
            if wanted:
                send_dsn(self.spool, self.runtime.hosted_domains(), self.runtime.hostname,
                         message, wanted)
        except (SpoolError, OSError) as exc:
            log.error("delivery: cannot queue DSN for id=%s: %s; message kept", message.id, exc)
            state.bounced = False
            return False
        state.bounced = True
        return True

    def _finish(self, message: Message) -> None:
        state = message.state
        if state.failed and not state.bounced:
            if not self._bounce(message, dict(state.failed)):
                self._save(message)
                return
        retired = self.spool.retire(message, message.id in self._with_state)
        if retired:
            _reaper.put(self.spool, message.domain, retired)
        self._removals.note(message.domain)

    def _save(self, message: Message) -> None:
        self._with_state.add(message.id)
        try:
            self.spool.save_state(message)
        except OSError as exc:
            log.error("delivery: cannot save state of id=%s: %s", message.id, exc)


class _Reaper:
    """Unlinks retired messages on its own low-priority thread.

    Freeing a file's blocks is slow (ext4: ~0.15 ms of kernel time), so while
    any delivery session runs the reaper waits (up to REAP_BACKLOG files) and
    leaves the CPU to the sessions and the customers; the space comes back
    right after the drain."""

    def __init__(self):
        self._queue: "queue.SimpleQueue[Tuple[Spool, str, str]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._guard = threading.Lock()
        self._sessions = 0
        self._quiet = threading.Event()
        self._quiet.set()

    def session(self, delta: int) -> None:
        """A delivery session starts (+1) or ends (-1)."""
        with self._guard:
            self._sessions += delta
            if self._sessions > 0:
                self._quiet.clear()
            else:
                self._quiet.set()

    def put(self, spool: Spool, domain: str, name: str) -> None:
        """Unlink `name` in the domain's tmp/ later (a name Spool.retire returned)."""
        self._queue.put((spool, domain, name))
        if self._thread is None:
            with self._guard:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        try:   # Linux: a thread has its own nice value; let delivery and the customer go first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while True:
            spool, domain, name = self._queue.get()
            while not self._quiet.is_set() and self._queue.qsize() < REAP_BACKLOG:
                self._quiet.wait(1.0)
            spool.unlink_retired(domain, name)

    def drain(self) -> None:
        """Unlink whatever is still queued (at exit, so a clean stop leaves no debris)."""
        while True:
            try:
                spool, domain, name = self._queue.get_nowait()
            except queue.Empty:
                return
            spool.unlink_retired(domain, name)


_reaper = _Reaper()
atexit.register(_reaper.drain)


def _has_8bit(message: Message, body: Optional[bytes]) -> bool:
    """Does the text really use 8 bits? (BODY=8BITMIME mail is often plain ASCII.)"""
    if body is not None:
        return not body.isascii()
    with message.open_data() as fh:
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                return False
            if not chunk.isascii():
                return True


def _ok(reply: Reply) -> bool:
    return 200 <= reply[0] < 300


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
