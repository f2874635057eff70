"""The customer side as a service: init/odmrd-fetch driven for real, and which
configuration file `odmrd fetch` reads (its own -c, never the provider's file
by accident).

The SysV script runs under dash with a defaults file pointing ODMRD at this
checkout; its poller collects from a real provider on loopback into a Maildir.
"""
from __future__ import annotations

import configparser
import email
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional

import pytest

from helpers import PASSWORD, ROOT, InitScript, alive, reuse_provider, send_mail, wait_for, which
from odmr.exits import EX_OK, EX_USAGE

pytestmark = pytest.mark.slow                   # the init script and a poller, driven for real

INIT_SCRIPT = os.path.join(ROOT, "init", "odmrd-fetch")
SHELL = which("dash") or "/bin/sh"
ODMRD = [sys.executable, os.path.join(ROOT, "odmrd.py")]
LSB_RUNNING, LSB_DEAD, LSB_STOPPED, LSB_NOT_CONFIGURED = 0, 1, 3, 6


@pytest.fixture
def provider(shared_provider):
    yield from reuse_provider(shared_provider)


def queue_message(provider, subject: str) -> None:
    send_mail(provider.smtp_port, "sender@outside.test", ["x@example.org"],
              b"From: <sender@outside.test>\r\nSubject: %s\r\n\r\nbody\r\n" % subject.encode())


def maildir_messages(path: str) -> List[str]:
    return sorted(glob.glob(os.path.join(path, "new", "*")))


class FetchService(InitScript):
    """What /etc/default/odmrd-fetch and /etc/odmrd/fetch.conf would hold, in a test directory."""

    def __init__(self, directory: str, odmr_port: int, odmrd: Optional[List[str]] = None):
        super().__init__(INIT_SCRIPT, SHELL, "ODMRD_FETCH_DEFAULTS", os.path.join(directory, "default-odmrd-fetch"),
                         os.path.join(directory, "fetch.conf"), os.path.join(directory, "run", "odmrd-fetch.pid"),
                         os.path.join(directory, "odmrd-fetch.log"), "fetch")
        self.dir = directory
        self.odmr_port = odmr_port
        self.maildir = os.path.join(directory, "Maildir")
        self.password_file = os.path.join(directory, "fetch.pw")
        with open(self.password_file, "w") as fh:
            fh.write(PASSWORD + "\n")
        os.chmod(self.password_file, 0o600)
        self.write_config()
        self.write_defaults(odmrd or ODMRD)

    def write_config(self, every: str = "every = 1s", extra: str = "") -> None:
        with open(self.config, "w") as fh:
            fh.write("[fetch]\nserver = 127.0.0.1:%d\nuser = alice\npassword_file = fetch.pw\n"
                     "domains = example.org\ntls = none\nmaildir = Maildir\n%s\n%s\n"
                     % (self.odmr_port, every, extra))

    def write_defaults(self, odmrd: List[str], more: str = "") -> None:
        with open(self.defaults, "w") as fh:
            fh.write('# what /etc/default/odmrd-fetch would say\nODMRD="%s"\n'
                     'ODMRD_FETCH_CONFIG=%s\nODMRD_FETCH_OPTS=\nODMRD_FETCH_PIDFILE=%s\n'
                     'ODMRD_FETCH_LOG=%s\nSTOP_TIMEOUT=5\n%s'
                     % (" ".join(odmrd), self.config, self.pid_file, self.log_file, more))


@pytest.fixture
def service(tmp_path, provider):
    svc = FetchService(str(tmp_path), provider.odmr_port)
    yield svc
    svc.cleanup()


def text(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr).decode("utf-8", "replace")


# -- the SysV script ------------------------------------------------------------------

def test_start_collects_then_stop(provider, service):
    queue_message(provider, "through the service")
    started = service.init("start")
    assert started.returncode == EX_OK, text(started)
    assert "odmrd-fetch started" in text(started)
    pid = service.pid()
    assert pid is not None and alive(pid)
    assert service.processes() == [pid]
    assert os.stat(service.pid_file).st_mode & 0o777 == 0o644
    assert os.stat(service.log_file).st_mode & 0o077 == 0           # the poller's lines are root's
    status = service.init("status")
    assert status.returncode == LSB_RUNNING, text(status)
    assert "running (pid %d)" % pid in text(status)

    wait_for(lambda: maildir_messages(service.maildir), 15.0, "the message in the Maildir")
    with open(maildir_messages(service.maildir)[0], "rb") as fh:
        assert email.message_from_binary_file(fh)["Subject"] == "through the service"
    wait_for(lambda: not provider.spooled("example.org"), 15.0, "the provider's spool to empty")
    assert "polling: alice at 127.0.0.1:%d" % provider.odmr_port in service.log()

    stopped = service.init("stop")
    assert stopped.returncode == EX_OK, text(stopped)
    assert not alive(pid)
    assert not os.path.exists(service.pid_file)
    status = service.init("status")
    assert status.returncode == LSB_STOPPED, text(status)
    assert service.init("stop").returncode == EX_OK            # stopping a stopped service


