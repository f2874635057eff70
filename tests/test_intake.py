"""Acceptance tests for the SMTP intake port (SPEC §5), over real loopback sockets."""
from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import time
from typing import List

import pytest

from helpers import Customer, Provider, reuse_provider, run_cli, send_mail, stop_quickly, stored
from odmr import replies

SENDER = "sender@remote.test"
MSG = b"Subject: hi\r\n\r\nhello\r\n"


def make_provider(directory: str, sections: str = "", smtp_extra: str = "") -> Provider:
    p = Provider(directory, sections=sections, smtp_extra=smtp_extra)
    p.add_user("alice", ["example.org", "example.com"])
    p.add_user("bob", ["example.net"])
    return p.start()


@pytest.fixture
def provider(shared_provider):
    """alice: example.org, example.com; bob: example.net — with an empty spool and no sessions."""
    yield from reuse_provider(shared_provider)


@pytest.fixture
def smtp(provider):
    """A raw client on the intake port, greeted and EHLO'd."""
    c = Customer(provider.smtp_port)
    code, lines = c.reply()
    assert code == 220 and lines[0].startswith("odmr.test")
    assert c.cmd("EHLO client.test")[0] == 250
    yield c
    c.close()


def envelope_of(provider, domain: str):
    return [provider.spool.load(domain, i).envelope for i in provider.spooled(domain)]


def status(lines: List[str]) -> str:
    return lines[0].split()[0]


def send_data(c: Customer, raw: bytes):
    c.sock.sendall(raw)
    return c.reply()


# -- EHLO and the session verbs -------------------------------------------------------

def test_ehlo_advertises_and_keeps_its_promises(smtp, provider):
    code, lines = smtp.cmd("EHLO again.test")
    assert code == 250
    keywords = {l.split()[0] for l in lines[1:]}
    assert {"SIZE", "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"} <= keywords
    assert "STARTTLS" not in keywords          # no TLS configured
    assert "AUTH" not in keywords and "ATRN" not in keywords
    size = [l for l in lines if l.startswith("SIZE ")][0]
    assert size == "SIZE %d" % (1024 * 1024)


