"""Delivery after the turnaround: odmrd is the SMTP client on the customer's connection.

Built on `smtplib.SMTP`, given the session's socket and its buffered reader
(so nothing the customer already sent is lost). One result per recipient:
2xx done, 5xx failed (a DSN goes to the sender), 4xx kept for the next ATRN.
A message leaves the spool only when all its recipients have a final result.
"""
from __future__ import annotations

import logging
import smtplib
import socket
import time
from typing import Dict, List, Optional, Sequence, Tuple

from odmr.bounce import send_dsn
from odmr.spool import CHUNK, Message, SpoolError
from odmr.wire import dot_stuff

log = logging.getLogger("odmrd.delivery")

# RFC 5321 section 4.5.3.2 client timeouts
TIMEOUT_GREETING = 300.0
TIMEOUT_MAIL = 300.0
TIMEOUT_RCPT = 300.0
TIMEOUT_DATA_INIT = 120.0
TIMEOUT_DATA_BLOCK = 180.0
TIMEOUT_DATA_END = 600.0
TIMEOUT_QUIT = 60.0


class ConnectionLost(Exception):
    """The customer went away or stopped answering; the rest waits for the next ATRN."""


class ReversedClient(smtplib.SMTP):
    """smtplib on an already-open connection whose greeting has not been read yet."""

    def __init__(self, sock: socket.socket, rfile, local_hostname: str, one_line_per_write: bool = False):
        super().__init__(local_hostname=local_hostname, timeout=TIMEOUT_GREETING)
        self.sock = sock
        self.file = rfile
        self.one_line_per_write = one_line_per_write

    ehlo_msg = "EHLO"

    def putcmd(self, cmd: str, args: str = "") -> None:
        super().putcmd(cmd.upper(), args)

    def send(self, s) -> None:
        if isinstance(s, str):
            s = s.encode("utf-8")
        if self.debuglevel > 0:  # pragma: no cover
            self._print_debug("send:", repr(s[:200]))
        try:
            if self.one_line_per_write:
                # one TLS record per line: fetchmail stalls on records carrying several lines
                for line in s.splitlines(keepends=True):
                    self.sock.sendall(line)
            else:
                self.sock.sendall(s)
        except OSError as exc:
            raise smtplib.SMTPServerDisconnected("write failed: %s" % exc) from None

    def reply_at(self, timeout: float) -> Tuple[int, str]:
        self.sock.settimeout(timeout)
        code, text = self.getreply()
        return code, text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def _fmt(code: int, text: str) -> str:
    return ("%d %s" % (code, " ".join(text.split())))[:500]


def deliver_reversed(session, domains: Sequence[str]) -> None:
    """Drive the reversed connection: greeting, EHLO, every message of `domains`, QUIT."""
    runtime = session.runtime
    peer = session.peer
    one_line = bool(getattr(session, "implicit_tls", False)) and \
        runtime.settings.odmr.one_line_per_tls_record
    client = ReversedClient(session.sock, session.rfile, runtime.hostname, one_line)
    delivered = deferred = failed = 0
    try:
        code, text = client.reply_at(TIMEOUT_GREETING)
        if code != 220:
            log.warning("delivery: %s greeted with %s; nothing sent", peer, _fmt(code, text))
            _quit(client)
            return
        client.sock.settimeout(TIMEOUT_MAIL)
        code, text = client.ehlo()
        if not 200 <= code < 300:
            code, text = client.helo()
            if not 200 <= code < 300:
                log.warning("delivery: %s refused EHLO and HELO: %s", peer, _fmt(code, text))
                _quit(client)
                return
        run = Run(client, runtime, peer)
        for domain in domains:
            for message in runtime.spool.messages(domain):
                run.deliver(message)
        delivered, deferred, failed = run.delivered, run.deferred, run.failed
        for domain in domains:
            runtime.spool.sync_domain(domain)
        _quit(client)
        log.info("delivery: %s session done: %d delivered, %d deferred, %d bounced",
                 peer, delivered, deferred, failed)
    except (ConnectionLost, smtplib.SMTPException, OSError) as exc:
        log.warning("delivery: %s connection lost: %s", peer, exc)
    finally:
        for domain in domains:
            try:
                runtime.spool.sync_domain(domain)
            except OSError:
                pass


def _quit(client: ReversedClient) -> None:
    try:
        client.send("QUIT\r\n")
        client.reply_at(TIMEOUT_QUIT)
    except (smtplib.SMTPException, OSError):
        pass


