"""The intake's DATA reader against a model of its rules, over a real socket.

The reader takes whole buffered blocks of plain CRLF lines in one go and hands
anything else (bare CR or LF, a line cut by a segment) to a per-line reader;
these messages mix both, sent whole and cut into random segments, so each
hand-over point is crossed many times. The model (RFC 5321 §4.5.2 and SPEC §5):
only CRLF . CRLF ends the text; a leading dot goes when other characters follow
it on the line; every bare CR or LF is stored as CRLF.
"""
from __future__ import annotations

import random
import socket
import time
from typing import Tuple

import pytest

from helpers import Customer, Provider, reuse_provider

PIECES = [b"text", b"x", b" ", b".", b"..", b"\r\n", b"\r\n", b"\r\n", b"\r\n.", b"\r\n..",
          b"\r\n.\r\n", b"\n", b"\r", b"\n.\n", b".\r\n", b"\xe9"]
SAFE = [b"text", b"x", b" ", b".", b"..", b"\r\n", b"\r\n", b"\r\n.", b"\r\n..x", b"\r\n. "]


@pytest.fixture
def provider(shared_provider):
    yield from reuse_provider(shared_provider)


def expected(wire: bytes) -> Tuple[bytes, int]:
    """(the text stored for `wire`, how many of its octets the DATA phase takes)."""
    stored, taken, after_crlf = [], 0, True
    while True:
        end = wire.index(b"\n", taken) + 1
        line, taken = wire[taken:end], end
        if line == b".\r\n" and after_crlf:
            return b"".join(stored), taken
        if line.startswith(b".") and line[1:2] not in (b"\r", b"\n"):
            line = line[1:]
        after_crlf = line.endswith(b"\r\n")
        body = line[:-2] if after_crlf else line[:-1]
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        stored.append(body + b"\r\n")


def message(rng: random.Random, hazards: bool) -> bytes:
    vocabulary = PIECES if hazards else SAFE
    return b"Subject: t\r\n\r\n" + b"".join(rng.choice(vocabulary) for _ in range(rng.randrange(0, 60)))


def send(c: Customer, wire: bytes, rng: random.Random, cut: bool) -> None:
    if not cut:
        c.sock.sendall(wire)
        return
    start = 0
    while start < len(wire):
        step = rng.randrange(1, 12)
        c.sock.sendall(wire[start:start + step])
        start += step
        time.sleep(0.0005)


@pytest.mark.parametrize("hazards, cut", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["clean-whole", "hazards-whole", "clean-cut", "hazards-cut"])
def test_stored_text_matches_the_model(provider: Provider, hazards: bool, cut: bool):
    rng = random.Random(2645 + 2 * hazards + cut)
    c = Customer(provider.smtp_port)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        c.reply()
        assert c.cmd("EHLO client.test")[0] == 250
        for round_ in range(40):
            candidate = message(rng, hazards) + b"\r\n.\r\n"
            text, taken = expected(candidate)
            wire = candidate[:taken]          # what the model takes as one message (it may end early)
            assert c.cmd("MAIL FROM:<s@remote.test>")[0] == 250
            assert c.cmd("RCPT TO:<u@example.org>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            send(c, wire, rng, cut)
            code, lines = c.reply()
            assert code == 250, (round_, wire)
            msg_id = lines[0].split()[-1]
            data = provider.spool.load("example.org", msg_id).read_data()
            assert data.endswith(text), (round_, wire, data)
            trace = data[:len(data) - len(text)]
            assert trace.startswith(b"Received: ") and trace.endswith(b"\r\n")
            assert all(line[:1] in (b" ", b"\t") for line in trace.split(b"\r\n")[1:-1]), (round_, wire)
    finally:
        c.close()


def test_the_model_itself():
    assert expected(b"a\r\n..b\r\n.\r\nrest") == (b"a\r\n.b\r\n", 11)
    assert expected(b"a\n.\r\nb\r\n.\r\n") == (b"a\r\n.\r\nb\r\n", 11)
    assert expected(b"x\ry\r\n.\r\n") == (b"x\r\ny\r\n", 8)
