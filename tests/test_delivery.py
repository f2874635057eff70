"""Delivery after the turnaround when the customer misbehaves (SPEC §4, §7).

Each test spools real mail through the SMTP intake, logs in on the ODMR port,
sends ATRN and then plays a scripted (often broken) customer SMTP server on
the reversed socket. The invariant everywhere: no message is lost (it is
delivered, kept with its attempt counted, or returned to its sender with a
DSN), and none is retried forever.
"""
from __future__ import annotations

import os
import time

import pytest

from helpers import (Closed, SENDER_HOSTED, SENDER_OUTSIDE, Script, atrn, dsns, hosting_provider, queue,
                     report_fields, send_mail, spool, wait_sessions_over)
from odmr import delivery, queuemgr
from odmr.spool import Spool

pytestmark = pytest.mark.slow                   # each test a provider and a full ATRN session


# -- the scripted customer server -----------------------------------------------


# -- helpers -----------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["pipelining", "lockstep"])
def pipelining(request):
    return request.param


def script_with(pipelining: bool, **hooks) -> Script:
    s = Script()
    if not pipelining:
        s.extensions = [e for e in s.extensions if e != "PIPELINING"]
    for name, fn in hooks.items():
        setattr(s, name, fn)
    return s


# -- the greeting ----------------------------------------------------------------

@pytest.mark.parametrize("greeting", ["421 4.3.2 busy, come back later", "554 5.3.2 no service"])
def test_refusing_greeting_gets_quit_and_mail_is_kept(provider, greeting):
    spool(provider, ["u@example.org"])
    s = Script()
    s.greeting = greeting
    assert atrn(provider, s) == "quit"
    assert s.commands == ["QUIT"]
    wait_sessions_over(provider)
    [record] = queue(provider, "example.org")
    assert record["attempts"] == 0


# -- the connection breaks -----------------------------------------------------------

def test_disconnect_mid_data_keeps_mail_and_counts_attempt(provider, pipelining):
    spool(provider, ["u@example.org"], token="one")
    spool(provider, ["v@example.org"], token="two")
    s = script_with(pipelining, in_data=lambda line, n: n < 2)
    assert atrn(provider, s) == "dropped"
    wait_sessions_over(provider)
    records = queue(provider, "example.org")
    assert len(records) == 2
    first = [r for r in records if r["recipients"] == ["u@example.org"]][0]
    assert first["attempts"] == 1 and "connection" in first["last_error"]
    # the next ATRN delivers both
    s2 = Script()
    assert atrn(provider, s2) == "quit"
    wait_sessions_over(provider)
    assert sorted(m["rcpts"][0] for m in s2.messages) == ["u@example.org", "v@example.org"]
    assert queue(provider, "example.org") == []


@pytest.mark.parametrize("where", ["next MAIL", "next DATA"])
def test_disconnect_after_an_accepted_message_keeps_only_the_rest(provider, pipelining, where):
    """The first message's 250 arrived before the connection broke: it is delivered
    (removed, never sent again) even though the pipelined loop records it only later."""
    spool(provider, ["u@example.org"], token="one")
    spool(provider, ["v@example.org"], token="two")
    s = script_with(pipelining)
    if where == "next MAIL":
        def mail(arg):
            if s.messages:
                raise Closed()                 # hang up instead of answering
            return "250 2.1.0 ok"
        s.mail = mail
    else:
        s.in_data = lambda line, n: not (s.messages and n >= 1)
    assert atrn(provider, s) in ("closed", "dropped")
    wait_sessions_over(provider)
    assert [m["rcpts"] for m in s.messages] == [["u@example.org"]]
    [left] = queue(provider, "example.org")
    assert left["recipients"] == ["v@example.org"]
    assert left["attempts"] == 1 and "connection" in left["last_error"]
    s2 = Script()
    assert atrn(provider, s2) == "quit"
    wait_sessions_over(provider)
    assert [m["rcpts"] for m in s2.messages] == [["v@example.org"]]


def test_a_message_leaves_the_queue_before_the_next_one_can_be_accepted(provider, pipelining,
                                                                       monkeypatch):
    """SPEC §7: a crash re-delivers at most the one message in flight. So by the
    time the customer holds the end of message n+1, message n is out of the queue
    (a slowed-down removal shows whether the provider waits for it)."""
    real_retire = Spool.retire

    def slow_retire(self, message, has_state=True):
        time.sleep(0.1)
        return real_retire(self, message, has_state)
    monkeypatch.setattr(Spool, "retire", slow_retire)
    for n in range(4):
        spool(provider, ["u%d@example.org" % n], token=str(n))
    still_queued = []

    def final(message):
        waiting = {r for m in queue(provider, "example.org") for r in m["recipients"]}
        still_queued.extend(sorted(waiting & {r for m in s.messages for r in m["rcpts"]}))
        return "250 2.0.0 stored"

    s = script_with(pipelining, final=final)
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    assert len(s.messages) == 4
    assert still_queued == []


