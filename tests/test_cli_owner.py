"""Root running `odmrd user|enqueue` for a daemon that runs as `user`: files stay usable by it."""
from __future__ import annotations

import json
import os
import pwd
import tempfile

import pytest

from helpers import run_cli

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root"), pytest.mark.slow]


@pytest.fixture
def nobody_setup():
    nobody = pwd.getpwnam("nobody")
    base = tempfile.mkdtemp(prefix="odmr-owner-", dir="/tmp")
    os.chmod(base, 0o711)
    spool = os.path.join(base, "spool")
    os.mkdir(spool, 0o700)
    os.chown(spool, nobody.pw_uid, nobody.pw_gid)
    conf = os.path.join(base, "odmrd.conf")
    with open(conf, "w") as fh:
        fh.write("user = nobody\nspool_dir = spool\nusers_file = users\nlog_file = odmrd.log\n"
                 "[odmr]\nlisten = 127.0.0.1:1\n[smtp]\nlisten = 127.0.0.1:2\n")
    yield conf, base, nobody
    import shutil
    shutil.rmtree(base, ignore_errors=True)


def test_root_edits_keep_files_for_the_service_account(nobody_setup):
    conf, base, nobody = nobody_setup
    r = run_cli("-c", conf, "user", "add", "bob", "--domain", "example.net", "--password-stdin",
                input=b"pw-one\n")
    assert r.returncode == 0, r.stderr
    users = os.path.join(base, "users")
    st = os.stat(users)
    assert (st.st_uid, st.st_mode & 0o777) == (nobody.pw_uid, 0o600)
    r = run_cli("-c", conf, "user", "passwd", "bob", "--password-stdin", input=b"pw-two\n")
    assert r.returncode == 0, r.stderr
    assert os.stat(users).st_uid == nobody.pw_uid
    r = run_cli("-c", conf, "enqueue", "-f", "a@remote.test", "u@example.net",
                input=b"Subject: x\n\nhello\n")
    assert r.returncode == 0, r.stderr
    domain_dir = os.path.join(base, "spool", "example.net")
    assert os.stat(domain_dir).st_uid == nobody.pw_uid
    files = [f for f in os.listdir(domain_dir) if f not in ("tmp", ".lock")]
    assert files and all(os.stat(os.path.join(domain_dir, f)).st_uid == nobody.pw_uid for f in files)


def _one_queued(conf: str, base: str):
    r = run_cli("-c", conf, "user", "add", "bob", "--domain", "example.net", "--password-stdin",
                input=b"pw-one\n")
    assert r.returncode == 0, r.stderr
    r = run_cli("-c", conf, "enqueue", "-f", "a@remote.test", "u@example.net",
                input=b"Subject: x\n\nhello\n")
    assert r.returncode == 0, r.stderr
    r = run_cli("-c", conf, "queue", "list", "--json")
    [record] = json.loads(r.stdout)
    return record["id"], os.path.join(base, "spool", "example.net")


def test_a_queue_the_service_account_cannot_read_is_never_called_empty(nobody_setup):
    """An operator checking that nothing waits (before an uninstall) must not be told
    "empty" about mail the command could not see: the directory at fault is named."""
    conf, base, nobody = nobody_setup
    msg_id, domain_dir = _one_queued(conf, base)
    os.chown(domain_dir, 0, 0)
    os.chmod(domain_dir, 0o700)
    for args in (["queue", "summary"], ["queue", "summary", "--json"], ["queue", "list"],
                 ["queue", "show", msg_id], ["queue", "delete", msg_id], ["queue", "bounce", msg_id]):
        r = run_cli("-c", conf, *args)
        err = r.stderr.decode()
        assert r.returncode == 74, (args, r)
        assert "%s: Permission denied" % domain_dir in err, (args, err)
        assert b"empty" not in r.stdout and "no message" not in err and "internal error" not in err
    os.chown(domain_dir, nobody.pw_uid, nobody.pw_gid)
    assert os.path.exists(os.path.join(domain_dir, msg_id))


