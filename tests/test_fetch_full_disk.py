"""`odmrd fetch --maildir/--mbox` when the customer's own disk fills up.

A real small tmpfs made by each test, many messages waiting at a real provider
(more than 20, so a bad-command budget of 20 would show): every message is
either stored once or still queued at the provider, the session ends with
the provider's QUIT, the run exits 75 and says once that the disk is full, before its summary.
"""
from __future__ import annotations

import mailbox
import os
import re
import shutil
import subprocess
from typing import List

import pytest

import odmr.replies
from helpers import Peer, TOKEN, err, fetch_args, queued_tokens, reply_line, run_fetch, scripted_args, send_mail
from odmr.exits import EX_OK, EX_TEMPFAIL

pytestmark = pytest.mark.slow

MESSAGES = 50
BODY = b"".join(b"line %05d of a message that fills the customer's disk\r\n" % i for i in range(700))


@pytest.fixture
def small_disk(tmp_path):
    """A mounted tmpfs of `size` (a function: small_disk("2m") -> its path), unmounted at teardown."""
    mounted: List[str] = []

    def mount(size: str) -> str:
        where = tmp_path / ("disk%d" % len(mounted))
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % size, "tmpfs",
                                 str(where)], capture_output=True, timeout=10)
        if result.returncode != 0:
            pytest.skip("cannot mount a tmpfs here: %s" % result.stderr.decode(errors="replace").strip())
        mounted.append(str(where))
        return str(where)
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", where], capture_output=True, timeout=10)


def message(token: str) -> bytes:
    return (b"From: <sender@outside.test>\r\nTo: <x@example.org>\r\nSubject: %s\r\n"
            b"X-Token: %s\r\n\r\n" % (token.encode(), token.encode())) + BODY


def stored_tokens(target: str, kind: str) -> List[bytes]:
    if kind == "mbox":
        if not os.path.exists(target):
            return []
        return [TOKEN.search(m.as_bytes()).group(1) for m in mailbox.mbox(target)]
    found = []
    for name in os.listdir(os.path.join(target, "new")):
        with open(os.path.join(target, "new", name), "rb") as fh:
            found += TOKEN.findall(fh.read())
    return found


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_full_disk_defers_each_message_and_the_session_ends_with_quit(provider, small_disk, kind):
    disk = small_disk("2m")
    target = os.path.join(disk, "Maildir" if kind == "maildir" else "mbox")
    sent = ["m%02d" % i for i in range(MESSAGES)]
    for token in sent:
        send_mail(provider.smtp_port, "sender@outside.test", ["x@example.org"], message(token))

    result = run_fetch(*fetch_args(provider, "--domain", "example.org", "--" + kind, target))
    text = err(result)
    assert result.returncode == EX_TEMPFAIL, text
    assert "Traceback" not in text
    # one line for the disk (and its path), then the run's summary; no cut-off by the
    # customer (that was a 421 after 20 "bad" 503s to the commands pipelined after MAIL)
    full, line = text.strip().splitlines()
    assert full.startswith("odmrd fetch: the local disk is full: %s has " % target), full
    said = line.replace(target, "TARGET")      # the path is tmp_path's: pytest-421 is no 421
    assert "closed the session" not in said and "421" not in said, line
    stored = stored_tokens(target, kind)
    queued = queued_tokens(provider.spool_dir, "example.org")
    assert 0 < len(stored) < MESSAGES - 20, (len(stored), line)
    assert "%d messages delivered" % len(stored) in line
    assert "%d messages deferred" % len(queued) in line
    # each message exactly once: on the customer's disk or still at the provider
    assert sorted(stored + queued) == sorted(t.encode() for t in sent)
    if kind == "maildir":
        assert os.listdir(os.path.join(target, "tmp")) == []

    # room again: the next run takes the rest, and nothing twice
    keep = os.path.join(os.path.dirname(disk), "first-run")
    shutil.move(target, keep)
    result = run_fetch(*fetch_args(provider, "--domain", "example.org", "--" + kind, target))
    assert result.returncode == EX_OK, err(result)
    assert sorted(stored_tokens(keep, kind) + stored_tokens(target, kind)) == \
        sorted(t.encode() for t in sent)
    assert provider.spooled("example.org") == []


def pipelined_without_size(count: int, replies: List[bytes]):
    """A provider after ATRN that declares no SIZE: the disk fills while data arrives."""
    def after(peer: Peer) -> None:
        assert peer.line().startswith(b"220 ")
        peer.send("EHLO scripted.test\r\n")
        peer.reply()
        for i in range(count):
            peer.send("MAIL FROM:<a@outside.test>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
            got = [peer.line() for _ in range(3)]
            replies.extend(got)
            if not got[2].startswith(b"354"):
                continue
            peer.send(message("s%02d" % i) + b".\r\n")
            replies.append(peer.line())
        peer.send("QUIT\r\n")
        replies.append(peer.line())
    return after


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_disk_filling_during_data_is_452_per_message_and_one_line(scripted, small_disk, kind):
    disk = small_disk("1m")
    target = os.path.join(disk, "Maildir" if kind == "maildir" else "mbox")
    replies: List[bytes] = []
    s = scripted(atrn_reply=reply_line(odmr.replies.ATRN_OK),
                 after_250=pipelined_without_size(30, replies))
    result = run_fetch(*scripted_args(s, "--" + kind, target))
    text = err(result)
    assert result.returncode == EX_TEMPFAIL, text + repr(s.errors)
    assert s.errors == []
    full, line = text.strip().splitlines()
    assert full.startswith("odmrd fetch: the local disk is full: ") and target in full, full
    assert "No space left on device" in full
    finals = [r for r in replies if not r.startswith((b"250 2.1", b"354"))]
    assert finals[-1].startswith(b"221")
    codes = [r[:3] for r in finals[:-1]]
    assert set(codes) == {b"250", b"452"}, codes             # never a 5xx, never a 421
    assert codes.index(b"452") > 0 and codes[codes.index(b"452"):] == [b"452"] * codes.count(b"452")
    assert len(stored_tokens(target, kind)) == codes.count(b"250")
    if kind == "maildir":
        assert os.listdir(os.path.join(target, "tmp")) == []
    assert re.search(r"%d messages deferred" % codes.count(b"452"), line)
