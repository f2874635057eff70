"""Delivery over long links (SPEC §4 "Long links", §7).

A scripted customer on the real reversed connection (raw sockets on 127.0.0.1)
offers CHUNKING: the provider must send `BDAT n LAST` with the spooled bytes
exactly, keep up to `delivery_window` messages in flight, match every reply to
its own command, and keep whatever is unanswered when the connection breaks.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import List, Optional

import pytest

from helpers import (ATRN_OK, Closed, Customer, PASSWORD, Provider, ReversedConnection, SENDER_HOSTED, Script,
                     atrn, dsns, hosting_provider, queue, report_fields, spool, wait_sessions_over)
from helpers import store as store_in_spool
from odmr import delivery
from odmr.spool import FILE_IO_SIZE, Envelope, Recipient

FAST = delivery.Timeouts(greeting=5, mail=5, rcpt=5, data_init=5, data_block=5, data_end=5, quit=2)


def chunky(pipelining: bool = True, **hooks) -> Script:
    s = Script()
    s.extensions = (["PIPELINING"] if pipelining else []) + ["CHUNKING", "8BITMIME", "SIZE 50000000"]
    for name, hook in hooks.items():
        setattr(s, name, hook)
    return s


def windowed_provider(tmp_path, window: int, **options) -> Provider:
    return hosting_provider(str(tmp_path), odmr_extra="delivery_window = %d" % window, **options)


@pytest.fixture
def window4(tmp_path):
    p = windowed_provider(tmp_path, 4)
    yield p
    p.stop()


@pytest.fixture
def window3(tmp_path):
    p = windowed_provider(tmp_path, 3)
    yield p
    p.stop()


@pytest.fixture
def fast_window3(tmp_path):
    """window3 whose deliveries give up on a silent customer within seconds."""
    p = windowed_provider(tmp_path, 3, delivery_timeouts=FAST)
    yield p
    p.stop()


class Holding(ReversedConnection):
    """Holds its transaction replies until `hold` messages have arrived whole (so they
    were all in flight at once), then answers at once; after `cut` replies it hangs up
    (FIN, then reads until the provider closes: nothing it sent is lost in a reset)."""

    def __init__(self, customer: Customer, script: Script, hold: int = 0, cut: Optional[int] = None):
        super().__init__(customer, script)
        self.hold = hold
        self.cut = cut
        self.held: List[tuple] = []
        self.answered: List[str] = []    # first recipients of the messages whose 250 went out
        self.sent = 0                    # transaction replies sent
        self.lasts = 0                   # BDAT LAST commands received
        self.lasts_answered = 0
        self.most_in_flight = 0

    def send(self, text: Optional[str]) -> None:
        commands = self.script.commands
        command = commands[-1].upper() if commands else ""
        if text is None or not command or command.startswith(("EHLO", "HELO")):
            return super().send(text)
        delivered = None
        if command.startswith("BDAT") and command.endswith(" LAST"):
            self.lasts += 1
            self.most_in_flight = max(self.most_in_flight, self.lasts - self.lasts_answered)
            delivered = self.script.messages[-1]["rcpts"][0] if text.startswith("2") else ""
        self.held.append((text, delivered))
        if self.lasts >= self.hold or command.startswith("QUIT"):
            self._release()

    def _release(self) -> None:
        held, self.held = self.held, []
        for text, delivered in held:
            if self.cut is not None and self.sent >= self.cut:
                self._hang_up()
            if delivered is not None:
                self.lasts_answered += 1
                if delivered:
                    self.answered.append(delivered)
            super().send(text)
            self.sent += 1
        if self.cut is not None and self.sent >= self.cut:
            self._hang_up()

    def _hang_up(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)
        self.sock.settimeout(10)
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise Closed()
            self.buf += data             # what the provider sent after the cut


def held_atrn(provider, script: Script, **kw) -> Holding:
    c = Customer(provider.odmr_port, timeout=15)
    try:
        c.login("alice", PASSWORD)
        c.send("ATRN example.org")
        assert c.line() == ATRN_OK
        conn = Holding(c, script, **kw)
        conn.run()
        return conn
    finally:
        c.close()


def store(provider, data: bytes, rcpt: str = "u@example.org", body: str = "") -> str:
    env = Envelope(sender=SENDER_HOSTED, recipients=[Recipient(rcpt)], body=body)
    return store_in_spool(provider.spool, "example.org", env, data)


def bdat_commands(script: Script) -> List[str]:
    return [c for c in script.commands if c.upper().startswith("BDAT")]


# -- BDAT framing -------------------------------------------------------------------

TEXTS = {
    "empty": b"",
    "one-octet": b"x",
    "no-final-crlf": b"Subject: t\r\n\r\n.a dot line\r\n.\r\nno line end at the end",
    "bare-lf-and-dots": b"Subject: t\n\n..two dots\n.\nlast\n",
    "chunk-multiple": (b"y" * 126 + b"\r\n") * (2 * FILE_IO_SIZE // 128),      # 2 * FILE_IO_SIZE exactly
    "streamed-multiple": (b"z" * 126 + b"\r\n") * (9 * FILE_IO_SIZE // 128),   # over INLINE_BODY
    "streamed-plus-one": (b"z" * 126 + b"\r\n") * (9 * FILE_IO_SIZE // 128) + b".",
}


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "serial"])
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_bdat_carries_exactly_the_spooled_octets(provider, name, pipelining):
    text = TEXTS[name]
    assert len(TEXTS["chunk-multiple"]) == 2 * FILE_IO_SIZE
    assert len(TEXTS["streamed-multiple"]) == 9 * FILE_IO_SIZE
    msg_id = store(provider, text)
    spooled = provider.spool.load("example.org", msg_id).read_data()
    s = chunky(pipelining)
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    assert [m["data"] for m in s.messages] == [spooled]
    assert "DATA" not in s.commands
    chunks = bdat_commands(s)
    assert chunks[-1] == "BDAT %d LAST" % (len(spooled) - sum(int(c.split()[1]) for c in chunks[:-1]))
    assert all(not c.endswith("LAST") for c in chunks[:-1])
    assert queue(provider, "example.org") == []


def test_8bit_text_goes_by_bdat_with_body_8bitmime(provider):
    text = "Subject: caf\u00e9\r\n\r\nna\u00efve \u00fcber\r\n".encode("utf-8") + bytes(range(128, 256))
    store(provider, text, body="8BITMIME")
    s = chunky()
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    assert [m["data"] for m in s.messages] == [text]
    assert s.messages[0]["mail"].endswith("BODY=8BITMIME")
    assert bdat_commands(s) == ["BDAT %d LAST" % len(text)]


def test_refused_chunk_is_that_message_s_result(provider):
    """Serial BDAT: a 452 to the first chunk of a big message defers it; nothing more is sent."""
    store(provider, TEXTS["streamed-multiple"], rcpt="big@example.org")
    store(provider, b"Subject: small\r\n\r\nsmall\r\n", rcpt="small@example.org")
    s = chunky(pipelining=False, chunk=lambda rcpts, size: "452 4.3.1 out of space")
    assert atrn(provider, s) == "quit"
    wait_sessions_over(provider)
    assert [m["rcpts"] for m in s.messages] == [["small@example.org"]]
    [left] = queue(provider, "example.org")
    assert left["recipients"] == ["big@example.org"] and left["last_error"].startswith("452")


def test_customer_without_chunking_still_gets_data(window4):
    """A regression guard: the window needs CHUNKING; without it DATA as before."""
    for n in range(5):
        spool(window4, ["u%d@example.org" % n], token=str(n))
    s = Script()                                     # PIPELINING, no CHUNKING
    assert atrn(window4, s) == "quit"
    wait_sessions_over(window4)
    assert len(s.messages) == 5 and s.commands.count("DATA") == 5
    assert bdat_commands(s) == []


# -- the window ---------------------------------------------------------------------

def _policy():
    """Per-recipient replies: rejects and tempfails at RCPT and at the end of data."""
    def rcpt(address):
        return {"r3@example.org": "550 5.1.1 no such user r3",
                "r5@example.org": "450 4.2.1 r5 busy",
                "bad8@example.org": "550 5.1.1 no such user bad8"}.get(address, "250 2.1.5 ok")

    def final(message):
        return {"r6@example.org": "451 4.3.0 r6 try later",
                "r7@example.org": "554 5.6.0 r7 content refused"}.get(message["rcpts"][0],
                                                                      "250 2.0.0 stored")
    return rcpt, final


def test_window_matches_every_reply_to_its_own_message(window4):
    for n in range(10):
        rcpts = ["r%d@example.org" % n] + (["bad8@example.org"] if n == 8 else [])
        spool(window4, rcpts, token="t%d" % n)
    rcpt, final = _policy()
    s = chunky(rcpt=rcpt, final=final)
    conn = held_atrn(window4, s, hold=4)
    wait_sessions_over(window4)
    assert conn.most_in_flight == 4                   # the window was used, and never exceeded
    delivered = sorted(r for m in s.messages for r in m["rcpts"])
    assert delivered == ["r%d@example.org" % n for n in (0, 1, 2, 4, 8, 9)]
    left = {m["recipients"][0]: m for m in queue(window4, "example.org")}
    assert sorted(left) == ["r5@example.org", "r6@example.org"]
    assert left["r5@example.org"]["last_error"].startswith("450 4.2.1 r5")
    assert left["r6@example.org"]["last_error"].startswith("451 4.3.0 r6")
    assert all(m["attempts"] == 1 for m in left.values())
    bounced = {}
    for dsn in dsns(window4):
        for group in report_fields(dsn):
            bounced[group["final-recipient"].split(";")[1].strip()] = group["diagnostic-code"]
    assert sorted(bounced) == ["bad8@example.org", "r3@example.org", "r7@example.org"]
    assert "bad8" in bounced["bad8@example.org"] and "r3" in bounced["r3@example.org"]
    assert "r7" in bounced["r7@example.org"]


def test_a_421_mid_window_keeps_every_unanswered_message(window4):
    for n in range(6):
        spool(window4, ["r%d@example.org" % n], token="t%d" % n)
    s = chunky(rcpt=lambda a: "421 4.3.2 going down" if a == "r2@example.org" else "250 2.1.5 ok")
    conn = held_atrn(window4, s, hold=4)
    wait_sessions_over(window4)
    assert conn.most_in_flight >= 2
    # (this customer stores what it gets after its 421 too: those are the window's duplicates)
    left = {m["recipients"][0]: m for m in queue(window4, "example.org")}
    assert sorted(left) == ["r%d@example.org" % n for n in range(2, 6)]
    sent = {c.split("<")[1].split(">")[0] for c in s.commands if c.startswith("RCPT")}
    for rcpt, m in left.items():
        assert m["attempts"] == (1 if rcpt in sent else 0), (rcpt, m)
    assert "421 4.3.2" in left["r2@example.org"]["last_error"]
    assert dsns(window4) == []


REPLIES_FOR_FOUR = 4 * 3 + 3      # MAIL, RCPT, BDAT LAST per message; a RSET before all but the first


@pytest.mark.parametrize("cut", range(REPLIES_FOR_FOUR))
def test_a_cut_at_any_point_of_a_window_loses_nothing(fast_window3, cut):
    window3 = fast_window3
    for n in range(4):
        spool(window3, ["r%d@example.org" % n], token="t%d" % n)
    s = chunky()
    conn = held_atrn(window3, s, hold=3, cut=cut)
    wait_sessions_over(window3)
    assert conn.sent == cut                          # it hung up exactly there
    assert conn.lasts >= 3                           # after a whole window had come
    answered = set(conn.answered)
    assert len(answered) == conn.lasts_answered
    left = {m["recipients"][0]: m for m in queue(window3, "example.org")}
    # nothing final without its own reply, nothing lost
    assert sorted(set(left) | answered) == ["r%d@example.org" % n for n in range(4)]
    assert not set(left) & answered
    sent = {c.split("<")[1].split(">")[0] for c in s.commands if c.startswith("RCPT")}
    sent |= {r for r in left if b"RCPT TO:<%s>" % r.encode() in conn.buf}
    for rcpt, m in left.items():
        assert m["attempts"] == (1 if rcpt in sent else 0), (cut, rcpt, m)
    s2 = chunky()
    assert atrn(window3, s2) == "quit"
    wait_sessions_over(window3)
    assert sorted(m["rcpts"][0] for m in s2.messages) == sorted(left)


# -- timeouts after the turnaround (RFC 5321 §4.5.3.2) -------------------------------

@pytest.fixture
def timed_provider(tmp_path):
    """A factory: the provider fixture's accounts, deliveries with these timeouts (seconds)."""
    made: List[Provider] = []

    def make(**timeouts: float) -> Provider:
        made.append(hosting_provider(str(tmp_path), delivery_timeouts=delivery.Timeouts(**timeouts)))
        return made[-1]
    yield make
    for p in made:
        p.stop()


