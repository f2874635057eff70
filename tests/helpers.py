"""Harnesses the test files share: real peers on loopback, never mocks.

The one home of the test harness; conftest.py only holds pytest's hooks and
the fixtures built on it. Test modules import from here, never from each other.

- the in-process provider (`Provider`), the raw ODMR `Customer`, `run_cli`,
  `free_port`, `write_config`, `send_mail`, small waiting tools, and `store` and
  `message_ids` for tests that fill or read a spool directly;
- PKI: a CA, server and client certificates made by the real openssl binary;
- the process harness `Daemon`: `odmrd serve -f` as a child process (kill -9,
  restarts) or a detached `odmrd serve` with its pid and log files; `InitScript`,
  our init scripts run as init runs them;
- the scripted customer: `Script` played by `ReversedConnection` on the socket
  after ATRN 250 (strictly, if asked), and `accept_all`, which returns the
  messages as they were on the wire (still dot-stuffed);
- `odmrd fetch` as a subprocess, `Scripted` (a scripted ODMR provider) and
  `deliver_one` (its side after ATRN 250), fetch's own server (`LocalServer`);
- `ScriptedMTA`, a scripted SMTP server (the bounce relay, the customer's MTA),
  and the real peers: Postfix's smtp-sink (`Sink`), fetchmail, and a private
  Postfix instance (`PostfixInstance`) for the README's recipes;
- PROXY protocol headers and `Load`, traffic against a daemon being killed.
"""
from __future__ import annotations

import base64
import email
import hmac
import json
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from odmr import accounts, queue_commands, replies  # noqa: E402
from odmr.bounce_relay import RelayTimings  # noqa: E402
from odmr.daemon import read_pid_file  # noqa: E402
from odmr.fetch_mailbox import open_mailbox  # noqa: E402
from odmr.fetch_server import serve_reversed  # noqa: E402
from odmr.proxy import V2_SIGNATURE  # noqa: E402
from odmr.wire import reader_for  # noqa: E402
from odmr.server import Service, StartupError  # noqa: E402
from odmr.spool import Envelope, Spool  # noqa: E402


# -- the in-process provider, the raw customer, small tools ------------------------------

PASSWORD = "tanstaaf-secret"


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
    """A test's odmrd.conf. Unless `extra` names its own, the log file is the test's
    (a command run without syslog would otherwise write to /var/log/odmrd.log)."""
    path = os.path.join(directory, "odmrd.conf")
    if not re.search(r"^\s*log_file\s*=", extra, re.M):
        extra = "log_file = odmrd.log\n" + extra
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
    """A running odmrd provider (in this process, on its own threads). `service_options`
    go to the Service: `delivery_timeouts`, `maintenance_tick`, `relay_timings`."""

    def __init__(self, directory: str, extra: str = "", sections: str = "",
                 odmr_extra: str = "", smtp_extra: str = "", **service_options):
        self.dir = directory
        self.service_options = service_options
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
        for attempt in range(5):
            self.service = Service(self.config, **self.service_options)
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
        return message_ids(self.spool, domain) if os.path.isdir(os.path.join(self.spool_dir, domain)) else []

    def run_cli(self, *args, input: Optional[bytes] = None, env=None) -> subprocess.CompletedProcess:
        return run_cli("-c", self.config, *args, input=input, env=env)


def store(spool: Spool, domain: str, envelope: Envelope, data: bytes) -> str:
    """A whole message into one queue through the spool's one writer, with no policy
    applied (mail from outside enters through submission): for tests that fill a spool."""
    incoming = spool.begin({domain: envelope})
    incoming.write(data)
    return incoming.commit()[0][1]


def message_ids(spool: Spool, queue: str) -> List[str]:
    """The queue's message ids, oldest first."""
    return spool.listing(queue)[0]


def run_cli(*args, input: Optional[bytes] = None, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "odmrd.py")] + list(args),
                          input=input, capture_output=True, timeout=timeout, env=full_env)


def odmrd(config: str, *args: str, input: Optional[bytes] = None, env=None) -> subprocess.CompletedProcess:
    """`odmrd -c config args...`; whatever happens, no traceback reaches the user."""
    result = run_cli("-c", config, *args, input=input, env=env)
    assert b"Traceback" not in result.stderr, result.stderr.decode()
    assert b"internal error" not in result.stderr, result.stderr.decode()
    return result


def refused(port: int) -> bool:
    """Whether nothing accepts connections on the loopback port (a stopped listener)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


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


def send_mail(port: int, sender: str, rcpts: List[str], data: bytes) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        return s.sendmail(sender, rcpts, data)


def rcpt_code(port: int, rcpt: str) -> int:
    """The intake's answer to RCPT TO:<rcpt> (from someone@remote.test)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("someone@remote.test")
        return s.rcpt(rcpt)[0]


def alive(pid: int) -> bool:
    """A process that runs and is no zombie (PID 1 here reaps late)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def children_of(pid: int) -> List[int]:
    """The live (no zombie) child processes of `pid`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(name))
    return found


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.05)


def multiline(code: int, lines: List[str]) -> str:
    """A (multi-line) reply, lines joined by CRLF, without the final CRLF."""
    return "\r\n".join("%d%s%s" % (code, "-" if i < len(lines) - 1 else " ", l) for i, l in enumerate(lines))


