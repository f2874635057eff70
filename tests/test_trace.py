"""Trace headers cannot be forged (SPEC §5, RFC 5321 §4.1.4 and §4.4).

The EHLO/HELO argument must be a domain or an address literal on the intake
port, the ODMR port and the customer's own server (`fetch --maildir`), and
every Received: header odmrd writes parses, with the email package, into
exactly the from / by / with / id / for / date values it should hold.
"""
from __future__ import annotations

import email
import email.policy
import email.utils
import os
import re
import smtplib
from typing import List

import pytest

from helpers import (Customer, Peer, Provider, err, reply_line, reuse_provider, run_fetch, scripted_args,
                     stop_quickly, stored)
from odmr import replies

SENDER = "sender@remote.test"
MSG = b"Subject: trace\r\n\r\nhello\r\n"

LONGEST = ".".join(["a" * 63] * 4)                      # 255 octets: the RFC 5321 limit
BAD_NAMES = {
    "empty": "",
    "space": "client test",
    "semicolon": "client.test;",
    "date": "client.test; Mon, 1 Jan 2024 00:00:00 +0000",
    "by-clause": "evil.test by odmr.test",
    "for-clause": "x for <victim@example.org>",
    "with-id": "x with ESMTP id 1234",
    "not-a-literal": "[not.a.literal]",
    "literal-and-text": "[127.0.0.1] (forged)",
    "bad-ipv4": "[999.1.1.1]",
    "ipv4-leading-zero": "[127.0.0.01]",
    "ipv6-without-tag": "[::1]",
    "ipv6-zone": "[IPv6:fe80::1%eth0]",
    "ipv4-in-ipv6-tag": "[IPv6:127.0.0.1]",
    "general-literal": "[x-tag:content]",
    "unclosed-literal": "[127.0.0.1",
    "parentheses": "(evil.test)",
    "parenthesis-in-name": "host(evil)",
    "quoted": '"client.test"',
    "at-sign": "user@client.test",
    "comma": "a.test,b.test",
    "non-ascii": "m\u00fcnchen.de",
    "line-separator": "host\u2028Received: from forged",
    "next-line": "host\u0085x",
    "delete": "host\x7f",
    "tab": "client\ttest",
    "underscore": "my_host.test",
    "leading-hyphen": "-host.test",
    "trailing-hyphen": "host-.test",
    "empty-label": "a..test",
    "only-a-dot": ".",
    "label-of-64": "a" * 64 + ".test",
    "overlong": LONGEST + "a",
}
GOOD_NAMES = ["client.test", "localhost", "Mail.Example.COM", "mail.example.com.", "xn--mnchen-3ya.de",
              "[127.0.0.1]", "[IPv6:::1]", "[ipv6:2001:db8::1]", "[IPv6:::ffff:192.0.2.1]", "1st.test",
              LONGEST]


@pytest.fixture
def provider(shared_provider):
    yield from reuse_provider(shared_provider)


def greeted(port: int) -> Customer:
    c = Customer(port)
    assert c.reply()[0] == 220
    return c


def send_raw(c: Customer, line: str):
    c.sock.sendall(line.encode("utf-8") + b"\r\n")
    return c.reply()


def parse_received(value: str) -> dict:
    """The parts of an odmrd Received: field; fails unless it has exactly that shape."""
    text = " ".join(value.split())
    assert text.count(";") == 1, text
    clauses, date = text.split(";")
    parsed = email.utils.parsedate_to_datetime(date.strip())
    assert parsed is not None and parsed.tzinfo is not None
    m = re.fullmatch(r"(?:from (?P<from>\S+)(?: \((?P<tcp>\[[^\]\s]+\])\))? )?by (?P<by>\S+) "
                     r"\((?P<comment>odmrd[^)]*)\)(?: with (?P<with>\S+))? id (?P<id>\S+)"
                     r"(?: for <(?P<for>[^<>\s]+)>)?", clauses.strip())
    assert m, text
    return m.groupdict()


def received_of(data: bytes) -> List[dict]:
    message = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    return [parse_received(str(v)) for v in message.get_all("Received", [])]


# -- the EHLO/HELO argument ------------------------------------------------------------

@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_bad_ehlo_and_helo_are_501_at_intake(provider, name):
    c = greeted(provider.smtp_port)
    try:
        for verb in ("EHLO", "HELO"):
            code, lines = send_raw(c, ("%s %s" % (verb, name)).rstrip(" "))
            assert (code, lines[0]) == (replies.BAD_HELO_NAME[0], replies.BAD_HELO_NAME[1] % verb), lines
        assert c.cmd("MAIL FROM:<%s>" % SENDER)[0] == 503     # no EHLO was recorded
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    finally:
        c.close()


