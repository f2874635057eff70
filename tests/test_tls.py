"""TLS on both ports: STARTTLS, implicit TLS, EXTERNAL, TLS across the turnaround."""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import time

import pytest
from configobj import ConfigObj

from helpers import ATRN_OK, Customer, PASSWORD, Provider, accept_all, free_port, send_mail, which

pytestmark = [pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary needed"),
              pytest.mark.slow]


def tls_sections(pki) -> str:
    return "[tls]\ncert_file = %s\nkey_file = %s\nclient_ca_file = %s\n" % (
        pki["server.pem"], pki["server.key"], pki["ca.pem"])


def make_provider(tmp_path, pki, odmr_extra="", smtp_extra="", extra="", cert_name="alice") -> Provider:
    p = Provider(str(tmp_path), extra=extra, sections=tls_sections(pki),
                 odmr_extra="tls_listen = 127.0.0.1:%d\n%s" % (free_port(), odmr_extra),
                 smtp_extra=smtp_extra)
    p.add_user("alice", ["example.org", "example.com"])
    p.add_user("bob", ["example.net"])
    users = ConfigObj(p.users, encoding="utf-8")
    users["alice"]["client_cert"] = cert_name
    users.write()
    os.chmod(p.users, 0o600)
    return p.start()


@pytest.fixture
def tprov(tmp_path, pki):
    p = make_provider(tmp_path, pki)
    yield p
    p.stop()


def implicit_port(p: Provider) -> int:
    return p.service.settings.odmr.tls_listen[0][1]


def client_context(pki, cert=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca.pem"])
    if cert:
        ctx.load_cert_chain(pki[cert + ".pem"], pki[cert + ".key"])
    return ctx


class TLSCustomer(Customer):
    """A scripted customer that can switch to TLS."""

    def __init__(self, port: int, pki, implicit=False, cert=None):
        super().__init__(port)
        self.ctx = client_context(pki, cert)
        if implicit:
            self._wrap()

    def _wrap(self):
        self.file.close()
        self.sock = self.ctx.wrap_socket(self.sock, server_hostname="odmr.test")
        self.file = self.sock.makefile("rb")

    def starttls(self):
        code, _ = self.cmd("STARTTLS")
        assert code == 220
        self._wrap()

    def auth_plain(self, user="alice", password=PASSWORD):
        token = base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()
        return self.cmd("AUTH PLAIN " + token)


# -- STARTTLS ----------------------------------------------------------------

def test_starttls_advertised_once_and_state_discarded(tprov, pki):
    c = TLSCustomer(tprov.odmr_port, pki)
    assert c.reply()[0] == 220
    code, lines = c.cmd("EHLO customer.test")
    assert "STARTTLS" in lines
    auth = [l for l in lines if l.startswith("AUTH ")][0].split()
    assert "PLAIN" not in auth and "LOGIN" not in auth and "CRAM-MD5" in auth
    assert c.auth_plain()[0] == 538
    c.starttls()
    # EHLO state is gone: AUTH needs a new EHLO
    assert c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode())[0] == 503
    code, lines = c.cmd("EHLO customer.test")
    assert "STARTTLS" not in lines
    auth = [l for l in lines if l.startswith("AUTH ")][0].split()
    assert "PLAIN" in auth and "LOGIN" in auth and "EXTERNAL" not in auth
    assert c.cmd("STARTTLS")[0] == 503
    assert c.auth_plain()[0] == 235
    assert c.cmd("ATRN")[0] == 453
    c.close()


def test_authentication_before_starttls_is_forgotten(tprov, pki):
    c = TLSCustomer(tprov.odmr_port, pki)
    c.login()
    c.starttls()
    assert c.cmd("EHLO customer.test")[0] == 250
    assert c.cmd("ATRN example.org")[0] == 530
    c.close()


