"""Shared plumbing for the bench scripts: a real `odmrd serve -f` subprocess on loopback.

The benches measure the provider as it runs in production (its own process, its
spool on the real disk), so they start it the way an operator would, never in-process.
"""
from __future__ import annotations

import base64
import hmac
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import List, Optional, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from odmr import accounts  # noqa: E402
from odmr.spool import Envelope, Spool  # noqa: E402

PASSWORD = "bench-password"


_GIVEN: Set[int] = set()


def free_port() -> int:
    """A free loopback port: the kernel's choice, or, when BENCH_PORTS=LO-HI is set (a
    shared machine where each user keeps to a range), one of that range not given before."""
    span = os.environ.get("BENCH_PORTS")
    if not span:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    low, high = (int(part) for part in span.split("-"))
    for port in random.sample(range(low, high + 1), high + 1 - low):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
    raise SystemExit("no free port in BENCH_PORTS=%s" % span)


def wait_port(port: int, timeout: float = 10.0, what: str = "nothing") -> None:
    """Until something accepts connections on 127.0.0.1:port; else exit with `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("%s listens on port %d" % (what, port))


def which(name: str) -> Optional[str]:
    for directory in ["/usr/sbin", "/usr/bin", "/sbin"] + os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which(name)


def workdir(prefix: str) -> str:
    """A scratch directory on the real disk (/var/tmp survives tmpfs setups of /tmp)."""
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None
    return tempfile.mkdtemp(prefix=prefix, dir=base)


def store(spool: Spool, domain: str, envelope: Envelope, data: bytes) -> str:
    """A whole message into one queue through the spool's one (durable) writer, with no
    policy applied: a backlog to measure against, without an intake session per message."""
    incoming = spool.begin({domain: envelope})
    incoming.write(data)
    return incoming.commit()[0][1]


def cram_md5_response(user: str, password: str, challenge_b64: str) -> str:
    digest = hmac.new(password.encode(), base64.b64decode(challenge_b64), "md5").hexdigest()
    return base64.b64encode(("%s %s" % (user, digest)).encode()).decode()


class Server:
    """`odmrd serve -f` in a subprocess, with its own config, users file and spool."""

    def __init__(self, directory: str, odmr_extra: str = "", smtp_extra: str = "",
                 log_level: str = "info"):
        self.dir = directory
        self.odmr_port = free_port()
        self.smtp_port = free_port()
        self.config = os.path.join(directory, "odmrd.conf")
        self.users = os.path.join(directory, "users")
        self.spool_dir = os.path.join(directory, "spool")
        self.log_path = os.path.join(directory, "odmrd.log")
        with open(self.config, "w") as fh:
            fh.write(textwrap.dedent("""\
                hostname = odmr.bench
                spool_dir = spool
                users_file = users
                pid_file = odmrd.pid
                allow_root = yes
                log_level = %s
                [odmr]
                listen = 127.0.0.1:%d
                %s
                [smtp]
                listen = 127.0.0.1:%d
                max_message_size = 50M
                %s
                """) % (log_level, self.odmr_port, odmr_extra, self.smtp_port, smtp_extra))
        self.proc: Optional[subprocess.Popen] = None

    def add_user(self, name: str, domains: List[str]) -> None:
        accounts.add_user(self.users, name, domains, PASSWORD, True)

    def start(self) -> "Server":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "odmrd.py"), "-c", self.config, "serve", "-f"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        for port in (self.odmr_port, self.smtp_port):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("odmrd exited with %d; see %s" % (self.proc.returncode, self.log_path))
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=2) as probe:
                        probe.recv(200)
                        probe.sendall(b"QUIT\r\n")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("odmrd did not start listening; see %s" % self.log_path)
                    time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc, 40)
        if self.proc is not None:
            self._log.close()
        self.proc = None


def stop_process(proc: Optional[subprocess.Popen], grace: float) -> None:
    """SIGTERM, `grace` seconds to go, then SIGKILL: a bench never leaves a server behind."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def proc_status(pid: int) -> dict:
    """VmRSS (KiB), thread count and open descriptors of a process, from /proc."""
    result = {}
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                result["rss_kib"] = int(value.split()[0])
            elif key == "Threads":
                result["threads"] = int(value)
    result["fds"] = len(os.listdir("/proc/%d/fd" % pid))
    return result


def _stat(pid: int) -> list:
    with open("/proc/%d/stat" % pid) as fh:
        return fh.read().rsplit(")", 1)[1].split()


def children(pid: int) -> list:
    """The live child processes of `pid` (odmrd's intake workers)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and int(_stat(int(name))[1]) == pid:
                found.append(int(name))
        except (OSError, IndexError):
            continue
    return found


def cpu_seconds(*pids: int) -> Tuple[float, float]:
    """(user, system) CPU seconds of processes so far, from /proc/PID/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for pid in pids:
        try:
            fields = _stat(pid)
        except OSError:
            continue
        user += int(fields[11]) / tick
        system += int(fields[12]) / tick
    return user, system


def spooled(spool_dir: str, domain: str) -> int:
    """Messages waiting for a domain, from the directory listing alone (the server runs)."""
    try:
        return sum(1 for n in os.listdir(os.path.join(spool_dir, domain)) if len(n) > 13 and "." not in n)
    except FileNotFoundError:
        return 0


def row(label: str, measured: str, reference: str) -> str:
    return "  %-52s %18s   %s" % (label, measured, reference)
