"""`odmrd fetch`, the customer client (SPEC section 6), run as a real subprocess.

Against odmrd's own provider: relay into Postfix's smtp-sink (compared byte
for byte), Maildir and mbox delivery. Against scripted providers (a small
socket server in this file, with real TLS where needed): every ATRN reply
code, missing ATRN/STARTTLS/mechanisms, certificate failures, drops, garbage.
"""
from __future__ import annotations

import base64
import mailbox
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from typing import List

import pytest
from hypothesis import given, settings, strategies as st

from helpers import (FETCH, PASSWORD, Peer, Provider, ROOT, SMTP_SINK, Scripted, Sink, as_stored,
                     ScriptedMTA, assert_same, deliver_one, err, free_port, one_line_error, quit_,
                     reply_line, run_fetch, scripted_args, send_mail, which)

from odmr import replies
from odmr.exits import EX_NOINPUT, EX_NOPERM, EX_OK, EX_PROTOCOL, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE
from odmr.fetch_mailbox import quote_from

needs_sink = pytest.mark.skipif(SMTP_SINK is None, reason="smtp-sink (postfix) is not installed")
needs_openssl = pytest.mark.skipif(which("openssl") is None, reason="openssl is not installed")


def message(subject: str, body: bytes) -> bytes:
    return (b"From: <sender@outside.test>\r\nTo: <x@example.org>\r\nSubject: %s\r\n\r\n"
            % subject.encode()) + body


TRICKY = (b".\r\n..\r\n.leading dot\r\nFrom the start\r\n>From quoted\r\n>>From twice\r\n"
          b"Fromage\r\n" + "Grüße ✓\r\n".encode("utf-8") + b"x" * 3000 + b"\r\nlast line\r\n")


def provider_args(provider, *more: str) -> List[str]:
    return ["--server", "127.0.0.1:%d" % provider.odmr_port, "--user", "alice", "--tls", "none"] + list(more)


# -- against the real provider ---------------------------------------------------

@pytest.mark.slow
@needs_sink
def test_relay_into_smtp_sink_byte_for_byte(provider):
    sent = {"one": message("one", b"hello\r\n"), "two": message("two", TRICKY),
            "three": message("three", b"no final newline")}
    for subject, data in sent.items():
        send_mail(provider.smtp_port, "sender@outside.test", ["x@example.org"], data)
    send_mail(provider.smtp_port, "sender@outside.test", ["y@example.com"], message("other", b"x\r\n"))
    sink = Sink()
    try:
        result = run_fetch(*provider_args(provider, "--domain", "example.org",
                                          "--relay", "127.0.0.1:%d" % sink.port))
        assert result.returncode == EX_OK, err(result)
        dumps = sink.messages()
    finally:
        sink.cleanup()
    assert provider.spooled("example.org") == []
    assert len(provider.spooled("example.com")) == 1        # not asked for: still waiting
    got = {}
    for d in dumps:
        subject = re.search(rb"^Subject: (\w+)$", d.content, re.M).group(1).decode()
        got[subject] = d
        assert d.odmrd_received.startswith(b"Received: from ")
        assert d.rcpt_args == ["<x@example.org>"]
    assert sorted(got) == sorted(sent)
    for subject, data in sent.items():
        assert_same(got[subject].content, as_stored(data), subject)


@pytest.mark.slow
@needs_sink
@pytest.mark.parametrize("option, code", [("-r", EX_TEMPFAIL), ("-f", EX_OK)], ids=["4xx", "5xx"])
def test_relay_exit_code_reflects_the_local_servers_refusals(provider, option, code):
    """A 4xx from the local server leaves the mail at the provider: 'try again later' (75),
    even though the session itself ended cleanly. A 5xx is final (the provider bounces): 0."""
    send_mail(provider.smtp_port, "sender@outside.test", ["x@example.org"], message("r", b"x\r\n"))
    sink = Sink(option, "RCPT")
    try:
        result = run_fetch(*provider_args(provider, "--domain", "example.org",
                                          "--relay", "127.0.0.1:%d" % sink.port))
    finally:
        sink.cleanup()
    assert result.returncode == code, err(result)
    # one line counting recipients, not reply lines (SMTP replies are not shown without -v)
    assert err(result) == "odmrd fetch: no messages delivered to 127.0.0.1:%d (1 recipient %s)\n" % (
        sink.port, "deferred: stays at the provider" if code else "refused: returned to its sender")
    left = provider.spooled("example.org")
    assert len(left) == (1 if code else 0)


@pytest.mark.slow
def test_maildir_delivery(provider, tmp_path):
    sent = [message("m%d" % i, TRICKY if i == 1 else b"body %d\r\n" % i) for i in range(3)]
    for data in sent:
        send_mail(provider.smtp_port, "sender@outside.test", ["x@example.org"], data)
    maildir = tmp_path / "deep" / "Maildir"
    result = run_fetch(*provider_args(provider, "--maildir", str(maildir)))
    assert result.returncode == EX_OK, err(result)
    assert provider.spooled("example.org") == []
    assert sorted(os.listdir(maildir)) == ["cur", "new", "tmp"]
    assert os.listdir(maildir / "tmp") == []
    names = os.listdir(maildir / "new")
    assert len(names) == 3 and len(set(names)) == 3
    stored = []
    for name in names:
        raw = (maildir / "new" / name).read_bytes()
        assert b"\r" not in raw
        assert raw.startswith(b"Return-Path: <sender@outside.test>\nReceived: from odmr.test ([127.0.0.1])\n")
        # ours, then the provider's Received, then the message itself
        head, _, rest = raw.partition(b"\nReceived: from ")
        stored.append(rest[rest.index(b"\nFrom: ") + 1:])
        assert os.stat(maildir / "new" / name).st_mode & 0o077 == 0
    assert sorted(stored) == sorted(as_stored(m) for m in sent)


