"""CHUNKING (RFC 3030) and PIPELINING at `odmrd fetch --maildir/--mbox`'s own server.

The server the provider talks to after ATRN runs in a thread on a real
127.0.0.1 socket, driven by raw sockets (smtplib has no BDAT); end to end,
the real `odmrd fetch` against a scripted provider that sends BDAT.
"""
from __future__ import annotations

import os
import re
import smtplib
import socket
from typing import List

import pytest

import odmr.replies
import odmr.wire
from helpers import Peer, err, quit_, reply_line, run_fetch, scripted_args
from odmr.exits import EX_OK
from odmr.fetch_server import BDAT_PIECE

ENVELOPE = b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<x@example.org>\r\n"


def bdat(*chunks: bytes) -> bytes:
    """The chunks as BDAT commands, the last one LAST."""
    out = b""
    for index, chunk in enumerate(chunks):
        out += b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if index == len(chunks) - 1 else b"") + chunk
    return out


def test_ehlo_offers_chunking_and_pipelining_to_smtplib(local):
    server = local()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=15) as client:
        client.ehlo("provider.test")
        assert client.has_extn("chunking") and client.has_extn("pipelining")
        assert not client.has_extn("binarymime")


@pytest.mark.parametrize("greeting,utf8,tls,word", [
    ("HELO", False, True, "SMTP"),          # no "SMTPS" (IANA Mail Transmission Types)
    ("HELO", False, False, "SMTP"),
    ("EHLO", False, True, "ESMTPS"),
    ("EHLO", True, True, "UTF8SMTPS"),
    ("EHLO", True, False, "UTF8SMTP"),
], ids=["helo-tls", "helo", "ehlo-tls", "utf8-tls", "utf8"])
def test_received_protocol_word_is_the_intake_ports(local, greeting, utf8, tls, word):
    """The `with` word of the customer's Received: header follows the intake port's rule."""
    server = local(tls=tls)
    peer = Peer(socket.create_connection(("127.0.0.1", server.port), timeout=15))
    assert peer.line().startswith(b"220 ")
    peer.send("%s provider.test\r\n" % greeting)
    peer.reply()
    peer.send("MAIL FROM:<a@outside.test>%s\r\n" % (" SMTPUTF8" if utf8 else ""))
    assert peer.line().startswith(b"250")
    peer.send("RCPT TO:<x@example.org>\r\nDATA\r\n")
    assert peer.line().startswith(b"250") and peer.line().startswith(b"354")
    peer.send("Subject: x\r\n\r\nhi\r\n.\r\n")
    assert peer.line().startswith(b"250")
    quit_(peer)
    server.thread.join(15)
    new = os.path.join(server.maildir, "new")
    [name] = os.listdir(new)
    with open(os.path.join(new, name), "rb") as fh:
        received = fh.read().split(b"\n")[2]
    assert re.search(rb"\(odmrd\) with (\S+) id", received).group(1) == word.encode(), received


EIGHT_BIT = bytes(b for b in range(256) if b not in (10, 13))
FRAMING = {
    # name: (chunks as sent, what the Maildir file holds after the trace lines)
    "empty message": ([b""], b""),
    "one byte per chunk": ([bytes([b]) for b in b"Subject: x\r\n\r\nhi\r\n"] + [b""],
                           b"Subject: x\n\nhi\n"),
    "exact buffer multiples": ([b"a" * (BDAT_PIECE - 2) + b"\r\n",
                                b"b" * (2 * BDAT_PIECE - 2) + b"\r\n", b"c" * 8190 + b"\r\n"],
                               b"a" * (BDAT_PIECE - 2) + b"\n" + b"b" * (2 * BDAT_PIECE - 2) + b"\n"
                               + b"c" * 8190 + b"\n"),
    "8-bit data, dots and commands are content": ([b"X: \xc3\xa9\r\n\r\n" + EIGHT_BIT + b"\r\n.\r\n..two\r\nQUIT\r\n"],
                                                  b"X: \xc3\xa9\n\n" + EIGHT_BIT + b"\n.\n..two\nQUIT\n"),
    "last chunk without CRLF": ([b"Subject: y\r\n\r\nline\r\n", b"no end of line"],
                                b"Subject: y\n\nline\nno end of line\n"),
    "CRLF cut between chunks": ([b"A: 1\r", b"\n\r\nbody\r", b"\n"], b"A: 1\n\nbody\n"),
    "bare CR and LF become line ends": ([b"A: 1\n\nx\ry\r\n"], b"A: 1\n\nx\ny\n"),
}


