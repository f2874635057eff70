"""`check-config` refuses what `serve` would then refuse at start.

The init script runs check-config before it stops the running daemon for a restart:
whatever makes the new daemon fail at start-up (a port another program holds, a key
with a passphrase, a pid file it cannot write) must be caught there, or the restart
leaves the service down.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from helpers import PASSWORD, Daemon, free_port, run_cli, write_config
from odmr import accounts


def _config(tmp_path, extra: str = "", sections: str = "", smtp_port: int = 0,
            pid_file: str = "odmrd.pid") -> str:
    conf = write_config(str(tmp_path), free_port(), smtp_port or free_port(), extra, sections)
    _set_pid_file(conf, pid_file)
    accounts.add_user(os.path.join(str(tmp_path), "users"), "alice", ["example.org"], PASSWORD)
    return conf


def _set_pid_file(conf: str, pid_file: str) -> None:
    with open(conf) as fh:
        text = fh.read()
    with open(conf, "w") as fh:
        fh.write(text.replace("pid_file = odmrd.pid\n", "pid_file = %s\n" % pid_file, 1))


@pytest.fixture
def squatter():
    """Another program listening on a loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.slow
def test_a_port_another_program_holds_is_refused(tmp_path, squatter):
    conf = _config(tmp_path, sections="[metrics]\nlisten = 127.0.0.1:%d\n" % squatter)
    result = run_cli("-c", conf, "check-config")
    assert result.returncode == 78, result
    assert ("[metrics] listen: 127.0.0.1:%d is in use by another program" % squatter
            in result.stderr.decode())


def test_an_intake_port_another_program_holds_is_refused(tmp_path, squatter):
    conf = _config(tmp_path, smtp_port=squatter)
    result = run_cli("-c", conf, "check-config")
    assert result.returncode == 78
    assert "[smtp] listen: 127.0.0.1:%d is in use" % squatter in result.stderr.decode()


def _daemon(tmp_path) -> Daemon:
    daemon = Daemon(str(tmp_path))
    accounts.add_user(os.path.join(os.path.dirname(daemon.config), "users"), "alice",
                      ["example.org"], PASSWORD)
    return daemon


@pytest.mark.slow
def test_the_running_daemons_own_ports_are_no_problem(tmp_path):
    daemon = _daemon(tmp_path).start()
    try:
        result = run_cli("-c", daemon.config, "check-config")
        assert result.returncode == 0, result.stderr
    finally:
        daemon.term()


def _encrypted_key(tmp_path, pki) -> str:
    path = str(tmp_path / "encrypted.key")
    subprocess.run(["openssl", "pkey", "-in", pki["server.key"], "-aes256", "-passout", "pass:x",
                    "-out", path], check=True, capture_output=True)
    return path


def test_a_key_with_a_passphrase_is_named_as_such(tmp_path, pki):
    key = _encrypted_key(tmp_path, pki)
    conf = _config(tmp_path, extra="[tls]\ncert_file = %s\nkey_file = %s\n" % (pki["server.pem"], key))
    result = run_cli("-c", conf, "check-config", timeout=20)
    assert result.returncode == 78
    assert "key_file %s is encrypted with a passphrase" % key in result.stderr.decode()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("script") is None, reason="script(1) is not installed")
def test_a_key_with_a_passphrase_never_prompts_at_a_terminal(tmp_path, pki):
    """At a terminal OpenSSL would ask for the passphrase: a restart typed by hand hung."""
    key = _encrypted_key(tmp_path, pki)
    conf = _config(tmp_path, extra="[tls]\ncert_file = %s\nkey_file = %s\n" % (pki["server.pem"], key))
    command = "%s %s -c %s check-config" % (
        __import__("sys").executable, os.path.join(os.path.dirname(__file__), "..", "odmrd.py"), conf)
    result = subprocess.run(["script", "-qec", command, "/dev/null"], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=30)
    assert b"encrypted with a passphrase" in result.stdout
    assert b"pass phrase" not in result.stdout


def test_a_pid_file_directory_serve_could_not_make_is_refused(tmp_path):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    conf = _config(tmp_path, pid_file=str(blocked / "run" / "odmrd.pid"))
    result = run_cli("-c", conf, "check-config")
    assert result.returncode == 78
    assert "pid file %s" % (blocked / "run" / "odmrd.pid") in result.stderr.decode()


@pytest.mark.slow
def test_serve_makes_a_missing_pid_file_directory(tmp_path):
    """/run is emptied at boot: `serve` run by hand makes the directory like the init script."""
    piddir = tmp_path / "run" / "odmrd"
    daemon = _daemon(tmp_path)
    _set_pid_file(daemon.config, str(piddir / "odmrd.pid"))
    daemon.start()
    try:
        assert (piddir / "odmrd.pid").read_text().strip() == str(daemon.proc.pid)
        assert run_cli("-c", daemon.config, "check-config").returncode == 0
    finally:
        daemon.term()
