"""Two processes on one spool (SPEC §7): a domain is never delivered twice, however the
two daemons race for it. Real daemons (`odmrd serve -f` subprocesses) on 127.0.0.1.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import List

import pytest

from helpers import (ATRN_OK, Customer, Daemon, PASSWORD, ReversedConnection, SENDER_REMOTE, Script, TOKEN,
                     eventually, queued_tokens, send_mail)
from odmr import accounts


@pytest.fixture
def twin_daemons(tmp_path):
    a = Daemon(str(tmp_path), name="a")
    accounts.add_user(a.users, "alice", ["example.org"], PASSWORD, True)
    b = Daemon(str(tmp_path), name="b")
    os.makedirs(a.spool_dir, mode=0o700, exist_ok=True)
    os.symlink(a.spool_dir, b.spool_dir)
    os.symlink(a.users, b.users)
    yield a, b
    a.cleanup()
    b.cleanup()


@pytest.mark.slow
def test_two_processes_never_deliver_a_domain_twice(twin_daemons):
    a, b = twin_daemons
    a.start()
    b.start()
    for n in range(30):
        send_mail((a if n % 2 else b).smtp_port, SENDER_REMOTE, ["u@example.org"],
                  b"Subject: %d\r\nX-Token: twin%d\r\n\r\nbody\r\n" % (n, n))
    # a slow customer on A holds example.org; B must answer 451
    release = threading.Event()
    delivered: List[bytes] = []
    busy_codes = []

    def slow_final(message):
        delivered.extend(TOKEN.findall(message["data"]))
        release.wait(10)
        return "250 ok"

    def collect(port: int, script: Script, out: list) -> None:
        c = Customer(port, timeout=15)
        try:
            c.login("alice", PASSWORD)
            c.send("ATRN example.org")
            line = c.line()
            out.append(line[:3])
            if line == ATRN_OK:
                ReversedConnection(c, script).run()
        finally:
            c.close()

    first = Script()
    first.final = slow_final
    codes_a: list = []
    t = threading.Thread(target=collect, args=(a.odmr_port, first, codes_a), daemon=True)
    t.start()
    assert eventually(lambda: delivered, 10)
    collect(b.odmr_port, Script(), busy_codes)
    assert busy_codes == [b"451"]
    release.set()
    t.join(20)
    assert codes_a == [b"250"]
    # now both race for the rest, repeatedly
    def racer(port):
        for _ in range(5):
            s = Script()
            s.final = lambda m: (delivered.extend(TOKEN.findall(m["data"])), "250 ok")[1]
            collect(port, s, [])
    racers = [threading.Thread(target=racer, args=(port,)) for port in (a.odmr_port, b.odmr_port)]
    for n in range(10):                                # ten more, sent while the racers wait to start
        send_mail(a.smtp_port, SENDER_REMOTE, ["u@example.org"], b"X-Token: more%d\r\n\r\nx\r\n" % n)
    for r in racers:
        r.start()
    for r in racers:
        r.join(60)
    counts = collections.Counter(delivered)
    assert [t for t, n in counts.items() if n > 1] == []
    assert len(counts) + len(queued_tokens(a.spool_dir, "example.org")) == 40
    assert a.term() == 0 and b.term() == 0
