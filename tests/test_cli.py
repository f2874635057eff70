"""The `odmrd` command line (SPEC §2): user, enqueue, queue, --version; run as real processes."""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import (PASSWORD, ROOT, Customer, Provider, dsns, odmrd, one_line_error, queue, queue_provider,
                     report_fields, run_cli, send_mail, spool)
from odmr import accounts, sasl

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def conf(tmp_path):
    """A configuration with no users file yet (nothing is listening)."""
    path = tmp_path / "odmrd.conf"
    path.write_text(textwrap.dedent("""\
        hostname = odmr.test
        spool_dir = spool
        users_file = users
        log_file = odmrd.log
        [odmr]
        listen = 127.0.0.1:1
        [smtp]
        listen = 127.0.0.1:1
        max_message_size = 64K
        [queue]
        max_age = 1d
        """))
    return str(path)


@pytest.fixture
def hosted(conf):
    """`conf` with alice (example.org, example.com) and bob (example.net)."""
    users = os.path.join(os.path.dirname(conf), "users")
    accounts.add_user(users, "alice", ["example.org", "example.com"], PASSWORD)
    accounts.add_user(users, "bob", ["example.net"], PASSWORD)
    return conf


def users_path(conf: str) -> str:
    return os.path.join(os.path.dirname(conf), "users")


def spool_dir(conf: str) -> str:
    return os.path.join(os.path.dirname(conf), "spool")


# -- --version and bad flags ------------------------------------------------------------

def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert re.match(rb"^odmrd \d+\.\d+", result.stdout)


@pytest.mark.parametrize("args", [[], ["nosuchcommand"], ["queue"], ["user"], ["user", "add", "x"],
                                  ["enqueue"], ["queue", "list", "--bogus"], ["--bogus"],
                                  ["queue", "show"], ["serve", "--nope"]],
                         ids=["no-command", "unknown-command", "queue-no-action", "user-no-action",
                              "user-add-no-domain", "enqueue-no-rcpt", "queue-list-bad-flag",
                              "global-bad-flag", "queue-show-no-id", "serve-bad-flag"])
def test_bad_flags_exit_64(conf, args):
    result = odmrd(conf, *args)
    assert result.returncode == 64
    assert result.stderr.strip()


def test_config_from_environment(conf):
    result = run_cli("check-config", env={"ODMRD_CONFIG": conf})
    assert b"Traceback" not in result.stderr
    # no users file yet: a configuration problem, reported against the right file
    assert result.returncode == 78
    assert b"users" in result.stderr


def test_missing_config_file_is_one_line_78(tmp_path):
    result = run_cli("-c", str(tmp_path / "nope.conf"), "queue", "list")
    assert result.returncode == 78
    assert "nope.conf" in one_line_error(result)


def test_missing_dependencies_are_named_in_one_line(conf):
    """A server without configobj/idna (a stock python3 before apt-get) gets the fix, not a
    traceback: -S leaves out every site-packages directory, as on a bare interpreter."""
    result = subprocess.run([sys.executable, "-S", os.path.join(ROOT, "odmrd.py"),
                             "-c", conf, "check-config"], capture_output=True, timeout=60)
    assert result.returncode == 69
    line = one_line_error(result)
    assert "configobj" in line and "idna" in line and "python3-configobj" in line


