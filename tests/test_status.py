"""`odmrd status`: the running daemon answers over its control socket; LSB exit codes."""
from __future__ import annotations

import json
import os
import smtplib
import socket
import stat

import pytest

from helpers import Customer, Daemon, send_mail, wait_for
from odmr import accounts
from odmr.control import socket_path
from odmr.exits import EX_CANTCREAT

NOBODY = 65534
KEYS = {"pid", "uptime", "listeners", "sessions", "deliveries", "backlog"}


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(str(tmp_path))
    accounts.add_user(d.users, "alice", ["example.org"], "pw-alice-1", True)
    yield d
    d.cleanup()


def status(d: Daemon, *flags: str):
    from helpers import run_cli
    return run_cli("-c", d.config, "status", *flags)


def as_json(d: Daemon) -> dict:
    result = status(d, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def first_such(produce, ready, what: str):
    """The first of `produce()`'s answers for which `ready` holds, within 15 s: an intake
    worker's news reaches the main process a moment after its client saw the reply, and
    a busy worker may miss one listing of its sessions."""
    answers = []
    wait_for(lambda: answers.append(produce()) or ready(answers[-1]), 15, what)
    return answers[-1]


def login(port: int) -> Customer:
    import base64
    import hmac
    c = Customer(port)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO customer.test")[0] == 250
    code, lines = c.cmd("AUTH CRAM-MD5")
    digest = hmac.new(b"pw-alice-1", base64.b64decode(lines[0]), "md5").hexdigest()
    assert c.cmd(base64.b64encode(b"alice " + digest.encode()).decode())[0] == 235
    return c


def test_not_running_is_exit_3_with_one_line(daemon):
    result = status(daemon)
    assert result.returncode == 3
    assert len(result.stderr.decode().strip().splitlines()) == 1
    assert b"not running" in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.slow
def test_running_daemon_reports_sessions_and_backlog(daemon):
    daemon.start()
    send_mail(daemon.smtp_port, "s@remote.test", ["u@example.org"], b"Subject: a\r\n\r\nhi\r\n")
    smtp = smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10)
    smtp.ehlo("client.test")
    odmr = login(daemon.odmr_port)
    try:
        report = first_such(lambda: as_json(daemon), lambda r: len(r["sessions"]) == 2 and r["backlog"],
                            "both live sessions and the first one's message")
        assert set(report) == KEYS
        assert report["pid"] == daemon.proc.pid
        assert 0 <= report["uptime"] < 120
        assert {(l["address"], l["port"], l["tls"]) for l in report["listeners"]} == {
            ("127.0.0.1", daemon.odmr_port, False), ("127.0.0.1", daemon.smtp_port, False)}
        seen = {(s["port"], s["state"]) for s in report["sessions"]}
        assert seen == {(daemon.smtp_port, "ready"), (daemon.odmr_port, "authenticated")}
        assert all(s["peer"].startswith("127.0.0.1:") and set(s) == {"port", "peer", "state", "since"}
                   for s in report["sessions"])
        assert report["deliveries"] == []
        assert report["backlog"] == {"example.org": 1}
        text = first_such(lambda: status(daemon), lambda t: b"1 on port %d" % daemon.smtp_port in t.stdout,
                          "the intake session in the text report")
        assert text.returncode == 0
        out = text.stdout.decode()
        assert "odmrd is running (pid %d" % daemon.proc.pid in out
        assert "1 on port %d" % daemon.smtp_port in out and "example.org" in out
    finally:
        smtp.close()
        odmr.close()
    wait_for(lambda: as_json(daemon)["sessions"] == [], what="sessions to end")


