"""Nothing under the spool is followed through a symbolic link (SPEC §7).

Every test plants a link where the spool keeps one of its own directories or
files — a domain directory, tmp/, a message, a state file, a lock file, the
quarantine, the outbound bounce queue — pointing at a file or a directory
outside the spool, then drives the real thing: daemon start-up, intake over
smtplib, ATRN with `odmrd fetch --maildir`, the `odmrd queue` commands, quota
counting and the maintenance thread. Each asserts that the target (content,
mode, owner, mtime, listing) is untouched, that the link is still there and was
logged, and that normal mail keeps flowing. Root ignores file modes, so the
checks look at what is stored, never at permission errors.
"""
from __future__ import annotations

import json
import logging
import os
import smtplib
import shutil
import stat
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import pytest

from helpers import PASSWORD, ROOT, Provider, message_ids, send_mail, store, wait_for
from odmr.spool import OUTBOUND, Envelope, Recipient, Spool, new_id

OLD = 1_000_000_000                       # mtime given to everything outside the spool
PRECIOUS = b"precious bytes kept outside the spool\n"
SECRET = b"SECRET-OUTSIDE-THE-SPOOL"


class Outside:
    """A file and a directory outside the spool, for planted links to point at.

    The directory looks like a spool queue (a message file, an orphan state file,
    tmp/ debris), so that code following a link into it has something to act on."""

    def __init__(self, base: str):
        self.root = os.path.join(base, "outside")
        os.mkdir(self.root, 0o755)
        self.file = os.path.join(self.root, "precious")
        self.big = os.path.join(self.root, "big")
        self.tree = os.path.join(self.root, "tree")
        self.missing = os.path.join(self.root, "not-there-yet")
        self.secret_id = new_id()
        os.mkdir(self.tree, 0o751)
        os.mkdir(os.path.join(self.tree, "tmp"), 0o751)
        self._write(self.file, PRECIOUS, 0o640)
        self._write(self.big, b"x" * 1024 * 1024, 0o640)
        self._write(os.path.join(self.tree, self.secret_id), spool_file(self.secret_id, "u@example.org"),
                    0o640)
        self._write(os.path.join(self.tree, new_id() + ".state"), b'{"attempts": 7}', 0o640)
        self._write(os.path.join(self.tree, "tmp", new_id()), b"looks like debris", 0o640)
        self._write(os.path.join(self.tree, "tmp", new_id() + ".done"), b"looks retired", 0o640)
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                os.utime(os.path.join(dirpath, name), (OLD, OLD))
        os.utime(self.root, (OLD, OLD))

    @staticmethod
    def _write(path: str, data: bytes, mode: int) -> None:
        with open(path, "wb") as fh:
            fh.write(data)
        os.chmod(path, mode)

    def snapshot(self) -> Dict[str, Tuple]:
        """Everything observable about the outside tree (but atime)."""
        seen = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in [""] + dirnames + filenames:
                path = os.path.join(dirpath, name) if name else dirpath
                st = os.lstat(path)
                content = sorted(os.listdir(path)) if stat.S_ISDIR(st.st_mode) else open(path, "rb").read()
                seen[os.path.relpath(path, self.root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                                          st.st_size, content)
        return seen


def spool_file(msg_id: str, rcpt: str, sender: str = "someone@remote.test") -> bytes:
    envelope = Envelope(sender=sender, recipients=[Recipient(rcpt)])
    return envelope.header_bytes(msg_id) + b"Subject: outside\r\n\r\n" + SECRET + b"\r\n"


def mail(token: str) -> bytes:
    return ("Subject: %s\r\nX-Token: %s\r\n\r\nbody %s\r\n" % (token, token, token)).encode()


def plant(link: str, target: str) -> None:
    os.symlink(target, link)


def assert_link(link: str, target: str) -> None:
    assert os.path.islink(link), "the planted link %s was removed or replaced" % link
    assert os.readlink(link) == target


def link_logged(text: str, link: str) -> bool:
    return any(link in line and "symbolic link" in line for line in text.splitlines())


def fetch(provider: Provider, maildir: str, user: str = "alice", domain: Optional[str] = None):
    args = [sys.executable, os.path.join(ROOT, "odmrd.py"), "fetch", "--server",
            "127.0.0.1:%d" % provider.odmr_port, "--user", user, "--tls", "none", "--maildir", maildir]
    if domain:
        args += ["--domain", domain]
    env = {k: v for k, v in os.environ.items() if k != "ODMRD_CONFIG"}
    env["ODMR_PASSWORD"] = PASSWORD
    return subprocess.run(args, capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


def delivered(maildir: str) -> List[bytes]:
    new = os.path.join(maildir, "new")
    if not os.path.isdir(new):
        return []
    result = []
    for name in sorted(os.listdir(new)):
        with open(os.path.join(new, name), "rb") as fh:
            result.append(fh.read())
    return result


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert b"Traceback" not in result.stderr and b"Traceback" not in result.stdout, result.stderr


@pytest.fixture
def site(tmp_path, caplog):
    """A provider (not started) and the outside tree; started providers are stopped."""
    caplog.set_level(logging.INFO, logger="odmrd")
    p = Provider(str(tmp_path))
    p.add_user("alice", ["example.org", "example.com"])
    p.add_user("bob", ["example.net"])
    p.outside = Outside(str(tmp_path))
    yield p
    p.stop()


def queue_dir(p: Provider, queue: str) -> str:
    return os.path.join(p.spool_dir, queue)


def real_message(p: Provider, domain: str, token: str, arrival: Optional[float] = None) -> str:
    """A message queued with the spool's own code (before the daemon starts)."""
    envelope = Envelope("someone@remote.test", [Recipient("u@" + domain)])
    if arrival is not None:
        envelope.arrival = arrival
    return store(Spool(p.spool_dir), domain, envelope, mail(token))


# -- start-up clean-up ------------------------------------------------------------

STARTUP_KINDS = ["domain", "tmp", "message", "state", "lock", "quarantine", "outbound", "outbound-tmp"]


def _plant_for_startup(p: Provider, kind: str) -> Tuple[str, str]:
    o = p.outside
    org = queue_dir(p, "example.org")
    if kind == "domain":
        return queue_dir(p, "example.net"), o.tree
    if kind == "tmp":
        os.rmdir(os.path.join(org, "tmp"))
        return os.path.join(org, "tmp"), o.tree
    if kind == "message":
        return os.path.join(org, new_id()), o.file
    if kind == "state":                    # a state file whose message is gone: debris, if it were real
        return os.path.join(org, new_id() + ".state"), o.file
    if kind == "lock":
        return os.path.join(org, ".lock"), o.file
    if kind == "quarantine":
        return os.path.join(p.spool_dir, ".quarantine"), o.tree
    if kind == "outbound":
        return queue_dir(p, OUTBOUND), o.tree
    if kind == "outbound-tmp":
        os.makedirs(queue_dir(p, OUTBOUND), 0o700)
        return os.path.join(queue_dir(p, OUTBOUND), "tmp"), o.tree
    raise AssertionError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", STARTUP_KINDS)
def test_startup_cleanup_reports_links_and_leaves_them_and_their_targets_alone(site, caplog, kind):
    kept = real_message(site, "example.org", "kept")
    link, target = _plant_for_startup(site, kind)
    plant(link, target)
    debris = os.path.join(queue_dir(site, "example.org"), "tmp", new_id())
    if kind != "tmp":
        with open(debris, "wb") as fh:
            fh.write(b"half written")
    before = site.outside.snapshot()
    site.start()
    # the clean-up runs beside the first sessions, right after the start
    wait_for(lambda: link_logged(caplog.text, link), 10, "the link to be reported")
    if kind != "tmp":                      # real debris is still cleaned
        wait_for(lambda: not os.path.exists(debris), 10, "the debris to go")
    assert site.outside.snapshot() == before
    assert_link(link, target)
    # and mail still flows: intake and delivery for a domain without links
    send_mail(site.smtp_port, "a@remote.test", ["u@example.com"], mail("flows"))
    result = fetch(site, str(site.dir) + "/md", domain="example.com")
    assert result.returncode == 0, result.stderr
    assert [b"X-Token: flows" in m for m in delivered(str(site.dir) + "/md")] == [True]
    if kind not in ("tmp", "lock"):        # those two make example.org refuse ATRN (451)
        result = fetch(site, str(site.dir) + "/md2", domain="example.org")
        assert result.returncode == 0, result.stderr
        assert [b"X-Token: kept" in m for m in delivered(str(site.dir) + "/md2")] == [True]
    else:
        assert site.spooled("example.org") == [kept]
    assert site.outside.snapshot() == before
    assert "Traceback" not in caplog.text


# -- intake ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["domain", "tmp", "domain-swapped", "tmp-swapped"])
def test_intake_never_writes_through_a_linked_directory(site, caplog, kind):
    site.start()
    net = queue_dir(site, "example.net")
    if kind.endswith("swapped"):           # the daemon already held the real directory open
        send_mail(site.smtp_port, "a@remote.test", ["u@example.net"], mail("first"))
        shutil.rmtree(net if kind == "domain-swapped" else os.path.join(net, "tmp"))
    elif kind == "tmp":
        os.makedirs(net, 0o700)
    link = net if kind.startswith("domain") else os.path.join(net, "tmp")
    plant(link, site.outside.tree)
    before = site.outside.snapshot()

    with pytest.raises(smtplib.SMTPDataError) as refused:
        send_mail(site.smtp_port, "a@remote.test", ["u@example.net"], mail("refused"))
    assert refused.value.smtp_code == 451
    # a message for a linked domain and a normal one is refused whole, nothing half stored
    with pytest.raises(smtplib.SMTPDataError):
        send_mail(site.smtp_port, "a@remote.test", ["u@example.org", "u@example.net"], mail("split"))
    send_mail(site.smtp_port, "a@remote.test", ["u@example.org"], mail("normal"))
    assert len(site.spooled("example.org")) == 1

    enqueue = site.run_cli("enqueue", "-f", "a@remote.test", "u@example.net", input=mail("enqueued"))
    assert enqueue.returncode != 0
    no_traceback(enqueue)
    assert len(enqueue.stderr.decode().strip().splitlines()) <= 2      # the warning, the error
    assert link_logged(enqueue.stderr.decode(), link)

    assert site.outside.snapshot() == before
    assert_link(link, site.outside.tree)
    assert link_logged(caplog.text, link), caplog.text
    assert "Traceback" not in caplog.text


def test_quota_does_not_count_what_a_link_points_at(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="odmrd")
    p = Provider(str(tmp_path), sections="[domains]\n[[example.org]]\nmax_bytes = 100K\n")
    p.add_user("alice", ["example.org"])
    outside = Outside(str(tmp_path))
    os.makedirs(queue_dir(p, "example.org"), 0o700)
    links = [os.path.join(queue_dir(p, "example.org"), new_id()) for _ in range(3)]
    for link in links:
        plant(link, outside.big)           # 3 MB if followed, over the 100K quota
    before = outside.snapshot()
    p.start()
    try:
        send_mail(p.smtp_port, "a@remote.test", ["u@example.org"], mail("under quota"))
        assert len(p.spooled("example.org")) == 1
    finally:
        p.stop()
    assert outside.snapshot() == before
    for link in links:
        assert_link(link, outside.big)


# -- ATRN and delivery --------------------------------------------------------------

ATRN_KINDS = ["domain", "tmp", "lock", "lock-dangling", "message", "state",
              "quarantine", "quarantine-domain", "quarantine-file"]


def _plant_for_atrn(p: Provider, kind: str, normal: List[str]) -> Tuple[str, str, Optional[str]]:
    """Plant `kind` for example.org; returns (link, target, id of a message the link concerns)."""
    o = p.outside
    org = queue_dir(p, "example.org")
    if kind == "domain":
        moved = os.path.join(p.dir, "org-moved-away")
        os.rename(org, moved)
        return org, o.tree, None
    if kind == "tmp":
        os.rename(os.path.join(org, "tmp"), os.path.join(p.dir, "tmp-moved-away"))
        return os.path.join(org, "tmp"), o.tree, None
    if kind == "lock":
        return os.path.join(org, ".lock"), o.file, None
    if kind == "lock-dangling":
        return os.path.join(org, ".lock"), o.missing, None
    if kind == "message":
        msg_id = new_id()
        return os.path.join(org, msg_id), o.file, msg_id
    if kind == "state":
        msg_id = normal[0]
        with open(o.file, "wb") as fh:       # if read, it says every recipient already has the mail
            fh.write(json.dumps({"attempts": 1, "done": {"u@example.org": "250 ok"}}).encode())
        os.chmod(o.file, 0o640)
        os.utime(o.file, (OLD, OLD))
        os.utime(o.root, (OLD, OLD))
        return os.path.join(org, msg_id + ".state"), o.file, msg_id
    corrupt = new_id()
    with open(os.path.join(org, corrupt), "wb") as fh:
        fh.write(b"garbage, not a spool file\n")
    quarantine = os.path.join(p.spool_dir, ".quarantine")
    if kind == "quarantine":
        return quarantine, o.tree, corrupt
    os.makedirs(quarantine, 0o700, exist_ok=True)
    if kind == "quarantine-domain":
        return os.path.join(quarantine, "example.org"), o.tree, corrupt
    os.makedirs(os.path.join(quarantine, "example.org"), 0o700, exist_ok=True)
    return os.path.join(quarantine, "example.org", corrupt), o.file, corrupt


@pytest.mark.slow
@pytest.mark.parametrize("kind", ATRN_KINDS)
def test_atrn_delivery_never_follows_a_planted_link(site, caplog, kind):
    """The kinds that block the domain's lock or its tmp/ make ATRN answer 451 (the
    domain's spool cannot be changed); the others deliver everything but what the
    link concerns. Either way the target is untouched and other customers get their mail."""
    site.start()
    for token in ("one", "two"):
        send_mail(site.smtp_port, "a@remote.test", ["u@example.org"], mail(token))
    send_mail(site.smtp_port, "a@remote.test", ["u@example.net"], mail("bobs"))
    normal = site.spooled("example.org")
    link, target, concerned = _plant_for_atrn(site, kind, normal)
    plant(link, target)
    before = site.outside.snapshot()
    maildir = str(site.dir) + "/md"

    result = fetch(site, maildir, domain="example.org")
    no_traceback(result)
    got = delivered(maildir)
    assert not any(SECRET in m for m in got)
    if kind in ("domain", "tmp", "lock", "lock-dangling"):
        assert result.returncode == 75, result.stderr       # ATRN 451: try again later
        assert got == []
        if kind != "domain":
            assert site.spooled("example.org") == normal     # nothing lost
    else:
        assert result.returncode == 0, result.stderr
        tokens = sorted(m.split(b"X-Token: ")[1].splitlines()[0] for m in got)
        if kind == "state":                  # that message waits until the link is sorted out
            assert tokens == [b"two"]
            assert os.path.exists(os.path.join(queue_dir(site, "example.org"), concerned))
        else:
            assert tokens == [b"one", b"two"]
        if kind.startswith("quarantine"):    # not moved where the link points
            assert os.path.exists(os.path.join(queue_dir(site, "example.org"), concerned))

    assert site.outside.snapshot() == before
    assert not os.path.lexists(site.outside.missing)
    assert_link(link, target)
    assert link_logged(caplog.text, link), caplog.text
    # other customers still get their mail
    bob = fetch(site, str(site.dir) + "/bob", user="bob")
    assert bob.returncode == 0, bob.stderr
    assert [b"X-Token: bobs" in m for m in delivered(str(site.dir) + "/bob")] == [True]
    assert "Traceback" not in caplog.text


def test_maintenance_never_follows_a_linked_lock(site, caplog):
    site.start()
    send_mail(site.smtp_port, "a@remote.test", ["u@example.org"], mail("old"))
    lock = os.path.join(queue_dir(site, "example.org"), ".lock")
    if os.path.lexists(lock):
        os.unlink(lock)
    plant(lock, site.outside.file)
    before = site.outside.snapshot()
    counts = site.service.maintenance.run_once(now=1e10)
    assert counts["expired"] == 0
    assert len(site.spooled("example.org")) == 1
    assert site.outside.snapshot() == before
    assert_link(lock, site.outside.file)
    assert link_logged(caplog.text, lock)


# -- the queue commands ---------------------------------------------------------------

def _cli(site, *args: str) -> subprocess.CompletedProcess:
    result = site.run_cli("queue", *args)
    no_traceback(result)
    return result


@pytest.mark.slow
def test_queue_commands_on_a_message_link(site):
    real = real_message(site, "example.org", "real")
    link = os.path.join(queue_dir(site, "example.org"), site.outside.secret_id)
    with open(site.outside.file, "wb") as fh:                  # a well-formed spool file, if read
        fh.write(spool_file(site.outside.secret_id, "u@example.org"))
    os.utime(site.outside.file, (OLD, OLD))
    plant(link, site.outside.file)
    before = site.outside.snapshot()

    listed = _cli(site, "list")
    assert listed.returncode == 0 and real.encode() in listed.stdout
    assert site.outside.secret_id.encode() not in listed.stdout
    assert link_logged(listed.stderr.decode(), link)
    for action in ("show", "delete", "bounce"):
        result = _cli(site, action, site.outside.secret_id)
        assert result.returncode == 65, (action, result)     # lasts: not "try again" (75)
        assert SECRET not in result.stdout
        assert link_logged(result.stderr.decode(), link)
    assert site.outside.snapshot() == before
    assert_link(link, site.outside.file)
    assert _cli(site, "delete", real).returncode == 0     # the rest still works
    assert message_ids(Spool(site.spool_dir), "example.org") == []


@pytest.mark.slow
def test_queue_commands_on_a_state_link(site):
    real = real_message(site, "example.org", "real")
    link = os.path.join(queue_dir(site, "example.org"), real + ".state")
    plant(link, site.outside.file)
    before = site.outside.snapshot()
    for action in ("show", "delete", "bounce"):
        result = _cli(site, action, real)
        assert result.returncode != 0, (action, result.stdout)
        assert link_logged(result.stderr.decode(), link)
    listed = _cli(site, "list")
    assert listed.returncode == 0 and link_logged(listed.stderr.decode(), link)
    assert site.outside.snapshot() == before
    assert_link(link, site.outside.file)
    assert message_ids(Spool(site.spool_dir), "example.org") == [] and \
        os.path.exists(os.path.join(queue_dir(site, "example.org"), real))


@pytest.mark.slow
def test_queue_summary_on_a_state_link(site):
    """`queue summary` leaves out a message whose state file is a link, as `queue list`
    and delivery do, and logs the link as they do; it never reads what the link names."""
    real = real_message(site, "example.org", "real")
    other = real_message(site, "example.org", "other")
    link = os.path.join(queue_dir(site, "example.org"), real + ".state")
    plant(link, site.outside.file)
    before = site.outside.snapshot()
    os.utime(site.outside.file, (OLD, OLD))            # atime == mtime again: a read moves it (relatime)
    atime = os.stat(site.outside.file).st_atime_ns
    summary = _cli(site, "summary", "--json")
    assert summary.returncode == 0, summary.stderr
    assert [(r["domain"], r["messages"]) for r in json.loads(summary.stdout)] == [("example.org", 1)]
    assert link_logged(summary.stderr.decode(), link)
    text = _cli(site, "summary")
    assert text.returncode == 0 and text.stdout.split(b"\n")[1].split()[:2] == [b"TOTAL", b"1"], text.stdout
    listed = _cli(site, "list")                        # the same message, left out the same way
    assert other.encode() in listed.stdout and real.encode() not in listed.stdout
    assert os.stat(site.outside.file).st_atime_ns == atime
    assert_link(link, site.outside.file)
    assert os.path.exists(os.path.join(queue_dir(site, "example.org"), real))
    assert site.outside.snapshot() == before


@pytest.mark.slow
@pytest.mark.parametrize("target", ["file", "missing"])
def test_queue_commands_on_a_lock_link(tmp_path, target):
    p = Provider(str(tmp_path))
    outside = Outside(str(tmp_path))
    real = real_message(p, "example.org", "real", arrival=OLD)     # due for expiry
    lock = os.path.join(queue_dir(p, "example.org"), ".lock")
    aim = outside.file if target == "file" else outside.missing
    plant(lock, aim)
    before = outside.snapshot()
    for args in (("delete", real), ("bounce", real), ("expire",)):
        result = p.run_cli("queue", *args)
        no_traceback(result)
        assert link_logged(result.stderr.decode(), lock), (args, result.stderr)
        if args[0] != "expire":
            assert result.returncode != 0
            assert len(result.stderr.decode().strip().splitlines()) <= 2
    assert outside.snapshot() == before
    assert not os.path.lexists(outside.missing)
    assert_link(lock, aim)
    assert message_ids(Spool(p.spool_dir), "example.org") == [real]


@pytest.mark.slow
def test_queue_commands_on_a_linked_domain_directory(site):
    real = real_message(site, "example.org", "real")
    link = queue_dir(site, "example.net")
    plant(link, site.outside.tree)
    before = site.outside.snapshot()
    listed = _cli(site, "list")
    assert listed.returncode == 0 and real.encode() in listed.stdout
    assert site.outside.secret_id.encode() not in listed.stdout
    assert link_logged(listed.stderr.decode(), link)
    assert _cli(site, "list", "example.net").stdout.strip() == b"Mail queue is empty"
    for action in ("show", "delete", "bounce"):
        result = _cli(site, action, site.outside.secret_id)
        assert result.returncode == 66, (action, result.stderr)    # no such message here
    assert _cli(site, "expire").returncode == 0
    assert site.outside.snapshot() == before
    assert_link(link, site.outside.tree)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["outbound", "outbound-tmp"])
def test_bounce_never_writes_through_a_linked_outbound_queue(site, caplog, kind):
    real = real_message(site, "example.org", "real")        # from a sender outside: DSN via OUTBOUND
    outbound = queue_dir(site, OUTBOUND)
    if kind == "outbound-tmp":
        os.makedirs(outbound, 0o700)
    link = outbound if kind == "outbound" else os.path.join(outbound, "tmp")
    plant(link, site.outside.tree)
    before = site.outside.snapshot()
    result = _cli(site, "bounce", real)
    assert result.returncode == 75, result.stderr           # try again later; nothing lost
    assert link_logged(result.stderr.decode(), link)
    assert message_ids(Spool(site.spool_dir), "example.org") == [real]
    # the daemon's bounce relay pass and start-up leave it alone too
    site.start()
    site.service.maintenance.run_once()
    assert site.outside.snapshot() == before
    assert_link(link, site.outside.tree)
    assert link_logged(caplog.text, link)
    assert "Traceback" not in caplog.text