# -- user ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_user_add_list_passwd_del(conf, open_umask):
    result = odmrd(conf, "user", "add", "alice", "--domain", "Example.ORG", "--domain", "example.com",
                   "--password-stdin", input=b"first secret\n")
    assert result.returncode == 0, result.stderr
    users = users_path(conf)
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600
    for name in os.listdir(os.path.dirname(users)):
        path = os.path.join(os.path.dirname(users), name)
        if os.path.isfile(path) and name != "odmrd.conf":
            assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, name
    text = open(users).read()
    assert "first secret" not in text                     # CRAM secret is stored encoded
    account = accounts.load(users).get("alice")
    assert account.domains == ("example.org", "example.com")
    assert account.verify_password("first secret")
    assert account.cram_md5_secret == "first secret"

    result = odmrd(conf, "user", "add", "carol", "--domain", "example.net", "--password-stdin",
                   "--no-cram-md5", input=b"carol pw\n")
    assert result.returncode == 0
    carol = accounts.load(users).get("carol")
    assert carol.cram_md5_secret is None and carol.verify_password("carol pw")
    assert "[carol]" in open(users).read()
    assert "cram_md5" not in open(users).read().split("[carol]")[1]

    listing = odmrd(conf, "user", "list")
    assert listing.returncode == 0
    lines = listing.stdout.decode().splitlines()
    assert [l.split()[0] for l in lines] == ["alice", "carol"]
    assert "example.org,example.com" in lines[0] and "CRAM-MD5" in lines[0]
    assert "CRAM-MD5" not in lines[1]

    result = odmrd(conf, "user", "passwd", "alice", "--password-stdin", input=b"second secret\n")
    assert result.returncode == 0
    account = accounts.load(users).get("alice")
    assert account.verify_password("second secret") and not account.verify_password("first secret")
    assert account.cram_md5_secret == "second secret"
    result = odmrd(conf, "user", "passwd", "alice", "--password-stdin", "--no-cram-md5", input=b"third\n")
    assert result.returncode == 0
    assert accounts.load(users).get("alice").cram_md5_secret is None

    assert odmrd(conf, "user", "del", "carol").returncode == 0
    assert [a.name for a in accounts.load(users)] == ["alice"]
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600


@pytest.fixture
def open_umask():
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.mark.parametrize("args,stdin,code", [
    (["user", "add", "alice", "--domain", "x.test", "--password-stdin"], b"pw\n", 65),
    (["user", "add", "eve", "--domain", "../etc", "--password-stdin"], b"pw\n", 65),
    (["user", "add", "eve", "--domain", "a b.test", "--password-stdin"], b"pw\n", 65),
    (["user", "add", "bad name", "--domain", "x.test", "--password-stdin"], b"pw\n", 65),
    (["user", "add", "eve", "--domain", "x.test", "--password-stdin"], b"\n", 64),
    (["user", "passwd", "nobody", "--password-stdin"], b"pw\n", 67),
    (["user", "del", "nobody"], None, 67),
], ids=["duplicate", "bad-domain", "domain-with-space", "bad-name", "empty-password",
        "passwd-unknown", "del-unknown"])
def test_user_errors_are_one_line_with_exit_code(hosted, args, stdin, code):
    before = open(users_path(hosted), "rb").read()
    result = odmrd(hosted, *args, input=stdin)
    assert result.returncode == code
    one_line_error(result)
    assert open(users_path(hosted), "rb").read() == before


def test_user_list_without_users_file(conf):
    result = odmrd(conf, "user", "list")
    assert result.returncode == 66
    assert "users" in one_line_error(result)


def test_user_list_refuses_a_group_readable_users_file(hosted):
    os.chmod(users_path(hosted), 0o644)
    result = odmrd(hosted, "user", "list")
    assert result.returncode != 0
    assert "chmod 600" in one_line_error(result)


@pytest.mark.slow
def test_accounts_made_by_the_cli_can_log_in(tmp_path):
    p = Provider(str(tmp_path))
    p.add_user("alice", ["example.org"])
    p.start()
    try:
        assert odmrd(p.config, "user", "add", "carol", "--domain", "example.net", "--password-stdin",
                     "--no-cram-md5", input=b"carol-pw\n").returncode == 0
        p.service.reload()

        def auth(mechanism: str, user: str, password: str) -> int:
            c = Customer(p.odmr_port)
            try:
                c.reply()
                c.cmd("EHLO customer.test")
                mech = sasl.client_mechanism(mechanism, user, password)
                first = mech.initial()
                code, lines = c.cmd("AUTH %s%s" % (mechanism, " " + base64.b64encode(first).decode()
                                                   if first else ""))
                while code == 334:
                    code, lines = c.cmd(base64.b64encode(mech.respond(base64.b64decode(lines[0]))).decode())
                return code
            finally:
                c.close()
        assert auth("SCRAM-SHA-256", "carol", "carol-pw") == 235
        assert auth("CRAM-MD5", "carol", "carol-pw") == 535        # no CRAM secret stored
        assert auth("CRAM-MD5", "alice", PASSWORD) == 235
    finally:
        p.stop()


