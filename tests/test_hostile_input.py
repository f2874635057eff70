"""Hostile input: the ATRN, domain, path and parameter parsers under fuzzing yield
only safe names or a refusal; path traversal in ATRN and RCPT is refused; random
command lines always get a reply. Hypothesis, and real sockets to a provider."""
from __future__ import annotations

import os
import string

import pytest
from hypothesis import given, settings, strategies as st

from helpers import Customer
from odmr.names import normalize_domain
from odmr.odmr_session import ATRNSyntaxError, parse_atrn_domains
from odmr.wire import parse_params, parse_path


SAFE = set(string.ascii_lowercase + string.digits + "-.")


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


@pytest.mark.slow
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
