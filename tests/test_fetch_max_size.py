"""`odmrd fetch --maildir/--mbox --max-size` (or `[fetch] max_size`): a provider
cannot fill the customer's disk. A message over the limit is refused with 552
5.3.4 at MAIL when SIZE= says so, else after the dot with nothing left behind;
the provider returns it to its sender; bad flags are one-line usage errors."""
from __future__ import annotations

import email
import os

import pytest

from helpers import Peer, err, reply_line, run_fetch, scripted_args, send_mail
from odmr import replies
from odmr.exits import EX_OK, EX_USAGE


def body_of(size: int) -> bytes:
    line = b"0123456789" * 7 + b"\r\n"
    return b"Subject: %d bytes\r\n\r\n" % size + line * (size // len(line))


@pytest.mark.slow
def test_fetch_max_size_refuses_big_message_and_provider_bounces_it(provider, tmp_path):
    """End to end: the real provider offers SIZE=, the customer refuses it with 552 5.3.4
    at MAIL, the provider returns it to its (hosted) sender and keeps nothing; the small
    message arrives; the run exits 0 (a refusal for good is an outcome, not a failure)."""
    send_mail(provider.smtp_port, "carol@example.net", ["x@example.org"], body_of(30000))
    send_mail(provider.smtp_port, "carol@example.net", ["x@example.org"], body_of(2000))
    maildir = tmp_path / "Maildir"
    result = run_fetch("--server", "127.0.0.1:%d" % provider.odmr_port, "--user", "alice",
                       "--tls", "none", "--domain", "example.org",
                       "--maildir", str(maildir), "--max-size", "10K")
    assert result.returncode == EX_OK, err(result)
    assert "over --max-size 10240" in err(result)
    (name,) = os.listdir(maildir / "new")
    assert b"Subject: 2000 bytes" in (maildir / "new" / name).read_bytes()
    assert os.listdir(maildir / "tmp") == []
    assert provider.spooled("example.org") == []            # not kept for another try
    bounces = [email.message_from_bytes(m.read_data()) for m in provider.spool.messages("example.net")
               if m.envelope.sender == ""]
    assert len(bounces) == 1
    assert "552 5.3.4" in bounces[0].as_string() and "x@example.org" in bounces[0].as_string()


def two_without_size(results: list):
    """A provider that declares no SIZE: 30 KB (552 once, after the dot), then 2 KB (250),
    then a MAIL whose SIZE= is over the limit; the customer's replies go to `results`."""
    def converse(peer: Peer) -> None:
        assert peer.line().startswith(b"220 ")
        peer.send("EHLO scripted.test\r\n")
        assert b"250-SIZE 10240" in peer.reply()
        for size in (30000, 2000):
            peer.send("MAIL FROM:<a@outside.test>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
            assert [peer.line()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            peer.send(body_of(size) + b".\r\n")
            results.append(peer.line())
        peer.send("MAIL FROM:<a@outside.test> SIZE=20000\r\n")
        results.append(peer.line())
        peer.send("QUIT\r\n")
        results.append(peer.line())
    return converse


@pytest.mark.parametrize("store", [pytest.param("maildir", marks=pytest.mark.slow), "mbox"])
def test_fetch_max_size_discards_oversize_stream_without_leftovers(scripted, tmp_path, store):
    results: list = []
    s = scripted(atrn_reply=reply_line(replies.ATRN_OK), after_250=two_without_size(results))
    target = tmp_path / "box" / ("Maildir" if store == "maildir" else "mbox")
    target.parent.mkdir()
    result = run_fetch(*scripted_args(s, "--" + store, str(target), "--max-size", "10K"))
    assert result.returncode == EX_OK, err(result) + repr(s.errors)
    assert s.errors == []
    assert [r[:10] for r in results] == [b"552 5.3.4 ", b"250 2.0.0 ", b"552 5.3.4 ", b"221 2.0.0 "]
    if store == "maildir":
        (name,) = os.listdir(target / "new")
        assert b"Subject: 2000 bytes" in (target / "new" / name).read_bytes()
        assert os.listdir(target / "tmp") == []
    else:
        raw = target.read_bytes()
        assert raw.count(b"\nFrom ") + raw.startswith(b"From ") == 1
        assert b"Subject: 2000 bytes" in raw and b"Subject: 30000 bytes" not in raw
        assert sorted(os.listdir(target.parent)) == ["mbox"]


@pytest.mark.slow
def test_fetch_section_max_size_and_bad_flags(scripted, tmp_path):
    results: list = []
    s = scripted(atrn_reply=reply_line(replies.ATRN_OK), after_250=two_without_size(results))
    conf = tmp_path / "fetch.conf"
    conf.write_text("[fetch]\nmax_size = 10K\n")
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")),
                       env={"ODMRD_CONFIG": str(conf)})
    assert result.returncode == EX_OK, err(result) + repr(s.errors)
    assert [r[:3] for r in results] == [b"552", b"250", b"552", b"221"]
    assert len(os.listdir(tmp_path / "md" / "new")) == 1
    for flags in (["--max-size", "lots", "--maildir", "md"],
                  ["--max-size", "10K", "--relay", "127.0.0.1:25"]):
        bad = run_fetch(*scripted_args(s, *flags))
        assert bad.returncode == EX_USAGE and len(err(bad).strip().splitlines()) == 1, err(bad)
