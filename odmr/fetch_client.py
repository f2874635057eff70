"""The customer's half of RFC 2645 up to the turnaround.

Connects to the provider, sets up TLS (implicit or a required STARTTLS),
authenticates, sends ATRN and waits for the reply, all through smtplib. On
`250` it hands over the socket and smtplib's buffered reader (which may hold
what the provider sent right after the reply), the way the provider hands its
socket and reader to delivery; what happens on the reversed connection (relay
or local delivery) is somebody else's job.

Every failure is a `FetchError` carrying the sysexits code that `odmrd fetch`
exits with, so callers never have to interpret SMTP codes themselves.
"""
from __future__ import annotations

import base64
import binascii
import select
import smtplib
import socket
import ssl
from dataclasses import dataclass
from typing import BinaryIO, Callable, List, Optional, Sequence, Tuple, Union

from odmr import sasl
from odmr.exits import EX_NOINPUT, EX_NOPERM, EX_PROTOCOL, EX_TEMPFAIL, EX_UNAVAILABLE
from odmr.wire import BadReply, ReplyClosed, read_reply, reader_for


DEFAULT_PORT = 366
CONNECT_TIMEOUT = 60.0
REPLY_TIMEOUT = 300.0           # greeting, EHLO, AUTH (RFC 5321 style)
GREETING_PROBE = 5.0            # silent this long: ask whether the port speaks implicit TLS
ATRN_TIMEOUT = 660.0            # RFC 2645: wait at least 10 minutes for the ATRN reply
# What OpenSSL says when the first bytes it reads are "220 ..." instead of a TLS record.
NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
                   "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST", "RECORD_TOO_LARGE")

# Preferred first; PLAIN is only considered under TLS.
PREFERENCE = ("SCRAM-SHA-256", "CRAM-MD5", "PLAIN")
NEEDS_TLS = ("PLAIN", "LOGIN")


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
    """The connection after `250`: we are now the SMTP server on it.

    `file` is the buffered reader the negotiation read the provider's replies
    from; whatever the provider sent right after its 250 may already sit in
    it, so the next reader of the connection reads from `file`, not `sock`."""

    sock: socket.socket
    file: BinaryIO
    peer: str
    tls: bool


class ProviderClient(smtplib.SMTP):
    """smtplib on an open connection to the provider, with our trace and limits.

    smtplib does the conversation (EHLO features, STARTTLS, the AUTH loop);
    this subclass only reads replies strictly (garbage, overlong or endless
    replies are a broken protocol, not code -1), shows the conversation for
    -v with AUTH data masked, and reads through `wire.reader_for` so the
    reader it leaves behind at the turnaround is the one a session uses."""

    ehlo_msg = "EHLO"

    def __init__(self, sock: socket.socket, host: str, helo: str, trace: Trace = None):
        super().__init__(local_hostname=helo, timeout=REPLY_TIMEOUT)
        self._host = host               # starttls() checks the certificate against it
        self.sock = sock
        self.file = None                # made from the socket in use at the first reply
        self.trace = trace
        self.secret = False             # inside AUTH: the trace shows **** for the data
        self.last_texts: List[str] = []
        self._last_verb = ""

    def send(self, s: Union[str, bytes]) -> None:
        data = s.encode("utf-8") if isinstance(s, str) else s
        line = data.rstrip(b"\r\n").decode("utf-8", "replace")
        self._last_verb = line.split(" ", 1)[0].upper()
        if self.trace:
            self.trace("C: %s" % (_masked(line) if self.secret else line))
        self.sock.sendall(data)

    def cancel_auth(self) -> None:
        """Abort the AUTH exchange (RFC 4954 "*"); the error is ours to report."""
        self.send("*\r\n")

    def getreply(self) -> Tuple[int, bytes]:
        if self.file is None:           # first reply, or starttls() dropped the plain reader
            self.file = reader_for(self.sock)     # the local server reads on with it
        code, texts = self._read_reply()
        if code == 220 and self._last_verb == "STARTTLS" and _waiting(self.file, self.sock):
            # anything sent before the handshake would pass for data sent under TLS
            raise FetchError(EX_PROTOCOL, "provider sent data after its STARTTLS reply")
        self.last_texts = texts
        return code, "\n".join(texts).encode("utf-8")

    def _read_reply(self) -> Tuple[int, List[str]]:
        try:
            return read_reply(self.file, self._trace_line)
        except ReplyClosed:
            raise FetchError(EX_TEMPFAIL, "provider closed the connection") from None
        except BadReply as exc:
            if exc.kind == BadReply.MALFORMED:
                raise FetchError(EX_PROTOCOL, "provider broke the protocol: %r" % exc.line[:80]) from None
            if exc.kind == BadReply.MIXED:
                raise FetchError(EX_PROTOCOL, "provider mixed reply codes in one reply") from None
            raise FetchError(EX_PROTOCOL, "provider sent %s" % exc.kind) from None

    def _trace_line(self, code: int, separator: str, text: str) -> None:
        if self.trace:
            shown = "****" if self.secret and text else text
            self.trace("S: %d%s%s" % (code, separator, shown))


