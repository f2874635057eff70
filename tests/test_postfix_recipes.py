"""The README's "Recipes: Postfix around odmrd", run with a real Postfix and real mail.

Each test reads its configuration blocks from README.md (the `<!-- recipe: NAME -->`
markers), fills in the placeholders, and runs them in a private Postfix instance
(helpers.PostfixInstance): what the README shows is what is tested. Postfix takes
a moment to start, so each recipe's instance is shared by the tests of this module.

- front MX, SMTP transport: Postfix → odmrd's intake → spool → ATRN → `odmrd fetch`
- front MX, pipe transport: Postfix → `odmrd enqueue` as the service account
  (the single-file build on /usr/bin/python3) → spool; a domain odmrd does not
  host comes back as Postfix's bounce, itself spooled through the pipe
- customer MTA: provider → `odmrd fetch --relay` or fetchmail → Postfix → virtual Maildir
"""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

import pytest

from helpers import PASSWORD, ROOT, PostfixInstance, Provider, free_port, postfix_unavailable, reply_line, \
    run_cli, send_mail, stop_quickly, wait_idle, empty_spool, which, write_config
from odmr import accounts, replies

pytestmark = [pytest.mark.skipif(postfix_unavailable() is not None, reason=postfix_unavailable() or ""),
              pytest.mark.slow]           # a real Postfix instance

README = os.path.join(ROOT, "README.md")
SECTION = "## Recipes: Postfix around odmrd"
SENDER = "sender@outside.test"


# -- the recipes, as the README shows them -------------------------------------------

def recipe(name: str, values: Dict[str, str]) -> str:
    """The indented block after `<!-- recipe: NAME -->` in the README's recipe section,
    with every placeholder in `values` replaced (each must occur)."""
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    assert SECTION in text, "README has no section %r" % SECTION
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    marker = "<!-- recipe: %s -->" % name
    assert marker in section, "README's recipe section has no block %r" % marker
    lines = section.split(marker, 1)[1].split("\n")[1:]
    while lines and not lines[0].strip():
        lines.pop(0)
    block = []
    for line in lines:
        if line.startswith("    "):
            block.append(line[4:])
        elif line.strip():
            break
        else:
            block.append("")
    body = "\n".join(block).strip("\n") + "\n"
    for placeholder, value in values.items():
        assert placeholder in body, "recipe %r has no %r any more" % (name, placeholder)
        body = body.replace(placeholder, value)
    return body


def poll(predicate: Callable[[], bool], what: str, postfix: PostfixInstance, timeout: float = 30):
    """Wait for Postfix to get something done; flush its queue now and then (a deferred
    message would otherwise wait minutes) and show its log when it does not happen."""
    deadline = time.monotonic() + timeout
    next_flush = time.monotonic() + 3
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s; Postfix queue %s\n%s"
                                 % (what, postfix.queue(), postfix.log()[-4000:]))
        if time.monotonic() > next_flush:
            postfix.flush()
            next_flush = time.monotonic() + 3
        time.sleep(0.1)


