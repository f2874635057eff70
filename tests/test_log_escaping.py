"""Nothing a peer sends can break or disguise a log line: control, separator,
bidi and zero-width characters are escaped by the log file, stderr and syslog
handlers of the daemon and of `odmrd fetch`, and in what the queue stores of a
customer's reply. A real daemon and real peers over loopback."""
from __future__ import annotations

import base64
import json
import logging
import socket

import pytest
from hypothesis import given, strategies as st

from helpers import Customer, Daemon, Peer, err, reply_line, run_fetch, scripted_args, send_mail, wait_for
from odmr import replies
from odmr.exits import EX_OK


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


@pytest.mark.slow
def test_log_lines_escape_controls_and_separators_from_peers(tmp_path):
    d = Daemon(str(tmp_path), "allow_root = yes", odmr_extra="allow_plaintext_passwords = yes", detached=True)
    try:
        d.add_user("alice", "example.org")
        started = d.serve()
        assert started.returncode == 0, started.stderr
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
        wait_for(lambda: "authentication failed" in d.log(), 10, "the AUTH failure to be logged")
    finally:
        d.cleanup()
    with open(d.log_file, "rb") as fh:
        text = fh.read().decode("utf-8")        # strict: the file is valid UTF-8
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

    s = scripted(atrn_reply=reply_line(replies.ATRN_OK), after_250=converse)
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
