"""The SMTP intake port: accepts mail for hosted domains and spools it.

It never delivers and never relays: RCPT is accepted only for hosted domains
(and listed recipients where a domain restricts them). A message for several
hosted domains is written as one copy per domain, each with only that domain's
recipients, and 250 is sent only after every copy is durably on disk.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Callable, List, Optional

from odmr import replies, tls
from odmr.hops import TooManyHops
from odmr.runtime import Runtime
from odmr.spool import OUTBOUND, SpoolError
from odmr.submission import OverQuota, Submission, TooBig, accept_sender
from odmr.syntax import printable, received_header, received_protocol
from odmr.wire import DataTimeout, Session, iter_data

log = logging.getLogger("odmrd.smtp")


class IntakeSession(Session):
    """One client of the intake port."""

    log_prefix = "smtp"
    hold_replies = True         # a pipelined MAIL, RCPT, DATA is answered in one write

    def __init__(self, sock: socket.socket, peer: str, runtime: Runtime,
                 latest: Optional[Callable[[], Runtime]] = None):
        self.runtime = runtime
        self.latest = latest                # the service's current snapshot, for long sessions
        settings = runtime.settings.smtp
        self.limits = settings
        self.idle_timeout = settings.idle_timeout
        self.max_bad_commands = settings.max_bad_commands
        super().__init__(sock, peer)
        self.helo: Optional[str] = None
        self.esmtp = False
        self.tx: Optional[Submission] = None

    def hostname(self) -> str:
        return self.runtime.hostname

    def greet(self) -> None:
        log.info("smtp: connect from %s%s", self.peer,
                 " (%s)" % tls.describe(self.sock) if self.tls_active else "")
        self.reply_with(replies.INTAKE_GREETING, self.hostname())

    # -- session verbs ------------------------------------------------------
    def smtp_EHLO(self, arg: str) -> None:
        keywords = ["PIPELINING", "SIZE %d" % self.limits.max_message_size,
                    "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"]
        if self.runtime.tls is not None and not self.tls_active:
            keywords.append("STARTTLS")
        self.hello_command("EHLO", arg, keywords)

    def smtp_HELO(self, arg: str) -> None:
        self.hello_command("HELO", arg)

    def reset_transaction(self) -> None:
        self.tx = None

    def smtp_VRFY(self, arg: str) -> None:
        self.reply(*replies.VRFY_INTAKE)

    def smtp_EXPN(self, arg: str) -> None:
        self.reply(*replies.EXPN_NOT_IMPLEMENTED)

    def smtp_HELP(self, arg: str) -> None:
        self.reply(*replies.HELP)

    def smtp_STARTTLS(self, arg: str) -> None:
        if not self.starttls_command(self.runtime.tls, arg):
            return
        self.helo, self.esmtp, self.tx = None, False, None   # RFC 3207: start afresh
        log.info("smtp: %s started TLS (%s)", self.peer, tls.describe(self.sock))

    def smtp_BDAT(self, arg: str) -> None:
        self.refuse(replies.BDAT_NOT_IMPLEMENTED)

    def smtp_ETRN(self, arg: str) -> None:
        self.refuse(replies.ETRN_NOT_IMPLEMENTED)

    # -- the transaction ------------------------------------------------------
    def smtp_MAIL(self, arg: str) -> None:
        if not self.mail_allowed(self.helo is not None, self.tx is not None):
            return
        if self.latest is not None:
            # each transaction sees the hosted domains of now, not of when the client connected
            self.runtime = self.latest()
        if self.limits.require_tls and not self.tls_active:
            return self.refuse(replies.TLS_REQUIRED)
        parsed = self.mail_command(arg, self.esmtp, dsn=True)
        if parsed is None:
            return
        sender, params = parsed
        size, smtputf8 = params.size or 0, params.smtputf8
        if size > self.limits.max_message_size:
            code, text = replies.TOO_BIG
            self.reply(code, text % self.limits.max_message_size)
            return
        if self.sender_needs_smtputf8(sender, smtputf8):
            return
        decision = accept_sender(self.runtime.hosting, sender)
        if decision.detail:
            log.info("smtp: %s refused MAIL <%s>: %d %s", self.peer, printable(sender),
                     decision.code, decision.text)
        if decision.accepted:
            self.tx = Submission(sender, smtputf8, params.body, params.ret, params.envid,
                                 self.limits.max_recipients, declared_size=size)
        self.reply(*decision.reply)

    def smtp_RCPT(self, arg: str) -> None:
        tx = self.tx
        if tx is None:
            return self.refuse(replies.NEED_MAIL_BEFORE_RCPT)
        parsed = self.rcpt_command(arg, dsn=True)
        if parsed is None:
            return
        address, route, dsn = parsed            # a source route too: accept_recipient judges it
        decision = tx.accept_recipient(self.runtime.hosting, address, route)
        domain = decision.domain
        if domain == OUTBOUND and address.lower() == "postmaster":
            log.info("smtp: %s RCPT <postmaster>: for <%s>, not in a hosted domain: kept "
                     "for [queue] bounce_relay", self.peer, decision.address)
        if domain is None:
            path = route + ":" + address if route else address
            log.info("smtp: %s refused RCPT <%s>: %d %s", self.peer, printable(path),
                     decision.code, decision.text)
            self.reply(*decision.reply)
            if decision.code >= 500:
                self.count_bad_command()
            return
        tx.add(decision.address, domain, dsn.notify, dsn.orcpt)   # the same mailbox twice is delivered once
        self.reply(*decision.reply)

    def smtp_DATA(self, arg: str) -> None:
        tx = self.tx
        if not self.data_allowed(arg, tx is not None, tx is not None and bool(tx.recipients)):
            return
        self.tx = None
        self.receive(tx)

    def receive(self, tx: Submission) -> None:
        """Stream the message into one spool file per domain; reply once at the end."""
        protocol = received_protocol(self.esmtp, tx.smtputf8, self.tls_active)

        def trace(msg_id: str, recipients: List[str]) -> bytes:
            return received_header(self.helo or "", self.peer_ip, self.hostname(), protocol,
                                   msg_id, recipients)

        limit = self.limits.max_message_size
        spooling = tx.start(self.runtime.spool, "[%s] helo=%s" % (self.peer_ip, (self.helo or "")[:100]),
                            trace, limit, self.hostname(), self.limits.max_received_headers,
                            quotas=self.runtime.hosting)
        max_time = self.runtime.settings.smtp.max_data_time     # as of MAIL: reloadable
        deadline = time.monotonic() + max_time if max_time > 0 else None
        self.reply(*replies.START_DATA)
        try:
            for piece in iter_data(self, deadline=deadline):
                spooling.write(piece)
        except DataTimeout:
            spooling.abort()
            self.data_too_slow(tx, spooling.size, max_time)
            return
        except BaseException:
            spooling.abort()            # the client vanished or timed out mid-DATA: leave nothing behind
            raise
        try:
            stored = spooling.commit()
        except OverQuota as exc:
            return self._refuse_message(tx, (replies.MAILBOX_FULL[0], replies.MAILBOX_FULL[1]
                                             % exc.domain), "over quota")
        except TooBig:
            return self._refuse_message(tx, (replies.TOO_BIG[0], replies.TOO_BIG[1] % limit), "too big")
        except TooManyHops as exc:
            return self._refuse_message(tx, exc.reply, "mail loop")
        except SpoolError as exc:   # a full disk, or a spool the administrator must repair
            reply = replies.NO_STORAGE if exc.no_space else replies.LOCAL_ERROR
            return self._refuse_message(tx, reply, str(exc))
        spooling.log_accepted(log, "smtp", stored, tx.sender, "client=%s" % self.peer)
        for domain, _ in stored:
            self.runtime.metrics.message_received(domain, spooling.stored_size(domain))
        self.reply_with(replies.QUEUED, " ".join(m for _, m in stored))

    def _refuse_message(self, tx: Submission, reply: replies.Reply, why: str) -> None:
        log.warning("smtp: %s message from <%s> refused: %d %s (%s)",
                    self.peer, tx.sender, reply[0], reply[1], why)
        self.reply(*reply)

    def data_too_slow(self, tx: Submission, size: int, max_time: float) -> None:
        """max_data_time is over: nothing was stored; the rest of the client's
        stream is message text, not commands, so the session ends after the 451."""
        log.warning("smtp: %s message from <%s> refused: 451 DATA took longer than "
                    "max_data_time (%ds, %d bytes received); nothing stored, closing",
                    self.peer, tx.sender, max_time, size)
        try:
            self.reply_with(replies.DATA_TOO_SLOW, self.hostname())
        finally:
            self.hang_up()

    def log_command(self, verb: str, arg: str) -> None:
        log.debug("smtp: %s <- %s %s", self.peer, verb, arg[:200])
