"""SASL at the edges, over real sockets.

- An unknown name's SCRAM-SHA-256 salt and iteration count look like a real
  account's and stay the same across restarts and across nodes sharing the
  users file (they come from `<users file>.secret`).
- The per-address AUTH throttle is checked at every AUTH, so sessions opened
  before it tripped get no more guesses.
- AUTH responses of up to RFC 4954's 12,288 octets are read; longer ones get
  a clear 500 and the session goes on.
- `odmrd fetch` refuses absurd iteration counts from a provider (exit 76), and
  counts below RFC 7677's 4096 (exit 77: a proof that cheap to crack is never
  sent); the users file holds no SCRAM key with fewer, so our own provider never
  asks for them.
"""
from __future__ import annotations

import base64
import os
import re
import stat
import threading
from typing import Tuple

import pytest

from helpers import Customer, Daemon, PASSWORD, Peer, Provider, Scripted, err, kill_hard, run_fetch
from odmr.exits import EX_NOPERM, EX_PROTOCOL
from odmr import accounts, replies, sasl
from odmr.daemon import read_pid_file

THROTTLE = "auth_throttle_failures = 4\nauth_throttle_window = 10m"


# -- helpers ------------------------------------------------------------------------

def greeted(port: int) -> Customer:
    c = Customer(port)
    code, _ = c.reply()
    assert code == 220
    assert c.cmd("EHLO customer.test")[0] == 250
    return c


def server_first(port: int, user: str) -> Tuple[bytes, int, str]:
    """(salt, iterations, message) of the SCRAM server-first message for `user`."""
    c = greeted(port)
    try:
        first = base64.b64encode(("n,,n=%s,r=clientnonce42" % user).encode()).decode()
        code, lines = c.cmd("AUTH SCRAM-SHA-256 " + first)
        assert code == 334, lines
        message = base64.b64decode(lines[0]).decode()
        assert c.cmd("*")[0] == 501
        attrs = dict(item.split("=", 1) for item in message.split(","))
        assert set(attrs) == {"r", "s", "i"}, message
        return base64.b64decode(attrs["s"], validate=True), int(attrs["i"]), message
    finally:
        c.close()


def shape(message: str) -> str:
    """The server-first message with every letter and digit blanked: its form only."""
    return re.sub(r"[A-Za-z0-9+/_-]", "x", message)


def cram_fail(c: Customer) -> Tuple[int, list]:
    assert c.cmd("AUTH CRAM-MD5")[0] == 334
    return c.cmd(base64.b64encode(b"alice " + b"0" * 32).decode())


def stop_site(site: Daemon) -> None:
    pid = read_pid_file(site.pid_file)
    assert pid
    kill_hard(pid)


@pytest.fixture
def sites(tmp_path):
    made = []

    def make(name: str, extra: str = "allow_root = yes") -> Daemon:
        d = tmp_path / name
        d.mkdir()
        s = Daemon(str(d), extra, detached=True)
        made.append(s)
        return s
    yield make
    for s in made:
        s.cleanup()


# -- a: decoy salts ------------------------------------------------------------------

@pytest.mark.slow
def test_unknown_user_salt_survives_a_restart_and_looks_like_a_real_one(sites):
    site = sites("one")
    site.add_user("alice", "example.org")
    secret = accounts.secret_path(site.users)
    assert stat.S_IMODE(os.lstat(secret).st_mode) == 0o600        # made by `user add`
    assert site.serve().returncode == 0, site.log()
    try:
        before = server_first(site.odmr_port, "mallory")
        real = server_first(site.odmr_port, "alice")
        other = server_first(site.odmr_port, "eve")
    finally:
        stop_site(site)
    assert site.serve().returncode == 0, site.log()
    try:
        after = server_first(site.odmr_port, "mallory")
    finally:
        stop_site(site)
    assert before[:2] == after[:2]                     # same s= and i= after the restart
    assert other[:2] != before[:2]                     # and per name, not one salt for all
    assert (len(before[0]), before[1]) == (len(real[0]), real[1]) == (16, sasl.DEFAULT_ITERATIONS)
    assert shape(before[2]) == shape(real[2])
    assert "Traceback" not in site.log()


