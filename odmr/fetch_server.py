"""`odmrd fetch --maildir/--mbox`: be the SMTP server on the reversed connection.

After ATRN the provider is the SMTP client. This session greets it, takes
each message with MAIL/RCPT/DATA and stores it in the local mailbox (one copy
per message, whatever the number of recipients) before answering 250, so a
250 always means "on disk". A storage failure is `452 4.3.1`, which makes
the provider keep the message for the next ATRN. A message over `max_size`
is `552 5.3.4` (at MAIL when its SIZE says so, else after reading it to the
end without keeping any of it), which makes the provider return it.

Speed over long links: the server offers PIPELINING and CHUNKING (RFC 3030
`BDAT n [LAST]`: the data comes without a 354 round trip and without dot
stuffing). Replies are held while more of the provider's input is already
there and written in one go just before a read would wait (RFC 2920,
`wire.Session.hold_while_input_ready`), so a window of pipelined messages
costs one write back, and each message's fsync happens between reads, never
waiting for the provider.

The session reads from the reader the ATRN negotiation read the provider's
250 with (`Turnaround.file`): what the provider sent right behind that reply
is already in it.

A full disk is an ordinary answer, not a protocol error: the RCPT, DATA or
BDAT that the provider pipelined after a refused MAIL get their 503 without
counting against the bad-command budget, so the session runs to its QUIT.
"""
from __future__ import annotations

import logging
import re
import socket
import time
from typing import BinaryIO, Callable, Iterator, List, Optional

from odmr import replies
from odmr.fetch_mailbox import Mailbox, MailboxWriter, StorageError
from odmr.syntax import received_header, received_protocol
from odmr.fetch_tally import DATA, END, GREETING, Tally
from odmr.names import address_is_safe
from odmr.wire import Closed, Session, iter_data

log = logging.getLogger("odmrd.fetch")

IDLE_TIMEOUT = 660.0            # the provider may take long between messages (RFC 5321 timeouts)
MAX_RECIPIENTS = 1000
DEFAULT_MAX_SIZE = 50 * 1024 * 1024     # --max-size and [fetch] max_size: so a provider cannot fill the disk
SLACK = 1024 * 1024             # keep this much free on top of a declared SIZE
BDAT_PIECE = 65536              # BDAT data is read and stored in pieces of at most this
FLUSH_AT = 16384                # replies held back this long are written even if input waits
_BDAT_ARGS = re.compile(r"([0-9]{1,20})(?: +(LAST))?", re.I)


class _LineEnds:
    """BDAT data to CRLF lines, as DATA's reader gives them: a bare CR or LF
    becomes CRLF, and a CR at the end of a piece waits for the next one."""

    def __init__(self) -> None:
        self.carry = b""

    def feed(self, piece: bytes) -> bytes:
        data, self.carry = self.carry + piece, b""
        if data.endswith(b"\r"):
            data, self.carry = data[:-1], b"\r"
        newlines = data.count(b"\n")
        if data.count(b"\r") == newlines == data.count(b"\r\n"):
            return data
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")

    def end(self, last: bytes) -> bytes:
        """The rest; a message always ends with a complete line, as after DATA."""
        if self.carry or (last and not last.endswith(b"\n")):
            return b"\r\n"
        return b""


