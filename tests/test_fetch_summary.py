"""What `odmrd fetch` says about a run, without -v: messages and recipients, not
reply lines; TLS mix-ups with the fix in the message; `--every` backing off
only for trouble with the provider.

A real provider (helpers.Provider), the real `odmrd fetch` as a subprocess, and
helpers.ScriptedMTA standing in for the customer's MTA, which defers or refuses
chosen recipients and messages.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from typing import Dict, List

import pytest

from helpers import (FETCH, PASSWORD, Provider, Scripted, ScriptedMTA, err, fetch_args, free_port, one_line_error,
                     run_fetch, send_mail)
from odmr.exits import EX_OK, EX_PROTOCOL, EX_TEMPFAIL

pytestmark = pytest.mark.slow                   # each test runs odmrd fetch against a provider

DEFER_AT_END = b"X-Local-Test: defer at end of data"


@pytest.fixture
def mta():
    """The customer's MTA: PIPELINING; 450 to the recipients in `defer`, 550 to those in
    `refuse`, 451 at the end of data of a message carrying DEFER_AT_END; 250 otherwise."""
    made: List[ScriptedMTA] = []

    def make(**kw) -> ScriptedMTA:
        made.append(ScriptedMTA(features=["PIPELINING", "8BITMIME"], defer_marker=DEFER_AT_END, **kw))
        return made[-1]
    yield make
    for m in made:
        m.close()


def queue_mail(provider, rcpts: List[str], subject: str, header: bytes = b"") -> None:
    send_mail(provider.smtp_port, "sender@outside.test", rcpts,
              b"From: <sender@outside.test>\r\nSubject: %s\r\n%s\r\nbody\r\n" % (subject.encode(), header))


# -- the summary line ------------------------------------------------------------------

def test_relay_summary_counts_messages_and_recipients(provider, mta):
    """One 450 to a RCPT is '1 recipient deferred', not a count of reply lines; 3 messages arrived."""
    local = mta(defer={"y@example.org"})
    queue_mail(provider, ["x@example.org"], "one")
    queue_mail(provider, ["x@example.org", "y@example.org"], "two")
    queue_mail(provider, ["z@example.com"], "three")
    result = run_fetch(*fetch_args(provider, "--relay", "127.0.0.1:%d" % local.port))
    assert err(result) == ("odmrd fetch: 3 messages delivered to 127.0.0.1:%d "
                           "(1 recipient deferred: stays at the provider)\n" % local.port)
    assert result.returncode == EX_TEMPFAIL           # README: a 4xx leaves that mail at the provider
    assert len(local.accepted) == 3
    assert len(provider.spooled("example.org")) == 1 and provider.spooled("example.com") == []


def test_relay_summary_with_every_kind_of_refusal(provider, mta):
    local = mta(defer={"y@example.org"}, refuse={"r@example.org"})
    queue_mail(provider, ["x@example.org"], "plain")
    queue_mail(provider, ["r@example.org", "x@example.org"], "one-refused")
    queue_mail(provider, ["x@example.org"], "deferred-at-end", DEFER_AT_END + b"\r\n")
    queue_mail(provider, ["y@example.org"], "only-deferred")
    result = run_fetch(*fetch_args(provider, "--domain", "example.org",
                                   "--relay", "127.0.0.1:%d" % local.port))
    assert err(result) == ("odmrd fetch: 2 messages delivered to 127.0.0.1:%d (1 message and "
                           "1 recipient deferred: stay at the provider; 1 recipient refused: "
                           "returned to its sender)\n" % local.port)
    assert result.returncode == EX_TEMPFAIL
    assert len(provider.spooled("example.org")) == 2


def test_refused_only_is_exit_0_and_says_so(provider, mta):
    local = mta(refuse={"r@example.org", "s@example.org"})
    queue_mail(provider, ["r@example.org", "s@example.org"], "both refused")
    result = run_fetch(*fetch_args(provider, "--relay", "127.0.0.1:%d" % local.port))
    assert result.returncode == EX_OK, err(result)
    assert err(result) == ("odmrd fetch: no messages delivered to 127.0.0.1:%d "
                           "(2 recipients refused: returned to the senders)\n" % local.port)


def test_maildir_summary_without_verbose(provider, tmp_path):
    maildir = str(tmp_path / "Maildir")
    queue_mail(provider, ["x@example.org"], "a")
    queue_mail(provider, ["x@example.org", "y@example.org"], "b")
    result = run_fetch(*fetch_args(provider, "--maildir", maildir))
    assert result.returncode == EX_OK, err(result)
    assert err(result) == "odmrd fetch: 2 messages delivered to %s\n" % maildir
    queue_mail(provider, ["x@example.com"], "c")
    result = run_fetch(*fetch_args(provider, "--maildir", maildir))
    assert err(result) == "odmrd fetch: 1 message delivered to %s\n" % maildir
    result = run_fetch(*fetch_args(provider, "--maildir", maildir))
    assert (result.returncode, err(result)) == (EX_OK, "odmrd fetch: no mail waiting\n")
    assert len(os.listdir(os.path.join(maildir, "new"))) == 3


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs, already full (skipped where mounting is not allowed)."""
    where = tmp_path / "full"
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                            capture_output=True, timeout=10)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % result.stderr.decode(errors="replace").strip())
    try:
        os.makedirs(where / "Maildir" / "new")
        os.makedirs(where / "Maildir" / "cur")
        os.makedirs(where / "Maildir" / "tmp")
        try:
            with open(where / "filler", "wb") as fh:
                while True:
                    fh.write(b"x" * 4096)
                    fh.flush()
        except OSError:
            pass
        yield str(where / "Maildir")
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


