"""`odmrd serve` as a real process: detaching, pid file, logging, signals, privileges.

Every daemon these tests start is killed in teardown; "gone" is read from
/proc/PID/stat (a zombie counts as gone: PID 1 here reaps late).
"""
from __future__ import annotations

import base64
import grp
import hmac
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
from typing import List, Optional

import pytest

from helpers import Daemon, ROOT, alive, rcpt_code, refused, wait_for

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (privilege dropping)")


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


SYSLOG_PRESENT = any(_is_socket(p) for p in ("/dev/log", "/var/run/log", "/var/run/syslog"))


@pytest.fixture
def site_factory(tmp_path):
    made: List[Daemon] = []

    def make(extra: str = "", sections: str = "", directory: Optional[str] = None) -> Daemon:
        d = directory or str(tmp_path / ("site%d" % len(made)))
        os.makedirs(d, exist_ok=True)
        s = Daemon(d, extra, sections, detached=True)
        made.append(s)
        return s
    yield make
    for s in made:
        s.cleanup()


@pytest.fixture
def site(site_factory):
    s = site_factory("allow_root = yes")
    s.add_user("alice", "example.org")
    return s


def smtp_send(port: int, rcpt: str, sender: str = "someone@remote.test") -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        return s.sendmail(sender, [rcpt], b"Subject: test\r\n\r\nbody\r\n")


def spooled(site: Daemon, domain: str) -> List[str]:
    directory = os.path.join(site.spool_dir, domain)
    if not os.path.isdir(directory):
        return []
    return [n for n in os.listdir(directory) if n != "tmp" and not n.startswith(".")]


# -- detaching ----------------------------------------------------------------

@pytest.mark.slow
def test_serve_returns_only_once_the_daemon_runs(site):
    result = site.serve()
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    # No sleeping: when `serve` has returned 0 the daemon must already be usable.
    pid = site.pid()
    assert pid and pid != os.getpid() and alive(pid)
    with smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=5) as s:
        assert s.noop()[0] == 250
    with socket.create_connection(("127.0.0.1", site.odmr_port), timeout=5) as c:
        assert c.makefile("rb").readline().startswith(b"220 odmr.test")


@pytest.mark.slow
def test_detached_process_state(site):
    assert site.serve().returncode == 0
    pid = site.pid()
    assert os.readlink("/proc/%d/cwd" % pid) == "/"
    for fd in (0, 1, 2):
        assert os.readlink("/proc/%d/fd/%d" % (pid, fd)) == "/dev/null"
    with open("/proc/%d/stat" % pid) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ppid, pgrp, session = int(fields[1]), int(fields[2]), int(fields[3])
    assert ppid != os.getpid()
    assert session != os.getsid(0)          # its own session (setsid)...
    assert session != pid                   # ...but not its leader (second fork): no tty can be acquired
    assert pgrp == session                  # and in the process group setsid made, not the caller's
    with open("/proc/%d/status" % pid) as fh:
        umask = [line.split()[1] for line in fh if line.startswith("Umask:")]
    if umask:
        assert umask[0] == "0077"
    mode = os.stat(site.pid_file).st_mode & 0o777
    assert mode == 0o644


@pytest.mark.slow
def test_daemon_keeps_no_descriptor_the_caller_leaked(site):
    read_end, write_end = os.pipe()
    try:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "odmrd.py"), "-c", site.config, "serve"],
                                pass_fds=[write_end], capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr
        site.pids.append(site.pid())
        os.close(write_end)
        write_end = -1
        os.set_blocking(read_end, False)
        assert os.read(read_end, 1) == b""       # EOF: no daemon holds the write end
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


@pytest.mark.slow
def test_logs_written_after_detaching_reach_the_log_file(site):
    assert site.serve().returncode == 0
    assert smtp_send(site.smtp_port, "user@example.org") == {}
    wait_for(lambda: "smtp: accepted" in site.log(), 15, "the accepted message in the log")
    text = site.log()
    assert "odmrd started (pid %d)" % site.pid() in text
    assert "listening on 127.0.0.1:%d" % site.smtp_port in text
    line = [l for l in text.splitlines() if "smtp: accepted" in l][0]
    assert "odmrd[%d]" % site.pid() in line and "user@example.org" in line