def _delivery_log(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "odmrd.delivery")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["pipelining", "window"])
def test_the_log_names_the_reply_that_timed_out(timed_provider, caplog, script):
    provider = timed_provider(greeting=5, mail=5, rcpt=0.5, data_init=5, data_block=5, data_end=5, quit=1)
    spool(provider, ["u@example.org"])
    s = Script() if script == "pipelining" else chunky()
    s.rcpt = lambda address: None                    # reads on, never answers RCPT (nor DATA/BDAT)
    s.data = lambda rcpts: None
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="odmrd.delivery"):
        assert atrn(provider, s) == "closed"
        wait_sessions_over(provider)
    assert time.monotonic() - started < 4            # the RCPT timeout, not a longer one
    assert "timeout after 0.5 s waiting for the reply to RCPT" in _delivery_log(caplog)
    [m] = queue(provider, "example.org")
    assert m["attempts"] == 1 and "timeout after 0.5 s" in m["last_error"]


@pytest.mark.slow
@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_a_customer_that_stops_reading_is_cut_at_the_data_block_timeout(timed_provider, caplog, chunking):
    provider = timed_provider(greeting=5, mail=5, rcpt=5, data_init=5, data_block=1, data_end=5, quit=1)
    store(provider, (b"w" * 1022 + b"\r\n") * 48 * 1024)        # 48 MB: more than any socket buffer
    stalled = threading.Event()

    def stall(*args):
        stalled.wait(20)                         # stops reading; the provider's writes block
        return None
    s = chunky() if chunking else Script()
    if chunking:
        s.mail = lambda arg: (stall(), "250 ok")[1]
    else:
        s.in_data = lambda line, n: stall() or True

    def customer() -> None:
        try:
            atrn(provider, s, timeout=30)
        except OSError:                          # its late reply meets the closed connection
            pass
    with caplog.at_level(logging.INFO, logger="odmrd.delivery"):
        runner = threading.Thread(target=customer, daemon=True)
        runner.start()
        deadline = time.monotonic() + 15
        while "waiting to send data" not in _delivery_log(caplog) and time.monotonic() < deadline:
            time.sleep(0.05)
        stalled.set()
        runner.join(30)
        wait_sessions_over(provider)
    assert "timeout after 1 s waiting to send data" in _delivery_log(caplog)
    [m] = queue(provider, "example.org")
    assert m["attempts"] == 1


