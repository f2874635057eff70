"""Regression tests for problems found in review: envelope injection, DATA debris, tmp locks."""
from __future__ import annotations

import fcntl
import os
import smtplib
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, Customer, run_cli, send_mail
from odmr.spool import Envelope, Recipient, Spool, SpoolError


@pytest.mark.parametrize("rcpt", ['"x> NOTIFY=NEVER y"@example.org', "x\u2028y@example.org",
                                  "x\u0085y@example.org", "<x>@example.org", "x\\y@example.org"],
                         ids=["quoted-bracket", "line-separator", "nel", "brackets", "backslash"])
def test_recipient_that_could_break_the_envelope_is_refused(provider, rcpt):
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        s.ehlo()
        assert s.mail("a@remote.test", ["SMTPUTF8"])[0] == 250
        s.putcmd("RCPT", "TO:<%s>" % rcpt)
        code, _ = s.getreply()
        assert code in (501, 553)
    assert provider.spooled("example.org") == []


def test_quoted_local_part_with_space_round_trips(provider):
    send_mail(provider.smtp_port, "a@remote.test", ['"john smith"@example.org'], b"Subject: q\r\n\r\nx\r\n")
    (msg_id,) = provider.spooled("example.org")
    message = provider.spool.load("example.org", msg_id)
    assert [r.address for r in message.envelope.recipients] == ['"john smith"@example.org']


@pytest.mark.parametrize("args", [["-f", "x\nRecipient: <victim@evil.test>\nZ: \"@example.org", "u@example.org"],
                                  ["-f", "a@b.c\n\nX", "u@example.org"],
                                  ["-f", "a@b.c", "u@example.org\nRecipient: <v@evil.test>"]],
                         ids=["sender-injects-recipient", "sender-ends-envelope", "recipient-injects"])
def test_enqueue_refuses_envelope_injection(provider, args):
    r = run_cli("-c", provider.config, "enqueue", *args, input=b"Subject: x\n\nhi\n")
    assert r.returncode == 65, r.stderr
    assert b"Traceback" not in r.stderr
    assert provider.spooled("example.org") == []


def test_spool_refuses_unsafe_addresses(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    with pytest.raises(SpoolError):
        spool.store("example.org", Envelope("a@b.c", [Recipient("x>\ny@example.org")]), b"x\r\n")
    assert os.listdir(str(tmp_path / "spool" / "example.org" / "tmp")) == []


@pytest.mark.parametrize("how", ["close", "timeout"])
def test_client_vanishing_mid_data_leaves_nothing(tmp_path, how):
    from conftest import Provider
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


def test_prepare_leaves_a_live_writers_tmp_file_alone(tmp_path):
    """Another process (or node) is writing: its locked tmp file survives our start-up."""
    root = str(tmp_path / "spool")
    spool = Spool(root)
    spool.prepare()
    incoming = spool.begin({"example.org": Envelope("a@b.c", [Recipient("u@example.org")])})
    incoming.write(b"Subject: live\r\n\r\nbody\r\n")
    tmp_dir = os.path.join(root, "example.org", "tmp")
    debris = os.path.join(tmp_dir, "0000000000000deadbeef")
    with open(debris, "wb") as fh:
        fh.write(b"left by a crash")
    code = ("import sys; sys.path.insert(0, %r); from odmr.spool import Spool; "
            "print(Spool(%r).prepare())" % (ROOT, root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert out.stdout.strip() == b"1", out.stderr
    assert not os.path.exists(debris)
    assert len(os.listdir(tmp_dir)) == 1
    assert incoming.commit()
    assert len(spool.message_ids("example.org")) == 1
