"""The real fetchmail (protocol ODMR) collecting from the real provider into Postfix's smtp-sink.

fetchmail is the customer most providers will meet, and it is peculiar: CRAM-MD5
only, `ATRN d1,d2`, then a blind byte copy to its `smtphost`. These tests run the
real binary against a provider on loopback ports and let it relay to the real
`smtp-sink`, then compare what the sink stored with what was sent, byte for byte
(after the sink's own headers and the Received header odmrd adds at intake).

fetchmail's exit code does not tell whether delivery worked (INTEROP.md), so every
test also looks at the sink's files and at the spool.
"""
from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List

import pytest

from conftest import PASSWORD, Provider, free_port, send_mail, which

FETCHMAIL = which("fetchmail")
SMTP_SINK = which("smtp-sink")

pytestmark = [
    pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail is not installed (Debian package fetchmail)"),
    pytest.mark.skipif(SMTP_SINK is None, reason="smtp-sink is not installed (Debian package postfix)"),
]

SINK_RECORDS = (b"X-Client-Addr:", b"X-Client-Proto:", b"X-Helo-Args:", b"X-Mail-Args:", b"X-Rcpt-Args:")

# fetchmail exit codes observed on this machine (INTEROP.md)
FM_OK = 0
FM_REFUSED = 4          # after 450
FM_AUTHFAIL = 128       # after 535


@dataclass
class Dumped:
    """One message as smtp-sink stored it, split into its parts."""
    mail_args: str
    rcpt_args: List[str]
    odmrd_received: bytes               # the trace header odmrd added at intake (LF endings)
    content: bytes                      # the message as the customer's server got it (LF endings)
    raw: bytes = field(repr=False, default=b"")


def _take_header(raw: bytes, pos: int) -> int:
    """End offset of the (possibly folded) header line starting at `pos`."""
    while True:
        end = raw.index(b"\n", pos) + 1
        if raw[end:end + 1] not in (b" ", b"\t"):
            return end
        pos = end


def parse_dump(raw: bytes) -> Dumped:
    """Split a smtp-sink dump file: its records, its Received, odmrd's Received, the message."""
    pos = 0
    mail_args = ""
    rcpts: List[str] = []
    while raw.startswith(SINK_RECORDS, pos):
        end = raw.index(b"\n", pos) + 1
        name, _, value = raw[pos:end - 1].partition(b": ")
        if name == b"X-Mail-Args":
            mail_args = value.decode()
        elif name == b"X-Rcpt-Args":
            rcpts.append(value.decode())
        pos = end
    end = _take_header(raw, pos)
    assert b"(smtp-sink)" in raw[pos:end], "no smtp-sink Received header: %r" % raw[:500]
    pos = end
    end = _take_header(raw, pos)
    received = raw[pos:end]
    assert raw.endswith(b"\n\n"), "dump file does not end with the sink's empty line"
    return Dumped(mail_args, rcpts, received, raw[end:-1], raw)


def as_stored(data: bytes) -> bytes:
    """What the sink stores for message `data` sent over SMTP: LF endings, a final newline."""
    text = data.replace(b"\r\n", b"\n")
    return text if text.endswith(b"\n") else text + b"\n"


class Sink:
    """Postfix's smtp-sink on a free loopback port, one dump file per message."""

    def __init__(self, *options: str):
        # tmp_path is 0700 root: the sink runs as nobody, so its directory lives in /tmp
        self.dir = tempfile.mkdtemp(prefix="odmr-sink-", dir="/tmp")
        os.chmod(self.dir, 0o777)
        self.port = free_port()
        self.log = open(os.path.join(self.dir, "sink.log"), "wb")
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", *options, "-d", os.path.join(self.dir, "%M."),
             "127.0.0.1:%d" % self.port, "256"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("smtp-sink exited with %s" % self.proc.returncode)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as probe:
                    if probe.recv(100).startswith(b"220"):
                        probe.sendall(b"QUIT\r\n")
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("smtp-sink did not start listening")

    def files(self) -> List[str]:
        return sorted(n for n in os.listdir(self.dir) if n != "sink.log")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()

    def messages(self) -> List[Dumped]:
        """Every stored message; stops the sink first so that every file is complete."""
        self.stop()
        result = []
        for name in self.files():
            with open(os.path.join(self.dir, name), "rb") as fh:
                result.append(parse_dump(fh.read()))
        return result

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.cleanup()