# -- stopping the service ------------------------------------------------------------

@pytest.mark.slow
def test_a_session_cut_by_the_stopping_service_says_so(provider, caplog):
    spool(provider, ["u@example.org"])
    s = chunky(final=lambda message: None)          # holds the message, never answers
    with caplog.at_level(logging.INFO, logger="odmrd.delivery"):
        runner = threading.Thread(target=lambda: atrn(provider, s, timeout=30), daemon=True)
        runner.start()
        deadline = time.monotonic() + 10
        while not any(c.startswith("BDAT") for c in s.commands) and time.monotonic() < deadline:
            time.sleep(0.02)
        provider.stop()                               # grace period 2 s, then the cut
        runner.join(15)
    text = _delivery_log(caplog)
    assert "cut: the service is stopping" in text, text
    assert "closed by the customer" not in text, text


def test_an_unrecordable_result_stops_the_window_after_the_replies_owed(window4, monkeypatch):
    """Drain.must_stop (a result could not be recorded): nothing new goes out, the replies
    owed for what is in flight are still read and recorded, then QUIT."""
    from odmr.queuemgr import Drain
    real_record = Drain.record

    def record(self, message, results):
        real_record(self, message, results)
        self.must_stop = True
    monkeypatch.setattr(Drain, "record", record)
    for n in range(7):
        spool(window4, ["r%d@example.org" % n], token="t%d" % n)
    s = chunky()
    conn = held_atrn(window4, s, hold=4)
    wait_sessions_over(window4)
    assert conn.most_in_flight == 4
    assert s.commands[-1] == "QUIT"
    assert len([c for c in s.commands if c.startswith("MAIL")]) == 4
    assert len(queue(window4, "example.org")) == 3          # the four in flight were recorded
