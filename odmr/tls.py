"""TLS server contexts built from `[tls]`: TLS 1.2 or newer, optional client certificates.

Rebuilt from scratch on every reload, so new certificates take effect for new
connections while established sessions keep theirs.
"""
from __future__ import annotations

import hashlib
import socket
import ssl
from typing import Optional

from odmr.config import TlsSettings


class TLSConfigError(Exception):
    """The certificate, key or CA file cannot be used; one line for the operator."""


class _KeyIsEncrypted(Exception):
    """OpenSSL asked for a passphrase: a daemon has nobody to type one."""


def _no_passphrase() -> bytes:
    raise _KeyIsEncrypted()


def server_context(settings: TlsSettings) -> Optional[ssl.SSLContext]:
    """An SSLContext for our listeners, or None when no certificate is configured."""
    if not settings.cert_file and not settings.key_file:
        if settings.client_ca_file:
            raise TLSConfigError("[tls] client_ca_file needs cert_file and key_file")
        return None
    if not (settings.cert_file and settings.key_file):
        raise TLSConfigError("[tls] cert_file and key_file must both be set")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        # without a callback OpenSSL would prompt on the terminal: a restart would hang
        context.load_cert_chain(settings.cert_file, settings.key_file, password=_no_passphrase)
    except _KeyIsEncrypted:
        raise TLSConfigError("[tls] key_file %s is encrypted with a passphrase, which a daemon "
                             "cannot type: write it out unencrypted (openssl pkey -in %s -out "
                             "NEW.pem), readable only by the service account"
                             % (settings.key_file, settings.key_file)) from None
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(_chain_problem(settings, exc)) from None
    if settings.client_ca_file:
        try:
            context.load_verify_locations(cafile=settings.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError("[tls] cannot load client_ca_file %s: %s" % (
                settings.client_ca_file, getattr(exc, "strerror", None) or exc)) from None
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _chain_problem(settings: TlsSettings, exc: Exception) -> str:
    """Which of the two files is wrong, and how, where OpenSSL only says "PEM lib"."""
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.filename:
        return "[tls] cannot read %s: %s" % (exc.filename, exc.strerror)
    for path, what, marker in ((settings.cert_file, "cert_file", b"-----BEGIN CERTIFICATE"),
                               (settings.key_file, "key_file", b"PRIVATE KEY-----")):
        try:
            with open(path, "rb") as fh:
                text = fh.read(1 << 20)
        except OSError as read_error:
            return "[tls] cannot read %s %s: %s" % (what, path, read_error.strerror)
        if marker not in text:
            return "[tls] %s %s holds no PEM %s" % (
                what, path, "certificate" if what == "cert_file" else "private key")
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
    return "[tls] key_file %s does not go with cert_file %s (%s)" % (
        settings.key_file, settings.cert_file, reason)


def peer_identity(sock: socket.socket) -> Optional[dict]:
    """The verified client certificate's CN and SHA-256 fingerprint, or None."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
        der = sock.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError):
        return None
    if not cert or not der:
        return None          # none presented, or not verified (CERT_OPTIONAL)
    common_name = ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                common_name = value
    return {"cn": common_name, "sha256": hashlib.sha256(der).hexdigest()}


def describe(sock: socket.socket) -> str:
    if not isinstance(sock, ssl.SSLSocket):
        return "plaintext"
    cipher = sock.cipher()
    return "%s %s" % (sock.version(), cipher[0] if cipher else "?")