def test_an_unreadable_spool_root_is_one_line_not_an_internal_error(nobody_setup):
    conf, base, nobody = nobody_setup
    _one_queued(conf, base)
    root = os.path.join(base, "spool")
    os.chown(root, 0, 0)
    try:
        r = run_cli("-c", conf, "queue", "summary")
        assert r.returncode == 74, r
        assert r.stderr.decode().strip() == "odmrd: spool: %s: Permission denied" % root
    finally:
        os.chown(root, nobody.pw_uid, nobody.pw_gid)


def test_bouncing_a_null_sender_message_says_it_was_deleted(nobody_setup):
    conf, base, nobody = nobody_setup
    run_cli("-c", conf, "user", "add", "bob", "--domain", "example.net", "--password-stdin",
            input=b"pw-one\n")
    r = run_cli("-c", conf, "enqueue", "-f", "", "u@example.net", input=b"Subject: dsn\n\nx\n")
    assert r.returncode == 0, r.stderr
    [record] = json.loads(run_cli("-c", conf, "queue", "list", "--json").stdout)
    r = run_cli("-c", conf, "queue", "bounce", record["id"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == "%s: deleted: null sender, a bounce has nowhere to go" % record["id"]


def test_a_directory_not_named_like_a_domain_is_reported(nobody_setup):
    """An IDNA 2003 spool or a hand-made U-label directory is never delivered: say so."""
    conf, base, nobody = nobody_setup
    stray = os.path.join(base, "spool", "straße.de")
    os.mkdir(stray, 0o700)
    os.chown(stray, nobody.pw_uid, nobody.pw_gid)
    r = run_cli("-c", conf, "queue", "list")
    assert r.returncode == 0
    assert "%s is not named like a domain's spool directory" % stray in r.stderr.decode()


def test_queue_changes_reach_the_daemons_log_where_only_root_may_create_it(nobody_setup):
    """Like /var/log/odmrd.log: the daemon opens its log as root; enqueue and the queue
    commands, run by root for a daemon that runs as `user`, log there too (SPEC §8)."""
    conf, base, nobody = nobody_setup
    logs = os.path.join(base, "log")
    os.mkdir(logs, 0o755)                           # root's: nobody may not create files here
    log_file = os.path.join(logs, "odmrd.log")
    with open(conf) as fh:
        text = fh.read()
    with open(conf, "w") as fh:
        fh.write("syslog = no\nlog_file = %s\n" % log_file + text.replace("log_file = odmrd.log\n", ""))
    msg_id, _ = _one_queued(conf, base)
    assert run_cli("-c", conf, "queue", "delete", msg_id).returncode == 0
    with open(log_file) as fh:
        logged = fh.read()
    assert "accepted id=%s" % msg_id in logged and "deleted" in logged and msg_id in logged
    assert os.stat(log_file).st_uid == nobody.pw_uid      # the daemon can go on writing it


def test_an_unreadable_queue_is_named_when_many_queues_are_shared_out(nobody_setup):
    """With enough queues `queue summary` lists them in several processes; a queue one of
    them cannot read still fails the command, naming the directory (not an internal error,
    not a smaller queue)."""
    from odmr import qshape
    from odmr.spool import Envelope, Recipient, Spool
    from helpers import store
    conf, base, nobody = nobody_setup
    _one_queued(conf, base)
    root = os.path.join(base, "spool")
    spool = Spool(root)
    domains = ["d%03d.test" % n for n in range(qshape.PARALLEL_FROM + 10)]
    for domain in domains:
        store(spool, domain, Envelope(sender="s@remote.test", recipients=[Recipient("u@" + domain)]),
              b"Subject: t\r\n\r\nx\r\n")
    for where, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(where, name), nobody.pw_uid, nobody.pw_gid)
    r = run_cli("-c", conf, "queue", "summary", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == len(domains) + 1
    hidden = os.path.join(root, domains[len(domains) // 2])
    os.chown(hidden, 0, 0)
    os.chmod(hidden, 0o700)
    r = run_cli("-c", conf, "queue", "summary")
    err = r.stderr.decode()
    assert r.returncode == 74, r
    assert "%s: Permission denied" % hidden in err and "internal error" not in err, err
    assert b"TOTAL" not in r.stdout
