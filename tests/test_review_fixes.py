"""Regression tests for problems found in review: envelope injection, DATA debris, tmp locks."""
from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, Customer, run_cli, send_mail
from odmr.spool import Envelope, Recipient, Spool, SpoolError


@pytest.mark.parametrize("rcpt", ['"x> NOTIFY=NEVER y"@example.org', "x\u2028y@example.org",
                                  "x\u0085y@example.org", "<x>@example.org", "x\\y@example.org"],
                         ids=["quoted-bracket", "line-separator", "nel", "brackets", "backslash"])
def test_recipient_that_could_break_the_envelope_is_refused(provider, rcpt):
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        s.ehlo()
        assert s.mail("a@remote.test", ["SMTPUTF8"])[0] == 250
        s.putcmd("RCPT", "TO:<%s>" % rcpt)
        code, _ = s.getreply()
        assert code in (501, 553)
    assert provider.spooled("example.org") == []


def test_quoted_local_part_with_space_round_trips(provider):
    send_mail(provider.smtp_port, "a@remote.test", ['"john smith"@example.org'], b"Subject: q\r\n\r\nx\r\n")
    (msg_id,) = provider.spooled("example.org")
    message = provider.spool.load("example.org", msg_id)
    assert [r.address for r in message.envelope.recipients] == ['"john smith"@example.org']


@pytest.mark.parametrize("args", [["-f", "x\nRecipient: <victim@evil.test>\nZ: \"@example.org", "u@example.org"],
                                  ["-f", "a@b.c\n\nX", "u@example.org"],
                                  ["-f", "a@b.c", "u@example.org\nRecipient: <v@evil.test>"]],
                         ids=["sender-injects-recipient", "sender-ends-envelope", "recipient-injects"])
def test_enqueue_refuses_envelope_injection(provider, args):
    r = run_cli("-c", provider.config, "enqueue", *args, input=b"Subject: x\n\nhi\n")
    assert r.returncode == 65, r.stderr
    assert b"Traceback" not in r.stderr
    assert provider.spooled("example.org") == []


