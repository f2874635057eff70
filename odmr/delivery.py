"""Delivery after the turnaround: odmrd is the SMTP client on the customer's connection.

Built on `smtplib.SMTP`, given the session's socket and its buffered reader
(so nothing the customer already sent is lost) in a `Handoff`. The SMTP client
only, like a Postfix delivery agent: the messages come from the queue manager
(`queuemgr`), and every reply goes back to it as one result per recipient; it
records them, spools DSNs and retires what is done. Nothing here opens a file.

Speed: with PIPELINING the end-of-data dot of one message travels in the same
write as the next message's MAIL/RCPT/DATA (RFC 2920 allows commands after
the data), so a message costs one round trip instead of two. Replies are
matched to commands through a queue of expectations; any reply that cannot
belong to the command it answers ends the session with everything in flight
kept (a crash may duplicate, never lose). Each message's results go back
before the next end-of-data dot goes out, and the queue manager retires a
delivered message at once; delivery waits only when more than MAX_UNSYNCED
removals are not yet durable. So a process crash re-delivers at most the one
message in flight, and a power failure at most MAX_UNSYNCED messages.
"""
from __future__ import annotations

import logging
import smtplib
import socket
import threading
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO, Deque, Dict, Iterator, List, Optional, Tuple

from odmr.queuemgr import Drain, QueueManager, reply_text
from odmr.runtime import Runtime
from odmr.spool import Message
from odmr.wire import dot_stuff

log = logging.getLogger("odmrd.delivery")

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


_fmt = reply_text


def _described(code: int, text: str) -> str:
    """A reply for a log line; garbage (code -1) said to be garbage."""
    return _fmt(code, text) if code >= 0 else ("garbage %r" % text)[:500]


@dataclass(frozen=True)
class Handoff:
    """What the ODMR session gives delivery at its 250 to ATRN: the connection and the
    claim, not the session itself. `stop` is the service's: when set, the message in
    flight is finished and the rest waits for the next ATRN."""
    sock: socket.socket
    rfile: BinaryIO                 # the session's buffered reader: nothing read ahead is lost
    peer: str
    implicit_tls: bool              # the connection began with TLS (an "odmrs" listener)
    domains: Tuple[str, ...]        # claimed by the session for as long as delivery runs
    runtime: Runtime
    queue: QueueManager
    stop: threading.Event


def deliver_reversed(handoff: Handoff) -> None:
    """Drive the reversed connection: greeting, EHLO, every message of the domains, QUIT."""
    runtime = handoff.runtime
    peer = handoff.peer
    one_line = handoff.implicit_tls and runtime.settings.odmr.one_line_per_tls_record
    client = ReversedClient(handoff.sock, handoff.rfile, runtime.hostname, one_line)
    drain = handoff.queue.drain(runtime, handoff.domains)
    drain.peer = peer                   # for `odmrd status`
    try:
        if not _introduce(client, peer):
            return
        run = Run(client, drain, peer, handoff.stop)
        try:
            clean = run.deliver_all()
        finally:
            drain.close()
        if clean:
            _quit(client)
        log.info("delivery: %s session done: %d delivered, %d deferred, %d bounced",
                 peer, drain.delivered, drain.deferred, drain.failed)
    except (ConnectionLost, OutOfStep, smtplib.SMTPException, OSError) as exc:
        log.warning("delivery: %s session ended: %s", peer, exc)
    finally:
        drain.end()


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


# -- one session's deliveries -------------------------------------------------
class Job:
    """One message on its way: the queued message, its text if small, what is left to do."""

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


class Run:
    """Delivers every message of some domains over one reversed connection."""

    def __init__(self, client: ReversedClient, queue: Drain, peer: str, stop: threading.Event):
        self.client = client
        self.queue = queue
        self.peer = peer
        features = client.esmtp_features if client.does_esmtp else {}
        self.pipelining = "pipelining" in features
        self.size = "size" in features
        self.eightbit = "8bitmime" in features
        self.smtputf8 = "smtputf8" in features
        self.dsn = "dsn" in features
        self._stop = stop

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
    def _jobs(self) -> Iterator[Job]:
        queue = self.queue
        for message, body, rcpts in queue.messages(INLINE_BODY):
            needs_utf8 = not message.envelope.sender.isascii() or not all(r.isascii() for r in rcpts)
            if needs_utf8 and not self.smtputf8:
                reply = (553, "5.6.7 Customer's server does not support SMTPUTF8")
                queue.record(message, {r: reply for r in rcpts})
                continue
            if message.envelope.body == "8BITMIME" and not self.eightbit and self._has_8bit(message, body):
                # RFC 6152 §3: convert or return it; odmrd does not rewrite MIME structure
                reply = (554, "5.6.3 Customer's server does not support 8BITMIME; "
                              "conversion to 7 bit not supported")
                queue.record(message, {r: reply for r in rcpts})
                continue
            yield Job(message, body, rcpts)

    def _has_8bit(self, message: Message, body: Optional[bytes]) -> bool:
        """Does the text really use 8 bits? (BODY=8BITMIME mail is often plain ASCII.)"""
        if body is not None:
            return not body.isascii()
        return not all(chunk.isascii() for chunk in self.queue.text(message))

    def deliver_all(self) -> bool:
        """Deliver everything; True when the conversation is still in step (QUIT may follow)."""
        jobs = self._jobs()
        if self.pipelining:
            return self._pipelined(jobs)
        for job in jobs:
            if self._stop.is_set() or self.queue.must_stop:
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
        self.queue.defer_logs = True
        try:
            while True:
                job = None
                if not self._stop.is_set() and not self.queue.must_stop:
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
                self.queue.flush_logs()            # while the replies travel: log, read the next message
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
            self.queue.defer_logs = False
            self.queue.flush_logs()

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
        for chunk in self.queue.text(job.message):
            client.send(dot_stuff(chunk, at_line_start))
            at_line_start = chunk.endswith(b"\n")
            last = chunk[-1:]
        return b".\r\n" if last == b"\n" else b"\r\n.\r\n"

    # -- results: back to the queue manager -------------------------------------
    def _lost(self, jobs: List[Job], exc: BaseException) -> None:
        """The connection broke (or went out of step): an attempt for what was in flight."""
        for job in jobs:
            if not job.sent:
                continue
            job.sent = False
            self.queue.lost(job.message, len(job.rcpts), "connection lost during delivery: %s" % exc)
        jobs.clear()

    def _complete(self, job: Job) -> None:
        job.sent = False                        # results recorded: nothing left to count as lost
        self.queue.record(job.message, job.results)


def _ok(reply: Reply) -> bool:
    return 200 <= reply[0] < 300
