"""Limits on one session at the SMTP and ODMR ports: sessions per client address,
the idle timeout, a command line trickled byte by byte, an overlong command
line, and `[smtp] max_data_time` (a DATA phase cannot last forever, also after
STARTTLS and after a reload). Real sockets, a provider in this process."""
from __future__ import annotations

import logging
import os
import select
import shutil
import socket
import ssl
import time

import pytest

from helpers import Customer, Provider, eventually, send_mail, write_config


SENDER = "trickler@remote.test"


def data_provider(tmp_path, smtp_extra: str = "max_data_time = 2s\nidle_timeout = 5s",
                  sections: str = "") -> Provider:
    os.makedirs(str(tmp_path), exist_ok=True)
    p = Provider(str(tmp_path), smtp_extra=smtp_extra, sections=sections)
    p.add_user("alice", ["example.org"])
    return p.start()


def open_data(c: Customer, tls_context=None) -> Customer:
    """Greeting, EHLO (and STARTTLS), MAIL, RCPT, DATA -> 354."""
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    if tls_context is not None:
        assert c.cmd("STARTTLS")[0] == 220
        c.sock = tls_context.wrap_socket(c.sock, server_hostname="odmr.test")
        c.file = c.sock.makefile("rb")
        assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    assert c.cmd("RCPT TO:<user@example.org>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    return c


def trickle(c: Customer, piece: bytes, every: float, give_up: float):
    """Send `piece` every `every` seconds until the server says something;
    (seconds from the first piece to its reply, the reply line)."""
    start = time.monotonic()
    c.sock.sendall(b"Subject: slow\r\n\r\n")
    while time.monotonic() - start < give_up:
        pending = c.sock.pending() if isinstance(c.sock, ssl.SSLSocket) else 0
        if pending or select.select([c.sock], [], [], every)[0]:
            return time.monotonic() - start, c.file.readline()
        try:
            c.sock.sendall(piece)
        except OSError:
            break
    return time.monotonic() - start, c.file.readline()


def closed_by_server(c: Customer) -> bool:
    """After the reply: EOF (or a reset), never another reply or a hang."""
    c.sock.settimeout(5)
    try:
        return c.file.read() == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


def spool_files(p: Provider) -> list:
    return [os.path.join(d, n) for d, _, names in os.walk(p.spool_dir) for n in names
            if not n.startswith(".")]


def assert_data_deadline(p: Provider, c: Customer, piece: bytes, caplog) -> None:
    elapsed, line = trickle(c, piece, 0.5, give_up=12)
    assert line.startswith(b"451 4.4.2 "), line
    assert 1.5 <= elapsed < 4.5, elapsed           # max_data_time 2s, well before idle_timeout 5s
    assert closed_by_server(c)
    assert spool_files(p) == []                    # no message, nothing left in tmp/
    slow = [r for r in caplog.records if "max_data_time" in r.getMessage()]
    assert len(slow) == 1 and SENDER in slow[0].getMessage()


@pytest.mark.slow
@pytest.mark.parametrize("piece", [b"one more line of text\r\n", b"x"], ids=["lines", "bytes"])
def test_trickling_sender_gets_451_when_max_data_time_is_over(tmp_path, caplog, piece):
    caplog.set_level(logging.INFO, logger="odmrd")
    p = data_provider(tmp_path)
    try:
        c = open_data(Customer(p.smtp_port))
        try:
            assert_data_deadline(p, c, piece, caplog)
        finally:
            c.close()
        # a normal message still goes through, on the same daemon
        assert send_mail(p.smtp_port, SENDER, ["user@example.org"], b"Subject: fast\r\n\r\nok\r\n") == {}
        assert len(p.spooled("example.org")) == 1
    finally:
        p.stop()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary needed")
def test_max_data_time_holds_after_starttls(tmp_path, caplog):
    from helpers import make_pki
    pki = make_pki(str(tmp_path / "pki"))
    caplog.set_level(logging.INFO, logger="odmrd")
    p = data_provider(tmp_path / "site", sections="[tls]\ncert_file = %s\nkey_file = %s\n"
                      % (pki["server.pem"], pki["server.key"]))
    context = ssl.create_default_context(cafile=pki["ca.pem"])
    try:
        c = open_data(Customer(p.smtp_port), context)
        try:
            assert_data_deadline(p, c, b"x", caplog)
        finally:
            c.close()
    finally:
        p.stop()


@pytest.mark.slow
def test_max_data_time_is_reloaded(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="odmrd")
    p = data_provider(tmp_path / "site", smtp_extra="idle_timeout = 5s")    # default: 30m
    try:
        write_config(p.dir, p.odmr_port, p.smtp_port, smtp_extra="max_data_time = 2s\nidle_timeout = 5s")
        p.service.reload()
        c = open_data(Customer(p.smtp_port))
        try:
            assert_data_deadline(p, c, b"more\r\n", caplog)
        finally:
            c.close()
    finally:
        p.stop()


@pytest.fixture
def strict(tmp_path):
    p = Provider(str(tmp_path), odmr_extra="idle_timeout = 2s\nmax_sessions_per_address = 2\nmax_sessions = 3")
    p.add_user("alice", ["example.org"])
    p.start()
    yield p
    p.stop()


@pytest.mark.slow
def test_per_address_session_limit(strict):
    held = [Customer(strict.odmr_port) for _ in range(2)]
    for c in held:
        assert c.reply()[0] == 220
    extra = Customer(strict.odmr_port)
    code, lines = extra.reply()
    assert code == 421
    for c in held + [extra]:
        c.close()

    answers = []

    def greeted_again() -> bool:    # the closed sessions' threads see the EOF a moment later
        again = Customer(strict.odmr_port)
        try:
            answers.append(again.reply())
            return answers[-1][0] == 220
        finally:
            again.close()
    assert eventually(greeted_again, 15), "the closed sessions never gave their places back: %r" % answers[-3:]


@pytest.mark.slow
def test_slow_trickle_is_cut_off(strict):
    c = Customer(strict.odmr_port)
    c.reply()
    started = time.monotonic()
    code = None
    try:
        for ch in b"NOOP and a very slow line":
            c.sock.sendall(bytes([ch]))
            time.sleep(0.3)
            c.sock.settimeout(0.01)
            try:
                data = c.sock.recv(100)
                if data:
                    code = int(data[:3])
                    break
            except socket.timeout:
                pass
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert code == 421
    assert time.monotonic() - started < 5
    c.close()


@pytest.mark.slow
def test_a_line_begun_ends_within_idle_timeout_of_its_start(strict):
    """The last wait of a line is shortened to the line's deadline (idle_timeout 2 s from
    its first byte): a client silent after a byte at 1.2 s is cut at 2 s, not at 3.2."""
    c = Customer(strict.odmr_port)
    c.reply()
    c.sock.sendall(b"NOOP")
    started = time.monotonic()
    time.sleep(1.2)
    c.sock.sendall(b" x")
    c.sock.settimeout(6)
    assert c.reply()[0] == 421
    assert 1.5 <= time.monotonic() - started < 2.8
    c.close()


@pytest.mark.slow
def test_idle_session_times_out(strict):
    c = Customer(strict.odmr_port)
    c.reply()
    c.sock.settimeout(6)
    assert c.reply()[0] == 421
    assert c.line() == b""
    c.close()


def test_overlong_command_line(provider, customer_factory):
    c = customer_factory()
    c.reply()
    code, lines = c.cmd("EHLO " + "x" * 600)
    assert code == 500 and lines[0].startswith("5.5.2")
    assert c.cmd("EHLO ok.test")[0] == 250