@pytest.mark.slow
def test_two_nodes_sharing_the_users_file_agree(sites):
    first = sites("node1")
    first.add_user("alice", "example.org")
    os.unlink(accounts.secret_path(first.users))       # both nodes start without one: a race
    second = sites("node2", "allow_root = yes\nusers_file = %s" % first.users)
    results = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s.dir, s.serve()))
               for s in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert all(r.returncode == 0 for r in results.values()), [r.stderr for r in results.values()]
        for name in ("mallory", "root", "postmaster"):
            one, two = server_first(first.odmr_port, name), server_first(second.odmr_port, name)
            assert one[:2] == two[:2], name
    finally:
        stop_site(first)
        stop_site(second)
    assert stat.S_IMODE(os.lstat(accounts.secret_path(first.users)).st_mode) == 0o600
    assert [n for n in os.listdir(os.path.dirname(first.users)) if ".secret." in n] == []


@pytest.mark.slow
def test_decoys_copy_the_iteration_count_and_salt_length_of_real_accounts(tmp_path):
    p = Provider(str(tmp_path))
    p.add_user("alice", ["example.org"])
    p.add_user("bob", ["example.net"])
    with open(p.users) as fh:
        text = fh.read()
    custom = sasl.ScramSecret.from_password(PASSWORD, 10000, os.urandom(24)).to_string()
    text = re.sub(r"scram_sha_256 = .*", "scram_sha_256 = " + custom, text)
    with open(p.users, "w") as fh:
        fh.write(text)
    p.start()
    try:
        salt, iterations, message = server_first(p.odmr_port, "mallory")
        real = server_first(p.odmr_port, "alice")
    finally:
        p.stop()
    assert (len(salt), iterations) == (len(real[0]), real[1]) == (24, 10000)
    assert shape(message) == shape(real[2])


@pytest.mark.slow
def test_a_secret_others_can_read_is_refused_like_the_users_file(sites):
    site = sites("open")
    site.add_user("alice", "example.org")
    secret = accounts.secret_path(site.users)
    os.chmod(secret, 0o644)
    result = site.cli("check-config")
    assert result.returncode == 78 and b"chmod 600" in result.stderr, result.stderr
    result = site.serve()
    assert result.returncode == 78, result.stderr
    assert b"chmod 600" in result.stderr and b"Traceback" not in result.stderr
    os.chmod(secret, 0o600)
    os.unlink(secret)
    os.symlink(site.users, secret)                     # a planted link is not followed
    result = site.serve()
    assert result.returncode == 78 and b"symbolic link" in result.stderr, result.stderr


# -- b: the throttle at every AUTH ------------------------------------------------------

@pytest.mark.slow
def test_sessions_opened_before_the_throttle_tripped_get_no_more_guesses(tmp_path):
    p = Provider(str(tmp_path), odmr_extra=THROTTLE)
    p.add_user("alice", ["example.org"])
    p.start()
    sessions = [greeted(p.odmr_port) for _ in range(4)]
    try:
        waiting, scram_session = sessions[2], sessions[3]
        # one exchange is half-way (server-first sent) when the throttle trips
        client = sasl.ScramSHA256Client("alice", PASSWORD)
        code, lines = scram_session.cmd("AUTH SCRAM-SHA-256 "
                                        + base64.b64encode(client.initial()).decode())
        assert code == 334
        final = client.respond(base64.b64decode(lines[0]))
        for c in sessions[:2]:
            assert cram_fail(c)[0] == 535
        assert cram_fail(sessions[0])[0] == 535
        sessions.append(Customer(p.odmr_port))
        sessions[-1].login()                           # 3 of 4: a correct AUTH still works
        assert cram_fail(sessions[1])[0] == 535        # 4: the limit
        # a new connection is turned away; so is an AUTH in a session opened before
        fresh = Customer(p.odmr_port)
        connect_reply = fresh.reply()
        fresh.close()
        assert connect_reply[0] == 421 and "failed authentications" in connect_reply[1][0]
        assert waiting.cmd("AUTH CRAM-MD5") == connect_reply
        assert waiting.line() == b""                   # and the session ends
        # the correct proof of the half-way exchange is not accepted either
        assert scram_session.cmd(base64.b64encode(final).decode()) == connect_reply
        assert scram_session.line() == b""
    finally:
        for c in sessions:
            c.close()
        p.stop()


