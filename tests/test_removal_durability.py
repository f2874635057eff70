"""Removals become durable (SPEC §7): delivery never runs more than
`queuemgr.MAX_UNSYNCED` removals ahead of the directory fsync that makes them durable.
The in-process provider and a raw customer on 127.0.0.1.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

from helpers import ATRN_OK, accept_all, send_mail
from odmr import queuemgr


@pytest.mark.slow
def test_removals_become_durable_within_a_small_window(provider, customer_factory, monkeypatch):
    """Power-loss bound: delivery never runs more than MAX_UNSYNCED removals ahead of
    the directory fsync that makes them durable (even with a slow disk)."""
    spool = provider.spool
    lock = threading.Lock()
    counts = {"retired": 0, "durable": 0, "worst": 0}
    real_retire, real_sync = spool.retire, spool.sync_domain

    def retire(*args, **kw):
        with lock:
            counts["retired"] += 1
            counts["worst"] = max(counts["worst"], counts["retired"] - counts["durable"])
        return real_retire(*args, **kw)

    def sync_domain(domain):
        with lock:
            covered = counts["retired"]
        time.sleep(0.3)                           # a slow disk
        real_sync(domain)
        with lock:
            counts["durable"] = max(counts["durable"], covered)
    monkeypatch.setattr(spool, "retire", retire)
    monkeypatch.setattr(spool, "sync_domain", sync_domain)
    total = 3 * queuemgr.MAX_UNSYNCED
    for i in range(total):
        send_mail(provider.smtp_port, "a@remote.test", ["u@example.org"], b"Subject: %d\r\n\r\nx\r\n" % i)
    c = customer_factory()
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.login()
    c.send("ATRN example.org")
    assert c.line() == ATRN_OK
    accept_all(c, total)
    assert counts["retired"] == total
    assert counts["durable"] == total             # all durable before the session ended
    assert counts["worst"] <= queuemgr.MAX_UNSYNCED + 1, counts
