"""Local parts that carry a route are refused (SPEC §5, `allow_routing_local_parts`).

The customer's MTA takes odmrd's deliveries from 127.0.0.1 and, like Postfix
by default, follows `user%host@`, `host!user@`, `"user@host"@` and source
routes — so each of these accepted at intake would make the pair an open
relay. Real daemon, real smtplib clients, `odmrd enqueue` as a process.
"""
from __future__ import annotations

import logging
import os
import smtplib
import unicodedata

import pytest
from hypothesis import given, settings, strategies as st

from helpers import Provider, reuse_provider, stop_quickly

from odmr.syntax import printable, route_in_address, split_source_route

SENDER = "sender@remote.test"
MSG = b"Subject: route\r\n\r\nhello\r\n"
HOSTED = ("example.org", "example.com", "example.net")

ROUTED = {
    "percent-hack": "user%evil.test@example.org",
    "bang-path": "evil.test!user@example.org",
    "uucp-bang-chain": "a!b!user@example.org",
    "quoted-at": '"user@evil.test"@example.org',
    "quoted-percent": '"a%b"@example.org',
    "quoted-bang": '"evil.test!user"@example.org',
    "quoted-escaped-at": '"a\\@evil.test"@example.org',
    "quoted-escaped-percent": '"a\\%evil.test"@example.org',
    "quoted-source-route": '"@evil.test:user"@example.org',
    "double-at": "user@evil.test@example.org",
    "comment-before": "(comment)user@example.org",
    "comment-inside": "user(c)@example.org",
    "comment-in-domain": "user@example.org(c)",
    "source-route": "@relay.test:user@example.org",
    "source-route-list": "@a.test,@b.test:user@example.org",
    "source-route-literal": "@[127.0.0.1]:user@example.org",
    "source-route-domainless-postmaster": "@evil.test:postmaster",
    "half-quoted": '"user"evil.test@example.org',
    "obsolete-quoted-words": '"a"."b"@example.org',
    "quoted-comma-list": '"a,b"@example.org',
    "quoted-group": '"evil:user"@example.org',
    "postmaster-percent": "postmaster%evil.test@example.org",
    "fullwidth-percent": "user\uff05evil.test@example.org",
    "fullwidth-at": "user\uff20evil.test@example.org",
}


@pytest.fixture
def provider(shared_provider):
    yield from reuse_provider(shared_provider)


@pytest.fixture(scope="module")
def permissive(tmp_path_factory):
    """A provider whose administrator allows routing local parts (the old behaviour)."""
    p = Provider(str(tmp_path_factory.mktemp("permissive")), smtp_extra="allow_routing_local_parts = yes")
    p.add_user("alice", ["example.org", "example.com"])
    p.add_user("bob", ["example.net"])
    p.start()
    yield p
    stop_quickly(p)


