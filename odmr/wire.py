"""Line-oriented SMTP plumbing shared by every protocol session.

`Session` owns the socket and its one buffered reader: bounded command lines,
replies sent in one write, a bad-command budget, a timeout on every read, and
dispatch to `smtp_<VERB>` methods (the table is built once per class).
Subclasses (intake, odmr_session, the customer's local server) only add verbs.
"""
from __future__ import annotations

import io
import ipaddress
import logging
import os
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from odmr import replies
from odmr.names import address_is_safe
from odmr.syntax import helo_name_ok, printable, split_source_route

log = logging.getLogger("odmrd")

MAX_COMMAND_LINE = 512          # RFC 5321 4.5.3.1.4, CRLF included
# A reply line may be 512 octets with its CRLF (RFC 5321 4.5.3.1.5), and that much must be
# taken; real servers go past it (long EHLO and greeting lines), so a few KB are. A reply
# of more lines than any real EHLO answer, or a longer line, is a peer that is not SMTP.
MAX_REPLY_LINE = 4096           # CRLF included
MAX_REPLY_LINES = 100
READ_BUFFER = 65536             # a session's read buffer: a 10 KB message (and the next
                                # pipelined commands) in one read(2), one look for the final dot
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)", re.S)
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f]")       # in a command line; HTAB is a separator


class Closed(Exception):
    """The peer went away, or the session decided to end (after a 421)."""


class LineTooLong(Exception):
    pass


class DataTimeout(Closed):
    """The DATA phase outlived its deadline; the rest of the stream is not commands."""


class ReplyClosed(Exception):
    """The connection ended before a whole reply came."""


class BadReply(Exception):
    """The peer's reply is not SMTP: `kind` says how (one of the constants below),
    `line` is what it sent (for the log)."""
    OVERLONG = "an overlong reply line"
    MALFORMED = "a line that is not an SMTP reply"
    MIXED = "mixed reply codes in one reply"
    ENDLESS = "an endless reply"

    def __init__(self, kind: str, line: bytes):
        super().__init__(kind)
        self.kind = kind
        self.line = line


def read_reply(reader: BinaryIO, on_line: Optional[Callable[[int, str, str], None]] = None
               ) -> Tuple[int, List[str]]:
    """One reply, strictly: (code, its lines' texts). Codes 2xx to 5xx only, one code for
    every line, at most MAX_REPLY_LINES lines of MAX_REPLY_LINE octets; BadReply for
    anything else, ReplyClosed when the connection ends first. `on_line(code, separator,
    text)` sees each line as it comes (a trace). Socket errors pass through."""
    texts: List[str] = []
    code: Optional[int] = None
    while True:
        raw = reader.readline(MAX_REPLY_LINE + 1)
        if len(raw) > MAX_REPLY_LINE:
            raise BadReply(BadReply.OVERLONG, raw)
        if not raw.endswith(b"\n"):
            raise ReplyClosed()
        bare = raw.rstrip(b"\r\n")
        match = _REPLY_LINE.fullmatch(bare + b" " if len(bare) == 3 else bare)
        if match is None:
            raise BadReply(BadReply.MALFORMED, raw)
        this = int(match.group(1))
        if code is not None and this != code:
            raise BadReply(BadReply.MIXED, raw)
        code = this
        separator, text = match.group(2).decode(), match.group(3).decode("utf-8", "replace")
        texts.append(text)
        if on_line is not None:
            on_line(code, separator, text)
        if separator == " ":
            return code, texts
        if len(texts) >= MAX_REPLY_LINES:
            raise BadReply(BadReply.ENDLESS, raw)


def format_reply(code: int, lines: Union[str, Iterable[str]]) -> bytes:
    """Render one reply; several lines become a multi-line reply (`250-...`)."""
    if isinstance(lines, str):
        lines = [lines]
    if len(lines) == 1:                 # most replies
        return ("%d %s\r\n" % (code, lines[0])).encode("utf-8")
    lines = list(lines) or [""]
    out = []
    for index, text in enumerate(lines):
        sep = " " if index == len(lines) - 1 else "-"
        out.append("%d%s%s\r\n" % (code, sep, text))
    return "".join(out).encode("utf-8")


def dot_stuff(data: bytes, at_line_start: bool = True) -> bytes:
    """Stuff a leading '.' on every line (data is CRLF-normalised)."""
    stuffed = data.replace(b"\n.", b"\n..")
    if at_line_start and stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


DEADLINE_SLACK = 0.05    # seconds a wait may outlast a deadline (a timeout is not reset for less)