@pytest.mark.slow
def test_mbox_delivery_appends_with_mboxrd_quoting(provider, tmp_path):
    box = tmp_path / "mbox"
    send_mail(provider.smtp_port, "sender@outside.test", ["x@example.org"], message("first", TRICKY))
    result = run_fetch(*provider_args(provider, "--mbox", str(box)))
    assert result.returncode == EX_OK, err(result)
    send_mail(provider.smtp_port, "", ["x@example.com"], message("second", b"From here\r\nbye"))
    result = run_fetch(*provider_args(provider, "--mbox", str(box), "--mechanism", "CRAM-MD5"))
    assert result.returncode == EX_OK, err(result)
    raw = box.read_bytes()
    assert raw.startswith(b"From sender@outside.test ")
    assert b"\nFrom MAILER-DAEMON " in raw
    assert b"\r" not in raw and raw.endswith(b"\n\n")
    assert not os.path.exists(str(box) + ".lock")
    assert b"\n>From the start\n>>From quoted\n>>>From twice\nFromage\n" in raw
    assert b"\n>From here\nbye\n\n" in raw
    parsed = [m for m in mailbox.mbox(str(box))]
    assert [m["Subject"] for m in parsed] == ["first", "second"]
    assert parsed[0]["Return-Path"] == "<sender@outside.test>"


@pytest.mark.slow
def test_storage_failure_is_452_and_mail_stays(provider, tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    send_mail(provider.smtp_port, "sender@outside.test", ["x@example.org"], message("kept", b"x\r\n"))
    result = run_fetch(*provider_args(provider, "--mbox", str(tmp_path / "afile" / "mbox")))
    assert result.returncode == EX_TEMPFAIL, err(result)
    assert len(provider.spooled("example.org")) == 1
    assert "not stored" in err(result) or "could not be stored" in err(result)


@pytest.mark.slow
def test_no_mail_is_0(provider, tmp_path):
    result = run_fetch(*provider_args(provider, "--maildir", str(tmp_path / "md")))
    assert result.returncode == EX_OK, err(result)
    assert err(result) == "odmrd fetch: no mail waiting\n"       # the run's one summary line


@pytest.mark.slow
def test_wrong_password_is_77(provider, tmp_path):
    send_mail(provider.smtp_port, "s@outside.test", ["x@example.org"], message("kept", b"x\r\n"))
    result = run_fetch(*provider_args(provider, "--maildir", str(tmp_path / "md")), password="wrong")
    assert result.returncode == EX_NOPERM, err(result)
    one_line_error(result)
    assert len(provider.spooled("example.org")) == 1


@pytest.mark.slow
def test_foreign_domain_is_77(provider, tmp_path):
    result = run_fetch(*provider_args(provider, "--domain", "example.net", "--maildir", str(tmp_path / "md")))
    assert result.returncode == EX_NOPERM, err(result)
    assert "450" in err(result)


@pytest.mark.slow
def test_config_file_fetch_section(provider, tmp_path):
    send_mail(provider.smtp_port, "s@outside.test", ["x@example.org"], message("cfg", b"x\r\n"))
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    conf = tmp_path / "customer.conf"
    conf.write_text("[fetch]\nserver = 127.0.0.1:%d\nuser = alice\npassword_file = pw\n"
                    "domains = example.org,\ntls = none\nmaildir = Mail\n" % provider.odmr_port)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "odmrd.py"), "-c", str(conf), "fetch"],
                            capture_output=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "ODMR_PASSWORD"})
    assert result.returncode == EX_OK, err(result)
    assert len(os.listdir(tmp_path / "Mail" / "new")) == 1      # relative to the config file
    # a flag overrides the file: the wrong user is refused
    result = subprocess.run([sys.executable, os.path.join(ROOT, "odmrd.py"), "-c", str(conf), "fetch",
                             "--user", "bob"], capture_output=True, timeout=60)
    assert result.returncode == EX_NOPERM, err(result)


# -- a scripted provider -----------------------------------------------------------


@pytest.mark.parametrize("reply, code", [
    (reply_line(replies.ATRN_REFUSED), EX_NOPERM),
    (reply_line(replies.ATRN_BUSY), EX_TEMPFAIL),
    (reply_line(replies.NO_MAIL), EX_OK),
    (reply_line(replies.NOT_IMPLEMENTED), EX_UNAVAILABLE),
    (reply_line(replies.AUTH_REQUIRED), EX_NOPERM),
    ("421 4.3.2 shutting down", EX_TEMPFAIL),
], ids=lambda v: str(v)[:3])
def test_atrn_reply_codes(scripted, tmp_path, reply, code):
    s = scripted(atrn_reply=reply)
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")))
    assert result.returncode == code, err(result)
    assert b"ATRN example.org,example.com" in s.commands()       # strict: commas, no spaces
    assert b"AUTH CRAM-MD5" in s.commands()
    if code != EX_OK:
        one_line_error(result)