def rcpt(port: int, address: str, sender: str = SENDER):
    """MAIL and one RCPT with the path exactly as given (smtplib's rcpt() would re-quote it)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail(sender, ["SMTPUTF8"] if not address.isascii() else [])[0] == 250
        code, text = s.docmd("RCPT", "TO:<%s>" % address)
        if code == 250:
            assert s.docmd("DATA")[0] == 354
            s.send(MSG + b".\r\n")
            assert s.getreply()[0] == 250
        return code, text.decode()


def nothing_spooled(p: Provider) -> bool:
    return all(p.spooled(d) == [] for d in HOSTED)


@pytest.mark.parametrize("address", list(ROUTED.values()), ids=list(ROUTED))
def test_routed_local_part_is_550_571_at_intake(provider, caplog, address):
    caplog.set_level(logging.INFO, logger="odmrd.smtp")
    code, text = rcpt(provider.smtp_port, address)
    assert (code, text.split()[0]) == (550, "5.7.1"), text
    assert nothing_spooled(provider)
    [line] = [r.getMessage() for r in caplog.records if "refused RCPT" in r.getMessage()]
    assert "127.0.0.1:" in line and "550 5.7.1" in line
    # the address is in the log line, escaped: nothing but printable characters
    assert printable(address) in line and line.isprintable()


def test_refusal_is_per_recipient_and_the_plain_one_still_gets_the_mail(provider):
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail(SENDER)
        assert s.docmd("RCPT", "TO:<user%evil.test@example.org>")[0] == 550
        assert s.docmd("RCPT", "TO:<user@example.org>")[0] == 250
        assert s.docmd("RCPT", 'TO:<"john smith"@example.org>')[0] == 250     # quoted, no route
        assert s.docmd("DATA")[0] == 354
        s.send(MSG + b".\r\n")
        assert s.getreply()[0] == 250
    [msg_id] = provider.spooled("example.org")
    envelope = provider.spool.load("example.org", msg_id).envelope
    assert [r.address for r in envelope.recipients] == ["user@example.org", '"john smith"@example.org']


@pytest.mark.parametrize("address", ["o'brien+tag@example.org", "a.b-c_d=e/f@example.org",
                                     "{x}|~#$&*?^`@example.org", '"user"@example.org',
                                     "jos\u00e9@example.org", "postmaster@example.org"])
def test_plain_local_parts_are_still_accepted(provider, address):
    assert rcpt(provider.smtp_port, address)[0] == 250


def test_sender_in_a_hosted_domain_with_a_route_is_refused(provider):
    """Its bounce would be spooled for the customer, whose MTA would follow the route."""
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        code, text = s.mail("victim%evil.test@example.org")
        assert (code, text.split()[0]) == (550, b"5.7.1")
        s.rset()
        assert s.mail("odd%local@remote.test")[0] == 250     # its bounces go to the bounce relay


@pytest.mark.slow
@pytest.mark.parametrize("address", ["user%evil.test@example.org", "evil.test!user@example.org",
                                     '"user@evil.test"@example.org', '"a\\@b"@example.org',
                                     "user@evil.test@example.org", "(c)user@example.org",
                                     "@relay.test:user@example.org"])
def test_enqueue_refuses_routed_recipients_with_67(provider, address):
    r = provider.run_cli("enqueue", "-f", SENDER, "ok@example.org", address, input=MSG)
    assert r.returncode == 67, r.stderr
    error = r.stderr.decode()
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert address in error.replace("\\\\", "\\") and "Routing refused" in error
    assert nothing_spooled(provider)


@pytest.mark.slow
def test_enqueue_refuses_a_routed_sender_in_a_hosted_domain(provider):
    r = provider.run_cli("enqueue", "-f", "x!victim@example.com", "ok@example.org", input=MSG)
    assert r.returncode == 67, r.stderr
    assert b"x!victim@example.com" in r.stderr
    assert nothing_spooled(provider)


# -- allow_routing_local_parts = yes: the old behaviour ---------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sent,stored", [
    ("user%evil.test@example.org", "user%evil.test@example.org"),
    ("evil.test!user@example.org", "evil.test!user@example.org"),
    ('"user@evil.test"@example.org', '"user@evil.test"@example.org'),
    ("user@evil.test@example.org", "user@evil.test@example.org"),
    ("@relay.test:user@example.org", "user@example.org"),      # a source route is ignored
], ids=["percent", "bang", "quoted-at", "double-at", "source-route"])
def test_allowed_routing_local_parts_are_accepted(permissive, sent, stored):
    before = set(permissive.spooled("example.org"))
    assert rcpt(permissive.smtp_port, sent)[0] == 250
    [new] = set(permissive.spooled("example.org")) - before
    envelope = permissive.spool.load("example.org", new).envelope
    assert [r.address for r in envelope.recipients] == [stored]
    r = permissive.run_cli("enqueue", "-f", SENDER, sent, input=MSG)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_allowed_still_never_relays(permissive):
    code, text = rcpt(permissive.smtp_port, '"user@example.org"@evil.test')
    assert (code, text.split()[0]) == (550, "5.7.1")
    assert rcpt(permissive.smtp_port, '"a\\@b"@example.org')[0] == 501    # the spool keeps no escapes


@pytest.mark.slow
def test_setting_is_a_boolean(tmp_path):
    for value, code in (("yes", 0), ("no", 0), ("perhaps", 78)):
        os.makedirs(str(tmp_path / value))
        p = Provider(str(tmp_path / value), smtp_extra="allow_routing_local_parts = %s" % value)
        p.add_user("alice", ["example.org"])
        r = p.run_cli("check-config")
        assert r.returncode == code, r.stderr
    assert b"allow_routing_local_parts" in r.stderr


# -- the rule itself, against an independent reading of what an MTA would route ---------

def _what_an_mta_sees(address: str) -> str:
    """Postfix's resolve_dequoted_address, roughly: drop the quoting, keep the text,
    and fold compatibility characters as a careless downstream might."""
    local, _, domain = address.rpartition("@")
    text = local.replace('\\"', "\0").replace('"', "").replace("\\", "").replace("\0", '"')
    return unicodedata.normalize("NFKC", text) + "@" + domain


LOCAL_ALPHABET = st.sampled_from(list("ab.+-_=/'%!@()\"\\,:;<>[] ") + ["\uff05", "\uff20", "\u00e9"])


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(local=st.text(LOCAL_ALPHABET, min_size=1, max_size=12))
def test_an_accepted_local_part_routes_nowhere(local):
    address = local + "@example.org"
    try:
        route, rest = split_source_route(address)
    except ValueError:
        return
    if route or route_in_address(rest) is not None:
        return
    seen = _what_an_mta_sees(rest)
    # exactly one '@' (the hosted domain's), no percent hack, no bang path, no comment
    assert seen.count("@") == 1 and not set(seen) & set("%!()"), (address, seen)


@pytest.mark.slow
def test_enqueue_refusals_are_logged_where_the_daemon_logs(tmp_path):
    """Each refusal is one log line, as at the intake port (issue: log each refusal)."""
    log_file = tmp_path / "odmrd.log"
    p = Provider(str(tmp_path), extra="syslog = no\nlog_file = %s" % log_file)
    p.add_user("alice", ["example.org"])
    for rcpt in ("user%evil.test@example.org", "u@nothosted.example"):
        assert p.run_cli("enqueue", "-f", SENDER, rcpt, input=MSG).returncode == 67
    logged = log_file.read_text()
    assert "enqueue: refused (exit 67): recipient <user%evil.test@example.org>: Routing refused" in logged
    assert "enqueue: refused (exit 67): recipient <u@nothosted.example>" in logged


@pytest.mark.slow
def test_enqueue_ignores_a_senders_source_route_as_intake_does(provider):
    r = provider.run_cli("enqueue", "-f", "@evil.example:v@other.example", "ok@example.org", input=MSG)
    assert r.returncode == 0, r.stderr
    [msg_id] = provider.spooled("example.org")
    assert provider.spool.load("example.org", msg_id).envelope.sender == "v@other.example"
    routed = provider.run_cli("enqueue", "-f", "x!v@example.com", "ok@example.org", input=MSG)
    assert routed.returncode == 67 and b"sender <x!v@example.com>: Routing refused" in routed.stderr
