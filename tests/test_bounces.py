"""Bounces and the bounce relay (SPEC §7): DSNs for outside senders go to `[queue]
bounce_relay` with retries and backoff, a refusal there is stored, quoted and told to the
sender as NOTIFY asks and never bounced again; delay notices once per message when
`warn_after` is set; expiry returns the mail with a DSN.

The in-process provider and a scripted relay MTA, over real sockets on 127.0.0.1.
"""
from __future__ import annotations

import email
import logging
import os
import smtplib
import time

import pytest

from helpers import (Provider, ScriptedMTA, SENDER_HOSTED, SENDER_REMOTE, Script, atrn, dsns, eventually,
                     queue, queue_provider, relay_provider, report_fields, spool, wait_sessions_over)
from odmr.bounce_relay import RelayTimings


@pytest.mark.slow
@pytest.mark.parametrize("refusals", [["greeting:421 4.3.2 not now", "rcpt:451 4.3.0 later"], []],
                         ids=["refused-twice-then-accepted", "accepted"])
def test_bounce_for_outside_sender_goes_to_the_relay_with_retries(tmp_path, refusals):
    sink = ScriptedMTA(refusals)
    p = relay_provider(tmp_path, sink)
    try:
        spool(p, ["u@example.org"], sender=SENDER_REMOTE, token="tok1")
        s = Script()
        s.rcpt = lambda a: "550 5.1.1 no such user"
        assert atrn(p, s) == "quit"
        wait_sessions_over(p)
        assert queue(p, "example.org") == []
        assert eventually(lambda: sink.messages, 15), "relay never got the bounce"
        [relayed] = sink.messages
        assert relayed["mail"].upper().split()[:2] == ["MAIL", "FROM:<>"]
        assert relayed["rcpts"] == [SENDER_REMOTE]
        dsn = email.message_from_bytes(relayed["data"])
        [fields] = report_fields(dsn)
        assert fields["action"] == "failed" and fields["status"] == "5.1.1"
        assert b"tok1" in relayed["data"]                        # the original headers come back
        assert sink.connections >= len(refusals) + 1
        assert eventually(lambda: queue(p) == [], 15)
    finally:
        p.stop()
        sink.close()


@pytest.mark.slow
def test_relay_refusing_a_bounce_for_good_drops_it_never_bounces_it(tmp_path, caplog):
    sink = ScriptedMTA(["rcpt:550 5.1.1 no such sender"] * 5)
    p = relay_provider(tmp_path, sink)
    try:
        spool(p, ["u@example.org"], sender=SENDER_REMOTE)
        s = Script()
        s.rcpt = lambda a: "550 5.1.1 no"
        with caplog.at_level(logging.ERROR, logger="odmrd.maintenance"):
            assert atrn(p, s) == "quit"
            wait_sessions_over(p)
            assert eventually(lambda: queue(p) == [] and sink.connections >= 1, 10)
        assert sink.messages == []
        assert any("never bounced" in r.getMessage() for r in caplog.records)
        assert not any(os.listdir(os.path.join(p.spool_dir, d)) for d in ("example.net",)
                       if os.path.isdir(os.path.join(p.spool_dir, d)))
    finally:
        p.stop()
        sink.close()


def test_relay_backoff_grows():
    timings = RelayTimings(backoff=0.2, backoff_max=30.0)
    assert timings.delay(0) == 0
    assert timings.delay(1) == 0.2
    assert timings.delay(1) < timings.delay(2) < timings.delay(3)
    assert timings.delay(50) == 30.0


def to_postmaster(provider: Provider, notify: str = "") -> None:
    """bob's mail to the bare postmaster (odmr.test is not hosted: it waits in OUTBOUND)."""
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as c:
        c.sendmail(SENDER_HOSTED, ["postmaster"], b"Subject: to the postmaster\r\n\r\nhi\r\n",
                   rcpt_options=["NOTIFY=" + notify] if notify else [])


@pytest.mark.parametrize("notify, notices", [("NEVER", 0), ("FAILURE", 1), ("", 1)])
def test_relay_refusal_notifies_the_sender_as_notify_asks(tmp_path, notify,
                                                          notices):
    """A refusal by the bounce relay is recorded as a customer's is: RFC 3461 NOTIFY=NEVER
    means no DSN, whoever refused."""
    sink = ScriptedMTA(["rcpt:550 5.1.1 no such mailbox"] * 50)
    p = relay_provider(tmp_path, sink)
    try:
        to_postmaster(p, notify)
        assert eventually(lambda: sink.connections >= 1 and queue(p, ".outbound") == [], 10)
        assert len([d for d in dsns(p) if report_fields(d)[0]["action"] == "failed"]) == notices
        assert sink.messages == []
    finally:
        p.stop()
        sink.close()