class TimedSocketIO(io.RawIOBase):
    """Raw reads from a socket (TLS too) that never go on past `deadline`.

    The socket's own timeout (the idle timeout) still bounds every wait; a
    deadline only shortens a wait that would end after it, and no read at all
    starts once it has passed, so a peer cannot stretch one buffered readline
    over many waits, nor a stream that never waits past the deadline."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self._sock = sock
        self.deadline: Optional[float] = None   # set by Session.read_line and iter_data
        self.timeout_changed = False
        # called before a read may wait; True if it wrote held replies (Session.hold_replies)
        self.before_wait: Optional[Callable[[], bool]] = None
        # only when the socket has nothing ready either (Session.hold_while_input_ready)
        self.read_before_flush = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Union[bytearray, memoryview]) -> int:
        if self.before_wait is not None and not (self.read_before_flush and self._input_ready()):
            self.before_wait()
        self._before_wait()
        return self._sock.recv_into(buffer)

    def _input_ready(self) -> bool:
        """Whether a read now finds input: decrypted bytes OpenSSL holds, or the socket's."""
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return True
        try:
            return bool(select.select([self._sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True         # let the read itself report it

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise socket.timeout("timed out")

    def _before_wait(self) -> None:
        if self.deadline is None:           # whatever timeout the socket's owner set
            return
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out")
        current = self._sock.gettimeout()
        # a wait may end up to DEADLINE_SLACK late: no settimeout (two system calls) on
        # a wait that starts just after its deadline was set, as most do
        if current is None or remaining < current - DEADLINE_SLACK:
            self._sock.settimeout(remaining)
            self.timeout_changed = True

    def fileno(self) -> int:
        return self._sock.fileno()


class _EagerSocketIO(TimedSocketIO):
    """Raw reads from a plain socket that try the descriptor directly first.

    A Python socket with a timeout polls before every recv; when the data is
    already there (the common case with pipelining clients) one read(2) does,
    which halves the system calls, and with them the GIL hand-overs, per line.
    Only when nothing is waiting does it fall back to the socket's own
    timed recv."""

    def __init__(self, sock: socket.socket):
        super().__init__(sock)
        self._fd = sock.fileno()

    def readinto(self, buffer: Union[bytearray, memoryview]) -> int:
        if self.deadline is not None:
            self._check_deadline()
        # held replies just written: the peer reads them before it sends more, so a
        # read(2) now would only find nothing; wait at once
        if self.before_wait is None or self.read_before_flush or not self.before_wait():
            try:
                return os.readv(self._fd, [buffer])
            except BlockingIOError:
                pass
            if self.read_before_flush:
                self.before_wait()
        self._before_wait()
        return self._sock.recv_into(buffer)

    def fileno(self) -> int:
        return self._fd


def reader_for(sock: socket.socket) -> io.BufferedReader:
    """The buffered reader a session (and smtplib after the turnaround) reads from."""
    if sock.gettimeout() in (None, 0.0):
        return sock.makefile("rb", buffering=READ_BUFFER)
    if isinstance(sock, ssl.SSLSocket):
        return io.BufferedReader(TimedSocketIO(sock), READ_BUFFER)
    return io.BufferedReader(_EagerSocketIO(sock), READ_BUFFER)


def _write_now(sock: socket.socket, data: bytes) -> bytes:
    """Write what the kernel takes at once, without the poll a timed sendall
    makes first; return what is left for sendall."""
    try:
        sent = os.write(sock.fileno(), data)
    except BlockingIOError:
        return data
    return data[sent:]


def address_only(peer: str) -> str:
    """'192.0.2.1', '::1', '[::1]:366' or '192.0.2.1:366' -> the bare address."""
    try:
        return str(ipaddress.ip_address(peer.strip("[]")))
    except ValueError:
        return peer.rsplit(":", 1)[0].strip("[]")


class Session:
    """One SMTP-like conversation over `sock`; subclasses define smtp_VERB methods."""

    # called at QUIT, before the 221, by whoever counts the session (an intake worker)
    on_goodbye: Optional[Callable[[], None]] = None

    max_bad_commands = 20
    idle_timeout = 300.0
    helo: Optional[str] = None      # the client's EHLO/HELO name, once it has greeted
    esmtp = False                   # it said EHLO
    # RFC 2920 §3.1: the replies to a pipelined group may go out together. A session
    # that holds them writes them only when its reader must wait for more input (and
    # at the end), so MAIL, RCPT, DATA and the 354 cost one write, not four.
    hold_replies = False
    # True: held replies stay held while the socket already has more input ready, not
    # only while the reader's buffer lasts (a window of pipelined messages, one write
    # back); held_replies_limit bytes of them go out anyway. 0: no limit.
    hold_while_input_ready = False
    held_replies_limit = 0
    _verbs: Dict[str, Callable] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls._verbs = {name[5:]: getattr(cls, name) for name in dir(cls) if name.startswith("smtp_")}

    def __init__(self, sock: socket.socket, peer: str, reader: Optional[BinaryIO] = None):
        """`reader`: the connection's buffered reader when somebody has read from it
        already (the customer's ATRN negotiation); by default, a new one."""
        self.sock = sock
        self.peer = peer
        self.peer_ip = address_only(peer)           # what Received: and the limits name
        self.sock.settimeout(self.idle_timeout)
        self._held_replies: List[bytes] = []
        self._held_size = 0                         # counted only under held_replies_limit
        self._holding = False
        self.rfile = self._reader(reader)
        self.bad_commands = 0
        self.closing = False
        self.stopping = False
        self._idle = False
        self._state_lock = threading.Lock()
        self.tls_active = isinstance(sock, ssl.SSLSocket)

    def _reader(self, reader: Optional[BinaryIO] = None):
        """The session's buffered reader; one that tells before it waits, when replies are held."""
        if reader is None:
            reader = reader_for(self.sock)
        raw = getattr(reader, "raw", None)
        self._holding = self.hold_replies and isinstance(raw, TimedSocketIO)
        if self._holding:
            raw.before_wait = self.flush_held_replies
            raw.read_before_flush = self.hold_while_input_ready
        return reader

    # -- output ---------------------------------------------------------------
    def flush_held_replies(self) -> bool:
        """Write the replies held back (hold_replies); True if there were any."""
        if not self._held_replies:
            return False
        self.send_raw(b"")
        return True

    def send_raw(self, data: bytes) -> None:
        if self._held_replies:
            data = b"".join(self._held_replies) + data
            self._held_replies = []
            self._held_size = 0
        try:
            if not self.tls_active:
                data = _write_now(self.sock, data)
            if data:
                self.sock.sendall(data)
        except (OSError, ValueError) as exc:
            raise Closed("write failed: %s" % exc) from None

    def reply(self, code: int, *lines: str) -> None:
        if self._holding:
            data = format_reply(code, lines)
            self._held_replies.append(data)
            if self.held_replies_limit:
                self._held_size += len(data)
                if self._held_size >= self.held_replies_limit:
                    self.flush_held_replies()
        else:
            self.send_raw(format_reply(code, lines))

    # -- input ----------------------------------------------------------------
    def read_line(self, limit: int = MAX_COMMAND_LINE) -> bytes:
        """One line with its ending; LineTooLong after discarding the rest of an overlong line.

        The whole line must arrive within idle_timeout (a client trickling one
        byte at a time is cut off too), and at most `limit` octets are kept."""
        deadline = time.monotonic() + self.idle_timeout
        raw = getattr(self.rfile, "raw", None)
        eager = isinstance(raw, TimedSocketIO)    # it applies the deadline only when it must wait
        too_long = False
        try:
            if eager:           # the common case in one call; no copy of what follows the line
                raw.deadline = deadline
                line = self.rfile.readline(limit)
                if line.endswith(b"\n"):
                    return line
                if len(line) < limit:
                    raise Closed("connection closed by peer")
                too_long = True         # the rest of it is read and thrown away below
            return self._gather_line(limit, deadline, raw if eager else None, too_long)
        except socket.timeout:
            self.timeout()
            raise Closed("timeout") from None
        except (OSError, ValueError) as exc:
            raise Closed("read failed: %s" % exc) from None
        finally:
            if eager:
                raw.deadline = None
            if not eager or raw.timeout_changed:
                try:
                    self.sock.settimeout(self.idle_timeout)
                except OSError:
                    pass
                if eager:
                    raw.timeout_changed = False

    def _gather_line(self, limit: int, deadline: float, raw: Optional["TimedSocketIO"],
                     too_long: bool) -> bytes:
        """read_line piece by piece: a reader without a deadline of its own, or the rest of
        an overlong line to throw away (LineTooLong once its end is read)."""
        parts = []
        kept = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            if raw is not None:
                raw.deadline = deadline
            else:
                self.sock.settimeout(remaining)
            buffered = self.rfile.peek(1)
            if not buffered:
                raise Closed("connection closed by peer")
            end = buffered.find(b"\n")
            take = end + 1 if end >= 0 else len(buffered)
            data = self.rfile.read(take)
            if not too_long:
                if kept + len(data) > limit:
                    too_long = True
                    parts = []
                else:
                    parts.append(data)
                    kept += len(data)
            if end >= 0:
                break
        if too_long:
            raise LineTooLong()
        return b"".join(parts)

    def starttls_command(self, context: Optional[ssl.SSLContext], arg: str) -> bool:
        """STARTTLS (RFC 3207): the guards, the 220 and the handshake; False if refused."""
        if context is None:
            self.refuse(replies.TLS_NOT_AVAILABLE)
            return False
        if self.tls_active:
            self.refuse(replies.TLS_ALREADY_ACTIVE)
            return False
        if arg:
            self.refuse(replies.STARTTLS_SYNTAX)
            return False
        self.reply(*replies.START_TLS)
        self.start_tls(context)
        return True

    def start_tls(self, context: ssl.SSLContext) -> None:
        """Switch to TLS (RFC 3207): plaintext already buffered is discarded with the old reader."""
        self.flush_held_replies()           # the 220 goes out in plaintext, before the handshake
        old, self.rfile = self.rfile, None
        old.close()
        try:
            self.sock.settimeout(self.idle_timeout)
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except (OSError, ValueError) as exc:
            raise Closed("TLS handshake failed: %s" % exc) from None
        self.rfile = self._reader()
        self.tls_active = True

    def timeout(self) -> None:
        try:
            self.reply_with(replies.TIMEOUT, self.hostname())
        except Closed:
            pass

    def hostname(self) -> str:
        return "localhost"

    # -- the loop ---------------------------------------------------------------
    def greet(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            self.greet()
            while not self.closing:
                if not self._enter_idle():
                    self._farewell()
                    break
                try:
                    raw = self.read_line()
                except LineTooLong:
                    self.refuse(replies.LINE_TOO_LONG)
                    continue
                finally:
                    self._leave_idle()
                self.dispatch(raw)
        except Closed as exc:
            if self.stopping:
                self._say_goodbye()
            log.debug("%s: %s", self.peer, str(exc))
        finally:
            self.finish()

    # -- stopping while waiting for a command --------------------------------------
    def _enter_idle(self) -> bool:
        with self._state_lock:
            self._idle = not self.stopping
            return self._idle

    def _leave_idle(self) -> None:
        with self._state_lock:
            self._idle = False

    def request_stop(self) -> None:
        """From another thread: end the session at its next command boundary.

        A session blocked waiting for a command is woken by shutting down the
        read side of its socket; this thread never writes to the connection
        (an SSL object must not be used from two threads at once)."""
        with self._state_lock:
            self.stopping = True
            if self._idle:
                try:
                    socket.socket.shutdown(self.sock, socket.SHUT_RD)
                except OSError:
                    pass

    def cut(self) -> None:
        """From another thread, when the grace period is over: break the connection so
        the session thread fails out of whatever it waits for and records what was in
        flight (a delivery counts the attempt; an intake transaction is dropped unacked)."""
        with self._state_lock:
            self.stopping = True
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def _farewell(self) -> None:
        """Stopping at a command boundary: a client already saying QUIT gets its 221."""
        try:
            self.sock.settimeout(0.3)
            upcoming = self.rfile.peek(1)
        except (OSError, ValueError):
            upcoming = b""
        if upcoming[:4].upper() == b"QUIT":
            try:
                self.reply_with(replies.CLOSING, self.hostname())
            except Closed:
                pass
        else:
            self._say_goodbye()

    def _say_goodbye(self) -> None:
        try:
            self.reply_with(replies.SHUTTING_DOWN, self.hostname())
        except Closed:
            pass

    def dispatch(self, raw: bytes) -> None:
        line = raw.rstrip(b"\r\n")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.refuse(replies.INVALID_UTF8)
            return
        if _CONTROL.search(text):
            if text.partition(" ")[0].upper() in self._verbs:     # a known verb: its argument is bad
                self.refuse(replies.CONTROL_CHARACTERS_IN_ARGUMENT)
            else:
                self.refuse(replies.CONTROL_CHARACTERS)
            return
        verb, _, arg = text.partition(" ")
        handler = self._verbs.get(verb.upper()) if verb.isascii() and verb.isalpha() else None
        if handler is None:
            self.refuse(replies.UNRECOGNIZED)
            return
        self.log_command(verb.upper(), arg)
        handler(self, arg.strip(SP))

    def log_command(self, verb: str, arg: str) -> None:
        pass

    # -- verbs every session speaks alike ------------------------------------------
    def smtp_NOOP(self, arg: str) -> None:
        self.reply(*replies.OK)

    def smtp_RSET(self, arg: str) -> None:
        self.reset_transaction()
        self.reply(*replies.OK)

    def smtp_QUIT(self, arg: str) -> None:
        code, text = replies.CLOSING
        if self.on_goodbye is not None:
            self.on_goodbye()       # before the 221: the client may reconnect the moment it has it
        self.close_after(code, text % self.hostname())

    def reset_transaction(self) -> None:
        """Forget the envelope being collected (RSET); a session without one has nothing to do."""

    def reply_with(self, reply: replies.Reply, *words: object) -> None:
        """Send a named reply whose text takes `words` (a hostname, a domain...)."""
        code, text = reply
        self.reply(code, text % words)

    def refuse(self, reply: replies.Reply) -> None:
        """Answer a command sent out of turn or malformed; it counts against the budget."""
        self.reply(*reply)
        self.count_bad_command()

    # the source of the log line a refused EHLO/HELO name gets ("smtp", "odmr"); none if ""
    log_prefix = ""
    not_implemented_reply: replies.Reply = replies.NOT_IMPLEMENTED

    def helo_name_refused(self, verb: str, arg: str) -> bool:
        """RFC 5321 §4.1.4: EHLO/HELO name a domain or an address literal, never free
        text (it goes into the Received: header). True after the 501; the session's
        earlier EHLO, if any, still holds."""
        if helo_name_ok(arg):
            return False
        if self.log_prefix:
            log.info("%s: %s %s refused: not a domain or address literal: %s",
                     self.log_prefix, self.peer, verb, printable(arg, 100))
        self.refuse((replies.BAD_HELO_NAME[0], replies.BAD_HELO_NAME[1] % verb))
        return True

    def hello_command(self, verb: str, arg: str, keywords: Sequence[str] = ()) -> bool:
        """EHLO or HELO (RFC 5321 §4.1.1.1), alike on every port: the name check, a
        fresh start (a transaction under way is dropped), and the 250 with this
        server's EHLO `keywords` (none after HELO). False after the 501."""
        if self.helo_name_refused(verb, arg):
            return False
        self.reset_transaction()
        self.helo, self.esmtp = arg, verb == "EHLO"
        self.reply(250, self.hostname(), *(keywords if self.esmtp else ()))
        return True

    def sender_needs_smtputf8(self, sender: str, smtputf8: bool) -> bool:
        """RFC 6531 §3.4: a non-ASCII sender only with MAIL's SMTPUTF8; True after the 553."""
        if sender.isascii() or smtputf8:
            return False
        self.reply(*replies.NON_ASCII_SENDER)
        return True

    def not_implemented(self, arg: str) -> None:
        """A verb this session knows of but does not do: 502, counted as a bad command."""
        self.refuse(self.not_implemented_reply)

    def mail_allowed(self, greeted: bool, in_transaction: bool) -> bool:
        """MAIL's sequencing guards (RFC 5321 §4.1.4); False once refused."""
        if not greeted:
            self.refuse(replies.NEED_EHLO)
            return False
        if in_transaction:
            self.refuse(replies.NESTED_MAIL)
            return False
        return True

    def data_allowed(self, arg: str, in_transaction: bool, has_recipients: bool) -> bool:
        """DATA's guards on every port: MAIL, then an accepted RCPT, then a bare DATA
        (RFC 5321 §4.1.1.4: it takes no argument); False once refused."""
        if not in_transaction:
            self.out_of_sequence(replies.NEED_MAIL)
            return False
        if not has_recipients:
            self.refuse(replies.NO_VALID_RECIPIENTS)
            return False
        if arg:
            self.refuse(replies.DATA_SYNTAX)
            return False
        return True

    def out_of_sequence(self, reply: replies.Reply) -> None:
        """A command sent before the one it needs; a session may excuse some (fetch)."""
        self.refuse(reply)

    def mail_command(self, arg: str, esmtp: bool, dsn: bool = False) -> Optional[Tuple[str, MailParams]]:
        """MAIL's path and parameters, parsed once for every server: (sender, MailParams),
        or None after the 501/555 reply."""
        parsed = parse_path(arg, "FROM:")
        if parsed is None:
            self.refuse(replies.MAIL_SYNTAX)
            return None
        sender, param_text = parsed
        try:
            return sender, parse_mail_params(param_text, esmtp, dsn)
        except BadParameter as exc:
            self.refuse(exc.reply)
            return None

    def rcpt_command(self, arg: str, dsn: bool = False) -> Optional[Tuple[str, str, RcptParams]]:
        """RCPT's path and parameters, parsed once for every server: (address, source
        route, RcptParams), or None after the 501/555 reply. The route (`@a,@b` of
        <@a,@b:u@d>) is returned, not judged: RFC 5321 §4.1.1.3 lets a server ignore it
        or decline the relaying it implies, and the address is left to the caller's
        policy (intake's `Submission.accept_recipient`)."""
        parsed = parse_path(arg, "TO:", raw=True)
        try:
            if parsed is None:
                raise ValueError("not a path")
            route, address = split_source_route(parsed[0])
        except ValueError:
            self.refuse(replies.RCPT_SYNTAX)
            return None
        try:
            return address, route, parse_rcpt_params(parsed[1], dsn)
        except BadParameter as exc:
            self.refuse(exc.reply)
            return None

    def count_bad_command(self) -> None:
        self.bad_commands += 1
        if self.bad_commands >= self.max_bad_commands:
            self.reply_with(replies.TOO_MANY_ERRORS, self.hostname())
            raise Closed("too many bad commands")

    def close_after(self, code: int, text: str) -> None:
        """Reply, then end the session (421, 221)."""
        try:
            self.reply(code, text)
        finally:
            self.closing = True

    def hang_up(self, drain: float = 2.0) -> None:
        """End the session mid-stream, after its last reply: send FIN at once,
        then discard what the peer still sends for up to `drain` seconds, so
        closing with unread input (a reset) cannot destroy that reply in flight."""
        self.closing = True
        try:
            self.flush_held_replies()
        except Closed:
            return
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
            stop = time.monotonic() + drain
            while True:
                remaining = stop - time.monotonic()
                if remaining <= 0:
                    break
                self.sock.settimeout(remaining)
                if not socket.socket.recv(self.sock, 65536):
                    break
        except (OSError, ValueError):
            pass

    def finish(self) -> None:
        try:
            self.flush_held_replies()           # the last replies: a 221, a 421
        except Closed:
            pass
        for thing in (self.rfile, self.sock):
            try:
                if thing is not None:
                    thing.close()
            except OSError:
                pass


SP = " \t"      # the only separators in a command (RFC 5321 §4.1.1, §4.1.2)


def split_sp(text: str) -> List[str]:
    """Words split at SP (and HTAB) only: str.split() would also split at U+2028, U+0085,
    U+00A0... and let them pass as separators a peer's parser does not know."""
    return [word for word in text.replace("\t", " ").split(" ") if word]


def parse_params(text: str) -> Optional[Dict[str, str]]:
    """ESMTP parameters `KEY=VALUE KEY2` -> {KEY: VALUE}; None on syntax error."""
    params: Dict[str, str] = {}
    for item in split_sp(text):
        key, _, value = item.partition("=")
        if not key or not all(c.isalnum() or c == "-" for c in key) or not key.isascii() \
                or key.upper() in params:          # a keyword at most once (RFC 5321 §4.1.2)
            return None
        params[key.upper()] = value
    return params


class BadParameter(ValueError):
    """A MAIL or RCPT parameter refused; `reply` says how (501 or 555)."""

    def __init__(self, reply: replies.Reply):
        super().__init__(reply[1])
        self.reply = reply


@dataclass(frozen=True)
class MailParams:
    """What the MAIL parameters this server implements asked for."""
    size: Optional[int] = None      # SIZE= (RFC 1870); None when not declared
    body: str = ""                  # "", "7BIT" or "8BITMIME" (RFC 6152)
    smtputf8: bool = False          # RFC 6531
    ret: str = ""                   # DSN (RFC 3461): "FULL", "HDRS" or ""
    envid: str = ""                 # DSN: the sender's envelope id, as xtext


@dataclass(frozen=True)
class RcptParams:
    """The DSN parameters of one RCPT (RFC 3461 §4.1, §4.2), as received."""
    notify: str = ""                # "NEVER" or a list of SUCCESS, FAILURE, DELAY
    orcpt: str = ""                 # addr-type;xtext


_XTEXT = re.compile(r"^(?:[!-*,-<>-~]|\+[0-9A-F]{2})*$")            # RFC 3461 §4
_UTF8_XTEXT = re.compile(r"^(?:[!-*,-<>-~]|\+[0-9A-F]{2}|[^\x00-\x7f])*$")   # RFC 6533 unitext
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}


def parse_mail_params(text: str, esmtp: bool = True, dsn: bool = False) -> MailParams:
    """The one reading of MAIL parameters for every SMTP server here.

    A malformed list, parameters after HELO, or a SIZE that is not a number is
    501 (bad syntax); a parameter, or a BODY value, or a value on SMTPUTF8,
    that this server does not implement is 555 (RFC 5321 §4.1.1.11). `dsn`:
    the server offers DSN, so RET and ENVID are taken (501 when malformed)."""
    params = parse_params(text)
    if params is None or (params and not esmtp):
        raise BadParameter(replies.BAD_MAIL_PARAMETERS)
    size: Optional[int] = None
    body = ""
    smtputf8 = False
    ret = envid = ""
    for key, value in params.items():
        if dsn and key == "RET":
            if value.upper() not in ("FULL", "HDRS"):
                raise BadParameter(replies.RET_SYNTAX)
            ret = value.upper()
        elif dsn and key == "ENVID":
            if not value or len(value) > 100 or not _XTEXT.match(value):
                raise BadParameter(replies.ENVID_SYNTAX)
            envid = value
        elif key == "SIZE":
            if not (value.isascii() and value.isdigit()):
                raise BadParameter(replies.SIZE_SYNTAX)
            size = int(value[:40])          # an absurd number is simply too big (552)
        elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
            body = value.upper()
        elif key == "SMTPUTF8" and value == "":
            smtputf8 = True
        else:
            code, text = replies.UNSUPPORTED_MAIL_PARAMETER
            raise BadParameter((code, text % key))
    return MailParams(size, body, smtputf8, ret, envid)


def parse_rcpt_params(text: str, dsn: bool = False) -> RcptParams:
    """RCPT parameters: only DSN's NOTIFY and ORCPT, and only where DSN is offered
    (`dsn`); any other is 555, a malformed one 501."""
    params = parse_params(text)
    if params is None and dsn:
        raise BadParameter(replies.RCPT_PARAMETERS_SYNTAX)
    if params is None or (params and not dsn):
        raise BadParameter(replies.UNSUPPORTED_RCPT_PARAMETERS)
    notify = orcpt = ""
    for key, value in params.items():
        if key == "NOTIFY":
            words = [w.upper() for w in value.split(",")]
            if not (words == ["NEVER"] or (words and set(words) <= _NOTIFY
                                           and len(set(words)) == len(words))):
                raise BadParameter(replies.NOTIFY_SYNTAX)
            notify = ",".join(words)
        elif key == "ORCPT":
            kind, semicolon, address = value.partition(";")
            if not semicolon or not kind or not address or len(value) > 500 \
                    or not all(c.isascii() and (c.isalnum() or c == "-") for c in kind) \
                    or not _UTF8_XTEXT.match(address) or not address.isprintable():
                raise BadParameter(replies.ORCPT_SYNTAX)
            orcpt = value
        else:
            raise BadParameter(replies.UNSUPPORTED_RCPT_PARAMETERS)
    return RcptParams(notify, orcpt)


def parse_path(arg: str, keyword: str, raw: bool = False) -> Optional[Tuple[str, str]]:
    """`FROM:<a@b> PARAMS` -> (address, params-text); None on syntax error.

    Source routes (<@x,@y:a@b>) are dropped; the address may be empty (<>).
    `raw`: the path as sent, route and all, unchecked (`Session.rcpt_command`)."""
    head = arg[: len(keyword)]
    if head.upper() != keyword:
        return None
    rest = arg[len(keyword):].lstrip(" ")
    if not rest.startswith("<"):
        return None
    end = _closing_bracket(rest)
    if end < 0:
        return None
    address = rest[1:end]
    params = rest[end + 1:]
    if params and not params.startswith(" "):
        return None
    if any(c in address for c in " \t") and '"' not in address:
        return None
    if raw:
        return address, params.strip(SP)
    if address.startswith("@"):
        colon = address.find(":")
        if colon < 0:
            return None
        address = address[colon + 1:]
    if not address_is_safe(address):
        return None
    return address, params.strip(SP)


def _closing_bracket(text: str) -> int:
    if '"' not in text and "\\" not in text:     # nothing quoted: the first '>' closes it
        return text.find(">")
    quoted = False
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def _clean_lines(data: bytes) -> bytes:
    """The complete lines at the start of `data` if every one ends in CRLF and
    none holds another CR or LF; else b"" (the careful path takes over)."""
    end = data.rfind(b"\n") + 1
    if not end:
        return b""
    block = data[:end]
    # each CR followed by an LF and each LF preceded by a CR: the CR positions, shifted
    # by one, are the LF positions (two table look-ups in C; three counts took 60% longer)
    if block[:-1].translate(_CR_MARKS) != block[1:].translate(_LF_MARKS) or block[0] == 10:
        return b""
    return block


_LINE_STARTING_WITH_DOT = re.compile(rb"\n\.")
_CR_MARKS = bytes(1 if octet == 13 else 0 for octet in range(256))
_LF_MARKS = bytes(1 if octet == 10 else 0 for octet in range(256))


def iter_data(session: Session, chunk: int = READ_BUFFER, deadline: Optional[float] = None) -> Iterator[bytes]:
    """Yield the message text of a DATA phase, unstuffed and normalised to CRLF.

    Only <CRLF>.<CRLF> ends it: a '.' line after a bare LF (or a '.' line
    ended by a bare LF) is content, and bare CR / LF become CRLF, so nothing
    smuggled past this reader can end a message anywhere downstream.
    `deadline` (time.monotonic(); needs a reader from reader_for) ends the
    phase with DataTimeout however steadily the peer trickles; each wait is
    still bounded by the idle timeout."""
    raw = getattr(session.rfile, "raw", None)
    if deadline is None or not isinstance(raw, TimedSocketIO):
        yield from _iter_data(session, chunk)
        return
    raw.deadline = deadline
    try:
        yield from _iter_data(session, chunk, deadline)
    finally:
        raw.deadline = None
        if raw.timeout_changed:
            raw.timeout_changed = False
            try:
                session.sock.settimeout(session.idle_timeout)
            except OSError:
                pass


def _read_timed_out(session: Session, deadline: Optional[float]) -> Closed:
    # the raw reader shortened the last wait to end at the deadline, not before it
    if deadline is not None and time.monotonic() >= deadline - 0.05:
        return DataTimeout("DATA took longer than allowed")
    session.timeout()
    return Closed("timeout in DATA")


def _iter_data(session: Session, chunk: int, deadline: Optional[float] = None):
    at_line_start = True
    prev_crlf = True
    carry = b""
    while True:
        if at_line_start and prev_crlf and not carry:
            taken = _clean_block(session, chunk, deadline)
            if taken is not None:
                block, ended = taken
                if block:
                    yield block
                if ended:
                    return
                continue
        piece = _data_line(session, chunk, deadline)
        if carry:
            piece = carry + piece
            carry = b""
        if at_line_start:
            if piece == b".\r\n" and prev_crlf:
                return
            if piece.startswith(b".") and piece[1:2] not in (b"\r", b"\n"):
                piece = piece[1:]       # RFC 5321 4.5.2: a lone "." (that ends no message) stays
        if piece.endswith(b"\n"):        # a whole line: bare CR or LF inside it made CRLF
            prev_crlf = piece.endswith(b"\r\n")
            body = piece[:-2] if prev_crlf else piece[:-1]
            if b"\r" in body or b"\n" in body:
                body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            yield body + b"\r\n"
            at_line_start = True
        else:
            piece, carry = _partial_line(piece)
            if piece:
                yield piece
            at_line_start = False


def _clean_block(session: Session, chunk: int, deadline: Optional[float]
                 ) -> Optional[Tuple[bytes, bool]]:
    """The fast path: every complete line already buffered, when they are all plain
    CRLF lines, unstuffed in one go: (text, whether the final dot ended it). None when
    the per-line path must take over (bare CR or LF, overlong or partial lines)."""
    rfile = session.rfile
    try:
        buffered = rfile.peek(chunk)
    except socket.timeout:
        raise _read_timed_out(session, deadline) from None
    except (OSError, ValueError) as exc:
        raise Closed("read failed in DATA: %s" % exc) from None
    block = _clean_lines(buffered)
    if not block:
        return None
    found = _LINE_STARTING_WITH_DOT.search(block)     # (faster than bytes.find here)
    first_dot = found.start() if found else -1
    if first_dot < 0 and block[0] != 46:
        rfile.read(len(block))          # no end, nothing stuffed
        return block, False
    if block[0] != 46 and block.startswith(b".\r\n", first_dot + 1):
        rfile.read(first_dot + 4)       # the end, nothing stuffed before it
        return block[:first_dot + 1], True
    end = (b"\r\n" + block).find(b"\r\n.\r\n")
    if end >= 0:
        block = block[:end]
    rfile.read(len(block) + (3 if end >= 0 else 0))
    if block.startswith(b".") or b"\n." in block:
        block = (b"\n" + block).replace(b"\n.", b"\n")[1:]
    return block, end >= 0


def _data_line(session: Session, chunk: int, deadline: Optional[float]) -> bytes:
    """One line of the message text (or its first `chunk` octets), as received."""
    try:
        piece = session.rfile.readline(chunk)
    except socket.timeout:
        raise _read_timed_out(session, deadline) from None
    except (OSError, ValueError) as exc:
        raise Closed("read failed in DATA: %s" % exc) from None
    if not piece:
        raise Closed("connection closed in DATA")
    return piece


def _partial_line(piece: bytes) -> Tuple[bytes, bytes]:
    """The start of a line longer than a chunk: (its text, bare CRs made CRLF; a CR at
    its end, held back until the next piece says whether an LF follows it)."""
    carry = b""
    if piece.endswith(b"\r"):
        carry = b"\r"
        piece = piece[:-1]
    if b"\r" in piece:
        piece = piece.replace(b"\r", b"\r\n")
    return piece, carry
