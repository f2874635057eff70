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
import time

import pytest

from helpers import Daemon, Load, PASSWORD, queued_tokens
from odmr import accounts

pytestmark = pytest.mark.slow                   # kill -9 loops


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(str(tmp_path))
    accounts.add_user(d.users, "alice", ["example.org"], PASSWORD, True)
    yield d
    d.cleanup()


def test_kill_9_loses_nothing_acknowledged(daemon):
    _kill_loop(daemon, Load(daemon), kills=6, in_flight=1)


WINDOW = 4


@pytest.fixture
def windowed_daemon(tmp_path):
    d = Daemon(str(tmp_path), odmr_extra="delivery_window = %d" % WINDOW)
    accounts.add_user(d.users, "alice", ["example.org"], PASSWORD, True)
    yield d
    d.cleanup()


def test_kill_9_with_a_delivery_window_redelivers_at_most_the_window(windowed_daemon):
    """SPEC §7: with `delivery_window = N` a crash re-delivers at most N messages."""
    load = Load(windowed_daemon, extensions=["PIPELINING", "CHUNKING", "8BITMIME", "SIZE 50000000"])
    _kill_loop(windowed_daemon, load, kills=5, in_flight=WINDOW)
    assert load.bdat_sessions > 0                    # the window (BDAT) was in use


def _kill_loop(daemon: Daemon, load: Load, kills: int, in_flight: int) -> None:
    """kill -9 the daemon `kills` times under load: nothing acknowledged is lost, and
    each kill re-delivers at most `in_flight` messages."""
    seed = int(time.time())
    rng = random.Random(seed)
    daemon.start()
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
    assert duplicates <= kills * in_flight, context
    # the spool is clean after the last restart and the final graceful stop
    tmp = os.path.join(daemon.spool_dir, "example.org", "tmp")
    leftovers = [n for n in os.listdir(tmp) if not n.endswith(".done")] if os.path.isdir(tmp) else []
    assert leftovers == [], context
