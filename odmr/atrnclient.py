"""The customer's half of RFC 2645 up to the turnaround.

Connects to the provider, sets up TLS (implicit or a required STARTTLS),
authenticates, sends ATRN and waits for the reply. On `250` it returns the
open connection plus any bytes already read past the reply; what happens on
the reversed connection (relay or local delivery) is somebody else's job.

Every failure is a `FetchError` carrying the sysexits code that `odmrd fetch`
exits with, so callers never have to interpret SMTP codes themselves.
"""
from __future__ import annotations

import base64
import binascii
import re
import select
import socket
import ssl
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from odmr import sasl

EX_OK = 0
EX_USAGE = 64
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77

DEFAULT_PORT = 366
CONNECT_TIMEOUT = 60.0
REPLY_TIMEOUT = 300.0           # greeting, EHLO, AUTH (RFC 5321 style)
GREETING_PROBE = 5.0            # silent this long: ask whether the port speaks implicit TLS
ATRN_TIMEOUT = 660.0            # RFC 2645: wait at least 10 minutes for the ATRN reply
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 200

# What OpenSSL says when the first bytes it reads are "220 ..." instead of a TLS record.
NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
                   "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST", "RECORD_TOO_LARGE")

# Preferred first; PLAIN is only considered under TLS.
PREFERENCE = ("SCRAM-SHA-256", "CRAM-MD5", "PLAIN")
NEEDS_TLS = ("PLAIN", "LOGIN")

_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*)$", re.S)

Trace = Optional[Callable[[str], None]]


