"""`odmrd fetch --maildir/--mbox`: be the SMTP server on the reversed connection.

After ATRN the provider is the SMTP client. This session greets it, takes
each message with MAIL/RCPT/DATA and stores it in the local mailbox (one copy
per message, whatever the number of recipients) before answering 250, so a
250 always means "on disk". A storage failure is `452 4.3.1`, which makes
the provider keep the message for the next ATRN. A message over `max_size`
is `552 5.3.4` (at MAIL when its SIZE says so, else after reading it to the
end without keeping any of it), which makes the provider return it.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import BinaryIO, Callable, List, Optional

from odmr import replies
from odmr.fetch_mailbox import Mailbox, StorageError
from odmr.syntax import helo_name_ok, received_header
from odmr.fetch_tally import END, GREETING, Tally
from odmr.wire import BadParameter, Closed, Session, iter_data, parse_path, parse_rcpt_params

log = logging.getLogger("odmrd.fetch")

IDLE_TIMEOUT = 660.0            # the provider may take long between messages (RFC 5321 timeouts)
MAX_RECIPIENTS = 1000
DEFAULT_MAX_SIZE = 50 * 1024 * 1024     # --max-size: so a provider cannot fill the disk
SLACK = 1024 * 1024             # keep this much free on top of a declared SIZE


class LocalSMTPSession(Session):
    """The customer's own SMTP server, spoken on the provider's connection."""

    idle_timeout = IDLE_TIMEOUT

    def __init__(self, sock: socket.socket, peer: str, reader: BinaryIO, mailbox: Mailbox,
                 hostname: str, tls: bool, trace: Optional[Callable[[str], None]] = None,
                 max_size: int = DEFAULT_MAX_SIZE):
        super().__init__(sock, peer)
        # the negotiation's reader: the provider's first commands may already be in it
        self.rfile = reader
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
        self.quit = False
        self.delivered = 0
        self.deferred = 0
        self.tally = Tally()            # the run's summary counts what each reply answered
        self._answering = GREETING
        self.peer_ip = _address_only(peer)

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

    def log_command(self, verb: str, arg: str) -> None:
        self._answering = verb
        if self.trace:
            self.trace("P: %s %s" % (verb, arg[:200]))

    def greet(self) -> None:
        self.reply(220, "%s ESMTP odmrd fetch ready" % self.hostname())

    # -- session verbs ------------------------------------------------------
    def smtp_EHLO(self, arg: str) -> None:
        if not helo_name_ok(arg):       # it goes into the Received: header of every message
            self.reply(501, "5.5.4 Syntax: EHLO domain or address literal")
            return self.count_bad_command()
        self.reset_transaction()
        self.helo, self.esmtp = arg, True
        self.reply(250, self.hostname(), "PIPELINING", "8BITMIME", "SMTPUTF8",
                   "SIZE %d" % self.max_size if self.max_size else "SIZE", "ENHANCEDSTATUSCODES")

    def smtp_HELO(self, arg: str) -> None:
        if not helo_name_ok(arg):
            self.reply(501, "5.5.4 Syntax: HELO domain or address literal")
            return self.count_bad_command()
        self.reset_transaction()
        self.helo, self.esmtp = arg, False
        self.reply(250, self.hostname())

    def smtp_VRFY(self, arg: str) -> None:
        self.reply(252, "2.5.0 Send some mail, I'll try my best")

    def smtp_QUIT(self, arg: str) -> None:
        self.quit = True
        super().smtp_QUIT(arg)

    def _not_here(self, arg: str) -> None:
        self.reply(502, "5.5.1 Command not implemented")
        self.count_bad_command()

    smtp_EXPN = smtp_BDAT = smtp_ETRN = smtp_ATRN = smtp_TURN = smtp_AUTH = smtp_STARTTLS = _not_here

    def reset_transaction(self) -> None:
        self.sender = None
        self.recipients = []
        self.smtputf8 = False

    # -- the transaction --------------------------------------------------------
    def smtp_MAIL(self, arg: str) -> None:
        if not self.mail_allowed(bool(self.helo), self.sender is not None):
            return
        parsed = self.mail_command(arg, self.esmtp)
        if parsed is None:
            return
        address, params = parsed
        if params.size is not None:
            if self.max_size and params.size > self.max_size:
                log.warning("message from <%s> refused: SIZE=%d is over --max-size %d",
                            address, params.size, self.max_size)
                self.too_big += 1
                self.reply(552, self._too_big_text())
                return
            free = self.mailbox.free_bytes()
            if free is not None and params.size + SLACK > free:
                self.reply(*replies.NO_STORAGE)
                return
        self.smtputf8 = params.smtputf8
        self.sender = address
        self.reply(*replies.MAIL_OK)

    def smtp_RCPT(self, arg: str) -> None:
        if self.sender is None:
            return self.refuse(replies.NEED_MAIL_BEFORE_RCPT)
        parsed = parse_path(arg, "TO:")
        if parsed is None or not parsed[0]:
            return self.refuse(replies.RCPT_SYNTAX)
        try:
            parse_rcpt_params(parsed[1])
        except BadParameter as exc:
            return self.refuse(exc.reply)
        if len(self.recipients) >= MAX_RECIPIENTS:
            self.reply(*replies.TOO_MANY_RECIPIENTS)
            return
        if parsed[0] not in self.recipients:
            self.recipients.append(parsed[0])
        self.reply(*replies.RCPT_OK)

    def smtp_DATA(self, arg: str) -> None:
        if self.sender is None:
            return self.refuse(replies.NEED_MAIL)
        if not self.recipients:
            return self.refuse(replies.NO_VALID_RECIPIENTS)
        sender, recipients = self.sender, self.recipients
        self.reset_transaction()
        self.receive(sender, recipients)

    def receive(self, sender: str, recipients: List[str]) -> None:
        """Stream DATA into the mailbox; 250 only once it is durable."""
        msg_id = "%x%04x" % (int(time.time() * 1000), self.delivered % 0x10000)
        protocol = "ESMTP" if self.esmtp else "SMTP"
        if self.tls:
            protocol += "S"
        header = b"Return-Path: <%s>\r\n" % sender.encode("utf-8", "replace") + \
            received_header(self.helo, self.peer_ip, self.hostname(), protocol, msg_id, recipients)
        failure = None
        delivery = None
        try:
            delivery = self.mailbox.begin(sender, header)
        except StorageError as exc:
            failure = str(exc)
        self.reply(354, "End data with <CR><LF>.<CR><LF>")
        size = 0
        too_big = False
        try:
            for piece in iter_data(self):
                size += len(piece)
                if failure is not None or too_big:
                    continue                    # read to the end, keep nothing
                if self.max_size and size > self.max_size:
                    too_big = True
                    if delivery is not None:
                        delivery.abort()
                    continue
                try:
                    delivery.write(piece)
                except StorageError as exc:
                    failure = str(exc)
                    delivery.abort()
        except Closed:
            if delivery is not None and failure is None and not too_big:
                delivery.abort()
            raise
        if too_big:
            self.too_big += 1
            log.warning("message from <%s> to %s refused: %d bytes is over --max-size %d; "
                        "the provider returns it to the sender", sender,
                        ",".join("<%s>" % r for r in recipients), size, self.max_size)
            self.reply(552, self._too_big_text())
            return
        where = ""
        if failure is None:
            try:
                where = delivery.commit()
            except StorageError as exc:
                failure = str(exc)
        if failure is not None:
            self.deferred += 1
            log.warning("message from <%s> not stored: %s", sender, failure)
            self.reply(*replies.NO_STORAGE)
            return
        self.delivered += 1
        log.info("stored message from <%s> to %s in %s", sender,
                 ",".join("<%s>" % r for r in recipients), where)
        self.reply(250, "2.0.0 Ok: delivered as %s" % msg_id)

    def _too_big_text(self) -> str:
        return replies.TOO_BIG[1] % self.max_size


def serve_reversed(sock: socket.socket, peer: str, reader: BinaryIO, mailbox: Mailbox,
                   hostname: str, tls: bool, trace: Optional[Callable[[str], None]] = None,
                   max_size: int = DEFAULT_MAX_SIZE) -> LocalSMTPSession:
    """Run the local SMTP server on the reversed connection until it ends;
    `reader` is the buffered reader the ATRN negotiation left (Turnaround.file)."""
    session = LocalSMTPSession(sock, peer, reader, mailbox, hostname, tls, trace, max_size)
    session.run()
    return session


def _address_only(peer: str) -> str:
    """'192.0.2.1', '::1', '[::1]:366' or '192.0.2.1:366' -> the bare address."""
    import ipaddress
    try:
        return str(ipaddress.ip_address(peer.strip("[]")))
    except ValueError:
        pass
    host = peer.rsplit(":", 1)[0].strip("[]")
    return host
