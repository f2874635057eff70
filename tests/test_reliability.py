"""Never lose mail: graceful stop, bounces and the bounce relay, expiry, two
processes on one spool, damaged spool files, restart recovery (SPEC §7, §8).

Real daemons (`odmrd serve -f` subprocesses) where process behaviour matters,
the in-process provider elsewhere; every peer is a real socket on 127.0.0.1.
"""
from __future__ import annotations

import collections
import email
import json
import logging
import os
import signal
import smtplib
import socket
import threading
import time
from typing import List, Optional

import pytest

from helpers import (ATRN_OK, Customer, Daemon, PASSWORD, Provider, ScriptedMTA, ReversedConnection,
                     SENDER_HOSTED, SENDER_REMOTE, Script, TOKEN, atrn, dsns, queue, queue_provider,
                     queued_tokens, relay_provider, report_fields, run_cli, send_mail, spool,
                     wait_sessions_over)
from odmr import accounts, bounce_relay, delivery, queue_commands
from odmr.spool import MAGIC, new_id


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


def is_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(2)
            try:
                return s.recv(100) in (b"",) or s.recv(100) == b""
            except OSError:
                return True
    except OSError:
        return True


# -- graceful stop -------------------------------------------------------------------

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
        time.sleep(0.5)
        assert daemon.proc.poll() is None                      # still finishing our transaction
        assert is_refused(daemon.smtp_port)                    # but no longer accepting
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


# -- bounces and the bounce relay --------------------------------------------------------


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.slow
@pytest.mark.parametrize("refusals", [["greeting:421 4.3.2 not now", "rcpt:451 4.3.0 later"], []],
                         ids=["refused-twice-then-accepted", "accepted"])
def test_bounce_for_outside_sender_goes_to_the_relay_with_retries(tmp_path, fast_maintenance, refusals):
    sink = ScriptedMTA(refusals)
    p = relay_provider(tmp_path, sink)
    try:
        spool(p, ["u@example.org"], sender=SENDER_REMOTE, token="tok1")
        s = Script()
        s.rcpt = lambda a: "550 5.1.1 no such user"
        assert atrn(p, s) == "quit"
        wait_sessions_over(p)
        assert queue(p, "example.org") == []
        assert wait_for(lambda: sink.messages, 15), "relay never got the bounce"
        [relayed] = sink.messages
        assert relayed["mail"].upper().split()[:2] == ["MAIL", "FROM:<>"]
        assert relayed["rcpts"] == [SENDER_REMOTE]
        dsn = email.message_from_bytes(relayed["data"])
        [fields] = report_fields(dsn)
        assert fields["action"] == "failed" and fields["status"] == "5.1.1"
        assert b"tok1" in relayed["data"]                        # the original headers come back
        assert sink.connections >= len(refusals) + 1
        assert wait_for(lambda: queue(p) == [], 5)
    finally:
        p.stop()
        sink.close()


@pytest.mark.slow
def test_relay_refusing_a_bounce_for_good_drops_it_never_bounces_it(tmp_path, fast_maintenance, caplog):
    sink = ScriptedMTA(["rcpt:550 5.1.1 no such sender"] * 5)
    p = relay_provider(tmp_path, sink)
    try:
        spool(p, ["u@example.org"], sender=SENDER_REMOTE)
        s = Script()
        s.rcpt = lambda a: "550 5.1.1 no"
        with caplog.at_level(logging.ERROR, logger="odmrd.maintenance"):
            assert atrn(p, s) == "quit"
            wait_sessions_over(p)
            assert wait_for(lambda: queue(p) == [] and sink.connections >= 1, 10)
        assert sink.messages == []
        assert any("never bounced" in r.getMessage() for r in caplog.records)
        assert not any(os.listdir(os.path.join(p.spool_dir, d)) for d in ("example.net",)
                       if os.path.isdir(os.path.join(p.spool_dir, d)))
    finally:
        p.stop()
        sink.close()


