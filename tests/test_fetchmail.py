"""The real fetchmail (protocol ODMR) collecting from the real provider into Postfix's smtp-sink.

fetchmail is the customer most providers will meet, and it is peculiar: CRAM-MD5
only, `ATRN d1,d2`, then a blind byte copy to its `smtphost`. These tests run the
real binary against a provider on loopback ports and let it relay to the real
`smtp-sink`, then compare what the sink stored with what was sent, byte for byte
(after the sink's own headers and the Received header odmrd adds at intake).

fetchmail's exit code does not tell whether delivery worked (INTEROP.md), so every
test also looks at the sink's files and at the spool.
"""
from __future__ import annotations

import smtplib
from typing import Dict, List

import pytest

from helpers import (Dumped, FETCHMAIL, Provider, SMTP_SINK, Sink, as_stored, assert_same, run_fetchmail,
                     send_mail, transcript)


pytestmark = [
    pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail is not installed (Debian package fetchmail)"),
    pytest.mark.skipif(SMTP_SINK is None, reason="smtp-sink is not installed (Debian package postfix)"),
    pytest.mark.slow,           # a real fetchmail and smtp-sink per test
]


# fetchmail exit codes observed on this machine (INTEROP.md)
FM_OK = 0
FM_REFUSED = 4          # after 450
FM_AUTHFAIL = 128       # after 535


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.cleanup()


def message(subject: str, body: bytes, sender: str = "sender@outside.test", to: str = "x@example.org",
            extra: bytes = b"") -> bytes:
    return (b"From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-ID: <%s@outside.test>\r\n%s\r\n"
            % (sender.encode(), to.encode(), subject.encode(), subject.encode(), extra)) + body


def by_subject(dumps: List[Dumped]) -> Dict[str, Dumped]:
    result = {}
    for d in dumps:
        for line in d.content.split(b"\n"):
            if line.startswith(b"Subject: "):
                result[line[9:].decode()] = d
                break
    return result


def check_trace(d: Dumped, rcpts: List[str]) -> None:
    """odmrd's own Received header is the first line of what it relays."""
    assert d.odmrd_received.startswith(b"Received: from "), d.raw[:600]
    assert b"by odmr.test (odmrd) with ESMTP id " in d.odmrd_received
    if len(rcpts) == 1:
        assert b"for <%s>" % rcpts[0].encode() in d.odmrd_received


# -- the happy paths ----------------------------------------------------------------

EIGHT_BIT = ("Grüße aus Köln — ½ € ✓\r\n".encode("utf-8") + b"latin-1 bytes: \xe9\xe8\xff\xa0\r\n"
             + bytes(range(0x80, 0x100)) + b"\r\n")
DOTS = (b".\r\n..\r\n...\r\n.leading dot\r\n..two leading dots\r\n"
        b"line\r\n.\r\nafter a lone dot\r\n. space\r\n.")       # last line: a dot, no CRLF


def test_several_messages_for_two_domains(provider, sink, tmp_path):
    sent = {
        "plain-1": ("a@example.org", message("plain-1", b"first message\r\n", to="a@example.org"), []),
        "eightbit": ("b@example.org", message("eightbit", EIGHT_BIT, to="b@example.org",
                                              extra=b"Content-Type: text/plain; charset=utf-8\r\n"
                                                    b"Content-Transfer-Encoding: 8bit\r\n"),
                     ["BODY=8BITMIME"]),
        "dots": ("a@example.org", message("dots", DOTS, to="a@example.org"), []),
        "com-1": ("info@example.com", message("com-1", b"for the other domain\r\n" * 40,
                                              to="info@example.com"), []),
        "com-2": ("sales@example.com", message("com-2", b"no final newline", to="sales@example.com"), []),
    }
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        for subject, (rcpt, data, options) in sent.items():
            assert s.sendmail("sender@outside.test", [rcpt], data, mail_options=options) == {}
    assert len(provider.spooled("example.org")) == 3
    assert len(provider.spooled("example.com")) == 2

    result = run_fetchmail(str(tmp_path), provider.odmr_port, sink.port)
    assert result.returncode == 0, transcript(result)
    assert "ATRN example.org,example.com" in transcript(result)

    got = by_subject(sink.messages())
    assert sorted(got) == sorted(sent)
    for subject, (rcpt, data, options) in sent.items():
        d = got[subject]
        assert_same(d.content, as_stored(data), subject)
        assert d.rcpt_args == ["<%s>" % rcpt]
        assert d.mail_args.split()[0] == "<sender@outside.test>"
        check_trace(d, [rcpt])
    # the sink offers 8BITMIME, so the body type declared at intake travels on
    assert "BODY=8BITMIME" in got["eightbit"].mail_args.split()
    assert "BODY=8BITMIME" not in got["plain-1"].mail_args.split()
    assert provider.spooled("example.org") == []
    assert provider.spooled("example.com") == []


def test_multi_recipient_message_split_per_domain(provider, sink, tmp_path):
    data = message("multi", b"one message, three domains\r\n.and a dot line\r\n", to="undisclosed")
    rcpts = ["a@example.org", "b@example.org", "c@example.com", "d@example.net"]
    assert send_mail(provider.smtp_port, "sender@outside.test", rcpts, data) == {}

    result = run_fetchmail(str(tmp_path), provider.odmr_port, sink.port)
    assert result.returncode == 0, transcript(result)

    dumps = sink.messages()
    assert sorted(tuple(d.rcpt_args) for d in dumps) == [
        ("<a@example.org>", "<b@example.org>"), ("<c@example.com>",)]
    for d in dumps:
        assert_same(d.content, as_stored(data))
        assert b"(odmrd)" in d.odmrd_received
    assert provider.spooled("example.org") == [] and provider.spooled("example.com") == []
    # bob's copy is untouched by alice's run
    assert len(provider.spooled("example.net")) == 1


