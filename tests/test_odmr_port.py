"""Acceptance tests for the ODMR port (SPEC §4), over real loopback sockets.

The customer side is scripted byte by byte (`helpers.Customer`), and after the
turnaround `helpers.Script` plays the customer's SMTP server on the same socket.
"""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
from typing import List, Tuple

import pytest

from helpers import (ATRN_OK, NO_MAIL, Customer, Delivered, PASSWORD, Provider, ReversedConnection, Script,
                     reply_line, reuse_provider, send_mail, stop_quickly)
from odmr import sasl
from odmr.odmr_session import ODMRSession
from odmr import replies

SENDER = "sender@remote.test"


# -- helpers ------------------------------------------------------------------

@pytest.fixture
def provider(shared_provider):
    """alice: example.org, example.com; bob: example.net — with an empty spool and no sessions."""
    yield from reuse_provider(shared_provider)


def spool_one(provider, rcpts, body: bytes = b"Subject: test\r\n\r\nhello\r\n", sender: str = SENDER) -> None:
    send_mail(provider.smtp_port, sender, rcpts, body)


def login(provider, user: str = "alice", password: str = PASSWORD) -> Customer:
    c = Customer(provider.odmr_port)
    c.login(user, password)
    return c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


CUSTOMER_EHLO = ["customer.test", "PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 10000000"]


def play_customer(c: Customer, ehlo: List[str] = CUSTOMER_EHLO, ehlo_code: int = 250,
                  pipelining_probe: bool = False, **hooks) -> Script:
    """Be the customer's SMTP server (strictly) on the reversed socket until the provider's
    QUIT; `hooks` replace the Script's (greeting, mail, rcpt, final)."""
    script = Script()
    script.extensions = list(ehlo[1:])
    script.probe_pipelining = pipelining_probe
    if ehlo_code != 250:
        script.ehlo = lambda arg: "%d 5.5.1 EHLO not understood" % ehlo_code
    for name, hook in hooks.items():
        setattr(script, name, hook)
    assert ReversedConnection(c, script, strict=True).run() == "quit"
    return script


def atrn_and_serve(provider, arg: str = "", user: str = "alice", **kw) -> Tuple[Script, List[Delivered]]:
    c = login(provider, user)
    try:
        c.send(("ATRN " + arg).rstrip())
        assert c.line() == ATRN_OK
        script = play_customer(c, **kw)
        return script, script.messages
    finally:
        c.close()