@pytest.mark.slow
@pytest.mark.parametrize("command", [["user", "add", "carol", "--domain", "c.test"],
                                     ["user", "passwd", "alice"]])
def test_user_password_without_a_terminal_is_one_line_not_a_traceback(provider, command):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "odmrd.py"), "-c", provider.config] + command,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30, start_new_session=True)
    assert r.returncode == 64
    assert r.stderr.decode().strip().splitlines() == [
        "odmrd: no terminal to ask for the password on: use --password-stdin"]


# -- enqueue -------------------------------------------------------------------------

MESSAGE = b"Subject: piped\n\nline one\n.\n..two\nlast"


@pytest.mark.slow
def test_enqueue_spools_per_domain_with_crlf(hosted):
    result = odmrd(hosted, "enqueue", "-f", "s@remote.test", "a@example.org", "b@example.com", "c@example.org",
                   input=MESSAGE)
    assert result.returncode == 0, result.stderr
    printed = dict(reversed(l.split()) for l in result.stdout.decode().splitlines())
    assert sorted(printed) == ["example.com", "example.org"]
    records = json.loads(odmrd(hosted, "queue", "list", "--json").stdout)
    by_domain = {r["domain"]: r for r in records}
    assert by_domain["example.org"]["recipients"] == ["a@example.org", "c@example.org"]
    assert by_domain["example.com"]["recipients"] == ["b@example.com"]
    assert by_domain["example.org"]["id"] == printed["example.org"]
    path = os.path.join(spool_dir(hosted), "example.org", printed["example.org"])
    data = open(path, "rb").read().split(b"\n\n", 1)[1]
    assert data.startswith(b"Received: by odmr.test")
    # a lone dot is content (sendmail -oi), line endings become CRLF, a final newline is added
    assert data.endswith(b"Subject: piped\r\n\r\nline one\r\n.\r\n..two\r\nlast\r\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.slow
@pytest.mark.parametrize("args,stdin,code", [
    (["-f", "s@remote.test", "a@evil.test"], MESSAGE, 67),
    (["-f", "s@remote.test", "a@example.org", "a@evil.test"], MESSAGE, 67),
    (["-f", "s@remote.test", "a@example.org@evil.test"], MESSAGE, 67),
    (["-f", "s@remote.test", "a@example.org"], b"", 65),
    (["-f", "s@remote.test", "a@example.org"], b"x" * 70000, 65),
    (["-f", "nodomain", "a@example.org"], MESSAGE, 65),
    (["-f", "s@remote.test", "not an address"], MESSAGE, 65),
    (["--bogus", "a@example.org"], MESSAGE, 64),
    # the intake port's limits (odmr.submission): 553 5.1.7 and 501 5.1.3 there
    (["-f", "s" * 250 + "@remote.test", "a@example.org"], MESSAGE, 65),
    (["-f", "s@remote.test", "a" * 250 + "@example.org"], MESSAGE, 65),
], ids=["not-hosted", "one-not-hosted", "double-at", "empty", "too-big", "bad-sender",
        "bad-recipient", "bad-flag", "sender-too-long", "recipient-too-long"])
def test_enqueue_exit_codes(hosted, args, stdin, code):
    result = odmrd(hosted, "enqueue", *args, input=stdin)
    assert result.returncode == code, result.stderr
    one_line_error(result)
    # nothing partial is left behind
    root = spool_dir(hosted)
    for dirpath, _, files in os.walk(root):
        assert files == [] or all(f == ".lock" for f in files), (dirpath, files)


@pytest.mark.slow
def test_enqueue_defers_what_the_administrator_can_fix(hosted):
    """A pipe transport bounces on any code but 75: a broken configuration, users file or
    spool must keep the mail at the MTA, not return it to its sender."""
    with open(hosted) as fh:
        good = fh.read()
    with open(hosted, "a") as fh:
        fh.write("no_such_key = 1\n")
    result = odmrd(hosted, "enqueue", "-f", "s@remote.test", "a@example.org", input=MESSAGE)
    assert result.returncode == 75 and b"no_such_key" in result.stderr
    with open(hosted, "w") as fh:
        fh.write(good)
    users = users_path(hosted)
    os.chmod(users, 0o644)                                  # refused: others can read it
    result = odmrd(hosted, "enqueue", "-f", "s@remote.test", "a@example.org", input=MESSAGE)
    assert result.returncode == 75, result.stderr
    os.chmod(users, 0o600)
    root = spool_dir(hosted)
    shutil.rmtree(root, ignore_errors=True)
    with open(root, "w") as fh:                              # the spool is a file: unusable
        fh.write("not a directory")
    result = odmrd(hosted, "enqueue", "-f", "s@remote.test", "a@example.org", input=MESSAGE)
    assert result.returncode == 75, result.stderr
    one_line_error(result)


@pytest.mark.slow
def test_parallel_enqueues_never_pass_the_quota(hosted):
    """README: transactions on any process never grow a domain past its quota. Every
    `odmrd enqueue` below has passed its early quota check (its spool file is open)
    before any of them gets its message; the commit checks again, under the lock."""
    with open(hosted, "a") as fh:
        fh.write("[domains]\n[[example.org]]\nmax_messages = 2\n")
    command = [sys.executable, os.path.join(ROOT, "odmrd.py"), "-c", hosted, "enqueue",
               "-f", "s@remote.test", "a@example.org"]
    runs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for _ in range(5)]
    try:
        incoming = os.path.join(spool_dir(hosted), "example.org", "tmp")
        deadline = time.monotonic() + 60
        while not (os.path.isdir(incoming) and len(os.listdir(incoming)) >= len(runs)):
            assert time.monotonic() < deadline, "the enqueues never opened their spool files"
            assert all(run.poll() is None for run in runs), [r.stderr.read() for r in runs]
            time.sleep(0.05)
        results = [run.communicate(MESSAGE, timeout=60) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 0, 75, 75, 75], results
    for run, (_, err) in zip(runs, results):
        if run.returncode:
            assert err.decode().strip() == "odmrd: domain example.org is over quota", err
    records = json.loads(odmrd(hosted, "queue", "list", "--json").stdout)
    assert len(records) == 2, records