def test_535_is_77(scripted, tmp_path):
    s = scripted()
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")), password="nope")
    assert result.returncode == EX_NOPERM, err(result)
    one_line_error(result)
    assert not any(l.startswith(b"ATRN") for l in s.commands())


def test_250_then_delivery_into_maildir(scripted, tmp_path):
    s = scripted(atrn_reply=reply_line(replies.ATRN_OK), after_250=deliver_one)
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")))
    assert result.returncode == EX_OK, err(result) + repr(s.errors)
    (name,) = os.listdir(tmp_path / "md" / "new")
    raw = (tmp_path / "md" / "new" / name).read_bytes()
    assert raw.endswith(b"\nSubject: scripted\n\n.dot\nFrom x\n")
    assert s.errors == []


# A provider may send the reversed session's first commands in the same write as its
# 250 to ATRN, before our 220: they sit in the reader that read the 250 (Turnaround.file).
PIPELINED_BEHIND_250 = (reply_line(replies.ATRN_OK) + "\r\nEHLO scripted.test\r\n"
                        "MAIL FROM:<a@outside.test>\r\nRCPT TO:<x@example.org>\r\nDATA")


def _rest_of_the_pipelined_session(peer: Peer) -> None:
    assert peer.line().startswith(b"220 ")
    assert peer.reply()[-1].startswith(b"250 ")                 # to the EHLO sent with the 250
    assert [peer.line()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    peer.send("Subject: behind the 250\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert peer.line().startswith(b"250")
    assert peer.line().startswith(b"221")


@pytest.mark.slow
@pytest.mark.parametrize("tls", ["none", "implicit"])
@pytest.mark.parametrize("target", ["maildir", "relay"])
def test_commands_sent_with_the_250_reach_the_local_side(scripted, pki, tmp_path, target, tls):
    """Nothing the provider pipelined right behind its 250 is lost at the hand-over,
    whether fetch is the SMTP server itself or splices into a local MTA."""
    s = scripted(atrn_reply=PIPELINED_BEHIND_250, after_250=_rest_of_the_pipelined_session,
                 implicit=server_context(pki) if tls == "implicit" else None)
    extra = ["--ca-file", pki["ca.pem"]] if tls == "implicit" else []
    mta = ScriptedMTA() if target == "relay" else None
    try:
        where = ["--relay", "127.0.0.1:%d" % mta.port] if mta else ["--maildir", str(tmp_path / "md")]
        result = run_fetch(*scripted_args(s, *where, *extra, tls=tls))
        assert result.returncode == EX_OK, err(result) + repr(s.errors)
        if mta:
            assert [m["rcpts"] for m in mta.messages] == [["x@example.org"]]
            assert mta.accepted[0].startswith(b"Subject: behind the 250\r\n")
        else:
            (name,) = os.listdir(tmp_path / "md" / "new")
            assert (tmp_path / "md" / "new" / name).read_bytes().endswith(b"\nSubject: behind the 250\n\nbody\n")
    finally:
        if mta:
            mta.close()
    assert s.errors == []


# MAIL/RCPT parameters are read by one parser (odmr.wire) on the intake port and on this
# local server; these used to get 501, 250 and 250 here, and get intake's 555 now
PARAMETER_CASES = [("MAIL FROM:<a@outside.test> BODY=BINARYMIME", "MAIL", replies.UNSUPPORTED_MAIL_PARAMETER),
                   ("MAIL FROM:<a@outside.test> SMTPUTF8=yes", "MAIL", replies.UNSUPPORTED_MAIL_PARAMETER),
                   ("RCPT TO:<x@example.org> FOO=bar", "RCPT", replies.UNSUPPORTED_RCPT_PARAMETERS),
                   ("MAIL FROM:<a@outside.test> SIZE=12k", "MAIL", replies.SIZE_SYNTAX)]


def test_local_server_reads_parameters_like_the_intake_port(scripted, tmp_path, provider):
    answers = {}

    def after(peer: Peer) -> None:
        assert peer.line().startswith(b"220 ")
        peer.send("EHLO scripted.test\r\n")
        peer.reply()
        for command, verb, _ in PARAMETER_CASES:
            if verb == "RCPT":
                peer.send("MAIL FROM:<a@outside.test>\r\n")
                assert peer.line().startswith(b"250")
            peer.send(command + "\r\n")
            answers[command] = peer.line()
            peer.send("RSET\r\n")
            assert peer.line().startswith(b"250")
        peer.send("QUIT\r\n")
        assert peer.line().startswith(b"221")

    s = scripted(atrn_reply=reply_line(replies.ATRN_OK), after_250=after)
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")))
    assert result.returncode == EX_OK, err(result) + repr(s.errors)
    with socket.create_connection(("127.0.0.1", provider.smtp_port), timeout=10) as sock:
        intake = Peer(sock)
        intake.reply()
        intake.send("EHLO client.test\r\n")
        intake.reply()
        for command, verb, (code, text) in PARAMETER_CASES:
            if verb == "RCPT":
                intake.send("MAIL FROM:<a@outside.test>\r\n")
                assert intake.line().startswith(b"250")
            intake.send(command + "\r\n")
            got = intake.line()
            assert got == answers[command], command
            assert got.startswith(b"%d %s" % (code, text.split("%")[0].encode())), command
            intake.send("RSET\r\n")
            intake.line()


# RCPT paths are read by one helper (wire.Session.rcpt_command) on both ports too, and an
# address neither takes gets the intake port's verdict; the local server used to answer
# the first three 501 5.5.4 (a command syntax error) instead of 501 5.1.3 (a bad address)
RCPT_PATH_CASES = {"null path": ("RCPT TO:<>", replies.NULL_RECIPIENT),
                   "line separator": ("RCPT TO:<x\u2028y@example.org>", replies.BAD_RECIPIENT),
                   "angle bracket": ("RCPT TO:<x<y@example.org>", replies.BAD_RECIPIENT),
                   "route without colon": ("RCPT TO:<@relay.test>", replies.RCPT_SYNTAX),
                   "no brackets": ("RCPT TO:x@example.org", replies.RCPT_SYNTAX)}


def test_local_server_reads_rcpt_paths_like_the_intake_port(local, provider):
    server = local()
    customer_side = server.client()
    with socket.create_connection(("127.0.0.1", provider.smtp_port), timeout=10) as sock:
        intake = Peer(sock)
        intake.reply()
        intake.send("EHLO client.test\r\n")
        intake.reply()
        for name, (command, (code, text)) in RCPT_PATH_CASES.items():
            answers = []
            for peer in (customer_side, intake):
                peer.send("MAIL FROM:<a@outside.test>\r\n")
                assert peer.line().startswith(b"250"), name
                peer.send(command + "\r\n")
                answers.append(peer.line())
                peer.send("RSET\r\n")
                assert peer.line().startswith(b"250"), name
            assert answers[0] == answers[1] == b"%d %s" % (code, text.encode()), (name, answers)
        quit_(intake)
    quit_(customer_side)


def test_local_server_drops_a_source_route_whose_literal_holds_colons(local):
    """RFC 5321 §4.1.1.3: the route is ignored and the mailbox kept. An IPv6 literal in
    the route does not end it (the local server used to take the address to be
    `2001:db8::1],@relay.test:bob@example.org`, and left it out of its Received:)."""
    server = local()
    peer = server.client()
    peer.send("MAIL FROM:<a@outside.test>\r\n"
              "RCPT TO:<@[IPv6:2001:db8::1],@relay.test:bob@example.org>\r\nDATA\r\n")
    assert [peer.line()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    peer.send("Subject: routed\r\n\r\nhi\r\n.\r\n")
    assert peer.line().startswith(b"250")
    quit_(peer)
    server.close()
    new = os.path.join(server.maildir, "new")
    [name] = os.listdir(new)
    with open(os.path.join(new, name), "rb") as fh:
        header = fh.read().partition(b"\n\n")[0]
    assert b"\n\tfor <bob@example.org>;" in header, header


def test_local_server_refuses_data_with_an_argument_like_the_intake_port(scripted, tmp_path):
    """`DATA foo` is a 501 on both ports (one guard in odmr.wire); this local server
    used to answer 354 and store what followed."""
    answers = []

    def after(peer: Peer) -> None:
        assert peer.line().startswith(b"220 ")
        peer.send("EHLO scripted.test\r\n")
        peer.reply()
        peer.send("MAIL FROM:<a@outside.test>\r\nRCPT TO:<x@example.org>\r\nDATA foo\r\n")
        assert [peer.line()[:3] for _ in range(2)] == [b"250", b"250"]
        answers.append(peer.line())
        if answers[0].startswith(b"354"):               # the old answer: end the message
            peer.send("Subject: argument\r\n\r\nbody\r\n.\r\n")
            answers.append(peer.line())
        peer.send("QUIT\r\n")
        assert peer.line().startswith(b"221")

    s = scripted(atrn_reply=reply_line(replies.ATRN_OK), after_250=after)
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")))
    assert s.errors == []
    assert answers == [reply_line(replies.DATA_SYNTAX).encode()], err(result)
    assert os.listdir(tmp_path / "md" / "new") == []


def drop_mid_message(peer: Peer) -> None:
    assert peer.line().startswith(b"220 ")
    peer.send("EHLO scripted.test\r\n")
    peer.reply()
    peer.send("MAIL FROM:<a@outside.test>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    for _ in range(3):
        peer.line()
    peer.send("Subject: cut\r\n\r\nhalf a mess")
    peer.sock.close()


def test_drop_mid_session_maildir_is_75(scripted, tmp_path):
    s = scripted(atrn_reply=reply_line(replies.ATRN_OK), after_250=drop_mid_message)
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")))
    assert result.returncode == EX_TEMPFAIL, err(result)
    assert os.listdir(tmp_path / "md" / "new") == []
    assert os.listdir(tmp_path / "md" / "tmp") == []


@pytest.mark.slow
@needs_sink
def test_drop_mid_session_relay_is_75(scripted):
    s = scripted(atrn_reply=reply_line(replies.ATRN_OK), after_250=drop_mid_message)
    sink = Sink()
    try:
        result = run_fetch(*scripted_args(s, "--relay", "127.0.0.1:%d" % sink.port))
        assert result.returncode == EX_TEMPFAIL, err(result)
        assert sink.messages() == []
    finally:
        sink.cleanup()
    assert s.peers[0].lines[0].startswith(b"EHLO")          # the sink's greeting reached the provider


def test_relay_target_down_is_75_and_provider_told(scripted, tmp_path):
    got = []

    def after(peer: Peer) -> None:
        got.append(peer.line())

    s = scripted(atrn_reply=reply_line(replies.ATRN_OK), after_250=after)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        result = run_fetch(*scripted_args(s, "--relay", "127.0.0.1:%d" % port))
    assert result.returncode == EX_TEMPFAIL, err(result)
    assert got and got[0].startswith(b"421 ")


@pytest.mark.slow
@pytest.mark.parametrize("how, code", [
    ("no-atrn", EX_UNAVAILABLE),
    ("no-usable-mechanism", EX_UNAVAILABLE),
    ("garbage", EX_PROTOCOL),
    ("drop", EX_TEMPFAIL),
    ("554-greeting", EX_UNAVAILABLE),
    ("refused", EX_TEMPFAIL),
])
def test_failures(scripted, tmp_path, how, code):
    if how == "refused":
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        result = run_fetch("--server", "127.0.0.1:%d" % port, "--user", "alice", "--tls", "none",
                           "--maildir", str(tmp_path / "md"))
        assert result.returncode == code, err(result)
        one_line_error(result)
        return
    options = {"no-atrn": dict(atrn=False),
               "no-usable-mechanism": dict(mechanisms="PLAIN LOGIN"),   # PLAIN needs TLS
               "garbage": dict(greeting="HTTP/1.1 400 Bad Request"),
               "drop": dict(greeting="220 scripted.test", atrn_reply="250 ok", after_250=None),
               "554-greeting": dict(greeting="554 go away")}[how]
    s = scripted(**options)
    if how == "drop":
        s.converse = lambda peer: (peer.send("220 x\r\n"), peer.line(), peer.sock.close())
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")))
    assert result.returncode == code, err(result)
    one_line_error(result)
    assert not any(l.startswith(b"AUTH") for l in s.commands())     # no credentials sent for nothing


# -- TLS --------------------------------------------------------------------------------

def server_context(pki, name: str = "server") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki[name + ".pem"], pki[name + ".key"])
    return context


@pytest.mark.slow
def test_starttls_required_and_used(scripted, pki, tmp_path):
    s = scripted(starttls=server_context(pki), mechanisms="PLAIN CRAM-MD5")
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md"), "--ca-file", pki["ca.pem"],
                                      tls="starttls"))
    assert result.returncode == EX_OK, err(result)
    commands = s.commands()
    assert commands[:2] == [b"EHLO localhost", b"STARTTLS"] or commands[1] == b"STARTTLS"
    assert [c.split(b" ")[0] for c in commands].count(b"EHLO") == 2
    assert any(c.startswith(b"AUTH CRAM-MD5") for c in commands)     # preferred over PLAIN
    assert b"ATRN example.org,example.com" in commands


def test_starttls_missing_is_69_without_credentials(scripted, tmp_path):
    s = scripted()
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md"), tls="starttls"))
    assert result.returncode == EX_UNAVAILABLE, err(result)
    one_line_error(result)
    assert not any(l.startswith(b"AUTH") for l in s.commands())


def test_implicit_tls_with_plain_and_verbose_masking(scripted, pki, tmp_path):
    s = scripted(implicit=server_context(pki), mechanisms="PLAIN")
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md"), "--ca-file", pki["ca.pem"],
                                      "-v", tls="implicit"))
    assert result.returncode == EX_OK, err(result)
    text = err(result)
    assert "C: AUTH PLAIN ****" in text and "C: ATRN example.org,example.com" in text
    assert PASSWORD not in text
    assert base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode() not in text