@pytest.mark.slow
@pytest.mark.skipif(SYSLOG_PRESENT, reason="a syslog socket exists here")
def test_without_syslog_says_so_once_and_uses_the_log_file(site_factory):
    s = site_factory("allow_root = yes\nsyslog = auto")
    s.add_user("alice", "example.org")
    result = s.serve()
    assert result.returncode == 0, result.stderr
    lines = result.stderr.decode().splitlines()
    assert lines == ["odmrd: no syslog socket (/dev/log, /var/run/log, /var/run/syslog); "
                     "logging to %s" % s.log_file]
    assert "odmrd started" in s.log()


def test_syslog_handler_uses_facility_mail(tmp_path, monkeypatch):
    import logging
    from odmr import daemon
    path = str(tmp_path / "log.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    monkeypatch.setattr(daemon, "SYSLOG_SOCKETS", (str(tmp_path / "missing"), path))
    try:
        daemon.setup_logging("info", ("syslog", ""))
        logging.getLogger("odmrd").info("hello\nforged line")
        data = receiver.recv(4096)
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        receiver.close()
    assert data.startswith(b"<22>odmrd[%d]: hello | forged line" % os.getpid())   # mail.info


def test_fallback_log_path_when_log_file_is_unset(site_factory):
    from odmr import config, daemon
    s = site_factory("allow_root = yes")
    with open(s.config) as fh:
        text = fh.read().replace("log_file = odmrd.log\n", "")
    with open(s.config, "w") as fh:
        fh.write(text)
    settings = config.load(s.config)
    expected = "/var/log/odmrd.log" if os.access("/var/log", os.W_OK) else os.path.join(s.dir, "odmrd.log")
    assert daemon.fallback_log_file(settings) == expected
    assert daemon.log_target(settings, foreground=True) == ("stderr", "")


@pytest.mark.slow
def test_startup_failure_in_the_daemon_is_reported_by_serve(site_factory):
    s = site_factory("allow_root = yes")
    s.add_user("alice", "example.org")
    with open(os.path.join(s.dir, "not-a-dir"), "w") as fh:
        fh.write("x")
    with open(s.config) as fh:
        text = fh.read().replace("spool_dir = spool", "spool_dir = not-a-dir/spool")
    with open(s.config, "w") as fh:
        fh.write(text)
    result = s.serve()
    assert result.returncode == 73
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("odmrd: spool ") and "Traceback" not in lines[0]
    assert not os.path.exists(s.pid_file)
    assert refused(s.smtp_port) and refused(s.odmr_port)
    assert "not-a-dir/spool" in s.log()


@pytest.mark.slow
def test_bind_failure_is_one_line(site):
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", site.smtp_port))
        busy.listen(1)
        result = site.serve()
    assert result.returncode == 71
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "cannot listen on 127.0.0.1:%d" % site.smtp_port in lines[0]
    assert not os.path.exists(site.pid_file)


@pytest.mark.slow
def test_config_errors_from_serve(site_factory):
    s = site_factory("allow_root = yes\nmax_fun = 1\nno_such_key = 1")
    result = s.serve()
    assert result.returncode == 78
    text = result.stderr.decode()
    assert "max_fun" in text and "no_such_key" in text and "Traceback" not in text
    assert not os.path.exists(s.pid_file)


# -- pid file -------------------------------------------------------------------

@pytest.mark.slow
def test_second_start_is_refused_while_running(site):
    assert site.serve().returncode == 0
    pid = site.pid()
    result = site.serve()
    assert result.returncode == 73
    assert result.stderr.decode().strip() == \
        "odmrd: already running with pid %d (pid file %s)" % (pid, site.pid_file)
    assert site.pid() == pid and alive(pid)


@pytest.mark.slow
def test_stale_pid_file_is_replaced(site):
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(site.pid_file, "w") as fh:
        fh.write("%d\n" % dead.pid)
    assert site.serve().returncode == 0
    assert site.pid() not in (None, dead.pid) and alive(site.pid())


@pytest.mark.slow
def test_pid_file_naming_an_unrelated_live_process_is_stale(site):
    # The pid was reused by some other process: the lock, not the number, decides.
    with open(site.pid_file, "w") as fh:
        fh.write("%d\n" % os.getpid())
    result = site.serve()
    assert result.returncode == 0, result.stderr
    assert site.pid() != os.getpid() and alive(site.pid())


@pytest.mark.slow
def test_pid_file_symlink_is_not_followed(site):
    target = os.path.join(site.dir, "precious")
    with open(target, "w") as fh:
        fh.write("keep me\n")
    os.symlink(target, site.pid_file)
    result = site.serve()
    assert result.returncode == 73
    assert "pid file" in result.stderr.decode()
    with open(target) as fh:
        assert fh.read() == "keep me\n"


# -- signals ----------------------------------------------------------------------

@pytest.mark.slow
def test_sighup_reloads_without_dropping_sessions(site):
    assert site.serve().returncode == 0
    pid = site.pid()
    assert rcpt_code(site.smtp_port, "x@example.net") == 550
    assert rcpt_code(site.smtp_port, "y@example.com") == 550
    old_smtp = smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=10)
    old_odmr = socket.create_connection(("127.0.0.1", site.odmr_port), timeout=10)
    try:
        odmr_in = old_odmr.makefile("rb")
        assert odmr_in.readline().startswith(b"220 ")
        assert old_smtp.ehlo("client.test")[0] == 250
        with open(site.config, "a") as fh:
            fh.write("[domains]\n  [[example.net]]\n  recipients = x, postmaster\n")
        site.add_user("bob", "example.com")
        reloads = site.log().count("configuration reloaded")
        os.kill(pid, signal.SIGHUP)
        # the intake workers read the files again a moment after the daemon has said so, each
        # in its own time; the next connection may go to any of them (each says so at debug)
        workers = re.search(r"intake: (\d+) worker processes", site.log())
        everyone = 1 + (int(workers.group(1)) if workers else 0)
        wait_for(lambda: site.log().count("configuration reloaded") >= reloads + everyone, 15,
                 "the reload, in the daemon and in every intake worker")
        assert alive(pid) and site.pid() == pid
        wait_for(lambda: rcpt_code(site.smtp_port, "x@example.net") == 250, 10, "every worker")
        assert rcpt_code(site.smtp_port, "x@example.net") == 250
        assert rcpt_code(site.smtp_port, "nobody@example.net") == 550
        assert rcpt_code(site.smtp_port, "y@example.com") == 250
        # Sessions opened before the reload carry on.
        assert old_smtp.sendmail("a@remote.test", ["user@example.org"], b"Subject: x\r\n\r\ny\r\n") == {}
        old_odmr.sendall(b"NOOP\r\n")
        assert odmr_in.readline().startswith(b"250")
    finally:
        old_smtp.close()
        old_odmr.close()


