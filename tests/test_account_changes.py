"""A users-file edit reaches sessions that are already open: ATRN and the intake's
RCPT follow the accounts as they are now, not as they were at AUTH or EHLO."""
from __future__ import annotations

import smtplib
import time

import pytest

from helpers import Customer, send_mail

pytestmark = pytest.mark.slow                   # each test waits for the users file to be reloaded


def _until_reloaded(provider, what) -> None:
    deadline = time.monotonic() + 10
    while not what(provider.service.runtime):
        assert time.monotonic() < deadline, "the users file edit was never picked up"
        time.sleep(0.1)


def test_atrn_after_the_account_was_deleted_is_refused(provider):
    from odmr import accounts
    send_mail(provider.smtp_port, "a@remote.test", ["u@example.net"], b"Subject: kept\r\n\r\nx\r\n")
    c = Customer(provider.odmr_port)
    try:
        c.login("bob")
        accounts.delete_user(provider.users, "bob")
        _until_reloaded(provider, lambda rt: rt.accounts.get("bob") is None)
        code, lines = c.cmd("ATRN example.net")
        assert code == 450, lines
    finally:
        c.close()
    assert len(list(provider.spool.messages("example.net"))) == 1     # not delivered to anyone


def test_atrn_for_a_domain_taken_away_since_auth_is_refused(provider):
    from odmr import accounts
    c = Customer(provider.odmr_port)
    try:
        c.login("alice")
        accounts.delete_user(provider.users, "alice")
        accounts.add_user(provider.users, "alice", ["example.com"], "another password")
        _until_reloaded(provider, lambda rt: rt.accounts.get("alice") is not None
                        and list(rt.accounts.get("alice").domains) == ["example.com"])
        assert c.cmd("ATRN example.org")[0] == 450
        assert c.cmd("ATRN example.com")[0] == 453            # still hers: nothing waiting
    finally:
        c.close()


def test_open_intake_session_stops_accepting_a_domain_no_longer_hosted(provider):
    from odmr import accounts
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        s.ehlo("sender.test")
        s.mail("a@remote.test")
        assert s.rcpt("u@example.net")[0] == 250
        s.rset()
        accounts.delete_user(provider.users, "bob")
        _until_reloaded(provider, lambda rt: "example.net" not in rt.hosted_domains())
        s.mail("a@remote.test")
        code, text = s.rcpt("u@example.net")
        assert code == 550 and b"5.7.1" in text