@pytest.fixture
def impatient(tmp_path):
    """The provider fixture's accounts; its deliveries wait a second for any reply."""
    p = hosting_provider(str(tmp_path), delivery_timeouts=delivery.Timeouts(*([1.0] * 7)))
    yield p
    p.stop()


def test_customer_that_stops_answering_is_timed_out(impatient, pipelining):
    provider = impatient
    spool(provider, ["u@example.org"])
    # reads everything from MAIL on and never answers again
    s = script_with(pipelining, mail=lambda arg: None, rcpt=lambda a: None, data=lambda r: None)
    started = time.monotonic()
    assert atrn(provider, s) == "closed"                       # the provider hung up on us
    assert time.monotonic() - started < 8
    wait_sessions_over(provider)
    [record] = queue(provider, "example.org")
    assert record["attempts"] == 1 and "timeout" in record["last_error"]


@pytest.mark.parametrize("garbage", ["hello there", "25O ok", "2500 ok", "", "999 what"])
def test_garbage_reply_ends_session_and_keeps_mail(provider, garbage, pipelining):
    spool(provider, ["u@example.org"])
    s = script_with(pipelining, mail=lambda arg: garbage)
    assert atrn(provider, s) == "closed"
    wait_sessions_over(provider)
    [record] = queue(provider, "example.org")
    assert record["attempts"] == 1
    assert s.messages == []


# -- refusals at each stage ----------------------------------------------------------

