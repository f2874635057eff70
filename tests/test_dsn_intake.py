"""The DSN extension at intake (RFC 3461): advertised, its parameters
stored and passed on to a customer that offers DSN; our own notices follow NOTIFY;
a customer without DSN earns the sender a `relayed` notice when SUCCESS was asked.

Real sockets: a provider in this process, smtplib and raw SMTP at intake, a
scripted customer after ATRN; DSNs parsed with the email package."""
from __future__ import annotations

import time
from typing import List, Optional

import pytest

from helpers import (Customer, SENDER_HOSTED, Script, atrn, dsns, queue, queue_provider, report_fields,
                     wait_sessions_over)


def submit(p, rcpts: List[str], mail_params: str = "", rcpt_params: Optional[List[str]] = None):
    """Raw SMTP at intake, so that every parameter goes as written: the replies to RCPT."""
    c = Customer(p.smtp_port)
    try:
        c.reply()
        code, lines = c.cmd("EHLO client.test")
        assert "DSN" in lines
        assert c.cmd("MAIL FROM:<%s>%s" % (SENDER_HOSTED, mail_params))[0] == 250
        codes = [c.cmd("RCPT TO:<%s>%s" % (r, (rcpt_params or [""] * len(rcpts))[i]))[0]
                 for i, r in enumerate(rcpts)]
        if 250 in codes:
            assert c.cmd("DATA")[0] == 354
            assert c.cmd("Subject: dsn test\r\nX-Token: t\r\n\r\nhi\r\n.")[0] == 250
        return codes
    finally:
        c.close()


@pytest.fixture
def provider(tmp_path):
    p = queue_provider(tmp_path, "warn_after = 4h\nmax_age = 5d")
    yield p
    p.stop()


def test_parameters_are_taken_and_stored(provider):
    codes = submit(provider, ["a@example.org", "b@example.org"], " RET=HDRS ENVID=env+2B1",
                   [" NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+40x.test", " NOTIFY=never"])
    assert codes == [250, 250]
    [msg_id] = provider.spooled("example.org")
    env = provider.spool.load("example.org", msg_id).envelope
    assert (env.ret, env.envid) == ("HDRS", "env+2B1")
    assert [(r.notify, r.orcpt) for r in env.recipients] == [
        ("SUCCESS,FAILURE", "rfc822;a+40x.test"), ("NEVER", "")]


@pytest.mark.parametrize("mail, rcpt, code", [
    (" RET=BOGUS", "", 501), (" ENVID=" + "x" * 101, "", 501),
    ("", " NOTIFY=NEVER,SUCCESS", 501), ("", " NOTIFY=", 501), ("", " NOTIFY=SUCCESS,SUCCESS", 501),
    ("", " ORCPT=no-semicolon", 501), ("", " ORCPT=rfc822;a=b", 501), ("", " XYZZY=1", 555),
    # a keyword given twice (RFC 5321 §4.1.2: at most once)
    (" RET=FULL RET=HDRS", "", 501), (" ENVID=a ENVID=b", "", 501),
    ("", " NOTIFY=SUCCESS NOTIFY=FAILURE", 501),
], ids=["ret", "envid-long", "never-and-more", "notify-empty", "notify-twice", "orcpt-syntax",
        "orcpt-not-xtext", "unknown", "ret-given-twice", "envid-given-twice", "notify-given-twice"])
def test_malformed_parameters_are_refused(provider, mail, rcpt, code):
    c = Customer(provider.smtp_port)
    try:
        c.reply()
        c.cmd("EHLO client.test")
        reply = c.cmd("MAIL FROM:<%s>%s" % (SENDER_HOSTED, mail))
        if mail:
            assert reply[0] == code
            return
        assert reply[0] == 250
        assert c.cmd("RCPT TO:<a@example.org>%s" % rcpt)[0] == code
    finally:
        c.close()


def test_parameters_go_on_to_a_customer_that_offers_dsn(provider):
    submit(provider, ["a@example.org"], " RET=FULL ENVID=e1", [" NOTIFY=SUCCESS ORCPT=rfc822;a@example.org"])
    script = Script()
    script.extensions = script.extensions + ["DSN"]
    assert atrn(provider, script) == "quit"
    wait_sessions_over(provider)
    mail = [c for c in script.commands if c.startswith("MAIL")][0]
    rcpt = [c for c in script.commands if c.startswith("RCPT")][0]
    assert "RET=FULL" in mail and "ENVID=e1" in mail
    assert "NOTIFY=SUCCESS" in rcpt and "ORCPT=rfc822;a@example.org" in rcpt
    assert dsns(provider) == []                 # the customer sends the success notice


def test_a_customer_without_dsn_earns_a_relayed_notice(provider):
    submit(provider, ["a@example.org", "b@example.org"], " ENVID=e2+2Bx",
           [" NOTIFY=SUCCESS ORCPT=rfc822;first+40example.org", " NOTIFY=FAILURE"])
    assert atrn(provider, Script()) == "quit"
    wait_sessions_over(provider)
    [dsn] = dsns(provider)
    [fields] = report_fields(dsn)                # only the recipient that asked
    assert fields["final-recipient"] == "rfc822; a@example.org"
    assert fields["action"] == "relayed" and fields["status"].startswith("2.")
    text = dsn.as_string()
    assert "Original-Envelope-Id: e2+x" in text                  # xtext decoded (RFC 3461 §4)
    assert "Original-Recipient: rfc822;first@example.org" in text


@pytest.mark.parametrize("notify, bounced", [("", True), (" NOTIFY=NEVER", False),
                                              (" NOTIFY=SUCCESS", False), (" NOTIFY=FAILURE", True)])
def test_failure_notices_follow_notify(provider, notify, bounced):
    submit(provider, ["a@example.org"], "", [notify])
    script = Script()
    script.rcpt = lambda address: "550 5.1.1 no such user"
    assert atrn(provider, script) == "quit"
    wait_sessions_over(provider)
    found = [d for d in dsns(provider) if report_fields(d)[0]["action"] == "failed"]
    assert len(found) == (1 if bounced else 0)
    assert queue(provider, "example.org") == []


@pytest.mark.slow
@pytest.mark.parametrize("notify, warned", [("", True), (" NOTIFY=DELAY", True),
                                             (" NOTIFY=FAILURE", False), (" NOTIFY=NEVER", False)])
def test_delay_notices_follow_notify(provider, notify, warned):
    submit(provider, ["a@example.org"], "", [notify])
    provider.service.maintenance.run_once(now=time.time() + 5 * 3600)
    found = [d for d in dsns(provider) if report_fields(d)[0]["action"] == "delayed"]
    assert len(found) == (1 if warned else 0)