def test_message_over_one_megabyte(tmp_path, sink):
    p = Provider(str(tmp_path))
    with open(p.config) as fh:
        text = fh.read()
    assert "max_message_size = 1M" in text       # write_config's default this test raises
    with open(p.config, "w") as fh:
        fh.write(text.replace("max_message_size = 1M", "max_message_size = 8M"))
    p.add_user("alice", ["example.org", "example.com"])
    p.start()
    try:
        lines = []
        for i in range(50000):
            lines.append(b"%06d %s" % (i, (b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36:] * 2)[:60]))
            if i % 997 == 0:
                lines.append(b"." + b"dotted %d" % i)
            if i % 5003 == 0:
                lines.append(b"\xc3\xa9" * 1500)           # a 3,000-octet line, 8-bit
        body = b"\r\n".join(lines) + b"\r\n"
        data = message("big", body, to="big@example.org")
        assert len(data) > 2 * 1024 * 1024
        assert send_mail(p.smtp_port, "sender@outside.test", ["big@example.org"], data) == {}

        result = run_fetchmail(str(tmp_path), p.odmr_port, sink.port)
        assert result.returncode == 0, transcript(result)
        dumps = sink.messages()
        assert len(dumps) == 1
        assert_same(dumps[0].content, as_stored(data))
        assert p.spooled("example.org") == []
    finally:
        p.stop()


# -- refusals: nothing is sent, nothing is lost ------------------------------------------

def test_wrong_password_keeps_mail(provider, sink, tmp_path):
    send_mail(provider.smtp_port, "sender@outside.test", ["a@example.org"], message("kept", b"x\r\n"))
    result = run_fetchmail(str(tmp_path), provider.odmr_port, sink.port, password="not-the-password")
    assert result.returncode == FM_AUTHFAIL, transcript(result)
    assert "535" in transcript(result)
    assert "ODMR> ATRN" not in transcript(result)
    assert sink.messages() == []
    assert len(provider.spooled("example.org")) == 1


def test_no_mail_waiting(provider, sink, tmp_path):
    # mail for bob's domain must not count as mail for alice
    send_mail(provider.smtp_port, "sender@outside.test", ["x@example.net"], message("bobs", b"x\r\n"))
    result = run_fetchmail(str(tmp_path), provider.odmr_port, sink.port)
    assert result.returncode == FM_OK, transcript(result)
    assert "453" in transcript(result)
    assert sink.messages() == []
    assert len(provider.spooled("example.net")) == 1


def test_domain_not_belonging_to_account(provider, sink, tmp_path):
    send_mail(provider.smtp_port, "sender@outside.test", ["a@example.org"], message("mine", b"x\r\n"))
    send_mail(provider.smtp_port, "sender@outside.test", ["a@example.net"], message("bobs", b"x\r\n"))
    result = run_fetchmail(str(tmp_path), provider.odmr_port, sink.port, domains="example.org,example.net")
    assert result.returncode == FM_REFUSED, transcript(result)
    assert "450" in transcript(result)
    assert sink.messages() == []
    assert len(provider.spooled("example.org")) == 1
    assert len(provider.spooled("example.net")) == 1


# -- the local server's per-recipient answers travel back through fetchmail ----------------

def test_soft_rejection_by_local_server_keeps_mail_for_next_run(provider, tmp_path):
    data = message("retry", b"try again later\r\n", to="a@example.org")
    send_mail(provider.smtp_port, "sender@outside.test", ["a@example.org"], data)
    refusing = Sink("-r", "RCPT")
    try:
        result = run_fetchmail(str(tmp_path), provider.odmr_port, refusing.port)
        assert result.returncode == FM_OK, transcript(result)
        assert refusing.messages() == []
    finally:
        refusing.cleanup()
    ids = provider.spooled("example.org")
    assert len(ids) == 1
    state = provider.spool.load("example.org", ids[0]).state
    assert state.attempts == 1 and state.last_error.startswith("450")

    accepting = Sink()
    try:
        result = run_fetchmail(str(tmp_path), provider.odmr_port, accepting.port)
        assert result.returncode == FM_OK, transcript(result)
        dumps = accepting.messages()
    finally:
        accepting.cleanup()
    assert [d.content for d in dumps] == [as_stored(data)]
    assert provider.spooled("example.org") == []


def test_hard_rejection_by_local_server_bounces_to_sender(provider, tmp_path):
    # the sender is bob's, so the DSN lands in bob's spool where it can be inspected
    data = message("doomed", b"no such user\r\n", sender="writer@example.net", to="nobody@example.org")
    send_mail(provider.smtp_port, "writer@example.net", ["nobody@example.org"], data)
    refusing = Sink("-f", "RCPT")
    try:
        result = run_fetchmail(str(tmp_path), provider.odmr_port, refusing.port)
        assert result.returncode == FM_OK, transcript(result)
        assert refusing.messages() == []
    finally:
        refusing.cleanup()
    assert provider.spooled("example.org") == []
    bounces = [provider.spool.load("example.net", i) for i in provider.spooled("example.net")]
    assert len(bounces) == 1
    assert bounces[0].envelope.sender == ""
    assert [r.address for r in bounces[0].envelope.recipients] == ["writer@example.net"]
    report = bounces[0].read_data()
    assert b"multipart/report" in report and b"nobody@example.org" in report