def test_plaintext_injected_after_starttls_is_discarded(tprov, pki):
    c = TLSCustomer(tprov.odmr_port, pki)
    c.reply()
    c.cmd("EHLO customer.test")
    c.sock.sendall(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n")
    assert c.reply()[0] == 220
    c._wrap()
    code, lines = c.cmd("NOOP")
    assert (code, lines) == (250, ["2.0.0 Ok"])
    c.close()


def test_intake_starttls_with_smtplib(tprov, pki):
    with smtplib.SMTP("127.0.0.1", tprov.smtp_port, timeout=10) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        s.starttls(context=client_context(pki))
        s.ehlo()
        assert not s.has_extn("starttls")
        s.sendmail("a@remote.test", ["x@example.org"], b"Subject: tls\r\n\r\nbody\r\n")
    msg = tprov.spool.load("example.org", tprov.spooled("example.org")[0])
    assert b"with ESMTPS id" in msg.read_data()


def test_old_tls_versions_are_refused(tprov, pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with socket.create_connection(("127.0.0.1", implicit_port(tprov)), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw) as tls_sock:
                tls_sock.recv(100)


# -- implicit TLS and EXTERNAL -------------------------------------------------

def test_implicit_tls_listener(tprov, pki):
    c = TLSCustomer(implicit_port(tprov), pki, implicit=True)
    assert c.reply()[0] == 220
    code, lines = c.cmd("EHLO customer.test")
    assert "STARTTLS" not in lines
    assert c.auth_plain()[0] == 235
    c.close()


def test_external_with_client_certificate(tprov, pki):
    c = TLSCustomer(implicit_port(tprov), pki, implicit=True, cert="client")
    c.reply()
    code, lines = c.cmd("EHLO customer.test")
    assert "EXTERNAL" in [l for l in lines if l.startswith("AUTH ")][0].split()
    assert c.cmd("AUTH EXTERNAL =")[0] == 235
    assert c.cmd("ATRN example.org")[0] == 453
    c.close()


def test_external_refused_for_unmapped_or_other_identity(tprov, pki):
    c = TLSCustomer(implicit_port(tprov), pki, implicit=True, cert="stranger")
    c.reply()
    c.cmd("EHLO customer.test")
    assert c.cmd("AUTH EXTERNAL =")[0] == 535
    c.close()
    c = TLSCustomer(implicit_port(tprov), pki, implicit=True, cert="client")
    c.reply()
    c.cmd("EHLO customer.test")
    assert c.cmd("AUTH EXTERNAL " + base64.b64encode(b"bob").decode())[0] == 535
    c.close()


def test_external_needs_a_certificate(tprov, pki):
    c = TLSCustomer(implicit_port(tprov), pki, implicit=True)
    c.reply()
    code, lines = c.cmd("EHLO customer.test")
    assert "EXTERNAL" not in " ".join(lines)
    assert c.cmd("AUTH EXTERNAL =")[0] == 504
    c.close()


def test_unverifiable_client_certificate_gets_nothing(tprov, pki):
    try:
        c = TLSCustomer(implicit_port(tprov), pki, implicit=True, cert="selfsigned")
        c.reply()
        code, lines = c.cmd("EHLO customer.test")
    except (ssl.SSLError, ConnectionError, EOFError):
        return                         # the handshake itself was refused: fine
    assert "EXTERNAL" not in " ".join(lines)
    c.close()


# -- TLS across the turnaround ----------------------------------------------------

@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_tls_session_carries_many_messages(tprov, pki, mode):
    count = 40
    for i in range(count):
        send_mail(tprov.smtp_port, "s@remote.test", ["u@example.org"],
                  b"Subject: %d\r\n\r\n" % i + b"line %d\r\n" % i * 200 + b".dot\r\n")
    if mode == "implicit":
        c = TLSCustomer(implicit_port(tprov), pki, implicit=True)
        c.reply()
        c.cmd("EHLO customer.test")
    else:
        c = TLSCustomer(tprov.odmr_port, pki)
        c.reply()
        c.cmd("EHLO customer.test")
        c.starttls()
        c.cmd("EHLO customer.test")
    assert c.auth_plain()[0] == 235
    c.send("ATRN example.org")
    assert c.line() == ATRN_OK
    texts = accept_all(c, count)
    for text in texts:
        number = int(text.split(b"Subject: ")[1].split(b"\r\n")[0])
        assert text.endswith(b"line %d\r\n" % number * 200 + b"..dot\r\n")
    assert c.line() == b""
    assert tprov.spooled("example.org") == []


# -- policy --------------------------------------------------------------------------

def test_require_tls_on_both_ports(tmp_path, pki):
    p = make_provider(tmp_path, pki, odmr_extra="require_tls = yes", smtp_extra="require_tls = yes")
    try:
        c = TLSCustomer(p.odmr_port, pki)
        c.reply()
        code, lines = c.cmd("EHLO customer.test")
        assert not any(l.startswith("AUTH") for l in lines)
        assert c.cmd("AUTH CRAM-MD5")[0] == 530
        c.starttls()
        c.cmd("EHLO customer.test")
        assert c.auth_plain()[0] == 235
        c.close()
        with smtplib.SMTP("127.0.0.1", p.smtp_port, timeout=10) as s:
            s.ehlo()
            assert s.mail("a@remote.test")[0] == 530
            s.rset()
            s.starttls(context=client_context(pki))
            s.ehlo()
            assert s.mail("a@remote.test")[0] == 250
    finally:
        p.stop()


def test_plaintext_passwords_allowed_only_when_configured(tmp_path, pki):
    p = make_provider(tmp_path, pki, odmr_extra="allow_plaintext_passwords = yes")
    try:
        c = TLSCustomer(p.odmr_port, pki)
        c.reply()
        code, lines = c.cmd("EHLO customer.test")
        assert "PLAIN" in [l for l in lines if l.startswith("AUTH ")][0].split()
        assert c.auth_plain()[0] == 235
        c.close()
    finally:
        p.stop()


def test_failed_auth_throttled_across_sessions(tmp_path, pki):
    p = make_provider(tmp_path, pki, odmr_extra="auth_throttle_failures = 4\nauth_throttle_window = 10m")
    try:
        for _ in range(2):
            c = TLSCustomer(p.odmr_port, pki)
            c.reply()
            c.cmd("EHLO customer.test")
            c.starttls()
            c.cmd("EHLO customer.test")
            assert c.auth_plain(password="wrong")[0] == 535
            assert c.auth_plain(password="wrong")[0] == 535
            c.close()
        c = TLSCustomer(p.odmr_port, pki)
        assert c.reply()[0] == 421
        c.close()
    finally:
        p.stop()


def test_certificates_reload(tmp_path, pki):
    work = tmp_path / "certs"
    work.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(pki[name], str(work / name))
    live = dict(pki, **{"server.pem": str(work / "server.pem"), "server.key": str(work / "server.key")})
    (tmp_path / "prov").mkdir()
    p = make_provider(tmp_path / "prov", live)

    def fingerprint():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", implicit_port(p)), timeout=10) as raw:
            with ctx.wrap_socket(raw) as s:
                return hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()
    try:
        before = fingerprint()
        held = TLSCustomer(implicit_port(p), pki, implicit=True)
        held.reply()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", str(work / "server.key"), "-out", str(work / "server.pem"),
                        "-days", "3", "-subj", "/CN=odmr.test"], check=True, capture_output=True)
        p.service.reload()
        assert fingerprint() != before
        assert held.cmd("NOOP")[0] == 250          # the established session survived
        held.close()
    finally:
        p.stop()


