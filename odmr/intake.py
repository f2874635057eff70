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
from odmr import metrics
from odmr.hops import HopCount, TooManyHops
from odmr.runtime import Runtime
from odmr.spool import OUTBOUND, SpoolError
from odmr.submission import OverQuota, Submission, TooBig
from odmr.syntax import helo_name_ok, printable, received_header, split_source_route
from odmr.wire import BadParameter, DataTimeout, Session, iter_data, parse_path, parse_rcpt_params

log = logging.getLogger("odmrd.smtp")


class Transaction(Submission):
    """The envelope being collected between MAIL and the end of DATA."""

    def __init__(self, sender: str, smtputf8: bool, body: str, size: int, ret: str = "",
                 envid: str = ""):
        super().__init__(sender, smtputf8, body, ret, envid)
        self.declared_size = size


class IntakeSession(Session):
    """One client of the intake port."""

    protocol_name = "ESMTP"

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
        self.tx: Optional[Transaction] = None
        self.peer_ip = peer.rsplit(":", 1)[0].strip("[]")

    def hostname(self) -> str:
        return self.runtime.hostname

    def greet(self) -> None:
        log.info("smtp: connect from %s%s", self.peer,
                 " (%s)" % tls.describe(self.sock) if self.tls_active else "")
        self.reply(220, "%s ESMTP odmrd ready" % self.hostname())

    # -- session verbs ------------------------------------------------------
    def smtp_EHLO(self, arg: str) -> None:
        if not helo_name_ok(arg):
            self._bad_helo("EHLO", arg)
            return
        self.helo, self.esmtp, self.tx = arg, True, None
        lines = [self.hostname(), "PIPELINING", "SIZE %d" % self.limits.max_message_size,
                 "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"]
        if self.runtime.tls is not None and not self.tls_active:
            lines.append("STARTTLS")
        self.reply(250, *lines)

    def smtp_HELO(self, arg: str) -> None:
        if not helo_name_ok(arg):
            self._bad_helo("HELO", arg)
            return
        self.helo, self.esmtp, self.tx = arg, False, None
        self.reply(250, self.hostname())

    def _bad_helo(self, verb: str, arg: str) -> None:
        """RFC 5321 §4.1.4: a domain or an address literal, never free text (it goes
        into the Received: header). The session's earlier EHLO, if any, still holds."""
        log.info("smtp: %s %s refused: not a domain or address literal: %s",
                 self.peer, verb, printable(arg, 100))
        self.reply(501, "5.5.4 Syntax: %s domain or address literal" % verb)
        self.count_bad_command()

    def reset_transaction(self) -> None:
        self.tx = None

    def smtp_VRFY(self, arg: str) -> None:
        self.reply(252, "2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg: str) -> None:
        self.reply(502, "5.5.1 EXPN not implemented")

    def smtp_HELP(self, arg: str) -> None:
        self.reply(214, "2.0.0 See RFC 5321")

    def smtp_STARTTLS(self, arg: str) -> None:
        if not self.starttls_command(self.runtime.tls, arg):
            return
        self.helo, self.esmtp, self.tx = None, False, None   # RFC 3207: start afresh
        log.info("smtp: %s started TLS (%s)", self.peer, tls.describe(self.sock))

    def smtp_BDAT(self, arg: str) -> None:
        self.reply(502, "5.5.1 BDAT not implemented")
        self.count_bad_command()

    def smtp_ETRN(self, arg: str) -> None:
        self.reply(502, "5.5.1 ETRN not implemented; use ATRN on the ODMR port")
        self.count_bad_command()

    # -- the transaction ------------------------------------------------------
    def smtp_MAIL(self, arg: str) -> None:
        if not self.mail_allowed(self.helo is not None, self.tx is not None):
            return
        if self.latest is not None:
            # each transaction sees the hosted domains of now, not of when the client connected
            self.runtime = self.latest()
        if self.limits.require_tls and not self.tls_active:
            self.reply(530, "5.7.0 Must issue a STARTTLS command first")
            return self.count_bad_command()
        parsed = self.mail_command(arg, self.esmtp, dsn=True)
        if parsed is None:
            return
        sender, params = parsed
        size, smtputf8 = params.size or 0, params.smtputf8
        if size > self.limits.max_message_size:
            code, text = replies.TOO_BIG
            self.reply(code, text % self.limits.max_message_size)
            return
        if not sender.isascii() and not smtputf8:
            self.reply(553, "5.6.7 Non-ASCII sender needs SMTPUTF8")
            return
        if sender and "@" not in sender:
            self.reply(553, "5.1.7 Sender address needs a domain")
            return
        if len(sender) > 256:
            self.reply(553, "5.1.7 Sender address too long")
            return
        routed = sender and self.runtime.sender_routing(sender)
        if routed:
            log.info("smtp: %s refused MAIL <%s>: a sender in a hosted domain with %s",
                     self.peer, printable(sender), routed)
            self.reply(550, "5.7.1 Routing refused: %s" % routed)
            return
        self.tx = Transaction(sender, smtputf8, params.body, size, params.ret, params.envid)
        self.reply(*replies.MAIL_OK)

    def smtp_RCPT(self, arg: str) -> None:
        tx = self.tx
        if tx is None:
            return self.refuse(replies.NEED_MAIL_BEFORE_RCPT)
        parsed = parse_path(arg, "TO:", raw=True)     # a source route too: classify_recipient judges it
        try:
            path, param_text = parsed
            route, address = split_source_route(path)
        except (TypeError, ValueError):
            return self.refuse(replies.RCPT_SYNTAX)
        try:
            dsn = parse_rcpt_params(param_text, dsn=True)
        except BadParameter as exc:
            return self.refuse(exc.reply)
        if len(address) > 256:
            self.reply(501, "5.1.3 Recipient address too long")
            return self.count_bad_command()
        if len(tx.recipients) >= self.limits.max_recipients:
            self.reply(*replies.TOO_MANY_RECIPIENTS)
            return
        if address.lower() == "postmaster":
            # RFC 5321 §4.5.1: the domainless postmaster must work; it means the
            # administrator of this host ([smtp] postmaster, else postmaster@hostname)
            address, (domain, code, text) = self.runtime.postmaster_recipient(tx.smtputf8, route)
            if domain == OUTBOUND:
                log.info("smtp: %s RCPT <postmaster>: for <%s>, not in a hosted domain: kept "
                         "for [queue] bounce_relay", self.peer, address)
        else:
            domain, code, text = self.runtime.classify_recipient(address, tx.smtputf8, route=route)
        if domain is None:
            log.info("smtp: %s refused RCPT <%s>: %d %s", self.peer, printable(path), code, text)
            self.reply(code, text)
            if code >= 500:
                self.count_bad_command()
            return
        if not self.runtime.quota_ok(domain, tx.declared_size):
            self.reply(452, "4.2.2 Mailbox full for %s, try again later" % domain)
            return
        tx.add(address, domain, dsn.notify, dsn.orcpt)   # the same mailbox twice is delivered once
        self.reply(250, text)

    def smtp_DATA(self, arg: str) -> None:
        tx = self.tx
        if tx is None:
            return self.refuse(replies.NEED_MAIL)
        if not tx.recipients:
            return self.refuse(replies.NO_VALID_RECIPIENTS)
        if arg:
            self.reply(501, "5.5.4 Syntax: DATA")
            return self.count_bad_command()
        self.tx = None
        self.receive(tx)

    def receive(self, tx: Transaction) -> None:
        """Stream the message into one spool file per domain; reply once at the end."""
        protocol = ("UTF8SMTP" if tx.smtputf8 else "ESMTP") if self.esmtp else "SMTP"
        if self.tls_active and self.esmtp:
            protocol += "S"

        def trace(msg_id: str, recipients: List[str]) -> bytes:
            return received_header(self.helo or "", self.peer_ip, self.hostname(), protocol,
                                   msg_id, recipients)

        limit = self.limits.max_message_size
        hops = HopCount(self.hostname(), self.limits.max_received_headers, domains=tx.by_domain())
        spooling = tx.start(self.runtime.spool, "[%s] helo=%s" % (self.peer_ip, (self.helo or "")[:100]),
                            trace, limit, hops)
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
            gated = self.runtime.quota_domains(tx.by_domain())
            stored = spooling.commit_within(self.runtime.spool, gated,
                                            lambda d, size: self.runtime.quota_ok(d, size, fresh=True)) \
                if gated else spooling.commit()
        except OverQuota as exc:
            return self._refuse_message(tx, (452, "4.2.2 Mailbox full for %s, try again later"
                                             % exc.domain), "over quota")
        except TooBig:
            return self._refuse_message(tx, (replies.TOO_BIG[0], replies.TOO_BIG[1] % limit), "too big")
        except TooManyHops as exc:
            return self._refuse_message(tx, (554, exc.text), "mail loop")
        except SpoolError as exc:
            return self._refuse_message(tx, replies.NO_STORAGE, str(exc))
        by_domain = tx.by_domain()
        for domain, msg_id in stored:
            log.info("smtp: accepted id=%s domain=%s size=%d from=<%s> to=%s client=%s",
                     msg_id, domain, spooling.stored_size(domain), tx.sender,
                     ",".join("<%s>" % a for a in by_domain[domain]), self.peer)
            metrics.message_received(domain, spooling.stored_size(domain))
        self.reply(250, "2.0.0 Ok: queued as %s" % " ".join(m for _, m in stored))

    def _refuse_message(self, tx: Transaction, reply: replies.Reply, why: str) -> None:
        log.warning("smtp: %s message from <%s> refused: %d %s (%s)",
                    self.peer, tx.sender, reply[0], reply[1], why)
        self.reply(*reply)

    def data_too_slow(self, tx: Transaction, size: int, max_time: float) -> None:
        """max_data_time is over: nothing was stored; the rest of the client's
        stream is message text, not commands, so the session ends after the 451."""
        log.warning("smtp: %s message from <%s> refused: 451 DATA took longer than "
                    "max_data_time (%ds, %d bytes received); nothing stored, closing",
                    self.peer, tx.sender, max_time, size)
        try:
            self.reply(451, "4.4.2 %s DATA took too long, closing connection" % self.hostname())
        finally:
            self.hang_up()

    def log_command(self, verb: str, arg: str) -> None:
        log.debug("smtp: %s <- %s %s", self.peer, verb, arg[:200])
