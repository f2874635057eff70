"""`odmrd queue summary`: the queue's shape (Postfix's qshape) from listings and file times."""
from __future__ import annotations

import json
import os
import time

import pytest

from helpers import alive, children_of, message_ids, run_cli, wait_for, write_config
from helpers import store as store_in_spool
from odmr.exits import EX_OK
from odmr.spool import OUTBOUND, Envelope, Recipient, Spool

LABELS = ["0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80-160m", "160-320m", "320-640m",
          "640-1280m", "older"]


@pytest.fixture
def site(tmp_path):
    config = write_config(str(tmp_path), 1, 2)
    return config, Spool(str(tmp_path / "spool"))


def store(spool: Spool, queue: str, minutes_old: float, size: int = 100) -> str:
    rcpt = "postmaster@remote.test" if queue == OUTBOUND else "u@" + queue
    msg_id = store_in_spool(spool, queue, Envelope(sender="s@remote.test", recipients=[Recipient(rcpt)]),
                            b"Subject: t\r\n\r\n" + b"x" * size + b"\r\n")
    when = time.time() - minutes_old * 60
    os.utime(os.path.join(spool.root, queue, msg_id), (when, when))
    return msg_id


def summary(config: str) -> list:
    result = run_cli("-c", config, "queue", "summary", "--json")
    assert result.returncode == EX_OK, result.stderr
    return json.loads(result.stdout)


def test_rows_per_domain_sorted_by_messages_with_age_buckets(site):
    config, spool = site
    for minutes in (1, 4.9, 7, 15, 2000):
        store(spool, "example.org", minutes)
    store(spool, "example.net", 30, size=5000)
    store(spool, "example.net", 100)
    store(spool, OUTBOUND, 700)
    rows = summary(config)
    assert [r["domain"] for r in rows] == ["example.org", "example.net", OUTBOUND]
    org, net, outbound = rows
    assert set(org) == {"domain", "messages", "bytes", "oldest", "buckets"}
    assert list(org["buckets"]) == LABELS
    assert org["messages"] == 5
    assert org["buckets"] == dict(zip(LABELS, [2, 1, 1, 0, 0, 0, 0, 0, 0, 1]))
    assert 2000 * 60 - 5 <= org["oldest"] <= 2000 * 60 + 30
    assert net["buckets"]["20-40m"] == 1 and net["buckets"]["80-160m"] == 1
    assert net["messages"] == 2 and 100 * 60 - 5 <= net["oldest"] <= 100 * 60 + 30
    sizes = [os.lstat(os.path.join(spool.root, "example.net", n)).st_size
             for n in message_ids(spool, "example.net")]
    assert net["bytes"] == sum(sizes) > 5000
    assert outbound["messages"] == 1 and outbound["buckets"]["640-1280m"] == 1


def test_reads_only_listings_and_file_times(site):
    """A state file, a temporary file, a link and an unparseable message: only what is a
    message file by its name counts, and nothing is opened (garbage counts like a message)."""
    config, spool = site
    msg_id = store(spool, "example.org", 12)
    directory = os.path.join(spool.root, "example.org")
    with open(os.path.join(directory, msg_id + ".state"), "w") as fh:
        fh.write("{}")
    with open(os.path.join(directory, "tmp", "abandoned"), "w") as fh:
        fh.write("x" * 1000)
    garbage = "%013x%08x" % (int(time.time() * 1e6), 7)
    with open(os.path.join(directory, garbage), "wb") as fh:
        fh.write(b"not a spool file")
    outside = os.path.join(os.path.dirname(spool.root), "outside")
    with open(outside, "w") as fh:
        fh.write("x" * 100000)
    os.symlink(outside, os.path.join(directory, "%013x%08x" % (1, 1)))
    os.symlink(directory, os.path.join(spool.root, "example.com"))
    rows = summary(config)
    assert [(r["domain"], r["messages"]) for r in rows] == [("example.org", 2)]
    assert rows[0]["buckets"]["0-5m"] == 1 and rows[0]["buckets"]["10-20m"] == 1
    assert rows[0]["bytes"] < 100000


