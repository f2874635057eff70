"""Storage faults after a delivery never turn into repeated deliveries (SPEC §7).

The spool lives on a small ext4 image made and loop-mounted by each test (root
is needed; skipped otherwise). Faults are real: a full disk, an immutable domain directory (`chattr +i`, which refuses even root,
as a directory the service account may no longer write refuses it). A scripted
customer counts every delivery per message and recipient, over real sockets.
"""
from __future__ import annotations

import collections
import errno
import gc
import logging
import os
import smtplib
import random
import subprocess
import time
from typing import Dict, List, Optional, Tuple

import pytest

from helpers import (ATRN_OK, NO_MAIL, Customer, Daemon, Load, PASSWORD, Provider, ReversedConnection, SENDER_REMOTE,
                     Script, TOKEN, queued_tokens, spool, which)
from odmr import accounts, replies


def _mount_ext4(directory: str, image: str, size_mb: int = 8) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a loop filesystem needs root")
    if which("mkfs.ext4") is None or which("chattr") is None:
        pytest.skip("mkfs.ext4 or chattr is not installed")
    with open(image, "wb") as fh:
        fh.truncate(size_mb * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-m", "0", "-N", "4096", image],
                   check=True, capture_output=True)
    os.makedirs(directory, exist_ok=True)
    done = subprocess.run(["mount", "-o", "loop", image, directory], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot loop-mount an ext4 image here: %s" % done.stderr.decode().strip())


def _unmount(directory: str) -> None:
    """Unmount now, or detach lazily: a fault's exception, logged as an argument, keeps the
    frames that hold the spool's directory descriptors until pytest drops the call's log
    records after teardown, so retrying in the meantime only waits (it took 5 s a test)."""
    subprocess.run(["mount", "-o", "remount,rw", directory], capture_output=True)
    subprocess.run(["chattr", "-R", "-i", directory], capture_output=True)
    gc.collect()
    if subprocess.run(["umount", directory], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", directory], capture_output=True)


@pytest.fixture
def provider(tmp_path):
    """An in-process provider whose spool is a fresh 8 MB ext4 filesystem."""
    mount = str(tmp_path / "spool")
    _mount_ext4(mount, str(tmp_path / "spool.img"))
    p = Provider(str(tmp_path))
    try:
        p.add_user("alice", ["example.org"])
        p.add_user("bob", ["example.net"])
        p.start()
        yield p
    finally:
        p.stop()
        _unmount(mount)


def immutable(path: str, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", path], check=True)


def fill_disk(root: str) -> None:
    """Use every free data block of the filesystem."""
    with open(os.path.join(root, "filler"), "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    for n in range(64):          # the last blocks, in smaller bites
        try:
            with open(os.path.join(root, "filler%d" % n), "wb") as fh:
                fh.write(b"\0" * 1024)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            break


def fill_directory(path: str) -> None:
    """Fill the directory's blocks with entries until not even a one-letter name fits
    (the disk being full, it cannot grow): a rename into it then fails with ENOSPC."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    for length in (200, 100, 50, 25, 12, 6, 3, 2, 1):
        for n in range(5000):
            name, k = "", n
            while k or not name:
                name, k = alphabet[k % 36] + name, k // 36
            if len(name) > length:
                break
            try:
                open(os.path.join(path, name.rjust(length, "_")), "xb").close()
            except FileExistsError:
                continue
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break


class Counting(Script):
    """Accepts everything; counts each (token, recipient) delivered. `refuse` maps a
    recipient to its RCPT reply; `on_final` runs before the 250 of each message."""

    def __init__(self, refuse: Optional[Dict[str, str]] = None, on_final=None):
        super().__init__()
        self.refuse = refuse or {}
        self.on_final = on_final
        self.got: List[Tuple[bytes, str]] = []

    def rcpt(self, address: str) -> Optional[str]:
        return self.refuse.get(address, "250 2.1.5 ok")

    def final(self, message: Dict) -> Optional[str]:
        if self.on_final is not None:
            self.on_final(message)
        for token in TOKEN.findall(message["data"]):
            self.got.extend((token, r) for r in message["rcpts"])
        return "250 2.0.0 stored"


def session(p: Provider, script: Script, domain: str = "example.org") -> Tuple[bytes, str]:
    """One ATRN: its reply line, and how the reversed session ended ("quit", "closed")."""
    c = Customer(p.odmr_port, timeout=15)
    try:
        c.login("alice", PASSWORD)
        c.send("ATRN " + domain)
        line = c.line()
        if line != ATRN_OK:
            c.send("QUIT")
            return line, ""
        return line, ReversedConnection(c, script).run()
    finally:
        c.close()


def wait_idle(p: Provider) -> None:
    p.service.wait_for_sessions(10)


BUSY = ("%d %s\r\n" % replies.SPOOL_UNCHANGEABLE).encode()


@pytest.mark.slow
def test_full_disk_retires_by_unlinking(provider):
    """No block for tmp/'s new entry: the delivered message is unlinked, not sent again."""
    for n in range(3):
        spool(provider, ["user@example.org"], sender=SENDER_REMOTE, token="full%d" % n)
    fill_disk(provider.spool_dir)
    fill_directory(os.path.join(provider.spool_dir, "example.org", "tmp"))
    script = Counting()
    line, ended = session(provider, script)
    assert (line, ended) == (ATRN_OK, "quit")
    wait_idle(provider)
    line, _ = session(provider, script)
    assert line == NO_MAIL
    counts = collections.Counter(script.got)
    assert sorted(t for t, _ in counts) == [b"full0", b"full1", b"full2"]
    assert set(counts.values()) == {1}, counts


def test_unwritable_domain_directory_mid_session(provider):
    """The directory refuses changes right after the customer's 250: QUIT, remembered,
    451 while it lasts, then recorded and nothing delivered twice."""
    for n in range(4):
        spool(provider, ["user@example.org"], sender=SENDER_REMOTE, token="imm%d" % n)
    domain_dir = os.path.join(provider.spool_dir, "example.org")
    script = Counting(on_final=lambda m: immutable(domain_dir, True))
    # the next message's commands went out with the dot: its DATA is answered 354, and
    # only hanging up sends nothing more (a customer without PIPELINING gets QUIT)
    assert session(provider, script) == (ATRN_OK, "closed")
    wait_idle(provider)
    assert len(script.got) == 1          # only the one whose result failed
    script.on_final = None
    assert session(provider, script)[0] == BUSY
    immutable(domain_dir, False)
    assert session(provider, script) == (ATRN_OK, "quit")
    wait_idle(provider)
    assert session(provider, script)[0] == NO_MAIL
    counts = collections.Counter(script.got)
    assert sorted(t for t, _ in counts) == [b"imm0", b"imm1", b"imm2", b"imm3"]
    assert set(counts.values()) == {1}, counts


@pytest.mark.slow
def test_partial_result_on_full_disk_is_not_sent_again(provider):
    """One recipient 250, the other 451, and the state file cannot be written (ENOSPC):
    the accepted recipient is never offered the message again."""
    spool(provider, ["a@example.org", "b@example.org"], sender=SENDER_REMOTE, token="part")
    fill_disk(provider.spool_dir)
    script = Counting(refuse={"b@example.org": "451 4.2.0 try later"})
    assert session(provider, script) == (ATRN_OK, "quit")
    wait_idle(provider)
    assert script.got == [(b"part", "a@example.org")]
    script.refuse = {}
    for _ in range(2):
        line, _ = session(provider, script)
        wait_idle(provider)
        if line == NO_MAIL:
            break
    assert line == NO_MAIL
    assert sorted(script.got) == [(b"part", "a@example.org"), (b"part", "b@example.org")]


def test_dsn_that_cannot_be_queued_is_tried_once_per_session(provider, caplog):
    """A 550 whose DSN cannot be written: one attempt per session, the session stops,
    ATRN 451 until it can be, then the DSN is queued and nothing is delivered again."""
    spool(provider, ["a@example.org", "c@example.org"], sender="bob@example.net", token="dsn")
    dsn_dir = os.path.join(provider.spool_dir, "example.net")
    os.makedirs(os.path.join(dsn_dir, "tmp"), mode=0o700, exist_ok=True)
    immutable(dsn_dir, True)
    script = Counting(refuse={"c@example.org": "550 5.1.1 no such user"})
    with caplog.at_level(logging.ERROR, logger="odmrd"):
        assert session(provider, script) == (ATRN_OK, "quit")
        wait_idle(provider)
        tries = [r for r in caplog.records if "cannot queue DSN" in r.getMessage()]
        assert len(tries) == 1, [r.getMessage() for r in tries]
        assert session(provider, script)[0] == BUSY
    immutable(dsn_dir, False)
    assert session(provider, script)[0] == NO_MAIL
    assert script.got == [(b"dsn", "a@example.org")]
    bounces = [m for m in provider.spool.messages("example.net") if m.envelope.sender == ""]
    assert len(bounces) == 1 and b"c@example.org" in bounces[0].read_data()


@pytest.mark.slow
def test_kill_9_with_unwritable_spool_episodes(tmp_path):
    """test_crash's kill -9 loop, with the domain directory refusing changes for a while
    before each kill (the new fallback and remembering paths run under load):
    acknowledged ⊆ delivered ∪ queued, duplicates ≤ kills."""
    daemon = Daemon(str(tmp_path))
    mount = daemon.spool_dir
    _mount_ext4(mount, str(tmp_path / "spool.img"), size_mb=32)
    seed = int(time.time())
    rng = random.Random(seed)
    kills = 4
    load = None
    try:
        accounts.add_user(daemon.users, "alice", ["example.org"], PASSWORD, True)
        daemon.start()
        load = Load(daemon)
        load.start()
        domain_dir = os.path.join(mount, "example.org")
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 0.8))
            if os.path.isdir(domain_dir):
                immutable(domain_dir, True)
                time.sleep(rng.uniform(0.2, 0.6))
                immutable(domain_dir, False)
                # what was remembered is recorded at the next ATRN: then kill
                seen = load.atrn_sessions
                deadline = time.monotonic() + 10
                while load.atrn_sessions < seen + 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            daemon.kill9()
            daemon.start()
        time.sleep(0.5)
        load.stop_sending.set()
        deadline = time.monotonic() + 20
        while queued_tokens(mount, "example.org") and time.monotonic() < deadline:
            time.sleep(0.1)
        load.join()
        assert daemon.term() == 0
        queued = set(queued_tokens(mount, "example.org"))
        delivered = collections.Counter(load.delivered)
        acked = set(load.acked)
        context = "seed %d: %d acked, %d delivered, %d queued, %d ATRN sessions" % (
            seed, len(acked), len(delivered), len(queued), load.atrn_sessions)
        assert acked and delivered, context
        lost = acked - set(delivered) - queued
        assert not lost, "lost %s (%s)" % (sorted(lost)[:10], context)
        assert sum(n - 1 for n in delivered.values()) <= kills, context
        # the faults met the daemon: mid-delivery (held in memory) or at an ATRN (451)
        log = daemon.log()
        assert "kept in memory, not offered again" in log or "cannot be changed" in log, context
    finally:
        if load is not None:
            load.join()
        daemon.cleanup()
        _unmount(mount)


def test_a_directory_where_a_state_file_belongs_blocks_nothing(provider):
    """Found at run time (not only at start-up): the state is written, the message
    retired, and the directory set aside; the domain is never held up by it."""
    spool(provider, ["u1@example.org", "u2@example.org"], sender=SENDER_REMOTE, token="sd0")
    spool(provider, ["u1@example.org"], sender=SENDER_REMOTE, token="sd1")
    domain_dir = os.path.join(provider.spool_dir, "example.org")
    first = sorted(n for n in os.listdir(domain_dir) if "." not in n and n != "tmp")[0]
    os.makedirs(os.path.join(domain_dir, first + ".state", "inside"))
    script = Counting(refuse={"u2@example.org": "451 4.2.0 later"})
    assert session(provider, script) == (ATRN_OK, "quit")
    wait_idle(provider)
    script.refuse = {}
    assert session(provider, script) == (ATRN_OK, "quit")
    wait_idle(provider)
    assert session(provider, script)[0] == NO_MAIL
    counts = collections.Counter(script.got)
    assert counts == {(b"sd0", "u1@example.org"): 1, (b"sd0", "u2@example.org"): 1,
                      (b"sd1", "u1@example.org"): 1}, counts
    assert not any(n.endswith(".state") for n in os.listdir(domain_dir))
    quarantined = os.listdir(os.path.join(provider.spool_dir, ".quarantine", "example.org"))
    assert any(n.startswith(first + ".state.") for n in quarantined)


@pytest.mark.slow
def test_an_unusable_tmp_directory_is_named_at_intake(provider, caplog):
    """The operator reads which directory refuses: not the bare name of a file never made."""
    spool(provider, ["user@example.org"], sender=SENDER_REMOTE, token="first")
    tmp = os.path.join(provider.spool_dir, "example.org", "tmp")
    immutable(tmp, True)
    try:
        with caplog.at_level(logging.INFO):
            with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as client:
                client.ehlo("client.test")
                client.mail("sender@remote.test")
                client.rcpt("user@example.org")
                code, _ = client.data(b"Subject: x\r\n\r\nbody\r\n")
    finally:
        immutable(tmp, False)
    assert code == 451                  # not "insufficient storage": the disk is not full
    assert "%s: Operation not permitted" % tmp in caplog.text


@pytest.mark.slow
def test_an_unusable_domain_directory_is_named_at_atrn(provider, caplog):
    spool(provider, ["user@example.org"], sender=SENDER_REMOTE, token="held")
    domain_dir = os.path.join(provider.spool_dir, "example.org")
    open(os.path.join(domain_dir, ".lock"), "a").close()     # as after any earlier ATRN
    immutable(domain_dir, True)
    try:
        with caplog.at_level(logging.INFO):
            assert session(provider, Counting())[0] == BUSY
    finally:
        immutable(domain_dir, False)
    assert "cannot be changed: %s: Operation not permitted" % domain_dir in caplog.text
    assert ".tmp.probe" not in caplog.text