def test_spool_refuses_unsafe_addresses(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.prepare()
    with pytest.raises(SpoolError):
        spool.store("example.org", Envelope("a@b.c", [Recipient("x>\ny@example.org")]), b"x\r\n")
    assert os.listdir(str(tmp_path / "spool" / "example.org" / "tmp")) == []


@pytest.mark.parametrize("how", ["close", "timeout"])
def test_client_vanishing_mid_data_leaves_nothing(tmp_path, how):
    from conftest import Provider
    p = Provider(str(tmp_path), smtp_extra="idle_timeout = 1s")
    p.add_user("alice", ["example.org"])
    p.start()
    try:
        c = Customer(p.smtp_port)
        c.reply()
        for line in ("EHLO x.test", "MAIL FROM:<a@remote.test>", "RCPT TO:<u@example.org>", "DATA"):
            assert c.cmd(line)[0] in (250, 354)
        c.sock.sendall(b"Subject: partial\r\n\r\n" + b"y" * 100000 + b"\r\n")
        if how == "close":
            c.close()
        else:
            c.sock.settimeout(10)
            assert c.reply()[0] == 421
        tmp = os.path.join(p.spool_dir, "example.org", "tmp")
        deadline = time.monotonic() + 10
        while os.listdir(tmp) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(tmp) == []
        assert p.spooled("example.org") == []
        c.close()
    finally:
        p.stop()


def test_prepare_leaves_a_live_writers_tmp_file_alone(tmp_path):
    """Another process (or node) is writing: its locked tmp file survives our start-up."""
    root = str(tmp_path / "spool")
    spool = Spool(root)
    spool.prepare()
    incoming = spool.begin({"example.org": Envelope("a@b.c", [Recipient("u@example.org")])})
    incoming.write(b"Subject: live\r\n\r\nbody\r\n")
    tmp_dir = os.path.join(root, "example.org", "tmp")
    debris = os.path.join(tmp_dir, "0000000000000deadbeef")
    with open(debris, "wb") as fh:
        fh.write(b"left by a crash")
    code = ("import sys; sys.path.insert(0, %r); from odmr.spool import Spool; "
            "print(Spool(%r).prepare())" % (ROOT, root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert out.stdout.strip() == b"1", out.stderr
    assert not os.path.exists(debris)
    assert len(os.listdir(tmp_dir)) == 1
    assert incoming.commit()
    assert len(spool.message_ids("example.org")) == 1


def test_print_key_still_works_while_the_config_is_broken(tmp_path):
    conf = tmp_path / "odmrd.conf"
    conf.write_text("pid_file = run/o.pid\ngrace_period = 7s\nbogus_key = 1\n[odmr]\nlisten = 127.0.0.1:1\n")
    r = run_cli("-c", str(conf), "check-config", "--print", "pid_file")
    assert r.returncode == 0 and r.stdout.decode().strip() == str(tmp_path / "run" / "o.pid")
    r = run_cli("-c", str(conf), "check-config", "--print", "grace_period")
    assert r.returncode == 0 and float(r.stdout) == 7.0
    r = run_cli("-c", str(conf), "check-config")
    assert r.returncode == 78 and b"bogus_key" in r.stderr
    conf.write_text("pid_file = run/o.pid\ngrace_period = soon\n")
    assert run_cli("-c", str(conf), "check-config", "--print", "grace_period").returncode == 78


def test_mbox_quotes_a_from_line_cut_between_pieces(tmp_path):
    from odmr.mailstore import Mbox
    box = Mbox(str(tmp_path / "mbox"))
    delivery = box.begin("a@b.c", b"Subject: x\n\n")
    for piece in (b"hello\nFr", b"om evil\n", b"From x\n>Fro", b"m y\nend\nFrom", b" z"):
        delivery.write(piece)
    delivery.commit()
    lines = (tmp_path / "mbox").read_bytes().split(b"\n")
    assert lines[0].startswith(b"From a@b.c ")
    assert lines[4:9] == [b">From evil", b">From x", b">>From y", b"end", b">From z"]
    assert sum(1 for line in lines if line.startswith(b"From ")) == 1


def test_mbox_append_interrupted_leaves_the_mailbox_as_it_was(tmp_path, monkeypatch):
    from odmr import mailstore
    path = tmp_path / "mbox"
    path.write_bytes(b"From old@x Sat Nov 28 10:00:00 2026\nSubject: old\n\nold body\n\n")
    before = path.read_bytes()
    delivery = mailstore.Mbox(str(path)).begin("a@b.c", b"Subject: new\n\n")
    delivery.write(b"line1\nline2\n" * 1000)
    calls = []

    def interrupted(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise KeyboardInterrupt()
        os.write(fd, data)
    monkeypatch.setattr(mailstore, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        delivery.commit()
    assert path.read_bytes() == before
    assert not os.path.exists(str(path) + ".lock")


@pytest.mark.parametrize("peer,address", [("::1", "::1"), ("[::1]:366", "::1"), ("127.0.0.1", "127.0.0.1"),
                                          ("127.0.0.1:366", "127.0.0.1")])
def test_local_delivery_peer_address(peer, address):
    from odmr.localdelivery import _address_only
    assert _address_only(peer) == address


def test_removals_become_durable_within_a_small_window(provider, customer_factory, monkeypatch):
    """Power-loss bound: delivery never runs more than MAX_UNSYNCED removals ahead of
    the directory fsync that makes them durable (even with a slow disk)."""
    import threading
    from odmr import delivery
    from test_tls import accept_all
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
    total = 3 * delivery.MAX_UNSYNCED
    for i in range(total):
        send_mail(provider.smtp_port, "a@remote.test", ["u@example.org"], b"Subject: %d\r\n\r\nx\r\n" % i)
    c = customer_factory()
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.login()
    c.send("ATRN example.org")
    assert c.line() == b"250 OK now reversing the connection\r\n"
    accept_all(c, total)
    assert counts["retired"] == total
    assert counts["durable"] == total             # all durable before the session ended
    assert counts["worst"] <= delivery.MAX_UNSYNCED + 1, counts


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7], ids=lambda n: "cut-%d" % n)
def test_data_split_anywhere_across_segments(provider, cut):
    """The bulk DATA reader and the per-line reader hand over at any byte."""
    body = b"Subject: split\r\n\r\n..stuffed\r\nplain\r\n.\r\n"  # ends with the terminator
    wire_data = body
    c = Customer(provider.smtp_port)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.reply()
    for line in ("EHLO x.test", "MAIL FROM:<a@remote.test>", "RCPT TO:<u@example.org>", "DATA"):
        c.cmd(line)
    for start in range(0, len(wire_data), cut):
        c.sock.sendall(wire_data[start:start + cut])
        time.sleep(0.002)
    assert c.reply()[0] == 250
    c.close()
    (msg_id,) = provider.spooled("example.org")
    stored = provider.spool.load("example.org", msg_id).read_data()
    assert stored.endswith(b"Subject: split\r\n\r\n.stuffed\r\nplain\r\n")


def test_domain_directory_removed_behind_the_daemons_back_is_recreated(provider):
    import shutil
    send_mail(provider.smtp_port, "a@remote.test", ["u@example.net"], b"Subject: 1\r\n\r\nx\r\n")
    shutil.rmtree(os.path.join(provider.spool_dir, "example.net"))
    send_mail(provider.smtp_port, "a@remote.test", ["u@example.net"], b"Subject: 2\r\n\r\nx\r\n")
    assert len(provider.spooled("example.net")) == 1


# -- third review: sessions see users-file edits made after they began -------------

def _until_reloaded(provider, what) -> None:
    deadline = time.monotonic() + 10
    while not what(provider.service.runtime):
        assert time.monotonic() < deadline, "the users file edit was never picked up"
        time.sleep(0.1)


def test_atrn_after_the_account_was_deleted_is_refused(provider):
    from odmr import accounts
    send_mail(provider.smtp_port, "a@remote.test", ["u@example.net"], b"Subject: kept\r\n\r\nx\r\n")
    c = Customer(provider.odmr_port)
    try:
        c.login("bob")
        accounts.delete_user(provider.users, "bob")
        _until_reloaded(provider, lambda rt: rt.accounts.get("bob") is None)
        code, lines = c.cmd("ATRN example.net")
        assert code == 450, lines
    finally:
        c.close()
    assert len(list(provider.spool.messages("example.net"))) == 1     # not delivered to anyone


def test_atrn_for_a_domain_taken_away_since_auth_is_refused(provider):
    from odmr import accounts
    c = Customer(provider.odmr_port)
    try:
        c.login("alice")
        accounts.delete_user(provider.users, "alice")
        accounts.add_user(provider.users, "alice", ["example.com"], "another password")
        _until_reloaded(provider, lambda rt: rt.accounts.get("alice") is not None
                        and list(rt.accounts.get("alice").domains) == ["example.com"])
        assert c.cmd("ATRN example.org")[0] == 450
        assert c.cmd("ATRN example.com")[0] == 453            # still hers: nothing waiting
    finally:
        c.close()


def test_open_intake_session_stops_accepting_a_domain_no_longer_hosted(provider):
    from odmr import accounts
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        s.ehlo("sender.test")
        s.mail("a@remote.test")
        assert s.rcpt("u@example.net")[0] == 250
        s.rset()
        accounts.delete_user(provider.users, "bob")
        _until_reloaded(provider, lambda rt: "example.net" not in rt.hosted_domains())
        s.mail("a@remote.test")
        code, text = s.rcpt("u@example.net")
        assert code == 550 and b"5.7.1" in text


# -- third review: check-config refuses what serve would refuse ---------------------

def _check(tmp_path, extra: str = "", sections: str = "", odmr_extra: str = ""):
    from conftest import write_config
    from odmr import accounts
    path = write_config(str(tmp_path), 1, 2, extra=extra, sections=sections, odmr_extra=odmr_extra)
    if not os.path.exists(os.path.join(str(tmp_path), "users")):
        accounts.add_user(os.path.join(str(tmp_path), "users"), "alice", ["example.org"], "pw")
    return run_cli("-c", path, "check-config"), path


@pytest.mark.parametrize("extra, sections, odmr_extra, expected", [
    ("", "[tls]\ncert_file = nocert.pem\nkey_file = nokey.pem", "", "[tls] cannot load"),
    ("", "[tls]\ncert_file = nocert.pem", "", "[tls] cert_file and key_file must both be set"),
    ("", "[tls]\nclient_ca_file = ca.pem", "", "client_ca_file needs cert_file and key_file"),
    ("", "", "tls_listen = 127.0.0.1:3", "implicit TLS listener needs"),
    ("user = no-such-account-here", "", "", "does not exist"),
    ("", "[queue]\nbounce_relay = 127.0.0.1:99999", "", "bounce_relay"),
    ("", "[queue]\nbounce_relay = relay.test:0", "", "bounce_relay"),
    ("", "", "", None),
], ids=["cert-missing", "key-unset", "ca-alone", "tls-listener", "user", "relay-port", "relay-port0",
        "fine"])
def test_check_config_finds_what_serve_would_refuse(tmp_path, extra, sections, odmr_extra, expected):
    r, path = _check(tmp_path, extra, sections, odmr_extra)
    if expected is None:
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 78, r.stdout + r.stderr
    lines = r.stderr.decode().strip().splitlines()
    assert lines and all(l.startswith("odmrd: ") for l in lines)
    assert any(expected in l for l in lines), lines
    assert b"Traceback" not in r.stderr
    # and serve, asked to start on it, says the same instead of starting
    s = run_cli("-c", path, "serve", "-f", timeout=20)
    assert s.returncode == 78 and b"Traceback" not in s.stderr


def test_check_config_refuses_a_hostname_that_is_no_host_name(tmp_path):
    from conftest import write_config
    path = write_config(str(tmp_path), 1, 2)
    with open(path) as fh:
        text = fh.read().replace("hostname = odmr.test", "hostname = bad host name")
    with open(path, "w") as fh:
        fh.write(text)
    r = run_cli("-c", path, "check-config")
    assert r.returncode == 78 and b"hostname (line 1): not a host name" in r.stderr


def test_duplicate_key_error_names_the_key_once(tmp_path):
    path = tmp_path / "odmrd.conf"
    path.write_text("hostname = a.test\nhostname = b.test\n")
    r = run_cli("-c", str(path), "check-config")
    [line] = r.stderr.decode().strip().splitlines()
    assert r.returncode == 78
    assert line.count(str(path)) == 1 and "line 2" in line and "hostname = b.test" in line


@pytest.mark.parametrize("command", [["user", "add", "carol", "--domain", "c.test"],
                                     ["user", "passwd", "alice"]])
def test_user_password_without_a_terminal_is_one_line_not_a_traceback(provider, command):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "odmrd.py"), "-c", provider.config] + command,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30, start_new_session=True)
    assert r.returncode == 64
    assert r.stderr.decode().strip().splitlines() == [
        "odmrd: no terminal to ask for the password on: use --password-stdin"]


