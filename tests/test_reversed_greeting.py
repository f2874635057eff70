"""The reversed connection when the customer will not take EHLO or HELO.

After ATRN 250 the provider waits for the customer's 220 and sends EHLO,
then HELO if EHLO is refused. A customer that refuses both (5xx, 4xx), that
answers with garbage, or that hangs up, gets QUIT (if it is still there);
every message stays queued exactly as it was, one line is logged, nothing
counts as a delivery attempt, and the next normal ATRN delivers everything.
The customer here is `helpers.Script` on the real reversed socket.
"""
from __future__ import annotations

import json
import logging
from typing import Dict, List, Optional, Tuple

import pytest

from helpers import ATRN_OK, Customer, HANG_UP, ReversedConnection, Script, send_mail, wait_sessions_over

pytestmark = pytest.mark.slow                   # each test a provider and a full ATRN session


# what the customer answers to EHLO and to HELO (None: hang up instead of answering)
REFUSALS: Dict[str, tuple] = {
    "5xx": ("502 5.5.1 EHLO not implemented", "550 5.7.1 go away"),
    "4xx": ("451 4.3.0 try EHLO later", "454 4.3.0 try HELO later"),
    "garbage": ("hello, what is this?", "\x00\x01 nonsense"),
    "empty-line": ("", ""),
    "hang-up": (None, None),
}


def atrn_answering_greeting(provider, ehlo: Optional[str], helo: Optional[str]) -> Tuple[Script, str]:
    """ATRN, then the customer's server answering EHLO and HELO so (None: hanging up);
    the script and how the conversation ended."""
    c = Customer(provider.odmr_port, timeout=15)
    try:
        c.login()
        c.send("ATRN")
        assert c.line() == ATRN_OK
        script = Script()
        script.ehlo = lambda arg: HANG_UP if ehlo is None else ehlo
        script.helo = lambda arg: HANG_UP if helo is None else helo
        return script, ReversedConnection(c, script).run()
    finally:
        c.close()


def queue_list(provider) -> List[dict]:
    result = provider.run_cli("queue", "list", "--json")
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    # without "age": it moves on by itself when a second ticks over between two listings
    return sorted(({k: v for k, v in r.items() if k != "age"} for r in json.loads(result.stdout)),
                  key=lambda r: r["id"])


@pytest.mark.parametrize("case", list(REFUSALS))
def test_customer_refusing_ehlo_and_helo_keeps_everything(provider, caplog, case):
    for n, rcpt in enumerate(["a@example.org", "b@example.com", "c@example.org"]):
        send_mail(provider.smtp_port, "sender@remote.test", [rcpt],
                  b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n))
    before = queue_list(provider)
    assert len(before) == 3
    caplog.clear()
    caplog.set_level(logging.DEBUG)

    ehlo, helo = REFUSALS[case]
    server, _ = atrn_answering_greeting(provider, ehlo, helo)
    wait_sessions_over(provider)

    expected = {"5xx": ["EHLO odmr.test", "HELO odmr.test", "QUIT"],
                "4xx": ["EHLO odmr.test", "HELO odmr.test", "QUIT"],
                # not SMTP: a HELO now could be answered out of step, so no HELO
                "garbage": ["EHLO odmr.test", "QUIT"],
                "empty-line": ["EHLO odmr.test", "QUIT"],
                "hang-up": ["EHLO odmr.test"]}[case]
    assert server.commands == expected
    assert server.messages == []
    assert queue_list(provider) == before              # same messages, no attempt counted

    delivery = [r for r in caplog.records if r.name == "odmrd.delivery"]
    assert len(delivery) == 1, [r.getMessage() for r in delivery]
    line = delivery[0].getMessage()
    assert "nothing sent, mail kept" in line and "\n" not in line
    if case in ("5xx", "4xx"):
        assert "refused EHLO and HELO" in line and ehlo in line and helo in line
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR
                or "internal error" in r.getMessage() or "Traceback" in r.getMessage()]

    # a customer that behaves gets everything
    server, outcome = atrn_answering_greeting(provider, "250 customer.test", "250 customer.test")
    wait_sessions_over(provider)
    assert outcome == "quit"
    assert sorted(m.data.splitlines()[-1] for m in server.messages) == [b"body 0", b"body 1", b"body 2"]
    assert queue_list(provider) == []


def test_421_to_ehlo_gets_no_helo(provider, caplog):
    send_mail(provider.smtp_port, "sender@remote.test", ["a@example.org"], b"Subject: x\r\n\r\nx\r\n")
    before = queue_list(provider)
    server, _ = atrn_answering_greeting(provider, "421 4.3.2 customer.test closing", "250 customer.test")
    wait_sessions_over(provider)
    assert server.commands == ["EHLO odmr.test", "QUIT"]
    assert queue_list(provider) == before