@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_bad_ehlo_is_501_on_the_odmr_port(provider, name):
    c = greeted(provider.odmr_port)
    try:
        code, lines = send_raw(c, ("EHLO %s" % name).rstrip(" "))
        assert (code, lines[0]) == (replies.BAD_HELO_NAME[0], replies.BAD_HELO_NAME[1] % "EHLO"), lines
        assert c.cmd("AUTH CRAM-MD5") == (replies.NEED_EHLO[0], [replies.NEED_EHLO[1]])  # still no EHLO
        assert c.cmd("HELO client.test") == (replies.USE_EHLO[0], [replies.USE_EHLO[1]])
        assert c.cmd("EHLO customer.test")[0] == 250
    finally:
        c.close()


def test_control_character_in_ehlo_is_501(provider):
    for port in (provider.smtp_port, provider.odmr_port):
        c = greeted(port)
        try:
            c.sock.sendall(b"EHLO host\x01.test\r\n")
            assert c.reply()[0] == 501
            c.sock.sendall(b"EHLO host\x1b[0m\r\n")
            assert c.reply()[0] == 501
            assert c.cmd("NOOP")[0] == 250
        finally:
            c.close()


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_are_accepted_and_fill_the_from_slot(provider, name):
    c = greeted(provider.odmr_port)
    try:
        assert c.cmd("EHLO %s" % name)[0] == 250
    finally:
        c.close()
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        assert s.ehlo(name)[0] == 250
        assert s.sendmail(SENDER, ["rcpt@example.org"], MSG) == {}
    [data] = stored(provider, "example.org")
    [msg_id] = provider.spooled("example.org")
    [fields] = received_of(data)
    assert fields == {"from": name, "tcp": "[127.0.0.1]", "by": "odmr.test", "comment": "odmrd",
                      "with": "ESMTP", "id": msg_id, "for": "rcpt@example.org"}
    assert data.endswith(MSG)


# -- the other slots ------------------------------------------------------------------------

@pytest.mark.parametrize("rcpts,expected_for", [
    (['"john smith"@example.org'], None),
    (['"a b from evil.test by odmr.test"@example.org'], None),
    (["jos\u00e9@example.org"], "jos\u00e9@example.org"),
    (["one@example.org", "two@example.org"], None),
], ids=["quoted-space", "quoted-trace-text", "non-ascii", "two-recipients"])
def test_for_slot_holds_only_a_plain_single_address(provider, rcpts, expected_for):
    utf8 = not all(r.isascii() for r in rcpts)
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail(SENDER, ["SMTPUTF8"] if utf8 else [])[0] == 250
        for r in rcpts:
            assert s.docmd("RCPT", "TO:<%s>" % r)[0] == 250
        assert s.docmd("DATA")[0] == 354
        s.send(MSG + b".\r\n")
        assert s.getreply()[0] == 250
    [data] = stored(provider, "example.org")
    [fields] = received_of(data)
    assert fields["for"] == expected_for
    assert fields["from"] == "client.test" and fields["with"] == ("UTF8SMTP" if utf8 else "ESMTP")


@pytest.fixture(scope="module")
def permissive(tmp_path_factory):
    p = Provider(str(tmp_path_factory.mktemp("permissive")), smtp_extra="allow_routing_local_parts = yes")
    p.add_user("alice", ["example.org"])
    p.start()
    yield p
    stop_quickly(p)


@pytest.mark.parametrize("rcpt", ['"x;y"@example.org', '"a (by evil.test) b"@example.org',
                                  '"for v@evil.test; Mon, 1 Jan 2024"@example.org'])
