"""Intake worker processes (`[smtp] workers`): a real `odmrd serve -f`, real sockets.

The main process accepts and counts every intake connection and hands it to a
forked worker; limits, quotas, reloads and stops must hold as with one process.
"""
from __future__ import annotations

import os
import signal
import smtplib
import socket
import threading
import time
from typing import Set

import pytest

from helpers import Daemon, alive, reply_line, send_mail, wait_for
from helpers import children_of as children
from odmr import replies

pytestmark = pytest.mark.slow

MESSAGE = b"Subject: w\r\n\r\nbody\r\n"


def greeted(port: int) -> socket.socket:
    """A session past its 220; a 421 (a just-closed session not yet counted out) is retried."""
    deadline = time.monotonic() + 15
    while True:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if first_line(sock).startswith(b"220") or time.monotonic() > deadline:
            return sock
        sock.close()
        time.sleep(0.05)


def first_line(sock: socket.socket) -> bytes:
    return sock.makefile("rb").readline()


@pytest.fixture
def daemon(tmp_path):
    made = []

    def make(sections: str) -> Daemon:
        d = Daemon(str(tmp_path), sections=sections)
        from odmr import accounts
        accounts.add_user(d.users, "alice", ["example.org"], "pw-alice", True)
        made.append(d)
        d.start()
        count = int(sections.split("workers = ")[1].split()[0])
        wait_for(lambda: len(children(d.proc.pid)) == count, 10, "%d worker processes" % count)
        time.sleep(0.3)     # the start-up probes' sessions end (each counts until then)
        return d
    yield make
    for d in made:
        workers = children(d.proc.pid) if d.proc and d.proc.poll() is None else []
        d.cleanup()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_per_address_limit_holds_across_worker_processes(daemon):
    d = daemon("workers = 3\nmax_sessions_per_address = 2")
    first, second = greeted(d.smtp_port), greeted(d.smtp_port)
    with socket.create_connection(("127.0.0.1", d.smtp_port), timeout=10) as third:
        assert first_line(third).startswith(
            reply_line(replies.SESSION_LIMIT, replies.TOO_MANY_FROM_ADDRESS).encode())
    first.sendall(b"QUIT\r\n")
    assert first_line(first).startswith(b"221")
    first.close()

    def mail_accepted() -> bool:    # the worker's report of the session's end frees the slot
        try:
            return send_mail(d.smtp_port, "a@remote.test", ["alice@example.org"], MESSAGE) == {}
        except smtplib.SMTPConnectError:
            return False
    wait_for(mail_accepted, 15, "the closed session's slot")
    second.close()


def test_quota_counts_messages_another_worker_stored(daemon):
    d = daemon("workers = 2\n[domains]\n[[example.org]]\nmax_messages = 2")
    with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=10) as a, \
            smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=10) as b:     # one per worker
        for client in (a, b):           # both workers have looked at the (empty) queue
            client.ehlo("client.test")
            client.mail("a@remote.test")
            assert client.rcpt("alice@example.org")[0] == 250
            client.rset()
        a.sendmail("a@remote.test", ["alice@example.org"], MESSAGE)
        a.sendmail("a@remote.test", ["alice@example.org"], MESSAGE)
        b.mail("a@remote.test")
        code, text = b.rcpt("alice@example.org")
    assert (code, text[:5]) == (452, b"4.2.2")


def test_sighup_reaches_every_worker(daemon, tmp_path):
    d = daemon("workers = 2")
    with open(d.config) as fh:
        text = fh.read()
    with open(d.config, "w") as fh:
        fh.write(text.replace("hostname = odmr.test", "hostname = renamed.test"))
    d.proc.send_signal(signal.SIGHUP)

    def both_renamed() -> bool:     # two sessions at once: one in each worker
        a, b = greeted_lines(d.smtp_port)
        return b"renamed.test" in a and b"renamed.test" in b
    wait_for(both_renamed, 10, "the new hostname in both workers' greetings")
    time.sleep(0.2)
    # SPEC §8, one line per event: the workers reload too, but only the daemon says so
    assert d.log().count("INFO configuration reloaded") == 1, d.log()