def test_maildir_full_disk_is_a_deferred_message(provider, full_disk):
    queue_mail(provider, ["x@example.org"], "no room")
    result = run_fetch(*fetch_args(provider, "--maildir", full_disk))
    assert result.returncode == EX_TEMPFAIL, err(result)
    assert err(result).endswith("odmrd fetch: no messages delivered to %s "
                                "(1 message deferred: stays at the provider)\n" % full_disk)
    assert len(provider.spooled("example.org")) == 1


# -- TLS mix-ups ------------------------------------------------------------------------

@pytest.fixture
def tls_provider(tmp_path, pki):
    """A provider with STARTTLS on its ODMR port and implicit TLS on `implicit_port`."""
    implicit = free_port()
    p = Provider(str(tmp_path), sections="[tls]\ncert_file = %s\nkey_file = %s\n"
                 % (pki["server.pem"], pki["server.key"]),
                 odmr_extra="tls_listen = 127.0.0.1:%d\n" % implicit)
    p.add_user("alice", ["example.org"])
    p.start()
    p.implicit_port = implicit
    yield p
    p.stop()


def test_starttls_against_implicit_tls_port_says_so_within_seconds(tls_provider, pki, tmp_path):
    queue_mail(tls_provider, ["x@example.org"], "waits")
    started = time.monotonic()
    result = run_fetch("--server", "127.0.0.1:%d" % tls_provider.implicit_port, "--user", "alice",
                       "--tls", "starttls", "--ca-file", pki["ca.pem"], "--maildir", str(tmp_path / "md"),
                       timeout=60)
    took = time.monotonic() - started
    assert result.returncode == EX_TEMPFAIL, err(result)
    one_line_error(result)
    assert "this port may speak implicit TLS: try --tls implicit" in err(result)
    assert took < 10, took
    assert len(tls_provider.spooled("example.org")) == 1


class SlowGreeter(Scripted):
    """A plain provider that greets only after 6 s (longer than the TLS probe waits)."""

    def converse(self, peer) -> None:
        time.sleep(6)
        super().converse(peer)


def test_a_slow_plain_greeting_is_still_awaited(tmp_path):
    """The probe for implicit TLS costs a slow plain server nothing but a second connection."""
    s = SlowGreeter()
    try:
        result = run_fetch("--server", "127.0.0.1:%d" % s.port, "--user", "alice", "--tls", "none",
                           "--domain", "example.org", "--maildir", str(tmp_path / "md"))
    finally:
        s.close()
    assert (result.returncode, err(result)) == (EX_OK, "odmrd fetch: no mail waiting\n")