def test_verbose_masks_cram_md5_exchange(scripted, tmp_path):
    s = scripted()
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md"), "-v"))
    assert result.returncode == EX_OK, err(result)
    lines = err(result).splitlines()
    start = lines.index("C: AUTH CRAM-MD5")
    assert lines[start + 1:start + 4] == ["S: 334 ****", "C: ****", "S: 235 ****"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["untrusted", "wrong-name"])
def test_certificate_failure_is_76(scripted, pki, tmp_path, case):
    name, extra = ("server", []) if case == "untrusted" else ("stranger", ["--ca-file", pki["ca.pem"]])
    s = scripted(implicit=server_context(pki, name))
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md"), *extra, tls="implicit"))
    assert result.returncode == EX_PROTOCOL, err(result)
    one_line_error(result)
    assert "certificate" in err(result)
    # --insecure accepts the same server
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md"), "--insecure", tls="implicit"))
    assert result.returncode == EX_OK, err(result)


@pytest.mark.slow
def test_real_provider_over_starttls_and_implicit_tls(tmp_path, pki):
    home = tmp_path / "provider"
    home.mkdir()
    implicit = free_port()
    p = Provider(str(home), sections="[tls]\ncert_file = %s\nkey_file = %s\n"
                 % (pki["server.pem"], pki["server.key"]),
                 odmr_extra="tls_listen = 127.0.0.1:%d\n" % implicit)
    p.add_user("alice", ["example.org", "example.com"])
    p.start()
    try:
        send_mail(p.smtp_port, "s@outside.test", ["x@example.org"], message("starttls", TRICKY))
        send_mail(p.smtp_port, "s@outside.test", ["x@example.com"], message("implicit", TRICKY))
        result = run_fetch("--server", "127.0.0.1:%d" % p.odmr_port, "--user", "alice", "-v",
                           "--ca-file", pki["ca.pem"], "--domain", "example.org",
                           "--maildir", str(tmp_path / "md"))
        assert result.returncode == EX_OK, err(result)
        assert "C: STARTTLS" in err(result) and "C: AUTH SCRAM-SHA-256 ****" in err(result)
        result = run_fetch("--server", "127.0.0.1:%d" % implicit, "--user", "alice", "--tls", "implicit",
                           "--ca-file", pki["ca.pem"], "--domain", "example.com",
                           "--mbox", str(tmp_path / "mbox"))
        assert result.returncode == EX_OK, err(result)
        assert p.spooled("example.org") == [] and p.spooled("example.com") == []
    finally:
        p.stop()
    (name,) = os.listdir(tmp_path / "md" / "new")
    assert (tmp_path / "md" / "new" / name).read_bytes().endswith(as_stored(message("starttls", TRICKY)))
    assert b"with ESMTPS id" in (tmp_path / "md" / "new" / name).read_bytes()
    raw = (tmp_path / "mbox").read_bytes()
    assert b"\nSubject: implicit\n" in raw and b"\n>From the start\n" in raw