@pytest.mark.slow
def test_enqueue_null_sender(hosted):
    result = odmrd(hosted, "enqueue", "-f", "", "a@example.org", input=MESSAGE)
    assert result.returncode == 0
    [record] = json.loads(odmrd(hosted, "queue", "list", "--json").stdout)
    assert record["sender"] == ""


# -- queue --------------------------------------------------------------------------

def enqueue(conf: str, *rcpts: str, sender: str = "s@remote.test", body: bytes = MESSAGE) -> dict:
    result = odmrd(conf, "enqueue", "-f", sender, *rcpts, input=body)
    assert result.returncode == 0, result.stderr
    return {l.split()[1]: l.split()[0] for l in result.stdout.decode().splitlines()}


@pytest.mark.slow
def test_queue_list_json_keys_and_domain_filter(hosted):
    ids = enqueue(hosted, "a@example.org", "b@example.net")
    records = json.loads(odmrd(hosted, "queue", "list", "--json").stdout)
    assert len(records) == 2
    for record in records:
        assert list(record) == ["id", "domain", "size", "age", "sender", "recipients", "attempts", "last_error"]
        assert record["id"] == ids[record["domain"]]
        assert isinstance(record["size"], int) and record["size"] > len(MESSAGE)
        assert isinstance(record["age"], int) and 0 <= record["age"] < 60
        assert record["sender"] == "s@remote.test"
        assert record["attempts"] == 0 and record["last_error"] == ""
    only = json.loads(odmrd(hosted, "queue", "list", "EXAMPLE.NET", "--json").stdout)
    assert [r["domain"] for r in only] == ["example.net"]
    assert json.loads(odmrd(hosted, "queue", "list", "example.com", "--json").stdout) == []
    text = odmrd(hosted, "queue", "list").stdout.decode()
    assert ids["example.org"] in text and ids["example.net"] in text and "<b@example.net>" in text