@pytest.mark.slow
def test_sigterm_stops_detached_daemon_and_removes_pid_file(site):
    assert site.serve().returncode == 0
    pid = site.pid()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), 10, "the daemon to exit")
    assert not os.path.exists(site.pid_file)
    assert "odmrd stopped" in site.log()
    assert refused(site.smtp_port)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_foreground_stop_exit_code_zero(site, signum, tmp_path):
    err = str(tmp_path / "stderr")
    site.start(output=err)
    os.kill(site.proc.pid, signum)
    assert site.proc.wait(15) == 0
    assert not os.path.exists(site.pid_file)
    with open(err) as fh:
        text = fh.read()
    assert "listening on" in text and "odmrd stopped" in text      # -f logs to stderr
    assert not os.path.exists(site.log_file)


@pytest.mark.slow
def test_sigterm_lets_a_transaction_in_flight_finish(site, tmp_path):
    proc = site.start(output=str(tmp_path / "stderr")).proc
    s = smtplib.SMTP("127.0.0.1", site.smtp_port, timeout=10)
    s.ehlo("client.test")
    assert s.mail("a@remote.test")[0] == 250
    assert s.rcpt("user@example.org")[0] == 250
    assert s.docmd("DATA")[0] == 354
    s.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    os.kill(proc.pid, signal.SIGTERM)
    wait_for(lambda: refused(site.smtp_port), 10, "the listener to close")
    assert proc.poll() is None
    s.send(b"second half\r\n.\r\n")
    assert s.getreply()[0] == 250
    s.quit()
    assert proc.wait(10) == 0
    assert len(spooled(site, "example.org")) == 1