def test_relay_backoff_grows(fast_maintenance):
    assert bounce_relay.relay_delay(0) == 0
    assert bounce_relay.relay_delay(1) < bounce_relay.relay_delay(2) < bounce_relay.relay_delay(3)
    assert bounce_relay.relay_delay(50) == bounce_relay.RELAY_BACKOFF_MAX


def to_postmaster(provider: Provider, notify: str = "") -> None:
    """bob's mail to the bare postmaster (odmr.test is not hosted: it waits in OUTBOUND)."""
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as c:
        c.sendmail(SENDER_HOSTED, ["postmaster"], b"Subject: to the postmaster\r\n\r\nhi\r\n",
                   rcpt_options=["NOTIFY=" + notify] if notify else [])


@pytest.mark.parametrize("notify, notices", [("NEVER", 0), ("FAILURE", 1), ("", 1)])
def test_relay_refusal_notifies_the_sender_as_notify_asks(tmp_path, fast_maintenance, notify,
                                                          notices):
    """A refusal by the bounce relay is recorded as a customer's is: RFC 3461 NOTIFY=NEVER
    means no DSN, whoever refused."""
    sink = ScriptedMTA(["rcpt:550 5.1.1 no such mailbox"] * 50)
    p = relay_provider(tmp_path, sink)
    try:
        to_postmaster(p, notify)
        assert wait_for(lambda: sink.connections >= 1 and queue(p, ".outbound") == [], 10)
        assert len([d for d in dsns(p) if report_fields(d)[0]["action"] == "failed"]) == notices
        assert sink.messages == []
    finally:
        p.stop()
        sink.close()


@pytest.mark.parametrize("code", ["451 4.3.0", "550 5.1.1"])
def test_relay_replies_are_stored_and_quoted_escaped(tmp_path, fast_maintenance, caplog, code):
    """A control character in the relay's reply reaches neither `queue list`, nor the
    log, nor the DSN: it is escaped as a customer's reply is."""
    sink = ScriptedMTA(["rcpt:%s \x1b[31mno\x07" % code] * 50)
    p = relay_provider(tmp_path, sink)
    try:
        with caplog.at_level(logging.INFO, logger="odmrd"):
            to_postmaster(p)
            if code.startswith("4"):
                assert wait_for(lambda: [m["attempts"] for m in queue(p, ".outbound")] >= [1], 10)
                [waiting] = queue(p, ".outbound")
                assert waiting["last_error"] == code + " \\x1b[31mno\\x07"
            else:
                assert wait_for(lambda: queue(p, ".outbound") == [] and dsns(p), 10)
                [dsn] = dsns(p)
                assert "\\x1b[31mno" in dsn.as_string() and "\x1b" not in dsn.as_string()
        logged = [r.getMessage() for r in caplog.records if "relay" in r.getMessage()]
        assert logged and not any("\x1b" in line for line in logged)
    finally:
        p.stop()
        sink.close()


def test_relay_refusal_whose_dsn_cannot_be_queued_keeps_the_message(tmp_path, fast_maintenance,
                                                                     caplog):
    """The postmaster's mail refused for good by the relay, and the sender's DSN cannot be
    spooled (a file stands where bob's domain directory belongs): the message stays in
    OUTBOUND, its failure recorded, until the DSN can be queued; the notice is never lost."""
    sink = ScriptedMTA(["rcpt:550 5.1.1 no such mailbox"])
    p = relay_provider(tmp_path, sink)
    blocker = os.path.join(p.spool_dir, "example.net")
    try:
        with open(blocker, "w") as fh:
            fh.write("not a directory\n")
        with caplog.at_level(logging.ERROR, logger="odmrd"):
            to_postmaster(p)
            assert wait_for(lambda: any("cannot queue" in r.getMessage()
                                        for r in caplog.records), 10)
        [kept] = queue(p, ".outbound")
        assert kept["recipients"] == [] and kept["last_error"].startswith("550 5.1.1")
        os.remove(blocker)
        assert wait_for(lambda: queue(p, ".outbound") == [] and dsns(p), 10)
        [dsn] = dsns(p)
        [fields] = report_fields(dsn)
        assert fields["action"] == "failed" and fields["status"] == "5.1.1"
        assert sink.connections == 1                # the relay was not asked again
    finally:
        if os.path.isfile(blocker):
            os.remove(blocker)
        p.stop()
        sink.close()


