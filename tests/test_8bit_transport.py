"""8-bit and internationalised mail never reaches a peer that did not offer it.

DSNs are 7-bit, global (RFC 6533) when an address needs UTF-8; the bounce relay
gets no 8-bit or UTF-8 text it did not offer 8BITMIME/SMTPUTF8 for (RFC 6152 §3,
RFC 6531 §3.2); a customer without SMTPUTF8 gets no UTF-8 header fields; fetch's
own server refuses UTF-8 addresses without SMTPUTF8 and names UTF8SMTP in its
Received: when it was used. Real sockets throughout."""
from __future__ import annotations

import base64
import email
import email.policy
import os
import smtplib
from typing import List

import pytest

from helpers import SENDER_OUTSIDE, Script, atrn, eventually, queue, quit_, send_mail, wait_sessions_over
from odmr.spool import OUTBOUND


def bounce_everything(provider, rcpts: List[str], smtputf8: bool, subject: str = "x") -> None:
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as c:
        c.ehlo()
        c.sendmail("sender@example.net", rcpts,
                   ("Subject: %s\r\n\r\nbody\r\n" % subject).encode("utf-8"),
                   mail_options=["SMTPUTF8"] if smtputf8 else [])
    script = Script()
    script.extensions = script.extensions + ["SMTPUTF8"]
    script.rcpt = lambda address: "550 5.1.1 no such user"
    assert atrn(provider, script) == "quit"
    wait_sessions_over(provider)


def the_dsn(provider) -> email.message.EmailMessage:
    [dsn_id] = provider.spooled("example.net")
    return email.message_from_bytes(provider.spool.load("example.net", dsn_id).read_data(),
                                    policy=email.policy.default)


def test_a_dsn_about_a_utf8_recipient_is_a_global_one(provider):
    bounce_everything(provider, ["jörg@example.org"], smtputf8=True, subject="grüße")
    dsn = the_dsn(provider)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "global-delivery-status"      # RFC 6522 §3
    types = [part.get_content_type() for part in dsn.iter_parts()]
    assert types == ["text/plain", "message/global-delivery-status", "message/global-headers"]
    [dsn_id] = provider.spooled("example.net")
    raw = provider.spool.load("example.net", dsn_id).read_data()
    assert raw.isascii() and max(map(len, raw.split(b"\r\n"))) <= 998    # any relay takes it
    report = base64.b64decode(raw.split(b"Content-Type: message/global-delivery-status")[1]
                              .split(b"\r\n\r\n")[1].split(b"\r\n--")[0]).decode("utf-8")
    assert "Final-Recipient: utf-8; jörg@example.org" in report
    assert "rfc822; jörg" not in report
    returned = dsn.get_payload()[2]
    assert returned["Content-Transfer-Encoding"] == "base64"
    assert "grüße".encode("utf-8") in base64.b64decode(
        raw.split(b"Content-Type: message/global-headers")[1].split(b"\r\n\r\n")[1].split(b"\r\n--")[0])


def test_a_dsn_about_ascii_recipients_stays_plain_and_7bit(provider):
    bounce_everything(provider, ["joe@example.org"], smtputf8=False)
    dsn = the_dsn(provider)
    types = [part.get_content_type() for part in dsn.iter_parts()]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    [dsn_id] = provider.spooled("example.net")
    stored = provider.spool.load("example.net", dsn_id)
    assert stored.read_data().isascii() and stored.envelope.body == "7BIT"


@pytest.mark.parametrize("rcpt, subject", [("joe@example.org", "grüße"), ("jörg@example.org", "plain")],
                         ids=["utf8-header", "utf8-address"])
def test_dsns_about_internationalised_mail_reach_a_7bit_relay_in_7_bits(relayed, rcpt,
                                                                        subject):
    p, sink = relayed(features=[])
    with smtplib.SMTP("127.0.0.1", p.smtp_port, timeout=10) as c:
        c.ehlo()
        c.sendmail(SENDER_OUTSIDE, [rcpt], ("Subject: %s\r\nX-Long: %s\r\n\r\nbody\r\n"
                                    % (subject, "y" * 2500)).encode("utf-8"),
                   mail_options=["SMTPUTF8"])
    script = Script()
    script.extensions = script.extensions + ["SMTPUTF8"]
    script.rcpt = lambda address: "550 5.1.1 no such user"
    assert atrn(p, script) == "quit"
    wait_sessions_over(p)
    assert eventually(lambda: sink.messages, 15), "the relay never got the DSN"
    [got] = sink.messages
    assert got["rcpts"] == [SENDER_OUTSIDE]
    assert "8BITMIME" not in got["mail"].upper() and "SMTPUTF8" not in got["mail"].upper()
    assert got["data"].isascii() and max(map(len, got["data"].split(b"\r\n"))) <= 998


