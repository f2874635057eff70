"""The ODMR port (RFC 2645, provider side): EHLO, AUTH, ATRN, then turnaround.

State: initial -> (AUTH) -> authenticated -> (ATRN 250) -> reversed. On the
250 this session hands a `delivery.Handoff` (its socket, its buffered reader,
the peer, whether TLS began at connect, the claimed domains, the runtime, the
service's queue manager, stop event and delivery timeouts) to `delivery`, which acts as the SMTP
client on the same connection; delivery never sees the session itself.
"""
from __future__ import annotations

import base64
import binascii
import logging
import time
import socket
import threading
from typing import Callable, List, Optional

from odmr import replies, sasl, tls
from odmr import metrics
from odmr.accounts import Account
from odmr.delivery import Handoff, Timeouts, deliver_reversed
from odmr.names import normalize_domain
from odmr.queuemgr import QueueManager
from odmr.runtime import Runtime
from odmr.spool import DomainBusy, DomainClaim, describe_error
from odmr.wire import MAX_COMMAND_LINE, LineTooLong, Session, split_sp

log = logging.getLogger("odmrd.odmr")

CLAIM_WAIT = 2.0        # seconds ATRN waits for a domain another session is letting go

# RFC 4954 section 4: a SASL response of up to 12,288 octets of base64, on the AUTH
# command line (after "AUTH <mechanism> ", a mechanism name being at most 20
# characters) or on a line of its own; other command lines keep 512 octets.
MAX_AUTH_RESPONSE = 12288
MAX_AUTH_LINE = MAX_AUTH_RESPONSE + 2
MAX_AUTH_COMMAND_LINE = len("AUTH ") + 20 + 1 + MAX_AUTH_RESPONSE + 2



class ATRNSyntaxError(ValueError):
    pass


class _ResponseTooLong(sasl.SASLError):
    """A SASL response line longer than RFC 4954's 12,288 octets."""


class _Throttled(sasl.SASLError):
    """The address ran out of guesses while an exchange was under way."""


def parse_atrn_domains(arg: str) -> List[str]:
    """`example.org, Example.COM` -> ['example.org', 'example.com'] (order kept, no duplicates)."""
    if not arg.strip():
        return []
    domains: List[str] = []
    for element in arg.split(","):
        element = element.strip(" ")
        if not element:
            raise ATRNSyntaxError("empty domain in ATRN list")
        try:
            domain = normalize_domain(element)
        except ValueError as exc:
            raise ATRNSyntaxError(str(exc)) from None
        if domain not in domains:
            domains.append(domain)
    return domains


