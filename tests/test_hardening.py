"""Abuse resistance: parsers under fuzzing, traversal attempts, limits, timeouts, file modes."""
from __future__ import annotations

import os
import socket
import string
import time

import pytest
from hypothesis import given, settings, strategies as st

from helpers import Customer, Provider, run_cli, send_mail
from odmr.names import normalize_domain
from odmr.provider import ATRNSyntaxError, parse_atrn_domains
from odmr.wire import parse_params, parse_path

SAFE = set(string.ascii_lowercase + string.digits + "-.")


# -- parsers -------------------------------------------------------------------------

@pytest.mark.slow
@given(st.text(max_size=300))
@settings(max_examples=400)
def test_atrn_parser_yields_only_safe_names(text):
    try:
        domains = parse_atrn_domains(text)
    except ATRNSyntaxError:
        return
    for domain in domains:
        assert set(domain) <= SAFE
        assert ".." not in domain and not domain.startswith(".") and len(domain) <= 253


@pytest.mark.slow
@given(st.text(max_size=300))
@settings(max_examples=400)
def test_domain_normaliser_never_returns_a_path(text):
    try:
        name = normalize_domain(text)
    except ValueError:
        return
    assert set(name) <= SAFE and ".." not in name and name not in (".", "")


@given(st.text(max_size=300), st.sampled_from(["FROM:", "TO:"]))
@settings(max_examples=400)
def test_path_and_param_parsers_never_crash(text, keyword):
    parsed = parse_path(text, keyword)
    if parsed is not None:
        address, params = parsed
        assert "<" not in address or '"' in address
        parse_params(params)


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["../etc", "example.org/../../x", "a\x00b", "..", ".", "a..b",
                                 "-a.org", "a-.org", "x" * 64 + ".org", ("a." * 130) + "org",
                                 "example.org,,example.com", "example.org,", ",", "a b", "[127.0.0.1]"],
                         ids=lambda a: repr(a)[:30])
def test_atrn_refuses_bad_names(provider, customer_factory, arg):
    c = customer_factory()
    c.login()
    if "\x00" in arg:
        c.sock.sendall(b"ATRN " + arg.encode() + b"\r\n")
        code = c.reply()[0]
    else:
        code = c.cmd("ATRN " + arg)[0]
    assert code in (500, 501)
    assert c.cmd("NOOP")[0] == 250
    assert sorted(os.listdir(provider.spool_dir)) == sorted(
        n for n in os.listdir(provider.spool_dir) if n in ("example.org", "example.com", "example.net"))


@pytest.mark.parametrize("rcpt", ["u@../etc", "u@example.org/../x", "u@..", "u@.example.org",
                                  "u@exa\\mple.org", "u@" + "x" * 64 + ".org"],
                         ids=lambda a: repr(a)[:30])
def test_intake_refuses_bad_domains(provider, rcpt):
    import smtplib
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        s.ehlo()
        s.mail("a@remote.test")
        code, _ = s.rcpt(rcpt)
        assert code in (501, 550, 553)
        assert s.noop()[0] == 250
    assert set(os.listdir(provider.spool_dir)) <= {"example.org", "example.com", "example.net", ".quarantine"}


@pytest.mark.slow
def test_random_command_lines_always_get_a_reply(provider):
    """Every line gets one well-formed reply; only the bad-command budget ends the session."""
    import random
    rng = random.Random(2645)
    verbs = ["EHLO", "HELO", "AUTH", "ATRN", "MAIL", "RCPT", "DATA", "STARTTLS", "NOOP", "RSET",
             "XYZZY", "", "BDAT", "VRFY"]
    for _ in range(5):
        c = Customer(provider.odmr_port)
        assert c.reply()[0] == 220
        for _ in range(15):
            junk = "".join(rng.choice(string.printable[:-5]) for _ in range(rng.randint(0, 40)))
            line = ("%s %s" % (rng.choice(verbs), junk)).strip()
            c.send(line.replace("\r", "").replace("\n", ""))
            code, lines = c.reply()
            assert 200 <= code < 600
            if code == 334:                     # an AUTH exchange: cancel it
                assert c.cmd("*")[0] == 501
            if code == 421:
                break
        c.close()


# -- limits and timeouts ---------------------------------------------------------------

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
    time.sleep(0.3)
    again = Customer(strict.odmr_port)
    assert again.reply()[0] == 220
    again.close()


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
def test_idle_session_times_out(strict):
    c = Customer(strict.odmr_port)
    c.reply()
    c.sock.settimeout(6)
    assert c.reply()[0] == 421
    assert c.line() == b""
    c.close()


@pytest.mark.slow
def test_overlong_command_line(provider, customer_factory):
    c = customer_factory()
    c.reply()
    code, lines = c.cmd("EHLO " + "x" * 600)
    assert code == 500 and lines[0].startswith("5.5.2")
    assert c.cmd("EHLO ok.test")[0] == 250


# -- files -------------------------------------------------------------------------------

@pytest.mark.slow
def test_users_file_must_be_private(tmp_path):
    p = Provider(str(tmp_path))
    p.add_user("alice", ["example.org"])
    os.chmod(p.users, 0o644)
    result = run_cli("-c", p.config, "serve", "-f", timeout=30)
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "too open" in err and "chmod 600" in err and "Traceback" not in err
    check = run_cli("-c", p.config, "check-config")
    assert check.returncode == 78 and "too open" in check.stderr.decode()


def test_spool_modes(provider):
    send_mail(provider.smtp_port, "a@remote.test", ["u@example.org"], b"Subject: x\r\n\r\ny\r\n")
    directory = os.path.join(provider.spool_dir, "example.org")
    assert os.stat(directory).st_mode & 0o777 == 0o700
    for name in provider.spooled("example.org"):
        assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o600