@pytest.mark.parametrize("name", list(FRAMING))
def test_bdat_framing_is_exact(local, name):
    chunks, stored = FRAMING[name]
    server = local()
    peer = server.client()
    peer.send(ENVELOPE + bdat(*chunks) + b"NOOP\r\n")      # all pipelined
    replies = [peer.line() for _ in range(2 + len(chunks) + 1)]
    assert [r[:3] for r in replies] == [b"250"] * len(replies), replies
    assert replies[-2].startswith(reply_line(odmr.replies.DELIVERED, "").encode())
    assert all(r == reply_line(odmr.replies.CHUNK_RECEIVED, len(c)).encode()
               for r, c in zip(replies[2:-2], chunks))
    quit_(peer)
    server.close()
    assert server.stored() == [stored]
    assert server.tmp_is_empty()


def test_bdat_without_mail_or_rcpt_is_503_and_its_bytes_are_consumed(local):
    server = local()
    peer = server.client()
    # no MAIL: the chunk holds what would be commands; none of it may run
    peer.send(b"BDAT 20 LAST\r\nRSET\r\nQUIT\r\nNOOP\r\nxx" + b"NOOP\r\n")
    assert peer.line().startswith(b"503 ")
    assert peer.line() == reply_line(odmr.replies.OK).encode()
    # MAIL but no RCPT
    peer.send(b"MAIL FROM:<a@outside.test>\r\nBDAT 6\r\nQUIT\r\nBDAT 0 LAST\r\nNOOP\r\n")
    assert peer.line().startswith(b"250 ")
    assert peer.line().startswith(b"503 ")
    assert peer.line().startswith(b"503 ")
    assert peer.line() == reply_line(odmr.replies.OK).encode()
    quit_(peer)
    server.close()
    assert server.stored() == []