def greeted_lines(port: int):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as a, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as b:
        return first_line(a), first_line(b)


def test_sigterm_lets_a_transaction_in_a_worker_finish_then_all_exit(daemon):
    d = daemon("workers = 2")
    workers = children(d.proc.pid)
    assert len(workers) == 2
    sock = greeted(d.smtp_port)
    reader = sock.makefile("rb")
    sock.sendall(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    while not reader.readline().startswith(b"354"):
        pass
    sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    sock.sendall(b"second half\r\n.\r\n")
    assert reader.readline().startswith(reply_line(replies.QUEUED, "").encode())
    sock.sendall(b"NOOP\r\n")
    assert reader.readline()[:3] in (b"421", b"")
    sock.close()
    assert d.proc.wait(20) == 0
    assert not any(alive(pid) for pid in workers)
    spooled = os.listdir(os.path.join(d.spool_dir, "example.org"))
    assert len([n for n in spooled if len(n) > 13 and "." not in n]) == 1


def test_workers_leave_with_the_main_process_and_free_the_pid_file(daemon, tmp_path):
    d = daemon("workers = 2")
    workers = children(d.proc.pid)
    assert len(workers) == 2
    d.kill9()
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, "the workers to exit")
    d.start()           # same pid file, same ports: nothing of the old daemon holds them
    assert send_mail(d.smtp_port, "a@remote.test", ["alice@example.org"], MESSAGE) == {}


def test_auto_counts_the_cpus_the_daemon_may_run_on(tmp_path):
    """`workers = auto` is four per CPU the daemon may use: under `taskset` (or a cpuset)
    on one CPU of a larger host it forks four, not four per CPU of the host."""
    d = Daemon(str(tmp_path), sections="workers = auto")
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})         # inherited by the daemon started now
    try:
        d.start()
    finally:
        os.sched_setaffinity(0, allowed)
    try:
        wait_for(lambda: len(children(d.proc.pid)) >= 4, 10, "four worker processes")
        time.sleep(0.3)
        assert len(children(d.proc.pid)) == 4
    finally:
        d.cleanup()


def socket_inodes(pid: int) -> Set[str]:
    found = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def test_workers_keep_no_socket_of_the_main_process(daemon):
    """A worker closes its copies of the listeners and of their wake-up socketpairs
    (it used to keep the pairs: a worker's write would have woken the main process's loop)."""
    d = daemon("workers = 2")
    mine = socket_inodes(d.proc.pid)
    for worker in children(d.proc.pid):
        assert socket_inodes(worker) & mine == set()


def test_a_killed_worker_gives_back_its_sessions(daemon):
    d = daemon("workers = 2\nmax_sessions_per_address = 2")
    workers = children(d.proc.pid)
    first, second = greeted(d.smtp_port), greeted(d.smtp_port)
    os.kill(workers[0], signal.SIGKILL)
    wait_for(lambda: "ended unexpectedly" in d.log(), 10, "the main process to notice")
    # its session's slot is free again (second's still counts), and the other worker takes the mail
    assert send_mail(d.smtp_port, "a@remote.test", ["alice@example.org"], MESSAGE) == {}
    first.close()
    second.close()


def test_a_client_at_its_limit_may_reconnect_right_after_quit(daemon):
    """The worker reports a session's end at QUIT, before its 221: a sending MTA that
    reconnects at once is never refused for the session it just ended."""
    d = daemon("workers = 4\nmax_sessions_per_address = 3")
    refused = []

    def client() -> None:
        for _ in range(60):
            with socket.create_connection(("127.0.0.1", d.smtp_port), timeout=10) as s:
                line = first_line(s)
                if not line.startswith(b"220"):
                    refused.append(line)
                    continue
                s.sendall(b"QUIT\r\n")
                assert first_line(s).startswith(b"221")
    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert refused == [], "%d of 180 reconnections refused: %r" % (len(refused), refused[:2])