def test_delay_notice_once_per_message_only_when_warn_after_is_set(tmp_path):
    p = queue_provider(tmp_path, "warn_after = 4h\nmax_age = 5d")
    try:
        spool(p, ["u@example.org"], token="late")
        m = p.service.maintenance
        assert m.run_once(now=time.time() + 3600).get("warned") == 0
        assert m.run_once(now=time.time() + 5 * 3600)["warned"] == 1
        assert m.run_once(now=time.time() + 6 * 3600)["warned"] == 0
        [dsn] = dsns(p)
        [fields] = report_fields(dsn)
        assert fields["action"] == "delayed" and fields["status"] == "4.4.1"
        assert fields["diagnostic-code"].startswith("smtp; 451 4.4.1 waiting")
        assert "Delayed" in dsn["Subject"]
        [record] = queue(p, "example.org")                # the message itself still waits
        assert record["recipients"] == ["u@example.org"]
    finally:
        p.stop()


@pytest.mark.slow
def test_waiting_recipient_is_described_by_its_own_error_not_anothers(tmp_path):
    """r1 refused for good (550), r2 deferred (451): the queue, the delay notice and the
    expiry DSN for r2 all speak of r2's 451, never of r1's 550."""
    p = queue_provider(tmp_path, "warn_after = 1h\nmax_age = 5d")
    try:
        spool(p, ["r1@example.org", "r2@example.org"], token="mixed")
        s = Script()
        s.rcpt = lambda a: "550 5.1.1 no such user r1" if a.startswith("r1") else "451 4.3.0 try later r2"
        assert atrn(p, s) == "quit"
        wait_sessions_over(p)
        [record] = queue(p, "example.org")
        assert record["recipients"] == ["r2@example.org"]
        assert record["last_error"].startswith("451 4.3.0")
        [bounce] = dsns(p)                             # r1's 550 was returned at once
        assert report_fields(bounce)[0]["status"] == "5.1.1"
        for old in list(p.spool.messages("example.net")):
            p.spool.remove(old)
        m = p.service.maintenance
        assert m.run_once(now=time.time() + 2 * 3600)["warned"] == 1
        [delay] = dsns(p)
        [fields] = report_fields(delay)
        assert fields["action"] == "delayed" and fields["status"] == "4.3.0"
        assert "r2" in fields["diagnostic-code"] and "r1" not in fields["diagnostic-code"]
    finally:
        p.stop()


def test_no_delay_notice_by_default(provider):
    spool(provider, ["u@example.org"])
    counts = provider.service.maintenance.run_once(now=time.time() + 9 * 86400)
    assert "warned" not in counts
    assert dsns(provider) == []


def test_maintenance_expires_old_mail_with_dsn(provider):
    spool(provider, ["u@example.org"], token="old")
    counts = provider.service.maintenance.run_once(now=time.time() + 11 * 86400)
    assert counts["expired"] == 1
    assert queue(provider, "example.org") == []
    [dsn] = dsns(provider)
    assert report_fields(dsn)[0]["status"] == "5.4.7"


# -- queue bounce / queue expire, end to end through the command line ------------------------

@pytest.mark.slow
def test_cli_queue_bounce(provider):
    spool(provider, ["u@example.org", "v@example.org"], token="cli")
    [record] = queue(provider, "example.org")
    result = provider.run_cli("queue", "bounce", record["id"])
    assert result.returncode == 0, result.stderr
    assert queue(provider, "example.org") == []
    [dsn] = dsns(provider)
    assert sorted(f["final-recipient"] for f in report_fields(dsn)) == \
        ["rfc822; u@example.org", "rfc822; v@example.org"]
    listing = json.loads(provider.run_cli("queue", "list", "--json").stdout)
    assert [r["domain"] for r in listing] == ["example.net"]