class FetchError(Exception):
    """A failed fetch; `code` is the process exit status (sysexits)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class NoMail(Exception):
    """The provider answered 453: nothing is waiting (exit 0)."""


@dataclass
class Endpoint:
    """Where and how to reach the provider, and who we are."""

    host: str
    port: int
    user: str
    password: str
    domains: Sequence[str] = ()
    tls: str = "starttls"          # starttls | implicit | none
    ca_file: str = ""
    insecure: bool = False
    mechanism: str = ""            # empty: choose from the advertised list
    helo: str = "localhost"


@dataclass
class Turnaround:
    """The connection after `250`: we are now the SMTP server on it."""

    sock: socket.socket
    leftover: bytes
    peer: str
    tls: bool
    provider_ehlo: List[str] = field(default_factory=list)


class ReplyReader:
    """Reads SMTP replies from a socket with its own buffer (so nothing read ahead is lost)."""

    def __init__(self, sock: socket.socket, trace: Trace = None):
        self.sock = sock
        self.buffer = b""
        self.trace = trace

    def _line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
                if len(line) > MAX_REPLY_LINE:
                    raise FetchError(EX_PROTOCOL, "provider sent an overlong reply line")
                return line
            if len(self.buffer) > MAX_REPLY_LINE:
                raise FetchError(EX_PROTOCOL, "provider sent an overlong reply line")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise FetchError(EX_TEMPFAIL, "provider closed the connection")
            self.buffer += chunk

    def reply(self, mask: bool = False) -> Tuple[int, List[str]]:
        """One (possibly multi-line) reply as (code, [texts])."""
        texts: List[str] = []
        code = None
        while True:
            raw = self._line()
            bare = raw.rstrip(b"\r\n")
            m = _REPLY_LINE.match(bare + b" " if len(bare) == 3 else bare)
            if m is None:
                raise FetchError(EX_PROTOCOL, "provider broke the protocol: %r" % raw[:80])
            this = int(m.group(1))
            if code is not None and this != code:
                raise FetchError(EX_PROTOCOL, "provider mixed reply codes in one reply")
            code = this
            text = m.group(3).decode("utf-8", "replace")
            texts.append(text)
            if self.trace:
                self.trace("S: %d%s%s" % (code, m.group(2).decode(), "****" if mask and text else text))
            if m.group(2) == b" ":
                return code, texts
            if len(texts) >= MAX_REPLY_LINES:
                raise FetchError(EX_PROTOCOL, "provider sent an endless reply")


class Conversation:
    """The command/reply exchange with the provider before the turnaround."""

    def __init__(self, sock: socket.socket, trace: Trace = None):
        self.sock = sock
        self.trace = trace
        self.reader = ReplyReader(sock, trace)

    def send(self, line: str, shown: Optional[str] = None) -> None:
        if self.trace:
            self.trace("C: %s" % (line if shown is None else shown))
        self.sock.sendall(line.encode("utf-8") + b"\r\n")

    def command(self, line: str, shown: Optional[str] = None, mask_reply: bool = False
                ) -> Tuple[int, List[str]]:
        self.send(line, shown)
        return self.reader.reply(mask_reply)


def _fmt(code: int, texts: List[str]) -> str:
    return "%d %s" % (code, " ".join(texts)[:300])


def ehlo_keywords(texts: List[str]) -> dict:
    """EHLO reply lines (without the greeting line) -> {KEYWORD: [params]}."""
    features = {}
    for text in texts[1:]:
        words = text.split()
        if not words:
            continue
        key = words[0].upper()
        if key.startswith("AUTH="):          # the old, pre-standard form
            features.setdefault("AUTH", []).extend(w.upper() for w in [key[5:]] + words[1:])
            continue
        features.setdefault(key, []).extend(w.upper() for w in words[1:])
    return features


def choose_mechanism(advertised: Sequence[str], forced: str, tls: bool) -> str:
    """The mechanism to use, or FetchError(69) when none is usable."""
    offered = [m.upper() for m in advertised]
    if forced:
        name = forced.upper()
        if name not in offered:
            raise FetchError(EX_UNAVAILABLE, "provider does not offer AUTH %s (offers: %s)"
                             % (name, " ".join(offered) or "none"))
        if name in NEEDS_TLS and not tls:
            raise FetchError(EX_UNAVAILABLE, "AUTH %s sends the password in clear; it needs TLS" % name)
        return name
    for name in PREFERENCE:
        if name in offered and (tls or name not in NEEDS_TLS):
            return name
    raise FetchError(EX_UNAVAILABLE, "no usable AUTH mechanism offered (offers: %s%s)"
                     % (" ".join(offered) or "none", "" if tls else "; PLAIN needs TLS"))


def tls_context(ca_file: str, insecure: bool) -> ssl.SSLContext:
    """Verifying client context (system CAs or --ca-file); --insecure turns verification off."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise FetchError(EX_NOINPUT, "cannot load CA file %s: %s"
                         % (ca_file, getattr(exc, "strerror", None) or exc)) from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _wrap(sock: socket.socket, endpoint: Endpoint, implicit: bool = False) -> ssl.SSLSocket:
    context = tls_context(endpoint.ca_file, endpoint.insecure)
    try:
        return context.wrap_socket(sock, server_hostname=endpoint.host)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise FetchError(EX_PROTOCOL, "certificate verification failed for %s: %s (give the CA "
                         "that signed it with --ca-file FILE, or skip the check with --insecure)"
                         % (endpoint.host, exc.verify_message or exc)) from None
    except ssl.SSLError as exc:
        sock.close()
        if implicit and exc.reason in NOT_TLS_REASONS:
            raise FetchError(EX_PROTOCOL, "TLS handshake with %s:%d failed (%s): this port may "
                             "speak plain SMTP/STARTTLS: try --tls starttls"
                             % (endpoint.host, endpoint.port, exc.reason)) from None
        raise FetchError(EX_PROTOCOL, "TLS handshake with %s failed: %s"
                         % (endpoint.host, exc.reason or exc)) from None


def _greeting_or_tls(sock: socket.socket, endpoint: Endpoint) -> None:
    """Fail at once, with the fix, when a plain connection meets an implicit-TLS port.

    Such a port says nothing: it waits for our TLS ClientHello while we wait
    for its 220. After GREETING_PROBE seconds of silence (or a hang-up before
    any greeting) a second connection tries a TLS handshake; when that works,
    the mix-up is certain. Otherwise the greeting is awaited as usual: a slow
    server loses nothing but the probe."""
    try:
        readable, _, _ = select.select([sock], [], [], GREETING_PROBE)
        if readable and sock.recv(1, socket.MSG_PEEK):
            return
    except OSError:
        return                          # reading the greeting will report it
    if _answers_tls(endpoint):
        raise FetchError(EX_TEMPFAIL, "%s:%d sent no SMTP greeting in %gs but answers a TLS "
                         "handshake: this port may speak implicit TLS: try --tls implicit"
                         % (endpoint.host, endpoint.port, GREETING_PROBE))


