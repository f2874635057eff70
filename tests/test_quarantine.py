"""Messages the daemon cannot use (SPEC §7): unreadable, corrupt and truncated files
quarantined and shown, never an ATRN 250 for nothing, never blocking the domain;
`queue list --quarantine` and `queue requeue`; impossible Arrival times; a directory
where a state file belongs; debris in tmp/ at start-up.

Unreadable files are made for real: the daemon runs as `nobody` (root is needed to drop
to it) and the test, as root, takes a message file away from it with chown/chmod.
"""
from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import signal
import tempfile
import time
from typing import List

import pytest

from helpers import (Customer, Daemon, Provider, Script, TOKEN, accept_all, atrn, err, message_ids,
                     one_line_error, send_mail, spool, store, wait_for, wait_sessions_over)
from odmr.spool import MAGIC, Envelope, Recipient, Spool, new_id

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (a daemon running as nobody)")
PASSWORD = "secret-pw"          # helpers.Daemon.add_user's


@pytest.fixture
def site():
    """A detached daemon's site that the service account `nobody` owns (alice: example.org)."""
    base = tempfile.mkdtemp(prefix="odmrd-quar.", dir="/tmp")
    os.chmod(base, 0o755)                      # pytest's tmp is root-only
    made = Daemon(base, "user = nobody", detached=True)
    made.add_user("alice", "example.org")
    nobody = pwd.getpwnam("nobody")
    os.chown(made.users, nobody.pw_uid, nobody.pw_gid)
    os.makedirs(made.spool_dir, mode=0o700)
    os.chown(made.spool_dir, nobody.pw_uid, nobody.pw_gid)
    yield made
    made.cleanup()
    shutil.rmtree(base, ignore_errors=True)


def serve(s: Daemon) -> None:
    result = s.serve()
    assert result.returncode == 0, result.stderr


def spool_mail(s: Daemon, token: str) -> str:
    send_mail(s.smtp_port, "someone@remote.test", ["u@example.org"],
              ("Subject: %s\r\nX-Token: %s\r\n\r\nbody\r\n" % (token, token)).encode())
    return queued_ids(s)[-1]


def queued_ids(s: Daemon, domain: str = "example.org") -> List[str]:
    directory = os.path.join(s.spool_dir, domain)
    return sorted(n for n in os.listdir(directory) if len(n) > 13 and "." not in n and n != "tmp")


def send_atrn(s: Daemon) -> Customer:
    """Logged in as alice, ATRN example.org sent; the reply is the caller's to read."""
    c = Customer(s.odmr_port)
    c.login("alice", PASSWORD)
    c.send("ATRN example.org")
    return c


def take_away(path: str) -> None:
    """Root's, mode 000: the daemon (nobody) can no longer open it."""
    os.chown(path, 0, 0)
    os.chmod(path, 0)


def give_back(path: str) -> None:
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    os.chmod(path, 0o600)


@pytest.mark.slow
@needs_root
def test_unreadable_message_is_quarantined_listed_and_requeued(site):
    serve(site)
    bad = spool_mail(site, "bad")
    take_away(os.path.join(site.spool_dir, "example.org", bad))
    c = send_atrn(site)
    try:
        assert c.reply()[0] == 453                 # no 250 for a message that never comes
    finally:
        c.close()
    aside = os.path.join(site.spool_dir, ".quarantine", "example.org", bad)
    assert os.path.exists(aside) and queued_ids(site) == []
    wait_for(lambda: "quarantined example.org/%s" % bad in site.log(), 10, "the log line")

    listed = site.cli("queue", "list", "--quarantine", "--json")
    assert listed.returncode == 0, listed.stderr
    [record] = json.loads(listed.stdout)
    assert (record["id"], record["domain"]) == (bad, "example.org")
    assert record["size"] == os.stat(aside).st_size and "Permission denied" in record["reason"]
    text = site.cli("queue", "list", "--quarantine").stdout.decode()
    assert bad in text and "example.org" in text and "Permission denied" in text
    plain = site.cli("queue", "list").stdout.decode().splitlines()   # "empty" hides nothing
    assert plain == ["Mail queue is empty",
                     "and 1 quarantined file set aside: odmrd queue list --quarantine"]
    assert site.cli("queue", "list", "example.net").stdout.strip() == b"Mail queue is empty"

    still = site.cli("queue", "requeue", bad)          # not repaired yet
    assert still.returncode == 77 and "still unreadable" in err(still)
    one_line_error(still)
    unknown = site.cli("queue", "requeue", "0123456789abcdef0123")
    assert unknown.returncode == 66 and "no quarantined message" in err(unknown)
    one_line_error(unknown)
    os.symlink(aside, os.path.join(site.spool_dir, ".quarantine", "example.org", "0" * 21))
    linked = site.cli("queue", "requeue", "0" * 21)
    assert linked.returncode == 65 and os.path.exists(aside)
    one_line_error(linked)

    give_back(aside)
    back = site.cli("queue", "requeue", bad)
    assert back.returncode == 0, back.stderr
    assert queued_ids(site) == [bad] and not os.path.exists(aside)
    assert site.cli("queue", "list", "--quarantine").stdout.strip() == b"Quarantine is empty"
    c = send_atrn(site)
    try:
        assert c.reply()[0] == 250
        [text] = accept_all(c, 1)
        assert b"X-Token: bad" in text
    finally:
        c.close()
    wait_for(lambda: queued_ids(site) == [], 10, "the delivered message to leave the queue")


