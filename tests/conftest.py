"""Shared fixtures: a real provider on free loopback ports, real sockets only."""
from __future__ import annotations

import base64
import hmac
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import List, Optional, Sequence

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from odmr import accounts  # noqa: E402
from odmr.server import Service  # noqa: E402

PASSWORD = "tanstaaf-secret"


def pytest_configure(config) -> None:
    """`-m "not slow"` is the fast subset (under a minute on two cores); CI runs everything."""
    config.addinivalue_line(
        "markers", "slow: over ~0.25 s here, or drives a real peer (fetchmail, Postfix, init scripts, "
        "a pyz build, kill -9 loops)")


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+ here), so that no
    client connection made meanwhile can take it before the server binds it."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_listener(listener: socket.socket, threads: Sequence[threading.Thread] = ()) -> None:
    """Close a test server's listening socket only once no thread of it can use it again.

    close() alone neither wakes a thread blocked in accept() nor ends that call: the
    socket keeps listening, and when the kernel restarts the call (after a stop, a
    ptrace attach, a signal handled with SA_RESTART) it looks the descriptor *number*
    up again, which by then may be the next test's provider listener: one of that
    provider's connections goes to this server's script. shutdown() wakes accept()
    for good; the threads are joined before close() frees the number."""
    shut_down(listener)
    for thread in threads:
        thread.join(10)
    listener.close()
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, "test server threads still running: %s" % alive


def shut_down(sock: socket.socket) -> None:
    """Wake whatever thread blocks on `sock` (accept, recv): they return an error or EOF."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)     # also for an SSLSocket, TLS state untouched
    except OSError:
        pass


def write_config(directory: str, odmr_port: int, smtp_port: int, extra: str = "",
                 sections: str = "", odmr_extra: str = "", smtp_extra: str = "") -> str:
    path = os.path.join(directory, "odmrd.conf")
    with open(path, "w") as fh:
        fh.write(textwrap.dedent("""\
            hostname = odmr.test
            spool_dir = spool
            users_file = users
            pid_file = odmrd.pid
            allow_root = yes
            log_level = debug
            %s
            [odmr]
            listen = 127.0.0.1:%d
            %s
            [smtp]
            listen = 127.0.0.1:%d
            %s
            %s
            """) % (extra, odmr_port, _with_defaults(odmr_extra, idle_timeout="20s"), smtp_port,
                    _with_defaults(smtp_extra, idle_timeout="20s", max_message_size="1M",
                                   max_recipients="50"), sections))
    return path


def _with_defaults(text: str, **defaults) -> str:
    """Section lines plus test defaults for the keys the text does not set itself."""
    given = {line.split("=")[0].strip() for line in text.splitlines() if "=" in line}
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines += ["%s = %s" % (k, v) for k, v in defaults.items() if k not in given]
    return "\n".join(lines)


class Provider:
    """A running odmrd provider (in this process, on its own threads)."""

    def __init__(self, directory: str, extra: str = "", sections: str = "",
                 odmr_extra: str = "", smtp_extra: str = ""):
        self.dir = directory
        self.odmr_port = free_port()
        self.smtp_port = free_port()
        self._extras = (extra, sections, odmr_extra, smtp_extra)
        self.config = write_config(directory, self.odmr_port, self.smtp_port, *self._extras)
        self.users = os.path.join(directory, "users")
        self.spool_dir = os.path.join(directory, "spool")
        self.service: Optional[Service] = None

    def add_user(self, name: str, domains: List[str], password: str = PASSWORD, cram: bool = True) -> None:
        accounts.add_user(self.users, name, domains, password, cram)
        if self.service is not None:
            self.service.reload()

    def start(self) -> "Provider":
        from odmr.server import StartupError
        for attempt in range(5):
            self.service = Service(self.config)
            try:
                self.service.bind()
                break
            except StartupError as exc:
                if "in use" not in str(exc) or attempt == 4:
                    raise
                self.odmr_port, self.smtp_port = free_port(), free_port()   # lost a race: new ports
                self.config = write_config(self.dir, self.odmr_port, self.smtp_port, *self._extras)
        self.service.prepare_spool()
        self.service.start()
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop(grace=2.0)
            self.service = None

    @property
    def spool(self):
        return self.service.spool

    def spooled(self, domain: str) -> List[str]:
        return self.spool.message_ids(domain) if os.path.isdir(os.path.join(self.spool_dir, domain)) else []

    def run_cli(self, *args, input: Optional[bytes] = None, env=None) -> subprocess.CompletedProcess:
        return run_cli("-c", self.config, *args, input=input, env=env)


def run_cli(*args, input: Optional[bytes] = None, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "odmrd.py")] + list(args),
                          input=input, capture_output=True, timeout=timeout, env=full_env)


@pytest.fixture
def provider(tmp_path):
    """A provider with account alice (example.org, example.com) and bob (example.net)."""
    p = Provider(str(tmp_path))
    p.add_user("alice", ["example.org", "example.com"])
    p.add_user("bob", ["example.net"])
    p.start()
    yield p
    p.stop()


class Customer:
    """A scripted ODMR customer over a raw socket (so every byte is visible)."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, line) -> None:
        if isinstance(line, str):
            line = line.encode()
        self.sock.sendall(line + b"\r\n")

    def reply(self):
        """(code, [lines]) of one possibly multi-line reply."""
        lines = []
        while True:
            raw = self.file.readline()
            if not raw:
                raise EOFError("connection closed")
            lines.append(raw.rstrip(b"\r\n").decode())
            if raw[3:4] != b"-":
                return int(raw[:3]), [l[4:] for l in lines]

    def cmd(self, line):
        self.send(line)
        return self.reply()

    def line(self) -> bytes:
        return self.file.readline()

    def login(self, user: str = "alice", password: str = PASSWORD) -> None:
        code, _ = self.reply()
        assert code == 220
        code, _ = self.cmd("EHLO customer.test")
        assert code == 250
        code, lines = self.cmd("AUTH CRAM-MD5")
        assert code == 334
        challenge = base64.b64decode(lines[0])
        digest = hmac.new(password.encode(), challenge, "md5").hexdigest()
        code, _ = self.cmd(base64.b64encode(("%s %s" % (user, digest)).encode()).decode())
        assert code == 235

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def customer_factory(provider):
    made = []

    def make(port=None):
        c = Customer(port or provider.odmr_port)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def send_mail(port: int, sender: str, rcpts: List[str], data: bytes) -> dict:
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        return s.sendmail(sender, rcpts, data)