def _masked(line: str) -> str:
    """An AUTH command or answer as -v shows it: the mechanism, never the data."""
    if line == "*":
        return line
    words = line.split(" ")
    if words[0].upper() == "AUTH":
        return " ".join(words[:2] + (["****"] if len(words) > 2 else []))
    return "****"


def _waiting(reader: BinaryIO, sock: socket.socket) -> bool:
    """Whether the reader holds, or the socket has ready, bytes nobody asked for yet."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return bool(reader.peek(1))
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    finally:
        sock.settimeout(timeout)


def _fmt(code: int, text: bytes) -> str:
    return "%d %s" % (code, text.decode("utf-8", "replace").replace("\n", " ")[:300])


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


def _wrap(sock: socket.socket, endpoint: Endpoint) -> ssl.SSLSocket:
    """Implicit TLS: the handshake comes before anything else on the port."""
    context = tls_context(endpoint.ca_file, endpoint.insecure)
    try:
        return context.wrap_socket(sock, server_hostname=endpoint.host)
    except ssl.SSLError as exc:
        sock.close()
        raise _handshake_failed(exc, endpoint, implicit=True) from None


def _handshake_failed(exc: ssl.SSLError, endpoint: Endpoint, implicit: bool) -> FetchError:
    """The one-line error for a failed handshake, with the fix when there is one."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        if "mismatch" in message.lower():       # the CA is fine: the name is not the one signed
            fix = "connect by a name the certificate holds: --server NAME[:PORT]"
        elif endpoint.ca_file:
            fix = "%s did not sign it: give the CA that did with --ca-file FILE" % endpoint.ca_file
        else:
            fix = "give the CA that signed it with --ca-file FILE"
        return FetchError(EX_PROTOCOL, "certificate verification failed for %s: %s (%s, or skip "
                          "the check with --insecure)" % (endpoint.host, message, fix))
    if implicit and exc.reason in NOT_TLS_REASONS:
        return FetchError(EX_PROTOCOL, "TLS handshake with %s:%d failed (%s): this port may "
                          "speak plain SMTP/STARTTLS: try --tls starttls"
                          % (endpoint.host, endpoint.port, exc.reason))
    return FetchError(EX_PROTOCOL, "TLS handshake with %s failed: %s"
                      % (endpoint.host, exc.reason or exc))


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
    client = ProviderClient(_connect(endpoint), endpoint.host, endpoint.helo, trace)
    try:
        return _negotiate(client, endpoint)
    except BaseException:
        try:
            client.close()
        except OSError:
            pass
        raise


