"""Delivery after the turnaround: odmrd is the SMTP client on the customer's connection.

Built on `smtplib.SMTP`, given the session's socket and its buffered reader
(so nothing the customer already sent is lost) in a `Handoff`. The SMTP client
only, like a Postfix delivery agent: the messages come from the queue manager
(`queuemgr`) and every reply goes back to it as one result per recipient. What a
reply means for the message (its state, a DSN, its retirement) is decided and
written there, so that delivery and the bounce relay share one recording and
nothing here opens a file.

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

Long links: when the customer offers CHUNKING too, each message goes out whole
(MAIL, RCPTs, `BDAT n LAST` and its bytes, no 354 to wait for) and up to
`[odmr] delivery_window` messages are on the wire before the oldest one's
results are read; replies are still matched one per command, in order, and a
message is recorded only from its own replies. A crash or a lost connection
then re-delivers at most `delivery_window` messages.
"""
from __future__ import annotations

import contextlib
import logging
import smtplib
import socket
import threading
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO, Deque, Dict, Iterator, List, Optional, Tuple, Union

from odmr.folding import LineBreaker, break_long_lines
from odmr.queuemgr import Drain, QueueManager, reply_text
from odmr.runtime import Runtime
from odmr.spool import Message
from odmr.transport import untransportable
from odmr.wire import BadReply, ReplyClosed, dot_stuff, read_reply

log = logging.getLogger("odmrd.delivery")

INLINE_BODY = 512 * 1024       # bodies up to this size are read whole and sent in one write
WRITE_BATCH = 256 * 1024       # windowed delivery: messages gathered into one write up to this size

Reply = Tuple[int, str]


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 section 4.5.3.2 client timeouts (seconds); the service hands its own to
    every delivery (tests give their provider a shorter set)."""
    greeting: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    quit: float = 60.0


class ConnectionLost(Exception):
    """The customer went away or stopped answering; the rest waits for the next ATRN."""


class OutOfStep(Exception):
    """A reply that cannot answer the command it is matched with: stop talking."""


# -- the client ---------------------------------------------------------------
class ReversedClient(smtplib.SMTP):
    """smtplib on an already-open connection whose greeting has not been read yet."""

    ehlo_msg = "EHLO"

    def __init__(self, sock: socket.socket, rfile: BinaryIO, local_hostname: str,
                 one_line_per_write: bool = False, stop: Optional[threading.Event] = None,
                 timeouts: Timeouts = Timeouts()):
        super().__init__(local_hostname=local_hostname, timeout=timeouts.greeting)
        self.timeouts = timeouts
        self.sock = sock
        self.file = rfile
        self.one_line_per_write = one_line_per_write
        self._current_timeout: Optional[float] = None
        self._stop = stop

    def putcmd(self, cmd: str, args: str = "") -> None:
        super().putcmd(cmd.upper(), args)

    def set_timeout(self, seconds: float) -> None:
        """settimeout() costs a system call; only make it when the value changes."""
        if seconds != self._current_timeout:
            self.sock.settimeout(seconds)
            self._current_timeout = seconds

    def send(self, s: Union[str, bytes]) -> None:
        """Write everything; a customer that stops reading is cut at the data-block timeout."""
        if isinstance(s, str):
            s = s.encode("utf-8")
        self.set_timeout(self.timeouts.data_block)
        try:
            if self.one_line_per_write:
                # one TLS record per line: fetchmail stalls on records carrying several lines
                for line in s.splitlines(keepends=True):
                    self.sock.sendall(line)
            else:
                self.sock.sendall(s)
        except socket.timeout:
            raise ConnectionLost("timeout after %g s waiting to send data"
                                 % self.timeouts.data_block) from None
        except OSError as exc:
            raise ConnectionLost(self._gone("write failed: %s" % exc)) from None

    def _gone(self, why: str) -> str:
        """Why the connection failed; a cut made by the stopping service says so."""
        if self._stop is not None and self._stop.is_set():
            return "cut: the service is stopping (grace period over)"
        return why

    def getreply(self) -> Tuple[int, bytes]:
        """smtplib's hook, routed through our stricter reader (garbage -> code -1)."""
        self.set_timeout(self.timeouts.mail)
        code, text = self.read_reply("EHLO")
        # never (-1, ""): smtplib's ehlo() takes that for a hang-up and closes our socket
        return code, (text or ("(empty line)" if code < 0 else "")).encode("utf-8")

    def read_reply(self, what: str = "command") -> Reply:
        """One (possibly multi-line) reply to `what`; (-1, text) when it is not SMTP at all."""
        try:
            code, texts = read_reply(self.file)
        except BadReply as exc:
            return -1, exc.line.rstrip(b"\r\n")[:200].decode("utf-8", "replace")
        except ReplyClosed:
            raise ConnectionLost(self._gone("connection closed by the customer")) from None
        except socket.timeout:
            raise ConnectionLost("timeout after %g s waiting for the reply to %s"
                                 % (self._current_timeout, _SAID.get(what, what))) from None
        except (OSError, ValueError) as exc:
            raise ConnectionLost(self._gone("read failed: %s" % exc)) from None
        return code, "\n".join(texts)

    def reply_at(self, timeout: float, what: str = "command") -> Reply:
        self.set_timeout(timeout)
        return self.read_reply(what)