def run_fetchmail(workdir: str, odmr_port: int, smtp_port: int, user: str = "alice",
                  password: str = PASSWORD, domains: str = "example.org,example.com",
                  timeout: float = 90) -> subprocess.CompletedProcess:
    """One fetchmail poll in the foreground, with its own FETCHMAILHOME and a 0600 rc file."""
    home = tempfile.mkdtemp(prefix="fetchmail-", dir=workdir)
    rc = os.path.join(home, "fetchmailrc")
    with open(rc, "w") as fh:
        fh.write('set no syslog\n'
                 'set pidfile "%s/fetchmail.pid"\n'
                 'poll 127.0.0.1 service %d protocol ODMR\n'
                 '    user "%s" password "%s"\n'
                 '    fetchdomains %s\n'
                 '    smtphost 127.0.0.1/%d\n' % (home, odmr_port, user, password, domains, smtp_port))
    os.chmod(rc, 0o600)
    env = dict(os.environ, FETCHMAILHOME=home)
    proc = subprocess.Popen([FETCHMAIL, "-f", rc, "-v", "--nodetach", "--nosyslog"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, b"")


def transcript(result: subprocess.CompletedProcess) -> str:
    return result.stdout.decode("utf-8", "replace")


def message(subject: str, body: bytes, sender: str = "sender@outside.test", to: str = "x@example.org",
            extra: bytes = b"") -> bytes:
    return (b"From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-ID: <%s@outside.test>\r\n%s\r\n"
            % (sender.encode(), to.encode(), subject.encode(), subject.encode(), extra)) + body


def by_subject(dumps: List[Dumped]) -> Dict[str, Dumped]:
    result = {}
    for d in dumps:
        for line in d.content.split(b"\n"):
            if line.startswith(b"Subject: "):
                result[line[9:].decode()] = d
                break
    return result


def check_trace(d: Dumped, rcpts: List[str]) -> None:
    """odmrd's own Received header is the first line of what it relays."""
    assert d.odmrd_received.startswith(b"Received: from "), d.raw[:600]
    assert b"by odmr.test (odmrd) with ESMTP id " in d.odmrd_received
    if len(rcpts) == 1:
        assert b"for <%s>" % rcpts[0].encode() in d.odmrd_received


# -- the happy paths ----------------------------------------------------------------

EIGHT_BIT = ("Grüße aus Köln — ½ € ✓\r\n".encode("utf-8") + b"latin-1 bytes: \xe9\xe8\xff\xa0\r\n"
             + bytes(range(0x80, 0x100)) + b"\r\n")
DOTS = (b".\r\n..\r\n...\r\n.leading dot\r\n..two leading dots\r\n"
        b"line\r\n.\r\nafter a lone dot\r\n. space\r\n.")       # last line: a dot, no CRLF


def test_several_messages_for_two_domains(provider, sink, tmp_path):
    sent = {
        "plain-1": ("a@example.org", message("plain-1", b"first message\r\n", to="a@example.org"), []),
        "eightbit": ("b@example.org", message("eightbit", EIGHT_BIT, to="b@example.org",
                                              extra=b"Content-Type: text/plain; charset=utf-8\r\n"
                                                    b"Content-Transfer-Encoding: 8bit\r\n"),
                     ["BODY=8BITMIME"]),
        "dots": ("a@example.org", message("dots", DOTS, to="a@example.org"), []),
        "com-1": ("info@example.com", message("com-1", b"for the other domain\r\n" * 40,
                                              to="info@example.com"), []),
        "com-2": ("sales@example.com", message("com-2", b"no final newline", to="sales@example.com"), []),
    }
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        for subject, (rcpt, data, options) in sent.items():
            assert s.sendmail("sender@outside.test", [rcpt], data, mail_options=options) == {}
    assert len(provider.spooled("example.org")) == 3
    assert len(provider.spooled("example.com")) == 2

    result = run_fetchmail(str(tmp_path), provider.odmr_port, sink.port)
    assert result.returncode == 0, transcript(result)
    assert "ATRN example.org,example.com" in transcript(result)

    got = by_subject(sink.messages())
    assert sorted(got) == sorted(sent)
    for subject, (rcpt, data, options) in sent.items():
        d = got[subject]
        assert d.content == as_stored(data), subject
        assert d.rcpt_args == ["<%s>" % rcpt]
        assert d.mail_args.split()[0] == "<sender@outside.test>"
        check_trace(d, [rcpt])
    # the sink offers 8BITMIME, so the body type declared at intake travels on
    assert "BODY=8BITMIME" in got["eightbit"].mail_args.split()
    assert "BODY=8BITMIME" not in got["plain-1"].mail_args.split()
    assert provider.spooled("example.org") == []
    assert provider.spooled("example.com") == []


def test_multi_recipient_message_split_per_domain(provider, sink, tmp_path):
    data = message("multi", b"one message, three domains\r\n.and a dot line\r\n", to="undisclosed")
    rcpts = ["a@example.org", "b@example.org", "c@example.com", "d@example.net"]
    assert send_mail(provider.smtp_port, "sender@outside.test", rcpts, data) == {}

    result = run_fetchmail(str(tmp_path), provider.odmr_port, sink.port)
    assert result.returncode == 0, transcript(result)

    dumps = sink.messages()
    assert sorted(tuple(d.rcpt_args) for d in dumps) == [
        ("<a@example.org>", "<b@example.org>"), ("<c@example.com>",)]
    for d in dumps:
        assert d.content == as_stored(data)
        assert b"(odmrd)" in d.odmrd_received
    assert provider.spooled("example.org") == [] and provider.spooled("example.com") == []
    # bob's copy is untouched by alice's run
    assert len(provider.spooled("example.net")) == 1


def test_message_over_one_megabyte(tmp_path, sink):
    p = Provider(str(tmp_path))
    with open(p.config) as fh:
        text = fh.read()
    assert "max_message_size = 1M" in text       # the conftest default this test raises
    with open(p.config, "w") as fh:
        fh.write(text.replace("max_message_size = 1M", "max_message_size = 8M"))
    p.add_user("alice", ["example.org", "example.com"])
    p.start()
    try:
        lines = []
        for i in range(50000):
            lines.append(b"%06d %s" % (i, (b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36:] * 2)[:60]))
            if i % 997 == 0:
                lines.append(b"." + b"dotted %d" % i)
            if i % 5003 == 0:
                lines.append(b"\xc3\xa9" * 1500)           # a 3,000-octet line, 8-bit
        body = b"\r\n".join(lines) + b"\r\n"
        data = message("big", body, to="big@example.org")
        assert len(data) > 2 * 1024 * 1024
        assert send_mail(p.smtp_port, "sender@outside.test", ["big@example.org"], data) == {}

        result = run_fetchmail(str(tmp_path), p.odmr_port, sink.port)
        assert result.returncode == 0, transcript(result)
        dumps = sink.messages()
        assert len(dumps) == 1
        assert dumps[0].content == as_stored(data)
        assert p.spooled("example.org") == []
    finally:
        p.stop()