def test_a_linked_domain_directory_is_reported_not_counted(site):
    """The summary lists queues as the spool does: a link in the root is left alone and
    named in the log (as every other spool reader does), not skipped in silence."""
    config, spool = site
    store(spool, "example.org", 1)
    os.symlink(os.path.join(spool.root, "example.org"), os.path.join(spool.root, "example.com"))
    result = run_cli("-c", config, "queue", "summary", "--json")
    assert result.returncode == EX_OK, result.stderr
    assert [r["domain"] for r in json.loads(result.stdout)] == ["example.org"]
    assert b"example.com is a symbolic link" in result.stderr


@pytest.mark.slow
def test_text_output_and_an_empty_queue(site):
    config, spool = site
    result = run_cli("-c", config, "queue", "summary")
    assert result.returncode == EX_OK and b"empty" in result.stdout
    assert run_cli("-c", config, "queue", "summary", "--json").stdout.strip() == b"[]"
    store(spool, "example.org", 50)
    store(spool, "example.net", 1)
    store(spool, "example.net", 2)
    lines = run_cli("-c", config, "queue", "summary").stdout.decode().splitlines()
    assert lines[0].split()[:4] == ["DOMAIN", "MESSAGES", "BYTES", "OLDEST"]
    assert lines[0].split()[4:] == LABELS
    assert lines[1].split()[:2] == ["TOTAL", "3"]
    assert lines[2].split()[:2] == ["example.net", "2"]
    assert lines[3].split()[:2] == ["example.org", "1"]
    assert lines[3].split()[3] == "50m"


def test_a_rescan_never_brings_back_what_was_delivered_while_it_ran():
    """The daemon's backlog (status, /metrics) is rescanned in the background: a listing
    taken before a delivery removed a message must not count that message again."""
    from odmr.qshape import Backlog, QueueRow
    backlog = Backlog()
    backlog.added("example.org", 100)
    backlog.added("example.org", 100)
    backlog.begin_scan()
    listed_before = [QueueRow("example.org", 2, 200, 1.0), QueueRow("example.net", 3, 300, 1.0)]
    backlog.removed("example.org", 100)             # delivered while the scan ran
    backlog.replace(listed_before)
    assert backlog.snapshot()["example.org"][:2] == (1, 100)
    assert backlog.snapshot()["example.net"][:2] == (3, 300)     # quiet queues take the scan
    backlog.begin_scan()
    backlog.replace([QueueRow("example.org", 4, 400, 1.0)])     # another process queued more
    assert set(backlog.snapshot()) == {"example.org"} and backlog.snapshot()["example.org"][0] == 4


def test_a_message_whose_state_file_is_a_link_is_left_out_in_either_listing_order(site, tmp_path):
    """Half the links are made before their messages, half after: on any filesystem the
    listing names some links before their message and some after, and the row is the
    same (counts, bytes, oldest, buckets) as for the plain messages alone."""
    from odmr import qshape
    config, spool = site
    outside = tmp_path / "outside"
    outside.write_text("not ours")
    plain = [store(spool, "example.org", minutes, size=100) for minutes in (1, 7, 30)]
    directory = os.path.join(spool.root, "example.org")
    linked = []
    for n in range(12):
        if n % 2:
            msg_id = store(spool, "example.org", 2000 + n, size=5000)
            os.symlink(str(outside), os.path.join(directory, msg_id + ".state"))
        else:
            msg_id = "%013x%08x" % (int(time.time() * 1e6) - n, n)       # the link comes first
            os.symlink(str(outside), os.path.join(directory, msg_id + ".state"))
            os.rename(os.path.join(spool.root, "example.org",
                                   store(spool, "example.org", 2000 + n, size=5000)),
                      os.path.join(directory, msg_id))
        linked.append(msg_id)
    sizes = sum(os.lstat(os.path.join(directory, m)).st_size for m in plain)
    for keep_ages in (True, False):
        [row] = qshape.summary(spool.root, keep_ages=keep_ages)
        assert (row.messages, row.bytes) == (3, sizes), keep_ages
        if keep_ages:
            assert row.oldest == min(os.lstat(os.path.join(directory, m)).st_mtime for m in plain)
            counts = row.buckets(time.time())
            assert (counts["0-5m"], counts["5-10m"], counts["20-40m"], counts["older"]) == (1, 1, 1, 0)
    [row] = summary(config)
    assert (row["messages"], row["bytes"], row["buckets"]["older"]) == (3, sizes, 0)