# -- c: 12,288-octet responses --------------------------------------------------------

def plain_response(b64_length: int, password: str = PASSWORD) -> str:
    """A PLAIN response (a long authzid) whose base64 is exactly `b64_length` octets."""
    assert b64_length % 4 == 0
    tail = ("\0alice\0" + password).encode()
    message = b"z" * (b64_length // 4 * 3 - len(tail)) + tail
    encoded = base64.b64encode(message).decode()
    assert len(encoded) == b64_length
    return encoded


@pytest.fixture
def plaintext_provider(tmp_path):
    p = Provider(str(tmp_path), odmr_extra="allow_plaintext_passwords = yes")
    p.add_user("alice", ["example.org"])
    p.start()
    yield p
    p.stop()


@pytest.mark.slow
def test_auth_initial_response_up_to_12288_octets_is_read(plaintext_provider):
    c = greeted(plaintext_provider.odmr_port)
    try:
        for length in (12000, 12288):
            # read and judged (a foreign authzid: 535), not cut off as an overlong line
            assert c.cmd("AUTH PLAIN " + plain_response(length))[0] == 535
        code, lines = c.cmd("AUTH PLAIN " + plain_response(12292))
        assert (code, lines[0][:5]) == (500, "5.5.6")
        assert c.cmd("NOOP")[0] == 250                      # the session goes on
        code, lines = c.cmd("AUTH PLAIN " + plain_response(13000 // 4 * 4))
        assert code == 500
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("NOOP " + "x" * 600) == (replies.LINE_TOO_LONG[0], [replies.LINE_TOO_LONG[1]])    # others keep 512
        ok = base64.b64encode(("\0alice\0" + PASSWORD).encode()).decode()
        assert c.cmd("AUTH PLAIN " + ok)[0] == 235
    finally:
        c.close()


@pytest.mark.slow
def test_auth_continuation_line_up_to_12288_octets_is_read(plaintext_provider):
    c = greeted(plaintext_provider.odmr_port)
    try:
        assert c.cmd("AUTH PLAIN")[0] == 334
        assert c.cmd(plain_response(12288))[0] == 535
        assert c.cmd("AUTH PLAIN")[0] == 334
        code, lines = c.cmd(plain_response(13000 // 4 * 4))
        assert (code, lines[0][:5]) == (500, "5.5.6")
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("AUTH PLAIN")[0] == 334
        assert c.cmd(base64.b64encode(("\0alice\0" + PASSWORD).encode()).decode())[0] == 235
    finally:
        c.close()


# -- d: the customer refuses absurd iteration counts -------------------------------------

class ScramProvider(Scripted):
    """Offers SCRAM-SHA-256 and answers the client-first with a chosen i=."""

    def __init__(self, iterations: str):
        self.iterations = iterations
        self.gave_up = threading.Event()
        super().__init__(mechanisms="SCRAM-SHA-256")

    def auth(self, peer: Peer, line: bytes) -> None:
        first = base64.b64decode(line.split()[2]).decode()
        nonce = first.split("r=", 1)[1]
        salt = base64.b64encode(os.urandom(16)).decode()
        message = "r=%sSERVER,s=%s,i=%s" % (nonce, salt, self.iterations)
        peer.send("334 %s\r\n" % base64.b64encode(message.encode()).decode())
        answer = peer.line()
        if answer == b"*":
            self.gave_up.set()
            peer.send("501 5.7.0 cancelled\r\n")
        else:
            peer.send("535 5.7.8 bad\r\n")


@pytest.mark.parametrize("iterations", [pytest.param(n, marks=pytest.mark.slow)
                                        for n in ("100000000", "2000000", "0", "-4096", "")] + ["9" * 30])
def test_fetch_refuses_absurd_scram_iteration_counts(tmp_path, iterations):
    code, text, gave_up = fetch_with(iterations, tmp_path)
    assert code == EX_PROTOCOL, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert "iteration count i=" in text
    assert gave_up                                     # it said '*', no proof was computed


def fetch_with(iterations: str, tmp_path) -> Tuple[int, str, bool]:
    """(exit code, stderr, whether it gave up with '*') against a provider asking `iterations`."""
    s = ScramProvider(iterations)
    try:
        result = run_fetch("--server", "127.0.0.1:%d" % s.port, "--user", "alice", "--tls", "none",
                           "--mechanism", "SCRAM-SHA-256", "--maildir", str(tmp_path / "md"),
                           timeout=60)
        return result.returncode, err(result), s.gave_up.is_set()
    finally:
        s.close()


@pytest.mark.slow
def test_fetch_iteration_cap_is_one_million(tmp_path):
    code, text, gave_up = fetch_with(str(sasl.MAX_CLIENT_ITERATIONS + 1), tmp_path)
    assert (code, gave_up) == (EX_PROTOCOL, True), text
    # at the cap the keys are computed (the scripted provider then refuses the proof: 77)
    code, text, gave_up = fetch_with(str(sasl.MAX_CLIENT_ITERATIONS), tmp_path)
    assert (code, gave_up) == (77, False), text


@pytest.mark.parametrize("iterations", ["1", pytest.param("4095", marks=pytest.mark.slow)])
def test_fetch_refuses_too_few_scram_iterations(tmp_path, iterations):
    """A hostile or spoofed provider offering i=1 would get a proof it can crack cheaply."""
    code, text, gave_up = fetch_with(iterations, tmp_path)
    assert code == EX_NOPERM, text                       # an authentication failure, as 535 is
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert "i=%s " % iterations in text and "4096" in text
    assert gave_up                                       # it said '*', no proof was computed


@pytest.mark.slow
def test_fetch_computes_a_proof_at_4096_iterations(tmp_path):
    code, text, gave_up = fetch_with(str(sasl.MIN_SCRAM_ITERATIONS), tmp_path)
    assert (code, gave_up) == (EX_NOPERM, False), text  # the proof went out; 535 came back
    assert "authentication as alice refused" in text


@pytest.mark.slow
def test_users_file_holds_no_scram_key_fetch_would_refuse(tmp_path):
    """A hand-written key with fewer than 4096 iterations is a users-file error (our own
    `odmrd fetch` would refuse the provider asking for it); `user passwd` mends it."""
    p = Provider(str(tmp_path))
    p.add_user("alice", ["example.org"])
    assert p.run_cli("check-config").returncode == 0
    with open(p.users) as fh:
        text = fh.read()
    weak = sasl.ScramSecret.from_password(PASSWORD, 4095).to_string()
    with open(p.users, "w") as fh:
        fh.write(re.sub(r"scram_sha_256 = .*", "scram_sha_256 = " + weak, text))
    result = p.run_cli("check-config")
    assert result.returncode == 78, result.stderr
    [line] = [l for l in err(result).splitlines() if "scram_sha_256" in l]
    assert "[alice]" in line and "4095 iterations" in line and "odmrd user passwd" in line
    mended = p.run_cli("user", "passwd", "alice", "--password-stdin", input=PASSWORD.encode() + b"\n")
    assert mended.returncode == 0, mended.stderr
    assert p.run_cli("check-config").returncode == 0
    assert accounts.load(p.users).get("alice").scram.iterations == sasl.MIN_SCRAM_ITERATIONS