@pytest.mark.slow
def test_queue_list_empty_and_bad_domain(hosted):
    result = odmrd(hosted, "queue", "list")
    assert result.returncode == 0 and b"empty" in result.stdout
    assert json.loads(odmrd(hosted, "queue", "list", "--json").stdout) == []
    result = odmrd(hosted, "queue", "list", "../etc")
    assert result.returncode == 64
    one_line_error(result)


@pytest.mark.slow
def test_queue_show_and_delete(hosted):
    ids = enqueue(hosted, "a@example.org")
    msg_id = ids["example.org"]
    shown = odmrd(hosted, "queue", "show", msg_id)
    assert shown.returncode == 0
    head, _, data = shown.stdout.partition(b"\n\n")
    assert json.loads(head)["id"] == msg_id
    assert data.endswith(b"line one\r\n.\r\n..two\r\nlast\r\n")
    assert odmrd(hosted, "queue", "delete", msg_id).returncode == 0
    assert json.loads(odmrd(hosted, "queue", "list", "--json").stdout) == []
    for args in (["show", msg_id], ["delete", msg_id], ["show", "../../users"], ["bounce", "zzz"]):
        result = odmrd(hosted, "queue", *args)
        assert result.returncode == 66, args
        assert msg_id in one_line_error(result) or args[1] in result.stderr.decode()


@pytest.mark.slow
def test_queue_delete_of_a_domain_being_delivered_is_75(hosted):
    from odmr.spool import Spool
    ids = enqueue(hosted, "a@example.org")
    spool = Spool(spool_dir(hosted))
    with spool.claim(["example.org"]):
        result = odmrd(hosted, "queue", "delete", ids["example.org"])
        assert result.returncode == 75
        assert "example.org" in one_line_error(result)
    assert len(json.loads(odmrd(hosted, "queue", "list", "--json").stdout)) == 1


def age_message(conf: str, domain: str, msg_id: str, seconds: float) -> None:
    """Move a message's arrival time into the past (the spool format is plain text)."""
    path = os.path.join(spool_dir(conf), domain, msg_id)
    with open(path, "rb") as fh:
        raw = fh.read()
    head, sep, data = raw.partition(b"\n\n")
    old = re.search(rb"^Arrival: ([0-9.]+)$", head, re.M).group(1)
    new = b"%.6f" % (float(old) - seconds)
    with open(path, "wb") as fh:
        fh.write(head.replace(b"Arrival: " + old, b"Arrival: " + new) + sep + data)


@pytest.mark.slow
def test_queue_expire_null_sender_dropped_young_kept(hosted):
    old = enqueue(hosted, "a@example.org", sender="")["example.org"]
    young = enqueue(hosted, "b@example.org", sender="")["example.org"]
    age_message(hosted, "example.org", old, 2 * 86400)
    result = odmrd(hosted, "queue", "expire")
    assert result.returncode == 0
    assert b"1 expired" in result.stdout
    records = json.loads(odmrd(hosted, "queue", "list", "--json").stdout)
    assert [r["id"] for r in records] == [young]


