"""The reversed connection when the customer will not take EHLO or HELO (issue 9, item 6).

After ATRN 250 the provider waits for the customer's 220 and sends EHLO,
then HELO if EHLO is refused. A customer that refuses both (5xx, 4xx), that
answers with garbage, or that hangs up, gets QUIT (if it is still there);
every message stays queued exactly as it was, one line is logged, nothing
counts as a delivery attempt, and the next normal ATRN delivers everything.
The customer here is a scripted server on the real reversed socket.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from typing import Dict, List, Optional

import pytest

from helpers import Customer, send_mail

pytestmark = pytest.mark.slow                   # each test a provider and a full ATRN session

ATRN_OK = b"250 2.0.0 OK now reversing the connection\r\n"

# what the customer answers to EHLO and to HELO (None: hang up instead of answering)
REFUSALS: Dict[str, tuple] = {
    "5xx": ("502 5.5.1 EHLO not implemented", "550 5.7.1 go away"),
    "4xx": ("451 4.3.0 try EHLO later", "454 4.3.0 try HELO later"),
    "garbage": ("hello, what is this?", "\x00\x01 nonsense"),
    "empty-line": ("", ""),
    "hang-up": (None, None),
}


class ScriptedCustomer:
    """The customer's SMTP server on the reversed connection, scripted."""

    def __init__(self, customer: Customer, ehlo: Optional[str], helo: Optional[str]):
        self.sock = customer.sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ehlo, self.helo = ehlo, helo
        self.buf = b""
        self.commands: List[str] = []
        self.messages: List[bytes] = []
        self.outcome = ""

    def line(self) -> Optional[bytes]:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode("utf-8") + b"\r\n")

    def run(self) -> str:
        """Serve until QUIT ("quit"), our hang-up ("hung up") or the provider's ("closed")."""
        self.send("220 customer.test ESMTP")
        while True:
            raw = self.line()
            if raw is None:
                return "closed"
            line = raw.decode("utf-8", "replace")
            self.commands.append(line)
            verb = line.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                answer = self.ehlo if verb == "EHLO" else self.helo
                if answer is None:
                    self.sock.close()
                    return "hung up"
                self.send(answer)
            elif verb in ("MAIL", "RCPT", "RSET"):
                self.send("250 ok")
            elif verb == "DATA":
                self.send("354 go ahead")
                body = []
                while True:
                    raw = self.line()
                    if raw is None:
                        return "closed"
                    if raw == b".":
                        break
                    body.append(raw)
                self.messages.append(b"\r\n".join(body))
                self.send("250 2.0.0 stored")
            elif verb == "QUIT":
                self.send("221 bye")
                return "quit"
            else:
                self.send("502 what?")


def atrn(provider, ehlo: Optional[str], helo: Optional[str]) -> ScriptedCustomer:
    c = Customer(provider.odmr_port, timeout=15)
    try:
        c.login()
        c.send("ATRN")
        assert c.line() == ATRN_OK
        server = ScriptedCustomer(c, ehlo, helo)
        server.outcome = server.run()
        return server
    finally:
        c.close()


def queue_list(provider) -> List[dict]:
    result = provider.run_cli("queue", "list", "--json")
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    # without "age": it moves on by itself when a second ticks over between two listings
    return sorted(({k: v for k, v in r.items() if k != "age"} for r in json.loads(result.stdout)),
                  key=lambda r: r["id"])


def wait_idle(provider) -> None:
    deadline = time.monotonic() + 10
    while provider.service.active_sessions() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert provider.service.active_sessions() == 0


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
    server = atrn(provider, ehlo, helo)
    wait_idle(provider)

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
    server = atrn(provider, "250 customer.test", "250 customer.test")
    wait_idle(provider)
    assert server.outcome == "quit"
    assert sorted(m.split(b"\r\n")[-1] for m in server.messages) == [b"body 0", b"body 1", b"body 2"]
    assert queue_list(provider) == []


def test_421_to_ehlo_gets_no_helo(provider, caplog):
    send_mail(provider.smtp_port, "sender@remote.test", ["a@example.org"], b"Subject: x\r\n\r\nx\r\n")
    before = queue_list(provider)
    server = atrn(provider, "421 4.3.2 customer.test closing", "250 customer.test")
    wait_idle(provider)
    assert server.commands == ["EHLO odmr.test", "QUIT"]
    assert queue_list(provider) == before
