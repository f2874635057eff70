"""The spool's storage guarantees (SPEC §7): layout, durability steps, modes, locks, debris."""
from __future__ import annotations

import os
import time
import signal
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

from helpers import ROOT, message_ids, send_mail, store
from odmr.spool import (OUTBOUND, DomainBusy, Envelope, Recipient, Spool, State, new_id,
                        parse_header)

DATA = b"Subject: s\r\n\r\nbody\r\n"


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path / "spool"))
    s.prepare()
    return s


@pytest.fixture
def open_umask():
    """Run with umask 0, so every mode the spool ends up with is one it chose."""
    old = os.umask(0)
    yield
    os.umask(old)


def env(*rcpts: str, sender: str = "s@remote.test") -> Envelope:
    return Envelope(sender=sender, recipients=[Recipient(r) for r in rcpts or ("a@example.org",)])


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def python(code: str, **kw) -> subprocess.Popen:
    """A helper process running `code` with the odmr package importable."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


# -- layout and durability ----------------------------------------------------------

def test_write_goes_through_tmp_then_rename(spool, open_umask):
    incoming = spool.begin({"example.org": env("a@example.org"), "example.com": env("b@example.com")},
                           prefix=lambda d, i: b"X-Copy: %s %s\r\n" % (d.encode(), i.encode()))
    incoming.write(DATA)
    # while being written, every copy lives in its domain's tmp/ and is invisible
    for domain in ("example.org", "example.com"):
        tmp = os.path.join(spool.root, domain, "tmp")
        [name] = os.listdir(tmp)
        assert mode(os.path.join(tmp, name)) == 0o600
        assert message_ids(spool, domain) == []
        assert not spool.has_mail(domain)
    stored = incoming.commit()
    assert sorted(d for d, _ in stored) == ["example.com", "example.org"]
    for domain, msg_id in stored:
        directory = os.path.join(spool.root, domain)
        assert os.listdir(os.path.join(directory, "tmp")) == []
        assert message_ids(spool, domain) == [msg_id]
        assert mode(os.path.join(directory, msg_id)) == 0o600
        assert mode(directory) == 0o700 and mode(os.path.join(directory, "tmp")) == 0o700
        message = spool.load(domain, msg_id)
        assert message.read_data() == b"X-Copy: %s %s\r\n" % (domain.encode(), msg_id.encode()) + DATA
        assert [r.address for r in message.envelope.recipients] == \
            (["a@example.org"] if domain == "example.org" else ["b@example.com"])
    assert mode(spool.root) == 0o700


def test_spool_file_format_is_plain_text(spool):
    e = Envelope(sender="s@remote.test", recipients=[Recipient("a@example.org", "FAILURE", "rfc822;a@example.org")],
                 body="8BITMIME", smtputf8=True, ret="HDRS", envid="abc", client="[127.0.0.1] helo=x")
    msg_id = store(spool, "example.org", e, DATA)
    with open(os.path.join(spool.root, "example.org", msg_id), "rb") as fh:
        raw = fh.read()
    head, _, body = raw.partition(b"\n\n")
    assert body == DATA
    lines = head.decode().split("\n")
    assert lines[0] == "ODMR-Spool: 1"
    assert "Id: %s" % msg_id in lines
    assert "Sender: <s@remote.test>" in lines
    assert "Recipient: <a@example.org> NOTIFY=FAILURE ORCPT=rfc822;a@example.org" in lines
    parsed, parsed_id = parse_header(head + b"\n")
    assert parsed_id == msg_id
    assert (parsed.sender, parsed.recipients, parsed.body, parsed.smtputf8, parsed.ret, parsed.envid) == \
        (e.sender, e.recipients, e.body, e.smtputf8, e.ret, e.envid)


def test_abort_leaves_nothing(spool):
    incoming = spool.begin({"example.org": env()})
    incoming.write(DATA)
    incoming.abort()
    assert os.listdir(os.path.join(spool.root, "example.org", "tmp")) == []
    assert message_ids(spool, "example.org") == []


def test_state_file_is_written_atomically_with_mode_0600(spool, open_umask):
    msg_id = store(spool, "example.org", env("a@example.org", "b@example.org"), DATA)
    message = spool.load("example.org", msg_id)
    message.state.attempts = 2
    message.state.last_error = "450 4.2.1 busy"
    message.state.done["a@example.org"] = "250 ok"
    spool.save_state(message)
    path = os.path.join(spool.root, "example.org", msg_id + ".state")
    assert mode(path) == 0o600
    assert sorted(os.listdir(os.path.join(spool.root, "example.org"))) == sorted(["tmp", msg_id, msg_id + ".state"])
    again = spool.load("example.org", msg_id)
    assert again.state.attempts == 2 and [r.address for r in again.pending()] == ["b@example.org"]
    spool.remove(again)
    assert os.listdir(os.path.join(spool.root, "example.org")) == ["tmp"]


def test_unreadable_state_file_starts_afresh(spool):
    msg_id = store(spool, "example.org", env(), DATA)
    with open(os.path.join(spool.root, "example.org", msg_id + ".state"), "wb") as fh:
        fh.write(b"{not json")
    message = spool.load("example.org", msg_id)
    assert message.state == State()


@pytest.mark.slow
def test_ids_are_unique_and_sort_by_arrival(spool):
    ids = [store(spool, "example.org", env(), DATA) for _ in range(50)]
    assert len(set(ids)) == 50
    assert message_ids(spool, "example.org") == sorted(ids) == ids
    assert all(len(new_id()) > 13 for _ in range(3))


@pytest.mark.parametrize("name", ["../etc", "Example.org", "a/b", "", ".", "..", "tmp/../x", "exa mple.org"],
                         ids=["dotdot", "upper-case", "slash", "empty", "dot", "double-dot",
                              "traversal", "space"])
def test_directory_names_never_come_from_unchecked_input(spool, name):
    with pytest.raises(ValueError):
        spool.begin({name: env()})
    with pytest.raises(ValueError):
        message_ids(spool, name)
    assert sorted(os.listdir(spool.root)) == []


def test_domains_lists_only_valid_domain_directories(spool):
    store(spool, "example.org", env(), DATA)
    for junk in ("UPPER.test", "not a domain", ".hidden", "-bad.test"):
        os.makedirs(os.path.join(spool.root, junk))
    open(os.path.join(spool.root, "file.test"), "w").close()
    assert spool.domains() == ["example.org"]


# -- debris cleaning --------------------------------------------------------------

def test_prepare_removes_debris_and_keeps_messages(spool):
    kept = store(spool, "example.org", env(), DATA)
    message = spool.load("example.org", kept)
    message.state.attempts = 1
    spool.save_state(message)
    outbound = store(spool, OUTBOUND, env("x@remote.test"), DATA)
    directory = os.path.join(spool.root, "example.org")
    debris = [os.path.join(directory, "tmp", new_id()),
              os.path.join(directory, new_id() + ".state"),           # state without a message
              os.path.join(directory, ".state.%s.1234abcd" % kept),   # interrupted state write
              os.path.join(spool.root, OUTBOUND, "tmp", new_id())]
    for path in debris:
        with open(path, "wb") as fh:
            fh.write(b"half written")
    assert spool.prepare() == len(debris)
    assert not any(os.path.exists(p) for p in debris)
    assert message_ids(spool, "example.org") == [kept]
    assert spool.load("example.org", kept).state.attempts == 1
    assert message_ids(spool, OUTBOUND) == [outbound]
    assert spool.prepare() == 0


def test_a_clean_up_beside_running_sessions_leaves_what_they_are_making(spool):
    """The daemon cleans its spool after it has begun serving, `before` its start: an
    unlocked temporary file, a state write or a state file made since (a writer between
    creating and locking its file, a delivery saving state) is not debris."""
    kept = store(spool, "example.org", env(), DATA)
    directory = os.path.join(spool.root, "example.org")

    def debris() -> list:
        return [os.path.join(directory, "tmp", new_id()),
                os.path.join(directory, new_id() + ".state"),             # state without a message
                os.path.join(directory, ".state.%s.%s" % (kept, new_id()[-8:])),
                os.path.join(directory, ".tmp.%s" % new_id())]
    started = time.time()
    old, new = debris(), debris()
    for path, when in [(p, started - 600) for p in old] + [(p, started + 1) for p in new]:
        with open(path, "wb") as fh:
            fh.write(b"half written")
        os.utime(path, (when, when))
    assert spool.prepare(before=started) == len(old)
    assert [p for p in old if os.path.exists(p)] == []
    assert [p for p in new if not os.path.exists(p)] == []
    assert message_ids(spool, "example.org") == [kept]
    assert spool.prepare() == len(new)                  # a start-up's own clean-up takes them


def test_a_queue_that_cannot_be_read_does_not_stop_the_clean_up_of_the_others(spool, monkeypatch, caplog):
    """The daemon starts on a spool with one unreadable queue (the clean-up runs once it
    serves): that queue is named in the log, and every other queue is still cleaned."""
    import errno
    import logging
    kept = {d: store(spool, d, env("u@" + d), DATA) for d in ("a.test", "b.test", "c.test")}
    debris = os.path.join(spool.root, "c.test", new_id() + ".state")       # state without a message
    with open(debris, "wb") as fh:
        fh.write(b"{}")
    opened = Spool._queue_dir

    def unreadable(self, queue, *args, **kwargs):
        if queue == "b.test":
            raise PermissionError(errno.EACCES, "Permission denied", os.path.join(self.root, queue))
        return opened(self, queue, *args, **kwargs)
    monkeypatch.setattr(Spool, "_queue_dir", unreadable)
    with caplog.at_level(logging.ERROR, logger="odmrd"):
        assert spool.prepare(before=time.time() + 1) == 1
    assert not os.path.exists(debris)
    assert "%s: Permission denied" % os.path.join(spool.root, "b.test") in caplog.text
    monkeypatch.undo()
    assert all(message_ids(spool, d) == [kept[d]] for d in kept)


def test_a_tmp_directory_the_service_cannot_open_is_named_by_the_clean_up(tmp_path):
    """Run as the service account (a real unprivileged process): a queue whose tmp/ it may
    not open keeps that tmp/'s debris, and the log says so, naming it; a tmp/ that is not
    a directory is named too. The other queues are cleaned all the same."""
    import pwd
    import shutil
    import tempfile
    nobody = pwd.getpwnam("nobody")
    base = tempfile.mkdtemp(prefix="odmr-tmp-", dir="/tmp")      # tmp_path is root's only
    try:
        os.chmod(base, 0o711)
        spool = Spool(os.path.join(base, "spool"))
        for domain in ("a.test", "b.test", "c.test"):
            store(spool, domain, env("u@" + domain), DATA)
        debris = {d: os.path.join(spool.root, d, "tmp", new_id()) for d in ("a.test", "b.test")}
        for path in debris.values():
            open(path, "wb").close()
        shutil.rmtree(os.path.join(spool.root, "c.test", "tmp"))
        open(os.path.join(spool.root, "c.test", "tmp"), "wb").close()
        subprocess.run(["chown", "-R", "nobody:", spool.root], check=True)
        os.chmod(os.path.join(spool.root, "b.test", "tmp"), 0)
        code = ("import logging, os, sys; sys.path.insert(0, %r); from odmr.spool import Spool; "
                "logging.basicConfig(level=logging.INFO, format='%%(message)s'); "
                "os.setgid(%d); os.setuid(%d); print(Spool(%r).prepare())"
                % (ROOT, nobody.pw_gid, nobody.pw_uid, spool.root))
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "1"                            # a.test's debris
        assert not os.path.exists(debris["a.test"]) and os.path.exists(debris["b.test"])
        tmp_b, tmp_c = (os.path.join(spool.root, d, "tmp") for d in ("b.test", "c.test"))
        assert "start-up clean-up of %s skipped: %s: Permission denied" % (tmp_b, tmp_b) in run.stderr
        assert "start-up clean-up of %s skipped: %s: Not a directory" % (tmp_c, tmp_c) in run.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_clean_up_leaves_the_state_of_a_message_being_quarantined(spool):
    """A quarantine moves the message, then its state: a clean-up listing the queue in
    between must not take that state file for one without a message (after a `queue
    requeue` the message would go again to the recipients it had reached)."""
    moving = store(spool, "example.org", env(), DATA)
    assert spool.quarantine("example.org", moving, "test")
    directory = os.path.join(spool.root, "example.org")
    orphan = new_id() + ".state"
    for name in (moving + ".state", orphan):          # the state not moved yet; a real orphan
        with open(os.path.join(directory, name), "w") as fh:
            fh.write("{}")
    assert spool.prepare() == 1
    assert os.path.exists(os.path.join(directory, moving + ".state"))
    assert not os.path.exists(os.path.join(directory, orphan))


def test_killed_writer_leaves_only_debris_and_acknowledged_mail_survives(spool):
    writer = python("""
        import sys, time
        from odmr.spool import Spool, Envelope, Recipient
        s = Spool(sys.argv[1])
        e = Envelope(sender="s@remote.test", recipients=[Recipient("a@example.org")])
        acked = s.begin({"example.org": e})
        acked.write(b"Subject: acked\\r\\n\\r\\nx\\r\\n")
        done = acked.commit()[0][1]
        incoming = s.begin({"example.org": e})
        incoming.write(b"Subject: in flight\\r\\n\\r\\n" + b"y" * 100000)
        print(done, flush=True)
        time.sleep(60)
    """.replace("sys.argv[1]", repr(spool.root)))
    try:
        acked = writer.stdout.readline().decode().strip()
        assert acked, writer.stderr.read()
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)
    assert message_ids(spool, "example.org") == [acked]
    assert len(os.listdir(os.path.join(spool.root, "example.org", "tmp"))) == 1
    assert spool.prepare() == 1
    assert message_ids(spool, "example.org") == [acked]
    assert b"acked" in spool.load("example.org", acked).read_data()


def test_prepare_leaves_a_live_writers_tmp_file_alone(tmp_path):
    """Another process (or node) is writing: its locked tmp file survives our start-up."""
    root = str(tmp_path / "spool")
    spool = Spool(root)
    spool.prepare()
    incoming = spool.begin({"example.org": Envelope("a@b.c", [Recipient("u@example.org")])})
    incoming.write(b"Subject: live\r\n\r\nbody\r\n")
    tmp_dir = os.path.join(root, "example.org", "tmp")
    debris = os.path.join(tmp_dir, "0000000000000deadbeef")
    with open(debris, "wb") as fh:
        fh.write(b"left by a crash")
    code = ("import sys; sys.path.insert(0, %r); from odmr.spool import Spool; "
            "print(Spool(%r).prepare())" % (ROOT, root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert out.stdout.strip() == b"1", out.stderr
    assert not os.path.exists(debris)
    assert len(os.listdir(tmp_dir)) == 1
    assert incoming.commit()
    assert len(message_ids(spool, "example.org")) == 1


# -- corrupt files ------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"garbage\n", b"ODMR-Spool: 1\nId: x\nSender: <a@b.test>\n",
                                     b"ODMR-Spool: 1\nId: x\nSender: <a@b.test>\n\nno recipients\r\n",
                                     b"ODMR-Spool: 1\nbroken line without separator\n\n", b""],
                         ids=["garbage", "truncated-envelope", "no-recipients", "bad-line", "empty"])
def test_corrupt_message_is_quarantined_not_fatal(spool, content, open_umask):
    first = store(spool, "example.org", env("a@example.org"), DATA)
    bad = new_id()
    with open(os.path.join(spool.root, "example.org", bad), "wb") as fh:
        fh.write(content)
    last = store(spool, "example.org", env("c@example.org"), DATA)
    found = [m.id for m in spool.messages("example.org")]
    assert found == [first, last]
    assert message_ids(spool, "example.org") == [first, last]
    quarantined = os.path.join(spool.root, ".quarantine", "example.org", bad)
    assert os.path.exists(quarantined)
    assert mode(os.path.dirname(quarantined)) == 0o700
    assert mode(os.path.join(spool.root, ".quarantine")) == 0o700
    assert ".quarantine" not in spool.domains()


# -- locks --------------------------------------------------------------------------

def test_claim_excludes_other_threads(spool):
    claim = spool.claim(["example.org"])
    outcome = []

    def other():
        try:
            with spool.claim(["example.org"]):
                outcome.append("claimed")
        except DomainBusy as exc:
            outcome.append("busy %s" % exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert outcome == ["busy example.org"]
    claim.release()
    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert outcome[-1] == "claimed"


def test_claim_is_all_or_nothing(spool):
    with spool.claim(["example.com"]):
        with pytest.raises(DomainBusy):
            spool.claim(["example.org", "example.com"])
        # example.org was not left claimed by the failed attempt
        with spool.claim(["example.org"]):
            pass
    with spool.claim(["example.org", "example.com"]) as both:
        assert both.domains == ["example.org", "example.com"]
    assert mode(os.path.join(spool.root, "example.org", ".lock")) == 0o600


def test_claim_is_not_reentrant_within_one_thread(spool):
    with spool.claim(["example.org"]):
        with pytest.raises(DomainBusy):
            spool.claim(["example.org"])


HOLDER = """
    import fcntl, os, sys, time
    from odmr.spool import Spool
    s = Spool(%r)
    claim = s.claim(["example.org"])
    print("held", flush=True)
    sys.stdin.readline()
    claim.release()
    print("released", flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
def test_claim_excludes_another_process_and_a_crashed_holder_frees_it(spool):
    holder = python(HOLDER % spool.root)
    try:
        assert holder.stdout.readline() == b"held\n", holder.stderr.read()
        with pytest.raises(DomainBusy):
            spool.claim(["example.org"])
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with spool.claim(["example.org"]):
            pass
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(10)


def test_claim_released_by_another_process_can_be_taken(spool):
    holder = python(HOLDER % spool.root)
    try:
        assert holder.stdout.readline() == b"held\n", holder.stderr.read()
        with pytest.raises(DomainBusy):
            spool.claim(["example.org"])
        holder.stdin.write(b"go\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == b"released\n"
        with spool.claim(["example.org"]):
            pass
    finally:
        holder.kill()
        holder.wait(10)


@pytest.mark.slow
def test_this_process_holding_excludes_another_process(spool):
    with spool.claim(["example.org"]):
        probe = python("""
            import sys
            from odmr.spool import Spool, DomainBusy
            try:
                Spool(%r).claim(["example.org"])
            except DomainBusy:
                sys.exit(3)
            sys.exit(0)
        """ % spool.root)
        try:
            assert probe.wait(20) == 3, probe.stderr.read()
        finally:
            if probe.poll() is None:
                probe.kill()
                probe.wait(10)
    probe = python("""
        from odmr.spool import Spool
        Spool(%r).claim(["example.org"]).release()
    """ % spool.root)
    assert probe.wait(20) == 0, probe.stderr.read()


def test_two_spool_objects_in_one_process_exclude_each_other(spool):
    """Like two nodes sharing the spool: separate in-process locks, the flock still decides."""
    other = Spool(spool.root)
    with spool.claim(["example.org"]):
        with pytest.raises(DomainBusy):
            other.claim(["example.org"])


# -- usage ------------------------------------------------------------------------------

def test_usage_counts_messages_and_bytes(spool):
    assert spool.usage("example.org") == (0, 0)
    for _ in range(3):
        store(spool, "example.org", env(), DATA)
    count, size = spool.usage("example.org")
    assert count == 3 and size >= 3 * len(DATA)
    fresh = Spool(spool.root)
    assert fresh.usage("example.org")[0] == 3


@pytest.mark.slow
def test_provider_start_cleans_debris(tmp_path):
    from helpers import Provider, wait_for
    p = Provider(str(tmp_path))
    p.add_user("alice", ["example.org"])
    spool = Spool(p.spool_dir)
    spool.prepare()
    kept = store(spool, "example.org", env(), DATA)
    debris = os.path.join(p.spool_dir, "example.org", "tmp", new_id())
    with open(debris, "wb") as fh:
        fh.write(b"half")
    p.start()
    try:        # cleaned beside the first sessions, right after the start
        wait_for(lambda: not os.path.exists(debris), 10, "the debris to go")
        assert p.spooled("example.org") == [kept]
    finally:
        p.stop()


def test_ids_are_unique_across_threads_and_forked_children():
    """Ids come from a seeded generator, not getrandom(): a forked child (the
    detached daemon, a second serve process) must not repeat its parent's ids."""
    seen = set()

    def make(n):
        for _ in range(n):
            seen.add(new_id())
    threads = [threading.Thread(target=make, args=(2000,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8000
    assert all(len(i) == 21 and int(i, 16) >= 0 for i in seen)

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # child: report its next random parts
        try:
            os.write(write_end, ",".join(new_id()[13:] for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    mine = [new_id()[13:] for _ in range(5)]
    with os.fdopen(read_end, "rb") as fh:
        child = fh.read().decode().split(",")
    os.waitpid(pid, 0)
    assert len(child) == 5 and child != mine


def test_domain_directory_removed_behind_the_daemons_back_is_recreated(provider):
    import shutil
    send_mail(provider.smtp_port, "a@remote.test", ["u@example.net"], b"Subject: 1\r\n\r\nx\r\n")
    shutil.rmtree(os.path.join(provider.spool_dir, "example.net"))
    send_mail(provider.smtp_port, "a@remote.test", ["u@example.net"], b"Subject: 2\r\n\r\nx\r\n")
    assert len(provider.spooled("example.net")) == 1