STAGES = {
    "MAIL": lambda code: dict(mail=lambda arg: "%d %s.0.0 no" % (code, str(code)[0])),
    "RCPT": lambda code: dict(rcpt=lambda a: "%d %s.1.1 no" % (code, str(code)[0])),
    "DATA": lambda code: dict(data=lambda r: "%d %s.3.0 no" % (code, str(code)[0])),
    "final": lambda code: dict(final=lambda m: "%d %s.6.0 no" % (code, str(code)[0])),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_4xx_keeps_mail_for_next_atrn(provider, stage, pipelining):
    spool(provider, ["u@example.org"], token="a")
    spool(provider, ["w@example.org"], token="b")
    s = script_with(pipelining, **STAGES[stage](451))
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    records = queue(provider, "example.org")
    assert len(records) == 2
    for record in records:
        assert record["attempts"] == 1
        assert record["last_error"].startswith("451 4.")
    assert dsns(provider) == []
    # the session stayed in step: a good customer gets everything next time
    s2 = Script()
    assert atrn(provider, s2) == "quit"
    wait_sessions_over(provider)
    assert len(s2.messages) == 2 and queue(provider, "example.org") == []


@pytest.mark.parametrize("stage", list(STAGES))
def test_5xx_bounces_to_sender_and_removes(provider, stage, pipelining):
    spool(provider, ["u@example.org"], token="a")
    spool(provider, ["w@example.org"], token="b")
    s = script_with(pipelining, **STAGES[stage](550))
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    assert queue(provider, "example.org") == []
    notices = dsns(provider)
    assert len(notices) == 2
    for dsn in notices:
        [fields] = report_fields(dsn)
        assert fields["action"] == "failed"
        assert fields["status"].startswith("5.")
        assert "550" in fields["diagnostic-code"]
        assert dsn["To"] == "<%s>" % SENDER_HOSTED
    # the DSN is itself collectable by bob, and never bounces back
    s2 = Script()
    s2.rcpt = lambda a: "550 5.1.1 no such user"
    assert atrn(provider, s2, domain="example.net", user="bob") == "quit"
    wait_sessions_over(provider)
    assert queue(provider) == []


def test_partial_recipient_acceptance(provider, pipelining):
    spool(provider, ["a@example.org", "b@example.org", "c@example.org"])
    replies = {"a@example.org": "250 ok", "b@example.org": "452 4.2.2 mailbox full",
               "c@example.org": "550 5.1.1 unknown"}
    s = script_with(pipelining, rcpt=lambda a: replies[a])
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    assert [m["rcpts"] for m in s.messages] == [["a@example.org"]]
    [record] = queue(provider, "example.org")
    assert record["recipients"] == ["b@example.org"]
    assert record["last_error"].startswith("452")
    [dsn] = dsns(provider)
    [fields] = report_fields(dsn)
    assert fields["final-recipient"] == "rfc822; c@example.org" and fields["status"] == "5.1.1"
    # next ATRN: only b is offered
    s2 = script_with(pipelining)
    assert atrn(provider, s2) == "quit"
    wait_sessions_over(provider)
    assert [m["rcpts"] for m in s2.messages] == [["b@example.org"]]
    assert queue(provider, "example.org") == []
    assert len(dsns(provider)) == 1          # c was bounced once, not again


def test_421_mid_session_keeps_the_rest(provider, pipelining):
    for n in range(3):
        spool(provider, ["u%d@example.org" % n], token=str(n))
    seen = []

    def rcpt(address):
        seen.append(address)
        return "250 ok" if len(seen) == 1 else "421 4.3.2 shutting down"

    s = script_with(pipelining, rcpt=rcpt)       # answers 421 but keeps the connection open
    result = atrn(provider, s)
    assert result in ("closed", "quit")
    wait_sessions_over(provider)
    assert len(s.messages) == 1
    # after the 421 the provider starts nothing new (RFC 5321 §3.8)
    assert sum(c.upper().startswith("MAIL") for c in s.commands) == 2, s.commands
    records = queue(provider, "example.org")
    assert len(records) == 2
    assert any("421 4.3.2" in r["last_error"] for r in records)


# -- pipelined replies out of step ------------------------------------------------------

def test_extra_reply_out_of_step_never_marks_delivered(provider):
    """A customer that answers MAIL twice shifts every reply: DATA then gets a 250."""
    spool(provider, ["u@example.org"])
    s = Script()
    s.mail = lambda arg: "250 ok\r\n250 ok"
    assert atrn(provider, s) == "closed"
    wait_sessions_over(provider)
    [record] = queue(provider, "example.org")
    assert record["attempts"] == 1 and "out of step" in record["last_error"]
    assert s.messages == []


def test_354_to_rcpt_is_out_of_step(provider):
    spool(provider, ["u@example.org", "v@example.org"])
    s = Script()
    s.rcpt = lambda a: "354 go ahead"
    assert atrn(provider, s) == "closed"
    wait_sessions_over(provider)
    [record] = queue(provider, "example.org")
    assert record["recipients"] == ["u@example.org", "v@example.org"] and record["attempts"] == 1


def test_missing_reply_is_a_timeout_not_a_success(impatient):
    """Pipelined: one reply short (no RCPT reply) -> the provider waits, times out, keeps."""
    provider = impatient
    spool(provider, ["u@example.org"])
    s = Script()
    s.rcpt = lambda a: None
    assert atrn(provider, s) == "closed"
    wait_sessions_over(provider)
    [record] = queue(provider, "example.org")
    assert record["attempts"] == 1


# -- repeated 4xx ends in expiry, not in eternal retries --------------------------------

def test_repeated_4xx_expires_with_dsn(provider):
    spool(provider, ["u@example.org"])
    for _ in range(2):
        s = Script()
        s.rcpt = lambda a: "450 4.2.1 try later"
        assert atrn(provider, s) == "quit"
        wait_sessions_over(provider)
    [record] = queue(provider, "example.org")
    assert record["attempts"] == 2
    runtime = provider.service.runtime
    counts = queuemgr.expire_all(runtime, now=time.time() + runtime.settings.queue.max_age + 60)
    assert counts["expired"] == 1
    assert queue(provider, "example.org") == []
    [dsn] = dsns(provider)
    [fields] = report_fields(dsn)
    assert fields["status"] == "5.4.7" and "450 4.2.1" in fields["diagnostic-code"]


# -- sizes and content -------------------------------------------------------------------

def test_large_message_and_dot_stuffing_survive(provider, pipelining):
    body = b"Subject: big\r\n\r\n" + b"".join(b".line %06d\r\n" % n for n in range(60000))
    send_mail(provider.smtp_port, SENDER_HOSTED, ["u@example.org"], body)
    spool(provider, ["v@example.org"])
    s = script_with(pipelining)
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    assert len(s.messages) == 2
    big = [m for m in s.messages if m["rcpts"] == ["u@example.org"]][0]
    assert big["data"].endswith(body)


def test_no_dsn_for_null_sender(provider, pipelining):
    spool(provider, ["u@example.org"], sender="")
    s = script_with(pipelining, rcpt=lambda a: "550 5.1.1 unknown")
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    assert queue(provider) == []


def test_late_failure_after_earlier_bounce_is_notified_too(provider):
    spool(provider, ["a@example.org", "b@example.org"])
    first = {"a@example.org": "550 5.1.1 gone", "b@example.org": "451 4.3.0 later"}
    s = Script()
    s.rcpt = lambda a: first[a]
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    assert len(dsns(provider)) == 1
    s2 = Script()
    s2.rcpt = lambda a: "553 5.1.3 refused now"
    assert atrn(provider, s2) == "quit"
    wait_sessions_over(provider)
    assert queue(provider, "example.org") == []
    notified = sorted(f["final-recipient"] for d in dsns(provider) for f in report_fields(d))
    assert notified == ["rfc822; a@example.org", "rfc822; b@example.org"]


# -- 8BITMIME towards a customer that does not offer it (RFC 6152 §3) ----------------

def _spool_8bitmime(provider, rcpt: str, text: bytes) -> None:
    import smtplib
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        assert s.sendmail(SENDER_HOSTED, [rcpt], b"Subject: 8bit\r\n\r\n" + text + b"\r\n",
                          mail_options=["BODY=8BITMIME"]) == {}


@pytest.mark.parametrize("big", [False, True], ids=["in-memory", "streamed"])
def test_8bit_mail_is_returned_not_sent_raw_to_a_7bit_customer(provider, pipelining, monkeypatch, big):
    if big:
        monkeypatch.setattr(delivery, "INLINE_BODY", 16)   # take the streamed path for the scan
    _spool_8bitmime(provider, "u@example.org", b"x" * 100 + b"\r\ngr\xc3\xbc\xc3\x9fe")
    _spool_8bitmime(provider, "v@example.org", b"plain ascii, declared 8bit")
    s = script_with(pipelining)
    s.extensions = [e for e in s.extensions if e != "8BITMIME"]
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    # the ASCII one goes out (without BODY=, which this customer does not know); the 8-bit one
    # is never sent raw but returned to its sender
    assert [m["rcpts"] for m in s.messages] == [["v@example.org"]]
    assert not any("BODY=" in c.upper() for c in s.commands)
    assert queue(provider, "example.org") == []
    [dsn] = dsns(provider)
    [fields] = report_fields(dsn)
    assert fields["status"] == "5.6.3" and "u@example.org" in fields["final-recipient"]


def test_8bit_mail_goes_to_a_customer_that_offers_8bitmime(provider):
    _spool_8bitmime(provider, "u@example.org", b"gr\xc3\xbc\xc3\x9fe")
    s = Script()
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    [m] = s.messages
    assert "BODY=8BITMIME" in m["mail"].upper() and b"gr\xc3\xbc\xc3\x9fe" in m["data"]


# -- damaged state files (valid JSON, wrong shape) ----------------------------------------

@pytest.mark.parametrize("content", [b"5", b"[1, 2]", b'{"done": null}', b'{"attempts": "3"}',
                                     b'{"done": {"u0@example.org": 5}, "bounced": "yes"}',
                                     b'{"last_attempt": true, "failed": []}'])
def test_a_state_file_of_the_wrong_shape_never_stops_the_domain(provider, content):
    for n in range(3):
        spool(provider, ["u%d@example.org" % n], token=str(n))
    directory = os.path.join(provider.spool_dir, "example.org")
    oldest = sorted(n for n in os.listdir(directory) if len(n) > 13 and "." not in n)[0]
    with open(os.path.join(directory, oldest + ".state"), "wb") as fh:
        fh.write(content)
    assert len(queue(provider, "example.org")) == 3               # listing copes
    r = provider.run_cli("queue", "list", "--json")
    assert r.returncode == 0, r.stderr
    s = Script()
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    assert sorted(m["rcpts"][0] for m in s.messages) == ["u0@example.org", "u1@example.org",
                                                           "u2@example.org"]
    assert queue(provider, "example.org") == []
    assert not [n for n in os.listdir(directory) if n.endswith(".state")]


def test_a_damaged_field_keeps_the_good_ones(provider):
    """Recipients already delivered stay delivered when another field is damaged."""
    spool(provider, ["u@example.org", "v@example.org"])
    directory = os.path.join(provider.spool_dir, "example.org")
    [msg_id] = [n for n in os.listdir(directory) if len(n) > 13 and "." not in n]
    with open(os.path.join(directory, msg_id + ".state"), "wb") as fh:
        fh.write(b'{"attempts": "3", "done": {"u@example.org": "250 ok"}}')
    s = Script()
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    assert [m["rcpts"] for m in s.messages] == [["v@example.org"]]


def test_a_421_at_the_end_of_data_does_not_charge_the_next_message(provider):
    for n in range(2):
        send_mail(provider.smtp_port, SENDER_OUTSIDE, ["x@example.org"], b"Subject: %d\r\n\r\nhi\r\n" % n)
    script = Script()                                     # PIPELINING, no CHUNKING
    script.final = lambda message: "421 4.3.2 shutting down"
    assert atrn(provider, script) == "closed"
    wait_sessions_over(provider)
    records = sorted(queue(provider, "example.org"), key=lambda r: r["attempts"])
    assert [r["attempts"] for r in records] == [0, 1], records