def test_pipelined_client(smtp, provider):
    smtp.sock.sendall(b"MAIL FROM:<%s> SIZE=100\r\nRCPT TO:<a@example.org>\r\n"
                      b"RCPT TO:<nobody@evil.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n" % SENDER.encode())
    replies = [smtp.reply()[0] for _ in range(5)]
    assert replies == [250, 250, 550, 250, 354]
    smtp.sock.sendall(MSG + b".\r\nMAIL FROM:<>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
    assert [smtp.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    smtp.sock.sendall(MSG + b".\r\nQUIT\r\n")
    assert [smtp.reply()[0] for _ in range(2)] == [250, 221]
    assert len(provider.spooled("example.org")) == 1
    assert len(provider.spooled("example.com")) == 1
    assert len(provider.spooled("example.net")) == 1


@pytest.mark.slow
def test_pipelined_replies_go_out_together(smtp, provider, monkeypatch):
    """RFC 2920 §3.1: a reply waits while more pipelined commands are buffered, so a
    group's replies leave in one write; RSET's 250 is held until MAIL is answered."""
    from odmr import intake
    judged = intake.accept_sender

    def slow_sender_check(policy, sender):
        time.sleep(0.6)
        return judged(policy, sender)
    monkeypatch.setattr(intake, "accept_sender", slow_sender_check)
    smtp.sock.sendall(b"RSET\r\nMAIL FROM:<%s>\r\n" % SENDER.encode())
    smtp.sock.settimeout(10)
    first = smtp.sock.recv(4096, socket.MSG_PEEK)      # what came first, whenever it came
    assert first.count(b"\r\n") == 2, first          # RSET's reply waited for MAIL's
    assert [smtp.reply()[0] for _ in range(2)] == [250, 250]


def test_held_replies_are_written_before_the_server_waits(smtp, provider):
    smtp.sock.sendall(b"MAIL FROM:<%s>\r\nRCPT TO:<a@example.org>\r\nDA" % SENDER.encode())
    assert [smtp.reply()[0] for _ in range(2)] == [250, 250]     # the rest of DATA not yet sent
    smtp.sock.sendall(b"TA\r\n")
    assert smtp.reply()[0] == 354
    smtp.sock.sendall(MSG + b".\r\n")
    assert smtp.reply()[0] == 250
    assert len(provider.spooled("example.org")) == 1


def test_smtplib_client_works(provider):
    refused = send_mail(provider.smtp_port, SENDER, ["x@example.org"], MSG)
    assert refused == {}
    assert len(provider.spooled("example.org")) == 1


@pytest.mark.parametrize("command,code", [("NOOP", 250), ("RSET", 250), ("VRFY alice", 252),
                                          ("EXPN staff", 502), ("HELP", 214)],
                         ids=["NOOP", "RSET", "VRFY", "EXPN", "HELP"])
def test_session_verbs(smtp, command, code):
    assert smtp.cmd(command)[0] == code
    assert smtp.cmd("NOOP")[0] == 250


def test_rset_drops_the_transaction(smtp, provider):
    assert smtp.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    assert smtp.cmd("RCPT TO:<a@example.org>")[0] == 250
    assert smtp.cmd("RSET")[0] == 250
    assert smtp.cmd("DATA")[0] == 503
    assert smtp.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250   # not "nested"
    assert provider.spooled("example.org") == []


def test_quit_closes(smtp):
    code, lines = smtp.cmd("QUIT")
    assert code == 221
    assert smtp.line() == b""


def test_helo_client_can_send_plain_mail(provider):
    c = Customer(provider.smtp_port)
    try:
        c.reply()
        assert c.cmd("HELO old.test")[0] == 250
        assert c.cmd("MAIL FROM:<%s> SIZE=10" % SENDER)[0] == 501    # no ESMTP params after HELO
        assert c.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
        assert c.cmd("RCPT TO:<a@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        assert send_data(c, MSG + b".\r\n")[0] == 250
    finally:
        c.close()
    [data] = stored(provider, "example.org")
    assert b"with SMTP id" in data


@pytest.mark.parametrize("commands,code", [
    (["RCPT TO:<a@example.org>"], 503),
    (["DATA"], 503),
    (["MAIL FROM:<a@remote.test>", "MAIL FROM:<b@remote.test>"], 503),
    (["MAIL FROM:<a@remote.test>", "DATA"], 554),
    (["MAIL FROM:<a@remote.test>", "RCPT TO:<x@evil.test>", "DATA"], 554),
], ids=["rcpt-before-mail", "data-before-mail", "nested-mail", "data-without-rcpt",
        "data-after-refused-rcpt"])
def test_sequencing_errors(smtp, commands, code):
    for command in commands[:-1]:
        smtp.cmd(command)
    reply_code, lines = smtp.cmd(commands[-1])
    assert reply_code == code
    assert status(lines).startswith("5.5.")
    assert smtp.cmd("NOOP")[0] == 250


def test_mail_before_ehlo_is_503(provider):
    c = Customer(provider.smtp_port)
    try:
        c.reply()
        assert c.cmd("MAIL FROM:<%s>" % SENDER)[0] == 503
    finally:
        c.close()


@pytest.mark.parametrize("command", ["MAIL FROM:<a@remote.test> FOO=bar",
                                     "MAIL FROM:<a@remote.test> BODY=BINARYMIME",
                                     "MAIL FROM:<a@remote.test> SMTPUTF8=yes",
                                     "RCPT TO:<a@example.org> FOO=bar"],
                         ids=["unknown-mail-param", "unsupported-body", "smtputf8-with-value",
                              "unknown-rcpt-param"])
def test_unknown_parameters_are_555(smtp, command):
    if command.startswith("RCPT"):
        smtp.cmd("MAIL FROM:<a@remote.test>")
    code, lines = smtp.cmd(command)
    assert code == 555 and status(lines) == "5.5.4"


@pytest.mark.parametrize("command", ["MAIL FROM:a@remote.test", "MAIL FROM:<a@remote.test",
                                     "MAIL TO:<a@remote.test>", "MAIL"],
                         ids=["no-brackets", "unclosed", "wrong-keyword", "no-argument"])
def test_mail_syntax_errors_are_501(smtp, command):
    assert smtp.cmd(command)[0] == 501


def test_overlong_command_line_is_500_and_session_continues(smtp):
    code, lines = smtp.cmd("MAIL FROM:<%s@remote.test>" % ("x" * 600))
    assert code == 500 and status(lines) == "5.5.2"
    assert smtp.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250


def test_intake_connections_are_logged(provider, caplog):
    import logging
    with caplog.at_level(logging.INFO):
        with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
            s.ehlo("probe.test")
            port = s.sock.getsockname()[1]
        deadline = time.monotonic() + 15
        while not any("smtp: connect from 127.0.0.1:%d" % port in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)


# -- never an open relay --------------------------------------------------------

@pytest.mark.parametrize("rcpt", [
    "user@evil.test",
    "user@example.org@evil.test",
    "@example.org:user@evil.test",
    "@example.org,@example.com:user@evil.test",
    "user@example.org.evil.test",
    "user@evil-example.org",
    "user@[127.0.0.1]",
    "user@[IPv6:::1]",
    '"user@example.org"@evil.test',
    "user@sub.example.org",
], ids=["plain", "double-at", "source-route", "source-route-list", "suffix", "prefix-lookalike",
        "ipv4-literal", "ipv6-literal", "quoted-local", "subdomain"])
def test_never_an_open_relay(smtp, provider, rcpt):
    assert smtp.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    code, lines = smtp.cmd("RCPT TO:<%s>" % rcpt)
    assert code >= 500, (rcpt, code, lines)
    assert code in (501, 550, 553)
    if code == 550:
        assert status(lines) == "5.7.1"
    assert smtp.cmd("DATA")[0] == 554
    assert os.listdir(provider.spool_dir) in ([], [".quarantine"]) or \
        all(provider.spooled(d) == [] for d in ("example.org", "example.com", "example.net"))


@pytest.mark.parametrize("rcpt,domain", [
    ("User@EXAMPLE.ORG", "example.org"),
    ('"odd local"@example.net', "example.net"),
], ids=["upper-case", "quoted-local-part"])      # routed local parts: test_routing.py
def test_hosted_recipients_accepted(smtp, provider, rcpt, domain):
    assert smtp.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    code, lines = smtp.cmd("RCPT TO:<%s>" % rcpt)
    assert code == 250, lines
    assert smtp.cmd("DATA")[0] == 354
    assert send_data(smtp, MSG + b".\r\n")[0] == 250
    assert len(provider.spooled(domain)) == 1


def test_null_recipient_refused(smtp):
    smtp.cmd("MAIL FROM:<%s>" % SENDER)
    assert smtp.cmd("RCPT TO:<>")[0] >= 500


def test_recipient_restriction_is_550_511(tmp_path):
    p = make_provider(str(tmp_path), sections=(
        "[domains]\n[[example.org]]\nrecipients = postmaster, info@example.org\n"))
    try:
        c = Customer(p.smtp_port)
        try:
            c.reply()
            c.cmd("EHLO client.test")
            c.cmd("MAIL FROM:<%s>" % SENDER)
            code, lines = c.cmd("RCPT TO:<random@example.org>")
            assert (code, status(lines)) == (550, "5.1.1")
            assert c.cmd("RCPT TO:<Postmaster@example.org>")[0] == 250
            assert c.cmd("RCPT TO:<info@example.org>")[0] == 250
            assert c.cmd("RCPT TO:<anyone@example.com>")[0] == 250      # other domain unrestricted
            assert c.cmd("DATA")[0] == 354
            assert send_data(c, MSG + b".\r\n")[0] == 250
        finally:
            c.close()
        [env] = envelope_of(p, "example.org")
        assert [r.address for r in env.recipients] == ["Postmaster@example.org", "info@example.org"]
    finally:
        stop_quickly(p)


def test_domain_only_in_domains_section_is_hosted(tmp_path):
    p = make_provider(str(tmp_path), sections="[domains]\n[[extra.test]]\nmax_messages = 5\n")
    try:
        assert send_mail(p.smtp_port, SENDER, ["x@extra.test"], MSG) == {}
        assert len(p.spooled("extra.test")) == 1
    finally:
        stop_quickly(p)


# -- limits ------------------------------------------------------------------------

def test_quota_max_messages_is_452_422(tmp_path):
    p = make_provider(str(tmp_path), sections="[domains]\n[[example.org]]\nmax_messages = 2\n")
    try:
        send_mail(p.smtp_port, SENDER, ["a@example.org"], MSG)
        send_mail(p.smtp_port, SENDER, ["b@example.org"], MSG)
        c = Customer(p.smtp_port)
        try:
            c.reply()
            c.cmd("EHLO client.test")
            c.cmd("MAIL FROM:<%s>" % SENDER)
            code, lines = c.cmd("RCPT TO:<c@example.org>")
            assert (code, lines[0]) == (replies.MAILBOX_FULL[0], replies.MAILBOX_FULL[1] % "example.org")
            assert c.cmd("RCPT TO:<c@example.com>")[0] == 250      # other domains unaffected
        finally:
            c.close()
        assert len(p.spooled("example.org")) == 2
    finally:
        stop_quickly(p)


def test_quota_max_bytes_is_452_422(tmp_path):
    p = make_provider(str(tmp_path), sections="[domains]\n[[example.org]]\nmax_bytes = 4K\n")
    try:
        c = Customer(p.smtp_port)
        try:
            c.reply()
            c.cmd("EHLO client.test")
            c.cmd("MAIL FROM:<%s> SIZE=5000" % SENDER)
            code, lines = c.cmd("RCPT TO:<a@example.org>")
            assert (code, status(lines)) == (452, "4.2.2")
            c.cmd("RSET")
            c.cmd("MAIL FROM:<%s> SIZE=1000" % SENDER)
            assert c.cmd("RCPT TO:<a@example.org>")[0] == 250
            c.cmd("DATA")
            # more than it declared, and more than the quota: checked again at the end of DATA
            code, lines = send_data(c, b"Subject: big\r\n\r\n" + b"x" * 4200 + b"\r\n.\r\n")
            assert (code, status(lines)) == (452, "4.2.2")
            assert p.spooled("example.org") == []
            c.cmd("MAIL FROM:<%s>" % SENDER)
            assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
            c.cmd("DATA")
            assert send_data(c, b"Subject: small\r\n\r\n" + b"x" * 3000 + b"\r\n.\r\n")[0] == 250
            # now the domain holds 3K of its 4K: a message of 1.5K waits
            c.cmd("MAIL FROM:<%s> SIZE=1500" % SENDER)
            code, lines = c.cmd("RCPT TO:<b@example.org>")
            assert (code, status(lines)) == (452, "4.2.2")
        finally:
            c.close()
    finally:
        stop_quickly(p)


def test_too_many_recipients_is_452_453(smtp, provider):
    smtp.cmd("MAIL FROM:<%s>" % SENDER)
    lines = b"".join(b"RCPT TO:<u%d@example.org>\r\n" % i for i in range(52))
    smtp.sock.sendall(lines)
    replies = [smtp.reply() for _ in range(52)]
    assert [c for c, _ in replies[:50]] == [250] * 50
    assert all(c == 452 and status(l) == "4.5.3" for c, l in replies[50:])
    assert smtp.cmd("DATA")[0] == 354
    assert send_data(smtp, MSG + b".\r\n")[0] == 250
    [env] = envelope_of(provider, "example.org")
    assert len(env.recipients) == 50


def test_declared_size_over_limit_is_552(smtp):
    code, lines = smtp.cmd("MAIL FROM:<%s> SIZE=%d" % (SENDER, 1024 * 1024 + 1))
    assert code == 552 and status(lines) == "5.3.4"
    assert smtp.cmd("MAIL FROM:<%s> SIZE=%d" % (SENDER, 1024 * 1024)) [0] == 250


@pytest.mark.parametrize("value,code", [("abc", 501), ("", 501), ("-5", 501), ("1e6", 501),
                                        ("9" * 30, 552), ("0", 250)],
                         ids=["word", "empty", "negative", "exponent", "absurd", "zero"])
def test_size_parameter_values(smtp, value, code):
    assert smtp.cmd("MAIL FROM:<%s> SIZE=%s" % (SENDER, value))[0] == code


def test_oversize_data_read_to_end_one_reply_session_continues(smtp, provider):
    smtp.cmd("MAIL FROM:<%s>" % SENDER)
    smtp.cmd("RCPT TO:<a@example.org>")
    assert smtp.cmd("DATA")[0] == 354
    line = b"y" * 998 + b"\r\n"
    smtp.sock.sendall(b"Subject: huge\r\n\r\n" + line * 1100 + b".\r\n")   # ~1.1 MB > 1M
    code, lines = smtp.reply()
    assert code == 552 and status(lines) == "5.3.4"
    # exactly one reply: the next command gets its own answer
    assert smtp.cmd("NOOP")[0] == 250
    assert provider.spooled("example.org") == []
    tmp = os.path.join(provider.spool_dir, "example.org", "tmp")
    assert os.listdir(tmp) == []
    # and a normal message still goes through on the same session
    smtp.cmd("MAIL FROM:<%s>" % SENDER)
    smtp.cmd("RCPT TO:<a@example.org>")
    smtp.cmd("DATA")
    assert send_data(smtp, MSG + b".\r\n")[0] == 250


# -- DATA ---------------------------------------------------------------------

def _transaction(c: Customer, rcpt: str = "a@example.org", mail_params: str = "") -> None:
    assert c.cmd("MAIL FROM:<%s>%s" % (SENDER, mail_params))[0] == 250
    assert c.cmd("RCPT TO:<%s>" % rcpt)[0] == 250
    assert c.cmd("DATA")[0] == 354


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r"],
                         ids=["LF.LF", "CRLF.LF", "LF.CRLF", "CR.CR", "CRLF.CR"])
def test_smtp_smuggling_does_not_end_data(smtp, provider, smuggle):
    _transaction(smtp)
    smuggled = b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
    body = b"Subject: smuggle\r\n\r\nfirst" + smuggle + smuggled + b"Subject: second\r\n\r\nx\r\n"
    code, lines = send_data(smtp, body + b".\r\n")
    assert code == 250
    assert smtp.cmd("NOOP")[0] == 250            # nothing else was queued up as replies
    assert provider.spooled("example.com") == []
    [data] = stored(provider, "example.org")
    assert b"MAIL FROM:<evil@evil.test>\r\n" in data
    # stored normalised: every CR and LF is part of a CRLF pair
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
    assert not data.endswith(b"\r\n.\r\n")


def test_bare_lf_message_is_stored_with_crlf(smtp, provider):
    _transaction(smtp)
    assert send_data(smtp, b"Subject: lf\n\nline one\nline two\n\r\n.\r\n")[0] == 250
    [data] = stored(provider, "example.org")
    assert data.endswith(b"Subject: lf\r\n\r\nline one\r\nline two\r\n\r\n")


@pytest.mark.parametrize("sent, kept", [(b"a\r\n.\nb\r\n", b"a\r\n.\r\nb\r\n"),
                                        (b"a\n.\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
                                        (b"a\r\n.\rb\r\n", b"a\r\n.\r\nb\r\n"),
                                        (b"a\n..x\r\n", b"a\r\n.x\r\n")],
                         ids=["CRLF.LF", "LF.CRLF", "CRLF.CR", "LF..x"])
def test_a_lone_dot_that_ends_nothing_is_kept(smtp, provider, sent, kept):
    # RFC 5321 4.5.2: the leading dot goes only when other characters follow it on the line
    _transaction(smtp)
    assert send_data(smtp, b"Subject: dot\r\n\r\n" + sent + b".\r\n")[0] == 250
    [data] = stored(provider, "example.org")
    assert data.endswith(b"Subject: dot\r\n\r\n" + kept)


def test_received_header_and_250_only_once_on_disk(smtp, provider):
    _transaction(smtp)
    code, lines = send_data(smtp, MSG + b".\r\n")
    assert code == 250
    # the reply names the id, and that file is already in place
    ids = provider.spooled("example.org")
    assert len(ids) == 1 and ids[0] in lines[0]
    path = os.path.join(provider.spool_dir, "example.org", ids[0])
    assert os.path.isfile(path)
    [data] = stored(provider, "example.org")
    assert data.startswith(b"Received: from client.test ([127.0.0.1])")
    header = data.split(b"Subject:")[0]
    assert b"by odmr.test" in header and b"id " + ids[0].encode() in header
    assert b"for <a@example.org>" in header
    assert data.endswith(MSG)


def test_long_lines_over_1000_are_accepted_and_stored(smtp, provider):
    _transaction(smtp)
    long_line = b"z" * 5000
    assert send_data(smtp, b"Subject: long\r\n\r\n" + long_line + b"\r\n.\r\n")[0] == 250
    [data] = stored(provider, "example.org")
    assert data.endswith(b"\r\n\r\n" + long_line + b"\r\n")


def test_dot_unstuffing_and_final_line_without_crlf(smtp, provider):
    _transaction(smtp)
    assert send_data(smtp, b"Subject: d\r\n\r\n..one\r\n...two\r\n. \r\nlast.\r\n.\r\n")[0] == 250
    [data] = stored(provider, "example.org")
    assert data.endswith(b"\r\n\r\n.one\r\n..two\r\n \r\nlast.\r\n")


def test_empty_message_is_accepted(smtp, provider):
    _transaction(smtp)
    assert send_data(smtp, b".\r\n")[0] == 250
    [data] = stored(provider, "example.org")
    assert data.startswith(b"Received: ")


def test_eight_bit_body_stored_byte_identical(smtp, provider):
    _transaction(smtp, mail_params=" BODY=8BITMIME")
    body = b"Subject: 8\r\n\r\n" + bytes(b for b in range(256) if b not in (10, 13)) + b"\r\n"
    assert send_data(smtp, body + b".\r\n")[0] == 250
    [data] = stored(provider, "example.org")
    assert data.endswith(body)
    [env] = envelope_of(provider, "example.org")
    assert env.body == "8BITMIME"


def test_message_split_per_domain_with_own_recipients(smtp, provider):
    smtp.cmd("MAIL FROM:<%s>" % SENDER)
    for rcpt in ("a@example.org", "b@example.com", "c@example.org", "a@example.org"):
        assert smtp.cmd("RCPT TO:<%s>" % rcpt)[0] == 250
    smtp.cmd("DATA")
    code, lines = send_data(smtp, MSG + b".\r\n")
    assert code == 250
    ids = provider.spooled("example.org") + provider.spooled("example.com")
    assert all(i in lines[0] for i in ids) and len(ids) == 2
    [org] = envelope_of(provider, "example.org")
    [com] = envelope_of(provider, "example.com")
    assert [r.address for r in org.recipients] == ["a@example.org", "c@example.org"]
    assert [r.address for r in com.recipients] == ["b@example.com"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["close", "timeout"])
def test_client_vanishing_mid_data_leaves_nothing(tmp_path, how):
    from helpers import Provider
    p = Provider(str(tmp_path), smtp_extra="idle_timeout = 1s")
    p.add_user("alice", ["example.org"])
    p.start()
    try:
        c = Customer(p.smtp_port)
        c.reply()
        for line in ("EHLO x.test", "MAIL FROM:<a@remote.test>", "RCPT TO:<u@example.org>", "DATA"):
            assert c.cmd(line)[0] in (250, 354)
        c.sock.sendall(b"Subject: partial\r\n\r\n" + b"y" * 100000 + b"\r\n")
        if how == "close":
            c.close()
        else:
            c.sock.settimeout(10)
            assert c.reply()[0] == 421
        tmp = os.path.join(p.spool_dir, "example.org", "tmp")
        deadline = time.monotonic() + 10
        while os.listdir(tmp) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(tmp) == []
        assert p.spooled("example.org") == []
        c.close()
    finally:
        p.stop()


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7], ids=lambda n: "cut-%d" % n)
def test_data_split_anywhere_across_segments(provider, cut):
    """The bulk DATA reader and the per-line reader hand over at any byte."""
    body = b"Subject: split\r\n\r\n..stuffed\r\nplain\r\n.\r\n"  # ends with the terminator
    wire_data = body
    c = Customer(provider.smtp_port)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.reply()
    for line in ("EHLO x.test", "MAIL FROM:<a@remote.test>", "RCPT TO:<u@example.org>", "DATA"):
        c.cmd(line)
    for start in range(0, len(wire_data), cut):
        c.sock.sendall(wire_data[start:start + cut])
        time.sleep(0.002)
    assert c.reply()[0] == 250
    c.close()
    (msg_id,) = provider.spooled("example.org")
    stored = provider.spool.load("example.org", msg_id).read_data()
    assert stored.endswith(b"Subject: split\r\n\r\n.stuffed\r\nplain\r\n")


# -- SMTPUTF8 -----------------------------------------------------------------

def test_utf8_recipient_needs_smtputf8(smtp, provider):
    smtp.cmd("MAIL FROM:<%s>" % SENDER)
    code, lines = smtp.cmd("RCPT TO:<jürgen@example.org>")
    assert code == 553 and status(lines) == "5.6.7"
    smtp.cmd("RSET")
    assert smtp.cmd("MAIL FROM:<%s> SMTPUTF8" % SENDER)[0] == 250
    assert smtp.cmd("RCPT TO:<jürgen@example.org>")[0] == 250
    smtp.cmd("DATA")
    assert send_data(smtp, "Subject: grüße\r\n\r\nhallo\r\n.\r\n".encode())[0] == 250
    [env] = envelope_of(provider, "example.org")
    assert env.smtputf8 and env.recipients[0].address == "jürgen@example.org"


def test_utf8_sender_needs_smtputf8(smtp):
    code, lines = smtp.cmd("MAIL FROM:<jürgen@remote.test>")
    assert (code, lines[0]) == replies.NON_ASCII_SENDER
    assert smtp.cmd("MAIL FROM:<jürgen@remote.test> SMTPUTF8")[0] == 250


def test_idn_recipient_domain_is_matched_as_a_label(tmp_path):
    p = Provider(str(tmp_path))
    p.add_user("zoe", ["xn--bcher-kva.test"])
    p.start()
    try:
        c = Customer(p.smtp_port)
        try:
            c.reply()
            c.cmd("EHLO client.test")
            c.cmd("MAIL FROM:<%s> SMTPUTF8" % SENDER)
            assert c.cmd("RCPT TO:<leser@bücher.test>")[0] == 250
            assert c.cmd("RCPT TO:<leser@xn--bcher-kva.test>")[0] == 250
            c.cmd("DATA")
            assert send_data(c, MSG + b".\r\n")[0] == 250
        finally:
            c.close()
        assert len(p.spooled("xn--bcher-kva.test")) == 1
    finally:
        stop_quickly(p)


def test_invalid_utf8_command_is_500(smtp):
    smtp.sock.sendall(b"MAIL FROM:<\xff\xfe@remote.test>\r\n")
    assert smtp.reply()[0] == 500
    assert smtp.cmd("NOOP")[0] == 250


# -- storage failure ------------------------------------------------------------

@pytest.fixture
def tiny_spool(tmp_path):
    """A provider whose spool is a 64 KiB tmpfs (skipped where mounting is not allowed)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(spool)],
                            capture_output=True, timeout=10)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % result.stderr.decode(errors="replace").strip())
    p = None
    try:
        p = make_provider(str(tmp_path))
        yield p
    finally:
        if p is not None:
            stop_quickly(p)
        subprocess.run(["umount", "-l", str(spool)], capture_output=True, timeout=10)


def test_full_disk_is_452_431_and_nothing_partial(tiny_spool):
    p = tiny_spool
    c = Customer(p.smtp_port)
    try:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<%s>" % SENDER)
        c.cmd("RCPT TO:<a@example.org>")
        c.cmd("RCPT TO:<b@example.com>")
        assert c.cmd("DATA")[0] == 354
        code, lines = send_data(c, b"Subject: big\r\n\r\n" + (b"w" * 998 + b"\r\n") * 200 + b".\r\n")
        assert (code, status(lines)) == (452, "4.3.1")
        assert c.cmd("NOOP")[0] == 250
        for domain in ("example.org", "example.com"):
            assert p.spooled(domain) == []
            assert os.listdir(os.path.join(p.spool_dir, domain, "tmp")) == []
        # a small message still fits afterwards
        c.cmd("MAIL FROM:<%s>" % SENDER)
        c.cmd("RCPT TO:<a@example.org>")
        c.cmd("DATA")
        assert send_data(c, MSG + b".\r\n")[0] == 250
    finally:
        c.close()
    assert len(p.spooled("example.org")) == 1


@pytest.mark.slow
def test_an_unusable_spool_is_451_430_not_a_full_disk(tmp_path):
    """452 4.3.1 says the disk is full (SPEC §5): a spool that refuses otherwise is a
    local error the administrator must repair."""
    p = make_provider(str(tmp_path))
    try:
        send_mail(p.smtp_port, SENDER, ["a@example.org"], MSG)
        tmp = os.path.join(p.spool_dir, "example.org", "tmp")
        os.rename(tmp, tmp + ".away")
        with open(tmp, "w") as fh:         # a file where the directory should be: ENOTDIR
            fh.write("x")
        c = Customer(p.smtp_port)
        try:
            c.reply()
            c.cmd("EHLO client.test")
            _transaction(c)
            code, lines = send_data(c, MSG + b".\r\n")
            assert (code, status(lines)) == (451, "4.3.0")
            assert c.cmd("NOOP")[0] == 250
        finally:
            c.close()
        assert len(p.spooled("example.org")) == 1
    finally:
        stop_quickly(p)


# -- the domainless postmaster (RFC 5321 §4.5.1) ------------------------------------

def _rcpt_postmaster(p, rcpt: str = "<postmaster>"):
    c = Customer(p.smtp_port)
    try:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<%s>" % SENDER)
        code, lines = c.cmd("RCPT TO:%s" % rcpt)
        if code == 250:
            assert c.cmd("DATA")[0] == 354
            assert send_data(c, MSG + b".\r\n")[0] == 250
        return code, lines
    finally:
        c.close()


def test_domainless_postmaster_goes_to_the_configured_mailbox(tmp_path):
    p = make_provider(str(tmp_path), smtp_extra="postmaster = hostmaster@Example.NET", sections=(
        "[domains]\n[[example.net]]\nrecipients = bob@example.net\n"))
    try:
        assert _rcpt_postmaster(p, "<PostMaster>")[0] == 250
        [env] = envelope_of(p, "example.net")
        assert [r.address for r in env.recipients] == ["hostmaster@example.net"]   # the domain as its A-label
        # postmaster@ a hosted domain is accepted even where recipients are restricted
        assert _rcpt_postmaster(p, "<postmaster@example.net>")[0] == 250
    finally:
        stop_quickly(p)


def test_domainless_postmaster_without_a_hosted_mailbox_waits_for_the_bounce_relay(tmp_path):
    """Out of the box (RFC 5321 §4.5.1 MUST): postmaster@hostname is not hosted, so the
    mail is kept in the outbound queue, addressed to it, for [queue] bounce_relay."""
    p = make_provider(str(tmp_path))          # hostname odmr.test is not a hosted domain
    try:
        code, lines = _rcpt_postmaster(p)
        assert (code, status(lines)) == (250, "2.1.5")
        [env] = envelope_of(p, ".outbound")
        assert [r.address for r in env.recipients] == ["postmaster@odmr.test"]
        assert env.sender == SENDER
    finally:
        stop_quickly(p)


def test_postmaster_setting_must_be_an_address(tmp_path):
    from helpers import write_config
    path = write_config(str(tmp_path), 1, 2, smtp_extra="postmaster = nobody at all")
    r = run_cli("-c", path, "check-config")
    assert r.returncode == 78 and b"smtp.postmaster" in r.stderr and b"not an address" in r.stderr


@pytest.mark.slow
def test_the_same_mailbox_twice_is_one_recipient(provider):
    """<dup@example.org> and <dup@EXAMPLE.ORG> are one mailbox: one RCPT to the customer.
    Local parts may be case-sensitive, so <Dup@example.org> stays a recipient of its own."""
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        assert s.sendmail(SENDER, ["dup@example.org", "dup@EXAMPLE.ORG", "dup@example.org",
                                   "Dup@example.org"], MSG) == {}
    [env] = envelope_of(provider, "example.org")
    assert [r.address for r in env.recipients] == ["dup@example.org", "Dup@example.org"]
    r = provider.run_cli("enqueue", "-f", SENDER, "x@example.org", "x@Example.Org", input=MSG)
    assert r.returncode == 0, r.stderr
    envs = envelope_of(provider, "example.org")
    assert sorted(len(e.recipients) for e in envs) == [1, 2]