@pytest.mark.slow
def test_delivery_in_progress_is_listed(daemon):
    daemon.start()
    for n in range(2):
        send_mail(daemon.smtp_port, "s@remote.test", ["u@example.org"], b"Subject: %d\r\n\r\nhi\r\n" % n)
    c = login(daemon.odmr_port)
    try:
        assert c.cmd("ATRN example.org")[0] == 250
        c.send("220 customer ready")
        assert c.line().startswith(b"EHLO")
        c.send("250 customer")                  # no PIPELINING: one command at a time
        assert c.line().startswith(b"MAIL FROM:")
        c.send("250 ok")
        assert c.line().startswith(b"RCPT TO:")
        c.send("250 ok")
        assert c.line() == b"DATA\r\n"
        c.send("354 go")
        while c.line() != b".\r\n":
            pass
        c.send("250 stored")
        assert c.line().startswith(b"MAIL FROM:")   # the second message waits for our answer
        report = as_json(daemon)
        [delivery] = report["deliveries"]
        assert delivery["domains"] == ["example.org"] and delivery["messages"] == 1
        assert delivery["peer"].startswith("127.0.0.1:")
        [session] = [s for s in report["sessions"] if s["port"] == daemon.odmr_port]
        assert session["state"] == "reversed" and session["peer"] == delivery["peer"]
        assert report["backlog"] == {"example.org": 1}
    finally:
        c.close()
    wait_for(lambda: as_json(daemon)["deliveries"] == [], what="the delivery to end")


@pytest.mark.slow
def test_socket_is_owner_only_and_removed_on_stop(daemon):
    daemon.start()
    path = socket_path(daemon.spool_dir)
    wait_for(lambda: os.path.lexists(path), what="the status socket")   # made after the bind
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert os.path.basename(path) == ".control." + socket.gethostname()
    assert daemon.term() == 0
    assert not os.path.lexists(path)
    assert status(daemon).returncode == 3


@pytest.mark.slow
def test_stale_socket_after_a_crash_is_replaced(daemon):
    daemon.start()
    daemon.kill9()
    path = socket_path(daemon.spool_dir)
    assert os.path.lexists(path)
    result = status(daemon)
    assert result.returncode == 3 and b"stale" in result.stderr
    daemon.start()
    assert as_json(daemon)["pid"] == daemon.proc.pid


@pytest.mark.slow
def test_a_link_where_the_socket_belongs_stops_the_start(daemon, tmp_path):
    os.makedirs(daemon.spool_dir, exist_ok=True)
    target = str(tmp_path / "elsewhere")
    os.symlink(target, socket_path(daemon.spool_dir))
    with pytest.raises(AssertionError):
        daemon.start(timeout=5)
    assert daemon.proc.wait(10) == EX_CANTCREAT
    assert "symbolic link" in daemon.log()
    assert not os.path.lexists(target)


def _ask_as(uid: int, path: str) -> bytes:
    """Connect and ask as another user (a forked child): what did the daemon answer?"""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            os.chdir(os.path.dirname(path))     # pytest's directories above are root's 0700
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(5)
                s.connect(os.path.basename(path))
                s.sendall(b"status\n")
                data = s.recv(65536)
                os.write(wfd, b"answer:" + data)
            except OSError as exc:
                os.write(wfd, b"error:%d" % exc.errno)
        finally:
            os._exit(0)
    os.close(wfd)
    data = b""
    while True:
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        data += chunk
    os.close(rfd)
    os.waitpid(pid, 0)
    return data


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_gets_nothing(daemon):
    daemon.start()
    path = socket_path(daemon.spool_dir)
    import errno
    assert _ask_as(NOBODY, path) == b"error:%d" % errno.EACCES      # the spool is 0700
    # even with the file system opened up, the daemon itself hangs up on a stranger
    os.chmod(daemon.spool_dir, 0o755)
    os.chmod(path, 0o777)
    try:
        # hung up on without a byte (a reset: the request was never read)
        assert _ask_as(NOBODY, path) in (b"answer:", b"error:%d" % errno.ECONNRESET,
                                         b"error:%d" % errno.EPIPE)
    finally:
        os.chmod(path, 0o600)
        os.chmod(daemon.spool_dir, 0o700)
    assert "refused a status request from uid %d" % NOBODY in daemon.log()
    assert as_json(daemon)["pid"] == daemon.proc.pid