_SAID = {"FINAL": "the end of data", "LAST": "BDAT LAST", "DISCARD": "the end of data"}


def _described(code: int, text: str) -> str:
    """A reply for a log line; garbage (code -1) said to be garbage."""
    return reply_text(code, text) if code >= 0 else ("garbage %r" % text)[:500]


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
    timeouts: Timeouts = Timeouts()     # the service's


def deliver_reversed(handoff: Handoff) -> None:
    """Drive the reversed connection: greeting, EHLO, every message of the domains, QUIT."""
    runtime = handoff.runtime
    peer = handoff.peer
    one_line = handoff.implicit_tls and runtime.settings.odmr.one_line_per_tls_record
    client = ReversedClient(handoff.sock, handoff.rfile, runtime.hostname, one_line, handoff.stop,
                            handoff.timeouts)
    drain = handoff.queue.drain(runtime, handoff.domains, peer)
    try:
        if not _introduce(client, peer):
            return
        run = Run(client, drain, peer, handoff.stop, runtime.settings.odmr.delivery_window)
        try:
            clean = run.deliver_all()
        finally:
            drain.close()
        if clean:
            _quit(client)
        log.info("delivery: %s session done: %d delivered, %d deferred, %d bounced",
                 peer, drain.delivered, drain.deferred, drain.failed)
    except (ConnectionLost, OutOfStep, smtplib.SMTPException, OSError) as exc:
        log.warning("delivery: %s session ended: %s", peer, str(exc))
    finally:
        drain.end()


def _introduce(client: ReversedClient, peer: str) -> bool:
    """The customer's 220, then EHLO (HELO if EHLO is refused).

    False when the customer will not have us: then nothing was sent, nothing
    counts as a delivery attempt, QUIT went out and one line was logged."""
    stage = "greeting"
    try:
        code, text = client.reply_at(client.timeouts.greeting, "the greeting")
        if code != 220:
            log.warning("delivery: %s greeted with %s; nothing sent, mail kept",
                        peer, _described(code, text))
            _quit(client)
            return False
        client.set_timeout(client.timeouts.mail)
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
        log.warning("delivery: customer at %s gone at %s: %s; nothing sent, mail kept", peer, stage, str(exc))
        return False


def _hello(command) -> Reply:
    """smtplib's ehlo() or helo() as (code, text); garbage is (-1, text)."""
    code, text = command()
    return code, text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def _quit(client: ReversedClient) -> None:
    try:
        client.send("QUIT\r\n")
        client.reply_at(client.timeouts.quit, "QUIT")
    except (ConnectionLost, smtplib.SMTPException, OSError):
        pass