# -- privileges --------------------------------------------------------------------

@pytest.mark.slow
@needs_root
def test_root_without_user_is_refused(site_factory):
    s = site_factory("allow_root = no")
    s.add_user("alice", "example.org")
    for args in (("serve",), ("serve", "-f")):
        result = s.cli(*args, timeout=30)
        assert result.returncode == 78
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1 and "refusing to run as root" in lines[0]
    assert not os.path.exists(s.pid_file) and refused(s.smtp_port)


@pytest.mark.slow
@needs_root
def test_unknown_service_account_is_refused(site_factory):
    s = site_factory("user = no-such-account-odmrd")
    s.add_user("alice", "example.org")
    result = s.serve()
    assert result.returncode == 78
    assert result.stderr.decode().strip() == \
        "odmrd: user 'no-such-account-odmrd' (in %s) does not exist" % s.config


@pytest.fixture
def public_dir():
    """A directory the unprivileged account can traverse (pytest's tmp is root-only)."""
    d = tempfile.mkdtemp(prefix="odmrd-test.", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
@needs_root
def test_drops_to_nobody_before_touching_the_spool(site_factory, public_dir):
    nobody = pwd.getpwnam("nobody")
    s = site_factory("user = nobody\nallow_root = no", directory=public_dir)
    s.add_user("alice", "example.org")
    os.chown(s.users, nobody.pw_uid, nobody.pw_gid)
    os.makedirs(s.spool_dir, mode=0o700)
    os.chown(s.spool_dir, nobody.pw_uid, nobody.pw_gid)
    result = s.serve()
    assert result.returncode == 0, result.stderr
    pid = s.pid()
    with open("/proc/%d/status" % pid) as fh:
        status = dict(line.rstrip("\n").split(":", 1) for line in fh if ":" in line)
    assert status["Uid"].split() == [str(nobody.pw_uid)] * 4
    assert status["Gid"].split() == [str(nobody.pw_gid)] * 4
    assert status["Groups"].split() == [str(g) for g in os.getgrouplist("nobody", nobody.pw_gid)]
    assert smtp_send(s.smtp_port, "user@example.org") == {}
    with smtplib.SMTP("127.0.0.1", s.smtp_port, timeout=10) as client:     # IDNA after the drop
        client.ehlo("client.test")
        assert client.mail("someone@bücher.example", ["SMTPUTF8"])[0] == 250
        assert client.rcpt("user@straße.example")[0] == 550        # not hosted: no internal error
    domain_dir = os.path.join(s.spool_dir, "example.org")
    names = spooled(s, "example.org")
    assert names
    for path in [domain_dir] + [os.path.join(domain_dir, n) for n in names]:
        assert os.stat(path).st_uid == nobody.pw_uid, path
    assert os.stat(s.log_file).st_uid == nobody.pw_uid
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), 10, "the daemon to exit")
    # Its directory is root's, so the daemon cannot unlink its pid file: it empties it.
    assert not os.path.exists(s.pid_file) or os.path.getsize(s.pid_file) == 0
    assert "running as nobody" in s.log() and "odmrd stopped" in s.log()


