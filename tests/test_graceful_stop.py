"""A graceful stop (SPEC §8): SIGTERM lets the transaction and the message in flight
finish, refuses new connections, and does not wait out the grace period for idle sessions.

Real daemons (`odmrd serve -f` subprocesses); every peer is a real socket on 127.0.0.1.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from typing import List

import pytest

from helpers import (ATRN_OK, Customer, Daemon, PASSWORD, ReversedConnection, SENDER_HOSTED, Script, TOKEN,
                     queued_tokens, refused, send_mail, wait_for)
from odmr import accounts


def tmp_debris(spool_dir: str) -> List[str]:
    found = []
    for dirpath, _, files in os.walk(spool_dir):
        if os.path.basename(dirpath) == "tmp":
            found += [os.path.join(dirpath, f) for f in files]
        found += [os.path.join(dirpath, f) for f in files if f.startswith((".state.", ".tmp."))]
    return found


def reply_of(sock_file) -> int:
    while True:
        line = sock_file.readline()
        if not line:
            raise EOFError
        if line[3:4] != b"-":
            return int(line[:3])


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(str(tmp_path), extra="grace_period = 8s")
    accounts.add_user(d.users, "alice", ["example.org"], PASSWORD, True)
    accounts.add_user(d.users, "bob", ["example.net"], PASSWORD, True)
    yield d
    d.cleanup()


@pytest.mark.slow
def test_sigterm_lets_the_transaction_in_flight_finish(daemon):
    daemon.start()
    s = socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=10)
    f = s.makefile("rb")
    try:
        assert reply_of(f) == 220
        for command, code in ((b"EHLO client.test", 250), (b"MAIL FROM:<a@remote.test>", 250),
                              (b"RCPT TO:<u@example.org>", 250), (b"DATA", 354)):
            s.sendall(command + b"\r\n")
            assert reply_of(f) == code
        s.sendall(b"Subject: in flight\r\nX-Token: inflight\r\n\r\nfirst half\r\n")
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: refused(daemon.smtp_port), 15, "the listener to close")   # no longer accepting
        assert daemon.proc.poll() is None                      # but still finishing our transaction
        s.sendall(b"second half\r\n.\r\n")
        assert reply_of(f) == 250
        s.sendall(b"QUIT\r\n")
        assert reply_of(f) == 221
    finally:
        f.close()
        s.close()
    started = time.monotonic()
    assert daemon.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    assert queued_tokens(daemon.spool_dir, "example.org") == [b"inflight"]
    assert tmp_debris(daemon.spool_dir) == []


@pytest.mark.slow
def test_sigterm_during_atrn_finishes_the_message_then_quits(daemon):
    daemon.start()
    for n in range(6):
        send_mail(daemon.smtp_port, SENDER_HOSTED, ["u@example.org"],
                  b"Subject: %d\r\nX-Token: t%d\r\n\r\nbody\r\n" % (n, n))
    c = Customer(daemon.odmr_port, timeout=10)
    got: List[bytes] = []

    def final(message):
        got.extend(TOKEN.findall(message["data"]))
        if len(got) == 1:
            daemon.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)                                    # the provider waits for this reply
        return "250 2.0.0 stored"

    try:
        c.login("alice", PASSWORD)
        c.send("ATRN example.org")
        assert c.line() == ATRN_OK
        script = Script()
        script.final = final
        assert ReversedConnection(c, script).run() == "quit"
    finally:
        c.close()
    assert daemon.proc.wait(10) == 0
    # what was answered 250 is gone, the rest waits; at most the one pipelined behind it went through
    left = queued_tokens(daemon.spool_dir, "example.org")
    assert 1 <= len(got) <= 2
    assert sorted(got + left) == sorted(b"t%d" % n for n in range(6))
    assert tmp_debris(daemon.spool_dir) == []


@pytest.mark.slow
def test_idle_sessions_do_not_hold_the_stop_for_the_whole_grace_period(daemon):
    daemon.start()
    idle = Customer(daemon.odmr_port, timeout=10)
    try:
        assert idle.reply()[0] == 220
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(15) == 0
        elapsed = time.monotonic() - started
    finally:
        idle.close()
    assert elapsed < 4, "stop took %.1f s with one idle session (grace period 8 s)" % elapsed