def test_secrets_never_logged(tprov, pki, caplog):
    caplog.set_level(logging.DEBUG)
    c = TLSCustomer(tprov.odmr_port, pki)
    c.reply()
    c.cmd("EHLO customer.test")
    c.starttls()
    c.cmd("EHLO customer.test")
    token = base64.b64encode(("\0alice\0%s" % PASSWORD).encode()).decode()
    assert c.cmd("AUTH PLAIN " + token)[0] == 235
    c.close()
    c = TLSCustomer(tprov.odmr_port, pki)
    c.reply()
    c.cmd("EHLO customer.test")
    c.starttls()
    c.cmd("EHLO customer.test")
    assert c.cmd("AUTH LOGIN")[0] == 334
    assert c.cmd(base64.b64encode(b"alice").decode())[0] == 334
    assert c.cmd(base64.b64encode(b"wrong-secret-xyz").decode())[0] == 535
    c.close()
    time.sleep(0.2)
    text = caplog.text
    assert "authenticated as alice" in text and "authentication failed" in text
    for secret in (PASSWORD, token, "wrong-secret-xyz", base64.b64encode(b"wrong-secret-xyz").decode()):
        assert secret not in text


# -- the real fetchmail over implicit TLS ---------------------------------------------

@pytest.mark.skipif(not (which("fetchmail") and which("smtp-sink")), reason="fetchmail and smtp-sink needed")
def test_fetchmail_over_implicit_tls(tprov, pki, tmp_path):
    count = 12
    bodies = {}
    for i in range(count):
        body = ("Subject: tls %d\r\nMessage-ID: <tls%d@remote.test>\r\n\r\n" % (i, i)).encode() + \
            b"".join(b"line %d of %d\r\n" % (n, i) for n in range(30)) + b".leading dot\r\n"
        bodies[i] = body
        send_mail(tprov.smtp_port, "s@remote.test", ["u@example.org"], body)
    from helpers import Sink
    sink = Sink()
    sink_port = sink.port
    home = tmp_path / "fm"
    home.mkdir()
    rc = home / "fetchmailrc"
    rc.write_text('set no syslog\nset pidfile "%s/fetchmail.pid"\n'
                  'poll 127.0.0.1 service %d protocol ODMR\n'
                  '    user "alice" password "%s"\n    fetchdomains example.org\n'
                  '    smtphost 127.0.0.1/%d\n    ssl\n    no sslcertck\n'
                  % (home, implicit_port(tprov), PASSWORD, sink_port))
    os.chmod(str(rc), 0o600)
    try:
        run = subprocess.run([which("fetchmail"), "-f", str(rc), "-v", "--nodetach", "--nosyslog"],
                             env=dict(os.environ, FETCHMAILHOME=str(home)), capture_output=True,
                             timeout=120)
        deadline = time.time() + 20
        while time.time() < deadline and len(sink.files()) < count:
            time.sleep(0.2)
        sink.stop()
        stored = []
        for name in sink.files():
            with open(os.path.join(sink.dir, name), "rb") as fh:
                stored.append(fh.read())
    finally:
        sink.stop()
        shutil.rmtree(sink.dir, ignore_errors=True)
    assert len(stored) == count, (run.stdout + run.stderr).decode(errors="replace")[-3000:]
    seen = set()
    for data in stored:
        subject = int(data.split(b"Subject: tls ")[1].split(b"\n")[0])
        expected = bodies[subject].replace(b"\r\n", b"\n")
        assert data.rstrip(b"\n").endswith(expected.rstrip(b"\n"))
        seen.add(subject)
    assert seen == set(range(count))
    assert tprov.spooled("example.org") == []