@pytest.mark.slow
@needs_root
def test_users_file_unreadable_by_the_service_account(site_factory, public_dir):
    nobody = pwd.getpwnam("nobody")
    s = site_factory("user = nobody", directory=public_dir)
    s.add_user("alice", "example.org")
    os.chown(s.users, 0, 0)                     # root's, mode 0600: as if edited by hand
    os.makedirs(s.spool_dir, mode=0o700)
    os.chown(s.spool_dir, nobody.pw_uid, nobody.pw_gid)
    result = s.serve()
    assert result.returncode == 77
    lines = result.stderr.decode().splitlines()
    assert lines == ["odmrd: users file %s is not readable by nobody, so every reload would fail: "
                     "chown nobody %s" % (s.users, s.users)]
    assert not (os.path.exists(s.pid_file) and os.path.getsize(s.pid_file))
    assert refused(s.smtp_port)


@pytest.mark.slow
@needs_root
def test_a_users_file_behind_a_closed_directory_names_the_directory(site_factory, public_dir):
    """The file is the account's already: the fault, and the fix, is the directory above it."""
    nobody = pwd.getpwnam("nobody")
    private = os.path.join(public_dir, "priv")
    os.makedirs(private, mode=0o700)
    users = os.path.join(private, "users")
    s = site_factory("user = nobody\nusers_file = %s" % users, directory=public_dir)
    s.add_user("alice", "example.org")
    os.chown(users, nobody.pw_uid, nobody.pw_gid)
    os.makedirs(s.spool_dir, mode=0o700)
    os.chown(s.spool_dir, nobody.pw_uid, nobody.pw_gid)
    group = grp.getgrgid(nobody.pw_gid).gr_name
    checked = s.cli("check-config")
    assert checked.returncode == 78
    assert ("users file %s is not readable by nobody, so every reload would fail: directory %s "
            "is not searchable by nobody: chgrp %s %s && chmod g+x %s"
            % (users, private, group, private, private)) in checked.stderr.decode()
    assert "chown nobody" not in checked.stderr.decode()


@pytest.mark.slow
@needs_root
def test_tls_key_only_root_can_read_is_refused_by_check_config_and_serve(site_factory, public_dir):
    """A key made by root with mode 0600 starts (root loads it before the drop) and then makes
    every reload fail: both commands refuse it, naming the file and the fix."""
    from helpers import make_pki
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    pki = make_pki(os.path.join(public_dir, "pki"))
    os.chmod(os.path.join(public_dir, "pki"), 0o755)
    os.chmod(pki["server.pem"], 0o644)
    os.chmod(pki["server.key"], 0o600)
    s = site_factory("user = nobody", "[tls]\ncert_file = %s\nkey_file = %s"
                     % (pki["server.pem"], pki["server.key"]), directory=public_dir)
    s.add_user("alice", "example.org")
    os.chown(s.users, nobody.pw_uid, nobody.pw_gid)
    os.makedirs(s.spool_dir, mode=0o700)
    os.chown(s.spool_dir, nobody.pw_uid, nobody.pw_gid)
    key = pki["server.key"]
    fix = "chgrp %s %s && chmod g+r %s" % (group, key, key)
    checked = s.cli("check-config")
    assert checked.returncode == 78
    assert "TLS key ([tls] key_file) %s is not readable by nobody" % key in checked.stderr.decode()
    assert fix in checked.stderr.decode()
    served = s.serve()
    assert served.returncode == 77
    assert "not readable by nobody" in served.stderr.decode() and fix in served.stderr.decode()
    assert refused(s.smtp_port)
    os.chown(key, 0, nobody.pw_gid)
    os.chmod(key, 0o640)
    assert s.cli("check-config").returncode == 0