def queue_json(provider, *args) -> List[dict]:
    result = provider.run_cli("queue", "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr
    return json.loads(result.stdout)


# -- EHLO, the commands allowed before AUTH -------------------------------------

def test_greeting_and_ehlo_advertise_only_what_the_port_implements(provider):
    c = Customer(provider.odmr_port)
    try:
        code, lines = c.reply()
        assert code == 220 and lines[0].startswith("odmr.test ")
        code, lines = c.cmd("EHLO customer.test")
        assert code == 250
        assert lines[0] == "odmr.test"
        keywords = {l.split()[0] for l in lines[1:]}
        assert keywords == {"AUTH", "ENHANCEDSTATUSCODES", "ATRN"}   # no STARTTLS without TLS
        auth = [l for l in lines if l.startswith("AUTH ")][0].split()[1:]
        assert "CRAM-MD5" in auth and "SCRAM-SHA-256" in auth
        assert "PLAIN" not in auth and "LOGIN" not in auth
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("QUIT")[0] == 221
        assert c.line() == b""
    finally:
        c.close()


class _CountingSocket(socket.socket):
    """A real TCP socket that records each write, to see how replies are framed."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.writes: List[bytes] = []

    def sendall(self, data, *flags):
        self.writes.append(bytes(data))
        return super().sendall(data, *flags)


def test_multiline_ehlo_reply_is_one_write(provider, monkeypatch):
    from odmr import wire
    real_write_now = wire._write_now

    def write_now(sock, data):                  # plain sockets write straight to the descriptor
        if isinstance(sock, _CountingSocket):
            sock.writes.append(bytes(data))
        return real_write_now(sock, data)
    monkeypatch.setattr(wire, "_write_now", write_now)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname(), timeout=10)
    accepted, addr = listener.accept()
    listener.close()
    server_sock = _CountingSocket(fileno=accepted.detach())
    service = provider.service
    session = ODMRSession(server_sock, "127.0.0.1:%d" % addr[1], service.runtime, None,
                          service.queue, service.stopping)
    thread = threading.Thread(target=session.run, daemon=True)
    thread.start()
    try:
        rfile = client.makefile("rb")
        assert rfile.readline().startswith(b"220 ")
        client.sendall(b"EHLO customer.test\r\n")
        lines = [rfile.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(rfile.readline())
        assert len(lines) >= 3
        assert server_sock.writes[-1] == b"".join(lines)
        # and over the network the whole reply is there at once
        client.sendall(b"EHLO again.test\r\n")
        time.sleep(0.2)
        client.settimeout(5)
        chunk = client.recv(65536)
        assert chunk == b"".join(lines)
        client.sendall(b"QUIT\r\n")
        assert rfile.readline().startswith(b"221")
    finally:
        client.close()
        thread.join(5)
    assert not thread.is_alive()


@pytest.mark.parametrize("command", ["MAIL FROM:<a@b.test>", "RCPT TO:<a@example.org>", "DATA",
                                     "BDAT 10 LAST", "ETRN example.org", "TURN", "VRFY alice",
                                     "EXPN list", "HELO customer.test", "HELP", "HELP ATRN"],
                         ids=lambda c: c.split()[0])
def test_commands_refused_before_auth_with_502(provider, command):
    c = Customer(provider.odmr_port)
    try:
        c.reply()
        if not command.startswith("HELO"):
            assert c.cmd("EHLO customer.test")[0] == 250
        code, lines = c.cmd(command)
        assert code == 502, lines
        assert c.cmd("NOOP")[0] == 250        # the session goes on
    finally:
        c.close()


@pytest.mark.parametrize("command", ["MAIL FROM:<a@b.test>", "DATA", "TURN", "HELO x"],
                         ids=lambda c: c.split()[0])
def test_commands_refused_after_auth_too(provider, command):
    c = login(provider)
    try:
        assert c.cmd(command)[0] == 502
    finally:
        c.close()


# -- AUTH ---------------------------------------------------------------------------

def test_auth_before_ehlo_is_503(provider):
    c = Customer(provider.odmr_port)
    try:
        c.reply()
        code, lines = c.cmd("AUTH CRAM-MD5")
        assert code == 503
        assert c.cmd("EHLO customer.test")[0] == 250
        assert c.cmd("AUTH CRAM-MD5")[0] == 334
    finally:
        c.close()


def test_repeated_auth_after_success_is_503(provider):
    c = login(provider)
    try:
        assert c.cmd("AUTH CRAM-MD5")[0] == 503
        assert c.cmd("ATRN")[0] == 453          # still authenticated
    finally:
        c.close()


def test_auth_cancel_with_star_is_501_and_not_authenticated(provider):
    c = Customer(provider.odmr_port)
    try:
        c.reply()
        c.cmd("EHLO customer.test")
        assert c.cmd("AUTH CRAM-MD5")[0] == 334
        code, lines = c.cmd("*")
        assert code == 501
        assert c.cmd("ATRN")[0] == 530
        c.close()
        # a cancel is not a failed attempt: three cancels do not close the session
        c = Customer(provider.odmr_port)
        c.reply()
        c.cmd("EHLO customer.test")
        for _ in range(3):
            assert c.cmd("AUTH CRAM-MD5")[0] == 334
            assert c.cmd("*")[0] == 501
        assert c.cmd("NOOP")[0] == 250
    finally:
        c.close()


def _cram(c: Customer, user: str, password: str):
    code, lines = c.cmd("AUTH CRAM-MD5")
    assert code == 334
    mech = sasl.client_mechanism("CRAM-MD5", user, password)
    return c.cmd(b64(mech.respond(base64.b64decode(lines[0]))))


def test_wrong_password_is_535_578_and_three_failures_close(provider):
    c = Customer(provider.odmr_port)
    try:
        c.reply()
        c.cmd("EHLO customer.test")
        code, lines = _cram(c, "alice", "wrong")
        assert (code, lines[0].split()[0]) == (535, "5.7.8")
        code, lines = _cram(c, "nosuchuser", PASSWORD)
        assert (code, lines[0].split()[0]) == (535, "5.7.8")
        assert c.cmd("NOOP")[0] == 250
        code, lines = _cram(c, "alice", "wrong again")
        assert code == 535
        code, lines = c.reply()
        assert code == 421
        assert c.line() == b""
    finally:
        c.close()


def test_failed_attempts_are_logged_without_the_secret(provider, caplog):
    import logging
    caplog.set_level(logging.DEBUG, logger="odmrd")
    c = Customer(provider.odmr_port)
    try:
        c.reply()
        c.cmd("EHLO customer.test")
        code, lines = c.cmd("AUTH CRAM-MD5")
        response = b64(b"alice 0123456789abcdef0123456789abcdef")
        assert c.cmd(response)[0] == 535
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    time.sleep(0.1)
    text = caplog.text
    assert "authentication failed" in text and "127.0.0.1" in text
    assert response not in text and "0123456789abcdef0123" not in text


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_plaintext_mechanisms_refused_without_tls(provider, mechanism):
    c = Customer(provider.odmr_port)
    try:
        c.reply()
        c.cmd("EHLO customer.test")
        code, lines = c.cmd("AUTH %s %s" % (mechanism, b64(b"\0alice\0" + PASSWORD.encode())))
        assert code == 538 and lines[0].startswith("5.7.11")
        code, lines = c.cmd("AUTH %s" % mechanism)
        assert code == 538
        assert c.cmd("ATRN")[0] == 530
    finally:
        c.close()


def test_scram_sha_256_login_works(provider):
    spool_one(provider, ["u@example.org"])
    c = Customer(provider.odmr_port)
    try:
        c.reply()
        c.cmd("EHLO customer.test")
        mech = sasl.client_mechanism("SCRAM-SHA-256", "alice", PASSWORD)
        code, lines = c.cmd("AUTH SCRAM-SHA-256 " + b64(mech.initial()))
        while code == 334:
            code, lines = c.cmd(b64(mech.respond(base64.b64decode(lines[0]))))
        assert code == 235
        assert mech.done()                   # the server proved it knows the key
        c.send("ATRN example.org")
        assert c.line() == ATRN_OK
    finally:
        c.close()


def test_scram_wrong_password_is_535(provider):
    c = Customer(provider.odmr_port)
    try:
        c.reply()
        c.cmd("EHLO customer.test")
        mech = sasl.client_mechanism("SCRAM-SHA-256", "alice", "not the password")
        code, lines = c.cmd("AUTH SCRAM-SHA-256 " + b64(mech.initial()))
        assert code == 334
        code, lines = c.cmd(b64(mech.respond(base64.b64decode(lines[0]))))
        assert code == 535 or (code == 334 and c.cmd("")[0] == 535)
    finally:
        c.close()


# -- limits -----------------------------------------------------------------------

def test_bad_command_budget_gives_421_and_close(provider):
    c = Customer(provider.odmr_port)
    try:
        c.reply()
        for _ in range(19):
            assert c.cmd("BOGUS")[0] == 500
        assert c.cmd("BOGUS")[0] == 500          # the 20th (max_bad_commands) error ...
        code, lines = c.reply()                  # ... is followed by 421 and the close
        assert code == 421
        assert c.line() == b""
    finally:
        c.close()


def test_overlong_command_line_is_500_and_session_continues(provider):
    c = Customer(provider.odmr_port)
    try:
        c.reply()
        code, lines = c.cmd("EHLO " + "x" * 600)
        assert code == 500 and lines[0].startswith("5.5.2")
        assert c.cmd("EHLO customer.test")[0] == 250
        c.send("NOOP " + "y" * 5000)
        assert c.reply()[0] == 500
        assert c.cmd("NOOP")[0] == 250
    finally:
        c.close()


# -- ATRN decisions, in the order of SPEC §4 -----------------------------------------

def test_atrn_before_auth_is_530_even_with_bad_syntax(provider):
    c = Customer(provider.odmr_port)
    try:
        c.reply()
        c.cmd("EHLO customer.test")
        for arg in ("example.org", "../etc", ""):
            code, lines = c.cmd(("ATRN " + arg).rstrip())
            assert (code, lines[0]) == replies.AUTH_REQUIRED, arg
    finally:
        c.close()


@pytest.mark.parametrize("arg", ["example.org,,example.com", "example.org,", ",example.org",
                                 "../etc", "a b", "example.org;rm", "exa_mple.org", "-bad.org",
                                 "example..org", "x" * 64 + ".org", "[127.0.0.1]"],
                         ids=["empty-element", "trailing-comma", "leading-comma", "dotdot",
                              "space-separated", "semicolon", "underscore", "leading-hyphen",
                              "empty-label", "label-too-long", "address-literal"])
def test_atrn_syntax_errors_are_501_before_ownership(provider, arg):
    spool_one(provider, ["u@example.org"])
    c = login(provider)
    try:
        code, lines = c.cmd("ATRN " + arg)
        assert code == 501, lines
        assert c.cmd("ATRN example.net")[0] == 450       # still authenticated
    finally:
        c.close()
    assert len(provider.spooled("example.org")) == 1


def test_atrn_without_argument_means_all_account_domains(provider):
    spool_one(provider, ["a@example.org"], b"Subject: one\r\n\r\n1\r\n")
    spool_one(provider, ["b@example.com"], b"Subject: two\r\n\r\n2\r\n")
    spool_one(provider, ["c@example.net"], b"Subject: three\r\n\r\n3\r\n")
    _, got = atrn_and_serve(provider, "")
    assert sorted(r for m in got for r in m.rcpts) == ["a@example.org", "b@example.com"]
    assert provider.spooled("example.org") == [] and provider.spooled("example.com") == []
    assert len(provider.spooled("example.net")) == 1


@pytest.mark.parametrize("arg", ["example.net", "example.org,example.net", "example.org, example.net",
                                 "EXAMPLE.NET", "example.org.test", "nosuch.test"],
                         ids=["other-account", "mixed", "mixed-with-space", "upper-case-other",
                              "longer-name", "not-hosted"])
def test_atrn_foreign_domain_is_450_and_nothing_is_sent(provider, arg):
    spool_one(provider, ["a@example.org"])
    spool_one(provider, ["c@example.net"])
    c = login(provider)
    try:
        code, lines = c.cmd("ATRN " + arg)
        assert (code, lines[0]) == replies.ATRN_REFUSED
        # the session stays authenticated and nothing was delivered
        assert len(provider.spooled("example.org")) == 1
        assert len(provider.spooled("example.net")) == 1
        c.send("ATRN example.org")
        assert c.line() == ATRN_OK
        got = play_customer(c).messages
    finally:
        c.close()
    assert [m.rcpts for m in got] == [["a@example.org"]]
    assert len(provider.spooled("example.net")) == 1


def test_atrn_453_when_no_mail_and_session_stays_authenticated(provider):
    c = login(provider)
    try:
        c.send("ATRN example.org")
        assert c.line() == NO_MAIL
        c.send("ATRN")
        assert c.line() == NO_MAIL
        spool_one(provider, ["x@example.com"])
        c.send("ATRN example.org")
        assert c.line() == NO_MAIL
        c.send("ATRN example.com")
        assert c.line() == ATRN_OK
        got = play_customer(c).messages
        assert [m.rcpts for m in got] == [["x@example.com"]]
    finally:
        c.close()


@pytest.mark.parametrize("arg", ["Example.ORG", "example.org, example.com", "EXAMPLE.COM ,example.org",
                                 "example.org,  example.com", "example.org,example.org"],
                         ids=["mixed-case", "space-after-comma", "upper-with-space-before-comma",
                              "two-spaces", "duplicate"])
def test_atrn_accepts_any_case_and_spaces_after_commas(provider, arg):
    spool_one(provider, ["a@example.org"])
    _, got = atrn_and_serve(provider, arg)
    assert [m.rcpts for m in got] == [["a@example.org"]]


@pytest.mark.slow
def test_atrn_reply_is_exactly_one_line(provider):
    spool_one(provider, ["a@example.org"])
    c = login(provider)
    try:
        c.send("ATRN example.org")
        time.sleep(0.3)
        c.sock.settimeout(10)
        data = c.sock.recv(4096)
        # nothing but the single 250 line before the customer greets
        assert data == ATRN_OK
    finally:
        c.close()


@pytest.mark.slow
def test_concurrent_atrn_for_one_domain_gets_451_and_nothing_twice(provider):
    for i in range(3):
        spool_one(provider, ["a%d@example.org" % i])
    first = login(provider)
    second = login(provider)
    try:
        first.send("ATRN example.org")
        assert first.line() == ATRN_OK
        # while the first session holds example.org (not greeted yet), the second is refused
        code, lines = second.cmd("ATRN example.org,example.com")
        assert (code, lines[0]) == replies.ATRN_BUSY
        code, lines = second.cmd("ATRN example.org")
        assert code == 451
        # a domain nobody holds still works (and stays authenticated)
        assert second.cmd("ATRN example.com")[0] == 453
        got_first = play_customer(first).messages
        assert len(got_first) == 3
        code, lines = second.cmd("ATRN example.org")
        assert code == 453
    finally:
        first.close()
        second.close()
    assert provider.spooled("example.org") == []


@pytest.mark.slow
def test_concurrent_atrn_race_delivers_each_message_once(provider):
    for i in range(5):
        spool_one(provider, ["r%d@example.org" % i])
    customers = [login(provider) for _ in range(4)]
    results: List[List[Delivered]] = [[] for _ in customers]
    codes: List[int] = [0] * len(customers)

    def go(i):
        c = customers[i]
        c.send("ATRN example.org")
        line = c.line()
        codes[i] = int(line[:3])
        if line == ATRN_OK:
            results[i] = play_customer(c).messages

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(customers))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    finally:
        for c in customers:
            c.close()
    assert all(code in (250, 451, 453) for code in codes), codes
    delivered = sorted(r for got in results for m in got for r in m.rcpts)
    assert delivered == ["r%d@example.org" % i for i in range(5)]


@pytest.mark.slow
def test_domain_never_matches_a_longer_name(tmp_path):
    p = Provider(str(tmp_path))
    p.add_user("alice", ["example.org"])
    p.add_user("carol", ["example.org.test"])
    p.start()
    try:
        spool_one(p, ["a@example.org"])
        spool_one(p, ["c@example.org.test"])
        c = login(p, "alice")
        try:
            assert c.cmd("ATRN example.org.test")[0] == 450
            assert c.cmd("ATRN example.org.")[0] == 501
            c.send("ATRN example.org")
            assert c.line() == ATRN_OK
            got = play_customer(c).messages
        finally:
            c.close()
        assert [m.rcpts for m in got] == [["a@example.org"]]
        assert len(p.spooled("example.org.test")) == 1
        c = login(p, "carol")
        try:
            assert c.cmd("ATRN example.org")[0] == 450
        finally:
            c.close()
        _, got = atrn_and_serve(p, "", user="carol")
        assert [m.rcpts for m in got] == [["c@example.org.test"]]
    finally:
        stop_quickly(p)


# -- after the turnaround ----------------------------------------------------------

@pytest.mark.parametrize("greeting", ["421 4.3.2 customer.test busy", "554 5.3.0 customer.test no service"],
                         ids=["421", "554"])
def test_customer_refusing_greeting_gets_quit_and_mail_is_kept(provider, greeting):
    spool_one(provider, ["a@example.org"])
    server, got = atrn_and_serve(provider, "example.org", greeting=greeting)
    assert got == [] and server.commands == ["QUIT"]
    assert len(provider.spooled("example.org")) == 1
    # and the next ATRN gets it
    _, got = atrn_and_serve(provider, "example.org")
    assert len(got) == 1


def test_helo_fallback_when_ehlo_refused(provider):
    spool_one(provider, ["a@example.org"])
    server, got = atrn_and_serve(provider, "example.org", ehlo_code=502)
    assert server.commands[0] == "EHLO odmr.test"
    assert server.commands[1] == "HELO odmr.test"
    assert server.commands[2] == "MAIL FROM:<%s>" % SENDER      # no ESMTP parameters after HELO
    assert len(got) == 1
    assert provider.spooled("example.org") == []


LOCKSTEP = ["customer.test", "8BITMIME", "SIZE 10000000"]
PIPELINED = LOCKSTEP + ["PIPELINING"]
both_modes = pytest.mark.parametrize("ehlo", [PIPELINED, LOCKSTEP], ids=["pipelining", "no-pipelining"])


@pytest.mark.slow
@both_modes
def test_per_recipient_results_2xx_removed_4xx_kept(provider, ehlo):
    answers = {"ok@example.org": "250 2.1.5 ok",
               "later@example.org": "450 4.2.1 mailbox busy",
               "also-ok@example.org": "251 2.1.5 will forward"}
    spool_one(provider, list(answers))
    [msg_id] = provider.spooled("example.org")
    server, got = atrn_and_serve(provider, "example.org", ehlo=ehlo, rcpt=lambda r: answers[r])
    assert [m.rcpts for m in got] == [["ok@example.org", "also-ok@example.org"]]
    # the message stays for the deferred recipient only
    assert provider.spooled("example.org") == [msg_id]
    [record] = queue_json(provider, "example.org")
    assert set(record) == {"id", "domain", "size", "age", "sender", "recipients", "attempts", "last_error"}
    assert record["id"] == msg_id and record["domain"] == "example.org"
    assert record["sender"] == SENDER
    assert record["recipients"] == ["later@example.org"]
    assert record["attempts"] == 1
    assert "450" in record["last_error"] and "mailbox busy" in record["last_error"]
    assert isinstance(record["age"], int) and isinstance(record["size"], int) and record["size"] > 0
    # deferred again: attempts count up
    atrn_and_serve(provider, "example.org", ehlo=ehlo, rcpt=lambda r: "452 4.2.2 over quota")
    [record] = queue_json(provider, "example.org")
    assert record["attempts"] == 2 and record["last_error"].startswith("452")
    # the next ATRN offers only the deferred recipient; success removes the message
    server, got = atrn_and_serve(provider, "example.org")
    rcpts = [c for c in server.commands if c.startswith("RCPT")]
    assert rcpts == ["RCPT TO:<later@example.org>"]
    assert provider.spooled("example.org") == []


@pytest.mark.slow
@both_modes
def test_per_recipient_5xx_produces_one_dsn_and_is_not_retried(provider, ehlo):
    answers = {"ok@example.org": "250 2.1.5 ok",
               "later@example.org": "450 4.2.1 mailbox busy",
               "gone@example.org": "550 5.1.1 no such user"}
    spool_one(provider, list(answers), sender="someone@example.com")
    atrn_and_serve(provider, "example.org", ehlo=ehlo, rcpt=lambda r: answers[r])
    [record] = queue_json(provider, "example.org")
    assert record["recipients"] == ["later@example.org"]
    # the sender hears about the 5xx at once, not only when the deferred recipient is done
    assert len(queue_json(provider, "example.com")) == 1
    server, got = atrn_and_serve(provider, "example.org", ehlo=ehlo)
    assert [c for c in server.commands if c.startswith("RCPT")] == ["RCPT TO:<later@example.org>"]
    assert provider.spooled("example.org") == []
    # the 5xx produced a DSN to the sender (a hosted domain, so it is spooled there)
    dsns = queue_json(provider, "example.com")
    assert len(dsns) == 1 and dsns[0]["sender"] == "" and dsns[0]["recipients"] == ["someone@example.com"]
    show = provider.run_cli("queue", "show", dsns[0]["id"])
    assert b"gone@example.org" in show.stdout and b"5.1.1" in show.stdout
    assert b"multipart/report" in show.stdout and b"ok@example.org" not in show.stdout.split(b"\n\n", 1)[1]


@pytest.mark.slow
def test_5xx_after_data_bounces_and_4xx_after_data_is_kept(provider):
    spool_one(provider, ["a@example.org"], b"Subject: perm\r\n\r\nx\r\n", sender="s@example.com")
    spool_one(provider, ["b@example.org"], b"Subject: temp\r\n\r\ny\r\n", sender="s@example.com")

    def final(m: Delivered) -> str:
        return "554 5.6.0 rejected content" if b"perm" in m.data else "451 4.3.0 try later"
    atrn_and_serve(provider, "example.org", final=final)
    records = queue_json(provider, "example.org")
    assert [r["recipients"] for r in records] == [["b@example.org"]]
    assert records[0]["attempts"] == 1 and records[0]["last_error"].startswith("451")
    assert len(queue_json(provider, "example.com")) == 1


@pytest.mark.slow
@both_modes
def test_rejected_mail_from_and_all_rcpts_rejected(provider, ehlo):
    spool_one(provider, ["a@example.org"], b"Subject: one\r\n\r\n1\r\n", sender="bad@example.com")
    spool_one(provider, ["b@example.org"], b"Subject: two\r\n\r\n2\r\n", sender="slow@example.com")
    spool_one(provider, ["c@example.org", "d@example.org"], b"Subject: three\r\n\r\n3\r\n")
    spool_one(provider, ["e@example.org"], b"Subject: four\r\n\r\n4\r\n")

    def mail(line: str) -> str:
        if "bad@" in line:
            return "550 5.7.1 sender refused"
        if "slow@" in line:
            return "451 4.7.1 greylisted"
        return "250 ok"

    def rcpt(address: str) -> str:
        return {"c@example.org": "550 5.1.1 unknown", "d@example.org": "452 4.2.2 full"}.get(address, "250 ok")
    server, got = atrn_and_serve(provider, "example.org", ehlo=ehlo, mail=mail, rcpt=rcpt)
    assert [m.rcpts for m in got] == [["e@example.org"]]
    records = {tuple(r["recipients"]): r for r in queue_json(provider, "example.org")}
    assert set(records) == {("b@example.org",), ("d@example.org",)}
    assert records[("b@example.org",)]["last_error"].startswith("451")
    assert records[("d@example.org",)]["last_error"].startswith(("452", "550"))
    assert all(r["attempts"] == 1 for r in records.values())
    # the refused sender (hosted) got a DSN; nothing else did yet
    dsns = queue_json(provider, "example.com")
    assert [d["recipients"] for d in dsns] == [["bad@example.com"]]


@pytest.mark.slow
def test_5xx_for_null_sender_is_dropped_without_dsn(provider):
    spool_one(provider, ["a@example.org"], sender="")
    atrn_and_serve(provider, "example.org", rcpt=lambda r: "550 5.1.1 unknown")
    assert provider.spooled("example.org") == []
    assert queue_json(provider) == []


@pytest.mark.slow
def test_connection_lost_mid_delivery_keeps_the_message(provider):
    spool_one(provider, ["a@example.org"])
    c = login(provider)
    try:
        c.send("ATRN example.org")
        assert c.line() == ATRN_OK
        c.send("220 customer.test")
        assert c.line().startswith(b"EHLO")
        c.send("250 customer.test")
        assert c.line().startswith(b"MAIL FROM")
    finally:
        c.close()
    deadline = time.time() + 15
    while time.time() < deadline:
        records = queue_json(provider, "example.org")
        if records and records[0]["attempts"]:
            break
        time.sleep(0.1)
    assert len(records) == 1
    # and the domain is free again once that session has wound down
    c = login(provider)
    try:
        deadline = time.time() + 15
        while True:
            c.send("ATRN example.org")
            line = c.line()
            if line != (reply_line(replies.ATRN_BUSY) + "\r\n").encode() or time.time() > deadline:
                break
            time.sleep(0.05)
        assert line == ATRN_OK
        assert len(play_customer(c).messages) == 1
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
def test_pipelined_and_lockstep_customers(provider, pipelining):
    for i in range(3):
        spool_one(provider, ["a%d@example.org" % i, "b%d@example.org" % i],
                  b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i))
    ehlo = ["customer.test", "8BITMIME", "SIZE 10000000"] + (["PIPELINING"] if pipelining else [])
    server, got = atrn_and_serve(provider, "example.org", ehlo=ehlo, pipelining_probe=True)
    assert len(got) == 3
    assert all(len(m.rcpts) == 2 for m in got)
    assert server.pipelined_batches == [pipelining] * 3
    assert all("SIZE=" in c for c in server.commands if c.startswith("MAIL"))
    assert provider.spooled("example.org") == []


@pytest.mark.slow
def test_dot_stuffing_both_ways(provider):
    body = (b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n...three\r\nmiddle . dot\r\n"
            b". space\r\nend.\r\n.")
    c = Customer(provider.smtp_port)
    try:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<%s>" % SENDER)
        c.cmd("RCPT TO:<a@example.org>")
        assert c.cmd("DATA")[0] == 354
        stuffed = b"\r\n".join((b"." + l if l.startswith(b".") else l) for l in body.split(b"\r\n"))
        c.sock.sendall(stuffed + b"\r\n.\r\n")
        assert c.reply()[0] == 250
    finally:
        c.close()
    [record] = queue_json(provider, "example.org")
    shown = provider.run_cli("queue", "show", record["id"]).stdout
    assert body + b"\r\n" in shown               # stored unstuffed
    server, got = atrn_and_serve(provider, "example.org")
    assert got[0].body() == body + b"\r\n"       # the scripted customer unstuffs what it receives


def test_eight_bit_content_arrives_byte_identical(provider):
    body = (b"Subject: =?utf-8?q?8bit?=\r\nContent-Type: text/plain; charset=latin-1\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + bytes(range(128, 256)) + b"\r\n"
            b"\xc3\xa4\xc3\xb6\xc3\xbc \xff\xfe\x00 nul and \x7f\r\n")
    c = Customer(provider.smtp_port)
    try:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<%s> BODY=8BITMIME" % SENDER)[0] == 250
        c.cmd("RCPT TO:<a@example.org>")
        assert c.cmd("DATA")[0] == 354
        c.sock.sendall(body + b".\r\n")
        assert c.reply()[0] == 250
    finally:
        c.close()
    server, got = atrn_and_serve(provider, "example.org")
    assert got[0].body() == body
    assert "BODY=8BITMIME" in got[0].mail


def test_multi_domain_message_is_split_per_domain(provider):
    spool_one(provider, ["a@example.org", "b@example.com", "c@example.net", "a2@example.org"])
    assert len(provider.spooled("example.org")) == 1
    assert len(provider.spooled("example.com")) == 1
    assert len(provider.spooled("example.net")) == 1
    _, got = atrn_and_serve(provider, "example.org")
    assert [m.rcpts for m in got] == [["a@example.org", "a2@example.org"]]
    assert len(provider.spooled("example.com")) == 1
    _, got = atrn_and_serve(provider, "example.com")
    assert [m.rcpts for m in got] == [["b@example.com"]]
    _, got = atrn_and_serve(provider, "", user="bob")
    assert [m.rcpts for m in got] == [["c@example.net"]]
    # each copy carries only its own recipients, in the envelope and in the trace header
    assert b"c@example.net" in got[0].data
    assert b"a@example.org" not in got[0].data.split(b"\r\n\r\n", 1)[0].split(b"Subject")[0]


def test_corrupt_message_is_quarantined_and_does_not_block_the_domain(provider):
    spool_one(provider, ["a@example.org"])
    directory = os.path.join(provider.spool_dir, "example.org")
    bogus = "0" * 13 + "deadbeef"
    with open(os.path.join(directory, bogus), "wb") as fh:
        fh.write(b"this is not a spool file\n")
    _, got = atrn_and_serve(provider, "example.org")
    assert [m.rcpts for m in got] == [["a@example.org"]]
    assert provider.spooled("example.org") == []
    assert os.path.exists(os.path.join(provider.spool_dir, ".quarantine", "example.org", bogus))


def _spool_utf8(provider) -> None:
    c = Customer(provider.smtp_port)
    try:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<sender@example.com> SMTPUTF8")[0] == 250
        assert c.cmd("RCPT TO:<jürgen@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.sock.sendall("Subject: grüße\r\n\r\nhallo\r\n.\r\n".encode())
        assert c.reply()[0] == 250
    finally:
        c.close()


def test_smtputf8_message_to_smtputf8_customer(provider):
    _spool_utf8(provider)
    server, got = atrn_and_serve(provider, "example.org")
    assert got[0].rcpts == ["jürgen@example.org"]
    assert " SMTPUTF8" in got[0].mail
    assert got[0].body() == "Subject: grüße\r\n\r\nhallo\r\n".encode()


@pytest.mark.slow
def test_smtputf8_message_to_ascii_only_customer_is_bounced_not_mangled(provider):
    _spool_utf8(provider)
    server, got = atrn_and_serve(provider, "example.org", ehlo=["customer.test", "8BITMIME", "PIPELINING"])
    assert got == []
    assert not any(c.startswith("RCPT") for c in server.commands)
    assert provider.spooled("example.org") == []
    [dsn] = queue_json(provider, "example.com")
    assert dsn["recipients"] == ["sender@example.com"]


def test_the_odmr_replies_are_the_spec_texts():
    """The texts SPEC §4 fixes, written out once here: the constants code and tests share
    must not drift from the contract (each with the enhanced code the port advertises)."""
    assert replies.ATRN_OK == (250, "2.0.0 OK now reversing the connection")
    assert replies.ATRN_REFUSED == (450, "4.7.0 ATRN request refused")
    assert replies.ATRN_BUSY == (451, "4.3.0 Unable to process ATRN request now")
    assert replies.NO_MAIL == (453, "4.2.0 You have no mail")
    assert replies.AUTH_REQUIRED == (530, "5.7.0 Authentication required")


ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


def test_the_odmr_port_advertises_enhanced_codes_and_every_reply_has_one(provider):
    from helpers import Customer
    sent, answers = [], []
    c = Customer(provider.odmr_port)
    try:
        c.reply()                                          # the greeting is exempt
        code, lines = c.cmd("EHLO customer.test")
        assert "ENHANCEDSTATUSCODES" in lines
        for command in ["NOOP", "RSET", "HELP", "BOGUS", "MAIL FROM:<a@b.test>", "ATRN example.org",
                        "AUTH NONSUCH", "AUTH CRAM-MD5", "*", "QUIT"]:
            sent.append(command)
            answers.append(c.cmd(command))
    finally:
        c.close()
    c = Customer(provider.odmr_port)
    try:
        c.login("alice")
        for command in ["ATRN example.net", "ATRN example.org", "ATRN bad..domain", "NOOP", "QUIT"]:
            sent.append(command)
            answers.append(c.cmd(command))
    finally:
        c.close()
    for command, (code, lines) in zip(sent, answers):
        if code == 334:
            continue
        assert code >= 200 and all(ENHANCED.match(l) for l in lines), (command, code, lines)
    assert [a[0] for a in answers[-5:-2]] == [450, 453, 501]
