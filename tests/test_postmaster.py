"""The domainless `postmaster` (RFC 5321 §4.5.1) is accepted out of the box, at the
SMTP port and by `odmrd enqueue`, as postmaster@<hostname>, and goes out through
`[queue] bounce_relay` with its real sender. Real sockets, a small relay server."""
from __future__ import annotations

import pytest

from helpers import SENDER_OUTSIDE, eventually, queue, send_mail
from odmr.exits import EX_OK
from odmr.spool import OUTBOUND


def test_postmaster_works_out_of_the_box_through_the_bounce_relay(relayed):
    p, sink = relayed()
    send_mail(p.smtp_port, SENDER_OUTSIDE, ["postmaster"], b"Subject: abuse report\r\n\r\nhi\r\n")
    assert eventually(lambda: sink.messages, 15), "the relay never got the postmaster's mail"
    [got] = sink.messages
    assert got["rcpts"] == ["postmaster@odmr.test"]
    assert got["mail"].split()[1].upper() == "FROM:<%s>" % SENDER_OUTSIDE.upper()   # not <>
    assert b"abuse report" in got["data"]
    assert eventually(lambda: queue(p) == [], 15)


@pytest.mark.slow
def test_enqueue_to_the_bare_postmaster(provider):
    result = provider.run_cli("enqueue", "-f", SENDER_OUTSIDE, "postmaster", input=b"Subject: x\r\n\r\nhi\r\n")
    assert result.returncode == EX_OK, result.stderr
    [record] = queue(provider, OUTBOUND)
    assert record["recipients"] == ["postmaster@odmr.test"]