# -- one session's deliveries -------------------------------------------------
class Job:
    """One message on its way: the queued message, its text if small, what is left to do."""

    __slots__ = ("message", "payload", "rcpts", "results", "accepted", "mail_ok", "sent", "data_failed")

    def __init__(self, message: Message, body: Optional[bytes], rcpts: List[str], stuffed: bool = True):
        self.message = message
        # small messages: the text ready to send (for DATA: stuffed, with its terminator;
        # for BDAT: the spooled bytes exactly)
        self.payload: Optional[bytes] = None
        if body is not None:
            body = break_long_lines(body)          # RFC 5321 §4.5.3.1.6: 998 octets a line
        if body is not None and stuffed:
            # the end of data is always CRLF.CRLF, never LF.CRLF (SPEC §5: smuggling)
            tail = b".\r\n" if not body or body.endswith(b"\r\n") else b"\r\n.\r\n"
            self.payload = dot_stuff(body, True) + tail
        elif body is not None:
            self.payload = body
        self.rcpts = rcpts
        self.results: Dict[str, Reply] = {}
        self.accepted: List[str] = []
        self.mail_ok = False
        self.sent = False                      # commands went out: an attempt to count if lost
        self.data_failed: Optional[Reply] = None   # BDAT: the first refused chunk's reply


Expect = Tuple[str, Optional[Job], str]            # (kind of reply, its message, recipient)