@pytest.mark.slow
@needs_sink
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_real_provider_relay_over_tls_into_smtp_sink(tmp_path, pki, mode):
    """The splice with a TLS socket on the provider side (OpenSSL's buffered records)."""
    home = tmp_path / "provider"
    home.mkdir()
    implicit = free_port()
    p = Provider(str(home), sections="[tls]\ncert_file = %s\nkey_file = %s\n"
                 % (pki["server.pem"], pki["server.key"]),
                 odmr_extra="tls_listen = 127.0.0.1:%d\n" % implicit)
    p.add_user("alice", ["example.org"])
    p.start()
    sink = Sink()
    sent = {"t%d" % i: message("t%d" % i, TRICKY * (i + 1)) for i in range(20)}
    try:
        for data in sent.values():
            send_mail(p.smtp_port, "s@outside.test", ["x@example.org"], data)
        port = p.odmr_port if mode == "starttls" else implicit
        result = run_fetch("--server", "127.0.0.1:%d" % port, "--user", "alice", "--tls", mode,
                           "--ca-file", pki["ca.pem"], "--relay", "127.0.0.1:%d" % sink.port)
        assert result.returncode == EX_OK, err(result)
        assert p.spooled("example.org") == []
        dumps = sink.messages()
    finally:
        sink.cleanup()
        p.stop()
    got = {re.search(rb"^Subject: (\w+)$", d.content, re.M).group(1).decode(): d.content for d in dumps}
    assert got == {k: as_stored(v) for k, v in sent.items()}