# -- refusals: nothing is sent, nothing is lost ------------------------------------------

def test_wrong_password_keeps_mail(provider, sink, tmp_path):
    send_mail(provider.smtp_port, "sender@outside.test", ["a@example.org"], message("kept", b"x\r\n"))
    result = run_fetchmail(str(tmp_path), provider.odmr_port, sink.port, password="not-the-password")
    assert result.returncode == FM_AUTHFAIL, transcript(result)
    assert "535" in transcript(result)
    assert "ODMR> ATRN" not in transcript(result)
    assert sink.messages() == []
    assert len(provider.spooled("example.org")) == 1


def test_no_mail_waiting(provider, sink, tmp_path):
    # mail for bob's domain must not count as mail for alice
    send_mail(provider.smtp_port, "sender@outside.test", ["x@example.net"], message("bobs", b"x\r\n"))
    result = run_fetchmail(str(tmp_path), provider.odmr_port, sink.port)
    assert result.returncode == FM_OK, transcript(result)
    assert "453" in transcript(result)
    assert sink.messages() == []
    assert len(provider.spooled("example.net")) == 1


def test_domain_not_belonging_to_account(provider, sink, tmp_path):
    send_mail(provider.smtp_port, "sender@outside.test", ["a@example.org"], message("mine", b"x\r\n"))
    send_mail(provider.smtp_port, "sender@outside.test", ["a@example.net"], message("bobs", b"x\r\n"))
    result = run_fetchmail(str(tmp_path), provider.odmr_port, sink.port, domains="example.org,example.net")
    assert result.returncode == FM_REFUSED, transcript(result)
    assert "450" in transcript(result)
    assert sink.messages() == []
    assert len(provider.spooled("example.org")) == 1
    assert len(provider.spooled("example.net")) == 1


# -- the local server's per-recipient answers travel back through fetchmail ----------------

def test_soft_rejection_by_local_server_keeps_mail_for_next_run(provider, tmp_path):
    data = message("retry", b"try again later\r\n", to="a@example.org")
    send_mail(provider.smtp_port, "sender@outside.test", ["a@example.org"], data)
    refusing = Sink("-r", "RCPT")
    try:
        result = run_fetchmail(str(tmp_path), provider.odmr_port, refusing.port)
        assert result.returncode == FM_OK, transcript(result)
        assert refusing.messages() == []
    finally:
        refusing.cleanup()
    ids = provider.spooled("example.org")
    assert len(ids) == 1
    state = provider.spool.load("example.org", ids[0]).state
    assert state.attempts == 1 and state.last_error.startswith("450")

    accepting = Sink()
    try:
        result = run_fetchmail(str(tmp_path), provider.odmr_port, accepting.port)
        assert result.returncode == FM_OK, transcript(result)
        dumps = accepting.messages()
    finally:
        accepting.cleanup()
    assert [d.content for d in dumps] == [as_stored(data)]
    assert provider.spooled("example.org") == []


def test_hard_rejection_by_local_server_bounces_to_sender(provider, tmp_path):
    # the sender is bob's, so the DSN lands in bob's spool where it can be inspected
    data = message("doomed", b"no such user\r\n", sender="writer@example.net", to="nobody@example.org")
    send_mail(provider.smtp_port, "writer@example.net", ["nobody@example.org"], data)
    refusing = Sink("-f", "RCPT")
    try:
        result = run_fetchmail(str(tmp_path), provider.odmr_port, refusing.port)
        assert result.returncode == FM_OK, transcript(result)
        assert refusing.messages() == []
    finally:
        refusing.cleanup()
    assert provider.spooled("example.org") == []
    bounces = [provider.spool.load("example.net", i) for i in provider.spooled("example.net")]
    assert len(bounces) == 1
    assert bounces[0].envelope.sender == ""
    assert [r.address for r in bounces[0].envelope.recipients] == ["writer@example.net"]
    report = bounces[0].read_data()
    assert b"multipart/report" in report and b"nobody@example.org" in report