@pytest.mark.slow
def test_queue_expire_bounces_to_sender(hosted):
    old = enqueue(hosted, "a@example.org", sender="someone@example.com")["example.org"]
    age_message(hosted, "example.org", old, 2 * 86400)
    result = odmrd(hosted, "queue", "expire")
    assert result.returncode == 0
    [dsn] = json.loads(odmrd(hosted, "queue", "list", "--json").stdout)
    assert dsn["domain"] == "example.com" and dsn["recipients"] == ["someone@example.com"]
    assert b"5.4.7" in odmrd(hosted, "queue", "show", dsn["id"]).stdout


@pytest.mark.slow
def test_queue_bounce_returns_to_sender(hosted):
    ids = enqueue(hosted, "a@example.org", sender="someone@remote.test")
    result = odmrd(hosted, "queue", "bounce", ids["example.org"])
    assert result.returncode == 0
    records = json.loads(odmrd(hosted, "queue", "list", "--json").stdout)
    # the sender is not hosted: the DSN waits for bounce_relay in the outbound queue
    assert [r["recipients"] for r in records] == [["someone@remote.test"]]
    assert records[0]["domain"] != "example.org"


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


@pytest.mark.slow
def test_pending_bounces_are_listed_by_the_name_queue_list_shows(hosted):
    """SPEC §2: whatever `queue list` shows in its domain column is a DOMAIN argument."""
    ids = enqueue(hosted, "a@example.org", sender="someone@remote.test")
    waiting = enqueue(hosted, "b@example.org")["example.org"]
    assert odmrd(hosted, "queue", "bounce", ids["example.org"]).returncode == 0
    text = odmrd(hosted, "queue", "list").stdout.decode()
    assert ".outbound" in text and "-- 2 messages" in text
    outbound = odmrd(hosted, "queue", "list", ".outbound", "--json")
    assert outbound.returncode == 0
    [dsn] = json.loads(outbound.stdout)
    assert dsn["domain"] == ".outbound" and dsn["recipients"] == ["someone@remote.test"]
    only = odmrd(hosted, "queue", "list", ".outbound").stdout.decode()
    assert "-- 1 message, " in only and waiting not in only
    bad = odmrd(hosted, "queue", "list", "..outbound")
    assert bad.returncode == 64 and ".outbound" in one_line_error(bad)


@pytest.mark.slow
def test_queue_bounce_of_null_sender_just_removes(hosted):
    ids = enqueue(hosted, "a@example.org", sender="")
    result = odmrd(hosted, "queue", "bounce", ids["example.org"])
    assert result.returncode == 0
    assert json.loads(odmrd(hosted, "queue", "list", "--json").stdout) == []


@pytest.mark.slow
def test_queue_list_survives_a_corrupt_file(hosted):
    enqueue(hosted, "a@example.org")
    with open(os.path.join(spool_dir(hosted), "example.org", "0" * 13 + "00000000"), "wb") as fh:
        fh.write(b"junk")
    result = odmrd(hosted, "queue", "list", "--json")
    assert result.returncode == 0
    assert len(json.loads(result.stdout)) == 1


def test_fetch_arguments_reach_the_fetch_command(conf):
    """`-c FILE fetch --server ...`: options after `fetch` belong to it, not to the top level."""
    from helpers import free_port
    port = free_port()                      # nothing listens there
    result = odmrd(conf, "fetch", "--server", "127.0.0.1:%d" % port, "--user", "alice", "--tls", "none",
                   "--relay", "127.0.0.1:%d" % port, env={"ODMR_PASSWORD": "x"})
    assert result.returncode == 75
    assert "unrecognized" not in one_line_error(result)


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_and_argument_has_help():
    """`--help` of every subcommand describes each of its options."""
    from odmr.cli import build_parser
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, "%s: %s has no help" % (parser.prog, action.dest)
    text = run_cli("user", "add", "--help").stdout.decode()
    assert "repeat" in text and "--password-stdin" in text
    fetch = run_cli("fetch", "--help").stdout.decode()
    assert "--domain" in fetch and "repeatable" in fetch