def queue_list(config: str) -> List[dict]:
    result = run_cli("-c", config, "queue", "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def queue_show(config: str, msg_id: str) -> bytes:
    """The message as `queue show` prints it after its description and an empty line."""
    result = run_cli("-c", config, "queue", "show", msg_id)
    assert result.returncode == 0, result.stderr
    return result.stdout.split(b"\n\n", 1)[1]


def message(subject: str, to: str, sender: str = SENDER) -> bytes:
    return ("From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-ID: <%s@outside.test>\r\n\r\n"
            "Sent through a recipe.\r\n.a line with a leading dot\r\n" % (sender, to, subject, subject)).encode()


def header_block(data: bytes) -> str:
    return data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")


# -- provider: Postfix as the front MX, SMTP transport to the intake -----------------------

@pytest.fixture(scope="module")
def mx_smtp(tmp_path_factory):
    provider = Provider(str(tmp_path_factory.mktemp("mx-smtp")))
    provider.add_user("alice", ["example.org", "example.com"])
    provider.start()
    postfix = None
    try:
        port = str(provider.smtp_port)
        with open(provider.config) as fh:
            config = fh.read()
        for line in recipe("mx-smtp odmrd.conf", {"INTAKE_PORT": port}).splitlines():
            assert line.strip() in config       # the provider runs the README's [smtp] listen
        postfix = PostfixInstance("mx", recipe("mx-smtp main.cf", {"INTAKE_PORT": port}),
                                  smtpd_port=free_port())
        postfix.start()
        yield provider, postfix
    finally:
        if postfix is not None:
            postfix.stop()
        stop_quickly(provider)


def test_front_mx_relays_to_the_intake_and_atrn_delivers(mx_smtp, tmp_path):
    provider, postfix = mx_smtp
    rcpts = ["alice@example.org", "info@example.com"]
    data = message("front-mx-smtp", "alice@example.org")
    assert send_mail(postfix.smtpd_port, SENDER, rcpts, data) == {}

    poll(lambda: len(queue_list(provider.config)) == 2, "both domains' copies in odmrd's spool", postfix)
    waiting = sorted(queue_list(provider.config), key=lambda m: m["domain"])
    assert [(m["domain"], m["sender"], m["recipients"]) for m in waiting] == [
        ("example.com", SENDER, ["info@example.com"]), ("example.org", SENDER, ["alice@example.org"])]
    postfix.wait_queue_empty()
    # Postfix's log lines reach maillog_file through postlogd, a moment after the delivery
    poll(lambda: "status=sent" in postfix.log(), "the delivery in Postfix's log", postfix)
    assert "relay=127.0.0.1[127.0.0.1]:%d" % provider.smtp_port in postfix.log()

    # odmrd saw Postfix as its client: from 127.0.0.1, HELO = Postfix's myhostname
    headers = header_block(queue_show(provider.config, waiting[1]["id"]))
    assert re.match(r"Received: from %s \([^)]*\[127\.0\.0\.1\]\)\s+by odmr\.test \(odmrd\)"
                    % re.escape(postfix.hostname), headers), headers
    assert "by %s (Postfix)" % postfix.hostname in headers

    maildir = tmp_path / "maildir"
    result = run_cli("fetch", "--server", "127.0.0.1:%d" % provider.odmr_port, "--tls", "none",
                     "--user", "alice", "--maildir", str(maildir), env={"ODMR_PASSWORD": PASSWORD})
    assert result.returncode == 0, result.stderr
    delivered = sorted((maildir / "new").iterdir())
    assert len(delivered) == 2
    for path in delivered:
        content = path.read_bytes()
        assert b"Subject: front-mx-smtp" in content
        assert b"by %s (Postfix)" % postfix.hostname.encode() in content
        assert content.endswith(b"\n\nSent through a recipe.\n.a line with a leading dot\n")  # Maildir: LF
    assert queue_list(provider.config) == []
    assert postfix.queue() == []


# -- provider: Postfix as the front MX, pipe transport into `odmrd enqueue` --------------------

SERVICE_ACCOUNT = "nobody"      # stands in for the README's `odmr`
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def mx_pipe():
    """odmrd's files where the service account can reach them (not under root's 0700
    pytest directory), the single-file build run by /usr/bin/python3, and Postfix."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("the pipe runs the single-file build (#!/usr/bin/env python3) with %s, "
                    "which is missing" % SYSTEM_PYTHON)
    account = pwd.getpwnam(SERVICE_ACCOUNT)
    base = tempfile.mkdtemp(prefix="odmr-pipe-", dir="/tmp")
    postfix = None
    try:
        os.chmod(base, 0o755)
        pyz = os.path.join(base, "odmrd.pyz")
        build = subprocess.run([sys.executable, "-m", "odmr.build", "-o", pyz], cwd=ROOT,
                               capture_output=True, timeout=120)
        assert build.returncode == 0, build.stderr
        config = write_config(base, free_port(), free_port(), extra="user = %s" % SERVICE_ACCOUNT)
        os.chmod(config, 0o644)
        spool = os.path.join(base, "spool")
        os.mkdir(spool, 0o700)
        os.chown(spool, account.pw_uid, account.pw_gid)
        master = recipe("mx-pipe master.cf", {"/usr/local/bin/odmrd": pyz, "/etc/odmrd/odmrd.conf": config,
                                              "user=odmr": "user=%s" % SERVICE_ACCOUNT})
        postfix = PostfixInstance("mxpipe", recipe("mx-pipe main.cf", {}), master, smtpd_port=free_port())
        postfix.start()
        yield config, postfix
    finally:
        if postfix is not None:
            postfix.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pipe_site(mx_pipe):
    """Accounts alice (example.org) and bob (example.com), an empty spool and Postfix queue."""
    config, postfix = mx_pipe
    base = os.path.dirname(config)
    account = pwd.getpwnam(SERVICE_ACCOUNT)
    users = os.path.join(base, "users")
    if os.path.exists(users):
        os.unlink(users)
    accounts.add_user(users, "alice", ["example.org"], PASSWORD, True)
    accounts.add_user(users, "bob", ["example.com"], PASSWORD, True)
    os.chown(users, account.pw_uid, account.pw_gid)
    empty_spool(os.path.join(base, "spool"))
    postfix.delete_all()
    yield config, postfix


def test_front_mx_pipe_spools_one_copy_per_recipient(pipe_site):
    config, postfix = pipe_site
    rcpts = ["alice@example.org", "sales@example.org", "info@example.com"]
    data = message("front-mx-pipe", "alice@example.org")
    assert send_mail(postfix.smtpd_port, SENDER, rcpts, data) == {}

    poll(lambda: len(queue_list(config)) == 3, "three spooled copies", postfix)
    postfix.wait_queue_empty()
    waiting = queue_list(config)
    assert sorted((m["domain"], m["sender"], tuple(m["recipients"])) for m in waiting) == [
        ("example.com", SENDER, ("info@example.com",)),
        ("example.org", SENDER, ("alice@example.org",)),
        ("example.org", SENDER, ("sales@example.org",))]
    uid = pwd.getpwnam(SERVICE_ACCOUNT).pw_uid
    for entry in waiting:
        spooled = queue_show(config, entry["id"])
        headers = header_block(spooled)
        assert headers.startswith("Received: by odmr.test (odmrd enqueue, uid %d)" % uid), headers
        assert "by %s (Postfix)" % postfix.hostname in headers
        assert "Return-Path:" not in headers and "Delivered-To:" not in headers   # a relay hop
        assert spooled.endswith(b"Sent through a recipe.\r\n.a line with a leading dot\r\n")
    poll(lambda: postfix.log().count("status=sent") >= 3, "the deliveries in Postfix's log", postfix)
    assert postfix.log().count("status=sent") == 3


def test_front_mx_pipe_bounces_mail_for_a_domain_odmrd_does_not_host(pipe_site):
    """Postfix still relays example.com after its account was deleted at odmrd: enqueue
    exits 67 and Postfix returns the message; the bounce (from <>) goes to a sender in
    example.org, so it comes back through the same pipe into odmrd's spool."""
    config, postfix = pipe_site
    deleted = run_cli("-c", config, "user", "del", "bob")
    assert deleted.returncode == 0, deleted.stderr
    writer = "writer@example.org"
    assert send_mail(postfix.smtpd_port, writer, ["info@example.com"],
                     message("not-hosted", "info@example.com", sender=writer)) == {}

    poll(lambda: len(queue_list(config)) == 1, "the bounce in odmrd's spool", postfix)
    postfix.wait_queue_empty()
    (bounce,) = queue_list(config)
    assert (bounce["domain"], bounce["sender"], bounce["recipients"]) == ("example.org", "", [writer])
    report = queue_show(config, bounce["id"]).decode("utf-8", "replace")
    assert "multipart/report" in report and "MAILER-DAEMON" in report
    assert "Final-Recipient: rfc822; info@example.com" in report
    assert "Status: 5.1.1" in report
    unfolded = re.sub(r"\r?\n[ \t]+", " ", report)
    assert "Diagnostic-Code: x-unix; odmrd: recipient <info@example.com>: domain example.com is " \
        "not hosted here" in unfolded                                 # enqueue's one line
    assert "Subject: not-hosted" in report                  # the returned message's headers
    poll(lambda: re.search(r"to=<info@example\.com>.*status=bounced", postfix.log()),
         "the bounce in Postfix's log", postfix)


# -- customer: Postfix behind `odmrd fetch --relay` and behind fetchmail --------------------

@pytest.fixture(scope="module")
def customer_site(tmp_path_factory):
    """A provider (alice: example.org, example.com; bob: example.net) and the customer's Postfix."""
    provider = Provider(str(tmp_path_factory.mktemp("customer")), odmr_extra="auth_throttle_failures = 0")
    provider.add_user("alice", ["example.org", "example.com"])
    provider.add_user("bob", ["example.net"])
    provider.start()
    vmail = pwd.getpwnam(SERVICE_ACCOUNT)           # stands in for the README's vmail (uid 5000)
    mail = tempfile.mkdtemp(prefix="odmr-vmail-", dir="/tmp")
    postfix = None
    try:
        os.chmod(mail, 0o755)
        os.chown(mail, vmail.pw_uid, vmail.pw_gid)
        handover = free_port()
        main = recipe("customer main.cf", {
            "/var/mail/vhosts": mail,
            "virtual_uid_maps = static:5000": "virtual_uid_maps = static:%d" % vmail.pw_uid,
            "virtual_gid_maps = static:5000": "virtual_gid_maps = static:%d" % vmail.pw_gid})
        master = recipe("customer master.cf", {"HANDOVER_PORT": str(handover)})
        postfix = PostfixInstance("customer", main, master)
        postfix.start()
        postfix.wait_greeting(handover)
        yield provider, postfix, handover, mail
    finally:
        if postfix is not None:
            postfix.stop()
        shutil.rmtree(mail, ignore_errors=True)
        stop_quickly(provider)


@pytest.fixture
def customer(customer_site):
    provider, postfix, handover, mail = customer_site
    wait_idle(provider)
    empty_spool(provider.spool_dir)
    for name in os.listdir(mail):
        shutil.rmtree(os.path.join(mail, name))
    postfix.delete_all()
    yield customer_site
    wait_idle(provider)


def mailbox(mail: str, domain: str, user: str) -> List[bytes]:
    new = os.path.join(mail, domain, user, "new")
    if not os.path.isdir(new):
        return []
    result = []
    for name in sorted(os.listdir(new)):
        with open(os.path.join(new, name), "rb") as fh:
            result.append(fh.read())
    return result


def assert_from_the_provider(delivered: bytes, postfix: PostfixInstance, rcpt: str) -> None:
    """Postfix's trace header: HELO is the provider's hostname, the client is 127.0.0.1."""
    headers = header_block(delivered)
    assert re.search(r"^Received: from odmr\.test \(localhost \[127\.0\.0\.1\]\)\s+by %s \(Postfix\) "
                     r"with E?SMTP id \w+\s+for <%s>" % (re.escape(postfix.hostname), re.escape(rcpt)),
                     headers, re.M), headers
    assert "by odmr.test (odmrd)" in headers
    assert headers.count("Return-Path:") == 1


def send_for_customer(provider: Provider) -> None:
    assert send_mail(provider.smtp_port, "writer@example.net", ["alice@example.org", "info@example.com"],
                     message("for-the-customer", "alice@example.org", sender="writer@example.net")) == {}
    assert len(provider.spooled("example.org")) == 1 and len(provider.spooled("example.com")) == 1


def test_customer_postfix_behind_odmrd_fetch_relay(customer):
    provider, postfix, handover, mail = customer
    send_for_customer(provider)
    assert send_mail(provider.smtp_port, "writer@example.net", ["nosuch@example.org"],
                     message("unknown-mailbox", "nosuch@example.org", sender="writer@example.net")) == {}

    result = run_cli("fetch", "--server", "127.0.0.1:%d" % provider.odmr_port, "--tls", "none",
                     "--user", "alice", "--relay", "127.0.0.1:%d" % handover, env={"ODMR_PASSWORD": PASSWORD})
    assert result.returncode == 0, result.stderr

    poll(lambda: mailbox(mail, "example.org", "alice") and mailbox(mail, "example.com", "info"),
         "delivery into the virtual Maildirs", postfix)
    postfix.wait_queue_empty()
    (alice,), (info,) = mailbox(mail, "example.org", "alice"), mailbox(mail, "example.com", "info")
    assert_from_the_provider(alice, postfix, "alice@example.org")
    assert_from_the_provider(info, postfix, "info@example.com")
    assert b"Subject: for-the-customer" in alice
    assert provider.spooled("example.org") == [] and provider.spooled("example.com") == []
    # the mailbox Postfix does not know: 550 5.1.1 there, so the provider returned it
    (bounce_id,) = provider.spooled("example.net")
    report = provider.spool.load("example.net", bounce_id).read_data()
    assert b"nosuch@example.org" in report and b"5.1.1" in report


def test_customer_handover_listener_does_not_relay(customer):
    """The provider arrives from 127.0.0.1: the hand-over listener must not trust it."""
    provider, postfix, handover, mail = customer
    with smtplib.SMTP("127.0.0.1", handover, timeout=10) as s:
        s.ehlo("odmr.test")
        assert s.mail("writer@example.net")[0] == 250
        assert s.rcpt("alice@example.org")[0] == 250
        code, text = s.rcpt("joe@elsewhere.test")
        assert code == 454 and b"Relay access denied" in text, (code, text)
        for routed in ('"joe@elsewhere.test"@example.org', "joe%elsewhere.test@example.org"):
            assert s.rcpt("<%s>" % routed)[0] >= 400, routed
        s.rset()


FETCHMAIL = which("fetchmail")


@pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail is not installed (Debian package fetchmail)")
def test_customer_postfix_behind_fetchmail(customer, tmp_path):
    from helpers import run_fetchmail, transcript
    provider, postfix, handover, mail = customer
    send_for_customer(provider)

    result = run_fetchmail(str(tmp_path), provider.odmr_port, handover)
    assert result.returncode == 0, transcript(result)
    assert reply_line(replies.ATRN_OK) in transcript(result)

    poll(lambda: mailbox(mail, "example.org", "alice") and mailbox(mail, "example.com", "info"),
         "delivery into the virtual Maildirs", postfix)
    postfix.wait_queue_empty()
    (alice,), (info,) = mailbox(mail, "example.org", "alice"), mailbox(mail, "example.com", "info")
    assert_from_the_provider(alice, postfix, "alice@example.org")
    assert_from_the_provider(info, postfix, "info@example.com")
    assert provider.spooled("example.org") == [] and provider.spooled("example.com") == []
