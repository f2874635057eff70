"""An address cannot break the spool envelope: the intake port, `odmrd enqueue`
and the spool itself refuse what could end a header line or forge a recipient,
and a legitimately quoted local part still round-trips."""
from __future__ import annotations

import os
import smtplib

import pytest

from helpers import run_cli, send_mail, store
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


@pytest.mark.slow
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
        store(spool, "example.org", Envelope("a@b.c", [Recipient("x>\ny@example.org")]), b"x\r\n")
    assert os.listdir(str(tmp_path / "spool" / "example.org" / "tmp")) == []