def alive(pid: int) -> bool:
    """A process that runs and is no zombie (PID 1 here reaps late)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.05)


def which(name: str) -> Optional[str]:
    for directory in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/usr/bin", "/sbin"]:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which(name)


# -- one provider shared by a module (starting and stopping one costs more than most tests)

def stop_quickly(p: Provider) -> None:
    """Shut the listeners down in parallel (each waits for its poll interval), then stop."""
    if p.service is not None:
        threads = [threading.Thread(target=l.shutdown) for l in p.service.listeners]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    p.stop()


def wait_idle(p: Provider, timeout: float = 5.0) -> None:
    """Let sessions of the previous test finish (they may still hold a domain claim)."""
    deadline = time.monotonic() + timeout
    while p.service.active_sessions() and time.monotonic() < deadline:
        time.sleep(0.02)


def empty_spool(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                os.unlink(os.path.join(dirpath, name))
            except FileNotFoundError:
                pass        # the delivery reaper removed a retired file first


@pytest.fixture(scope="module")
def shared_provider(tmp_path_factory):
    """One provider for the module (starting and stopping one costs more than most tests)."""
    p = Provider(str(tmp_path_factory.mktemp("provider")), odmr_extra="auth_throttle_failures = 0")
    p.add_user("alice", ["example.org", "example.com"])
    p.add_user("bob", ["example.net"])
    p.start()
    yield p
    stop_quickly(p)


def reuse_provider(shared: "Provider"):
    """Body of a per-test `provider` fixture over a module's `shared_provider`:
    an empty spool and no sessions left from the previous test."""
    wait_idle(shared)
    empty_spool(shared.spool_dir)
    yield shared
    wait_idle(shared)



# -- fixtures over the harnesses in helpers.py

@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA with server, client and stranger certificates (one set for the whole run)."""
    if which("openssl") is None:
        pytest.skip("openssl is not installed")
    from helpers import make_pki
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def scripted():
    """A factory of scripted ODMR providers, all closed at teardown."""
    from helpers import Scripted
    made: List[Scripted] = []

    def make(**kw) -> Scripted:
        s = Scripted(**kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()