@pytest.mark.parametrize("code", ["451 4.3.0", "550 5.1.1"])
def test_relay_replies_are_stored_and_quoted_escaped(tmp_path, caplog, code):
    """A control character in the relay's reply reaches neither `queue list`, nor the
    log, nor the DSN: it is escaped as a customer's reply is."""
    sink = ScriptedMTA(["rcpt:%s \x1b[31mno\x07" % code] * 50)
    p = relay_provider(tmp_path, sink)
    try:
        with caplog.at_level(logging.INFO, logger="odmrd"):
            to_postmaster(p)
            if code.startswith("4"):
                assert eventually(lambda: [m["attempts"] for m in queue(p, ".outbound")] >= [1], 10)
                [waiting] = queue(p, ".outbound")
                assert waiting["last_error"] == code + " \\x1b[31mno\\x07"
            else:
                assert eventually(lambda: queue(p, ".outbound") == [] and dsns(p), 10)
                [dsn] = dsns(p)
                assert "\\x1b[31mno" in dsn.as_string() and "\x1b" not in dsn.as_string()
        logged = [r.getMessage() for r in caplog.records if "relay" in r.getMessage()]
        assert logged and not any("\x1b" in line for line in logged)
    finally:
        p.stop()
        sink.close()


@pytest.mark.slow
def test_relay_refusal_whose_dsn_cannot_be_queued_keeps_the_message(tmp_path,
                                                                     caplog):
    """The postmaster's mail refused for good by the relay, and the sender's DSN cannot be
    spooled (a file stands where bob's domain directory belongs): the message stays in
    OUTBOUND, its failure recorded, until the DSN can be queued; the notice is never lost."""
    sink = ScriptedMTA(["rcpt:550 5.1.1 no such mailbox"])
    p = relay_provider(tmp_path, sink)
    blocker = os.path.join(p.spool_dir, "example.net")
    try:
        with open(blocker, "w") as fh:
            fh.write("not a directory\n")
        with caplog.at_level(logging.ERROR, logger="odmrd"):
            to_postmaster(p)
            assert eventually(lambda: any("cannot queue" in r.getMessage()
                                        for r in caplog.records), 10)
        # the error is logged just before the failure is saved: wait for the saved state
        assert eventually(lambda: [r["recipients"] for r in queue(p, ".outbound")] == [[]], 10)
        [kept] = queue(p, ".outbound")
        assert kept["last_error"].startswith("550 5.1.1")
        os.remove(blocker)
        assert eventually(lambda: queue(p, ".outbound") == [] and dsns(p), 10)
        [dsn] = dsns(p)
        [fields] = report_fields(dsn)
        assert fields["action"] == "failed" and fields["status"] == "5.1.1"
        assert sink.connections == 1                # the relay was not asked again
    finally:
        if os.path.isfile(blocker):
            os.remove(blocker)
        p.stop()
        sink.close()


def test_delay_notice_once_per_message_only_when_warn_after_is_set(tmp_path):
    p = queue_provider(tmp_path, "warn_after = 4h\nmax_age = 5d")
    try:
        spool(p, ["u@example.org"], token="late")
        m = p.service.maintenance
        assert m.run_once(now=time.time() + 3600).get("warned") == 0
        assert m.run_once(now=time.time() + 5 * 3600)["warned"] == 1
        assert m.run_once(now=time.time() + 6 * 3600)["warned"] == 0
        [dsn] = dsns(p)
        [fields] = report_fields(dsn)
        assert fields["action"] == "delayed" and fields["status"] == "4.4.1"
        assert fields["diagnostic-code"].startswith("smtp; 451 4.4.1 waiting")
        assert "Delayed" in dsn["Subject"]
        [record] = queue(p, "example.org")                # the message itself still waits
        assert record["recipients"] == ["u@example.org"]
    finally:
        p.stop()


@pytest.mark.slow
def test_waiting_recipient_is_described_by_its_own_error_not_anothers(tmp_path):
    """r1 refused for good (550), r2 deferred (451): the queue, the delay notice and the
    expiry DSN for r2 all speak of r2's 451, never of r1's 550."""
    p = queue_provider(tmp_path, "warn_after = 1h\nmax_age = 5d")
    try:
        spool(p, ["r1@example.org", "r2@example.org"], token="mixed")
        s = Script()
        s.rcpt = lambda a: "550 5.1.1 no such user r1" if a.startswith("r1") else "451 4.3.0 try later r2"
        assert atrn(p, s) == "quit"
        wait_sessions_over(p)
        [record] = queue(p, "example.org")
        assert record["recipients"] == ["r2@example.org"]
        assert record["last_error"].startswith("451 4.3.0")
        [bounce] = dsns(p)                             # r1's 550 was returned at once
        assert report_fields(bounce)[0]["status"] == "5.1.1"
        for old in list(p.spool.messages("example.net")):
            p.spool.remove(old)
        m = p.service.maintenance
        assert m.run_once(now=time.time() + 2 * 3600)["warned"] == 1
        [delay] = dsns(p)
        [fields] = report_fields(delay)
        assert fields["action"] == "delayed" and fields["status"] == "4.3.0"
        assert "r2" in fields["diagnostic-code"] and "r1" not in fields["diagnostic-code"]
    finally:
        p.stop()


def test_no_delay_notice_by_default(provider):
    spool(provider, ["u@example.org"])
    counts = provider.service.maintenance.run_once(now=time.time() + 9 * 86400)
    assert "warned" not in counts
    assert dsns(provider) == []


def test_maintenance_expires_old_mail_with_dsn(provider):
    spool(provider, ["u@example.org"], token="old")
    counts = provider.service.maintenance.run_once(now=time.time() + 11 * 86400)
    assert counts["expired"] == 1
    assert queue(provider, "example.org") == []
    [dsn] = dsns(provider)
    assert report_fields(dsn)[0]["status"] == "5.4.7"