def _answers_tls(endpoint: Endpoint) -> bool:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE     # only "does it speak TLS?"; nothing is sent over it
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=GREETING_PROBE) as raw:
            with context.wrap_socket(raw, server_hostname=endpoint.host):
                return True
    except (OSError, ValueError):
        return False


def _connect(endpoint: Endpoint) -> socket.socket:
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=CONNECT_TIMEOUT)
    except socket.gaierror as exc:
        raise FetchError(EX_TEMPFAIL, "cannot resolve %s: %s" % (endpoint.host, exc.strerror)) from None
    except OSError as exc:
        raise FetchError(EX_TEMPFAIL, "cannot connect to %s:%d: %s"
                         % (endpoint.host, endpoint.port, exc.strerror or exc)) from None
    sock.settimeout(REPLY_TIMEOUT)
    # After the turnaround we answer pipelined commands with several small
    # writes; with Nagle each would wait for the provider's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def open_reversed(endpoint: Endpoint, trace: Trace = None) -> Turnaround:
    """Run the customer side up to ATRN; return the reversed connection.

    Raises NoMail on 453 and FetchError for everything else that is not 250.
    """
    sock = _connect(endpoint)
    try:
        return _negotiate(sock, endpoint, trace)
    except BaseException:
        try:
            sock.close()
        except OSError:
            pass
        raise


def _negotiate(sock: socket.socket, endpoint: Endpoint, trace: Trace) -> Turnaround:
    peer = "%s:%d" % (endpoint.host, endpoint.port)
    tls = False
    try:
        if endpoint.tls == "implicit":
            sock = _wrap(sock, endpoint, implicit=True)
            tls = True
        else:
            _greeting_or_tls(sock, endpoint)
        conv = Conversation(sock, trace)
        _expect_greeting(conv)
        code, texts = conv.command("EHLO %s" % endpoint.helo)
        _expect_ehlo(code, texts)
        features = ehlo_keywords(texts)
        if endpoint.tls == "starttls":
            if "STARTTLS" not in features:
                raise FetchError(EX_UNAVAILABLE, "provider does not offer STARTTLS "
                                 "(use --tls implicit, or --tls none on a trusted network)")
            code, texts = conv.command("STARTTLS")
            if code != 220:
                raise FetchError(EX_TEMPFAIL if 400 <= code < 500 else EX_UNAVAILABLE,
                                 "STARTTLS refused: %s" % _fmt(code, texts))
            if conv.reader.buffer:
                raise FetchError(EX_PROTOCOL, "provider sent data after its STARTTLS reply")
            sock = _wrap(sock, endpoint)
            tls = True
            conv = Conversation(sock, trace)
            code, texts = conv.command("EHLO %s" % endpoint.helo)
            _expect_ehlo(code, texts)
            features = ehlo_keywords(texts)
        if "ATRN" not in features:
            raise FetchError(EX_UNAVAILABLE, "provider does not offer ATRN")
        _authenticate(conv, endpoint, features.get("AUTH", []), tls)
        domains = ",".join(endpoint.domains)
        code, texts = _atrn(conv, "ATRN %s" % domains if domains else "ATRN")
        return Turnaround(sock=sock, leftover=conv.reader.buffer, peer=peer, tls=tls,
                          provider_ehlo=texts)
    except socket.timeout:
        raise FetchError(EX_TEMPFAIL, "timeout talking to %s" % peer) from None
    except ssl.SSLError as exc:
        raise FetchError(EX_PROTOCOL, "TLS error with %s: %s" % (peer, exc.reason or exc)) from None
    except OSError as exc:
        raise FetchError(EX_TEMPFAIL, "connection to %s failed: %s" % (peer, exc.strerror or exc)) from None


def _expect_greeting(conv: Conversation) -> None:
    code, texts = conv.reader.reply()
    if code == 220:
        return
    if 400 <= code < 500:
        raise FetchError(EX_TEMPFAIL, "provider is not available now: %s" % _fmt(code, texts))
    raise FetchError(EX_UNAVAILABLE, "provider refuses service: %s" % _fmt(code, texts))