def test_users_example_shows_every_field_the_readme_documents():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    section = readme[readme.index("## The users file"):readme.index("## The ODMR port")]
    fields = set(re.findall(r"^- `([a-z_0-9]+)`", section, re.M))
    assert {"scram_sha_256", "cram_md5", "client_cert", "shared_domains"} <= fields
    with open(os.path.join(ROOT, "conf", "users.example"), encoding="utf-8") as fh:
        example = fh.read()
    for field in fields | {"domains"}:
        assert re.search(r"^# %s = " % field, example, re.M), field


def test_user_commands_never_follow_a_planted_lock_link(hosted, tmp_path):
    """The users file's lock is opened without following a link: root must not chmod or
    create whatever a link there points at."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    os.chmod(str(victim), 0o644)
    lock = os.path.join(os.path.dirname(users_path(hosted)), ".users.lock")
    if os.path.exists(lock):
        os.unlink(lock)
    os.symlink(str(victim), lock)
    result = odmrd(hosted, "user", "add", "mallory", "--domain", "m.test", "--password-stdin",
                   input=b"pw\n")
    assert result.returncode != 0 and "symbolic link" in one_line_error(result)
    assert stat.S_IMODE(os.stat(str(victim)).st_mode) == 0o644
    assert victim.read_text() == "keep me" and os.path.islink(lock)


@pytest.mark.slow
def test_queue_list_escapes_what_peers_wrote(hosted):
    """Bidi overrides and escape sequences in an address never reach the operator's terminal."""
    enqueue(hosted, "a\u202eb@example.org", sender="x\u2066y@remote.test")
    text = odmrd(hosted, "queue", "list").stdout.decode()
    assert "\u202e" not in text and "\u2066" not in text
    assert "a\\u202eb@example.org" in text and "x\\u2066y@remote.test" in text


@pytest.mark.slow
def test_check_config_refuses_what_serve_cannot_start_with(hosted, tmp_path):
    """A log file in a missing directory or a listen address this host does not have:
    serve stops on them after an init script's restart has already stopped the daemon."""
    with open(hosted) as fh:
        good = fh.read()
    assert odmrd(hosted, "check-config").returncode in (0, 78)
    text = good.replace("log_file = odmrd.log\n", "log_file = %s\n" % (tmp_path / "missing" / "odmrd.log"))
    text = text.replace("[smtp]\nlisten = 127.0.0.1:1", "[smtp]\nlisten = 192.0.2.1:25")
    with open(hosted, "w") as fh:
        fh.write(text)
    result = odmrd(hosted, "check-config")
    assert result.returncode == 78
    err = result.stderr.decode()
    assert "log_file %s" % (tmp_path / "missing" / "odmrd.log") in err
    assert "[smtp] listen: 192.0.2.1 is not an address of this host" in err


@pytest.mark.parametrize("kind", ["a directory", "a symbolic link", "a special file"])
def test_check_config_refuses_a_pid_file_that_is_no_file(hosted, tmp_path, kind):
    """serve cannot take a directory, a link (never followed) or a FIFO for its pid file:
    an init script's restart must not stop the daemon for it (root passes os.access)."""
    path = tmp_path / "in-the-way"
    if kind == "a directory":
        path.mkdir()
    elif kind == "a symbolic link":
        path.symlink_to(tmp_path / "elsewhere.pid")
    else:
        os.mkfifo(path)
    with open(hosted) as fh:
        text = fh.read()
    with open(hosted, "w") as fh:
        fh.write("pid_file = %s\n" % path + text)
    result = odmrd(hosted, "check-config")
    assert result.returncode == 78
    assert "pid file %s: %s, not a file" % (path, kind) in result.stderr.decode()


