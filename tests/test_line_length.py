"""Lines and line ends on the way to the customer: lines longer than SMTP allows
are broken (RFC 5321 §4.5.3.1.6), with DATA and BDAT, for small and streamed
messages, and the end of data is always CRLF.CRLF. Real provider, scripted customer."""
from __future__ import annotations

import smtplib

import pytest

from helpers import SENDER_OUTSIDE, Script, atrn, store


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
@pytest.mark.parametrize("filler", [0, 700 * 1024], ids=["small", "streamed"])
def test_long_lines_are_broken_on_the_way_to_the_customer(provider, chunking, filler):
    long_line = bytes(range(65, 91)) * 100                         # 2,600 octets, no break
    text = (b"Subject: long\r\nX-Long: " + long_line + b"\r\n\r\n" + long_line + b"\r\n"
            + (b"filler line\r\n" * (filler // 13)) + long_line + b"\r\nend\r\n")
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=30) as c:
        c.sendmail(SENDER_OUTSIDE, ["x@example.org"], text)
    script = Script()
    if chunking:
        script.extensions = script.extensions + ["CHUNKING"]
    assert atrn(provider, script, timeout=60) == "quit"
    [got] = script.messages
    data = got["data"]
    lines = data.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    # what was broken comes back whole when the inserted CRLF SP are taken out
    assert data.replace(b"\r\n ", b"").endswith(text.replace(b"\r\n ", b""))
    assert any(c.startswith("BDAT") for c in script.commands) == chunking


@pytest.mark.slow
@pytest.mark.parametrize("filler", [0, 600 * 1024], ids=["small", "streamed"])
def test_the_end_of_data_is_always_crlf_dot_crlf(provider, filler):
    """A spool file whose text ends in a bare LF (written by hand, or by an old version):
    the terminator still starts with CRLF (never <LF>.<CRLF>, SPEC §5)."""
    from odmr.spool import Envelope, Recipient
    text = b"Subject: lf\r\n\r\n" + b"filler\r\n" * (filler // 8) + b"ends with LF\n"
    store(provider.spool, "example.org", Envelope(SENDER_OUTSIDE, [Recipient("x@example.org")]), text)
    script = Script()
    assert atrn(provider, script) == "quit"
    [got] = script.messages
    assert got["data"].endswith(b"ends with LF\n\r\n")