class ODMRSession(Session):
    """One customer on the ODMR port."""

    log_prefix = "odmr"

    def __init__(self, sock: socket.socket, peer: str, runtime: Runtime,
                 latest: Optional[Callable[[], Runtime]], queue: QueueManager,
                 service_stop: threading.Event, delivery_timeouts: Timeouts = Timeouts()):
        self.runtime = runtime
        self.latest = latest                # the service's current snapshot (users file edits)
        self.queue = queue                  # the service's: what one session could not record
        self.service_stop = service_stop    # set when the service stops
        self.delivery_timeouts = delivery_timeouts      # the service's, for after ATRN
        self.odmr = runtime.settings.odmr
        self.idle_timeout = self.odmr.idle_timeout
        self.max_bad_commands = self.odmr.max_bad_commands
        super().__init__(sock, peer)
        self.implicit_tls = self.tls_active
        self.helo: Optional[str] = None
        self.account: Optional[Account] = None
        self.auth_failures = 0

    def hostname(self) -> str:
        return self.runtime.hostname

    def greet(self) -> None:
        log.info("odmr: connect from %s%s", self.peer,
                 " (%s)" % tls.describe(self.sock) if self.tls_active else "")
        if self._throttled():
            return self._refuse_throttled("refused")
        self.reply_with(replies.ODMR_GREETING, self.hostname())

    def _throttled(self) -> bool:
        return self.runtime.throttle.blocked(self.peer_ip, self.odmr.auth_throttle_failures,
                                             self.odmr.auth_throttle_window)

    def _refuse_throttled(self, what: str) -> None:
        """The address failed too often: the same 421 at connect and at every later AUTH."""
        log.warning("odmr: %s %s: too many failed authentications recently", self.peer, what)
        code, text = replies.AUTH_THROTTLED
        self.close_after(code, text % self.hostname())

    def finish(self) -> None:
        log.debug("odmr: disconnect from %s", self.peer)
        super().finish()

    def mechanisms(self) -> List[str]:
        """Mechanisms to advertise now (PLAIN/LOGIN only under TLS unless allowed)."""
        names = []
        if self._external_identity() is not None:
            names.append("EXTERNAL")
        for name in self.odmr.mechanisms:
            if name not in sasl.SERVER_MECHANISMS:
                continue
            if sasl.SERVER_MECHANISMS[name].needs_tls and not self._plaintext_ok():
                continue
            names.append(name)
        return names

    def _plaintext_ok(self) -> bool:
        return self.tls_active or self.odmr.allow_plaintext_passwords

    # -- verbs ----------------------------------------------------------------
    def smtp_EHLO(self, arg: str) -> None:
        keywords = []
        if self.runtime.tls is not None and not self.tls_active:
            keywords.append("STARTTLS")
        mechs = self.mechanisms()
        if mechs and self.account is None and not (self.odmr.require_tls and not self.tls_active):
            keywords.append("AUTH " + " ".join(mechs))
        keywords += ["ENHANCEDSTATUSCODES", "ATRN"]
        self.hello_command("EHLO", arg, keywords)

    def smtp_HELO(self, arg: str) -> None:
        self.refuse(replies.USE_EHLO)

    def smtp_STARTTLS(self, arg: str) -> None:
        if not self.starttls_command(self.runtime.tls, arg):
            return
        self.helo = None              # RFC 3207: forget everything learnt in plaintext
        self.account = None
        log.info("odmr: %s started TLS (%s)", self.peer, tls.describe(self.sock))

    def _external_identity(self) -> Optional[dict]:
        if not (self.tls_active and self.runtime.settings.tls.client_ca_file):
            return None
        return tls.peer_identity(self.sock)

    def _auth_external(self, initial: Optional[bytes]) -> Optional[Account]:
        """SASL EXTERNAL: the verified client certificate names the account."""
        identity = self._external_identity()
        if identity is None:
            return None
        if initial is None:
            initial = self._challenge(b"")
        account = (self.runtime.accounts.by_client_cert("sha256:" + identity["sha256"])
                   or self.runtime.accounts.by_client_cert(identity["cn"]))
        if account is None:
            return None
        if initial and initial.decode("utf-8", "replace") != account.name:
            return None
        return account

    not_implemented_reply = replies.NOT_IMPLEMENTED_ON_ODMR_PORT
    smtp_MAIL = smtp_RCPT = smtp_DATA = smtp_BDAT = smtp_ETRN = smtp_TURN = Session.not_implemented
    smtp_VRFY = smtp_EXPN = smtp_HELP = Session.not_implemented

    def smtp_AUTH(self, arg: str) -> None:
        if self.helo is None:
            return self.refuse(replies.NEED_EHLO)
        if self.account is not None:
            return self.refuse(replies.ALREADY_AUTHENTICATED)
        if self._throttled():
            # a session opened before its address ran out of guesses gets none either
            return self._refuse_throttled("AUTH refused")
        parts = split_sp(arg)
        if not parts or len(parts) > 2:
            return self.refuse(replies.AUTH_SYNTAX)
        if len(parts) == 2 and len(parts[1]) > MAX_AUTH_RESPONSE:
            self.reply(*replies.AUTH_LINE_TOO_LONG)
            return self.count_bad_command()
        name = parts[0].upper()
        if not self._mechanism_usable(name):
            return self.count_bad_command()
        try:
            username = self._exchange(name, parts[1] if len(parts) == 2 else None)
        except _Throttled:
            return self._refuse_throttled("AUTH refused")
        except sasl.AuthCancelled:
            self.reply(*replies.AUTH_CANCELLED)
            return
        except _ResponseTooLong:
            self.reply(*replies.AUTH_LINE_TOO_LONG)
            return self.count_bad_command()
        except sasl.AuthProtocolError:
            return self._auth_failed(name, None, replies.AUTH_MALFORMED)
        except sasl.AuthFailed:
            return self._auth_failed(name, None)
        account = self.runtime.accounts.get(username)
        if account is None:
            return self._auth_failed(name, username)
        if self._throttled():
            # tripped by other sessions while this exchange ran: no answer to this guess
            return self._refuse_throttled("AUTH as %s refused" % account.name)
        self.account = account
        log.info("odmr: %s authenticated as %s (%s)", self.peer, account.name, name)
        self.reply(*replies.AUTH_OK)

    def _mechanism_usable(self, name: str) -> bool:
        """False (after the reply) for a mechanism this session cannot use now."""
        if self.odmr.require_tls and not self.tls_active:
            self.reply(*replies.TLS_REQUIRED)
            return False
        if name == "EXTERNAL":
            if self._external_identity() is None:
                self.reply(*replies.EXTERNAL_NEEDS_CERTIFICATE)
                return False
        elif name not in self.odmr.mechanisms or name not in sasl.SERVER_MECHANISMS:
            self.reply(*replies.UNRECOGNIZED_MECHANISM)
            return False
        elif sasl.SERVER_MECHANISMS[name].needs_tls and not self._plaintext_ok():
            self.reply(*replies.MECHANISM_NEEDS_TLS)
            return False
        return True

    def _exchange(self, name: str, initial_text: Optional[str]) -> str:
        """Run one SASL exchange; the account name it proves, else a sasl.SASLError."""
        initial = self._decode(initial_text) if initial_text is not None else None
        if name == "EXTERNAL":
            external = self._auth_external(initial)
            if external is None:
                raise sasl.AuthFailed()
            return external.name
        mech = sasl.server_mechanism(name, self.runtime.accounts.get, self.hostname(),
                                     self.runtime.decoys())
        return mech.authenticate(self._challenge, initial)

    def _auth_failed(self, mechanism: str, username: Optional[str],
                     reply: replies.Reply = replies.AUTH_FAILED) -> None:
        """Count the failure (here and per address) before the client can see the reply."""
        already_throttled = self._throttled()
        self.auth_failures += 1
        self.runtime.throttle.record(self.peer_ip)
        self.runtime.metrics.auth_failed(mechanism)
        log.warning("odmr: authentication failed from %s (%s)%s", self.peer, mechanism,
                    " user=%s" % username if username else "")
        if already_throttled:
            # tripped by other sessions while this exchange ran: no answer to this guess
            return self._refuse_throttled("AUTH refused")
        self.reply(*reply)
        if self.auth_failures >= self.odmr.max_auth_failures or self._throttled():
            code, text = replies.TOO_MANY_AUTH_FAILURES
            self.close_after(code, text % self.hostname())

    def _decode(self, text: str) -> bytes:
        if text == "*":
            raise sasl.AuthCancelled()
        if text == "=":
            return b""
        try:
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise sasl.AuthProtocolError("bad base64") from None

    def _challenge(self, data: bytes) -> bytes:
        """The SASL mechanism's channel: one 334 out, one line back.

        Not once the address ran out of guesses: SCRAM's last challenge would
        tell whether the proof was right."""
        if self._throttled():
            raise _Throttled()
        self.reply(334, base64.b64encode(data).decode("ascii"))
        try:
            line = self.read_line(MAX_AUTH_LINE)
        except LineTooLong:
            raise _ResponseTooLong() from None
        return self._decode(line.rstrip(b"\r\n").decode("ascii", "replace").strip())

    def read_line(self, limit: int = MAX_COMMAND_LINE) -> bytes:
        """Command lines keep their 512 octets, except AUTH with an initial response."""
        if limit != MAX_COMMAND_LINE:
            return super().read_line(limit)
        line = super().read_line(MAX_AUTH_COMMAND_LINE)
        if len(line) > MAX_COMMAND_LINE and line[:5].upper() != b"AUTH ":
            raise LineTooLong()
        return line

    @metrics.counts_first_reply
    def smtp_ATRN(self, arg: str) -> None:
        account = self.account
        if account is None:
            self.reply(*replies.AUTH_REQUIRED)
            return self.count_bad_command()
        try:
            requested = parse_atrn_domains(arg)
        except ATRNSyntaxError as exc:
            log.info("odmr: %s ATRN syntax error: %s", self.peer, str(exc))
            return self.refuse(replies.ATRN_SYNTAX)
        domains = self._permitted_domains(account, requested)
        if domains is None:
            return
        claim = self._claim(domains, account.name)
        if claim is None:
            return
        with claim:
            self._reverse_if_mail(domains, account.name)

    def _permitted_domains(self, account: Account, requested: List[str]) -> Optional[List[str]]:
        """The domains asked for (all the account's when none are), if the account as it
        is now still holds every one; else None, refused and logged."""
        if self.latest is not None:
            # the account as it is now: deleted since AUTH, or a domain taken away, counts
            self.runtime = self.latest()
            current = self.runtime.accounts.get(account.name)
            if current is None:
                log.warning("odmr: %s (%s) ATRN refused: the account no longer exists",
                            self.peer, account.name)
                self.reply(*replies.ATRN_REFUSED)
                return None
            account = self.account = current
        domains = requested or list(account.domains)
        foreign = [d for d in domains if d not in account.domains]
        if foreign:
            log.warning("odmr: %s (%s) ATRN %s refused: not the account's domains: %s",
                        self.peer, account.name, ",".join(domains), ",".join(foreign))
            self.reply(*replies.ATRN_REFUSED)
            return None
        return domains

    def _claim(self, domains: List[str], name: str) -> Optional[DomainClaim]:
        """The domains' claim; None when another session holds one or the spool cannot
        be claimed (451 sent and logged)."""
        try:
            return _claim_soon(self.runtime.spool, domains)
        except DomainBusy as busy:
            log.info("odmr: %s (%s) ATRN %s: %s is being delivered by another session",
                     self.peer, name, ",".join(domains), busy)
        except OSError as exc:
            log.error("odmr: %s (%s) ATRN %s: 451, cannot claim the spool: %s", self.peer,
                      name, ",".join(domains), describe_error(exc))
        self.reply(*replies.ATRN_BUSY)
        return None

    def _reverse_if_mail(self, domains: List[str], name: str) -> None:
        """Under the claim: 250 and the hand-over to delivery, unless the queue cannot
        record results (451) or holds nothing for the domains (453)."""
        trouble = self.queue.trouble(self.runtime, domains)
        if trouble:     # results could not be recorded: the mail would come again and again
            # (before 453: what it retries may empty the queue)
            log.error("odmr: %s (%s) ATRN %s: 451, %s", self.peer, name, ",".join(domains), trouble)
            self.reply(*replies.SPOOL_UNCHANGEABLE)
            return
        if not any(self.runtime.spool.has_mail(d) for d in domains):
            log.info("odmr: %s (%s) ATRN %s: no mail", self.peer, name, ",".join(domains))
            self.reply(*replies.NO_MAIL)
            return
        log.info("odmr: %s (%s) ATRN %s: reversing the connection", self.peer, name, ",".join(domains))
        self.reply(*replies.ATRN_OK)
        self.closing = True
        self._hand_over(tuple(domains))

    def _hand_over(self, domains) -> None:
        """The connection is delivery's now (the claim is held by the caller)."""
        deliver_reversed(Handoff(self.sock, self.rfile, self.peer, self.implicit_tls, domains,
                                 self.runtime, self.queue, self.service_stop, self.delivery_timeouts))

    def log_command(self, verb: str, arg: str) -> None:
        if verb == "AUTH":
            arg = arg.split(" ", 1)[0] + (" ****" if " " in arg else "")
        log.debug("odmr: %s <- %s %s", self.peer, verb, arg[:200])


def _claim_soon(spool, domains):
    """The domains' claim, waiting a moment for one about to be released: a customer that
    answered a session's QUIT and asks again at once must not get 451 from its own last
    session still syncing and letting go."""
    deadline = time.monotonic() + CLAIM_WAIT
    while True:
        try:
            return spool.claim(domains)
        except DomainBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
