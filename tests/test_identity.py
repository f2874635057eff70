"""Domain identity is IDNA 2008 (SPEC §1, §4 "Domain identity") and a domain has one owner.

Python's own "idna" codec is IDNA 2003: it maps straße.de onto strasse.de, ς onto σ,
and drops soft hyphens and joiners. Here alice hosts straße.de and bob its IDNA 2003
look-alike strasse.de, carol ς.test and dave σ.test: mail for one must never be spooled
for, or collected by, the other. Wire behaviour is driven over real sockets (smtplib
with SMTPUTF8, a scripted ODMR customer, `odmrd fetch`), account rules through the real
command line, and the parsers by hypothesis.
"""
from __future__ import annotations

import os
import tempfile
import shutil
import smtplib
import subprocess
import sys
import textwrap
import unicodedata
from typing import Dict, List

import idna
import pytest
from hypothesis import assume, given, settings, strategies as st

from helpers import (PASSWORD, ROOT, Customer, Provider, message_ids, odmrd, one_line_error, reuse_provider,
                     stop_quickly, wait_for)
from odmr import accounts, config
from odmr.names import normalize_domain
from odmr.runtime import Runtime
from odmr.spool import Spool

ALICE = "xn--strae-oqa.de"          # straße.de
BOB = "strasse.de"                  # what IDNA 2003 made of straße.de
CAROL = "xn--3xa.test"              # ς.test (final sigma)
DAVE = "xn--4xa.test"               # σ.test
ERIN = "xn--bcher-kva.de"           # bücher.de
FRANK = "paypal.test"               # Latin only

SOFT_HYPHEN, ZWSP, ZWNJ, ZWJ, VS16 = "\u00ad", "\u200b", "\u200c", "\u200d", "\ufe0f"

# each is refused by IDNA 2008; Python's IDNA 2003 codec turned most into a hosted name
REFUSED = {
    "soft-hyphen": "stra" + SOFT_HYPHEN + "ße.de",      # IDNA 2003: strasse.de (bob's)
    "zwsp": "stras" + ZWSP + "se.de",                   # IDNA 2003: strasse.de
    "zwj": "stras" + ZWJ + "se.de",                     # IDNA 2003: strasse.de
    "zwnj": "stras" + ZWNJ + "se.de",                   # IDNA 2003: strasse.de
    "variation-selector": "strasse" + VS16 + ".de",     # IDNA 2003: strasse.de
    "bad-punycode": "xn--abc.de",
    "a-label-of-uppercase": "xn--bcher-2pa.de",         # decodes to bÜcher: not a U-label
    "emoji": "\U0001F642.de",
    "latin-and-hebrew": "a\u05d0.test",                 # bidi rule
    "trailing-dot": "strasse.de.",
}
REFUSED_IDS = list(REFUSED)


def users_file_with_u_label(path: str) -> None:
    """alice's section written by hand with a U-label, as an administrator might."""
    accounts.add_user(path, "alice", ["placeholder.test"], PASSWORD)
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text.replace("domains = placeholder.test,", "domains = straße.de"))


@pytest.fixture(scope="module")
def shared_provider(tmp_path_factory):
    p = Provider(str(tmp_path_factory.mktemp("identity")),
                 odmr_extra="auth_throttle_failures = 0",
                 sections="[domains]\n  [[bücher.de]]\n  recipients = leser@BÜCHER.de\n")
    users_file_with_u_label(p.users)
    p.add_user("bob", [BOB])
    p.add_user("carol", ["ς.test"])
    p.add_user("dave", ["σ.test"])
    p.add_user("erin", ["BÜCHER.de"])
    p.add_user("frank", [FRANK])
    p.start()
    yield p
    stop_quickly(p)


@pytest.fixture
def provider(shared_provider):
    yield from reuse_provider(shared_provider)


def spooled(p: Provider) -> Dict[str, int]:
    """Domain directory -> messages waiting, for every directory that holds any."""
    found = {}
    for name in os.listdir(p.spool_dir):
        if not name.startswith(".") and os.path.isdir(os.path.join(p.spool_dir, name)):
            count = len(message_ids(p.spool, name))
            if count:
                found[name] = count
    return found