@pytest.mark.slow
@needs_sink
def test_local_server_hanging_up_ends_a_tls_relay_at_once(tmp_path, pki):
    """TLS has no half-close: when the local server drops, the splice must end the
    provider connection itself instead of waiting out its linger time."""
    home = tmp_path / "provider"
    home.mkdir()
    p = Provider(str(home), sections="[tls]\ncert_file = %s\nkey_file = %s\n"
                 % (pki["server.pem"], pki["server.key"]))
    p.add_user("alice", ["example.org"])
    p.start()
    sink = Sink("-q", "DATA")                     # hangs up when DATA arrives
    try:
        send_mail(p.smtp_port, "s@outside.test", ["x@example.org"], message("q", b"x\r\n"))
        started = time.monotonic()
        result = run_fetch("--server", "127.0.0.1:%d" % p.odmr_port, "--user", "alice",
                           "--ca-file", pki["ca.pem"], "--relay", "127.0.0.1:%d" % sink.port)
        took = time.monotonic() - started
        assert result.returncode == EX_TEMPFAIL, err(result)
        assert took < 10, took
        assert len(p.spooled("example.org")) == 1
    finally:
        sink.cleanup()
        p.stop()


def test_tls_to_a_plaintext_server_is_76(scripted, tmp_path):
    s = scripted()
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md"), "--insecure", tls="implicit"))
    assert result.returncode == EX_PROTOCOL, err(result)
    one_line_error(result)