def test_stale_pid_file_is_status_1_and_stop_clears_it(service):
    gone = subprocess.Popen(["true"])
    gone.wait()
    os.makedirs(os.path.dirname(service.pid_file), exist_ok=True)
    with open(service.pid_file, "w") as fh:
        fh.write("%d\n" % gone.pid)
    status = service.init("status")
    assert status.returncode == LSB_DEAD, text(status)
    assert "dead but pid file" in text(status)
    stopped = service.init("stop")
    assert stopped.returncode == EX_OK, text(stopped)
    assert not os.path.exists(service.pid_file)
    assert service.init("status").returncode == LSB_STOPPED


def test_a_pid_file_naming_another_program_is_not_ours(service):
    """A reused pid: status says dead, and stop must not signal that process."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        os.makedirs(os.path.dirname(service.pid_file), exist_ok=True)
        with open(service.pid_file, "w") as fh:
            fh.write("%d\n" % other.pid)
        assert service.init("status").returncode == LSB_DEAD
        assert service.init("stop").returncode == EX_OK
        assert other.poll() is None and alive(other.pid)
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("every, extra, says", [
    ("", "", "`every`"),
    ("every = 1s", "colour = blue", "colour"),
    ("every = 1s", "", "cannot read password file"),
], ids=["no-every", "unknown-key", "no-password-file"])
def test_bad_config_start_fails_and_nothing_runs(service, every, extra, says):
    service.write_config(every=every, extra=extra)
    if says == "cannot read password file":
        os.unlink(service.password_file)
    started = service.init("start")
    assert started.returncode == LSB_NOT_CONFIGURED, text(started)
    output = started.stderr.decode()
    assert says in output and "configuration check failed; not starting" in output, output
    assert "Traceback" not in output
    assert service.processes() == []
    assert not os.path.exists(service.pid_file)
    assert service.init("status").returncode == LSB_STOPPED


def test_missing_config_file_is_not_configured(service):
    os.unlink(service.config)
    started = service.init("start")
    assert started.returncode == LSB_NOT_CONFIGURED
    assert "no configuration file %s" % service.config in started.stderr.decode()


def test_restart_with_a_broken_config_keeps_the_poller(service):
    assert service.init("start").returncode == EX_OK
    pid = service.pid()
    again = service.init("start")
    assert again.returncode == EX_OK and "already running (pid %d)" % pid in text(again)
    service.write_config(every="")
    restarted = service.init("restart")
    assert restarted.returncode == LSB_NOT_CONFIGURED, text(restarted)
    assert service.pid() == pid and alive(pid)
    service.write_config(every="every = 2s")
    restarted = service.init("force-reload")
    assert restarted.returncode == EX_OK, text(restarted)
    new = service.pid()
    assert new != pid and alive(new) and not alive(pid)
    assert service.processes() == [new]
    assert "every 2s" in text(restarted)
    assert service.init("stop").returncode == EX_OK
    assert service.processes() == []


def test_unknown_action_and_reload(service):
    assert service.init("frobnicate").returncode == 2
    reload = service.init("reload")
    assert reload.returncode == 3 and "use restart" in reload.stderr.decode()


def _bare_python() -> Optional[str]:
    """A python3 that another account can run (pyenv's lives under /root) and that has configobj."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK) and subprocess.run(
                [candidate, "-c", "import configobj, idna"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0 or which("setpriv") is None or _bare_python() is None,
                    reason="needs root, setpriv and a system python3 with configobj")
def test_runs_as_the_mailbox_owner(provider):
    """ODMRD_FETCH_USER: the Maildir's files belong to its owner, not root."""
    import pwd
    nobody = pwd.getpwnam("nobody")
    directory = tempfile.mkdtemp(prefix="odmrd-fetch-user-", dir="/tmp")    # not under root's 0700 tmp
    os.chmod(directory, 0o755)
    svc = FetchService(directory, provider.odmr_port, [_bare_python(), os.path.join(ROOT, "odmrd.py")])
    try:
        os.chown(svc.password_file, nobody.pw_uid, nobody.pw_gid)
        os.makedirs(svc.maildir)
        os.chown(svc.maildir, nobody.pw_uid, nobody.pw_gid)
        svc.write_defaults([_bare_python(), os.path.join(ROOT, "odmrd.py")], "ODMRD_FETCH_USER=nobody\n")
        queue_message(provider, "as nobody")
        started = svc.init("start")
        assert started.returncode == EX_OK, text(started)
        with open("/proc/%d/status" % svc.pid()) as fh:
            uids = [line.split()[1:] for line in fh if line.startswith("Uid:")][0]
        assert set(uids) == {str(nobody.pw_uid)}
        wait_for(lambda: maildir_messages(svc.maildir), 15.0, "the message in the Maildir")
        assert os.stat(maildir_messages(svc.maildir)[0]).st_uid == nobody.pw_uid
        assert svc.init("stop").returncode == EX_OK
        # a password file the account cannot read stops the start, though root could read it
        os.chown(svc.password_file, 0, 0)
        started = svc.init("start")
        assert started.returncode == LSB_NOT_CONFIGURED, text(started)
        assert "cannot read password file" in started.stderr.decode()
        assert svc.processes() == []
    finally:
        svc.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


# -- the shipped files ------------------------------------------------------------------

def _fetch_keys() -> List[str]:
    keys, inside = [], False
    with open(os.path.join(ROOT, "odmr", "configspec.ini")) as fh:
        for line in fh:
            if line.startswith("["):
                inside = line.strip() == "[fetch]"
            elif inside and "=" in line:
                keys.append(line.split("=")[0].strip())
    return keys


def test_shipped_fetch_conf_shows_every_key_and_passes_the_check():
    path = os.path.join(ROOT, "conf", "fetch.conf")
    with open(path) as fh:
        lines = [line.lstrip("#").strip() for line in fh]
    keys = _fetch_keys()
    assert len(keys) >= 12
    for key in keys:
        assert any(line.startswith(key + " =") for line in lines), key
    env = dict(os.environ, ODMR_PASSWORD="x")
    env.pop("ODMRD_CONFIG", None)
    result = subprocess.run(ODMRD + ["fetch", "-c", path, "--every", "--check"],
                            capture_output=True, env=env, timeout=30)
    assert result.returncode == EX_OK, text(result)
    assert "(tls starttls)" in text(result) and "every 15m" in text(result)
    assert "insecure = no" in lines


def test_systemd_unit_runs_the_poller_from_fetch_conf():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(os.path.join(ROOT, "init", "odmrd-fetch.service"))
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["ExecStart"].endswith("odmrd fetch -c /etc/odmrd/fetch.conf --every")
    assert service["ExecStartPre"].endswith("--every --check")
    assert service["Restart"] == "on-failure"
    assert service["User"] not in ("", "root")


def test_rc_script_runs_the_poller_from_fetch_conf():
    path = os.path.join(ROOT, "init", "odmrd-fetch.rc")
    assert subprocess.run(["sh", "-n", path]).returncode == 0
    with open(path) as fh:
        body = fh.read()
    assert 'fetch_args="-c ${odmrd_fetch_config} fetch --every' in body
    assert "run_rc_command" in body


# -- which configuration `odmrd fetch` reads -------------------------------------------

def fetch_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ODMRD_CONFIG", "ODMR_PASSWORD")}
    env.update(extra)
    return env


def test_fetch_takes_c_after_the_subcommand(provider, service):
    service.write_config(every="")                              # one run
    queue_message(provider, "dash c")
    result = subprocess.run(ODMRD + ["fetch", "-c", service.config, "-v"], capture_output=True,
                            env=fetch_env(), timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == EX_OK, text(result)
    assert len(maildir_messages(service.maildir)) == 1        # relative to the file
    assert "settings from %s" % service.config in result.stderr.decode()
    # the later -c wins over a global one
    result = subprocess.run(ODMRD + ["-c", "/nonexistent.conf", "fetch", "--config", service.config,
                                     "--check"], capture_output=True, env=fetch_env(), timeout=60)
    assert result.returncode == EX_OK, text(result)


def provider_host_config(directory: str, fetch_section: str = "") -> str:
    """A provider's own odmrd.conf as found on the provider host."""
    path = os.path.join(directory, "odmrd.conf")
    with open(path, "w") as fh:
        fh.write("hostname = provider-own-name.test\nspool_dir = /var/spool/odmrd\n"
                 "[odmr]\nlisten = 0.0.0.0:366\n[smtp]\nlisten = 0.0.0.0:25\n%s" % fetch_section)
    return path


def flags(provider, maildir: str) -> List[str]:
    return ["--server", "127.0.0.1:%d" % provider.odmr_port, "--user", "alice", "--tls", "none",
            "--maildir", maildir, "-v"]


def test_default_config_without_fetch_section_is_not_read(provider, tmp_path):
    """$ODMRD_CONFIG naming the provider's file: its hostname is not the customer's."""
    conf = provider_host_config(str(tmp_path))
    queue_message(provider, "not the provider's name")
    maildir = str(tmp_path / "md")
    result = subprocess.run(ODMRD + ["fetch"] + flags(provider, maildir), capture_output=True,
                            env=fetch_env(ODMRD_CONFIG=conf, ODMR_PASSWORD=PASSWORD), timeout=60)
    assert result.returncode == EX_OK, text(result)
    assert "no configuration file read: %s has no [fetch] section" % conf in result.stderr.decode()
    with open(maildir_messages(maildir)[0], "rb") as fh:
        stored = fh.read()
    assert b"provider-own-name.test" not in stored
    # missing settings say where they were looked for
    result = subprocess.run(ODMRD + ["fetch", "--maildir", maildir], capture_output=True,
                            env=fetch_env(ODMRD_CONFIG=conf), timeout=60)
    assert result.returncode == EX_USAGE
    assert result.stderr.decode().strip() == (
        "odmrd fetch: --server is required (no configuration file read: %s has no [fetch] section)"
        % conf)


@pytest.mark.skipif(os.geteuid() != 0 or which("unshare") is None, reason="needs root and unshare")
@pytest.mark.parametrize("with_fetch", [False, True], ids=["provider-only", "with-fetch-section"])
def test_etc_odmrd_conf_is_read_only_for_its_fetch_section(provider, tmp_path, with_fetch):
    """The real default path, /etc/odmrd/odmrd.conf, in a private mount namespace
    (an overlay on /etc that vanishes with the process)."""
    section = ("[fetch]\nserver = 127.0.0.1:%d\nuser = alice\ntls = none\nmaildir = %s\n"
               % (provider.odmr_port, tmp_path / "md")) if with_fetch else ""
    conf = provider_host_config(str(tmp_path), section)
    for name in ("upper", "work"):
        os.mkdir(str(tmp_path / name))
    args = ["--maildir", str(tmp_path / "md"), "-v"] if with_fetch else flags(provider, str(tmp_path / "md"))
    script = ('mount -t overlay overlay -o lowerdir=/etc,upperdir="$1",workdir="$2" /etc || exit 99\n'
              'mkdir -p /etc/odmrd && cp "$3" /etc/odmrd/odmrd.conf && shift 3 && exec "$@"')
    queue_message(provider, "default path")
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                             str(tmp_path / "upper"), str(tmp_path / "work"), conf] + ODMRD + ["fetch"]
                            + args, capture_output=True, env=fetch_env(ODMR_PASSWORD=PASSWORD), timeout=60)
    if result.returncode == 99:
        pytest.skip("no overlay mounts here: %s" % text(result))
    assert result.returncode == EX_OK, text(result)
    if os.path.exists("/etc/odmrd/odmrd.conf"):                 # the overlay stayed private
        with open("/etc/odmrd/odmrd.conf") as fh:
            assert "provider-own-name" not in fh.read()
    with open(maildir_messages(str(tmp_path / "md"))[0], "rb") as fh:
        stored = fh.read()
    if with_fetch:
        assert "settings from the [fetch] section of /etc/odmrd/odmrd.conf" in result.stderr.decode()
        assert b"by provider-own-name.test" in stored          # its hostname is ours now
    else:
        assert ("no configuration file read: /etc/odmrd/odmrd.conf has no [fetch] section"
                in result.stderr.decode())
        assert b"provider-own-name.test" not in stored


def test_every_in_the_file_polls_only_with_a_bare_every(tmp_path, provider):
    """`odmrd fetch -c FILE` is one run for cron even when FILE says `every`; only a bare
    --every (what the service scripts run) polls at that interval."""
    p = provider
    password = tmp_path / "pw"
    password.write_text(PASSWORD + "\n")
    os.chmod(str(password), 0o600)
    conf = tmp_path / "fetch.conf"
    conf.write_text("[fetch]\nserver = 127.0.0.1:%d\nuser = alice\npassword_file = %s\n"
                    "tls = none\nmaildir = %s\nevery = 1s\n"
                    % (p.odmr_port, password, tmp_path / "Maildir"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "odmrd.py"), "fetch", "-c",
                             str(conf)], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert b"no mail waiting" in result.stderr