class _Incoming:
    """One message on its way into the mailbox, whether by DATA or by BDAT chunks:
    what was written, and why it will not be kept (too big, storage)."""

    def __init__(self, session: "LocalSMTPSession", sender: str, recipients: List[str]):
        self.sender = sender
        self.recipients = recipients
        self.max_size = session.max_size
        self.msg_id = "%x%04x" % (int(time.time() * 1000), session.delivered % 0x10000)
        self.size = 0
        self.too_big = False
        self.failure: Optional[StorageError] = None
        self.last = b""                 # the last bytes written (does the text end a line?)
        self.line_ends = _LineEnds()
        self.writer: Optional[MailboxWriter] = None
        try:
            self.writer = session.mailbox.begin(sender, session.trace_header(sender, recipients,
                                                                              self.msg_id))
        except StorageError as exc:
            self.failure = exc

    @property
    def refused(self) -> bool:
        return self.too_big or self.failure is not None

    def add(self, piece: bytes, counted: Optional[int] = None) -> None:
        """Store a CRLF piece; `counted`: its size as the provider sent it."""
        self.size += len(piece) if counted is None else counted
        if self.refused:
            return                          # read to the end, keep nothing
        if self.max_size and self.size > self.max_size:
            self.too_big = True
            self.abort()
            return
        if piece:
            self.last = piece[-2:]
        try:
            self.writer.write(piece)
        except StorageError as exc:
            self.failure = exc
            self.abort()

    def add_chunk(self, piece: bytes) -> None:
        self.add(self.line_ends.feed(piece), len(piece))

    def commit(self) -> str:
        """Durable (file and directory fsync'd) when it returns; StorageError if not."""
        if self.failure is None and self.writer is not None:
            tail = self.line_ends.end(self.last)
            if tail:
                self.add(tail, 0)
        if self.failure is not None:
            raise self.failure
        writer, self.writer = self.writer, None
        try:
            return writer.commit()
        except StorageError as exc:
            self.failure = exc
            raise

    def abort(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.abort()


class LocalSMTPSession(Session):
    """The customer's own SMTP server, spoken on the provider's connection."""

    idle_timeout = IDLE_TIMEOUT
    # a window of pipelined messages is answered in one write, once its input is used up
    hold_replies = True
    hold_while_input_ready = True
    held_replies_limit = FLUSH_AT

    def __init__(self, sock: socket.socket, peer: str, reader: BinaryIO, mailbox: Mailbox,
                 hostname: str, tls: bool, trace: Optional[Callable[[str], None]] = None,
                 max_size: int = DEFAULT_MAX_SIZE):
        # the negotiation's reader may already hold the provider's first commands
        super().__init__(sock, peer, reader)
        self.mailbox = mailbox
        self.my_hostname = hostname
        self.tls = tls
        self.trace = trace
        self.max_size = max_size        # 0: no limit
        self.too_big = 0                # messages refused with 552 for it
        self.helo = ""
        self.esmtp = False
        self.sender: Optional[str] = None
        self.recipients: List[str] = []
        self.smtputf8 = False
        self.chunked: Optional[_Incoming] = None    # a message arriving in BDAT chunks
        self.chunks_refused: Optional[replies.Reply] = None  # its chunks' answer once it failed
        self._excused = 0               # commands pipelined after a refused MAIL: not "bad"
        self.quit = False
        self.delivered = 0
        self.deferred = 0
        self.disk_full = ""             # the first "disk full" seen, for the run's summary
        self.storage_problem = ""       # the first other storage failure
        self.tally = Tally()            # the run's summary counts what each reply answered
        self._answering = GREETING

    def hostname(self) -> str:
        return self.my_hostname

    def reply(self, code: int, *lines: str) -> None:
        if self.trace:
            for index, text in enumerate(lines):
                self.trace("L: %d%s%s" % (code, "-" if index < len(lines) - 1 else " ", text))
        answering, self._answering = self._answering, ""
        if answering == "DATA" and code == 354:
            self._answering = END
        self.tally.reply(answering, code, "%d %s" % (code, lines[-1] if lines else ""))
        super().reply(code, *lines)

    def finish(self) -> None:
        self.reset_transaction()
        super().finish()

    def log_command(self, verb: str, arg: str) -> None:
        self._answering = verb
        if self.trace:
            self.trace("P: %s %s" % (verb, arg[:200]))

    def greet(self) -> None:
        self.reply_with(replies.FETCH_GREETING, self.hostname())

    # -- session verbs ------------------------------------------------------
    def smtp_EHLO(self, arg: str) -> None:
        self.hello_command("EHLO", arg, ["PIPELINING", "CHUNKING", "8BITMIME", "SMTPUTF8",
                                         "SIZE %d" % self.max_size if self.max_size else "SIZE",
                                         "ENHANCEDSTATUSCODES"])

    def smtp_HELO(self, arg: str) -> None:
        self.hello_command("HELO", arg)

    def smtp_VRFY(self, arg: str) -> None:
        self.reply(*replies.VRFY_FETCH)

    def smtp_QUIT(self, arg: str) -> None:
        self.quit = True
        super().smtp_QUIT(arg)

    smtp_EXPN = smtp_ETRN = smtp_ATRN = smtp_TURN = smtp_AUTH = smtp_STARTTLS = Session.not_implemented

    def reset_transaction(self) -> None:
        self.sender = None
        self.recipients = []
        self.smtputf8 = False
        self._excused = 0
        self.chunks_refused = None
        if self.chunked is not None:
            chunked, self.chunked = self.chunked, None
            chunked.abort()

    def out_of_sequence(self, reply: replies.Reply) -> None:
        """A 503 that counts as a bad command, unless the provider pipelined
        the command after a MAIL we refused: then it is the expected answer."""
        if self._excused > 0:
            self._excused -= 1
            self.reply(*reply)
        else:
            self.refuse(reply)

    def trace_header(self, sender: str, recipients: List[str], msg_id: str) -> bytes:
        """Return-Path and our Received: header, in front of every stored message."""
        protocol = received_protocol(self.esmtp, self.smtputf8, self.tls)
        return b"Return-Path: <%s>\r\n" % sender.encode("utf-8", "replace") + \
            received_header(self.helo, self.peer_ip, self.hostname(), protocol, msg_id, recipients)

    # -- the transaction --------------------------------------------------------
    def smtp_MAIL(self, arg: str) -> None:
        self._excused = MAX_RECIPIENTS + 2      # for the RCPTs and DATA/BDAT that may follow
        if not self.mail_allowed(bool(self.helo), self.sender is not None):
            return
        parsed = self.mail_command(arg, self.esmtp)
        if parsed is None:
            return
        address, params = parsed
        if self.sender_needs_smtputf8(address, params.smtputf8):
            return
        if params.size is not None and self._refused_for_size(address, params.size):
            return
        self._excused = 0
        self.smtputf8 = params.smtputf8
        self.sender = address
        self.reply(*replies.MAIL_OK)

    def _refused_for_size(self, sender: str, size: int) -> bool:
        """A declared SIZE over --max-size (552) or over the free space (452)."""
        if self.max_size and size > self.max_size:
            log.warning("message from <%s> refused: SIZE=%d is over --max-size %d",
                        sender, size, self.max_size)
            self.too_big += 1
            self.reply_with(replies.TOO_BIG, self.max_size)
            return True
        free = self.mailbox.free_bytes()
        if free is not None and size + SLACK > free:
            self.deferred += 1
            self._note_full("%s has %d bytes free, not enough for a message of %d bytes and "
                            "the %d kept free" % (self.mailbox.path, free, size, SLACK))
            log.info("message from <%s> deferred: %s", sender, self.disk_full)
            self.reply(*replies.NO_STORAGE)
            return True
        return False

    def _note_full(self, text: str) -> None:
        if not self.disk_full:
            self.disk_full = text

    def smtp_RCPT(self, arg: str) -> None:
        if self.sender is None:
            return self.out_of_sequence(replies.NEED_MAIL_BEFORE_RCPT)
        parsed = self.rcpt_command(arg)
        if parsed is None:
            return
        address = parsed[0]         # a source route is ignored (RFC 5321 §4.1.1.3)
        if not address:
            return self.refuse(replies.NULL_RECIPIENT)
        if not address_is_safe(address):
            return self.refuse(replies.BAD_RECIPIENT)
        if not address.isascii() and not self.smtputf8:     # RFC 6531 §3.4
            return self.reply(*replies.NON_ASCII_RECIPIENT)
        if len(self.recipients) >= MAX_RECIPIENTS:
            self.reply(*replies.TOO_MANY_RECIPIENTS)
            return
        if address not in self.recipients:
            self.recipients.append(address)
        self.reply(*replies.RCPT_OK)

    def smtp_DATA(self, arg: str) -> None:
        if self.chunked is not None or self.chunks_refused is not None:
            self.reset_transaction()            # RFC 3030: the state is indeterminate; drop it
            return self.refuse(replies.DATA_AFTER_BDAT)
        if not self.data_allowed(arg, self.sender is not None, bool(self.recipients)):
            self._excused = 0       # DATA ends the group a refused MAIL excused
            return
        incoming = _Incoming(self, self.sender, self.recipients)
        self.reset_transaction()
        self.reply(*replies.START_DATA)
        try:
            for piece in iter_data(self):
                incoming.add(piece)
        except Closed:
            incoming.abort()
            raise
        self.end_of_message(incoming)

    # -- CHUNKING (RFC 3030) --------------------------------------------------------
    def smtp_BDAT(self, arg: str) -> None:
        match = _BDAT_ARGS.fullmatch(arg)
        if match is None:
            # the chunk's length is unknown, so where the next command starts is too
            self.reply(*replies.BDAT_SYNTAX)
            self.reset_transaction()
            return self.hang_up()
        size, last = int(match.group(1)), bool(match.group(2))
        self._answering = END if last else DATA
        if self.chunks_refused is not None:         # RFC 3030: discard what was pipelined
            self.skip_chunk(size)
            refusal = self.chunks_refused
            if last:
                self.reset_transaction()
            return self.reply(*refusal)
        if self.sender is None or not self.recipients:
            self.skip_chunk(size)
            self.out_of_sequence(replies.NEED_MAIL_BEFORE_BDAT)
            if last:
                self._excused = 0
            return
        if self.chunked is None:
            self.chunked = _Incoming(self, self.sender, self.recipients)
        self.read_chunk(self.chunked, size)
        if self.chunked.refused and not last:
            self.chunks_refused = self._refusal(self.chunked)
            self.chunked.abort()
            self.chunked = None
            return self.reply(*self.chunks_refused)
        if not last:
            return self.reply_with(replies.CHUNK_RECEIVED, size)
        incoming, self.chunked = self.chunked, None
        self.reset_transaction()
        self.end_of_message(incoming)

    def _chunk_pieces(self, size: int) -> Iterator[bytes]:
        """Exactly `size` octets of the connection, in pieces."""
        left = size
        while left:
            try:
                piece = self.rfile.read1(min(left, BDAT_PIECE))
            except socket.timeout:
                self.timeout()
                raise Closed("timeout in BDAT") from None
            except (OSError, ValueError) as exc:
                raise Closed("read failed in BDAT: %s" % exc) from None
            if not piece:
                raise Closed("connection closed in BDAT")
            left -= len(piece)
            yield piece

    def skip_chunk(self, size: int) -> None:
        for _ in self._chunk_pieces(size):
            pass

    def read_chunk(self, incoming: _Incoming, size: int) -> None:
        try:
            for piece in self._chunk_pieces(size):
                incoming.add_chunk(piece)
        except Closed:
            incoming.abort()
            self.chunked = None
            raise

    # -- the end of a message -------------------------------------------------------
    def end_of_message(self, incoming: _Incoming) -> None:
        """Commit (250 only once it is durable) or refuse, and remember why."""
        where = ""
        if not incoming.refused:
            try:
                where = incoming.commit()
            except StorageError:
                pass
        if incoming.refused:
            self.reply(*self._refusal(incoming))
            return
        self.delivered += 1
        log.info("stored message from <%s> to %s in %s", incoming.sender,
                 ",".join("<%s>" % r for r in incoming.recipients), where)
        self.reply_with(replies.DELIVERED, incoming.msg_id)

    def _refusal(self, incoming: _Incoming) -> replies.Reply:
        """552 for a message over --max-size, 452 for one the mailbox could not take;
        logged here, once per message."""
        rcpts = ",".join("<%s>" % r for r in incoming.recipients)
        if incoming.too_big:
            self.too_big += 1
            log.warning("message from <%s> to %s refused: %d bytes is over --max-size %d; "
                        "the provider returns it to the sender", incoming.sender, rcpts,
                        incoming.size, self.max_size)
            return replies.TOO_BIG[0], replies.TOO_BIG[1] % self.max_size
        failure = incoming.failure
        self.deferred += 1
        if failure is not None and failure.disk_full:
            self._note_full(str(failure))
        elif not self.storage_problem:
            self.storage_problem = str(failure)
        log.info("message from <%s> to %s not stored: %s", incoming.sender, rcpts, failure)
        return replies.NO_STORAGE


def serve_reversed(sock: socket.socket, peer: str, reader: BinaryIO, mailbox: Mailbox,
                   hostname: str, tls: bool, trace: Optional[Callable[[str], None]] = None,
                   max_size: int = DEFAULT_MAX_SIZE) -> LocalSMTPSession:
    """Run the local SMTP server on the reversed connection until it ends;
    `reader` is the buffered reader the ATRN negotiation left (Turnaround.file)."""
    session = LocalSMTPSession(sock, peer, reader, mailbox, hostname, tls, trace, max_size)
    session.run()
    return session
