"""The README's own commands, run as a new administrator runs them: in a fresh copy of
the checkout, with Debian's python3 first on PATH (PEP 668: nothing pip-installed into
it), on the shipped loopback configuration."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import List

import pytest

from helpers import ROOT, wait_for, which

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
WALK_THROUGH_DIRS = ("/tmp/odmr-sink", "/tmp/odmr-fetchmail", "/tmp/odmr-maildir", "/tmp/odmr-pw")
PORTS = (2525, 3366, 2526)


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        return fh.read()


def section(text: str, title: str) -> str:
    start = text.index("\n## " + title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def code_blocks(text: str) -> List[str]:
    """The indented code blocks of a Markdown section, de-indented, in order: runs of lines
    indented by 4 or more (list prose is indented by 3), blank lines inside a run kept."""
    blocks: List[List[str]] = []
    run: List[str] = []
    for line in text.splitlines() + ["end"]:
        if line.startswith("    ") and line.strip():
            run.append(line)
        elif not line.strip() and run:
            run.append("")
        elif run:
            blocks.append(run)
            run = []
    result = []
    for lines in blocks:
        indent = len(lines[0]) - len(lines[0].lstrip(" "))
        result.append("\n".join(l[indent:] for l in lines).strip("\n"))
    return result


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the servers do
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def system_python_ready() -> bool:
    return subprocess.run(["/usr/bin/python3", "-c", "import configobj, idna"],
                          capture_output=True).returncode == 0


@pytest.fixture
def checkout(tmp_path):
    """A fresh copy of the checkout's tracked files, as `git clone` would give."""
    listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    dest = tmp_path / "odmrd"
    for name in listed.stdout.decode().split("\0"):
        if name and os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(str(dest / name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), str(dest / name))
    return str(dest)


def system_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = SYSTEM_PATH
    return env


def test_quick_start_command_is_an_apt_install_then_serve():
    [command] = code_blocks(section(readme(), "Quick start"))[:1]
    prefix, _, serve = command.rpartition(" && ")
    assert prefix.startswith("apt-get update && apt-get install -y ")
    assert set(prefix.split("install -y ")[1].split()) == {"python3-configobj", "python3-idna"}
    assert serve == "python3 odmrd.py -c conf/odmrd.conf serve -f"


@pytest.mark.slow                   # the README's commands with a real smtp-sink and fetchmail
@pytest.mark.skipif(os.geteuid() != 0, reason="the walk-through runs smtp-sink -u nobody as root")
def test_quick_start_and_walk_through_as_written(checkout):
    for tool in ("swaks", "fetchmail", "smtp-sink"):
        if not which(tool):
            pytest.skip("%s is not installed (bash .ci/run installs it)" % tool)
    if not system_python_ready():
        pytest.skip("Debian's python3-configobj/python3-idna are not installed (.ci/run does it)")
    if not all(port_free(p) for p in PORTS):
        pytest.skip("the shipped configuration's ports %s are taken" % (PORTS,))
    remove_walk_through_files()
    serve = code_blocks(section(readme(), "Quick start"))[0].rpartition(" && ")[2]
    steps = code_blocks(section(readme(), "Five-minute walk-through"))
    assert steps[0] == serve
    server = subprocess.Popen(serve, shell=True, cwd=checkout, env=system_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for(lambda: not port_free(3366) or server.poll() is not None, 20, "the provider")
        assert server.poll() is None, server.stdout.read().decode()
        outputs = []
        for step in steps[1:]:
            outputs.append(run_step(step, checkout))
            time.sleep(2.5)     # a person's pace: the provider rereads the users file every 2 s
    finally:
        stop(server)
        subprocess.run(["pkill", "-f", "smtp-sink -u nobody -d /tmp/odmr-sink"])
    log = server.stdout.read().decode()
    assert "Traceback" not in log and "internal error" not in log, log
    joined = "\n".join(outputs)
    assert "Mail queue is empty" in outputs[4], outputs[4]
    assert "hello via ODMR" in _read_all("/tmp/odmr-sink")
    assert "Subject: second, for odmrd fetch" in outputs[5]
    assert "1 message delivered to /tmp/odmr-maildir" in outputs[5], joined
    remove_walk_through_files()


def remove_walk_through_files() -> None:
    for path in WALK_THROUGH_DIRS:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)


def run_step(script: str, cwd: str) -> str:
    """One step's commands as a shell runs them; a step that fails stops the test."""
    # a file, not a pipe: a step that starts a server in the background (`&`) returns at once
    with tempfile.TemporaryFile() as out:
        result = subprocess.run(["bash", "-ec", script], cwd=cwd, env=system_env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                timeout=120)
        out.seek(0)
        text = out.read().decode(errors="replace")
    assert result.returncode == 0, "step failed:\n%s\n---\n%s" % (script, text)
    assert "Traceback" not in text, text
    return text


def _read_all(directory: str) -> str:
    texts = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
    return "\n".join(texts)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGINT)        # Ctrl-C, as the walk-through says
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)
