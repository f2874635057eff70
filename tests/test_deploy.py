"""Deployment: the single-file build on a bare interpreter, and the init scripts.

The zipapp is built once into a temporary directory and run with
`python3 -I -S` (no site-packages, no user paths, not the checkout) from `/`.
The LSB script runs under dash against that zipapp through a defaults file.
"""
from __future__ import annotations

import configparser
import json
import os
import signal
import smtplib
import subprocess
import sys
import zipfile
from typing import Optional

import pytest

from helpers import ROOT, InitScript, alive, free_port, rcpt_code, read_pid_file, wait_for, which

pytestmark = pytest.mark.slow                   # a pyz build and the init scripts

INIT_SCRIPT = os.path.join(ROOT, "init", "odmrd")
DASH = which("dash")


def build(output: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "odmr.build", "--output", output] + list(extra),
                          cwd=ROOT, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("dist") / "odmrd.pyz")
    result = build(path)
    assert result.returncode == 0, result.stderr
    return path


def bare(pyz: str, *args: str, input: Optional[bytes] = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the zipapp on a bare interpreter, from /, with a scrubbed environment."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run([sys.executable, "-I", "-S", pyz] + list(args), cwd="/", env=env,
                          input=input, capture_output=True, timeout=timeout)


class Install(InitScript):
    """A small installation: config, users, spool, log, and a defaults file for the init script."""

    def __init__(self, directory: str, pyz: str):
        super().__init__(INIT_SCRIPT, DASH or "dash", "ODMRD_DEFAULTS", os.path.join(directory, "default-odmrd"),
                         os.path.join(directory, "odmrd.conf"), os.path.join(directory, "run", "odmrd.pid"),
                         os.path.join(directory, "odmrd.log"), "serve")
        self.dir = directory
        self.pyz = pyz
        self.smtp_port = free_port()
        self.odmr_port = free_port()
        self.spool = os.path.join(directory, "spool")
        self.started = os.path.join(directory, "odmrd.started")     # not /run's
        self.write_config()
        with open(self.defaults, "w") as fh:
            fh.write('# what /etc/default/odmrd would say\n'
                     'ODMRD="%s -I -S %s"\nODMRD_CONFIG=%s\nODMRD_OPTS=\nODMRD_STARTED=%s\n'
                     % (sys.executable, pyz, self.config, self.started))

    def write_config(self, extra: str = "", pid_file: str = "run/odmrd.pid") -> None:
        with open(self.config, "w") as fh:
            fh.write("hostname = odmr.test\nspool_dir = spool\nusers_file = users\n"
                     "pid_file = %s\nlog_file = odmrd.log\nsyslog = no\n"
                     "allow_root = yes\ngrace_period = 5s\n%s\n"
                     "[odmr]\nlisten = 127.0.0.1:%d\n[smtp]\nlisten = 127.0.0.1:%d\n"
                     % (pid_file, extra, self.odmr_port, self.smtp_port))

    def odmrd(self, *args: str, input: Optional[bytes] = None) -> subprocess.CompletedProcess:
        return bare(self.pyz, "-c", self.config, *args, input=input)

    def add_user(self, name: str, domain: str) -> None:
        result = self.odmrd("user", "add", name, "--domain", domain, "--password-stdin", input=b"pw-123456\n")
        assert result.returncode == 0, result.stderr


@pytest.fixture
def install(tmp_path, pyz):
    inst = Install(str(tmp_path), pyz)
    inst.add_user("alice", "example.org")
    yield inst
    inst.cleanup()


# -- the build ---------------------------------------------------------------------

def test_pyz_is_a_clean_zipapp(pyz):
    with open(pyz, "rb") as fh:
        assert fh.readline() == b"#!/usr/bin/env python3\n"
    assert os.access(pyz, os.X_OK)
    with zipfile.ZipFile(pyz) as archive:
        names = archive.namelist()
        main = archive.read("__main__.py").decode()
    assert "odmr" in main
    for needed in ("__main__.py", "odmr/__init__.py", "odmr/__main__.py", "odmr/cli.py",
                   "odmr/configspec.ini", "configobj/__init__.py", "configobj/validate.py",
                   "idna/__init__.py", "idna/core.py", "idna/uts46data.py", "licenses/idna.txt"):
        assert needed in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyo")]
    sources = [n for n in names if n.endswith(".py") and n != "__main__.py"]
    assert sources and [n for n in sources if n + "c" not in names] == []     # byte code beside each
    assert names == sorted(names)


