"""A private, real Postfix instance for tests: `postfix -c DIR start` with its own
configuration, queue, data and log directories under /tmp, listening on loopback only.

The instance runs the configuration it is given (a recipe) on top of the few settings
any private instance needs; it never touches /etc/postfix or the system's queue.
Postfix logs into DIR/maillog (there is no syslog here), and `log()` returns it, so a
failing test can show what Postfix did.
"""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

from helpers import alive, which

POSTFIX = which("postfix")
POSTQUEUE = which("postqueue")
POSTSUPER = which("postsuper")
MASTER_PROTO = "/etc/postfix/master.cf.proto"


def unavailable() -> Optional[str]:
    """Why a private Postfix instance cannot run here, or None."""
    if POSTFIX is None or POSTQUEUE is None or not os.path.exists(MASTER_PROTO):
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
    with open(MASTER_PROTO) as fh:
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
        try:
            with open(self.maillog, errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

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