def test_recipient_with_trace_syntax_never_breaks_the_header(permissive, rcpt):
    """Quoted local parts may hold ';' and '(' where an administrator allows them."""
    before = set(permissive.spooled("example.org"))
    with smtplib.SMTP("127.0.0.1", permissive.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail(SENDER)
        assert s.docmd("RCPT", "TO:<%s>" % rcpt)[0] == 250
        assert s.docmd("DATA")[0] == 354
        s.send(MSG + b".\r\n")
        assert s.getreply()[0] == 250
    [new] = set(permissive.spooled("example.org")) - before
    [fields] = received_of(permissive.spool.load("example.org", new).read_data())
    assert fields["for"] is None and fields["from"] == "client.test" and fields["id"] == new


@pytest.mark.slow
def test_enqueue_received_header(provider):
    for rcpt, expected_for in (("plain@example.org", "plain@example.org"), ('"a b"@example.org', None)):
        r = provider.run_cli("enqueue", "-f", SENDER, rcpt, input=MSG)
        assert r.returncode == 0, r.stderr
        msg_id = r.stdout.split()[0].decode()
        [fields] = received_of(provider.spool.load("example.org", msg_id).read_data())
        assert fields["from"] is None and fields["by"] == "odmr.test" and fields["id"] == msg_id
        assert fields["comment"].startswith("odmrd enqueue") and fields["for"] == expected_for


# -- the customer's side: `odmrd fetch --maildir` judges the provider's EHLO ---------------

def _reversed_with_bad_names(results: list):
    def script(peer: Peer) -> None:
        assert peer.line().startswith(b"220 ")
        for name in ("odmr.test; by forged.test", "[not.literal]", "m\u00fcnchen.de", "a b"):
            peer.send(("EHLO %s\r\n" % name).encode("utf-8"))
            results.append((name, peer.reply()[0][:3]))
        peer.send("HELO odmr.test (forged)\r\n")
        results.append(("HELO", peer.reply()[0][:3]))
        peer.send("EHLO provider.test\r\n")
        peer.reply()
        for rcpt in ("x@example.org", '"john smith"@example.org'):
            peer.send("MAIL FROM:<a@outside.test>\r\nRCPT TO:<%s>\r\nDATA\r\n" % rcpt)
            for _ in range(3):
                peer.line()
            peer.send("Subject: reversed\r\n\r\nbody\r\n.\r\n")
            results.append(("DATA", peer.line()[:3]))
        peer.send("QUIT\r\n")
        peer.line()
    return script


@pytest.mark.slow
def test_fetch_maildir_refuses_a_bad_provider_ehlo(scripted, tmp_path):
    results: list = []
    s = scripted(atrn_reply=reply_line(replies.ATRN_OK), after_250=_reversed_with_bad_names(results))
    maildir = tmp_path / "md"
    result = run_fetch(*scripted_args(s, "--maildir", str(maildir)))
    assert result.returncode == 0, err(result) + repr(s.errors)
    assert [code for _, code in results] == [b"501"] * 5 + [b"250", b"250"], results
    fors = []
    for name in os.listdir(maildir / "new"):
        raw = (maildir / "new" / name).read_bytes().replace(b"\n", b"\r\n")
        [fields] = received_of(raw)
        assert fields["from"] == "provider.test" and fields["tcp"] == "[127.0.0.1]"
        fors.append(fields["for"])
    assert sorted(fors, key=str) == sorted(["x@example.org", None], key=str)


# -- only SP separates: Unicode line and space separators are no whitespace ---------

UNICODE_SPACES = ["\u2028", "\u2029", "\u0085", "\u00a0", "\u3000", "\u205f"]


@pytest.mark.parametrize("space", UNICODE_SPACES, ids=lambda s: "U+%04X" % ord(s))
def test_a_unicode_space_around_the_ehlo_name_is_501(provider, space):
    for port, verbs in ((provider.smtp_port, ("EHLO", "HELO")), (provider.odmr_port, ("EHLO",))):
        c = greeted(port)
        try:
            for verb in verbs:
                for name in ("x.test" + space, space + "x.test", "x" + space + ".test"):
                    assert send_raw(c, "%s %s" % (verb, name))[0] == 501, (port, verb, name)
        finally:
            c.close()


@pytest.mark.parametrize("space", UNICODE_SPACES, ids=lambda s: "U+%04X" % ord(s))
def test_a_unicode_space_in_mail_and_rcpt_parameters_is_501(provider, space):
    c = greeted(provider.smtp_port)
    try:
        assert c.cmd("EHLO client.test")[0] == 250
        assert send_raw(c, "MAIL FROM:<%s> SMTPUTF8 ENVID=x%sy" % (SENDER, space))[0] in (501, 555)
        assert send_raw(c, "MAIL FROM:<%s>%s" % (SENDER, space))[0] == 501
        assert c.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
        assert send_raw(c, "RCPT TO:<user@example.org>%s" % space)[0] == 501
        assert send_raw(c, "RCPT TO:<user@example.org> NOTIFY=NEVER%sORCPT=rfc822;a@b.test"
                        % space)[0] == 501
        assert c.cmd("RCPT TO:<user@example.org> NOTIFY=NEVER ORCPT=rfc822;a@b.test")[0] == 250
    finally:
        c.close()