def _expect_ehlo(code: int, texts: List[str]) -> None:
    if code == 250:
        return
    if 400 <= code < 500:
        raise FetchError(EX_TEMPFAIL, "EHLO failed: %s" % _fmt(code, texts))
    raise FetchError(EX_UNAVAILABLE, "provider does not speak ESMTP (EHLO: %s)" % _fmt(code, texts))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _authenticate(conv: Conversation, endpoint: Endpoint, advertised: List[str], tls: bool) -> None:
    name = choose_mechanism(advertised, endpoint.mechanism, tls)
    mech = sasl.client_mechanism(name, endpoint.user, endpoint.password)
    initial = mech.initial()
    if initial is None:
        code, texts = conv.command("AUTH %s" % name, mask_reply=True)
    else:
        code, texts = conv.command("AUTH %s %s" % (name, _b64(initial) or "="),
                                   "AUTH %s ****" % name, mask_reply=True)
    rounds = 0
    while code == 334:
        rounds += 1
        if rounds > 10:
            raise FetchError(EX_PROTOCOL, "AUTH %s: provider keeps challenging" % name)
        try:
            challenge = base64.b64decode(texts[0].strip().encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            conv.send("*")
            raise FetchError(EX_PROTOCOL, "AUTH %s: provider sent a challenge that is not base64"
                             % name) from None
        try:
            answer = mech.respond(challenge)
        except sasl.AuthFailed as exc:
            # the provider failed to prove it knows the account (SCRAM server signature)
            conv.send("*")
            raise FetchError(EX_PROTOCOL, "AUTH %s: the provider's proof is wrong: %s" % (name, exc)) from None
        except sasl.SASLError as exc:
            conv.send("*")
            raise FetchError(EX_PROTOCOL, "AUTH %s: provider broke the exchange: %s" % (name, exc)) from None
        code, texts = conv.command(_b64(answer), "****", mask_reply=True)
    if code == 235:
        if not mech.done():
            raise FetchError(EX_PROTOCOL, "AUTH %s: provider claimed success without proving "
                             "it knows the account" % name)
        return
    text = _fmt(code, texts)
    if code in (504, 538):
        raise FetchError(EX_UNAVAILABLE, "AUTH %s not usable: %s" % (name, text))
    if code == 501:
        raise FetchError(EX_PROTOCOL, "AUTH %s: provider rejected the exchange: %s" % (name, text))
    if 400 <= code < 500:
        raise FetchError(EX_TEMPFAIL, "AUTH %s temporarily failed: %s" % (name, text))
    if 500 <= code < 600:
        raise FetchError(EX_NOPERM, "authentication as %s refused: %s" % (endpoint.user, text))
    raise FetchError(EX_PROTOCOL, "unexpected reply to AUTH: %s" % text)


def _atrn(conv: Conversation, line: str) -> Tuple[int, List[str]]:
    conv.sock.settimeout(ATRN_TIMEOUT)
    code, texts = conv.command(line)
    conv.sock.settimeout(REPLY_TIMEOUT)
    text = _fmt(code, texts)
    if code == 250:
        if len(texts) != 1:
            raise FetchError(EX_PROTOCOL, "multi-line 250 reply to ATRN")
        return code, texts
    if code == 453:
        _quit(conv)
        raise NoMail(text)
    if code in (450, 530) or code == 535:
        _quit(conv)
        raise FetchError(EX_NOPERM, "ATRN refused: %s" % text)
    if code in (502, 500):
        _quit(conv)
        raise FetchError(EX_UNAVAILABLE, "provider does not implement ATRN: %s" % text)
    if 400 <= code < 500:
        _quit(conv)
        raise FetchError(EX_TEMPFAIL, "ATRN temporarily refused: %s" % text)
    if 500 <= code < 600:
        _quit(conv)
        raise FetchError(EX_NOPERM, "ATRN refused: %s" % text)
    raise FetchError(EX_PROTOCOL, "unexpected reply to ATRN: %s" % text)


def _quit(conv: Conversation) -> None:
    """Say goodbye politely; a provider that has already gone is no error."""
    try:
        conv.sock.settimeout(10.0)
        conv.command("QUIT")
    except (FetchError, OSError):
        pass