@pytest.mark.slow
@needs_root
def test_spool_the_service_account_cannot_write_is_named_by_check_config_and_serve(
        site_factory, public_dir):
    """Whatever serve refuses before it serves, check-config refuses too (an init script's
    restart must not stop a running daemon for it), naming the directory, not its parent."""
    nobody = pwd.getpwnam("nobody")
    s = site_factory("user = nobody", directory=public_dir)
    s.add_user("alice", "example.org")
    os.makedirs(s.spool_dir, mode=0o700)                    # root's: nobody cannot write it
    checked = s.cli("check-config")
    assert checked.returncode == 78
    line = "spool directory %s is not writable by nobody: chown -R nobody %s" % (s.spool_dir, s.spool_dir)
    assert line in checked.stderr.decode()
    served = s.serve()
    assert served.returncode == 73 and line in served.stderr.decode()
    assert refused(s.smtp_port)
    os.chown(s.spool_dir, nobody.pw_uid, nobody.pw_gid)
    domain = os.path.join(s.spool_dir, "example.org")
    os.makedirs(domain, mode=0o700)                     # one domain's directory is root's
    line = "spool directory %s is not writable by nobody: chown -R nobody %s" % (domain, domain)
    checked = s.cli("check-config")
    assert checked.returncode == 78 and line in checked.stderr.decode()
    served = s.serve()
    assert served.returncode == 73 and line in served.stderr.decode()
    os.chown(domain, nobody.pw_uid, nobody.pw_gid)
    assert s.cli("check-config").returncode == 0
    os.chmod(domain, 0o500)                     # nobody's already: the mode is what is wrong
    checked = s.cli("check-config")
    assert checked.returncode == 78
    assert ("spool directory %s is not writable by nobody: chmod 700 %s" % (domain, domain)
            in checked.stderr.decode())
    os.chmod(domain, 0o700)
    os.chmod(s.spool_dir, 0o500)                # a new domain's directory cannot be made
    s.add_user("carol", "example.net")
    enqueued = s.cli("enqueue", "-f", "a@remote.test", "x@example.net", input=b"Subject: x\n\nx\n")
    assert enqueued.returncode == 75
    assert "%s: Permission denied" % s.spool_dir in enqueued.stderr.decode()
    assert os.path.join(s.spool_dir, "example.net") not in enqueued.stderr.decode()
    os.chmod(s.spool_dir, 0o700)
    assert s.serve().returncode == 0


@pytest.mark.slow
@needs_root
def test_errors_name_the_domain_directory_at_fault(site_factory, public_dir):
    """A domain directory the service account lost access to after start: intake, ATRN,
    `queue` and `enqueue` each name that directory (not the spool root, not a bare errno)."""
    nobody = pwd.getpwnam("nobody")
    s = site_factory("user = nobody", directory=public_dir)
    s.add_user("alice", "example.org")
    domain = os.path.join(s.spool_dir, "example.org")
    os.makedirs(domain, mode=0o700)
    for path in (s.spool_dir, domain):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    assert s.serve().returncode == 0
    os.chown(domain, 0, 0)                                  # e.g. restored from a backup as root
    with smtplib.SMTP("127.0.0.1", s.smtp_port, timeout=10) as c:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            c.sendmail("someone@remote.test", ["u@example.org"], b"Subject: t\r\n\r\nx\r\n")
    assert refused.value.smtp_code == 451            # a local error, not a full disk
    with socket.create_connection(("127.0.0.1", s.odmr_port), timeout=10) as c:
        f = c.makefile("rwb")
        def command(line: str) -> bytes:
            f.write(line.encode() + b"\r\n")
            f.flush()
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            return reply
        f.readline()
        command("EHLO client.test")
        challenge = base64.b64decode(command("AUTH CRAM-MD5")[4:].strip())
        digest = hmac.new(b"secret-pw", challenge, "md5").hexdigest()
        assert command(base64.b64encode(b"alice " + digest.encode()).decode()).startswith(b"235")
        reply = command("ATRN example.org")
        assert reply.startswith(b"451"), reply
    wait_for(lambda: s.log().count(domain + ": Permission denied") >= 2, 10, "both log lines")
    for args in (("queue", "list"), ("queue", "list", "example.org")):
        listed = s.cli(*args)
        assert listed.returncode == 74 and domain + ": Permission denied" in listed.stderr.decode()
    queued = s.cli("enqueue", "-f", "a@remote.test", "u@example.org", input=b"Subject: t\n\nx\n")
    assert queued.returncode == 75 and domain + ": Permission denied" in queued.stderr.decode()


