"""SASL mechanisms for the ODMR port (server) and for `odmrd fetch` (client).

A mechanism only runs an exchange of byte strings. The session owns the
socket, base64, "334" lines and the "*" cancel; it hands the server side a
`Challenge` callback. This module imports no network code.

Server mechanisms never tell an unknown user from a wrong password: both
do the same work and raise `AuthFailed`. Exception messages never carry
passwords or keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Protocol, Tuple, Type

__all__ = [
    "SASLError", "AuthFailed", "AuthCancelled", "AuthProtocolError",
    "ScramSecret", "Decoys", "Credentials", "Lookup", "Challenge",
    "ServerMechanism", "SERVER_MECHANISMS", "server_mechanism",
    "ClientMechanism", "CLIENT_MECHANISMS", "client_mechanism",
]


class SASLError(Exception):
    """Any failed SASL exchange."""


class AuthFailed(SASLError):
    """Bad credentials; the session replies 535 5.7.8."""


class AuthCancelled(SASLError):
    """The client sent '*'; the session replies 501."""


class AuthProtocolError(SASLError):
    """A malformed message; the session replies 501 5.5.2."""


class WeakServerParameters(SASLError):
    """The server asked for fewer SCRAM iterations than the client accepts: the proof
    it would get is cheap to crack offline, so none is computed."""


DEFAULT_ITERATIONS = 4096
DEFAULT_SALT_LENGTH = 16
# A server may pick any count; refusing absurd ones stops it pinning our CPU
# (a million PBKDF2 rounds take about a second; real servers use thousands).
MAX_CLIENT_ITERATIONS = 1_000_000
# RFC 7677 §4: at least 4096. `odmrd fetch` refuses a server asking fewer (a hostile
# or spoofed provider would get a proof it can crack cheaply), and the users file
# stores no fewer, so our own provider never asks it.
MIN_SCRAM_ITERATIONS = 4096

_SCRAM_PREFIX = "SCRAM-SHA-256"
_SCRAM_KEY_LEN = 32  # SHA-256 digest size


# -- small helpers ---------------------------------------------------------

def _saslprep(password: str) -> bytes:
    """NFKC-normalise and UTF-8 encode a SCRAM password.

    Full SASLprep (RFC 4013) is NFKC plus mapping and prohibition tables;
    NFKC alone makes the common cases (composed vs decomposed accents,
    full-width digits) agree, and both our ends use this one function.
    """
    return unicodedata.normalize("NFKC", password).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    """Strict base64 decode; raises ValueError on anything else."""
    return base64.b64decode(text.encode("ascii"), validate=True)


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthProtocolError("message is not valid UTF-8") from None


def _hmac256(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def _same(a: str, b: str) -> bool:
    """Constant-time string equality (compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _is_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()


# -- SCRAM keys --------------------------------------------------------------

def _scram_keys(password: str, salt: bytes, iterations: int) -> Tuple[bytes, bytes]:
    """Return (ClientKey, ServerKey) for a password (RFC 5802 section 3)."""
    salted = hashlib.pbkdf2_hmac("sha256", _saslprep(password), salt, iterations)
    return _hmac256(salted, b"Client Key"), _hmac256(salted, b"Server Key")


@dataclass(frozen=True)
class ScramSecret:
    """Salted SCRAM-SHA-256 keys: what the server stores instead of a password."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def to_string(self) -> str:
        """The users-file form: SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>."""
        return (f"{_SCRAM_PREFIX}${self.iterations}:{_b64(self.salt)}"
                f"${_b64(self.stored_key)}:{_b64(self.server_key)}")

    @classmethod
    def from_string(cls, s: str) -> "ScramSecret":
        """Parse `to_string` output; ValueError on anything malformed."""
        try:
            prefix, params, keys = s.split("$")
            iter_text, salt_text = params.split(":")
            stored_text, server_text = keys.split(":")
            if prefix != _SCRAM_PREFIX or not _is_decimal(iter_text):
                raise ValueError
            iterations = int(iter_text)
            salt = _unb64(salt_text)
            stored_key, server_key = _unb64(stored_text), _unb64(server_text)
        except (ValueError, AttributeError):
            raise ValueError("malformed SCRAM-SHA-256 secret") from None
        if iterations < 1 or not salt:
            raise ValueError("malformed SCRAM-SHA-256 secret")
        if len(stored_key) != _SCRAM_KEY_LEN or len(server_key) != _SCRAM_KEY_LEN:
            raise ValueError("malformed SCRAM-SHA-256 secret")
        return cls(iterations, salt, stored_key, server_key)

    @classmethod
    def from_password(cls, password: str, iterations: int = DEFAULT_ITERATIONS,
                      salt: Optional[bytes] = None) -> "ScramSecret":
        """Derive the keys; a random 16-byte salt unless one is given.

        The password is NFKC-normalised (our stand-in for SASLprep).
        """
        if iterations < 1:
            raise ValueError("iterations must be at least 1")
        if salt is None:
            salt = secrets.token_bytes(16)
        if not salt:
            raise ValueError("salt must not be empty")
        client_key, server_key = _scram_keys(password, salt, iterations)
        return cls(iterations, salt, _sha256(client_key), server_key)

    def verify_password(self, password: str) -> bool:
        """True if `password` derives these keys (for PLAIN and LOGIN)."""
        client_key, server_key = _scram_keys(password, self.salt, self.iterations)
        stored_ok = hmac.compare_digest(_sha256(client_key), self.stored_key)
        server_ok = hmac.compare_digest(server_key, self.server_key)
        return stored_ok & server_ok


@dataclass(frozen=True)
class Decoys:
    """Stand-in SCRAM secrets for names that have none, so the exchange looks normal.

    A real account's salt and iteration count never change, so a decoy's must
    not either: it is derived from `key`, a secret kept beside the users file,
    and is the same after a restart and on every node sharing that file. Its
    iteration count and salt length are those real accounts use.
    """

    key: bytes = field(repr=False)
    iterations: int = DEFAULT_ITERATIONS
    salt_length: int = DEFAULT_SALT_LENGTH

    @classmethod
    def like(cls, key: bytes, real: Iterable[ScramSecret]) -> "Decoys":
        """Decoys shaped like the most common of the `real` secrets.

        Without a `key` they are stable within this process only."""
        key = key or _PROCESS_KEY
        shapes = Counter((s.iterations, len(s.salt)) for s in real)
        if not shapes:
            return cls(key)
        (iterations, salt_length), _ = shapes.most_common(1)[0]
        return cls(key, iterations, salt_length)

    def scram(self, username: str) -> ScramSecret:
        seed = _hmac256(self.key, b"scram\0" + username.encode("utf-8"))
        salt = b""
        block = 0
        while len(salt) < self.salt_length:
            block += 1
            salt += _hmac256(seed, b"salt\0%d" % block)
        return ScramSecret(self.iterations, salt[:self.salt_length],
                           _hmac256(seed, b"stored"), _hmac256(seed, b"server"))


# Without a key from the users file: stable within this process only.
_PROCESS_KEY = secrets.token_bytes(32)
_PROCESS_DECOYS = Decoys(_PROCESS_KEY)


# -- SCRAM message syntax (RFC 5802 section 7) -------------------------------

_SASLNAME = re.compile(r"(?:[^=,\x00]|=2C|=3D)+")
_NONCE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # printable ASCII except ','


def _decode_saslname(text: str) -> str:
    if not _SASLNAME.fullmatch(text):
        raise AuthProtocolError("bad SCRAM user name")
    return re.sub("=2C|=3D", lambda m: "," if m.group() == "=2C" else "=", text)


def _encode_saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def _attributes(text: str) -> List[Tuple[str, str]]:
    """Split 'a=x,b=y' into pairs; names are one ASCII letter."""
    pairs = []
    for item in text.split(","):
        name, eq, value = item[:1], item[1:2], item[2:]
        if eq != "=" or not (name.isascii() and name.isalpha()):
            raise AuthProtocolError("bad SCRAM attribute")
        pairs.append((name, value))
    return pairs


def _names(pairs: List[Tuple[str, str]]) -> str:
    return "".join(name for name, _ in pairs)


# -- server side --------------------------------------------------------------

class Credentials(Protocol):
    """What an account offers a mechanism (accounts.py provides these)."""

    name: str
    scram: Optional[ScramSecret]
    cram_md5_secret: Optional[str]  # the password itself, or None


Lookup = Callable[[str], Optional[Credentials]]
Challenge = Callable[[bytes], bytes]


class ServerMechanism:
    """One server-side exchange; create a fresh one per AUTH command.

    `nonce` replaces the random part of the challenge, for tests against
    published examples; `decoys` stand in for the secrets of unknown users.
    """

    name: str = ""
    needs_tls: bool = False

    def __init__(self, lookup: Lookup, hostname: str, *,
                 nonce: Optional[Callable[[], str]] = None,
                 decoys: Optional[Decoys] = None) -> None:
        self.lookup = lookup
        self.hostname = hostname
        self._nonce = nonce or self._random_nonce
        self.decoys = decoys or _PROCESS_DECOYS

    @staticmethod
    def _random_nonce() -> str:
        return secrets.token_urlsafe(18)

    def authenticate(self, challenge: Challenge, initial: Optional[bytes]) -> str:
        """Run the exchange; return the authenticated account name, or raise AuthFailed/AuthProtocolError."""
        raise NotImplementedError


SERVER_MECHANISMS: Dict[str, Type[ServerMechanism]] = {}


def _server(cls: Type[ServerMechanism]) -> Type[ServerMechanism]:
    SERVER_MECHANISMS[cls.name] = cls
    return cls


def server_mechanism(name: str, lookup: Lookup, hostname: str,
                     decoys: Optional[Decoys] = None) -> ServerMechanism:
    """A fresh server mechanism by (case-insensitive) name; KeyError if unknown."""
    return SERVER_MECHANISMS[name.upper()](lookup, hostname, decoys=decoys)


def _check_password(lookup: Lookup, username: str, password: str,
                    decoys: Decoys) -> Optional[str]:
    """Return the account name if the password is right, else None.

    Uses the SCRAM keys; an account with only a CRAM-MD5 secret is checked
    against that. Either way one PBKDF2 runs, so timing doesn't tell an
    unknown user from a wrong password.
    """
    creds = lookup(username)
    scram = creds.scram if creds is not None else None
    ok = (scram or decoys.scram(username)).verify_password(password)
    if scram is None:
        secret = creds.cram_md5_secret if creds is not None else None
        ok = secret is not None and _same(password, secret)
    return creds.name if ok and creds is not None else None


@_server
class CramMD5Server(ServerMechanism):
    """RFC 2195: the client proves it knows the password by HMAC-MD5."""

    name = "CRAM-MD5"

    @staticmethod
    def _random_nonce() -> str:
        return f"{secrets.randbelow(10 ** 12)}.{int(time.time())}"

    def authenticate(self, challenge: Challenge, initial: Optional[bytes]) -> str:
        if initial is not None:
            raise AuthProtocolError("CRAM-MD5 takes no initial response")
        text = f"<{self._nonce()}@{self.hostname}>".encode("utf-8")
        user_part, space, digest = challenge(text).rpartition(b" ")
        if not space or not user_part or len(digest) != 32 \
                or digest.translate(None, b"0123456789abcdef"):
            raise AuthProtocolError("expected 'user digest'")
        username = _utf8(user_part)
        creds = self.lookup(username)
        secret = creds.cram_md5_secret if creds is not None else None
        key = secret.encode("utf-8") if secret is not None else self.decoys.key
        expected = hmac.new(key, text, hashlib.md5).hexdigest().encode("ascii")
        if not hmac.compare_digest(expected, digest) or secret is None:
            raise AuthFailed("authentication failed")
        return creds.name


@_server
class ScramSHA256Server(ServerMechanism):
    """RFC 5802 / RFC 7677 without channel binding (we offer no -PLUS)."""

    name = "SCRAM-SHA-256"

    def authenticate(self, challenge: Challenge, initial: Optional[bytes]) -> str:
        first = _utf8(initial if initial is not None else challenge(b""))
        gs2_header, bare, username, client_nonce = self._parse_first(first)

        creds = self.lookup(username)
        real = creds.scram if creds is not None else None
        secret = real or self.decoys.scram(username)
        nonce = client_nonce + self._nonce()
        server_first = f"r={nonce},s={_b64(secret.salt)},i={secret.iterations}"

        final = _utf8(challenge(server_first.encode("utf-8")))
        without_proof, proof = self._parse_final(final, gs2_header, nonce)

        auth_message = f"{bare},{server_first},{without_proof}".encode("utf-8")
        client_key = _xor(proof, _hmac256(secret.stored_key, auth_message))
        if not hmac.compare_digest(_sha256(client_key), secret.stored_key) \
                or real is None:
            raise AuthFailed("authentication failed")

        server_final = "v=" + _b64(_hmac256(secret.server_key, auth_message))
        # RFC 4954: the client answers the last challenge with an empty line.
        if challenge(server_final.encode("ascii")) != b"":
            raise AuthProtocolError("expected an empty response")
        return creds.name

    @staticmethod
    def _parse_first(text: str) -> Tuple[str, str, str, str]:
        """Return (gs2 header, client-first-bare, username, client nonce)."""
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise AuthProtocolError("bad SCRAM client-first message")
        flag, authz, bare = parts
        if flag.startswith("p="):
            raise AuthProtocolError("channel binding is not offered")
        if flag not in ("n", "y"):
            raise AuthProtocolError("bad SCRAM GS2 header")
        if authz and not authz.startswith("a="):
            raise AuthProtocolError("bad SCRAM GS2 header")
        authzid = _decode_saslname(authz[2:]) if authz else ""

        attrs = _attributes(bare)  # an 'm=' first fails here too
        if not _names(attrs).startswith("nr"):
            raise AuthProtocolError("bad SCRAM client-first message")
        username = _decode_saslname(attrs[0][1])
        client_nonce = attrs[1][1]
        if not _NONCE.fullmatch(client_nonce):
            raise AuthProtocolError("bad SCRAM nonce")
        if authzid and not _same(authzid, username):
            raise AuthFailed("may not act for another user")
        return f"{flag},{authz},", bare, username, client_nonce

    @staticmethod
    def _parse_final(text: str, gs2_header: str, nonce: str) -> Tuple[str, bytes]:
        """Return (client-final-without-proof, ClientProof)."""
        attrs = _attributes(text)
        names = _names(attrs)
        if len(names) < 3 or not names.startswith("cr") or names[-1] != "p":
            raise AuthProtocolError("bad SCRAM client-final message")
        try:
            cbind = _unb64(attrs[0][1])
            proof = _unb64(attrs[-1][1])
        except ValueError:
            raise AuthProtocolError("bad base64 in SCRAM message") from None
        if not hmac.compare_digest(cbind, gs2_header.encode("utf-8")):
            raise AuthProtocolError("channel binding does not match")
        if not _same(attrs[1][1], nonce):
            raise AuthProtocolError("nonce does not match")
        if len(proof) != _SCRAM_KEY_LEN:
            raise AuthProtocolError("bad SCRAM proof")
        return text[:text.rindex(",p=")], proof


@_server
class PlainServer(ServerMechanism):
    """RFC 4616: authzid NUL authcid NUL passwd, in one message."""

    name = "PLAIN"
    needs_tls = True

    def authenticate(self, challenge: Challenge, initial: Optional[bytes]) -> str:
        message = initial if initial is not None else challenge(b"")
        parts = message.split(b"\0")
        if len(parts) != 3:
            raise AuthProtocolError("expected authzid NUL authcid NUL passwd")
        authzid, authcid, password = (_utf8(part) for part in parts)
        if not authcid or not password:
            raise AuthProtocolError("empty user name or password")
        if authzid and not _same(authzid, authcid):
            raise AuthFailed("may not act for another user")
        account = _check_password(self.lookup, authcid, password, self.decoys)
        if account is None:
            raise AuthFailed("authentication failed")
        return account


@_server
class LoginServer(ServerMechanism):
    """The de-facto LOGIN mechanism: prompt for user name, then password."""

    name = "LOGIN"
    needs_tls = True

    def authenticate(self, challenge: Challenge, initial: Optional[bytes]) -> str:
        username = _utf8(initial if initial is not None else challenge(b"Username:"))
        if not username:
            raise AuthProtocolError("empty user name")
        password = _utf8(challenge(b"Password:"))
        account = _check_password(self.lookup, username, password, self.decoys)
        if account is None:
            raise AuthFailed("authentication failed")
        return account


# -- client side --------------------------------------------------------------

class ClientMechanism:
    """One client-side exchange; create a fresh one per AUTH command."""

    name: str = ""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password
        self._finished = False

    def initial(self) -> Optional[bytes]:
        """The initial response, or None if the mechanism has none."""
        return None

    def respond(self, challenge: bytes) -> bytes:
        """Answer one server challenge (already base64-decoded)."""
        raise NotImplementedError

    def done(self) -> bool:
        """True once we have said everything (SCRAM: and verified the server)."""
        return self._finished


CLIENT_MECHANISMS: Dict[str, Type[ClientMechanism]] = {}


def _client(cls: Type[ClientMechanism]) -> Type[ClientMechanism]:
    CLIENT_MECHANISMS[cls.name] = cls
    return cls


def client_mechanism(name: str, username: str, password: str, *,
                     scram_min_iterations: int = 1) -> ClientMechanism:
    """A fresh client mechanism by (case-insensitive) name; KeyError if unknown.
    `scram_min_iterations`: the fewest SCRAM iterations to accept from the server
    (`odmrd fetch` asks MIN_SCRAM_ITERATIONS; tests' fast accounts use fewer)."""
    cls = CLIENT_MECHANISMS[name.upper()]
    if issubclass(cls, ScramSHA256Client):
        return cls(username, password, min_iterations=scram_min_iterations)
    return cls(username, password)


@_client
class CramMD5Client(ClientMechanism):
    name = "CRAM-MD5"

    def respond(self, challenge: bytes) -> bytes:
        if self._finished or not challenge:
            raise AuthProtocolError("unexpected CRAM-MD5 challenge")
        self._finished = True
        digest = hmac.new(self.password.encode("utf-8"), challenge, hashlib.md5)
        return f"{self.username} {digest.hexdigest()}".encode("utf-8")


@_client
class PlainClient(ClientMechanism):
    name = "PLAIN"

    def initial(self) -> Optional[bytes]:
        self._finished = True
        return f"\0{self.username}\0{self.password}".encode("utf-8")

    def respond(self, challenge: bytes) -> bytes:
        # Only reached if we sent no initial response: the server asks with "".
        if self._finished or challenge:
            raise AuthProtocolError("unexpected PLAIN challenge")
        return self.initial()


@_client
class LoginClient(ClientMechanism):
    """Answers the first prompt with the user name, the second with the password.

    Prompt wording varies between servers, so only the order counts.
    """

    name = "LOGIN"

    def __init__(self, username: str, password: str) -> None:
        super().__init__(username, password)
        self._answers = [username, password]

    def respond(self, challenge: bytes) -> bytes:
        if not self._answers:
            raise AuthProtocolError("unexpected LOGIN challenge")
        answer = self._answers.pop(0)
        self._finished = not self._answers
        return answer.encode("utf-8")


def _client_iterations(text: str) -> int:
    """The server's i= as a count we are willing to compute, else AuthProtocolError.

    The count comes from the server, so it is shown with repr() and cut short.
    """
    if not _is_decimal(text) or not text.strip("0"):
        raise AuthProtocolError("nonsensical SCRAM iteration count i=%r" % text[:20])
    if len(text.lstrip("0")) > len(str(MAX_CLIENT_ITERATIONS)) \
            or int(text) > MAX_CLIENT_ITERATIONS:
        raise AuthProtocolError("absurd SCRAM iteration count i=%s%s (at most %d accepted)"
                                % (text[:20], "..." if len(text) > 20 else "",
                                   MAX_CLIENT_ITERATIONS))
    return int(text)


@_client
class ScramSHA256Client(ClientMechanism):
    """RFC 5802 / RFC 7677 client; `done()` only after the server proved itself.

    `nonce` replaces the random client nonce, for tests against RFC 7677;
    a server asking fewer than `min_iterations` gets WeakServerParameters.
    """

    name = "SCRAM-SHA-256"
    _GS2_HEADER = "n,,"  # no channel binding, no authzid

    def __init__(self, username: str, password: str, *,
                 nonce: Optional[str] = None, min_iterations: int = 1) -> None:
        super().__init__(username, password)
        self._min_iterations = min_iterations
        self._client_nonce = nonce or secrets.token_urlsafe(18)
        self._bare = f"n={_encode_saslname(username)},r={self._client_nonce}"
        self._state = "start"
        self._server_signature = b""

    def initial(self) -> Optional[bytes]:
        self._state = "sent-first"
        return (self._GS2_HEADER + self._bare).encode("utf-8")

    def respond(self, challenge: bytes) -> bytes:
        if self._state == "start" and challenge == b"":
            return self.initial()
        if self._state == "sent-first":
            return self._client_final(_utf8(challenge))
        if self._state == "sent-final":
            self._check_server_final(_utf8(challenge))
            return b""
        raise AuthProtocolError("unexpected SCRAM challenge")

    def _client_final(self, server_first: str) -> bytes:
        attrs = _attributes(server_first)
        if attrs[0][0] == "e":
            raise AuthFailed("server refused the SCRAM exchange")
        if not _names(attrs).startswith("rsi"):
            raise AuthProtocolError("bad SCRAM server-first message")
        nonce, salt_text, iter_text = (value for _, value in attrs[:3])
        if not (nonce.startswith(self._client_nonce)
                and len(nonce) > len(self._client_nonce)
                and _NONCE.fullmatch(nonce)):
            raise AuthProtocolError("bad SCRAM server nonce")
        try:
            salt = _unb64(salt_text)
        except ValueError:
            raise AuthProtocolError("bad SCRAM salt") from None
        if not salt:
            raise AuthProtocolError("empty SCRAM salt")
        iterations = _client_iterations(iter_text)
        if iterations < self._min_iterations:
            raise WeakServerParameters("the server asks for only i=%d SCRAM iterations (at least "
                                       "%d accepted, RFC 7677): a proof that cheap to crack is "
                                       "not sent" % (iterations, self._min_iterations))

        client_key, server_key = _scram_keys(self.password, salt, iterations)
        channel = _b64(self._GS2_HEADER.encode("ascii"))
        without_proof = f"c={channel},r={nonce}"
        auth_message = f"{self._bare},{server_first},{without_proof}".encode("utf-8")
        proof = _xor(client_key, _hmac256(_sha256(client_key), auth_message))
        self._server_signature = _hmac256(server_key, auth_message)
        self._state = "sent-final"
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def _check_server_final(self, server_final: str) -> None:
        attrs = _attributes(server_final)
        if attrs[0][0] == "e":
            raise AuthFailed("server refused the SCRAM proof")
        if attrs[0][0] != "v":
            raise AuthProtocolError("bad SCRAM server-final message")
        try:
            signature = _unb64(attrs[0][1])
        except ValueError:
            raise AuthProtocolError("bad base64 in SCRAM message") from None
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthFailed("server signature does not match")
        self._state = "done"

    def done(self) -> bool:
        return self._state == "done"
