"""Resource edges (issue 9, item 7): a DATA phase cannot last forever, a
provider cannot fill the customer's disk, and no peer-supplied character can
break or disguise a log line. Real sockets, real servers, real clients."""
from __future__ import annotations

import base64
import email
import json
import logging
import os
import select
import shutil
import signal
import socket
import ssl
import time

import pytest
from hypothesis import given, strategies as st

from helpers import (Customer, EX_OK, EX_USAGE, Peer, Provider, alive, err, free_port, run_cli, run_fetch,
                     scripted_args, send_mail, wait_for, write_config)

SENDER = "trickler@remote.test"


# -- [smtp] max_data_time -----------------------------------------------------------

def data_provider(tmp_path, smtp_extra: str = "max_data_time = 2s\nidle_timeout = 5s",
                  sections: str = "") -> Provider:
    os.makedirs(str(tmp_path), exist_ok=True)
    p = Provider(str(tmp_path), smtp_extra=smtp_extra, sections=sections)
    p.add_user("alice", ["example.org"])
    return p.start()


def open_data(c: Customer, tls_context=None) -> Customer:
    """Greeting, EHLO (and STARTTLS), MAIL, RCPT, DATA -> 354."""
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    if tls_context is not None:
        assert c.cmd("STARTTLS")[0] == 220
        c.sock = tls_context.wrap_socket(c.sock, server_hostname="odmr.test")
        c.file = c.sock.makefile("rb")
        assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    assert c.cmd("RCPT TO:<user@example.org>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    return c


def trickle(c: Customer, piece: bytes, every: float, give_up: float):
    """Send `piece` every `every` seconds until the server says something;
    (seconds from the first piece to its reply, the reply line)."""
    start = time.monotonic()
    c.sock.sendall(b"Subject: slow\r\n\r\n")
    while time.monotonic() - start < give_up:
        pending = c.sock.pending() if isinstance(c.sock, ssl.SSLSocket) else 0
        if pending or select.select([c.sock], [], [], every)[0]:
            return time.monotonic() - start, c.file.readline()
        try:
            c.sock.sendall(piece)
        except OSError:
            break
    return time.monotonic() - start, c.file.readline()


def closed_by_server(c: Customer) -> bool:
    """After the reply: EOF (or a reset), never another reply or a hang."""
    c.sock.settimeout(5)
    try:
        return c.file.read() == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


def spool_files(p: Provider) -> list:
    return [os.path.join(d, n) for d, _, names in os.walk(p.spool_dir) for n in names
            if not n.startswith(".")]


def assert_data_deadline(p: Provider, c: Customer, piece: bytes, caplog) -> None:
    elapsed, line = trickle(c, piece, 0.5, give_up=12)
    assert line.startswith(b"451 4.4.2 "), line
    assert 1.5 <= elapsed < 4.5, elapsed           # max_data_time 2s, well before idle_timeout 5s
    assert closed_by_server(c)
    assert spool_files(p) == []                    # no message, nothing left in tmp/
    slow = [r for r in caplog.records if "max_data_time" in r.getMessage()]
    assert len(slow) == 1 and SENDER in slow[0].getMessage()


@pytest.mark.slow
@pytest.mark.parametrize("piece", [b"one more line of text\r\n", b"x"], ids=["lines", "bytes"])
def test_trickling_sender_gets_451_when_max_data_time_is_over(tmp_path, caplog, piece):
    caplog.set_level(logging.INFO, logger="odmrd")
    p = data_provider(tmp_path)
    try:
        c = open_data(Customer(p.smtp_port))
        try:
            assert_data_deadline(p, c, piece, caplog)
        finally:
            c.close()
        # a normal message still goes through, on the same daemon
        assert send_mail(p.smtp_port, SENDER, ["user@example.org"], b"Subject: fast\r\n\r\nok\r\n") == {}
        assert len(p.spooled("example.org")) == 1
    finally:
        p.stop()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary needed")
def test_max_data_time_holds_after_starttls(tmp_path, caplog):
    from helpers import make_pki
    pki = make_pki(str(tmp_path / "pki"))
    caplog.set_level(logging.INFO, logger="odmrd")
    p = data_provider(tmp_path / "site", sections="[tls]\ncert_file = %s\nkey_file = %s\n"
                      % (pki["server.pem"], pki["server.key"]))
    context = ssl.create_default_context(cafile=pki["ca.pem"])
    try:
        c = open_data(Customer(p.smtp_port), context)
        try:
            assert_data_deadline(p, c, b"x", caplog)
        finally:
            c.close()
    finally:
        p.stop()


@pytest.mark.slow
def test_max_data_time_is_reloaded(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="odmrd")
    p = data_provider(tmp_path / "site", smtp_extra="idle_timeout = 5s")    # default: 30m
    try:
        write_config(p.dir, p.odmr_port, p.smtp_port, smtp_extra="max_data_time = 2s\nidle_timeout = 5s")
        p.service.reload()
        c = open_data(Customer(p.smtp_port))
        try:
            assert_data_deadline(p, c, b"more\r\n", caplog)
        finally:
            c.close()
    finally:
        p.stop()


# -- odmrd fetch --maildir/--mbox --max-size ---------------------------------------------

def body_of(size: int) -> bytes:
    line = b"0123456789" * 7 + b"\r\n"
    return b"Subject: %d bytes\r\n\r\n" % size + line * (size // len(line))


@pytest.mark.slow
def test_fetch_max_size_refuses_big_message_and_provider_bounces_it(provider, tmp_path):
    """End to end: the real provider offers SIZE=, the customer refuses it with 552 5.3.4
    at MAIL, the provider returns it to its (hosted) sender and keeps nothing; the small
    message arrives; the run exits 0 (a refusal for good is an outcome, not a failure)."""
    send_mail(provider.smtp_port, "carol@example.net", ["x@example.org"], body_of(30000))
    send_mail(provider.smtp_port, "carol@example.net", ["x@example.org"], body_of(2000))
    maildir = tmp_path / "Maildir"
    result = run_fetch("--server", "127.0.0.1:%d" % provider.odmr_port, "--user", "alice",
                       "--tls", "none", "--domain", "example.org",
                       "--maildir", str(maildir), "--max-size", "10K")
    assert result.returncode == EX_OK, err(result)
    assert "over --max-size 10240" in err(result)
    (name,) = os.listdir(maildir / "new")
    assert b"Subject: 2000 bytes" in (maildir / "new" / name).read_bytes()
    assert os.listdir(maildir / "tmp") == []
    assert provider.spooled("example.org") == []            # not kept for another try
    bounces = [email.message_from_bytes(m.read_data()) for m in provider.spool.messages("example.net")
               if m.envelope.sender == ""]
    assert len(bounces) == 1
    assert "552 5.3.4" in bounces[0].as_string() and "x@example.org" in bounces[0].as_string()


def two_without_size(results: list):
    """A provider that declares no SIZE: 30 KB (552 once, after the dot), then 2 KB (250),
    then a MAIL whose SIZE= is over the limit; the customer's replies go to `results`."""
    def converse(peer: Peer) -> None:
        assert peer.line().startswith(b"220 ")
        peer.send("EHLO scripted.test\r\n")
        assert b"250-SIZE 10240" in peer.reply()
        for size in (30000, 2000):
            peer.send("MAIL FROM:<a@outside.test>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
            assert [peer.line()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            peer.send(body_of(size) + b".\r\n")
            results.append(peer.line())
        peer.send("MAIL FROM:<a@outside.test> SIZE=20000\r\n")
        results.append(peer.line())
        peer.send("QUIT\r\n")
        results.append(peer.line())
    return converse


@pytest.mark.slow
@pytest.mark.parametrize("store", ["maildir", "mbox"])
def test_fetch_max_size_discards_oversize_stream_without_leftovers(scripted, tmp_path, store):
    results: list = []
    s = scripted(atrn_reply="250 2.0.0 OK now reversing the connection", after_250=two_without_size(results))
    target = tmp_path / "box" / ("Maildir" if store == "maildir" else "mbox")
    target.parent.mkdir()
    result = run_fetch(*scripted_args(s, "--" + store, str(target), "--max-size", "10K"))
    assert result.returncode == EX_OK, err(result) + repr(s.errors)
    assert s.errors == []
    assert [r[:10] for r in results] == [b"552 5.3.4 ", b"250 2.0.0 ", b"552 5.3.4 ", b"221 2.0.0 "]
    if store == "maildir":
        (name,) = os.listdir(target / "new")
        assert b"Subject: 2000 bytes" in (target / "new" / name).read_bytes()
        assert os.listdir(target / "tmp") == []
    else:
        raw = target.read_bytes()
        assert raw.count(b"\nFrom ") + raw.startswith(b"From ") == 1
        assert b"Subject: 2000 bytes" in raw and b"Subject: 30000 bytes" not in raw
        assert sorted(os.listdir(target.parent)) == ["mbox"]


@pytest.mark.slow
def test_fetch_section_max_size_and_bad_flags(scripted, tmp_path):
    results: list = []
    s = scripted(atrn_reply="250 2.0.0 OK now reversing the connection", after_250=two_without_size(results))
    conf = tmp_path / "fetch.conf"
    conf.write_text("[fetch]\nmax_size = 10K\n")
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md")),
                       env={"ODMRD_CONFIG": str(conf)})
    assert result.returncode == EX_OK, err(result) + repr(s.errors)
    assert [r[:3] for r in results] == [b"552", b"250", b"552", b"221"]
    assert len(os.listdir(tmp_path / "md" / "new")) == 1
    for flags in (["--max-size", "lots", "--maildir", "md"],
                  ["--max-size", "10K", "--relay", "127.0.0.1:25"]):
        bad = run_fetch(*scripted_args(s, *flags))
        assert bad.returncode == EX_USAGE and len(err(bad).strip().splitlines()) == 1, err(bad)


# -- log lines: nothing a peer sends can break or disguise one ----------------------------

# each can end a line for some reader (NEL, U+2028/9, VT, FF, ESC sequences) or hide text
# (bidi overrides and isolates, zero-width marks, DEL, C1 controls such as CSI)
NASTY = "\u2028\u2029\u0085\x7f\x9b\u202e\u2066\u2069\u200f\ufeff"


def test_escape_for_log_examples():
    from odmr.logline import escape_for_log
    assert escape_for_log("plain <a@b.test> ok") == "plain <a@b.test> ok"
    assert escape_for_log("a\u2028b\x85c\u202ed\x00e\x1b[2Jf\tg\rh\ni") == \
        "a\\u2028b\\x85c\\u202ed\\x00e\\x1b[2Jf\\tg\\rh | i"
    assert escape_for_log("caf\u00e9 \u2713 \U0001f600") == "caf\u00e9 \u2713 \U0001f600"


@given(st.text())
def test_escaped_log_text_is_one_printable_line(text):
    from odmr.logline import escape_for_log
    out = escape_for_log(text)
    assert out.isprintable() and len(out.splitlines()) <= 1
    if text.isprintable():
        assert out == text


class Daemon:
    """A detached `odmrd serve` logging to a file, with PLAIN allowed without TLS."""

    def __init__(self, directory: str):
        self.dir = directory
        self.odmr_port, self.smtp_port = free_port(), free_port()
        self.config = os.path.join(directory, "odmrd.conf")
        self.log_file = os.path.join(directory, "odmrd.log")
        with open(self.config, "w") as fh:
            fh.write("hostname = odmr.test\nspool_dir = spool\nusers_file = users\n"
                     "pid_file = odmrd.pid\nlog_file = odmrd.log\nsyslog = no\n"
                     "log_level = debug\nallow_root = yes\n"
                     "[odmr]\nlisten = 127.0.0.1:%d\nallow_plaintext_passwords = yes\n"
                     "[smtp]\nlisten = 127.0.0.1:%d\n" % (self.odmr_port, self.smtp_port))
        added = run_cli("-c", self.config, "user", "add", "alice", "--domain", "example.org",
                        "--password-stdin", input=b"secret-pw\n")
        assert added.returncode == 0, added.stderr
        started = run_cli("-c", self.config, "serve", timeout=30)
        assert started.returncode == 0, started.stderr
        with open(os.path.join(directory, "odmrd.pid")) as fh:
            self.pid = int(fh.read().split()[0])

    def log_text(self) -> str:
        with open(self.log_file, "rb") as fh:
            return fh.read().decode("utf-8")        # strict: the file is valid UTF-8

    def stop(self) -> None:
        if alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            try:
                wait_for(lambda: not alive(self.pid), 10, "the daemon to stop")
            except AssertionError:
                os.kill(self.pid, signal.SIGKILL)


@pytest.mark.slow
def test_log_lines_escape_controls_and_separators_from_peers(tmp_path):
    d = Daemon(str(tmp_path))
    try:
        smtp = Customer(d.smtp_port)
        assert smtp.reply()[0] == 220
        assert smtp.cmd("EHLO client.test")[0] == 250
        assert smtp.cmd("NOOP x%sy" % NASTY)[0] == 250                 # logged at debug
        assert smtp.cmd("MAIL FROM:<s%sender@remote.test> SMTPUTF8" % "\u202e\u2066")[0] == 250
        code, _ = smtp.cmd("RCPT TO:<u\u202eu\u2066u@elsewhere.test>")  # refused and logged
        assert code == 550
        assert smtp.cmd("RCPT TO:<a%sb@example.org>" % NASTY)[0] >= 500
        smtp.cmd("QUIT")
        smtp.close()
        odmr = Customer(d.odmr_port)
        assert odmr.reply()[0] == 220
        assert odmr.cmd("EHLO customer.test")[0] == 250
        user = "al\u2028ice\n\rforged: AUTH ok\x0b\x0c\x1b[2J" + NASTY
        blob = base64.b64encode(b"\0" + user.encode("utf-8") + b"\0wrong").decode()
        assert odmr.cmd("AUTH PLAIN " + blob)[0] == 535
        good = base64.b64encode(b"\0alice\0secret-pw").decode()
        assert odmr.cmd("AUTH PLAIN " + good)[0] == 235
        assert odmr.cmd("ATRN ex%sample.org" % NASTY)[0] == 501          # logged at debug
        odmr.cmd("QUIT")
        odmr.close()
        wait_for(lambda: "authentication failed" in d.log_text(), 10, "the AUTH failure to be logged")
    finally:
        d.stop()
    text = d.log_text()
    assert "\r" not in text
    lines = text.split("\n")
    assert all(line.isprintable() for line in lines), [l for l in lines if not l.isprintable()]
    assert len([l for l in lines if "authentication failed" in l]) == 1
    assert not any(l.startswith("forged") or "AUTH ok" in l for l in lines)
    atrn = [l for l in lines if "<- ATRN" in l]
    assert len(atrn) == 1 and "ex\\u2028\\u2029\\x85\\x7f\\x9b\\u202e" in atrn[0]
    refused = [l for l in lines if "refused RCPT" in l and "elsewhere.test" in l]
    assert len(refused) == 1 and "<u\\u202eu\\u2066u@elsewhere.test>" in refused[0]
    noop = [l for l in lines if "<- NOOP" in l]
    assert len(noop) == 1 and "x\\u2028\\u2029\\x85\\x7f\\x9b\\u202e\\u2066\\u2069\\u200f\\ufeffy" in noop[0]


@pytest.mark.parametrize("kind", ["stderr", "syslog"])
def test_stderr_and_syslog_handlers_escape_too(tmp_path, monkeypatch, capfd, kind):
    from odmr import daemon
    receiver = None
    if kind == "syslog":
        path = str(tmp_path / "log.sock")
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(path)
        receiver.settimeout(5)
        monkeypatch.setattr(daemon, "SYSLOG_SOCKETS", (path,))
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        daemon.setup_logging("info", (kind, ""))
        logging.getLogger("odmrd.smtp").info("refused RCPT <%s>", "a\u2028b\x85c\u202ed\x1be")
        out = receiver.recv(4096).decode() if receiver else capfd.readouterr().err
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        if receiver:
            receiver.close()
    assert out.rstrip("\n\x00").endswith("refused RCPT <a\\u2028b\\x85c\\u202ed\\x1be>"), out
    assert len(out.rstrip("\n\x00").splitlines()) == 1


def test_fetch_log_lines_escape_what_the_provider_sends(scripted, tmp_path):
    sender = "a\u202eb\u2066c@x.test"         # bidi controls pass the address parser
    results: list = []

    def converse(peer: Peer) -> None:
        assert peer.line().startswith(b"220 ")
        peer.send("EHLO scripted.test\r\n")
        peer.reply()
        peer.send(("MAIL FROM:<%s> SIZE=99999 SMTPUTF8\r\n" % sender).encode())
        results.append(peer.line())
        peer.send("QUIT\r\n")
        results.append(peer.line())

    s = scripted(atrn_reply="250 2.0.0 OK now reversing the connection", after_250=converse)
    result = run_fetch(*scripted_args(s, "--maildir", str(tmp_path / "md"), "--max-size", "10K"))
    assert result.returncode == EX_OK, err(result) + repr(s.errors)
    assert [r[:3] for r in results] == [b"552", b"221"]
    text = err(result)
    assert "<a\\u202eb\\u2066c@x.test>" in text
    assert all(line.isprintable() for line in text.split("\n")), text


@pytest.mark.slow
def test_a_customer_reply_is_stored_escaped(provider):
    """A customer's 4xx is kept as last_error (queue list, DSNs): its control and format
    characters are escaped there too, not only in the log."""
    send_mail(provider.smtp_port, "s@remote.test", ["u@example.org"], b"Subject: t\r\n\r\nx\r\n")
    c = Customer(provider.odmr_port)
    try:
        c.login("alice")
        assert c.cmd("ATRN example.org")[0] == 250
        c.send("220 customer.test")
        assert c.line().startswith(b"EHLO")
        c.send("250 customer.test")
        assert c.line().startswith(b"MAIL")
        c.send("450 4.2.0 \x1b]0;pwned\x07\x1b[2J busy \u202eevil".encode())
        while not c.line().startswith(b"QUIT"):
            c.send("250 ok")
        c.send("221 bye")
    finally:
        c.close()
    wait_for(lambda: provider.run_cli("queue", "list", "--json").stdout.count(b"busy"), 10,
             "the attempt to be recorded")
    [record] = json.loads(provider.run_cli("queue", "list", "--json").stdout)
    assert "\x1b" not in record["last_error"] and "\u202e" not in record["last_error"]
    assert "\\x1b]0;pwned\\x07" in record["last_error"]