def test_the_daemons_oldest_age_leaves_out_a_message_whose_state_file_is_a_link(site, tmp_path):
    """`status` and /metrics (the scan without ages) show the oldest message counted: a
    left-out message met before its state file's link must not stay the queue's oldest."""
    from odmr import qshape
    config, spool = site
    directory = os.path.join(spool.root, "example.org")
    plain = [store(spool, "example.org", 1) for _ in range(3)]
    for n in range(40):     # in whatever order the listing names them, some message comes first
        msg_id = store(spool, "example.org", 5000 + n)
        os.symlink(str(tmp_path), os.path.join(directory, msg_id + ".state"))
    newest = min(os.lstat(os.path.join(directory, m)).st_mtime for m in plain)
    for keep_ages in (True, False):
        [row] = qshape.summary(spool.root, keep_ages=keep_ages)
        assert (row.messages, row.oldest) == (3, newest), keep_ages


def test_an_interrupted_summary_leaves_no_listing_process_behind(site, monkeypatch):
    """Ctrl-C, or a SIGINT sent to the command alone (`kill -INT`, a supervisor): the
    forked listing processes end with it, not seconds later on a large spool."""
    import signal
    from odmr import qshape
    config, spool = site
    for n in range(qshape.PARALLEL_FROM):
        os.makedirs(os.path.join(spool.root, "d%03d.test" % n, "tmp"))
    monkeypatch.setattr(qshape, "_rows", lambda *args: time.sleep(60) or [])
    forked = []
    start_share = qshape._Share.__init__

    def started_share(share, *args) -> None:
        start_share(share, *args)
        forked.append(share.pid)
    monkeypatch.setattr(qshape._Share, "__init__", started_share)

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            qshape.summary(spool.root, processes=2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(forked) == 2 and time.monotonic() - started < 10
    for pid in forked:
        try:
            os.kill(pid, signal.SIGKILL)        # a test must not leave them either way
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            continue
        pytest.fail("listing process %d outlived the interrupted summary" % pid)


def test_a_summary_ended_by_sigterm_leaves_no_listing_process_behind(site):
    """SIGTERM (or SIGKILL) ends the command at once, without Python seeing it: its listing
    processes notice at their next queue and end too, not when a large spool is listed."""
    import signal
    import subprocess
    import sys
    from helpers import ROOT
    from odmr import qshape
    config, spool = site
    for n in range(qshape.PARALLEL_FROM):
        os.makedirs(os.path.join(spool.root, "d%03d.test" % n, "tmp"))
    # each queue takes 50 ms to list: the whole spool ~5 s in each of two processes
    code = ("import sys, time; sys.path.insert(0, %r); from odmr import qshape, spool; "
            "listed = spool._queue_files; "
            "spool._queue_files = lambda *a: time.sleep(0.05) or listed(*a); "
            "print('listing', flush=True); qshape.summary(%r, processes=2)" % (ROOT, spool.root))
    command = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert command.stdout.readline() == b"listing\n"
        wait_for(lambda: len(children_of(command.pid)) == 2, 10, "two listing processes")
        listing = children_of(command.pid)
        command.send_signal(signal.SIGTERM)
        assert command.wait(10) == -signal.SIGTERM
        wait_for(lambda: not any(alive(pid) for pid in listing), 1.0,
                 "the listing processes to end")
    finally:
        command.kill()
        command.wait()


def test_queues_shared_out_among_processes_give_the_rows_one_process_gives(site):
    from odmr import qshape
    config, spool = site
    for n in range(qshape.PARALLEL_FROM + 20):
        for minutes in range(n % 3 + 1):
            store(spool, "d%03d.test" % n, minutes * 9, size=50 * n)
    now = time.time()
    alone = qshape.summary(spool.root, processes=1)
    shared = qshape.summary(spool.root, processes=3, now=now)
    assert [r.as_json(now) for r in shared] == [r.as_json(now) for r in alone]
    assert qshape.format_table(shared, now) == qshape.format_table(alone, now)