def eventually(predicate, timeout: float = 10.0) -> bool:
    """Whether `predicate` came true within `timeout` seconds (for an assert with its own message).
    The first true answer counts, and is not asked for again: it may not last (a probe that
    took a session's place is refused if made again at once)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


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
    p.service.wait_for_sessions(timeout)


def empty_spool(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                os.unlink(os.path.join(dirpath, name))
            except FileNotFoundError:
                pass        # the delivery reaper removed a retired file first


def reuse_provider(shared: "Provider"):
    """Body of a per-test `provider` fixture over a module's `shared_provider`:
    an empty spool and no sessions left from the previous test."""
    wait_idle(shared)
    empty_spool(shared.spool_dir)
    yield shared
    wait_idle(shared)




# -- PKI ------------------------------------------------------------------------------

def _run(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(directory: str) -> dict:
    """Write ca.pem, server.pem/server.key (CN odmr.test, SAN 127.0.0.1) and client.pem/client.key."""
    os.makedirs(directory, exist_ok=True)
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "30", "-subj", "/CN=odmrd test CA", cwd=directory)
    with open(os.path.join(directory, "server.ext"), "w") as fh:
        fh.write("subjectAltName=DNS:odmr.test,DNS:localhost,IP:127.0.0.1\n")
    for name, cn, ext in (("server", "odmr.test", "server.ext"), ("client", "alice", None),
                          ("stranger", "mallory", None)):
        _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key", "-out", name + ".csr",
             "-subj", "/CN=%s" % cn, cwd=directory)
        args = ["x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", name + ".pem", "-days", "30"]
        if ext:
            args += ["-extfile", ext]
        _run(*args, cwd=directory)
    # a self-signed client certificate that the CA did not issue
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "selfsigned.key",
         "-out", "selfsigned.pem", "-days", "30", "-subj", "/CN=alice", cwd=directory)
    return {name: os.path.join(directory, name) for name in (
        "ca.pem", "server.pem", "server.key", "client.pem", "client.key",
        "stranger.pem", "stranger.key", "selfsigned.pem", "selfsigned.key")}


# -- the process harness ----------------------------------------------------------------

def kill_hard(pid: int) -> None:
    if not alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_for(lambda: not alive(pid), 5.0)
    except AssertionError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_for(lambda: not alive(pid), 5.0)


TOKEN = re.compile(rb"X-Token: (\S+)")


class Daemon:
    """A real odmrd process on free loopback ports, for what needs one: signals, kill -9,
    restarts, detaching, privileges, a daemon's log.

    Foreground (the default): `start()` runs `odmrd serve -f` as a child, with its
    configuration (write_config's) in `directory/name` and its stderr in `name.log`.
    Detached (`detached=True`): `serve()` runs `odmrd serve` as an init script does; the
    configuration lives in `directory` with a log file and a pid file, `extra` lines
    override its top-level defaults, and `cleanup()` kills every pid it had; `start()`
    runs `serve -f` in this layout too. `spawn()` runs any other command as a child."""

    def __init__(self, directory: str, extra: str = "", sections: str = "",
                 odmr_port: Optional[int] = None, smtp_port: Optional[int] = None, name: str = "odmrd",
                 odmr_extra: str = "", smtp_extra: str = "", detached: bool = False):
        self.dir = directory
        self.odmr_port = odmr_port or free_port()
        self.smtp_port = smtp_port or free_port()
        self.detached = detached
        self.proc: Optional[subprocess.Popen] = None
        self.children: List[subprocess.Popen] = []     # spawn()'s
        self.pids: List[int] = []
        home = directory if detached else os.path.join(directory, name)
        os.makedirs(home, exist_ok=True)
        self.config = os.path.join(home, "odmrd.conf")
        self.pid_file = os.path.join(home, "odmrd.pid")
        self.users = os.path.join(home, "users")
        self.spool_dir = os.path.join(home, "spool")
        self.log_file = os.path.join(home, "odmrd.log") if detached else os.path.join(directory, name + ".log")
        if detached:
            self.write(extra, sections, odmr_extra, smtp_extra)
        else:
            write_config(home, self.odmr_port, self.smtp_port, extra, sections, odmr_extra, smtp_extra)

    def write(self, extra: str = "", sections: str = "", odmr_extra: str = "", smtp_extra: str = "") -> None:
        """The detached layout's configuration (a log file, no syslog, a 5 s grace period)."""
        top = {"hostname": "odmr.test", "spool_dir": "spool", "users_file": "users",
               "pid_file": "odmrd.pid", "log_file": "odmrd.log", "syslog": "no",
               "log_level": "debug", "grace_period": "5s"}
        for line in extra.splitlines():     # extra lines override the defaults above
            key, _, value = line.partition("=")
            top[key.strip()] = value.strip()
        with open(self.config, "w") as fh:
            fh.write("".join("%s = %s\n" % item for item in top.items() if item[0]))
            fh.write("[odmr]\nlisten = 127.0.0.1:%d\n%s\n[smtp]\nlisten = 127.0.0.1:%d\n%s\n%s\n"
                     % (self.odmr_port, _with_defaults(odmr_extra, idle_timeout="30s"), self.smtp_port,
                        _with_defaults(smtp_extra, idle_timeout="30s"), sections))
        os.chmod(self.config, 0o644)

    def cli(self, *args, **kw) -> subprocess.CompletedProcess:
        return run_cli("-c", self.config, *args, **kw)

    def add_user(self, name: str, *domains: str) -> None:
        """Through `odmrd user add`, password "secret-pw"."""
        args = ["user", "add", name, "--password-stdin"]
        for d in domains:
            args += ["--domain", d]
        result = self.cli(*args, input=b"secret-pw\n")
        assert result.returncode == 0, result.stderr

    def serve(self) -> subprocess.CompletedProcess:
        """`odmrd serve` (detached); the daemon's pid is remembered for cleanup()."""
        result = self.cli("serve", timeout=30)
        pid = self.pid()
        if pid:
            self.pids.append(pid)
        return result

    def pid(self) -> Optional[int]:
        return read_pid_file(self.pid_file)

    def start(self, timeout: float = 15.0, output: Optional[str] = None) -> "Daemon":
        """`odmrd serve -f` as a child; returns once both ports take connections and it has
        logged its start. Its stdout and stderr go to `output`, by default the log file
        (the detached layout's log file stays untouched when `output` is another file)."""
        output = output or self.log_file
        with open(output, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "odmrd.py"), "-c", self.config,
                                          "serve", "-f"], stdout=fh, stderr=fh, cwd=self.dir)
        deadline = time.monotonic() + timeout
        for port in (self.odmr_port, self.smtp_port):
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError("odmrd exited with %s: %s" % (self.proc.returncode,
                                                                       _text_of(output)[-2000:]))
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError("odmrd did not listen on %d" % port)
                    time.sleep(0.02)
        # the ports take connections from the bind on; the status socket, the workers
        # and the serving threads come a moment later, before this line is logged
        while "odmrd started in the foreground" not in _text_of(output):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("odmrd did not start: %s" % _text_of(output)[-2000:])
            time.sleep(0.02)
        return self

    def spawn(self, *args: str) -> subprocess.Popen:
        """`odmrd -c CONFIG ARGS...` as a child that the test may signal mid-run (its output
        is dropped); cleanup() kills it if it still runs."""
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "odmrd.py"), "-c", self.config] + list(args),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.children.append(proc)
        return proc

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def term(self, timeout: float = 40.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def cleanup(self) -> None:
        for proc in [self.proc] + self.children:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if self.detached:
            for pid in self.pids + [p for p in [self.pid()] if p]:
                if pid != os.getpid():
                    kill_hard(pid)

    def log(self) -> str:
        """What it logged: the log file when detached, stdout and stderr otherwise."""
        return _text_of(self.log_file)


def _text_of(path: str) -> str:
    """A log file's text so far ("" before it exists)."""
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


class InitScript:
    """An init script of ours (init/odmrd, init/odmrd-fetch) run by a POSIX shell the way
    init runs it: a scrubbed environment whose only setting is `defaults_variable`, naming
    the defaults file (what /etc/default/... would hold) that points it at this test's files.

    `cleanup()` kills whatever still runs `odmrd <command>` (serve, fetch) with this
    `config`: found by its command line, never by a pid file, which a test may point at
    a process that is not ours."""

    def __init__(self, script: str, shell: str, defaults_variable: str, defaults: str,
                 config: str, pid_file: str, log_file: str, command: str):
        self.script = script
        self.shell = shell
        self.defaults_variable = defaults_variable
        self.defaults = defaults
        self.config = config
        self.pid_file = pid_file
        self.log_file = log_file
        self.command = command

    def init(self, action: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", self.defaults_variable: self.defaults}
        return subprocess.run([self.shell, self.script, action], env=env, capture_output=True,
                              timeout=60, stdin=subprocess.DEVNULL)

    def pid(self) -> Optional[int]:
        return read_pid_file(self.pid_file)

    def log(self) -> str:
        return _text_of(self.log_file)

    def processes(self) -> List[int]:
        """Live processes running `odmrd <command>` with this configuration file."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as fh:
                    cmdline = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if self.config in cmdline and " %s " % self.command in cmdline and alive(int(entry)):
                found.append(int(entry))
        return found

    def cleanup(self) -> None:
        for pid in self.processes():
            kill_hard(pid)


def queued_tokens(spool_dir: str, domain: str) -> List[bytes]:
    directory = os.path.join(spool_dir, domain)
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if re.fullmatch(r"[0-9a-f]{14,40}", name):
            try:
                with open(os.path.join(directory, name), "rb") as fh:
                    found += TOKEN.findall(fh.read())
            except FileNotFoundError:
                pass
    return found

# -- the scripted customer on the reversed connection ----------------------------------

SENDER_HOSTED = "bob@example.net"      # a sender whose DSNs stay in the spool (bob's domain)
SENDER_REMOTE = "someone@remote.test"
SENDER_OUTSIDE = "sender@outside.test"  # a sender whose DSNs go to the bounce relay


def reply_line(reply: replies.Reply, *args) -> str:
    """One of odmr.replies as a line on the wire, without CRLF; `args` fill its %s."""
    code, text = reply
    return "%d %s" % (code, text % args if args else text)


ATRN_OK = (reply_line(replies.ATRN_OK) + "\r\n").encode()   # our own lines, as sent
NO_MAIL = (reply_line(replies.NO_MAIL) + "\r\n").encode()


class Delivered(dict):
    """One message the scripted customer took: {"mail", "rcpts", "data"}, also as attributes."""

    mail = property(lambda self: self["mail"])          # MAIL's argument: FROM:<...> and parameters
    rcpts = property(lambda self: self["rcpts"])
    data = property(lambda self: self["data"])          # dot-unstuffed, CRLF line ends

    @property
    def sender(self) -> str:
        return self.mail.split("<", 1)[1].split(">", 1)[0]

    def body(self) -> bytes:
        """The content without odmrd's Received header."""
        assert self.data.startswith(b"Received: ")
        end = self.data.find(b"\r\n", 0)
        while self.data[end + 2:end + 3] in (b"\t", b" "):
            end = self.data.find(b"\r\n", end + 2)
        return self.data[end + 2:]


HANG_UP = object()      # a hook's answer: close the connection instead of replying


class Script:
    """The customer's SMTP server on the reversed connection; override hooks to misbehave.

    Each hook returns the reply line(s) to send (str), None for no reply at all, or
    HANG_UP to close the connection there."""

    greeting = "220 customer.test ESMTP"
    extensions = ["PIPELINING", "8BITMIME", "SIZE 50000000"]
    probe_pipelining = False        # note in pipelined_batches whether more came after each MAIL

    def __init__(self):
        self.messages: List[Delivered] = []
        self.commands: List[str] = []
        self.pipelined_batches: List[bool] = []

    def ehlo(self, arg: str) -> Optional[str]:
        lines = ["customer.test"] + self.extensions
        return multiline(250, lines)

    def helo(self, arg: str) -> Optional[str]:
        return "250 customer.test"

    def mail(self, arg: str) -> Optional[str]:
        return "250 2.1.0 ok"

    def rcpt(self, address: str) -> Optional[str]:
        return "250 2.1.5 ok"

    def data(self, rcpts: List[str]) -> Optional[str]:
        return "354 go ahead" if rcpts else "554 5.5.1 no valid recipients"

    def final(self, message: Delivered) -> Optional[str]:
        return "250 2.0.0 stored"

    def chunk(self, rcpts: List[str], size: int) -> Optional[str]:
        """The reply to a BDAT chunk that is not the last (offered with "CHUNKING")."""
        return "250 2.0.0 %d octets received" % size if rcpts else "554 5.5.1 no valid recipients"

    def in_data(self, line: bytes, received: int) -> bool:
        """Called for each body line; False drops the connection there."""
        return True


class Closed(Exception):
    pass


class HungUp(Exception):
    pass


class ReversedConnection:
    """Runs a Script on the customer's socket after ATRN 250.

    strict: answer as a real server would check, too: every line must end in CRLF,
    a RCPT without an accepted MAIL is 503, and after its 221 the provider must close."""

    def __init__(self, customer: Customer, script: Script, strict: bool = False):
        self.sock = customer.sock
        # one reply per write: without this, Nagle holds each reply for the provider's delayed ACK
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.script = script
        self.strict = strict
        self.buf = b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                raise Closed()
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        assert not self.strict or line.endswith(b"\r"), "a bare LF from the provider: %r" % line
        return line + b"\n"

    def send(self, text: Optional[str]) -> None:
        if text is HANG_UP:
            self.sock.close()
            raise HungUp()
        if text is not None:
            self.sock.sendall(text.encode() + b"\r\n")

    def more_waiting(self) -> bool:
        """Whether the provider sent more without waiting for our reply."""
        if self.buf:
            return True
        self.sock.settimeout(0.3)
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(10)

    def closed_by_provider(self) -> bool:
        try:
            return self.buf == b"" and self.sock.recv(1) == b""
        except OSError:
            return True

    def octets(self, size: int) -> bytes:
        """Exactly `size` bytes of a BDAT chunk."""
        while len(self.buf) < size:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                raise Closed()
            self.buf += data
        chunk, self.buf = self.buf[:size], self.buf[size:]
        return chunk

    def bdat(self, arg: str, mail: Optional[str], rcpts: List[str], chunks: List[bytes]) -> bool:
        """One BDAT chunk (RFC 3030); True when it was the last (the transaction is over)."""
        words = arg.split()
        size, last = int(words[0]), words[1:] == ["LAST"]
        chunks.append(self.octets(size))
        if not last:
            self.send(self.script.chunk(rcpts, size))
            return False
        message = Delivered(mail=mail, rcpts=list(rcpts), data=b"".join(chunks))
        chunks.clear()
        reply = self.script.final(message) if rcpts else self.script.data(rcpts)
        if _is(reply, "2"):
            self.script.messages.append(message)
        self.send(reply)
        return True

    def run(self) -> str:
        """Serve until QUIT ("quit"), the provider's close ("closed"), a drop in DATA
        ("dropped") or a hook's HANG_UP ("hung up")."""
        self.mail: Optional[str] = None
        self.rcpts: List[str] = []
        self.chunks: List[bytes] = []
        try:
            self.send(self.script.greeting)
            while True:
                raw = self.line().rstrip(b"\r\n").decode("utf-8", "replace")
                self.script.commands.append(raw)
                verb, _, arg = raw.partition(" ")
                outcome = self.answer(verb.upper(), arg)
                if outcome:
                    return outcome
        except Closed:
            return "closed"
        except HungUp:
            return "hung up"

    def answer(self, verb: str, arg: str) -> Optional[str]:
        """Answer one command; the outcome when the conversation is over."""
        s = self.script
        if verb == "EHLO":
            self.send(s.ehlo(arg))
        elif verb == "HELO":
            self.send(s.helo(arg))
        elif verb == "MAIL":
            if s.probe_pipelining:
                s.pipelined_batches.append(self.more_waiting())
            reply = s.mail(arg)
            self.mail = arg if not self.strict or _is(reply, "2") else None
            self.rcpts = []
            self.send(reply)
        elif verb == "RCPT":
            self.rcpt(arg)
        elif verb == "DATA":
            return self.data()
        elif verb == "BDAT":
            if self.bdat(arg, self.mail, self.rcpts, self.chunks):
                self.mail, self.rcpts = None, []
        elif verb == "RSET":
            self.mail, self.rcpts, self.chunks = None, [], []
            self.send("250 ok")
        elif verb == "QUIT":
            self.send("221 bye")
            assert not self.strict or self.closed_by_provider(), "provider did not close after 221"
            return "quit"
        else:
            self.send("502 what?")
        return None

    def rcpt(self, arg: str) -> None:
        if self.strict and self.mail is None:
            self.send("503 5.5.1 need MAIL")
            return
        address = arg.split("<", 1)[1].split(">", 1)[0]
        reply = self.script.rcpt(address)
        if _is(reply, "2"):
            self.rcpts.append(address)
        self.send(reply)

    def data(self) -> Optional[str]:
        """DATA, the text up to the dot, the script's final reply; "dropped" if it drops."""
        s = self.script
        reply = s.data(self.rcpts)
        self.send(reply)
        if not _is(reply, "354"):
            return None
        body = []
        while True:
            line = self.line()
            if line == b".\r\n":
                break
            if not s.in_data(line, len(body)):
                self.sock.close()
                return "dropped"
            body.append(line[1:] if line.startswith(b".") else line)
        message = Delivered(mail=self.mail, rcpts=list(self.rcpts), data=b"".join(body))
        reply = s.final(message)
        if _is(reply, "2"):
            s.messages.append(message)
        self.send(reply)
        if self.strict:
            self.mail, self.rcpts = None, []
        return None


def _is(reply, prefix: str) -> bool:
    """Whether a hook's answer is a reply starting with `prefix`."""
    return isinstance(reply, str) and reply.startswith(prefix)


def spool(provider, rcpts: List[str], sender: str = SENDER_HOSTED, token: str = "x") -> None:
    send_mail(provider.smtp_port, sender, rcpts,
              ("Subject: t %s\r\nX-Token: %s\r\n\r\nbody %s\r\n.dot line\r\n"
               % (token, token, token)).encode())


def atrn(provider, script: Script, domain: str = "example.org", user: str = "alice",
         timeout: float = 15.0) -> str:
    c = Customer(provider.odmr_port, timeout=timeout)
    try:
        c.login(user, PASSWORD)
        c.send("ATRN " + domain)
        assert c.line() == ATRN_OK
        return ReversedConnection(c, script).run()
    finally:
        c.close()


def queue(provider, domain: Optional[str] = None) -> List[Dict]:
    runtime = provider.service.runtime
    return [queue_commands.describe(m) for m in queue_commands.list_messages(runtime, domain)]


def stored(provider, domain: str) -> List[bytes]:
    """The RFC 5322 part of every message spooled for a domain."""
    return [provider.spool.load(domain, i).read_data() for i in provider.spooled(domain)]


def wait_sessions_over(provider, timeout: float = 10.0) -> None:
    """The provider's session may still be recording results after the customer's last reply."""
    assert provider.service.wait_for_sessions(timeout) == 0


def dsns(provider, domain: str = "example.net") -> List[email.message.Message]:
    found = []
    for m in provider.spool.messages(domain):
        if m.envelope.sender == "":
            found.append(email.message_from_bytes(m.read_data()))
    return found


def report_fields(dsn: email.message.Message) -> List[Dict[str, str]]:
    """Per-recipient field groups of a multipart/report DSN."""
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    part = [p for p in dsn.get_payload() if p.get_content_type() == "message/delivery-status"][0]
    groups = part.get_payload()
    out = []
    for group in groups[1:]:
        out.append({k.lower(): v for k, v in group.items()})
    return out


def read_message(c: Customer) -> bytes:
    body = []
    while True:
        line = c.line()
        assert line, "connection closed in DATA"
        if line == b".\r\n":
            return b"".join(body)
        body.append(line)


def accept_all(c: Customer, expect: int):
    """Play a PIPELINING customer after the turnaround; return the message texts."""
    c.send("220 customer ready")
    assert c.line().startswith(b"EHLO")
    c.send("250-customer\r\n250 PIPELINING")
    texts = []
    while True:
        line = c.line()
        if line == b"QUIT\r\n":
            c.send("221 bye")
            break
        assert line.startswith(b"MAIL FROM:"), line
        rcpts = []
        while True:
            line = c.line()
            if line == b"DATA\r\n":
                break
            rcpts.append(line)
        c.send("250 ok")
        for _ in rcpts:
            c.send("250 ok")
        c.send("354 go")
        texts.append(read_message(c))
        c.send("250 stored")
    assert len(texts) == expect
    return texts

# -- odmrd fetch and a scripted provider -----------------------------------------------

FETCH = [sys.executable, os.path.join(ROOT, "odmrd.py"), "fetch"]


def run_fetch(*args: str, password: Optional[str] = PASSWORD, timeout: float = 60,
              env: Optional[dict] = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("ODMRD_CONFIG", "ODMR_PASSWORD")}
    if password is not None:
        full["ODMR_PASSWORD"] = password
    full.update(env or {})
    return subprocess.run(FETCH + list(args), capture_output=True, timeout=timeout, env=full,
                          stdin=subprocess.DEVNULL)


def fetch_args(provider, *more: str) -> List[str]:
    """`odmrd fetch` flags for alice at the provider's ODMR port, without TLS."""
    return ["--server", "127.0.0.1:%d" % provider.odmr_port, "--user", "alice", "--tls", "none"] + list(more)


def err(result: subprocess.CompletedProcess) -> str:
    return result.stderr.decode("utf-8", "replace")


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The command's one line on stderr (a failure the user can read, no traceback)."""
    text = err(result).strip()
    assert "Traceback" not in text, text
    assert len(text.splitlines()) == 1, text
    return text


class Peer:
    """One accepted connection of the scripted provider."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(15)
        self.buf = b""
        self.lines: List[bytes] = []
        self.tls = isinstance(sock, ssl.SSLSocket)

    def send(self, text) -> None:
        self.sock.sendall(text.encode() if isinstance(text, str) else text)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("customer closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        self.lines.append(line.rstrip(b"\r"))
        return line.rstrip(b"\r")

    def reply(self) -> List[bytes]:
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines

    def starttls(self, context: ssl.SSLContext) -> None:
        assert self.buf == b""
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.tls = True


class Scripted:
    """A tiny ODMR provider: behaviour set by options, one thread per connection."""

    def __init__(self, atrn_reply: str = reply_line(replies.NO_MAIL), mechanisms: str = "CRAM-MD5",
                 atrn: bool = True, starttls: Optional[ssl.SSLContext] = None,
                 implicit: Optional[ssl.SSLContext] = None, greeting: str = "220 scripted.test ESMTP",
                 after_250: Optional[Callable[[Peer], None]] = None):
        self.atrn_reply = atrn_reply
        self.mechanisms = mechanisms
        self.atrn = atrn
        self.starttls_ctx = starttls
        self.implicit = implicit
        self.greeting = greeting
        self.after_250 = after_250
        self.peers: List[Peer] = []
        self.errors: List[str] = []
        self.serving: List[threading.Thread] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.serving.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.implicit is not None:
                conn = self.implicit.wrap_socket(conn, server_side=True)
            peer = Peer(conn)
            self.peers.append(peer)
            self.converse(peer)
        except (EOFError, OSError) as exc:
            self.errors.append(repr(exc))
        finally:
            conn.close()

    def ehlo_lines(self, peer: Peer) -> List[str]:
        lines = ["scripted.test"]
        if self.starttls_ctx is not None and not peer.tls:
            lines.append("STARTTLS")
        if self.mechanisms:
            lines.append("AUTH " + self.mechanisms)
        if self.atrn:
            lines.append("ATRN")
        return lines

    def converse(self, peer: Peer) -> None:
        peer.send(self.greeting + "\r\n")
        if not self.greeting.startswith("220"):
            peer.line()
            return
        while True:
            line = peer.line()
            verb = line.split(b" ")[0].upper()
            if verb == b"EHLO":
                lines = self.ehlo_lines(peer)
                peer.send(multiline(250, lines) + "\r\n")
            elif verb == b"STARTTLS":
                peer.send("220 2.0.0 go ahead\r\n")
                peer.starttls(self.starttls_ctx)
            elif verb == b"AUTH":
                self.auth(peer, line)
            elif verb == b"ATRN":
                peer.send(self.atrn_reply + "\r\n")
                if self.atrn_reply.startswith("250"):
                    if self.after_250:
                        self.after_250(peer)
                    return
            elif verb == b"QUIT":
                peer.send("221 bye\r\n")
                return
            else:
                peer.send("502 no\r\n")

    def auth(self, peer: Peer, line: bytes) -> None:
        parts = line.decode().split()
        if parts[1] == "CRAM-MD5":
            challenge = b"<123.456@scripted.test>"
            peer.send("334 %s\r\n" % base64.b64encode(challenge).decode())
            user, digest = base64.b64decode(peer.line()).decode().split()
            ok = user == "alice" and hmac.compare_digest(
                digest, hmac.new(PASSWORD.encode(), challenge, "md5").hexdigest())
        elif parts[1] == "PLAIN":
            ok = base64.b64decode(parts[2]) == b"\0alice\0" + PASSWORD.encode()
        else:
            peer.send("504 unknown\r\n")
            return
        peer.send("235 ok\r\n" if ok else "535 5.7.8 bad\r\n")

    def commands(self) -> List[bytes]:
        return [l for p in self.peers for l in p.lines]

    def close(self) -> None:
        """Stop listening and end every connection thread (see close_listener)."""
        close_listener(self.listener, [self.thread])
        for peer in list(self.peers):
            shut_down(peer.sock)
        for thread in list(self.serving):
            thread.join(10)
        for peer in self.peers:
            try:
                peer.sock.close()
            except OSError:
                pass


def scripted_args(s: Scripted, *more: str, tls: str = "none") -> List[str]:
    return ["--server", "127.0.0.1:%d" % s.port, "--user", "alice", "--tls", tls,
            "--domain", "example.org", "--domain", "example.com"] + list(more)

# -- Postfix's smtp-sink and fetchmail -------------------------------------------------

FETCHMAIL = which("fetchmail")
SMTP_SINK = which("smtp-sink")

SINK_RECORDS = (b"X-Client-Addr:", b"X-Client-Proto:", b"X-Helo-Args:", b"X-Mail-Args:", b"X-Rcpt-Args:")


@dataclass
class Dumped:
    """One message as smtp-sink stored it, split into its parts."""
    mail_args: str
    rcpt_args: List[str]
    odmrd_received: bytes               # the trace header odmrd added at intake (LF endings)
    content: bytes                      # the message as the customer's server got it (LF endings)
    raw: bytes = field(repr=False, default=b"")


def _take_header(raw: bytes, pos: int) -> int:
    """End offset of the (possibly folded) header line starting at `pos`."""
    while True:
        end = raw.index(b"\n", pos) + 1
        if raw[end:end + 1] not in (b" ", b"\t"):
            return end
        pos = end


def parse_dump(raw: bytes) -> Dumped:
    """Split a smtp-sink dump file: its records, its Received, odmrd's Received, the message."""
    pos = 0
    mail_args = ""
    rcpts: List[str] = []
    while raw.startswith(SINK_RECORDS, pos):
        end = raw.index(b"\n", pos) + 1
        name, _, value = raw[pos:end - 1].partition(b": ")
        if name == b"X-Mail-Args":
            mail_args = value.decode()
        elif name == b"X-Rcpt-Args":
            rcpts.append(value.decode())
        pos = end
    end = _take_header(raw, pos)
    assert b"(smtp-sink)" in raw[pos:end], "no smtp-sink Received header: %r" % raw[:500]
    pos = end
    end = _take_header(raw, pos)
    received = raw[pos:end]
    assert raw.endswith(b"\n\n"), "dump file does not end with the sink's empty line"
    return Dumped(mail_args, rcpts, received, raw[end:-1], raw)


def as_stored(data: bytes) -> bytes:
    """What the sink stores for message `data` sent over SMTP: LF endings, a final newline,
    lines over 998 octets broken by the provider (RFC 5321 §4.5.3.1.6)."""
    from odmr.folding import break_long_lines
    text = break_long_lines(data).replace(b"\r\n", b"\n")
    return text if text.endswith(b"\n") else text + b"\n"


def assert_same(got: bytes, expected: bytes, what: str = "") -> None:
    """Two (large) texts equal; else where they part, without pytest's diff of megabytes
    (which takes minutes when CI turns its truncation off)."""
    if got == expected:
        return
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    raise AssertionError("%s: %d octets, expected %d; they part at octet %d: %r / %r" % (
        what or "text", len(got), len(expected), at, got[at:at + 40], expected[at:at + 40]))


class Sink:
    """Postfix's smtp-sink on a free loopback port, one dump file per message."""

    def __init__(self, *options: str):
        # tmp_path is 0700 root: the sink runs as nobody, so its directory lives in /tmp
        self.dir = tempfile.mkdtemp(prefix="odmr-sink-", dir="/tmp")
        os.chmod(self.dir, 0o777)
        self.port = free_port()
        self.log = open(os.path.join(self.dir, "sink.log"), "wb")
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", *options, "-d", os.path.join(self.dir, "%M."),
             "127.0.0.1:%d" % self.port, "256"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("smtp-sink exited with %s" % self.proc.returncode)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as probe:
                    if probe.recv(100).startswith(b"220"):
                        probe.sendall(b"QUIT\r\n")
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("smtp-sink did not start listening")

    def files(self) -> List[str]:
        return sorted(n for n in os.listdir(self.dir) if n != "sink.log")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()

    def messages(self) -> List[Dumped]:
        """Every stored message; stops the sink first so that every file is complete."""
        self.stop()
        result = []
        for name in self.files():
            with open(os.path.join(self.dir, name), "rb") as fh:
                result.append(parse_dump(fh.read()))
        return result

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_fetchmail(workdir: str, odmr_port: int, smtp_port: int, user: str = "alice",
                  password: str = PASSWORD, domains: str = "example.org,example.com",
                  timeout: float = 90) -> subprocess.CompletedProcess:
    """One fetchmail poll in the foreground, with its own FETCHMAILHOME and a 0600 rc file."""
    home = tempfile.mkdtemp(prefix="fetchmail-", dir=workdir)
    rc = os.path.join(home, "fetchmailrc")
    with open(rc, "w") as fh:
        fh.write('set no syslog\n'
                 'set pidfile "%s/fetchmail.pid"\n'
                 'poll 127.0.0.1 service %d protocol ODMR\n'
                 '    user "%s" password "%s"\n'
                 '    fetchdomains %s\n'
                 '    smtphost 127.0.0.1/%d\n' % (home, odmr_port, user, password, domains, smtp_port))
    os.chmod(rc, 0o600)
    env = dict(os.environ, FETCHMAILHOME=home)
    proc = subprocess.Popen([FETCHMAIL, "-f", rc, "-v", "--nodetach", "--nosyslog"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, b"")


def transcript(result: subprocess.CompletedProcess) -> str:
    return result.stdout.decode("utf-8", "replace")


# -- a private, real Postfix instance (the README's recipes, run for real) ------------
#
# `postfix -c DIR start` with its own configuration, queue, data and log directories
# under /tmp, listening on loopback only. The instance runs the configuration it is
# given (a recipe) on top of the few settings any private instance needs; it never
# touches /etc/postfix or the system's queue. Postfix logs into DIR/maillog (there is
# no syslog here), and `log()` returns it, so a failing test can show what Postfix did.

POSTFIX = which("postfix")
POSTQUEUE = which("postqueue")
POSTSUPER = which("postsuper")
POSTFIX_MASTER_PROTO = "/etc/postfix/master.cf.proto"


def postfix_unavailable() -> Optional[str]:
    """Why a private Postfix instance cannot run here, or None."""
    if POSTFIX is None or POSTQUEUE is None or not os.path.exists(POSTFIX_MASTER_PROTO):
        return "postfix is not installed (Debian package postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (postfix start, set-user-id delivery agents)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix account (Debian package postfix creates it)"
    return None


class PostfixError(Exception):
    """The instance did not start or answer; the message carries the end of its log."""


def _stock_services(listen: Optional[str]) -> str:
    """Debian's master.cf without chroot (a private queue holds no /etc copies), with the
    public `smtp inet` service replaced by one smtpd on `listen`, or dropped."""
    lines = []
    with open(POSTFIX_MASTER_PROTO) as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 8 and fields[0] == "smtp" and fields[1] == "inet":
                if listen:
                    lines.append("%s inet n - n - - smtpd\n" % listen)
                continue
            if len(fields) >= 8 and not line[0].isspace() and fields[4] == "y":
                fields[4] = "n"
                line = " ".join(fields) + "\n"
            lines.append(line)
    return "".join(lines)


class PostfixInstance:
    """One Postfix instance: `main_cf` and `master_cf` are the recipe's own lines."""

    def __init__(self, name: str, main_cf: str, master_cf: str = "", smtpd_port: Optional[int] = None):
        self.base = tempfile.mkdtemp(prefix="odmr-postfix-%s-" % name, dir="/tmp")
        os.chmod(self.base, 0o755)               # delivery agents run as other users
        self.config_dir = os.path.join(self.base, "etc")
        self.queue_dir = os.path.join(self.base, "queue")
        self.data_dir = os.path.join(self.base, "data")
        self.maillog = os.path.join(self.base, "maillog")
        # Postfix refuses to relay to a server greeting with its own name: one name each
        self.hostname = "%s-%s.test" % (name, secrets.token_hex(3))
        self.smtpd_port = smtpd_port
        os.mkdir(self.config_dir, 0o755)
        os.mkdir(self.queue_dir, 0o755)            # Postfix makes its subdirectories itself
        os.mkdir(self.data_dir, 0o700)
        account = pwd.getpwnam("postfix")
        os.chown(self.data_dir, account.pw_uid, account.pw_gid)
        listen = "127.0.0.1:%d" % smtpd_port if smtpd_port else None
        with open(os.path.join(self.config_dir, "main.cf"), "w") as fh:
            fh.write(self._private_settings() + "\n# -- the recipe\n" + main_cf.strip() + "\n")
        with open(os.path.join(self.config_dir, "master.cf"), "w") as fh:
            fh.write(_stock_services(listen) + "\n# -- the recipe\n" + master_cf.strip() + "\n")
        self.master_pid: Optional[int] = None

    def _private_settings(self) -> str:
        return "\n".join([
            "# what any private test instance needs (not part of a recipe)",
            "compatibility_level = 3.6",
            "queue_directory = %s" % self.queue_dir,
            "data_directory = %s" % self.data_dir,
            "myhostname = %s" % self.hostname,
            "inet_interfaces = loopback-only",
            "mydestination =",
            "alias_maps =",
            "alias_database =",
            "maillog_file = %s" % self.maillog,
            "maillog_file_prefixes = /tmp",
        ]) + "\n"

    # -- life cycle

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", self.config_dir, *args], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)

    def start(self) -> "PostfixInstance":
        result = self._postfix("start")
        if result.returncode != 0:
            raise PostfixError("postfix start failed (%d): %s\n%s" % (
                result.returncode, (result.stdout + result.stderr).decode(errors="replace"), self.log()[-3000:]))
        self.master_pid = self._read_master_pid()
        if self.smtpd_port:
            self.wait_greeting(self.smtpd_port)
        return self

    def _read_master_pid(self) -> Optional[int]:
        deadline = time.monotonic() + 10
        path = os.path.join(self.queue_dir, "pid", "master.pid")
        while time.monotonic() < deadline:
            try:
                with open(path) as fh:
                    pid = int(fh.read().strip())
                if alive(pid):
                    return pid
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return None

    def wait_greeting(self, port: int, timeout: float = 30) -> None:
        """Until an smtpd on `port` greets with 220 (master spawns it on the first connection)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
                    greeting = probe.recv(512)
                    if greeting.startswith(b"220"):
                        probe.sendall(b"QUIT\r\n")
                        return
                    last = repr(greeting)
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise PostfixError("no 220 from Postfix on port %d (%s)\n%s" % (port, last, self.log()[-3000:]))

    def stop(self) -> None:
        """Stop the instance, kill whatever of it is left, remove its directories."""
        try:
            if os.path.isdir(self.queue_dir):
                self._postfix("stop", timeout=30)
            if self.master_pid is not None:
                deadline = time.monotonic() + 10
                while alive(self.master_pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
            for pid in self._own_processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _own_processes(self) -> List[int]:
        """Processes of this instance: Postfix daemons carry MAIL_CONFIG=<config dir>."""
        marker = b"MAIL_CONFIG=" + self.config_dir.encode() + b"\0"
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/environ" % entry, "rb") as fh:
                    environ = fh.read() + b"\0"
            except OSError:
                continue
            if (b"\0" + marker) in (b"\0" + environ) and alive(int(entry)):
                found.append(int(entry))
        if self.master_pid is not None and alive(self.master_pid):
            found.append(self.master_pid)
        return found

    # -- looking at it

    def log(self) -> str:
        return _text_of(self.maillog)

    def queue(self) -> List[Dict]:
        """What waits in the queue, one dict per message (`postqueue -j`)."""
        result = subprocess.run([POSTQUEUE, "-c", self.config_dir, "-j"], capture_output=True, timeout=30)
        if result.returncode != 0:
            raise PostfixError("postqueue -j failed: %s" % result.stderr.decode(errors="replace"))
        return [json.loads(line) for line in result.stdout.decode().splitlines() if line.strip()]

    def flush(self) -> None:
        subprocess.run([POSTQUEUE, "-c", self.config_dir, "-f"], capture_output=True, timeout=30)

    def wait_queue_empty(self, timeout: float = 30) -> None:
        """Until everything is delivered or bounced; flushes now and then so a deferred
        message is retried at once rather than after minutes."""
        deadline = time.monotonic() + timeout
        next_flush = time.monotonic() + 3
        while True:
            waiting = self.queue()
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise AssertionError("Postfix queue not empty after %ds: %s\n%s" % (
                    timeout, waiting, self.log()[-3000:]))
            if time.monotonic() > next_flush:
                self.flush()
                next_flush = time.monotonic() + 3
            time.sleep(0.1)

    def delete_all(self) -> None:
        """Empty the queue (between tests sharing the instance)."""
        subprocess.run([POSTSUPER, "-c", self.config_dir, "-d", "ALL"], capture_output=True, timeout=30)


# -- PROXY protocol headers --------------------------------------------------------------


def proxied_provider(tmp_path, trusted_list="127.0.0.1", port: str = "odmr") -> Provider:
    """A provider whose `port` ("odmr" or "smtp") is behind a PROXY balancer."""
    settings = "proxy_protocol = yes\nproxy_trusted = %s\nmax_sessions_per_address = 2" % trusted_list
    p = Provider(str(tmp_path), **{port + "_extra": settings})
    p.add_user("alice", ["example.org"])
    return p.start()


def v2_header(src: str, sport: int) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", sport, 3366)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def connect_with(port: int, header: bytes) -> Customer:
    c = Customer(port)
    c.sock.sendall(header)
    return c


# -- load on a running daemon (for kill -9 loops) ----------------------------------------


class Load:
    """Senders and an ATRN customer running against whatever daemon is up right now."""

    def __init__(self, daemon: Daemon, senders: int = 3, extensions: Optional[List[str]] = None):
        self.daemon = daemon
        self.extensions = extensions             # the customer's EHLO keywords (None: Script's)
        self.bdat_sessions = 0
        self.stop_sending = threading.Event()
        self.stop_collecting = threading.Event()
        self.acked: List[bytes] = []
        self.delivered: List[bytes] = []
        self.atrn_sessions = 0
        self.threads = [threading.Thread(target=self._sender, args=(n,), daemon=True) for n in range(senders)]
        self.threads.append(threading.Thread(target=self._customer, daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _sender(self, n: int) -> None:
        count = 0
        while not self.stop_sending.is_set():
            count += 1
            token = b"s%d-%d" % (n, count)
            message = (b"From: s%d@remote.test\r\nSubject: crash %s\r\nX-Token: %s\r\n\r\n" % (n, token, token)
                       + b"line of text\r\n" * random.randint(1, 400))
            try:
                with smtplib.SMTP("127.0.0.1", self.daemon.smtp_port, timeout=5) as s:
                    s.sendmail("s%d@remote.test" % n, ["user@example.org"], message)
                self.acked.append(token)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.02)

    def _customer(self) -> None:
        while not self.stop_collecting.is_set():
            c = None
            try:
                c = Customer(self.daemon.odmr_port, timeout=5)
                c.login("alice", PASSWORD)
                c.send("ATRN example.org")
                line = c.line()
                if line != ATRN_OK:
                    c.send("QUIT")
                    time.sleep(0.05)
                    continue
                self.atrn_sessions += 1
                script = Script()
                if self.extensions is not None:
                    script.extensions = self.extensions

                def final(message, delivered=self.delivered):
                    delivered.extend(TOKEN.findall(message["data"]))   # stored, then 250
                    return "250 2.0.0 stored"
                script.final = final
                ReversedConnection(c, script).run()
                if any(command.startswith("BDAT") for command in script.commands):
                    self.bdat_sessions += 1
            except (OSError, EOFError, AssertionError, ValueError):
                time.sleep(0.05)
            finally:
                if c is not None:
                    c.close()

    def join(self) -> None:
        self.stop_sending.set()
        self.stop_collecting.set()
        for t in self.threads:
            t.join(15)


# -- the provider's side after ATRN 250, played against odmrd fetch ----------------------


def deliver_one(peer: Peer) -> None:
    """The provider's side after 250: one message with a dot line, then QUIT."""
    assert peer.line().startswith(b"220 ")
    peer.send("EHLO scripted.test\r\n")
    features = peer.reply()
    assert b"250-PIPELINING" in features and any(b"SIZE" in f for f in features)
    peer.send("MAIL FROM:<a@outside.test> SIZE=40 BODY=8BITMIME\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    assert peer.line().startswith(b"250")
    assert peer.line().startswith(b"250")
    assert peer.line().startswith(b"354")
    peer.send("Subject: scripted\r\n\r\n..dot\r\nFrom x\r\n.\r\n")
    assert peer.line().startswith(b"250")
    peer.send("QUIT\r\n")
    assert peer.line().startswith(b"221")


# -- odmrd fetch's own SMTP server on a loopback port ------------------------------------


class LocalServer:
    """fetch's local SMTP server on a loopback port, one connection, delivering into a Maildir."""

    def __init__(self, maildir: str, max_size: int = 50 * 1024 * 1024, tls: bool = False):
        self.maildir = maildir
        self.max_size = max_size
        self.tls = tls                  # what the session is told of the connection
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.session = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(30)
        box = open_mailbox(maildir=self.maildir)
        self.session = serve_reversed(conn, "127.0.0.1", reader_for(conn), box,
                                      "customer.test", self.tls, max_size=self.max_size)

    def client(self) -> Peer:
        peer = Peer(socket.create_connection(("127.0.0.1", self.port), timeout=15))
        assert peer.line().startswith(b"220 ")
        peer.send("EHLO provider.test\r\n")
        features = peer.reply()
        assert b"250-CHUNKING" in features and b"250-PIPELINING" in features, features
        return peer

    def stored(self) -> List[bytes]:
        """The stored messages without our two trace lines, oldest first."""
        new = os.path.join(self.maildir, "new")
        texts = []
        for name in sorted(os.listdir(new), key=lambda n: os.stat(os.path.join(new, n)).st_mtime_ns):
            with open(os.path.join(new, name), "rb") as fh:
                raw = fh.read()
            assert raw.startswith(b"Return-Path: <a@outside.test>\nReceived: from provider.test")
            lines = raw.split(b"\n")[2:]
            while lines and lines[0][:1] in (b" ", b"\t"):     # the Received: header goes on
                lines.pop(0)
            texts.append(b"\n".join(lines))
        return texts

    def tmp_is_empty(self) -> bool:
        return os.listdir(os.path.join(self.maildir, "tmp")) == []

    def close(self) -> None:
        self.listener.close()
        self.thread.join(15)


def quit_(peer: Peer) -> None:
    peer.send("QUIT\r\n")
    assert peer.line().startswith(b"221")


# -- a scripted MTA (the bounce relay, the customer's) and providers relaying bounces -----


class ScriptedMTA:
    """A small scripted SMTP server on loopback: the bounce relay, or the customer's MTA
    behind `odmrd fetch --relay` (Postfix's real smtp-sink is `Sink`).

    refusals: one per connection, in order: "greeting:421 ..." answers the connection
    with that and closes it, "rcpt:451 ..." answers every RCPT so. defer / refuse: the
    recipients answered 450 / 550. defer_marker: a text containing it gets 451 at the end
    of data; others get final_code. Taken messages are in `messages` (mail, rcpts, data),
    every RCPT address given in `rcpts`."""

    def __init__(self, refusals: List[str] = (), final_code: str = "250 2.0.0 Ok: queued",
                 features: List[str] = ("8BITMIME",), defer=(), refuse=(), defer_marker: bytes = b""):
        self.refusals = list(refusals)
        self.final_code = final_code
        self.features = list(features)
        self.defer, self.refuse, self.defer_marker = set(defer), set(refuse), defer_marker
        self.messages: List[Dict] = []
        self.rcpts: List[str] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: List[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def accepted(self) -> List[bytes]:
        """The texts of the messages it took."""
        return [m["data"] for m in self.messages]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.conns.append(conn)
            refusal = self.refusals.pop(0) if self.refusals else ""
            thread = threading.Thread(target=self._serve, args=(conn, refusal), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, refusal: str) -> None:
        conn.settimeout(20)
        rfile = conn.makefile("rb")
        stage, _, text = refusal.partition(":")
        try:
            if stage == "greeting":
                conn.sendall(text.encode() + b"\r\n")
                return
            conn.sendall(b"220 mta.test ESMTP\r\n")
            self._converse(conn, rfile, text if stage == "rcpt" else "")
        except OSError:
            pass
        finally:
            rfile.close()
            conn.close()

    def _converse(self, conn: socket.socket, rfile, rcpt_refusal: str) -> None:
        mail, rcpts = "", []
        while True:
            line = rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                lines = ["mta.test"] + self.features
                conn.sendall(multiline(250, lines).encode() + b"\r\n")
            elif verb in (b"MAIL", b"RSET"):
                mail, rcpts = line.strip().decode() if verb == b"MAIL" else "", []
                conn.sendall(b"250 2.0.0 Ok\r\n")
            elif verb == b"RCPT":
                conn.sendall(self._rcpt(line, rcpts, rcpt_refusal))
            elif verb == b"DATA":
                self._data(conn, rfile, mail, rcpts)
                rcpts = []
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                conn.sendall(b"502 5.5.1 Not here\r\n")

    def _rcpt(self, line: bytes, rcpts: List[str], refusal: str) -> bytes:
        address = line.decode().split("<", 1)[1].split(">", 1)[0]
        self.rcpts.append(address)
        if refusal:
            return refusal.encode() + b"\r\n"
        if address in self.defer:
            return b"450 4.2.0 <%s>: Mailbox busy\r\n" % address.encode()
        if address in self.refuse:
            return b"550 5.1.1 <%s>: No such user\r\n" % address.encode()
        rcpts.append(address)
        return b"250 2.1.5 Ok\r\n"

    def _data(self, conn: socket.socket, rfile, mail: str, rcpts: List[str]) -> None:
        if not rcpts:
            conn.sendall(b"554 5.5.1 No valid recipients\r\n")
            return
        conn.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        lines = []
        while True:
            line = rfile.readline()
            if line in (b".\r\n", b""):
                break
            lines.append(line)
        text = b"".join(lines)
        if self.defer_marker and self.defer_marker in text:
            conn.sendall(b"451 4.3.0 Try again later\r\n")
            return
        self.messages.append({"mail": mail, "rcpts": list(rcpts), "data": text})
        conn.sendall(self.final_code.encode() + b"\r\n")

    def close(self) -> None:
        """Stop listening and end the connection threads (see close_listener)."""
        shut_down(self.listener)
        self.threads[0].join(10)                    # no connection accepted after this
        for conn in self.conns:
            shut_down(conn)
        close_listener(self.listener, self.threads)


def hosting_provider(directory: str, **options) -> Provider:
    """Started, with alice (example.org, example.com) and bob (example.net); `options`
    are Provider's."""
    p = Provider(directory, **options)
    p.add_user("alice", ["example.org", "example.com"])
    p.add_user("bob", ["example.net"])
    return p.start()


def queue_provider(tmp_path, queue_settings: str, **options) -> Provider:
    """alice (example.org, example.com) and bob (example.net), with these [queue] settings."""
    return hosting_provider(str(tmp_path), sections="[queue]\n" + queue_settings, **options)


RELAY_TICK = 0.1        # seconds between the maintenance thread's looks at the bounce relay's queue
FAST_RELAY = RelayTimings(backoff=0.2, timeout=5.0)     # retries within a test's patience


def relay_provider(tmp_path, sink: ScriptedMTA, queue_extra: str = "") -> Provider:
    """Its bounce relay is `sink`, looked at every RELAY_TICK and retried after FAST_RELAY's
    backoff."""
    return queue_provider(tmp_path, "bounce_relay = 127.0.0.1:%d\n%s" % (sink.port, queue_extra),
                          maintenance_tick=RELAY_TICK, relay_timings=FAST_RELAY)