def _negotiate(client: ProviderClient, endpoint: Endpoint) -> Turnaround:
    peer = "%s:%d" % (endpoint.host, endpoint.port)
    try:
        if endpoint.tls == "implicit":
            client.sock = _wrap(client.sock, endpoint)
        else:
            _greeting_or_tls(client.sock, endpoint)
        _expect_greeting(*client.getreply())
        _ehlo(client)
        if endpoint.tls == "starttls":
            _starttls(client, endpoint)
        if not client.has_extn("atrn"):
            raise FetchError(EX_UNAVAILABLE, "provider does not offer ATRN: is this its ODMR "
                                             "port (366), not an SMTP port?")
        _authenticate(client, endpoint)
        _atrn(client, endpoint.domains)
    except socket.timeout:
        raise FetchError(EX_TEMPFAIL, "timeout talking to %s" % peer) from None
    except ssl.SSLError as exc:
        raise FetchError(EX_PROTOCOL, "TLS error with %s: %s" % (peer, exc.reason or exc)) from None
    except smtplib.SMTPException as exc:        # smtplib's own checks; our reader raises FetchError
        raise FetchError(EX_PROTOCOL, "provider broke the protocol: %s" % exc) from None
    except OSError as exc:
        raise FetchError(EX_TEMPFAIL, "connection to %s failed: %s" % (peer, exc.strerror or exc)) from None
    return Turnaround(sock=client.sock, file=client.file, peer=peer,
                      tls=isinstance(client.sock, ssl.SSLSocket))


def _expect_greeting(code: int, text: bytes) -> None:
    if code == 220:
        return
    if 400 <= code < 500:
        raise FetchError(EX_TEMPFAIL, "provider is not available now: %s" % _fmt(code, text))
    raise FetchError(EX_UNAVAILABLE, "provider refuses service: %s" % _fmt(code, text))


def _ehlo(client: ProviderClient) -> None:
    code, text = client.ehlo()
    if code == 250:
        return
    if 400 <= code < 500:
        raise FetchError(EX_TEMPFAIL, "EHLO failed: %s" % _fmt(code, text))
    raise FetchError(EX_UNAVAILABLE, "provider does not speak ESMTP (EHLO: %s)" % _fmt(code, text))


def _starttls(client: ProviderClient, endpoint: Endpoint) -> None:
    """--tls starttls: required, not merely used when offered; then EHLO again."""
    if not client.has_extn("starttls"):
        raise FetchError(EX_UNAVAILABLE, "provider does not offer STARTTLS on port %d (its "
                         "implicit-TLS port with --tls implicit, or --tls none on a trusted "
                         "network)" % endpoint.port)
    context = tls_context(endpoint.ca_file, endpoint.insecure)
    try:
        client.starttls(context=context)
    except smtplib.SMTPResponseException as exc:
        code = exc.smtp_code
        raise FetchError(EX_TEMPFAIL if 400 <= code < 500 else EX_UNAVAILABLE,
                         "STARTTLS refused: %s" % _fmt(code, exc.smtp_error)) from None
    except ssl.SSLError as exc:
        raise _handshake_failed(exc, endpoint, implicit=False) from None
    _ehlo(client)


class _Answer(str):
    """A SASL answer as smtplib's auth() wants it: it calls `.encode("ascii")`
    before base64, but answers are UTF-8 (RFC 4954), so this one encodes to
    the mechanism's own bytes."""

    data = b""

    def __new__(cls, data: bytes) -> "_Answer":
        answer = super().__new__(cls, data.decode("latin-1"))
        answer.data = data
        return answer

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.data


class _AuthObject:
    """One of sasl's client mechanisms as smtplib's authobject.

    smtplib calls it without a challenge for the initial response, then once
    per 334. The challenge is decoded again from the reply's own text,
    strictly: smtplib's decoding skips characters that are not base64."""

    def __init__(self, client: ProviderClient, mech: sasl.ClientMechanism):
        self.client = client
        self.mech = mech

    def __call__(self, challenge: Optional[bytes] = None) -> Optional[str]:
        if challenge is None:
            initial = self.mech.initial()
            return None if initial is None else _Answer(initial)
        name = self.mech.name
        try:
            text = self.client.last_texts[0].strip().encode("ascii")
            challenge = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError, IndexError):
            raise _not_base64(self.client, name) from None
        try:
            return _Answer(self.mech.respond(challenge))
        except sasl.AuthFailed as exc:
            # the provider failed to prove it knows the account (SCRAM server signature)
            self.client.cancel_auth()
            raise FetchError(EX_PROTOCOL, "AUTH %s: the provider's proof is wrong: %s"
                             % (name, exc)) from None
        except sasl.WeakServerParameters as exc:
            self.client.cancel_auth()
            raise FetchError(EX_NOPERM, "AUTH %s refused: %s" % (name, exc)) from None
        except sasl.SASLError as exc:
            self.client.cancel_auth()
            raise FetchError(EX_PROTOCOL, "AUTH %s: provider broke the exchange: %s"
                             % (name, exc)) from None