@pytest.mark.slow
def test_queue_changes_are_logged_where_the_daemon_logs(hosted, tmp_path):
    """SPEC §8: each message accepted (also by enqueue), bounced or deleted is one log line,
    in the daemon's log, not dropped because the command is not the daemon."""
    log_file = tmp_path / "odmrd.log"
    with open(hosted) as fh:
        text = fh.read()
    with open(hosted, "w") as fh:
        fh.write("syslog = no\n" + text)       # the fixture's log_file: odmrd.log beside it
    ids = enqueue(hosted, "a@example.org", "b@example.net", sender="s@remote.test")
    assert odmrd(hosted, "queue", "delete", ids["example.net"]).returncode == 0
    assert odmrd(hosted, "queue", "bounce", ids["example.org"]).returncode == 0
    lines = log_file.read_text().splitlines()
    for msg_id in ids.values():
        assert any("enqueue: accepted id=%s" % msg_id in l for l in lines), lines
    assert any("deleted id=%s" % ids["example.net"] in l for l in lines), lines
    assert any("bounced id=%s" % ids["example.org"] in l for l in lines), lines


@pytest.mark.slow
def test_a_pending_bounce_is_never_bounced_away(hosted):
    """Bouncing a bounce would drop it silently: refused, it stays, and delete is named."""
    ids = enqueue(hosted, "a@example.org", sender="someone@remote.test")
    assert odmrd(hosted, "queue", "bounce", ids["example.org"]).returncode == 0
    [dsn] = json.loads(odmrd(hosted, "queue", "list", ".OUTBOUND", "--json").stdout)
    result = odmrd(hosted, "queue", "bounce", dsn["id"])
    assert result.returncode == 65
    assert "queue delete %s" % dsn["id"] in one_line_error(result)
    assert [r["id"] for r in json.loads(odmrd(hosted, "queue", "list", "--json").stdout)] == [dsn["id"]]
    assert odmrd(hosted, "queue", "expire").stdout.decode().strip() == "0 expired"


@pytest.mark.slow
def test_queue_delete_of_a_bounce_being_relayed_is_75(hosted):
    """The bounce relay holds the OUTBOUND claim while it hands bounces on: deleting one
    then must wait, as for a domain being delivered, not race the relay's results."""
    from odmr.spool import OUTBOUND, Spool
    ids = enqueue(hosted, "a@example.org", sender="someone@remote.test")
    assert odmrd(hosted, "queue", "bounce", ids["example.org"]).returncode == 0
    [dsn] = json.loads(odmrd(hosted, "queue", "list", ".OUTBOUND", "--json").stdout)
    with Spool(spool_dir(hosted)).claim([OUTBOUND]):
        result = odmrd(hosted, "queue", "delete", dsn["id"])
        assert result.returncode == 75
        assert "bounce relay" in one_line_error(result)
        assert [r["id"] for r in json.loads(odmrd(hosted, "queue", "list", "--json").stdout)] == [dsn["id"]]
    assert odmrd(hosted, "queue", "delete", dsn["id"]).returncode == 0
    assert json.loads(odmrd(hosted, "queue", "list", "--json").stdout) == []


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_reader_that_leaves_early_is_no_spool_error(hosted):
    """`queue show ID | head`: the pipe closing is not the spool's fault: no error line."""
    [msg_id] = enqueue(hosted, "a@example.org").values()
    read_end, write_end = os.pipe()
    os.close(read_end)                              # the reader is gone before the first line
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "odmrd.py"), "-c", hosted, "queue",
                             "show", msg_id], stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    err = proc.stderr.read()
    proc.stderr.close()
    assert (proc.wait(30), err) == (141, b"")


@pytest.mark.slow
def test_listing_a_domain_that_is_not_hosted_says_so(hosted):
    for name in ("nosuch.example", "outbound"):
        result = odmrd(hosted, "queue", "list", name)
        assert result.returncode == 0 and result.stdout.strip() == b"Mail queue is empty"
        assert b"is not a hosted domain (.outbound holds the bounces" in result.stderr
    assert odmrd(hosted, "queue", "list", "example.org").stderr == b""