def test_the_zipapp_runs_its_byte_code_not_its_sources(pyz):
    """A zipapp cannot cache what it compiles: the byte code built in is what runs (for
    this interpreter), so a command does not compile the whole package each time."""
    probe = ("import sys; sys.path.insert(0, %r); import odmr.cli, odmr.spool, idna, configobj; "
             "print(' '.join(m.__file__ for m in (odmr.cli, odmr.spool, idna, configobj)))" % pyz)
    result = subprocess.run([sys.executable, "-I", "-S", "-c", probe], cwd="/", capture_output=True,
                            timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    files = result.stdout.decode().split()
    assert len(files) == 4 and all(f.startswith(pyz + "/") and f.endswith(".pyc") for f in files), files


def test_another_python_compiles_the_sources_instead(pyz, tmp_path):
    """Byte code of another interpreter version (its magic number differs) is passed over
    for the source beside it: the zipapp still runs everywhere it did."""
    import zipfile
    other = str(tmp_path / "other.pyz")
    with zipfile.ZipFile(pyz) as old, zipfile.ZipFile(other, "w") as new:
        for info in old.infolist():
            data = old.read(info)
            if info.filename.endswith(".pyc"):
                data = b"\x00\x00" + data[2:]            # no interpreter's magic number
            new.writestr(info, data)
    probe = ("import sys; sys.path.insert(0, %r); import odmr.cli; print(odmr.cli.__file__)" % other)
    result = subprocess.run([sys.executable, "-I", "-S", "-c", probe], cwd="/", capture_output=True,
                            timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == other + "/odmr/cli.py"
    result = subprocess.run([sys.executable, "-I", "-S", other, "--version"], cwd="/",
                            capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.startswith(b"odmrd "), result


def test_build_is_reproducible(pyz, tmp_path):
    again = str(tmp_path / "again.pyz")
    result = build(again)
    assert result.returncode == 0, result.stderr
    with open(pyz, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()


def test_build_bad_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = build(str(blocker / "odmrd.pyz"))
    assert result.returncode == 73
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("odmr.build: ")


def test_version_on_a_bare_interpreter(pyz):
    from odmr import __version__
    result = bare(pyz, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "odmrd %s" % __version__


def test_check_config_from_the_pyz(install, pyz):
    result = install.odmrd("check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == "%s: ok" % install.config
    result = install.odmrd("check-config", "--print", "pid_file")
    assert result.stdout.decode().strip() == install.pid_file
    install.write_config("log_level = chatty\nbogus_key = 1\n[tls]\ncert_file = x\nnope = 2")
    result = install.odmrd("check-config")
    assert result.returncode == 78
    text = result.stderr.decode()
    lines = text.splitlines()
    assert len(lines) == 3 and "Traceback" not in text
    assert any("log_level" in l for l in lines) and any("bogus_key" in l for l in lines) \
        and any("tls.nope" in l for l in lines)


def test_the_pyz_brings_idna_2008_along(install):
    """A bare interpreter has no idna package; the bundled one makes straße.de its own domain."""
    result = install.odmrd("user", "add", "zoe", "--domain", "straße.de", "--password-stdin",
                           input=b"pw-123456\n")
    assert result.returncode == 0, result.stderr
    with open(os.path.join(install.dir, "users"), encoding="utf-8") as fh:
        assert "domains = xn--strae-oqa.de," in fh.read()
    result = install.odmrd("user", "add", "eve", "--domain", "stra\u00adße.de", "--password-stdin",
                           input=b"pw-123456\n")
    assert result.returncode == 65
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "U+00AD" in lines[0]


def test_serve_from_the_pyz_in_the_foreground(install, pyz):
    os.makedirs(os.path.dirname(install.pid_file))      # the init script would create it
    proc = subprocess.Popen([sys.executable, "-I", "-S", pyz, "-c", install.config, "serve", "-f"],
                            cwd="/", env={"PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: install.pid() == proc.pid or proc.poll() is not None, 15, "the provider")
        assert proc.poll() is None
        with smtplib.SMTP("127.0.0.1", install.smtp_port, timeout=10) as s:
            assert s.sendmail("a@remote.test", ["u@example.org"], b"Subject: pyz\r\n\r\nx\r\n") == {}
        listing = install.odmrd("queue", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        assert [m["recipients"] for m in json.loads(listing.stdout)] == [["u@example.org"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# -- the LSB init script -------------------------------------------------------------

needs_dash = pytest.mark.skipif(DASH is None, reason="dash is not installed")


@needs_dash
def test_init_script_parses_under_dash():
    result = subprocess.run([DASH, "-n", INIT_SCRIPT], capture_output=True, timeout=10)
    assert result.returncode == 0, result.stderr
    with open(INIT_SCRIPT) as fh:
        text = fh.read()
    assert text.startswith("#!/bin/sh\n### BEGIN INIT INFO\n") and "### END INIT INFO" in text


@needs_dash
def test_init_script_lifecycle(install):
    r = install.init("status")
    assert r.returncode == 3, r.stdout + r.stderr
    r = install.init("start")
    assert r.returncode == 0, r.stdout + r.stderr
    pid = install.pid()
    assert pid and alive(pid)
    # started means started: no waiting before the first message
    with smtplib.SMTP("127.0.0.1", install.smtp_port, timeout=10) as s:
        assert s.sendmail("a@remote.test", ["u@example.org"], b"Subject: init\r\n\r\nx\r\n") == {}
    assert len([n for n in os.listdir(os.path.join(install.spool, "example.org"))
                if n not in ("tmp",) and not n.startswith(".")]) >= 1
    r = install.init("status")
    assert r.returncode == 0 and b"running (pid %d)" % pid in r.stdout
    r = install.init("start")                       # already running: success, same process
    assert r.returncode == 0 and install.pid() == pid

    with smtplib.SMTP("127.0.0.1", install.smtp_port, timeout=10) as s:
        s.ehlo("c.test")
        s.mail("a@remote.test")
        assert s.rcpt("v@example.net")[0] == 550
    install.add_user("bob", "example.net")
    reloads = install.log().count("configuration reloaded")
    r = install.init("reload")
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: install.log().count("configuration reloaded") > reloads, 10, "the reload")
    # the intake workers read the files again a moment after the daemon has said so
    wait_for(lambda: rcpt_code(install.smtp_port, "v@example.net") == 250, 10, "every intake worker")
    with smtplib.SMTP("127.0.0.1", install.smtp_port, timeout=10) as s:
        assert s.sendmail("a@remote.test", ["v@example.net"], b"Subject: r\r\n\r\nx\r\n") == {}
    r = install.init("force-reload")
    assert r.returncode == 0
    r = install.init("status")
    assert r.returncode == 0 and install.pid() == pid

    r = install.init("stop")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not alive(pid) and not os.path.exists(install.pid_file)
    r = install.init("status")
    assert r.returncode == 3
    r = install.init("stop")                        # already stopped: success
    assert r.returncode == 0
    r = install.init("reload")                      # nothing to reload
    assert r.returncode == 7


@needs_dash
def test_init_script_stale_pid_file_and_restart(install):
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.makedirs(os.path.dirname(install.pid_file), exist_ok=True)
    with open(install.pid_file, "w") as fh:
        fh.write("%d\n" % dead.pid)
    r = install.init("status")
    assert r.returncode == 1 and b"dead but pid file" in r.stdout
    r = install.init("start")
    assert r.returncode == 0, r.stdout + r.stderr
    first = install.pid()
    assert first and first != dead.pid and alive(first)
    r = install.init("restart")
    assert r.returncode == 0, r.stdout + r.stderr
    second = install.pid()
    assert second and second != first and alive(second) and not alive(first)
    r = install.init("try-restart")
    assert r.returncode == 0 and install.pid() not in (None, second)
    assert install.init("stop").returncode == 0
    r = install.init("try-restart")                 # not running: nothing to do
    assert r.returncode == 0 and install.pid() is None


@needs_dash
def test_init_script_finds_the_daemon_after_its_pid_file_is_renamed_in_the_configuration(install):
    """pid_file edited while the daemon runs: stop, status, reload and restart still find
    the running daemon (through the pid file noted at its start); the new pid file is used
    from the restart on, and no second daemon is ever started beside the first."""
    assert install.init("start").returncode == 0
    first = install.pid()
    moved = os.path.join(install.dir, "run2", "odmrd.pid")
    install.write_config(pid_file="run2/odmrd.pid")
    r = install.init("status")
    assert r.returncode == 0 and b"running (pid %d)" % first in r.stdout, r.stdout + r.stderr
    r = install.init("start")
    assert r.returncode == 0 and b"already running (pid %d)" % first in r.stdout
    assert install.init("reload").returncode == 0 and alive(first)
    r = install.init("restart")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not alive(first)
    second = read_pid_file(moved)
    assert second and second != first and alive(second)
    assert all(pid == second or parent_of(pid) == second for pid in install.processes())
    assert not os.path.exists(install.pid_file)
    r = install.init("status")
    assert r.returncode == 0 and b"running (pid %d)" % second in r.stdout
    assert install.init("stop").returncode == 0
    assert not alive(second) and not os.path.exists(moved) and not os.path.exists(install.started)
    assert install.init("status").returncode == 3


@needs_dash
def test_init_scripts_of_two_instances_sharing_one_note_never_act_on_each_other(tmp_path, pyz):
    """Two configurations whose defaults files name the same ODMRD_STARTED: each
    instance starts, and stops, its own daemon only (a note is its configuration's)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first, second = (Install(str(tmp_path / name), pyz) for name in ("a", "b"))
    try:
        with open(second.defaults, "a") as fh:
            fh.write("ODMRD_STARTED=%s\n" % first.started)
        for inst in (first, second):
            inst.add_user("alice", "example.org")
            r = inst.init("start")
            assert r.returncode == 0 and b"already" not in r.stdout, r.stdout + r.stderr
        a, b = first.pid(), second.pid()
        assert a and b and a != b and alive(a) and alive(b)
        assert second.init("stop").returncode == 0
        assert alive(a) and not alive(b)
        r = first.init("status")
        assert r.returncode == 0 and b"running (pid %d)" % a in r.stdout
    finally:
        first.cleanup()
        second.cleanup()


@needs_dash
def test_a_stale_note_never_hides_the_daemon_on_the_configured_pid_file(install):
    """The noted pid file left by a daemon killed with -9, the configuration's own
    pid file held by a daemon started by hand since: that daemon is the one found."""
    assert install.init("start").returncode == 0
    install.write_config(pid_file="run2/odmrd.pid")
    assert install.init("start").returncode == 0            # already running, on run/
    install.write_config()
    kill_9(install)                                         # the note stays
    install.write_config(pid_file="run2/odmrd.pid")
    assert install.init("start").returncode == 0            # noted: run2/odmrd.pid
    kill_9(install)                                         # and run2/odmrd.pid with it
    install.write_config()
    os.makedirs(os.path.dirname(install.pid_file), exist_ok=True)
    assert install.odmrd("serve").returncode == 0           # by hand, on run/odmrd.pid
    pid = install.pid()
    r = install.init("status")
    assert r.returncode == 0 and b"running (pid %d)" % pid in r.stdout, r.stdout + r.stderr
    assert install.init("restart").returncode == 0
    assert not alive(pid) and install.pid() not in (None, pid)
    assert install.init("stop").returncode == 0 and not install.processes()


@needs_dash
def test_stop_and_status_find_the_daemon_while_the_configuration_is_unreadable(install):
    """Mid-edit, a configuration that does not parse at all (not even leniently): stop
    and status go by the pid file noted at the start; start and reload refuse (exit 6)."""
    assert install.init("start").returncode == 0
    pid = install.pid()
    with open(install.config, "a") as fh:
        fh.write("[smtp\n")
    r = install.init("status")
    assert r.returncode == 0 and b"running (pid %d)" % pid in r.stdout, r.stdout + r.stderr
    assert install.init("reload").returncode == 6 and alive(pid)
    assert install.init("stop").returncode == 0 and not alive(pid)


def kill_9(install: Install) -> None:
    """Every process of the installation's daemon, with SIGKILL: its pid file stays."""
    for pid in install.processes():
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not install.processes(), 10, "the daemon's processes to die")


def parent_of(pid: int) -> int:
    with open("/proc/%d/stat" % pid) as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


@needs_dash
def test_init_script_refuses_a_broken_configuration(install):
    assert install.init("start").returncode == 0
    pid = install.pid()
    good = open(install.config).read()
    install.write_config("max_fun = 1")
    for action in ("reload", "restart"):
        r = install.init(action)
        assert r.returncode == 6, (action, r.stdout, r.stderr)
        assert b"max_fun" in r.stderr and b"Traceback" not in r.stderr
        assert alive(pid) and install.pid() == pid
    with open(install.config, "w") as fh:
        fh.write(good)
    assert install.init("stop").returncode == 0
    install.write_config("max_fun = 1")
    r = install.init("start")
    assert r.returncode == 6 and b"max_fun" in r.stderr
    assert install.pid() is None


@needs_dash
def test_init_script_usage_and_missing_program(install):
    r = install.init("frobnicate")
    assert r.returncode == 2 and b"Usage:" in r.stderr
    with open(install.defaults, "a") as fh:
        fh.write("ODMRD=/nonexistent/odmrd\n")
    assert install.init("start").returncode == 5
    assert install.init("status").returncode == 4


# -- the other init files ---------------------------------------------------------------

def test_rc_script_shape():
    path = os.path.join(ROOT, "init", "odmrd.rc")
    result = subprocess.run(["sh", "-n", path], capture_output=True, timeout=10)
    assert result.returncode == 0, result.stderr
    with open(path) as fh:
        text = fh.read()
    for needed in ("# PROVIDE: odmrd", ". /etc/rc.subr", "load_rc_config", "command_interpreter=",
                   "check-config --print pid_file", 'extra_commands="reload', "run_rc_command \"$1\""):
        assert needed in text, needed


def test_systemd_unit_shape():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(os.path.join(ROOT, "init", "odmrd.service"))
    service = parser["Service"]
    assert service["Type"] == "simple"
    assert service["ExecStart"].endswith("serve --foreground")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "check-config" in service["ExecStartPre"]
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