def _not_base64(client: ProviderClient, name: str) -> FetchError:
    client.cancel_auth()
    return FetchError(EX_PROTOCOL, "AUTH %s: provider sent a challenge that is not base64" % name)


def _authenticate(client: ProviderClient, endpoint: Endpoint) -> None:
    tls = isinstance(client.sock, ssl.SSLSocket)
    name = choose_mechanism(client.esmtp_features.get("auth", "").split(), endpoint.mechanism, tls)
    mech = sasl.client_mechanism(name, endpoint.user, endpoint.password,
                                 scram_min_iterations=sasl.MIN_SCRAM_ITERATIONS)
    client.secret = True
    try:
        code, text = client.auth(name, _AuthObject(client, mech))
    except smtplib.SMTPAuthenticationError as exc:
        code, text = exc.smtp_code, exc.smtp_error
    except binascii.Error:              # smtplib's own decoding gave up before ours saw it
        raise _not_base64(client, name) from None
    except smtplib.SMTPException:
        raise FetchError(EX_PROTOCOL, "AUTH %s: provider keeps challenging" % name) from None
    finally:
        client.secret = False
    if code == 235:
        if not mech.done():
            raise FetchError(EX_PROTOCOL, "AUTH %s: provider claimed success without proving "
                             "it knows the account" % name)
        return
    raise _auth_refused(name, endpoint.user, code, _fmt(code, text))


def _auth_refused(name: str, user: str, code: int, text: str) -> FetchError:
    if code in (504, 538):
        return FetchError(EX_UNAVAILABLE, "AUTH %s not usable: %s" % (name, text))
    if code == 501:
        return FetchError(EX_PROTOCOL, "AUTH %s: provider rejected the exchange: %s" % (name, text))
    if 400 <= code < 500:
        return FetchError(EX_TEMPFAIL, "AUTH %s temporarily failed: %s" % (name, text))
    if 500 <= code < 600:
        return FetchError(EX_NOPERM, "authentication as %s refused: %s" % (user, text))
    return FetchError(EX_PROTOCOL, "unexpected reply to AUTH: %s" % text)


def _atrn(client: ProviderClient, domains: Sequence[str]) -> None:
    """ATRN and its reply; returns on 250, the provider is then the client."""
    client.sock.settimeout(ATRN_TIMEOUT)
    code, reply = client.docmd("ATRN", ",".join(domains))
    client.sock.settimeout(REPLY_TIMEOUT)
    if code == 250:
        return
    text = _fmt(code, reply)
    if 400 <= code < 600:
        _quit(client)
    if code == 453:
        raise NoMail(text)
    if code in (450, 530) or code == 535:
        raise FetchError(EX_NOPERM, "ATRN refused: %s" % text)
    if code in (502, 500):
        raise FetchError(EX_UNAVAILABLE, "provider does not implement ATRN: %s" % text)
    if 400 <= code < 500:
        raise FetchError(EX_TEMPFAIL, "ATRN temporarily refused: %s" % text)
    if 500 <= code < 600:
        raise FetchError(EX_NOPERM, "ATRN refused: %s" % text)
    raise FetchError(EX_PROTOCOL, "unexpected reply to ATRN: %s" % text)


def _quit(client: ProviderClient) -> None:
    """Say goodbye politely; a provider that has already gone is no error."""
    try:
        client.sock.settimeout(10.0)
        client.docmd("QUIT")
    except (FetchError, OSError):
        pass