# -- --every ------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_polls_until_sigterm(scripted, tmp_path):
    s = scripted()
    log = open(tmp_path / "stderr", "wb")
    env = {k: v for k, v in os.environ.items() if k != "ODMRD_CONFIG"}
    env["ODMR_PASSWORD"] = PASSWORD
    proc = subprocess.Popen(FETCH + scripted_args(s, "--maildir", str(tmp_path / "md"), "--every", "1s"),
                            stdout=subprocess.DEVNULL, stderr=log, env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and b"run 2:" not in (tmp_path / "stderr").read_bytes():
            assert proc.poll() is None, (tmp_path / "stderr").read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == EX_OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
    text = (tmp_path / "stderr").read_text()
    assert "run 1: no mail waiting; exit 0 after " in text and "run 2: no mail waiting; exit 0 after " in text, text
    assert sum(1 for c in s.commands() if c.startswith(b"ATRN")) >= 2


def test_backoff_doubles_after_failures():
    import random
    from odmr.fetch import next_delay
    rng = random.Random(1)
    assert 54 <= next_delay(60, 0, rng) <= 66
    assert 216 <= next_delay(60, 2, rng) <= 264
    assert next_delay(60, 30, rng) <= 3600 * 1.1


# -- flags ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, code", [
    (["--user", "alice", "--maildir", "m"], EX_USAGE),                                   # no server
    (["--server", "127.0.0.1", "--user", "alice"], EX_USAGE),                            # no target
    (["--server", "127.0.0.1", "--user", "a", "--maildir", "m", "--mbox", "b"], EX_USAGE),
    (["--server", "127.0.0.1", "--user", "a", "--maildir", "m", "--tls", "maybe"], EX_USAGE),
    (["--server", "127.0.0.1", "--user", "a", "--relay", "nohostport"], EX_USAGE),
    (["--server", "127.0.0.1", "--user", "a", "--maildir", "m", "--mechanism", "MAGIC"], EX_USAGE),
    (["--server", "127.0.0.1", "--user", "a", "--maildir", "m", "--domain", "bad domain"], EX_USAGE),
    (["--server", "127.0.0.1", "--user", "a", "--maildir", "m", "--every", "often"], EX_USAGE),
    (["--server", "127.0.0.1:99999", "--user", "a", "--maildir", "m"], EX_USAGE),
    (["--server", "127.0.0.1", "--user", "a", "--maildir", "m", "--bogus"], EX_USAGE),
    (["--server", "127.0.0.1", "--user", "a", "--maildir", "m", "--password-file", "/nonexistent"],
     EX_NOINPUT),
])
def test_bad_flags(args, code):
    result = run_fetch(*args)
    assert result.returncode == code, err(result)
    one_line_error(result)


@pytest.mark.parametrize("what", ["ca-dir", "ca-not-pem", "pw-empty", "pw-not-utf8"])
def test_unusable_ca_or_password_file_is_66(tmp_path, what):
    """README: 66 when the password or CA file cannot be used."""
    (tmp_path / "junk").write_bytes(b"no certificate here\n")
    (tmp_path / "empty").write_bytes(b"\n")
    (tmp_path / "latin1").write_bytes(b"gr\xfc\xdfe\n")
    (tmp_path / "pw").write_bytes(b"secret\n")
    args = ["--server", "127.0.0.1:%d" % free_port(), "--user", "a", "--maildir", str(tmp_path / "m")]
    if what.startswith("ca"):
        args += ["--password-file", str(tmp_path / "pw"),
                 "--ca-file", str(tmp_path) if what == "ca-dir" else str(tmp_path / "junk")]
    else:
        args += ["--tls", "none", "--password-file",
                 str(tmp_path / ("empty" if what == "pw-empty" else "latin1"))]
    result = run_fetch(*args, password=None)
    assert result.returncode == EX_NOINPUT, err(result)
    one_line_error(result)


def test_password_required():
    result = run_fetch("--server", "127.0.0.1", "--user", "a", "--maildir", "m", password=None)
    assert result.returncode == EX_USAGE
    one_line_error(result)


def test_password_file_first_line(scripted, tmp_path):
    (tmp_path / "pw").write_bytes(PASSWORD.encode() + b"\nsecond line\n")
    s = scripted()
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md"), "--password-file",
                                      str(tmp_path / "pw")), password=None)
    assert result.returncode == EX_OK, err(result)


# -- mboxrd quoting ---------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"From x", b">From y", b">>From ", b"From", b"Fromage", b"", b"a From b",
                                 b" From"]), max_size=8))
def test_mboxrd_quoting_is_reversible(lines):
    text = b"".join(l + b"\n" for l in lines)
    quoted = quote_from(text, True)
    unquoted = re.sub(rb"(?m)^>(>*From )", rb"\1", quoted)
    assert unquoted == text
    assert not re.search(rb"(?m)^From ", quoted)


def test_mbox_quotes_a_from_line_cut_between_pieces(tmp_path):
    from odmr.fetch_mailbox import Mbox
    box = Mbox(str(tmp_path / "mbox"))
    delivery = box.begin("a@b.c", b"Subject: x\n\n")
    for piece in (b"hello\nFr", b"om evil\n", b"From x\n>Fro", b"m y\nend\nFrom", b" z"):
        delivery.write(piece)
    delivery.commit()
    lines = (tmp_path / "mbox").read_bytes().split(b"\n")
    assert lines[0].startswith(b"From a@b.c ")
    assert lines[4:9] == [b">From evil", b">From x", b">>From y", b"end", b">From z"]
    assert sum(1 for line in lines if line.startswith(b"From ")) == 1