@pytest.mark.slow
def test_cli_queue_expire(tmp_path):
    p = queue_provider(tmp_path, "max_age = 1s")
    try:
        spool(p, ["u@example.org"], token="exp")
        time.sleep(1.2)
        result = p.run_cli("queue", "expire")
        assert result.returncode == 0, result.stderr
        assert b"1 expired" in result.stdout
        assert queue(p, "example.org") == []
        [dsn] = dsns(p)
        assert report_fields(dsn)[0]["status"] == "5.4.7"
    finally:
        p.stop()


# -- two processes, one spool -------------------------------------------------------------

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
    assert wait_for(lambda: delivered, 10)
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
    spool_more = [send_mail(a.smtp_port, SENDER_REMOTE, ["u@example.org"],
                            b"X-Token: more%d\r\n\r\nx\r\n" % n) for n in range(10)]
    for r in racers:
        r.start()
    for r in racers:
        r.join(60)
    counts = collections.Counter(delivered)
    assert [t for t, n in counts.items() if n > 1] == []
    assert len(counts) + len(queued_tokens(a.spool_dir, "example.org")) == 40
    assert a.term() == 0 and b.term() == 0


# -- damaged spool files --------------------------------------------------------------------

@pytest.mark.slow
def test_corrupt_and_truncated_files_are_quarantined_not_fatal(provider, caplog):
    directory = os.path.join(provider.spool_dir, "example.org")
    spool(provider, ["u@example.org"], token="good1")
    garbage, truncated, hollow = new_id(), new_id(), new_id()
    with open(os.path.join(directory, garbage), "wb") as fh:
        fh.write(b"\x00\xffthis is not a spool file\r\n\r\n")
    with open(os.path.join(directory, truncated), "wb") as fh:
        fh.write(MAGIC + b"Id: " + truncated.encode() + b"\nArrival: 1.0\nSender: <a@b.test>\nRecip")
    os.mkdir(os.path.join(directory, hollow))                 # a name that cannot be read at all
    spool(provider, ["v@example.org"], token="good2")
    with caplog.at_level(logging.WARNING):
        s = Script()
        assert atrn(provider, s) == "quit"
        wait_sessions_over(provider)
    assert sorted(TOKEN.findall(b"".join(m["data"] for m in s.messages))) == [b"good1", b"good2"]
    quarantine = os.path.join(provider.spool_dir, ".quarantine", "example.org")
    assert sorted(os.listdir(quarantine)) == sorted([garbage, truncated, hollow])
    assert sum("quarantined" in r.getMessage() for r in caplog.records) == 3
    assert not os.path.exists(os.path.join(directory, hollow))
    # the domain is not blocked: new mail still flows, and the CLI copes
    spool(provider, ["w@example.org"], token="good3")
    s2 = Script()
    assert atrn(provider, s2) == "quit"
    wait_sessions_over(provider)
    assert TOKEN.findall(s2.messages[0]["data"]) == [b"good3"]
    result = provider.run_cli("queue", "list", "--json")
    assert result.returncode == 0 and b"Traceback" not in result.stderr


# -- restart recovery -----------------------------------------------------------------------

@pytest.mark.slow
def test_restart_cleans_debris_and_keeps_attempts(tmp_path):
    p = Provider(str(tmp_path))
    p.add_user("alice", ["example.org"])
    p.start()
    try:
        spool(p, ["u@example.org"], token="kept")
        s = Script()
        s.rcpt = lambda a: "451 4.3.0 first failure"
        assert atrn(p, s) == "quit"
        wait_sessions_over(p)
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
    try:
        assert [d for d in debris if os.path.exists(d)] == []
        [record] = queue(p, "example.org")
        assert record["attempts"] == 1
        s = Script()
        s.rcpt = lambda a: "452 4.2.2 second failure"
        assert atrn(p, s) == "quit"
        wait_sessions_over(p)
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


# -- removals become durable ---------------------------------------------------------------

@pytest.mark.slow
def test_removals_become_durable_within_a_small_window(provider, customer_factory, monkeypatch):
    """Power-loss bound: delivery never runs more than MAX_UNSYNCED removals ahead of
    the directory fsync that makes them durable (even with a slow disk)."""
    import threading
    from odmr import queuemgr
    from helpers import accept_all
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