class Run:
    """Delivers messages one at a time over one reversed connection."""

    def __init__(self, client: ReversedClient, runtime, peer: str):
        self.client = client
        self.runtime = runtime
        self.peer = peer
        features = client.esmtp_features if client.does_esmtp else {}
        self.pipelining = "pipelining" in features
        self.size = "size" in features
        self.eightbit = "8bitmime" in features
        self.smtputf8 = "smtputf8" in features
        self.delivered = self.deferred = self.failed = 0

    def _mail_options(self, message: Message) -> List[str]:
        options = []
        if self.size:
            options.append("SIZE=%d" % message.size)
        if message.envelope.body == "8BITMIME" and self.eightbit:
            options.append("BODY=8BITMIME")
        if message.envelope.smtputf8 and self.smtputf8:
            options.append("SMTPUTF8")
        return options

    def deliver(self, message: Message) -> None:
        pending = message.pending()
        state = message.state
        if not pending:
            self._finish(message)
            return
        needs_utf8 = not all(r.address.isascii() for r in pending) or not message.envelope.sender.isascii()
        if needs_utf8 and not self.smtputf8:
            results = {r.address: (553, "5.6.7 Customer's server does not support SMTPUTF8")
                       for r in pending}
            self._record(message, results)
            return
        try:
            results = self._transaction(message, [r.address for r in pending])
        except (smtplib.SMTPException, OSError) as exc:
            state.attempts += 1
            state.last_error = "connection lost during delivery: %s" % exc
            state.last_attempt = time.time()
            self._save(message)
            log.warning("delivery: deferred id=%s domain=%s: %s", message.id, message.domain,
                        state.last_error)
            raise ConnectionLost(str(exc)) from None
        self._record(message, results)

    def _transaction(self, message: Message, rcpts: List[str]) -> Dict[str, Tuple[int, str]]:
        """One SMTP transaction; returns each recipient's final reply."""
        client = self.client
        mail = "MAIL FROM:<%s>%s\r\n" % (message.envelope.sender,
                                         "".join(" " + o for o in self._mail_options(message)))
        rcpt_lines = ["RCPT TO:<%s>\r\n" % r for r in rcpts]
        results: Dict[str, Tuple[int, str]] = {}
        if self.pipelining:
            client.send(mail + "".join(rcpt_lines) + "DATA\r\n")
            mail_reply = client.reply_at(TIMEOUT_MAIL)
            rcpt_replies = [client.reply_at(TIMEOUT_RCPT) for _ in rcpts]
            data_reply = client.reply_at(TIMEOUT_DATA_INIT)
        else:
            client.send(mail)
            mail_reply = client.reply_at(TIMEOUT_MAIL)
            rcpt_replies = []
            data_reply = (0, "")
            if 200 <= mail_reply[0] < 300:
                for line in rcpt_lines:
                    client.send(line)
                    rcpt_replies.append(client.reply_at(TIMEOUT_RCPT))
                if any(200 <= c < 300 for c, _ in rcpt_replies):
                    client.send("DATA\r\n")
                    data_reply = client.reply_at(TIMEOUT_DATA_INIT)
                else:
                    client.send("RSET\r\n")
                    client.reply_at(TIMEOUT_MAIL)

        if not 200 <= mail_reply[0] < 300:
            for r in rcpts:
                results[r] = mail_reply
            if data_reply[0] == 354:          # out-of-step server: end the empty DATA
                client.send(".\r\n")
                client.reply_at(TIMEOUT_DATA_END)
            return results
        accepted = []
        for r, reply in zip(rcpts, rcpt_replies):
            if 200 <= reply[0] < 300:
                accepted.append(r)
            else:
                results[r] = reply
        if not accepted:
            if data_reply[0] == 354:
                client.send(".\r\n")
                client.reply_at(TIMEOUT_DATA_END)
            return results
        if data_reply[0] != 354:
            reply = data_reply if data_reply[0] >= 400 else (451, "4.5.0 unexpected reply to DATA: %s" % _fmt(*data_reply))
            for r in accepted:
                results[r] = reply
            if self.pipelining:
                client.send("RSET\r\n")
                client.reply_at(TIMEOUT_MAIL)
            return results
        self._send_data(message)
        final = client.reply_at(TIMEOUT_DATA_END)
        if final[0] < 200 or final[0] >= 600:
            final = (451, "4.5.0 unexpected reply after data: %s" % _fmt(*final))
        for r in accepted:
            results[r] = final
        return results

    def _send_data(self, message: Message) -> None:
        client = self.client
        client.sock.settimeout(TIMEOUT_DATA_BLOCK)
        at_line_start = True
        last = b"\n"
        with message.open_data() as fh:
            while True:
                chunk = fh.read(CHUNK)
                if not chunk:
                    break
                client.send(dot_stuff(chunk, at_line_start))
                at_line_start = chunk.endswith(b"\n")
                last = chunk[-1:]
        client.send(b".\r\n" if last == b"\n" else b"\r\n.\r\n")

    def _record(self, message: Message, results: Dict[str, Tuple[int, str]]) -> None:
        state = message.state
        state.attempts += 1
        state.last_attempt = time.time()
        newly_failed: Dict[str, str] = {}
        errors = []
        for rcpt, (code, text) in results.items():
            reply = _fmt(code, text)
            if 200 <= code < 300:
                state.done[rcpt] = reply
                log.info("delivery: delivered id=%s domain=%s to=<%s> reply=%r",
                         message.id, message.domain, rcpt, reply)
                self.delivered += 1
            elif 500 <= code < 600:
                state.failed[rcpt] = reply
                newly_failed[rcpt] = reply
                errors.append(reply)
                log.info("delivery: bounced id=%s domain=%s to=<%s> reply=%r",
                         message.id, message.domain, rcpt, reply)
                self.failed += 1
            else:
                if code < 400:  # garbage or an impossible code: treat as temporary
                    reply = "451 4.5.0 unusable reply: %s" % reply
                errors.append(reply)
                log.info("delivery: deferred id=%s domain=%s to=<%s> reply=%r",
                         message.id, message.domain, rcpt, reply)
                self.deferred += 1
        if errors:
            state.last_error = errors[0]
        if not message.pending():
            self._finish(message)
        else:
            self._save(message)

    def _finish(self, message: Message) -> None:
        state = message.state
        if state.failed and not state.bounced:
            try:
                send_dsn(self.runtime.spool, self.runtime.hosted_domains(), self.runtime.hostname,
                         message, dict(state.failed))
            except (SpoolError, OSError) as exc:
                log.error("delivery: cannot queue DSN for id=%s: %s; message kept", message.id, exc)
                self._save(message)
                return
            state.bounced = True
        self.runtime.spool.remove(message, sync=False)

    def _save(self, message: Message) -> None:
        try:
            self.runtime.spool.save_state(message)
        except OSError as exc:
            log.error("delivery: cannot save state of id=%s: %s", message.id, exc)