@pytest.mark.slow
def test_8bit_mail_is_never_sent_raw_to_a_7bit_relay(relayed, caplog):
    """The bare postmaster's mail (kept for the relay) with an 8-bit body: refused for
    good by odmrd itself, and its sender told, in 7 bits, through the same relay."""
    p, sink = relayed(features=[])
    with smtplib.SMTP("127.0.0.1", p.smtp_port, timeout=10) as c:
        c.sendmail(SENDER_OUTSIDE, ["postmaster"], "Subject: x\r\n\r\nGrüße\r\n".encode("utf-8"),
                   mail_options=["BODY=8BITMIME"])
    assert eventually(lambda: sink.messages, 15)
    assert eventually(lambda: queue(p, OUTBOUND) == [], 15)
    assert [m["rcpts"] for m in sink.messages] == [[SENDER_OUTSIDE]]        # only the DSN
    assert "5.6.3" in sink.messages[0]["data"].decode() and "does not support" in caplog.text


def test_a_7bit_dsn_goes_through_a_7bit_relay(relayed):
    p, sink = relayed(features=[])
    send_mail(p.smtp_port, SENDER_OUTSIDE, ["joe@example.org"], b"Subject: plain\r\n\r\nbody\r\n")
    script = Script()
    script.rcpt = lambda address: "550 5.1.1 no such user"
    assert atrn(p, script) == "quit"
    wait_sessions_over(p)
    assert eventually(lambda: sink.messages, 15)
    assert "BODY=8BITMIME" not in sink.messages[0]["mail"].upper()


def _fetch_server_exchange(local, commands: bytes) -> List[bytes]:
    server = local()
    peer = server.client()
    peer.send(commands)
    replies = [peer.line() for _ in range(commands.count(b"\r\n"))]
    quit_(peer)
    return replies, server


def test_fetch_refuses_utf8_addresses_without_smtputf8(local):
    replies, server = _fetch_server_exchange(local, (
        "MAIL FROM:<jörg@outside.test>\r\n"
        "MAIL FROM:<a@outside.test>\r\nRCPT TO:<jörg@example.org>\r\nRSET\r\n").encode("utf-8"))
    assert [r[:9] for r in replies] == [b"553 5.6.7", b"250 2.1.0", b"553 5.6.7", b"250 2.0.0"], replies


def test_fetch_says_utf8smtp_in_its_received_header_when_it_was_used(local):
    server = local()
    peer = server.client()
    peer.send("MAIL FROM:<a@outside.test> SMTPUTF8\r\nRCPT TO:<jörg@example.org>\r\nDATA\r\n"
              .encode("utf-8"))
    assert [peer.line()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    peer.send("Subject: grüße\r\n\r\nhi\r\n.\r\n".encode("utf-8"))
    assert peer.line()[:3] == b"250"
    quit_(peer)
    new = os.path.join(server.maildir, "new")
    [name] = os.listdir(new)
    with open(os.path.join(new, name), "rb") as fh:
        header = fh.read().split(b"\n\n")[0]
    assert b"with UTF8SMTP id" in header.replace(b"\n\t", b" ").replace(b"\n ", b" ")


@pytest.mark.parametrize("subject, returned", [("grüße", True), ("plain", False)])
def test_utf8_headers_never_reach_a_customer_without_smtputf8(provider, subject, returned):
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as c:
        c.ehlo()
        c.sendmail("sender@example.net", ["joe@example.org"],
                   ("Subject: %s\r\n\r\nbody\r\n" % subject).encode("utf-8"), mail_options=["SMTPUTF8"])
    script = Script()                                     # no SMTPUTF8 offered
    assert atrn(provider, script) == "quit"
    wait_sessions_over(provider)
    if returned:
        assert script.messages == [] and not any(c.startswith("MAIL") for c in script.commands)
        dsn = the_dsn(provider)
        [status] = [p for p in dsn.iter_parts() if "delivery-status" in p.get_content_type()]
        assert "5.6.7" in str(status)
    else:                                                 # nothing in it needs SMTPUTF8
        [got] = script.messages
        assert "SMTPUTF8" not in got["mail"].upper()
