"""Mail loops end at intake (RFC 5321 §6.3): a message with more Received: fields
than `max_received_headers`, or that has passed through this host for the same
domain too often, is refused with 554 5.4.6 at the SMTP port and by `odmrd
enqueue`; an ODMR customer relaying its domain back to the MX is stopped after a
few rounds. Real sockets: a provider in this process, smtplib, a scripted customer."""
from __future__ import annotations

import smtplib
from typing import List

import pytest

from helpers import Provider, SENDER_OUTSIDE, Script, atrn, queue, send_mail, wait_sessions_over
from odmr.exits import EX_DATAERR, EX_OK
from odmr.replies import MAIL_LOOP, TOO_MANY_HOPS


def message(received: List[bytes], body: bytes = b"hello\r\n") -> bytes:
    return b"".join(received) + b"Subject: loop test\r\n\r\n" + body


def foreign_hop(n: int) -> bytes:
    return b"Received: from h%d.test by mx%d.test with ESMTP; Thu, 1 Jan 2026 00:00:00 +0000\r\n" % (n, n)


OWN_HOP = (b"Received: from customer.test (customer.test [127.0.0.1])\r\n"
           b"\tby odmr.test (odmrd) with ESMTP id 1234;\r\n\tThu, 1 Jan 2026 00:00:00 +0000\r\n")


def submit(p: Provider, data: bytes, rcpt: str = "x@example.org"):
    """The intake's reply to the message: (code, text)."""
    with smtplib.SMTP("127.0.0.1", p.smtp_port, timeout=10) as c:
        try:
            c.sendmail(SENDER_OUTSIDE, [rcpt], data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
    return 250, ""


@pytest.mark.parametrize("hops, code", [(30, 250), (31, 554)])
def test_received_fields_over_the_limit_are_a_mail_loop(provider, hops, code):
    reply = submit(provider, message([foreign_hop(i) for i in range(hops)]))
    assert reply[0] == code, reply
    if code == 554:
        assert reply == (TOO_MANY_HOPS[0], TOO_MANY_HOPS[1] % (31, 30))
        assert provider.spooled("example.org") == []          # nothing kept
    else:
        assert len(provider.spooled("example.org")) == 1


def test_received_fields_are_counted_in_every_spelling_and_only_in_the_header(provider):
    spellings = [b"RECEIVED: from a.test by b.test; x\r\n", b"received :from a\r\n\tby b; x\r\n",
                 b"Received:\r\n from a by b; x\r\n"]
    header = [spellings[i % 3] for i in range(31)]
    assert submit(provider, message(header))[0] == 554
    # the same lines in the body are text, not trace fields
    body = b"".join(foreign_hop(i) for i in range(200))
    assert submit(provider, message([foreign_hop(0)], body))[0] == 250


def test_the_limit_is_a_setting(tmp_path):
    p = Provider(str(tmp_path), smtp_extra="max_received_headers = 3")
    p.add_user("alice", ["example.org"])
    p.start()
    try:
        assert submit(p, message([foreign_hop(i) for i in range(3)]))[0] == 250
        assert submit(p, message([foreign_hop(i) for i in range(4)]))[0] == 554
    finally:
        p.stop()


def test_a_message_that_keeps_coming_back_here_is_refused(provider):
    assert submit(provider, message([OWN_HOP, OWN_HOP]))[0] == 250
    reply = submit(provider, message([OWN_HOP, foreign_hop(1), OWN_HOP, OWN_HOP]))
    assert reply == (MAIL_LOOP[0], MAIL_LOOP[1] % 3)


def test_a_customer_that_relays_its_domain_back_to_the_mx_is_stopped(provider):
    """The ODMR loop: every message the customer collects goes back to the provider's
    MX. It goes round a few times, then the intake refuses it (RFC 5321 §6.3)."""
    send_mail(provider.smtp_port, SENDER_OUTSIDE, ["x@example.org"], message([], b"round and round\r\n"))
    rounds = 0
    refused = None
    while refused is None and rounds < 20:
        script = Script()
        assert atrn(provider, script) == "quit"
        wait_sessions_over(provider)
        [collected] = script.messages
        rounds += 1
        code, text = submit(provider, collected["data"])
        if code != 250:
            refused = (code, text)
    assert refused == (MAIL_LOOP[0], MAIL_LOOP[1] % 3), refused
    assert rounds == 3
    assert queue(provider, "example.org") == []


@pytest.mark.slow
def test_enqueue_refuses_a_looping_message(provider):
    data = message([foreign_hop(i) for i in range(31)])
    result = provider.run_cli("enqueue", "-f", SENDER_OUTSIDE, "x@example.org", input=data)
    assert result.returncode == EX_DATAERR
    said = result.stderr.decode()
    assert said.count("\n") == 1 and TOO_MANY_HOPS[1].split(" ", 1)[1] % (31, 30) in said
    assert provider.spooled("example.org") == []
    result = provider.run_cli("enqueue", "-f", SENDER_OUTSIDE, "x@example.org", input=message([OWN_HOP]))
    assert result.returncode == EX_OK, result.stderr


def own_hop_for(address: str) -> bytes:
    return (b"Received: from c.test (c.test [127.0.0.1])\r\n\tby odmr.test (odmrd) with ESMTP id 1\r\n"
            b"\tfor <%s>; Thu, 1 Jan 2026 00:00:00 +0000\r\n" % address.encode())


def test_our_own_fields_count_only_for_the_same_domain(provider):
    """A list at one customer sending to subscribers at others is no loop: only this
    provider's own Received: fields for the same domain count."""
    elsewhere = [own_hop_for("list@a-list.test"), own_hop_for("x@example.net"), own_hop_for("y@b.test")]
    assert submit(provider, message(elsewhere))[0] == 250
    same = [own_hop_for("u@example.org"), own_hop_for("v@Example.ORG"), OWN_HOP]
    assert submit(provider, message(same))[0] == 554
