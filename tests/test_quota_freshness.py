"""Quotas see other processes' changes: a domain emptied by `queue delete`
or another node's drain accepts mail again at once, and a count cached by one node
never lets another node's messages push the domain past its quota.

Two providers in this process share one spool, each with its own cache, as two
nodes would; `queue delete` runs as its own process."""
from __future__ import annotations

import smtplib
import time

import pytest

from helpers import Provider, rcpt_code

QUOTA = "[domains]\n[[example.org]]\nmax_messages = 3\n"


def store(p: Provider) -> None:
    with smtplib.SMTP("127.0.0.1", p.smtp_port, timeout=10) as c:
        c.sendmail("s@outside.test", ["u@example.org"], b"Subject: q\r\n\r\nhi\r\n")


@pytest.fixture
def node(tmp_path):
    p = Provider(str(tmp_path), sections=QUOTA)
    p.add_user("alice", ["example.org"])
    p.start()
    yield p
    p.stop()


@pytest.fixture
def second_node(node, tmp_path):
    """Another provider on the same spool (its root a link to the first one's, as an
    administrator may make it) with its own ports and cache: a second node."""
    import os
    import shutil
    os.makedirs(tmp_path / "b")
    os.symlink(node.spool_dir, tmp_path / "b" / "spool")
    other = Provider(str(tmp_path / "b"), sections=QUOTA)
    shutil.copy(node.users, other.users)
    other.start()
    yield other
    other.stop()


@pytest.mark.slow
def test_a_full_domain_accepts_again_as_soon_as_it_is_emptied(node):
    for _ in range(3):
        store(node)
    assert rcpt_code(node.smtp_port, "u@example.org") == 452
    victim = node.spooled("example.org")[0]
    assert node.run_cli("queue", "delete", victim).returncode == 0     # another process
    assert rcpt_code(node.smtp_port, "u@example.org") == 250                                       # not 30 s later


@pytest.mark.slow
def test_another_nodes_messages_count_at_once(node, second_node):
    store(node)
    store(node)
    assert rcpt_code(node.smtp_port, "u@example.org") == 250          # node's cache: 2 of 3
    store(second_node)                     # the third, by the other node
    assert len(node.spooled("example.org")) == 3
    assert rcpt_code(node.smtp_port, "u@example.org") == 452          # never a fourth on a cached count
    assert rcpt_code(second_node.smtp_port, "u@example.org") == 452


@pytest.mark.slow
def test_a_drain_by_another_node_frees_the_quota(node, second_node):
    for _ in range(3):
        store(node)
    assert rcpt_code(node.smtp_port, "u@example.org") == 452
    for msg_id in second_node.spooled("example.org"):
        message = second_node.spool.load("example.org", msg_id)
        second_node.spool.remove(message)  # as the other node's delivery retires them
    time.sleep(0.03)                       # (past the directory's clock tick)
    assert rcpt_code(node.smtp_port, "u@example.org") == 250


@pytest.mark.slow
def test_transactions_past_rcpt_together_never_exceed_the_quota(node, second_node):
    """Five transactions, on two nodes, all past RCPT before any DATA: the quota is
    checked again under a lock at the end of each DATA, so exactly three are kept."""
    clients = []
    for n in range(5):
        c = smtplib.SMTP("127.0.0.1", (node if n % 2 else second_node).smtp_port, timeout=10)
        c.ehlo("client.test")
        c.mail("s@outside.test")
        assert c.rcpt("u@example.org")[0] == 250
        clients.append(c)
    codes = []
    for c in clients:
        try:
            codes.append(c.data(b"Subject: q\r\n\r\nhi\r\n")[0])
        except smtplib.SMTPDataError as exc:
            codes.append(exc.smtp_code)
        c.close()
    assert sorted(codes) == [250, 250, 250, 452, 452], codes
    assert len(node.spooled("example.org")) == 3