class Run:
    """Delivers every message of some domains over one reversed connection."""

    def __init__(self, client: ReversedClient, queue: Drain, peer: str, stop: threading.Event,
                 window: int = 1):
        self.client = client
        self.queue = queue
        self.peer = peer
        features = client.esmtp_features if client.does_esmtp else {}
        self.pipelining = "pipelining" in features
        self.size = "size" in features
        self.eightbit = "8bitmime" in features
        self.smtputf8 = "smtputf8" in features
        self.dsn = "dsn" in features
        self.chunking = "chunking" in features
        queue.customer_dsn = self.dsn          # else success notices (NOTIFY=SUCCESS) are ours
        self.window = max(1, window) if self.pipelining and self.chunking else 1
        self._stop = stop
        self._open_transaction = False      # windowed: a refused transaction may still be open
        # the RFC 5321 section 4.5.3.2 timeout for each kind of reply
        timeouts = self.timeouts = client.timeouts
        self._wait = {"MAIL": timeouts.mail, "RCPT": timeouts.rcpt, "RSET": timeouts.mail,
                      "DATA": timeouts.data_init, "BDAT": timeouts.data_block,
                      "LAST": timeouts.data_end, "FINAL": timeouts.data_end, "DISCARD": timeouts.data_end}

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
            text = (lambda b=body: iter([b])) if body is not None \
                else (lambda m=message: queue.text(m))
            refusal = untransportable(message, rcpts, text, self.smtputf8, self.eightbit,
                                      "Customer's server")
            if refusal is not None:
                queue.record(message, {r: refusal for r in rcpts})
                continue
            yield Job(message, body, rcpts, stuffed=not self.chunking)

    def deliver_all(self) -> bool:
        """Deliver everything; True when the conversation is still in step (QUIT may follow)."""
        jobs = self._jobs()
        if self.pipelining and self.chunking:
            return self._windowed(jobs)
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
        try:
            if self._serial_envelope(job):
                self._serial_content(job)
        except (ConnectionLost, OutOfStep, smtplib.SMTPException, OSError) as exc:
            self._lost([job], exc)
            raise

    def _serial_envelope(self, job: Job) -> bool:
        """MAIL, then each RCPT after the previous reply; True when a recipient was
        accepted and the content follows (otherwise the job is complete)."""
        client = self.client
        job.sent = True
        client.send(self._mail_command(job.message))
        mail = self._expect(client.reply_at(self.timeouts.mail, "MAIL"), "MAIL")
        if not _ok(mail):
            job.results = {r: mail for r in job.rcpts}
            self._complete(job)
            self._after_421(mail)
            return False
        job.mail_ok = True
        lines = [line + "\r\n" for line in self._rcpt_commands(job).split("\r\n") if line]
        for rcpt, line in zip(job.rcpts, lines):
            client.send(line)
            reply = self._expect(client.reply_at(self.timeouts.rcpt, "RCPT"), "RCPT")
            if reply[0] == 421:             # the customer is going away: nothing more for it
                job.results = {r: job.results.get(r, reply) for r in job.rcpts}
                self._complete(job)
                self._after_421(reply)
            self._rcpt_reply(job, rcpt, reply)
        if not job.accepted:
            self._complete(job)
            self._reset()
            return False
        return True

    def _serial_content(self, job: Job) -> None:
        """DATA and the text (or BDAT chunks), each step after the previous reply."""
        if self.chunking:
            self._serial_chunks(job)
            return
        client = self.client
        client.send("DATA\r\n")
        data = client.reply_at(self.timeouts.data_init, "DATA")
        if data[0] != 354:
            self._expect(data, "DATA")
            if _ok(data):
                raise OutOfStep("reply to DATA out of step: %s" % reply_text(*data))
            for r in job.accepted:
                job.results[r] = data
            self._complete(job)
            self._after_421(data)
            self._reset()
            return
        tail = self._send_body(job)
        client.send(tail)
        final = self._expect(client.reply_at(self.timeouts.data_end, "the end of data"), "end of data")
        for r in job.accepted:
            job.results[r] = final
        self._complete(job)
        self._after_421(final)

    def _serial_chunks(self, job: Job) -> None:
        """BDAT without PIPELINING: each chunk waits for its reply (RFC 3030 section 4.2)."""
        for frame, last in self._frames(job):
            self.client.send(frame)
            what = "BDAT LAST" if last else "BDAT"
            wait = self.timeouts.data_end if last else self.timeouts.data_block
            reply = self._expect(self.client.reply_at(wait, what), what)
            if last or not _ok(reply):
                for r in job.accepted:
                    job.results[r] = reply
                self._complete(job)
                self._after_421(reply)
                if not _ok(reply):
                    self._reset()
                return

    def _reset(self) -> None:
        self.client.send("RSET\r\n")
        self._expect(self.client.reply_at(self.timeouts.mail, "RSET"), "RSET")

    # -- with PIPELINING: the dot travels with the next MAIL/RCPT/DATA ----------
    def _pipelined(self, jobs: Iterator[Job]) -> bool:
        """One write per message: its MAIL, RCPTs and DATA go out with the previous
        message's text and end-of-data dot; then every reply owed is read, in order."""
        expect: Deque[Expect] = deque()                    # replies owed for what was sent
        later: List[Expect] = []                           # replies owed for what is in `outbox`
        outbox: List[bytes] = []
        in_flight: List[Job] = []
        upcoming = next(jobs, None)
        with self._replies_owed(in_flight):
            while True:
                job = None
                if not self._stop.is_set() and not self.queue.must_stop:
                    job, upcoming = upcoming, None
                elif in_flight or outbox:
                    log.info("delivery: %s stopping: the rest waits for the next ATRN", self.peer)
                if job is not None:
                    self._queue_commands(job, in_flight, outbox, later)
                if not outbox:
                    return True
                self.client.send(b"".join(outbox))
                outbox.clear()
                expect.extend(later)
                later.clear()
                self.queue.flush_logs()            # while the replies travel: log, read the next message
                if job is not None:
                    upcoming = next(jobs, None)
                if not self._read_pipelined(expect, in_flight, outbox, later):
                    return False

    def _queue_commands(self, job: Job, in_flight: List[Job], outbox: List[bytes],
                        later: List[Expect]) -> None:
        job.sent = True
        in_flight.append(job)
        outbox.append((self._mail_command(job.message) + self._rcpt_commands(job)
                       + "DATA\r\n").encode("utf-8"))
        later.append(("MAIL", job, ""))
        later.extend(("RCPT", job, r) for r in job.rcpts)
        later.append(("DATA", job, ""))

    def _read_pipelined(self, expect: Deque[Expect], in_flight: List[Job], outbox: List[bytes],
                        later: List[Expect]) -> bool:
        """Every reply owed, in order; what the replies call for (a text, a RSET) goes into
        `outbox` to travel with the next commands. False when the customer said 421."""
        client = self.client
        wait = self._wait
        while expect:
            kind, item, rcpt = expect.popleft()
            reply = client.reply_at(wait[kind], kind)
            if kind == "DATA" and reply[0] == 354:
                if self._open_data(item, outbox, later):
                    continue
            else:
                reply = self._expect(reply, kind)
                if kind == "DATA" and _ok(reply):
                    raise OutOfStep("reply to DATA out of step: %s" % reply_text(*reply))
            if kind in ("MAIL", "RCPT"):
                self._envelope_reply(item, kind, rcpt, reply)
            elif kind in ("DATA", "FINAL"):
                self._data_result(item, kind, reply, in_flight, outbox, later)
            if reply[0] == 421:
                return self._closing(in_flight, reply, charge_unanswered=False)
        return True

    def _open_data(self, job: Job, outbox: List[bytes], later: List[Expect]) -> bool:
        """DATA was answered 354: True when the text follows; False when the transaction
        has nothing to deliver and only an empty text (the dot) closes it."""
        if job.mail_ok and job.accepted and self.queue.must_stop:
            # its commands went out with the last dot, before that result could
            # not be recorded: after a 354 only hanging up sends nothing more
            raise ConnectionLost("results cannot be recorded: connection closed "
                                 "in DATA, so that nothing more is delivered")
        if job.mail_ok and job.accepted:
            outbox.append(self._send_body(job))
            later.append(("FINAL", job, ""))
            return True
        outbox.append(b".\r\n")          # out-of-step server opened DATA anyway
        later.append(("DISCARD", None, ""))
        return False

    def _data_result(self, job: Job, kind: str, reply: Reply, in_flight: List[Job],
                     outbox: List[bytes], later: List[Expect]) -> None:
        """The reply that ends a message's transaction (DATA refused, or the end of data)."""
        if reply[0] != 354:
            for r in job.accepted:
                job.results[r] = reply
        if kind == "DATA" and job.mail_ok and reply[0] != 421:
            outbox.append(b"RSET\r\n")   # close the half-open transaction
            later.append(("RSET", None, ""))
        in_flight.remove(job)
        # recorded (and retired) before the next end-of-data dot goes out:
        # a crash then re-delivers at most the one message in flight
        self._complete(job)

    @contextlib.contextmanager
    def _replies_owed(self, in_flight: List[Job]) -> Iterator[None]:
        """A pipelined conversation: log lines are written while replies travel, and a
        broken one is an attempt for every message in flight."""
        self.queue.defer_logs = True
        try:
            yield
        except (ConnectionLost, OutOfStep, smtplib.SMTPException, OSError) as exc:
            self._lost(in_flight, exc)
            raise
        finally:
            self.queue.defer_logs = False
            self.queue.flush_logs()

    def _closing(self, in_flight: List[Job], reply: Reply, charge_unanswered: bool = True) -> bool:
        """The customer said 421: it is going away; what is in flight waits, each message
        charged an attempt (a window's messages were all sent whole: SPEC §4). Not
        `charge_unanswered`: the message whose commands travelled with the end-of-data
        dot the 421 answered was never read, so it is not charged (issue 15)."""
        answered = [job for job in in_flight if charge_unanswered or job.mail_ok or job.results]
        self._lost(answered, ConnectionLost("customer closing: %s" % reply_text(*reply)))
        in_flight.clear()
        return False

    def _after_421(self, reply: Reply) -> None:
        if reply[0] == 421:
            raise ConnectionLost("customer closing: %s" % reply_text(*reply))

    # -- with PIPELINING and CHUNKING: a window of whole messages ------------------
    def _windowed(self, jobs: Iterator[Job]) -> bool:
        """Up to `self.window` messages sent whole (commands, BDAT and data, no 354 to wait
        for) before the oldest one's replies are read; each message recorded from its own
        replies as soon as its BDAT LAST is answered, and only then may another go out."""
        expect: Deque[Expect] = deque()
        in_flight: List[Job] = []
        outbox: List[bytes] = []
        upcoming = next(jobs, None)
        with self._replies_owed(in_flight):
            while True:
                if upcoming is not None and len(in_flight) < self.window:
                    if self._stop.is_set() or self.queue.must_stop:
                        log.info("delivery: %s stopping: the rest waits for the next ATRN", self.peer)
                        upcoming = None
                        continue
                    self._queue_job(upcoming, in_flight, expect, outbox)
                    upcoming = None
                    if len(in_flight) >= self.window or sum(map(len, outbox)) >= WRITE_BATCH:
                        self._flush(outbox)
                    upcoming = next(jobs, None)    # read from the spool while the write travels
                    if upcoming is not None and len(in_flight) < self.window:
                        continue
                self._flush(outbox)
                if not expect:
                    return True
                if not self._settle_oldest(expect, in_flight):
                    return False

    def _flush(self, outbox: List[bytes]) -> None:
        if outbox:
            self.client.send(b"".join(outbox))
            outbox.clear()
            self.queue.flush_logs()                # while the data travels

    def _queue_job(self, job: Job, in_flight: List[Job], expect: Deque[Expect],
                   outbox: List[bytes]) -> None:
        """Everything of one message into `outbox` (a big text is streamed out at once).

        A RSET goes first whenever an earlier transaction may still be open on the
        customer's side (its result unread, or refused after MAIL succeeded): its next
        MAIL must never be refused with 503 because of another message."""
        if in_flight or self._open_transaction:
            outbox.append(b"RSET\r\n")
            expect.append(("RSET", None, ""))
        self._open_transaction = True
        job.sent = True
        in_flight.append(job)
        outbox.append((self._mail_command(job.message) + self._rcpt_commands(job)).encode("utf-8"))
        expect.append(("MAIL", job, ""))
        expect.extend(("RCPT", job, r) for r in job.rcpts)
        for frame, last in self._frames(job):
            outbox.append(frame)
            expect.append(("LAST" if last else "BDAT", job, ""))
            if not last:
                self._flush(outbox)                # a big text: one chunk at a time

    def _frames(self, job: Job) -> Iterator[Tuple[bytes, bool]]:
        """The text as BDAT chunks (RFC 3030): the spooled bytes exactly, no dot-stuffing."""
        if job.payload is not None:
            yield b"BDAT %d LAST\r\n" % len(job.payload) + job.payload, True
            return
        pieces = _broken(self.queue.text(job.message))
        piece = next(pieces, b"")
        while True:
            following = next(pieces, None)
            last = following is None
            yield b"BDAT %d%s\r\n" % (len(piece), b" LAST" if last else b"") + piece, last
            if last:
                return
            piece = following

    def _settle_oldest(self, expect: Deque[Expect], in_flight: List[Job]) -> bool:
        """Read replies, strictly in order, until the oldest message's results are recorded.
        False when the customer said 421 (what is unanswered waits for the next ATRN)."""
        while expect:
            kind, job, rcpt = expect.popleft()
            reply = self._expect(self.client.reply_at(self._wait[kind], kind), kind)
            if reply[0] == 421:
                return self._closing(in_flight, reply)
            if kind in ("MAIL", "RCPT"):
                self._envelope_reply(job, kind, rcpt, reply)
            elif kind in ("BDAT", "LAST"):
                if not _ok(reply) and job.data_failed is None:
                    job.data_failed = reply
                if kind == "LAST":
                    final = job.data_failed or reply
                    for r in job.accepted:
                        job.results[r] = final
                    in_flight.remove(job)
                    # matters when nothing else is in flight: then this was the last one sent
                    self._open_transaction = job.mail_ok and not _ok(final)
                    self._complete(job)
                    return True
        return True

    # -- replies ----------------------------------------------------------------
    def _expect(self, reply: Reply, what: str) -> Reply:
        """A reply to a command other than DATA must be 2xx, 4xx or 5xx."""
        code = reply[0]
        if not (200 <= code < 300 or 400 <= code < 600):
            raise OutOfStep("reply to %s out of step or garbled: %s" % (what, reply_text(*reply)))
        return reply

    def _envelope_reply(self, job: Job, kind: str, rcpt: str, reply: Reply) -> None:
        """A pipelined MAIL's or RCPT's reply: a refused MAIL is every recipient's result."""
        if kind == "MAIL":
            job.mail_ok = _ok(reply)
            if not job.mail_ok:
                job.results = {r: reply for r in job.rcpts}
        elif job.mail_ok:
            self._rcpt_reply(job, rcpt, reply)

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
        at_line_start = True
        last = b"\r\n"
        for chunk in _broken(self.queue.text(job.message)):
            client.send(dot_stuff(chunk, at_line_start))
            at_line_start = chunk.endswith(b"\n")
            last = chunk[-2:] if len(chunk) > 1 else (last + chunk)[-2:]
        return b".\r\n" if last == b"\r\n" else b"\r\n.\r\n"

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


def _broken(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """A streamed text with its long lines broken (`folding`); no empty pieces."""
    breaker = LineBreaker()
    for chunk in chunks:
        out = breaker.feed(chunk)
        if out:
            yield out
    tail = breaker.finish()
    if tail:
        yield tail


def _ok(reply: Reply) -> bool:
    return 200 <= reply[0] < 300