@pytest.mark.slow
@needs_root
def test_an_unsearchable_spool_root_is_named_not_its_domain(site_factory, public_dir):
    """When the spool root itself shuts the service account out, that root is the path the
    errors name: chmod'ing the domain directory would not help."""
    nobody = pwd.getpwnam("nobody")
    s = site_factory("user = nobody", directory=public_dir)
    s.add_user("alice", "example.org")
    domain = os.path.join(s.spool_dir, "example.org")
    os.makedirs(domain, mode=0o700)
    os.chown(domain, nobody.pw_uid, nobody.pw_gid)
    os.chown(s.spool_dir, 0, 0)                              # root's, 0700: nobody cannot search it
    os.chmod(s.spool_dir, 0o700)
    queued = s.cli("enqueue", "-f", "a@remote.test", "u@example.org", input=b"Subject: t\n\nx\n")
    assert queued.returncode == 75, queued.stderr
    assert s.spool_dir + ": Permission denied" in queued.stderr.decode()
    assert domain + ": Permission denied" not in queued.stderr.decode()


@pytest.mark.slow
def test_a_message_has_one_size_in_the_log_and_the_queue(site):
    """The intake log line and `queue list` give the same size: the stored message, with
    odmrd's Received: header, as it will be delivered."""
    assert site.serve().returncode == 0
    assert smtp_send(site.smtp_port, "user@example.org") == {}
    [record] = json.loads(site.cli("queue", "list", "--json").stdout)
    wait_for(lambda: "accepted id=%s" % record["id"] in site.log(), 10, "the log line")
    line = [l for l in site.log().splitlines() if "accepted id=%s" % record["id"] in l][0]
    assert " size=%d " % record["size"] in line, (line, record["size"])


@pytest.mark.slow
@needs_root
def test_a_users_file_out_of_reach_keeps_the_accounts_it_had(site_factory, public_dir):
    """A running daemon that can no longer read its users file (a directory's mode, an
    owner changed) keeps the accounts it has and says why: it never hosts nothing and
    refuses every customer's mail with 550."""
    nobody = pwd.getpwnam("nobody")
    etc = os.path.join(public_dir, "etc")
    os.mkdir(etc, 0o755)
    s = site_factory("user = nobody\nusers_file = etc/users", directory=public_dir)
    s.add_user("alice", "example.org")
    os.makedirs(s.spool_dir, mode=0o700)
    os.chown(s.spool_dir, nobody.pw_uid, nobody.pw_gid)
    assert s.serve().returncode == 0
    assert rcpt_code(s.smtp_port, "u@example.org") == 250
    os.chmod(etc, 0o700)                                 # the service account is locked out
    wait_for(lambda: "cannot read users file" in s.log(), 10, "the error line")
    assert "keeping the previous accounts" in s.log() and "0 accounts" not in s.log()
    assert rcpt_code(s.smtp_port, "u@example.org") == 250
    os.chmod(etc, 0o755)
    users = os.path.join(etc, "users")
    os.chown(users, 0, 0)                                # root's, mode 0600
    wait_for(lambda: s.log().count("keeping the previous accounts") >= 2, 10, "a second error")
    assert rcpt_code(s.smtp_port, "u@example.org") == 250


def test_log_file_rotated_away_and_not_recreatable_keeps_logging(tmp_path):
    """A log line must never raise into a session, even when the file cannot be reopened."""
    import logging as _logging
    from odmr.daemon import _LogFile
    path = tmp_path / "odmrd.log"
    handler = _LogFile(str(path))
    logger = _logging.getLogger("odmrd.test-rotation")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("first")
        os.rename(str(path), str(tmp_path / "odmrd.log.1"))
        os.mkdir(str(path))                  # the new file cannot be created
        logger.warning("second")             # must not raise
        os.rmdir(str(path))
        logger.warning("third")              # reopened once possible
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert (tmp_path / "odmrd.log.1").read_text().splitlines() == ["first", "second"]
    assert path.read_text().splitlines() == ["third"]