@pytest.mark.slow
@needs_root
def test_readable_mail_behind_an_unreadable_file_is_delivered(site):
    serve(site)
    bad = spool_mail(site, "bad")
    spool_mail(site, "good")
    take_away(os.path.join(site.spool_dir, "example.org", bad))
    c = send_atrn(site)
    try:
        assert c.reply()[0] == 250
        [text] = accept_all(c, 1)
        assert b"X-Token: good" in text
    finally:
        c.close()
    assert os.path.exists(os.path.join(site.spool_dir, ".quarantine", "example.org", bad))


@pytest.mark.slow
@needs_root
def test_unreadable_file_that_cannot_be_quarantined_is_reported(site):
    """The quarantine itself unwritable: the file stays, every ATRN says 453 and logs it,
    and `queue list` shows it instead of "Mail queue is empty"."""
    serve(site)
    os.mkdir(os.path.join(site.spool_dir, ".quarantine"), 0o700)    # root's: nobody cannot use it
    bad = spool_mail(site, "bad")
    take_away(os.path.join(site.spool_dir, "example.org", bad))
    for _ in range(2):
        c = send_atrn(site)
        try:
            assert c.reply()[0] == 453
        finally:
            c.close()
    assert queued_ids(site) == [bad]
    assert "cannot quarantine example.org/%s" % bad in site.log()
    listed = site.cli("queue", "list")
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout.decode()
    assert bad in out and "Permission denied" in out and "Mail queue is empty" not in out
    [record] = json.loads(site.cli("queue", "list", "--json").stdout)
    assert record["id"] == bad and "Permission denied" in record["last_error"]


# -- impossible Arrival times ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arrival", [float("nan"), float("inf"), time.time() + 10 * 86400],
                         ids=["nan", "inf", "future"])
def test_impossible_arrival_counts_from_the_file_time_and_expires(tmp_path, arrival):
    p = Provider(str(tmp_path), sections="[queue]\nmax_age = 1h")
    p.add_user("alice", ["example.org"])
    p.add_user("bob", ["example.net"])
    spool = Spool(p.spool_dir)
    msg_id = store(spool, "example.org", Envelope("s@example.net", [Recipient("u@example.org")],
                                                  arrival=arrival), b"Subject: t\r\n\r\nx\r\n")
    path = os.path.join(p.spool_dir, "example.org", msg_id)
    two_hours_ago = time.time() - 7200
    os.utime(path, (two_hours_ago, two_hours_ago))
    [record] = json.loads(p.run_cli("queue", "list", "--json").stdout)
    assert 7000 < record["age"] < 7400
    expired = p.run_cli("queue", "expire")
    assert expired.returncode == 0 and expired.stdout.startswith(b"1 expired"), expired.stdout
    assert message_ids(spool, "example.org") == []
    [dsn] = spool.messages("example.net")
    assert b"5.4.7" in dsn.read_data()


# -- start-up clean-up ----------------------------------------------------------------