def test_bdat_after_a_data_mode_error_and_data_after_bdat(local):
    server = local()
    peer = server.client()
    # DATA refused (no valid recipient): the BDAT a pipelining client sends next is 503, consumed
    peer.send(b"MAIL FROM:<a@outside.test>\r\nRCPT TO:<bad address>\r\nDATA\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
    codes = [peer.line()[:3] for _ in range(5)]
    assert codes == [b"250", b"501", b"554", b"503", b"250"], codes
    peer.send("RSET\r\n")
    assert peer.line().startswith(b"250 ")
    # DATA in the middle of a BDAT transaction: 503, the transaction is gone
    peer.send(ENVELOPE + b"BDAT 5\r\nhello" + b"DATA\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
    codes = [peer.line()[:3] for _ in range(6)]
    assert codes == [b"250", b"250", b"250", b"503", b"503", b"250"], codes
    # and a whole message afterwards is fine
    peer.send(ENVELOPE + bdat(b"A: b\r\n\r\nok\r\n"))
    assert [peer.line()[:3] for _ in range(3)] == [b"250"] * 3
    quit_(peer)
    server.close()
    assert server.stored() == [b"A: b\n\nok\n"]
    assert server.tmp_is_empty()


def test_bdat_over_the_size_limit_is_552_and_pipelined_chunks_are_discarded(local):
    server = local(max_size=1000)
    peer = server.client()
    # over the limit at the second chunk
    peer.send(ENVELOPE + bdat(b"x" * 600, b"y" * 600) + b"NOOP\r\n")
    codes = [peer.line()[:3] for _ in range(5)]
    assert codes == [b"250", b"250", b"250", b"552", b"250"], codes
    # over it in the first: the chunks already pipelined get the same answer, never a 250
    peer.send(ENVELOPE + bdat(b"z" * 2000, b"more\r\n", b"") + b"NOOP\r\n")
    codes = [peer.line()[:3] for _ in range(6)]
    assert codes == [b"250", b"250", b"552", b"552", b"552", b"250"], codes
    quit_(peer)
    server.close()
    assert server.stored() == []
    assert server.tmp_is_empty()
    assert server.session.too_big == 2


def test_bdat_with_a_bad_size_is_501_and_the_connection_ends(local):
    server = local()
    peer = server.client()
    peer.send(ENVELOPE + b"BDAT 12x LAST\r\nsome data\r\n")
    codes = [peer.line()[:3] for _ in range(3)]
    assert codes == [b"250", b"250", b"501"]
    with pytest.raises(EOFError):
        peer.line()


def test_a_pipelined_window_is_answered_in_order_with_few_writes(local, monkeypatch):
    writes: List[int] = []
    original = odmr.wire._write_now

    def counting(sock, data):
        writes.append(data.count(b"\r\n"))
        return original(sock, data)
    monkeypatch.setattr(odmr.wire, "_write_now", counting)
    server = local(max_size=4000)
    peer = server.client()
    window = b""
    expected: List[bytes] = []
    for i in range(20):
        body = b"Subject: w%02d\r\n\r\n" % i + b"x" * (5000 if i == 7 else 100) + b"\r\n"
        window += ENVELOPE + bdat(body[:50], body[50:])
        expected += [b"250", b"250", b"250", b"552" if i == 7 else b"250"]
    del writes[:]
    peer.send(window + b"QUIT\r\n")             # one write, like a provider's delivery window
    codes = [peer.line()[:3] for _ in expected] + [peer.line()[:3]]
    assert codes == expected + [b"221"]
    # 81 replies, written in a handful of writes: not one per reply
    assert sum(writes) == 81 and len(writes) <= 4, writes
    server.close()
    stored = server.stored()
    assert [s.split(b"\n", 1)[0] for s in stored] == [b"Subject: w%02d" % i for i in range(20) if i != 7]


def pipelined_bdat(count: int, replies: List[bytes]):
    """A provider after ATRN that sends a whole window of BDAT messages in one write."""
    def after(peer: Peer) -> None:
        assert peer.line().startswith(b"220 ")
        peer.send("EHLO scripted.test\r\n")
        assert b"250-CHUNKING" in peer.reply()
        window = b""
        for i in range(count):
            window += ENVELOPE + bdat(b"Subject: e%d\r\n\r\n" % i + b"\xe2\x9c\x93 8-bit\r\n")
        peer.send(window + b"QUIT\r\n")
        for _ in range(3 * count + 1):
            replies.append(peer.line())
    return after


def test_odmrd_fetch_takes_a_bdat_window_end_to_end(scripted, tmp_path):
    replies: List[bytes] = []
    s = scripted(atrn_reply=reply_line(odmr.replies.ATRN_OK), after_250=pipelined_bdat(5, replies))
    maildir = tmp_path / "md"
    result = run_fetch(*scripted_args(s, "--maildir", str(maildir)))
    assert result.returncode == EX_OK, err(result) + repr(s.errors)
    assert err(result) == "odmrd fetch: 5 messages delivered to %s\n" % maildir
    assert [r[:3] for r in replies] == [b"250"] * 15 + [b"221"]
    texts = sorted((maildir / "new" / n).read_bytes() for n in os.listdir(maildir / "new"))
    assert sorted(re.search(rb"\nSubject: (e\d)\n", t).group(1) for t in texts) == \
        [b"e%d" % i for i in range(5)]
    assert all(t.endswith(b"\n\n\xe2\x9c\x93 8-bit\n") for t in texts)
