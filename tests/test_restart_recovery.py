"""Restart recovery (SPEC §7): a restart cleans the spool's debris and keeps each
message's attempts, and a delivery cut off at the end of the grace period counts as an
attempt. The in-process provider, stopped and started again; real sockets on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import time

import pytest

from helpers import (ATRN_OK, Customer, PASSWORD, Provider, SENDER_REMOTE, Script, TOKEN, atrn, queue,
                     send_mail, spool, wait_for, wait_sessions_over)
from odmr import queue_commands
from odmr.spool import new_id


def deferred_once(p: Provider, reply: str) -> None:
    """One ATRN whose customer answers every RCPT with `reply`, over when it returns."""
    s = Script()
    s.rcpt = lambda a: reply
    assert atrn(p, s) == "quit"
    wait_sessions_over(p)


@pytest.mark.slow
def test_restart_cleans_debris_and_keeps_attempts(tmp_path):
    p = Provider(str(tmp_path))
    p.add_user("alice", ["example.org"])
    p.start()
    try:
        spool(p, ["u@example.org"], token="kept")
        deferred_once(p, "451 4.3.0 first failure")
    finally:
        p.stop()
    directory = os.path.join(p.spool_dir, "example.org")
    debris = [os.path.join(directory, "tmp", new_id()),
              os.path.join(directory, "tmp", new_id() + ".done"),
              os.path.join(directory, ".state.%s.abcd" % new_id()),
              os.path.join(directory, new_id() + ".state")]        # a state file without its message
    for path in debris:
        with open(path, "wb") as fh:
            fh.write(b"partial")
    [before] = json.loads(p.run_cli("queue", "list", "--json").stdout)
    assert before["attempts"] == 1 and before["last_error"].startswith("451 4.3.0 first failure")
    p.start()
    try:        # cleaned beside the first sessions, right after the start
        wait_for(lambda: [d for d in debris if os.path.exists(d)] == [], 10, "the debris to go")
        [record] = queue(p, "example.org")
        assert record["attempts"] == 1
        deferred_once(p, "452 4.2.2 second failure")
    finally:
        p.stop()
    p.start()
    try:
        [record] = json.loads(p.run_cli("queue", "list", "--json").stdout)
        assert record["attempts"] == 2 and record["last_error"].startswith("452 4.2.2")
        s = Script()
        assert atrn(p, s) == "quit"
        wait_sessions_over(p)
        assert TOKEN.findall(s.messages[0]["data"]) == [b"kept"]
    finally:
        p.stop()


@pytest.mark.slow
def test_delivery_cut_off_at_the_end_of_the_grace_period_counts_the_attempt(tmp_path):
    """SIGTERM's grace period runs out while a big message is still going to a slow
    customer: the connection is cut and the attempt recorded, as for a lost customer."""
    p = Provider(str(tmp_path), smtp_extra="max_message_size = 20M")
    p.add_user("alice", ["example.org"])
    p.start()
    stopped = False
    try:
        big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 8000          # 8 MB
        send_mail(p.smtp_port, SENDER_REMOTE, ["u@example.org"], big)
        c = Customer(p.odmr_port, timeout=30)
        try:
            c.login("alice", PASSWORD)
            c.send("ATRN example.org")
            assert c.line() == ATRN_OK
            c.send("220 slow.customer.test")
            assert c.line().startswith(b"EHLO")
            c.send("250-slow.customer.test\r\n250 PIPELINING")
            for expected in (b"MAIL", b"RCPT", b"DATA"):
                assert c.line().startswith(expected)
            c.send("250 ok\r\n250 ok\r\n354 go on")
            c.file.read(100000)                                  # then stop reading
            started = time.monotonic()
            left = p.service.stop(grace=0.5)
            stopped = True
            assert left == 1 and time.monotonic() - started < 5
        finally:
            c.close()
        records = [queue_commands.describe(m) for m in queue_commands.list_messages(p.service.runtime, "example.org")]
        [record] = records
        assert record["attempts"] == 1 and "connection" in record["last_error"], record
    finally:
        if not stopped:
            p.stop()