def test_intake_connections_are_logged(provider, caplog):
    import logging
    with caplog.at_level(logging.INFO):
        with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
            s.ehlo("probe.test")
            port = s.sock.getsockname()[1]
        deadline = time.monotonic() + 5
        while not any("smtp: connect from 127.0.0.1:%d" % port in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)


@pytest.mark.skipif(os.geteuid() != 0, reason="the root-only refusal")
def test_check_config_as_root_refuses_what_serve_refuses_as_root(tmp_path):
    from odmr import accounts
    path = tmp_path / "odmrd.conf"
    path.write_text("hostname = odmr.test\n")
    accounts.add_user(str(tmp_path / "users"), "alice", ["example.org"], "pw")
    r = run_cli("-c", str(path), "check-config")
    assert r.returncode == 78 and b"refusing to run as root" in r.stderr


def test_queue_list_changes_nothing_even_with_a_corrupt_file(provider):
    from odmr.spool import new_id
    send_mail(provider.smtp_port, "a@remote.test", ["u@example.org"], b"Subject: good\r\n\r\nx\r\n")
    bad = new_id()
    path = os.path.join(provider.spool_dir, "example.org", bad)
    with open(path, "wb") as fh:
        fh.write(b"not a spool file\n\n")
    r = provider.run_cli("queue", "list", "--json")
    assert r.returncode == 0, r.stderr
    import json
    assert [m["recipients"] for m in json.loads(r.stdout)] == [["u@example.org"]]
    assert os.path.exists(path)                                   # still where it was
    assert not os.path.exists(os.path.join(provider.spool_dir, ".quarantine"))
    assert b"corrupt" in r.stderr


def test_queue_show_bounce_delete_of_a_corrupt_file(provider):
    from odmr.spool import new_id
    bad = new_id()
    path = os.path.join(provider.spool_dir, "example.org", bad)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"not a spool file\n\n")
    for action in ("show", "bounce"):
        r = provider.run_cli("queue", action, bad)
        assert r.returncode == 65, (action, r.stderr)
        [line] = r.stderr.decode().strip().splitlines()
        assert "example.org/%s: corrupt spool file" % bad in line and "queue delete" in line
        assert os.path.exists(path)
    r = provider.run_cli("queue", "delete", bad)
    assert r.returncode == 0 and b"deleted" in r.stdout, r.stderr
    assert not os.path.exists(path)
