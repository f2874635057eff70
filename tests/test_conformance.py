"""Standards conformance at the edges (issue 15): mail loops (RFC 5321 §6.3), the
domainless postmaster (§4.5.1), DSNs about internationalised addresses (RFC 6533),
and the bounce relay's 8BITMIME/SMTPUTF8 (RFC 6152 §3, RFC 6531 §3.2).

Everything over real sockets: a real provider in this process, smtplib clients,
a scripted customer after ATRN, and a small relay server for bounce_relay."""
from __future__ import annotations

import base64
import email
import email.policy
import os
import re
import smtplib
import time
from typing import List

import pytest

from helpers import (Provider, RelaySink, Script, Scripted, atrn, deliver_one, err, queue, quit_,
                     relay_provider, run_fetch, scripted_args, send_mail, wait_sessions_over)
from odmr.exits import EX_DATAERR, EX_NOPERM, EX_OK, EX_TEMPFAIL
from odmr.spool import OUTBOUND

SENDER = "sender@outside.test"


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
            c.sendmail(SENDER, [rcpt], data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
    return 250, ""


# -- mail loops ---------------------------------------------------------------------

@pytest.mark.parametrize("hops, code", [(30, 250), (31, 554)])
def test_received_fields_over_the_limit_are_a_mail_loop(provider, hops, code):
    reply = submit(provider, message([foreign_hop(i) for i in range(hops)]))
    assert reply[0] == code, reply
    if code == 554:
        assert reply[1].startswith("5.4.6 ") and "hops" in reply[1]
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
    code, text = submit(provider, message([OWN_HOP, foreign_hop(1), OWN_HOP, OWN_HOP]))
    assert code == 554 and text.startswith("5.4.6 ") and "loop" in text.lower()


def test_a_customer_that_relays_its_domain_back_to_the_mx_is_stopped(provider):
    """The ODMR loop: every message the customer collects goes back to the provider's
    MX. It goes round a few times, then the intake refuses it (RFC 5321 §6.3)."""
    send_mail(provider.smtp_port, SENDER, ["x@example.org"], message([], b"round and round\r\n"))
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
    assert refused is not None and refused[0] == 554 and refused[1].startswith("5.4.6"), refused
    assert rounds == 3
    assert queue(provider, "example.org") == []


@pytest.mark.slow
def test_enqueue_refuses_a_looping_message(provider):
    data = message([foreign_hop(i) for i in range(31)])
    result = provider.run_cli("enqueue", "-f", SENDER, "x@example.org", input=data)
    assert result.returncode == EX_DATAERR
    assert result.stderr.decode().count("\n") == 1 and "hops" in result.stderr.decode()
    assert provider.spooled("example.org") == []
    result = provider.run_cli("enqueue", "-f", SENDER, "x@example.org", input=message([OWN_HOP]))
    assert result.returncode == EX_OK, result.stderr


# -- the domainless postmaster --------------------------------------------------------

@pytest.fixture
def relayed(tmp_path, fast_maintenance):
    """A provider whose bounce_relay is a RelaySink offering `features`: (provider, sink)."""
    made = []

    def make(features=("8BITMIME",)):
        sink = RelaySink([], features=list(features))
        made.append(sink)
        p = relay_provider(tmp_path, sink)
        made.append(p)
        return p, sink
    yield make
    for thing in reversed(made):
        thing.stop() if isinstance(thing, Provider) else thing.close()


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def test_postmaster_works_out_of_the_box_through_the_bounce_relay(relayed):
    p, sink = relayed()
    send_mail(p.smtp_port, SENDER, ["postmaster"], b"Subject: abuse report\r\n\r\nhi\r\n")
    p.service.maintenance.wake()
    assert wait_for(lambda: sink.messages, 15), "the relay never got the postmaster's mail"
    [got] = sink.messages
    assert got["rcpts"] == ["postmaster@odmr.test"]
    assert got["mail"].split()[1].upper() == "FROM:<%s>" % SENDER.upper()   # not <>
    assert b"abuse report" in got["data"]
    assert wait_for(lambda: queue(p) == [], 5)


def test_enqueue_to_the_bare_postmaster(provider):
    result = provider.run_cli("enqueue", "-f", SENDER, "postmaster", input=b"Subject: x\r\n\r\nhi\r\n")
    assert result.returncode == EX_OK, result.stderr
    [record] = queue(provider, OUTBOUND)
    assert record["recipients"] == ["postmaster@odmr.test"]


# -- DSNs about internationalised addresses (RFC 6533) ----------------------------------

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


# -- the bounce relay converts nothing ------------------------------------------------

@pytest.mark.parametrize("rcpt, subject", [("joe@example.org", "grüße"), ("jörg@example.org", "plain")],
                         ids=["utf8-header", "utf8-address"])
def test_dsns_about_internationalised_mail_reach_a_7bit_relay_in_7_bits(relayed, rcpt,
                                                                        subject):
    p, sink = relayed(features=[])
    with smtplib.SMTP("127.0.0.1", p.smtp_port, timeout=10) as c:
        c.ehlo()
        c.sendmail(SENDER, [rcpt], ("Subject: %s\r\nX-Long: %s\r\n\r\nbody\r\n"
                                    % (subject, "y" * 2500)).encode("utf-8"),
                   mail_options=["SMTPUTF8"])
    script = Script()
    script.extensions = script.extensions + ["SMTPUTF8"]
    script.rcpt = lambda address: "550 5.1.1 no such user"
    assert atrn(p, script) == "quit"
    wait_sessions_over(p)
    p.service.maintenance.wake()
    assert wait_for(lambda: sink.messages, 15), "the relay never got the DSN"
    [got] = sink.messages
    assert got["rcpts"] == [SENDER]
    assert "8BITMIME" not in got["mail"].upper() and "SMTPUTF8" not in got["mail"].upper()
    assert got["data"].isascii() and max(map(len, got["data"].split(b"\r\n"))) <= 998


def test_8bit_mail_is_never_sent_raw_to_a_7bit_relay(relayed, caplog):
    """The bare postmaster's mail (kept for the relay) with an 8-bit body: refused for
    good by odmrd itself, and its sender told, in 7 bits, through the same relay."""
    p, sink = relayed(features=[])
    with smtplib.SMTP("127.0.0.1", p.smtp_port, timeout=10) as c:
        c.sendmail(SENDER, ["postmaster"], "Subject: x\r\n\r\nGrüße\r\n".encode("utf-8"),
                   mail_options=["BODY=8BITMIME"])
    p.service.maintenance.wake()
    assert wait_for(lambda: sink.messages, 15)
    p.service.maintenance.wake()
    assert wait_for(lambda: queue(p, OUTBOUND) == [], 15)
    assert [m["rcpts"] for m in sink.messages] == [[SENDER]]        # only the DSN
    assert "5.6.3" in sink.messages[0]["data"].decode() and "does not support" in caplog.text


def test_a_7bit_dsn_goes_through_a_7bit_relay(relayed):
    p, sink = relayed(features=[])
    send_mail(p.smtp_port, SENDER, ["joe@example.org"], b"Subject: plain\r\n\r\nbody\r\n")
    script = Script()
    script.rcpt = lambda address: "550 5.1.1 no such user"
    assert atrn(p, script) == "quit"
    wait_sessions_over(p)
    p.service.maintenance.wake()
    assert wait_for(lambda: sink.messages, 15)
    assert "BODY=8BITMIME" not in sink.messages[0]["mail"].upper()


# -- the customer side reads any legal form of a reply (RFC 5321 §4.2.1) -----------------

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

    s = Chatty(atrn_reply="453 4.2.0 You have no mail")
    try:
        result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")))
        assert result.returncode == EX_OK, err(result)
        assert any(l.startswith(b"ATRN") for l in s.commands())
    finally:
        s.close()


# -- fetch's local server and internationalised addresses (RFC 6531) ----------------------

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


# -- ENHANCEDSTATUSCODES on the ODMR port (RFC 2034 §3) ---------------------------------

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


def test_the_odmr_port_advertises_enhanced_codes_and_every_reply_has_one(provider):
    from helpers import Customer
    sent, answers = [], []
    c = Customer(provider.odmr_port)
    try:
        c.reply()                                          # the greeting is exempt
        code, lines = c.cmd("EHLO customer.test")
        assert "ENHANCEDSTATUSCODES" in lines
        for command in ["NOOP", "RSET", "HELP", "BOGUS", "MAIL FROM:<a@b.test>", "ATRN example.org",
                        "AUTH NONSUCH", "AUTH CRAM-MD5", "*", "QUIT"]:
            sent.append(command)
            answers.append(c.cmd(command))
    finally:
        c.close()
    c = Customer(provider.odmr_port)
    try:
        c.login("alice")
        for command in ["ATRN example.net", "ATRN example.org", "ATRN bad..domain", "NOOP", "QUIT"]:
            sent.append(command)
            answers.append(c.cmd(command))
    finally:
        c.close()
    for command, (code, lines) in zip(sent, answers):
        if code == 334:
            continue
        assert code >= 200 and all(ENHANCED.match(l) for l in lines), (command, code, lines)
    assert [a[0] for a in answers[-5:-2]] == [450, 453, 501]


# -- lines longer than SMTP allows go out broken (RFC 5321 §4.5.3.1.6) --------------------

@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
@pytest.mark.parametrize("filler", [0, 700 * 1024], ids=["small", "streamed"])
def test_long_lines_are_broken_on_the_way_to_the_customer(provider, chunking, filler):
    long_line = bytes(range(65, 91)) * 100                         # 2,600 octets, no break
    text = (b"Subject: long\r\nX-Long: " + long_line + b"\r\n\r\n" + long_line + b"\r\n"
            + (b"filler line\r\n" * (filler // 13)) + long_line + b"\r\nend\r\n")
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=30) as c:
        c.sendmail(SENDER, ["x@example.org"], text)
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


# -- internationalised header fields to a customer without SMTPUTF8 (RFC 6531 §3.2) --------

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


# -- a 421 to the final dot charges only the message it answered ---------------------------

def test_a_421_at_the_end_of_data_does_not_charge_the_next_message(provider):
    for n in range(2):
        send_mail(provider.smtp_port, SENDER, ["x@example.org"], b"Subject: %d\r\n\r\nhi\r\n" % n)
    script = Script()                                     # PIPELINING, no CHUNKING
    script.final = lambda message: "421 4.3.2 shutting down"
    assert atrn(provider, script) == "closed"
    wait_sessions_over(provider)
    records = sorted(queue(provider, "example.org"), key=lambda r: r["attempts"])
    assert [r["attempts"] for r in records] == [0, 1], records


def own_hop_for(address: str) -> bytes:
    return (b"Received: from c.test (c.test [127.0.0.1])\r\n\tby odmr.test (odmrd) with ESMTP id 1\r\n"
            b"\tfor <%s>; Thu, 1 Jan 2026 00:00:00 +0000\r\n" % address.encode())


def test_our_own_fields_count_only_for_the_same_domain(provider):
    """A list at one customer sending to subscribers at others is no loop (issue 15.2:
    'this provider's own Received: for the same domain')."""
    elsewhere = [own_hop_for("list@a-list.test"), own_hop_for("x@example.net"), own_hop_for("y@b.test")]
    assert submit(provider, message(elsewhere))[0] == 250
    same = [own_hop_for("u@example.org"), own_hop_for("v@Example.ORG"), OWN_HOP]
    assert submit(provider, message(same))[0] == 554


@pytest.mark.slow
@pytest.mark.parametrize("filler", [0, 600 * 1024], ids=["small", "streamed"])
def test_the_end_of_data_is_always_crlf_dot_crlf(provider, filler):
    """A spool file whose text ends in a bare LF (written by hand, or by an old version):
    the terminator still starts with CRLF (never <LF>.<CRLF>, SPEC §5)."""
    from odmr.spool import Envelope, Recipient
    text = b"Subject: lf\r\n\r\n" + b"filler\r\n" * (filler // 8) + b"ends with LF\n"
    provider.spool.store("example.org", Envelope(SENDER, [Recipient("x@example.org")]), text)
    script = Script()
    assert atrn(provider, script) == "quit"
    [got] = script.messages
    assert got["data"].endswith(b"ends with LF\n\r\n")