def test_state_directory_is_set_aside_at_start_up(tmp_path):
    p = Provider(str(tmp_path))
    p.add_user("alice", ["example.org"])
    spool = Spool(p.spool_dir)
    msg_id = store(spool, "example.org", Envelope("s@remote.test", [Recipient("u@example.org")]),
                          b"Subject: t\r\nX-Token: kept\r\n\r\nx\r\n")
    domain = os.path.join(p.spool_dir, "example.org")
    os.makedirs(os.path.join(domain, msg_id + ".state", "inside"))
    os.mkdir(os.path.join(domain, "0123456789abcdef0123.state"))     # empty, no message
    p.start()
    try:        # set aside beside the first sessions, right after the start
        wait_for(lambda: sorted(os.listdir(domain)) in (sorted([msg_id, "tmp", ".lock"]),
                                                        sorted([msg_id, "tmp"])), 10, "the set-aside")
        aside = os.listdir(os.path.join(p.spool_dir, ".quarantine", "example.org"))
        assert len(aside) == 1 and aside[0].startswith(msg_id + ".state.")
        c = Customer(p.odmr_port)
        try:
            c.login("alice")
            c.send("ATRN example.org")
            assert c.reply()[0] == 250
            [text] = accept_all(c, 1)
            assert b"X-Token: kept" in text
        finally:
            c.close()
        wait_for(lambda: message_ids(spool, "example.org") == [], 10, "the delivery to be recorded")
        assert [n for n in os.listdir(domain) if n.endswith(".state")] == []
    finally:
        p.stop()


@pytest.mark.slow
@needs_root
def test_start_up_removes_tmp_debris_of_killed_queue_commands(site):
    """`queue bounce`/`queue expire` killed mid-run, and debris this account cannot even
    open (left by a command run as another user): all gone after start-up, links kept."""
    spool = Spool(site.spool_dir)
    nobody = pwd.getpwnam("nobody")
    ids = [store(spool, "example.org", Envelope("s@remote.test", [Recipient("u%d@example.org" % i)]),
                        b"Subject: t\r\n\r\n" + b"x" * 20000 + b"\r\n") for i in range(300)]
    for dirpath, dirs, files in os.walk(site.spool_dir):
        for name in dirs + files:
            os.chown(os.path.join(dirpath, name), nobody.pw_uid, nobody.pw_gid)
    for args in (["bounce"] + ids[:150], ["expire"]):
        proc = site.spawn("queue", *args)
        time.sleep(0.6)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    tmp = os.path.join(site.spool_dir, "example.org", "tmp")
    stray = os.path.join(tmp, "0123456789abcdef0123")
    with open(stray, "wb") as fh:
        fh.write(b"half a message")
    take_away(stray)
    os.symlink("/etc/passwd", os.path.join(tmp, "planted"))
    serve(site)
    for queue in ("example.org", ".outbound"):
        left = os.listdir(os.path.join(site.spool_dir, queue, "tmp")) \
            if os.path.isdir(os.path.join(site.spool_dir, queue, "tmp")) else []
        assert left == (["planted"] if queue == "example.org" else []), (queue, left)
    assert os.path.exists("/etc/passwd")


@pytest.mark.slow
def test_corrupt_and_truncated_files_are_quarantined_not_fatal(provider, caplog):
    directory = os.path.join(provider.spool_dir, "example.org")
    spool(provider, ["u@example.org"], token="good1")
    garbage, truncated, hollow = new_id(), new_id(), new_id()
    with open(os.path.join(directory, garbage), "wb") as fh:
        fh.write(b"\x00\xffthis is not a spool file\r\n\r\n")
    with open(os.path.join(directory, truncated), "wb") as fh:
        fh.write(MAGIC + b"Id: " + truncated.encode() + b"\nArrival: 1.0\nSender: <a@b.test>\nRecip")
    os.mkdir(os.path.join(directory, hollow))                 # a name that cannot be read at all
    spool(provider, ["v@example.org"], token="good2")
    with caplog.at_level(logging.WARNING):
        s = Script()
        assert atrn(provider, s) == "quit"
        wait_sessions_over(provider)
    assert sorted(TOKEN.findall(b"".join(m["data"] for m in s.messages))) == [b"good1", b"good2"]
    quarantine = os.path.join(provider.spool_dir, ".quarantine", "example.org")
    assert sorted(os.listdir(quarantine)) == sorted([garbage, truncated, hollow])
    assert sum("quarantined" in r.getMessage() for r in caplog.records) == 3
    assert not os.path.exists(os.path.join(directory, hollow))
    # the domain is not blocked: new mail still flows, and the CLI copes
    spool(provider, ["w@example.org"], token="good3")
    s2 = Script()
    assert atrn(provider, s2) == "quit"
    wait_sessions_over(provider)
    assert TOKEN.findall(s2.messages[0]["data"]) == [b"good3"]
    result = provider.run_cli("queue", "list", "--json")
    assert result.returncode == 0 and b"Traceback" not in result.stderr
