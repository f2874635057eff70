"""Fault injection: kill -9 the real daemon at random moments under load (SPEC §7).

`odmrd serve -f` runs as a subprocess. Several smtplib senders spool mail
(remembering which messages got their 250), a scripted customer keeps doing
ATRN and records every message it accepts, and the daemon is killed with
SIGKILL and restarted again and again. At the end:

    acknowledged ⊆ delivered ∪ still queued
    duplicate deliveries ≤ number of kills
"""
from __future__ import annotations

import collections
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional

import pytest

from conftest import PASSWORD, ROOT, Customer, free_port, write_config
from odmr import accounts
from test_delivery import ATRN_OK, ReversedConnection, Script

TOKEN = re.compile(rb"X-Token: (\S+)")


class Daemon:
    """`odmrd serve -f` in a subprocess, on free loopback ports."""

    def __init__(self, directory: str, extra: str = "", sections: str = "",
                 odmr_port: Optional[int] = None, smtp_port: Optional[int] = None, name: str = "odmrd"):
        self.dir = directory
        self.odmr_port = odmr_port or free_port()
        self.smtp_port = smtp_port or free_port()
        sub = os.path.join(directory, name)
        os.makedirs(sub, exist_ok=True)
        self.config = write_config(sub, self.odmr_port, self.smtp_port, extra, sections)
        self.log_path = os.path.join(directory, name + ".log")
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 15.0) -> "Daemon":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "odmrd.py"), "-c", self.config,
                                      "serve", "-f"], stdout=log, stderr=log, cwd=self.dir)
        log.close()
        deadline = time.monotonic() + timeout
        for port in (self.odmr_port, self.smtp_port):
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError("odmrd exited with %s: %s" % (self.proc.returncode, self.log()[-2000:]))
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError("odmrd did not listen on %d" % port)
                    time.sleep(0.02)
        return self

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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        with open(self.log_path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")

    @property
    def spool_dir(self) -> str:
        return os.path.join(os.path.dirname(self.config), "spool")

    @property
    def users(self) -> str:
        return os.path.join(os.path.dirname(self.config), "users")


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


class Load:
    """Senders and an ATRN customer running against whatever daemon is up right now."""

    def __init__(self, daemon: Daemon, senders: int = 3):
        self.daemon = daemon
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

                def final(message, delivered=self.delivered):
                    delivered.extend(TOKEN.findall(message["data"]))   # stored, then 250
                    return "250 2.0.0 stored"
                script.final = final
                ReversedConnection(c, script).run()
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


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(str(tmp_path))
    accounts.add_user(d.users, "alice", ["example.org"], PASSWORD, True)
    yield d
    d.cleanup()


def test_kill_9_loses_nothing_acknowledged(daemon):
    seed = int(time.time())
    rng = random.Random(seed)
    kills = 6
    daemon.start()
    load = Load(daemon)
    load.start()
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 1.2))
            daemon.kill9()
            time.sleep(rng.uniform(0.0, 0.2))
            daemon.start()
        time.sleep(0.5)
        load.stop_sending.set()
        deadline = time.monotonic() + 20
        while queued_tokens(daemon.spool_dir, "example.org") and time.monotonic() < deadline:
            time.sleep(0.1)

    finally:
        load.join()
    assert daemon.term() == 0
    queued = set(queued_tokens(daemon.spool_dir, "example.org"))
    delivered = collections.Counter(load.delivered)
    acked = set(load.acked)
    context = "seed %d: %d acked, %d delivered, %d queued, %d ATRN sessions" % (
        seed, len(acked), len(delivered), len(queued), load.atrn_sessions)
    assert acked and delivered, context
    lost = acked - set(delivered) - queued
    assert not lost, "lost %s (%s)" % (sorted(lost)[:10], context)
    duplicates = sum(n - 1 for n in delivered.values())
    assert duplicates <= kills, context
    # the spool is clean after the last restart and the final graceful stop
    tmp = os.path.join(daemon.spool_dir, "example.org", "tmp")
    leftovers = [n for n in os.listdir(tmp) if not n.endswith(".done")] if os.path.isdir(tmp) else []
    assert leftovers == [], context