def test_implicit_tls_against_starttls_port_says_so(tls_provider, pki, tmp_path):
    result = run_fetch("--server", "127.0.0.1:%d" % tls_provider.odmr_port, "--user", "alice",
                       "--tls", "implicit", "--ca-file", pki["ca.pem"], "--maildir", str(tmp_path / "md"))
    assert result.returncode == EX_PROTOCOL, err(result)
    one_line_error(result)
    assert "this port may speak plain SMTP/STARTTLS: try --tls starttls" in err(result)


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_certificate_failure_names_ca_file_and_insecure(tls_provider, tmp_path, mode):
    port = tls_provider.odmr_port if mode == "starttls" else tls_provider.implicit_port
    result = run_fetch("--server", "127.0.0.1:%d" % port, "--user", "alice", "--tls", mode,
                       "--maildir", str(tmp_path / "md"))          # the system CAs do not know ours
    assert result.returncode == EX_PROTOCOL, err(result)
    one_line_error(result)
    assert "certificate verification failed" in err(result)
    assert "--ca-file" in err(result) and "--insecure" in err(result)


def _other_name_for_loopback() -> str:
    """A host name that resolves to 127.0.0.1 but is not in the test certificate."""
    for name in (socket.gethostname(), "vm", "runsc"):
        if name in ("localhost", "odmr.test"):
            continue
        try:
            if socket.gethostbyname(name) == "127.0.0.1":
                return name
        except OSError:
            continue
    pytest.skip("no other name for 127.0.0.1 here")


def test_a_name_mismatch_says_to_connect_by_the_certificates_name(tls_provider, tmp_path, pki):
    """The CA is right (--ca-file given): the fix is the name, not another CA."""
    name = _other_name_for_loopback()
    result = run_fetch("--server", "%s:%d" % (name, tls_provider.odmr_port), "--user", "alice",
                       "--ca-file", pki["ca.pem"], "--maildir", str(tmp_path / "md"))
    assert result.returncode == EX_PROTOCOL, err(result)
    one_line_error(result)
    assert "connect by a name the certificate holds" in err(result)
    assert "give the CA" not in err(result)


# -- --every ------------------------------------------------------------------------------

def poll(args: List[str], until: str, log_path: str, timeout: float = 30) -> List[str]:
    """Run `odmrd fetch ... --every 1s` until `until` is in its log, SIGTERM it, return the run lines."""
    env = {k: v for k, v in os.environ.items() if k != "ODMRD_CONFIG"}
    env["ODMR_PASSWORD"] = PASSWORD
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(FETCH + args + ["--every", "1s"], stdout=subprocess.DEVNULL,
                                stderr=log, env=env, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while until not in open(log_path).read():
                assert proc.poll() is None, open(log_path).read()
                assert time.monotonic() < deadline, open(log_path).read()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == EX_OK
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    text = open(log_path).read()
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if re.search(r" run \d+: ", line)]


def test_every_does_not_back_off_for_a_deferred_recipient(provider, mta, tmp_path):
    local = mta(defer={"y@example.org"})
    queue_mail(provider, ["x@example.org", "y@example.org"], "half")
    lines = poll(fetch_args(provider, "--relay", "127.0.0.1:%d" % local.port), "run 3:",
                 str(tmp_path / "log"))
    expected: Dict[int, str] = {
        1: "run 1: 1 message delivered to 127.0.0.1:%d (1 recipient deferred: stays at the provider)"
           "; exit 75 after " % local.port,
        2: "run 2: no messages delivered to 127.0.0.1:%d (1 recipient deferred: stays at the provider)"
           "; exit 75 after " % local.port}
    for number, start in expected.items():
        assert start in lines[number - 1], lines
    for line in lines[:3]:
        assert line.endswith("; next run in 1s"), lines       # not 2s, 4s: nothing to back off from
    assert local.rcpts.count("y@example.org") >= 3            # asked again at every run


def test_every_does_not_back_off_for_a_full_disk(provider, full_disk, tmp_path):
    queue_mail(provider, ["x@example.org"], "no room")
    lines = poll(fetch_args(provider, "--maildir", full_disk), "run 3:", str(tmp_path / "log"))
    for line in lines[:3]:
        assert "(1 message deferred: stays at the provider); exit 75 after " in line, lines
        assert line.endswith("; next run in 1s"), lines


def test_every_backs_off_when_the_provider_is_unreachable(tmp_path):
    port = free_port()                                        # nothing listens there
    lines = poll(["--server", "127.0.0.1:%d" % port, "--user", "alice", "--tls", "none",
                  "--maildir", str(tmp_path / "md")], "run 2:", str(tmp_path / "log"))
    assert "run 1: cannot connect to 127.0.0.1:%d" % port in lines[0], lines
    assert lines[0].endswith("; next run in 2s") and lines[1].endswith("; next run in 4s"), lines