def test_mbox_append_interrupted_leaves_the_mailbox_as_it_was(tmp_path, monkeypatch):
    from odmr import fetch_mailbox as mailstore
    path = tmp_path / "mbox"
    path.write_bytes(b"From old@x Sat Nov 28 10:00:00 2026\nSubject: old\n\nold body\n\n")
    before = path.read_bytes()
    delivery = mailstore.Mbox(str(path)).begin("a@b.c", b"Subject: new\n\n")
    delivery.write(b"line1\nline2\n" * 1000)
    calls = []

    def interrupted(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise KeyboardInterrupt()
        os.write(fd, data)
    monkeypatch.setattr(mailstore, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        delivery.commit()
    assert path.read_bytes() == before
    assert not os.path.exists(str(path) + ".lock")


# -- the local SMTP server ------------------------------------------------------------------

@pytest.mark.parametrize("peer,address", [("::1", "::1"), ("[::1]:366", "::1"), ("127.0.0.1", "127.0.0.1"),
                                          ("127.0.0.1:366", "127.0.0.1")])
def test_local_delivery_peer_address(peer, address):
    from odmr.wire import address_only
    assert address_only(peer) == address


def test_multiline_250_to_atrn_then_delivery(scripted, tmp_path):
    """RFC 5321 allows any reply to span lines, ATRN's 250 too."""
    s = scripted(atrn_reply="250-OK\r\n250 now reversing the connection", after_250=deliver_one)
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")))
    assert result.returncode == EX_OK, err(result) + repr(s.errors)
    assert len(os.listdir(tmp_path / "md" / "new")) == 1
    assert s.errors == []


@pytest.mark.slow
def test_fetch_section_values_are_checked_when_the_file_is_read(tmp_path):
    """[fetch] is typed in the configspec: a bad value is a configuration error (78)
    naming each key and its line, not a flag error."""
    conf = tmp_path / "fetch.conf"
    conf.write_text("[fetch]\nserver = h:99999\nuser = a\nrelay = nohost\n"
                    "mechanism = FOO\ndomains = bad..name\n")
    result = run_fetch("-c", str(conf), "--check")
    assert result.returncode == 78, err(result)
    one_line_error(result)
    for key, line in (("server", 2), ("relay", 4), ("mechanism", 5), ("domains", 6)):
        assert "fetch.%s (line %d)" % (key, line) in err(result), key
    # the same values as flags are usage errors, one at a time
    result = run_fetch("--server", "h:99999", "--user", "a", "--maildir", "m", "--check")
    assert result.returncode == EX_USAGE and "--server: bad port" in err(result), err(result)


def test_every_fetch_key_is_a_flag_with_the_configspec_default(tmp_path, monkeypatch):
    """One table of (flag, [fetch] key, converter, default): each [fetch] key of the
    configspec has its flag, and what a key left out of the file means is the flag's
    own default, so an empty [fetch] section and no file at all resolve alike."""
    from odmr import config
    from odmr.fetch import OPTIONS, resolve_options
    conf = tmp_path / "fetch.conf"
    conf.write_text("[fetch]\n")
    section = config.load(str(conf)).fetch
    assert sorted(section) == sorted(option.key for option in OPTIONS)
    unset = (None, "", [])          # what fetch reads as "not in the file"
    for option in OPTIONS:
        file_default = section[option.key]
        assert file_default == option.default or (file_default in unset and option.default in unset), \
            "[fetch] %s defaults to %r, %s to %r" % (option.key, file_default, option.flag, option.default)
    flags = ["--server", "127.0.0.1", "--user", "a", "--maildir", str(tmp_path / "m")]
    monkeypatch.setenv("ODMR_PASSWORD", "x")
    monkeypatch.setenv("ODMRD_CONFIG", str(tmp_path / "none.conf"))
    from_file = resolve_options(flags + ["-c", str(conf)], None)
    without = resolve_options(flags, None)
    from_file.config_note = without.config_note = ""
    assert from_file == without and from_file.max_size == 50 * 1024 * 1024 and from_file.every == 0


@pytest.mark.parametrize("reply, code", [
    ("250-OK now reversing\r\n250 the connection", EX_OK),
    ("453-You have\r\n453 no mail", EX_OK),
    ("450-ATRN request\r\n450 refused", EX_NOPERM),
    ("451-Unable to process\r\n451 ATRN request now", EX_TEMPFAIL),
], ids=["250", "453", "450", "451"])
def test_fetch_takes_a_multi_line_atrn_reply(scripted, tmp_path, reply, code):
    s = scripted(atrn_reply=reply, after_250=deliver_one)
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")))
    assert result.returncode == code, err(result)
    if reply.startswith("250"):
        [name] = os.listdir(tmp_path / "md" / "new")
        assert b"scripted" in (tmp_path / "md" / "new" / name).read_bytes()


def test_fetch_takes_a_multi_line_auth_success(scripted, tmp_path):
    class Chatty(Scripted):
        def auth(self, peer, line):
            super().auth(_Capture(peer), line)

    class _Capture:
        def __init__(self, peer):
            self.peer = peer

        def send(self, text):
            if text.startswith("235"):
                text = "235-Welcome\r\n235-to the\r\n235 2.7.0 provider\r\n"
            self.peer.send(text)

        def line(self):
            return self.peer.line()

    s = Chatty()
    try:
        result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")))
        assert result.returncode == EX_OK, err(result)
        assert any(l.startswith(b"ATRN") for l in s.commands())
    finally:
        s.close()