def smtputf8_rcpt(p: Provider, rcpt: str, token: str = "t") -> tuple:
    """MAIL with SMTPUTF8, one RCPT (its reply is returned), DATA if it was accepted."""
    with smtplib.SMTP("127.0.0.1", p.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail("sender@remote.test", ["SMTPUTF8"])[0] == 250
        code, text = s.rcpt(rcpt)
        if code == 250:
            assert s.data(("Subject: %s\r\n\r\nbody %s\r\n" % (token, token)).encode())[0] == 250
        return code, text


def atrn_reply(p: Provider, user: str, arg: str) -> int:
    c = Customer(p.odmr_port)
    try:
        c.login(user)
        code = c.cmd(("ATRN " + arg).rstrip())[0]
        assert c.cmd("NOOP")[0] == 250          # the session goes on
        return code
    finally:
        c.close()


# -- intake: one spelling, one directory --------------------------------------------

@pytest.mark.parametrize("rcpt, directory", [
    ("x@straße.de", ALICE),
    ("x@STRAßE.DE", ALICE),                      # uppercase U-label: ß has no capital here
    ("x@Straße.De", ALICE),
    ("x@xn--strae-oqa.de", ALICE),
    ("x@XN--STRAE-OQA.DE", ALICE),               # an A-label in upper case
    ("x@strasse.de", BOB),
    ("x@STRASSE.de", BOB),                       # the IDNA 2003 look-alike is bob's, not alice's
    ("x@ς.test", CAROL),                         # deviation character: not σ
    ("x@σ.test", DAVE),
    ("x@Σ.test", DAVE),                          # capital sigma lowers to σ, never to ς
    ("leser@BÜCHER.de", ERIN),
    ("leser@bücher.de", ERIN),
    ("leser@xn--bcher-kva.de", ERIN),
], ids=lambda v: v.encode("unicode_escape").decode() if isinstance(v, str) else v)
def test_a_recipient_domain_is_spooled_under_its_own_a_label_only(provider, rcpt, directory):
    code, text = smtputf8_rcpt(provider, rcpt)
    assert code == 250, text
    assert spooled(provider) == {directory: 1}


@pytest.mark.parametrize("name", REFUSED.values(), ids=REFUSED_IDS)
def test_intake_refuses_a_name_idna_2008_refuses(provider, name):
    code, text = smtputf8_rcpt(provider, "x@" + name)
    assert code in (501, 553), text
    assert spooled(provider) == {}


def test_a_mixed_script_name_is_another_domain_never_its_look_alike(provider):
    """IDNA 2008 has no mixed-script rule: pаypal.test (Cyrillic а) is a valid name of its
    own (xn--pypal-4ve.test). Nobody hosts it, so it is refused like any foreign domain,
    and the Latin paypal.test's owner never sees it."""
    assert normalize_domain("p\u0430ypal.test") == "xn--pypal-4ve.test"
    code, text = smtputf8_rcpt(provider, "x@p\u0430ypal.test")
    assert code == 550 and text.startswith(b"5.7.1"), text
    assert spooled(provider) == {}


def test_a_recipient_list_matches_every_spelling_of_its_domain(provider):
    """[domains] [[bücher.de]] recipients = leser@BÜCHER.de"""
    assert smtputf8_rcpt(provider, "leser@xn--bcher-kva.de")[0] == 250
    code, text = smtputf8_rcpt(provider, "other@bücher.de")
    assert code == 550 and text.startswith(b"5.1.1"), text
    assert spooled(provider) == {ERIN: 1}


# -- ATRN: only the owner collects -------------------------------------------------

def test_mail_for_a_u_label_reaches_only_the_account_that_hosts_it(provider, tmp_path):
    """alice's users-file entry is the U-label straße.de; bob hosts strasse.de."""
    code, text = smtputf8_rcpt(provider, "x@straße.de", token="for-alice")
    assert code == 250, text
    assert spooled(provider) == {ALICE: 1}
    assert atrn_reply(provider, "bob", "") == 453             # all of bob's domains: nothing
    assert atrn_reply(provider, "bob", "strasse.de") == 453
    for spelling in ("straße.de", "xn--strae-oqa.de", "STRAßE.DE", "XN--STRAE-OQA.DE"):
        assert atrn_reply(provider, "bob", spelling) == 450, spelling
        assert atrn_reply(provider, "bob", "strasse.de, " + spelling) == 450, spelling
    assert spooled(provider) == {ALICE: 1}

    maildir = tmp_path / "Maildir"
    env = {k: v for k, v in os.environ.items() if k not in ("ODMRD_CONFIG", "ODMR_PASSWORD")}
    env["ODMR_PASSWORD"] = PASSWORD
    result = subprocess.run([sys.executable, os.path.join(ROOT, "odmrd.py"), "fetch",
                             "--server", "127.0.0.1:%d" % provider.odmr_port, "--user", "alice",
                             "--tls", "none", "--domain", "straße.de", "--maildir", str(maildir)],
                            capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    names = os.listdir(maildir / "new")
    assert len(names) == 1
    assert b"body for-alice" in (maildir / "new" / names[0]).read_bytes()
    assert spooled(provider) == {}


def test_a_u_label_recipient_goes_downstream_as_its_a_label(provider):
    """The customer is sent the A-label, never the U-label a client wrote: a customer
    without SMTPUTF8 can take it, and an IDNA 2003 MTA there cannot map straße.de onto
    strasse.de (another customer's domain)."""
    assert smtputf8_rcpt(provider, "x@STRAßE.de", token="alabel")[0] == 250
    c = Customer(provider.odmr_port)
    try:
        c.login("alice")
        assert c.cmd("ATRN straße.de")[0] == 250
        c.send("220 customer.test ESMTP")            # no SMTPUTF8 offered
        seen = []
        while True:
            line = c.line().rstrip(b"\r\n").decode()
            seen.append(line)
            verb = line.split(" ", 1)[0].upper()
            if verb == "DATA":
                c.send("354 go on")
                while c.line() != b".\r\n":
                    pass
                c.send("250 stored")
            elif verb == "QUIT":
                c.send("221 bye")
                break
            else:
                c.send("250 ok")
    finally:
        c.close()
    assert "RCPT TO:<x@%s>" % ALICE in seen, seen
    assert not any("ß" in line or "STRA" in line for line in seen), seen
    wait_for(lambda: spooled(provider) == {}, 10, "the message to leave the spool")


@pytest.mark.parametrize("name", REFUSED.values(), ids=REFUSED_IDS)
def test_atrn_refuses_a_name_idna_2008_refuses_with_501(provider, name):
    assert atrn_reply(provider, "alice", name) == 501
    assert atrn_reply(provider, "bob", "strasse.de," + name) == 501


def test_the_final_sigma_is_collected_by_its_own_account(provider):
    assert smtputf8_rcpt(provider, "x@ς.test")[0] == 250
    assert atrn_reply(provider, "dave", "σ.test") == 453
    assert atrn_reply(provider, "dave", "ς.test") == 450
    assert atrn_reply(provider, "dave", "") == 453
    assert spooled(provider) == {CAROL: 1}


def test_a_bounce_goes_to_the_senders_domain_not_to_its_look_alike(provider):
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        assert s.sendmail("someone@straße.de", ["y@strasse.de"], b"Subject: b\r\n\r\nx\r\n",
                          mail_options=["SMTPUTF8"]) == {}
    (msg_id,) = message_ids(provider.spool, BOB)
    result = provider.run_cli("queue", "bounce", msg_id)
    assert result.returncode == 0, result.stderr
    assert spooled(provider) == {ALICE: 1}
    (dsn,) = provider.spool.messages(ALICE)
    assert dsn.envelope.sender == "" and [r.address for r in dsn.envelope.recipients] == ["someone@" + ALICE]   # as its A-label


# -- the command line --------------------------------------------------------------

@pytest.fixture
def conf(tmp_path) -> str:
    path = tmp_path / "odmrd.conf"
    path.write_text(textwrap.dedent("""\
        hostname = odmr.test
        spool_dir = spool
        users_file = users
        allow_root = yes
        log_file = odmrd.log
        [odmr]
        listen = 127.0.0.1:1
        [smtp]
        listen = 127.0.0.1:1
        """))
    return str(path)


def add(conf: str, name: str, *domains: str, shared: bool = False) -> subprocess.CompletedProcess:
    args = ["user", "add", name, "--password-stdin"] + ["--domain=" + d for d in domains]
    return odmrd(conf, *(args + (["--shared-domain"] if shared else [])), input=b"pw-123456\n")


def users_of(conf: str) -> str:
    return os.path.join(os.path.dirname(conf), "users")


@pytest.mark.slow
@pytest.mark.parametrize("name", REFUSED.values(), ids=REFUSED_IDS)
def test_user_add_refuses_a_name_idna_2008_refuses(conf, name):
    assert add(conf, "alice", "example.org").returncode == 0
    with open(users_of(conf), "rb") as fh:
        before = fh.read()
    result = add(conf, "eve", name)
    assert result.returncode == 65
    assert "invalid domain" in one_line_error(result)
    with open(users_of(conf), "rb") as fh:
        assert fh.read() == before


def test_user_add_stores_the_a_label_of_a_u_label(conf):
    result = add(conf, "alice", "STRAßE.de")
    assert result.returncode == 0, result.stderr
    assert ALICE in result.stdout.decode()
    assert accounts.load(users_of(conf)).get("alice").domains == (ALICE,)


@pytest.mark.slow
def test_user_add_gives_a_domain_to_one_account_unless_told_to_share(conf):
    assert add(conf, "alice", "straße.de").returncode == 0
    for spelling in ("xn--strae-oqa.de", "STRAßE.DE", "straße.de"):
        result = add(conf, "bob", "bob.test", spelling)
        assert result.returncode == 65
        assert "alice" in one_line_error(result) and "--shared-domain" in result.stderr.decode()
    assert accounts.load(users_of(conf)).get("bob") is None
    assert add(conf, "bob", "strasse.de").returncode == 0         # the look-alike is another domain
    result = add(conf, "carol", "carol.test", "xn--strae-oqa.de", shared=True)
    assert result.returncode == 0, result.stderr
    loaded = accounts.load(users_of(conf))
    assert loaded.owners(ALICE) == ("alice", "carol")
    assert loaded.owners(BOB) == ("bob",) and loaded.owners("carol.test") == ("carol",)
    result = odmrd(conf, "check-config")
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    assert add(conf, "dave", "straße.de").returncode == 65        # a shared domain: still asked
    assert add(conf, "dave", "straße.de", shared=True).returncode == 0
    assert accounts.load(users_of(conf)).owners(ALICE) == ("alice", "carol", "dave")


def test_user_add_help_documents_shared_domain(conf):
    result = odmrd(conf, "user", "add", "--help")
    assert result.returncode == 0
    assert "--shared-domain" in result.stdout.decode()


def write_users(conf: str, sections: Dict[str, List[str]]) -> None:
    """A hand-edited users file: {account: [raw lines after the credentials]}."""
    secret = "hex:" + b"pw".hex()
    with open(users_of(conf), "w", encoding="utf-8") as fh:
        for name, lines in sections.items():
            fh.write("[%s]\ncram_md5 = %s\n%s\n" % (name, secret, "\n".join(lines)))
    os.chmod(users_of(conf), 0o600)


@pytest.mark.slow
def test_check_config_refuses_a_domain_with_two_owners_unless_both_share_it(conf):
    write_users(conf, {"alice": ["domains = straße.de"], "bob": ["domains = xn--strae-oqa.de, b.test"]})
    result = odmrd(conf, "check-config")
    assert result.returncode == 78
    line = one_line_error(result)
    assert ALICE in line and "alice" in line and "bob" in line and "shared_domains" in line
    write_users(conf, {"alice": ["domains = straße.de", "shared_domains = STRAßE.de"],
                       "bob": ["domains = xn--strae-oqa.de, b.test"]})
    assert odmrd(conf, "check-config").returncode == 78          # both must say so
    write_users(conf, {"alice": ["domains = straße.de", "shared_domains = STRAßE.de"],
                       "bob": ["domains = xn--strae-oqa.de, b.test", "shared_domains = straße.de"]})
    result = odmrd(conf, "check-config")
    assert result.returncode == 0, result.stderr
    write_users(conf, {"alice": ["domains = a.test", "shared_domains = b.test"]})
    result = odmrd(conf, "check-config")
    assert result.returncode == 78 and "b.test" in one_line_error(result)


@pytest.mark.slow
def test_the_users_file_meets_mail_in_any_spelling(conf):
    """A users file listing the U-label hosts the A-label: `enqueue` spools for it."""
    write_users(conf, {"alice": ["domains = straße.de"], "bob": ["domains = strasse.de"]})
    result = odmrd(conf, "enqueue", "-f", "s@remote.test", "x@xn--strae-oqa.de", "y@STRAßE.DE",
                   input=b"Subject: e\r\n\r\nx\r\n")
    assert result.returncode == 0, result.stderr
    spool = Spool(os.path.join(os.path.dirname(conf), "spool"))
    assert spool.domains() == [ALICE]
    (message,) = spool.messages(ALICE)
    assert [r.address for r in message.envelope.recipients] == ["x@xn--strae-oqa.de", "y@" + ALICE]
    result = odmrd(conf, "enqueue", "-f", "s@remote.test", "x@" + REFUSED["soft-hyphen"],
                   input=b"Subject: e\r\n\r\nx\r\n")
    assert result.returncode == 65, result.stderr
    assert spool.domains() == [ALICE]


def test_check_config_refuses_two_policy_sections_for_one_domain(conf):
    write_users(conf, {"alice": ["domains = straße.de"]})
    with open(conf, "a", encoding="utf-8") as fh:
        fh.write("[domains]\n  [[straße.de]]\n  max_messages = 5\n"
                 "  [[XN--STRAE-OQA.DE]]\n  max_messages = 50\n")
    result = odmrd(conf, "check-config")
    assert result.returncode == 78
    assert ALICE in one_line_error(result)


NOBODY = 65534


@pytest.fixture
def public_conf(conf):
    """`conf` moved where the service account can reach it (pytest's tmp is root's only),
    with a spool that account owns: check-config asks both of that account."""
    directory = tempfile.mkdtemp(prefix="odmrd-test.", dir="/tmp")
    os.chmod(directory, 0o755)
    moved = os.path.join(directory, "odmrd.conf")
    shutil.copy(conf, moved)
    os.chmod(moved, 0o644)
    os.mkdir(os.path.join(directory, "spool"), 0o700)
    os.chown(os.path.join(directory, "spool"), NOBODY, NOBODY)
    yield moved
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the users file")
def test_check_config_warns_when_the_users_file_has_a_foreign_owner(public_conf):
    conf = public_conf
    write_users(conf, {"alice": ["domains = a.test"]})
    result = odmrd(conf, "check-config")
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    os.chown(users_of(conf), NOBODY, NOBODY)
    result = odmrd(conf, "check-config")
    assert result.returncode == 0, result.stderr
    line = one_line_error(result)
    assert line.startswith("odmrd: warning: ") and users_of(conf) in line and "uid %d" % NOBODY in line
    assert result.stdout.decode().strip() == "%s: ok" % conf
    with open(conf) as fh:
        text = fh.read()
    with open(conf, "w") as fh:
        fh.write("user = nobody\n" + text)                        # now it is the service account's
    result = odmrd(conf, "check-config")
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    os.chown(users_of(conf), 4242, 4242)         # a stranger's, mode 0600: the daemon is locked out
    result = odmrd(conf, "check-config")
    assert result.returncode == 78
    assert "not readable by nobody" in one_line_error(result)


# -- properties of the parsers (hypothesis) ----------------------------------------

TRICKY = ("aAbBsSzZ09-" "ßẞςσΣüÜéE\u0301" "\u0430\u0440" "\u05d0" "\u0915\u094d"
          + SOFT_HYPHEN + ZWSP + ZWNJ + ZWJ + VS16 + "\u3002\uff0e" + "ℌﬀ")
label = st.one_of(st.text(TRICKY, min_size=1, max_size=12),
                  st.text(TRICKY, min_size=1, max_size=8).map(lambda t: "xn--" + t),
                  st.sampled_from(["straße", "strasse", "ς", "σ", "bücher", "xn--strae-oqa",
                                   "XN--BCHER-KVA", "xn--3xa", "p\u0430ypal"]))
domain_text = st.lists(label, min_size=1, max_size=3).map(".".join)
SAFE = set("abcdefghijklmnopqrstuvwxyz0123456789-.")


def same_by_idna(a: str, b: str) -> bool:
    """idna's own verdict on whether two spellings name one domain."""
    return idna.decode(a, uts46=True, std3_rules=True) == idna.decode(b, uts46=True, std3_rules=True)


@pytest.mark.slow
@given(st.one_of(domain_text, st.text(max_size=80)))
@settings(max_examples=200, deadline=None)
def test_an_accepted_name_is_a_lower_case_a_label_that_maps_to_itself(text):
    try:
        name = normalize_domain(text)
    except ValueError:
        return
    assert name.isascii() and name == name.lower() and set(name) <= SAFE
    assert normalize_domain(name) == name
    u_labels = idna.decode(name)
    assert normalize_domain(u_labels) == name           # the U-label form is the same domain
    assert same_by_idna(text, name)


@pytest.mark.slow
@given(st.data())
@settings(max_examples=200, deadline=None)
def test_two_spellings_are_one_domain_exactly_when_idna_decodes_them_alike(data):
    a = data.draw(domain_text)
    try:
        first = normalize_domain(a)
    except ValueError:
        return
    b = respell(data, a) if data.draw(st.booleans()) else data.draw(domain_text)
    try:
        second = normalize_domain(b)
    except ValueError:
        return
    assert (first == second) == same_by_idna(a, b)


@pytest.mark.slow
@given(domain_text, st.sampled_from([SOFT_HYPHEN, ZWSP, VS16, "\u2060", "\u034f"]), st.integers(0, 40))
@settings(max_examples=200, deadline=None)
def test_a_character_idna_would_drop_makes_the_name_refused(text, invisible, where):
    where = min(where, len(text))
    with pytest.raises(ValueError):
        normalize_domain(text[:where] + invisible + text[where:])


@given(st.text("abcXYZ019-._", min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_plain_ascii_names_get_idnas_answer(text):
    try:
        expected = idna.encode(text, uts46=True, std3_rules=True).decode()
    except idna.IDNAError:
        expected = None
    if expected is not None and expected.endswith("."):
        expected = None                             # a mail domain has no trailing dot
    try:
        got = normalize_domain(text)
    except ValueError:
        got = None
    assert got == expected


@pytest.mark.slow
@given(domain_text)
@settings(max_examples=200, deadline=None)
def test_deviation_characters_are_never_folded_into_their_idna_2003_forms(text):
    folded = text.replace("ß", "ss").replace("ẞ", "ss").replace("ς", "σ")
    assume(folded != text)
    try:
        name = normalize_domain(text)
    except ValueError:
        return
    try:
        assert normalize_domain(folded) != name
    except ValueError:
        pass


HOSTED = {"alice": ["straße.de", "例子.test"], "bob": ["strasse.de"], "carol": ["ς.test"],
          "dave": ["σ.test"], "erin": ["bücher.de", "xn--mnchen-3ya.test"], "frank": ["paypal.test"]}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory) -> Runtime:
    directory = str(tmp_path_factory.mktemp("identity-runtime"))
    conf = os.path.join(directory, "odmrd.conf")
    with open(conf, "w") as fh:
        fh.write("hostname = odmr.test\nspool_dir = spool\nusers_file = users\nlog_file = odmrd.log\n"
                 "[odmr]\nlisten = 127.0.0.1:1\n[smtp]\nlisten = 127.0.0.1:1\n")
    for name, domains in HOSTED.items():
        accounts.add_user(os.path.join(directory, "users"), name, domains, PASSWORD)
    settings_ = config.load(conf)
    return Runtime(settings_, accounts.load(settings_.users_file), Spool(settings_.spool_dir))


def respell(data, name: str) -> str:
    """Another way of writing `name` that may or may not be the same domain."""
    how = data.draw(st.sampled_from(["as-is", "upper", "a-label", "upper-a-label", "nfd",
                                     "fullwidth-dot", "casefold", "random-case", "insert"]))
    if how == "upper":
        return name.upper()
    if how == "a-label":
        return normalize_domain(name)
    if how == "upper-a-label":
        return normalize_domain(name).upper()
    if how == "nfd":
        return unicodedata.normalize("NFD", name)
    if how == "fullwidth-dot":
        return name.replace(".", "\uff0e")
    if how == "casefold":
        return name.casefold()
    if how == "random-case":
        flips = data.draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
        return "".join(c.upper() if f else c for c, f in zip(name, flips))
    if how == "insert":
        where = data.draw(st.integers(0, len(name)))
        char = data.draw(st.sampled_from(TRICKY))
        return name[:where] + char + name[where:]
    return name


@pytest.mark.slow
@given(st.data())
@settings(max_examples=200, deadline=None)
def test_an_accepted_recipient_has_one_spool_directory_and_one_owner(runtime, data):
    hosted = [d for domains in HOSTED.values() for d in domains]
    text = data.draw(st.one_of(st.sampled_from(hosted).map(lambda d: respell(data, d)), domain_text))
    local = data.draw(st.sampled_from(["x", "Leser", "postmaster", "a.b"]))
    domain, code, _ = runtime.hosting.classify_recipient("%s@%s" % (local, text), utf8_allowed=True)
    if domain is None:
        assert code in (501, 550, 553)
        return
    assert code == 250
    assert domain == normalize_domain(text)
    assert runtime.spool.listing(domain) == ([], set())     # a name the spool takes as it is
    (owner,) = runtime.accounts.owners(domain)
    assert [d for d in HOSTED[owner] if same_by_idna(d, text)], (owner, text)
    others = [n for n, domains in HOSTED.items() if n != owner and any(same_by_idna(d, text) for d in domains)]
    assert others == []


# -- the sender's domain: its DSNs are routed by it ----------------------------------

SENDER_REFUSED = {k: v for k, v in REFUSED.items() if not v.isascii() or v.endswith(".")}


@pytest.mark.parametrize("name", SENDER_REFUSED.values(), ids=list(SENDER_REFUSED))
def test_intake_refuses_a_sender_domain_idna_2008_refuses(provider, name):
    with smtplib.SMTP("127.0.0.1", provider.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        code, text = s.mail("y@" + name, ["SMTPUTF8"])
        assert (code, text[:5]) == (553, b"5.1.7"), text
        assert s.mail("y@straße.de", ["SMTPUTF8"])[0] == 250     # a U-label that is one


@pytest.mark.parametrize("name", SENDER_REFUSED.values(), ids=list(SENDER_REFUSED))
def test_enqueue_refuses_a_sender_domain_idna_2008_refuses(provider, name):
    result = provider.run_cli("enqueue", "-f", "y@" + name, "x@straße.de",
                              input=b"Subject: x\r\n\r\nbody\r\n")
    assert result.returncode == 65, result.stderr
    assert len(result.stderr.splitlines()) == 1
