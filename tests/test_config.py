"""Configuration (SPEC §3) and `odmrd check-config`: converters, defaults, every error with key and line."""
from __future__ import annotations

import os
import re
import textwrap

import pytest
from hypothesis import given, strategies as st

from helpers import PASSWORD, run_cli
from odmr import accounts, config


def write(tmp_path, text: str, name: str = "odmrd.conf") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def check(path: str):
    result = run_cli("-c", path, "check-config")
    assert b"Traceback" not in result.stderr, result.stderr.decode()
    return result.returncode, result.stderr.decode().splitlines()


# -- converters -------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("30s", 30), ("5m", 300), ("4h", 14400), ("10d", 864000),
                                          ("2w", 1209600), ("45", 45), ("0", 0), (" 7 M ", 420)],
                         ids=["seconds", "minutes", "hours", "days", "weeks", "bare", "zero", "spaces-and-case"])
def test_parse_duration(text, seconds):
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "-5s", "1.5h", "5 minutes", "m", "s5"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        config.parse_duration(text)


@pytest.mark.parametrize("text,size", [("10K", 10240), ("50M", 50 * 1024 ** 2), ("1G", 1024 ** 3),
                                       ("123", 123), ("2k", 2048), ("3MB", 3 * 1024 ** 2)],
                         ids=["K", "M", "G", "bare", "lower-case", "MB"])
def test_parse_size(text, size):
    assert config.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "10X", "-1K", "1.5M", "K"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        config.parse_size(text)


@given(st.integers(min_value=0, max_value=10 ** 6), st.sampled_from(["", "K", "M", "G"]))
def test_parse_size_units_multiply(number, unit):
    factor = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}[unit]
    assert config.parse_size("%d%s" % (number, unit)) == number * factor


@pytest.mark.parametrize("text,expected", [("127.0.0.1:3366", ("127.0.0.1", 3366)),
                                           ("[::1]:3366", ("::1", 3366)),
                                           ("localhost:25", ("localhost", 25))],
                         ids=["ipv4", "ipv6", "name"])
def test_parse_hostport(text, expected):
    assert config.parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", "::1:25", "[::1", "host:99999", "host:x", ":25"],
                         ids=["no-port", "bare-ipv6", "unclosed-bracket", "port-range", "port-word",
                              "no-host"])
def test_parse_hostport_rejects(text):
    with pytest.raises(ValueError):
        config.parse_hostport(text)


# -- loading ---------------------------------------------------------------------------

def test_defaults_and_relative_paths(tmp_path):
    path = write(tmp_path, """\
        hostname = odmr.example.net
        """)
    s = config.load(path)
    assert s.hostname == "odmr.example.net"
    assert s.spool_dir == str(tmp_path / "spool")
    assert s.users_file == str(tmp_path / "users")
    assert s.pid_file == str(tmp_path / "odmrd.pid")
    assert s.odmr.listen == (("127.0.0.1", 3366),)
    assert s.smtp.listen == (("127.0.0.1", 2525),)
    assert s.odmr.mechanisms == ("CRAM-MD5", "SCRAM-SHA-256", "PLAIN", "LOGIN")
    assert s.odmr.require_tls is False and s.odmr.max_sessions == 500
    assert s.odmr.max_sessions_per_address == 20 and s.odmr.idle_timeout == 300
    assert s.smtp.max_message_size == 50 * 1024 ** 2 and s.smtp.max_recipients == 1000
    assert s.queue.max_age == 10 * 86400 and s.queue.warn_after == 0
    assert s.log_level == "info" and s.syslog == "auto"
    assert s.domains == {}


def test_hostname_defaults_to_the_fqdn(tmp_path):
    s = config.load(write(tmp_path, "log_level = debug\n"))
    assert s.hostname == config.default_hostname() and s.hostname


def test_full_contract_example_loads(tmp_path):
    path = write(tmp_path, """\
        hostname = odmr.example.net
        spool_dir = /var/spool/odmrd
        users_file = users
        pid_file = /run/odmrd.pid
        user =
        log_level = warning
        syslog = no

        [odmr]
        listen = 127.0.0.1:3366, [::1]:3366
        tls_listen =
        mechanisms = CRAM-MD5, SCRAM-SHA-256, PLAIN, LOGIN
        require_tls = no
        max_sessions = 500
        max_sessions_per_address = 20
        idle_timeout = 5m
        proxy_protocol = no
        proxy_trusted = 127.0.0.1

        [smtp]
        listen = 127.0.0.1:2525
        max_message_size = 50M
        max_recipients = 1000
        require_tls = no

        [tls]
        cert_file =
        key_file =
        client_ca_file =

        [queue]
        max_age = 10d
        warn_after = 0
        bounce_relay =

        [domains]
          [[Example.ORG]]
          max_bytes = 1G
          max_messages = 100000
          recipients = postmaster, info@example.org
          [[example.com]]
          recipients = *
        """)
    s = config.load(path)
    assert s.spool_dir == "/var/spool/odmrd" and s.pid_file == "/run/odmrd.pid"
    assert s.odmr.listen == (("127.0.0.1", 3366), ("::1", 3366))
    assert s.odmr.tls_listen == ()
    assert s.log_level == "warning" and s.syslog == "no"
    org = s.policy("example.org")
    assert org.max_bytes == 1024 ** 3 and org.max_messages == 100000
    assert org.accepts("Postmaster", "example.org") and org.accepts("info", "example.org")
    assert not org.accepts("sales", "example.org")
    assert s.policy("example.com").accepts("anyone", "example.com")
    assert s.policy("unlisted.test").accepts("anyone", "unlisted.test")


BAD = """\
    hostname = odmr.test
    bogus_key = 1
    log_level = loud
    [odmr]
    listen = 127.0.0.1:notaport
    idle_timeout = 5 minutes
    mechanisms = CRAM-MD5, MAGIC
    max_sessions = -3
    [smtp]
    max_message_size = 10X
    unknown = yes
    [domains]
      [[example.org]]
      max_bytes = 1G
      colour = blue
      [[bad_domain!]]
      max_messages = 3
    [nosuchsection]
    a = 1
    """

EXPECTED = [("bogus_key", 2, "unknown key"), ("log_level", 3, "loud"), ("odmr.listen", 5, "port"),
            ("odmr.idle_timeout", 6, "duration"), ("odmr.mechanisms", 7, "MAGIC"),
            ("odmr.max_sessions", 8, "small"), ("smtp.max_message_size", 10, "size"),
            ("smtp.unknown", 11, "unknown key"), ("domains.example.org.colour", 15, "unknown key"),
            ("domains.bad_domain!", 16, "domain"), ("nosuchsection", 18, "unknown section")]


def test_load_reports_every_problem_with_key_and_line(tmp_path):
    with pytest.raises(config.ConfigError) as info:
        config.load(write(tmp_path, BAD))
    problems = info.value.problems
    assert len(problems) == len(EXPECTED), problems
    for key, line, words in EXPECTED:
        matching = [p for p in problems if p.startswith("%s (line %d): " % (key, line))]
        assert len(matching) == 1, (key, line, problems)
        assert words in matching[0], matching[0]


def test_check_config_prints_every_error_and_exits_78(tmp_path):
    code, lines = check(write(tmp_path, BAD))
    assert code == 78
    assert len(lines) == len(EXPECTED)
    for key, line, _ in EXPECTED:
        assert any("%s (line %d)" % (key, line) in l for l in lines), (key, lines)
    assert all(l.startswith("odmrd: ") for l in lines)


@pytest.mark.parametrize("text,key", [
    ("[odmr]\nmax_sessions = lots\n", "odmr.max_sessions"),
    ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients"),
    ("[odmr]\nrequire_tls = perhaps\n", "odmr.require_tls"),
    ("syslog = sometimes\n", "syslog"),
    ("[queue]\nmax_age = ten days\n", "queue.max_age"),
    ("[odmr]\nlisten = ::1:3366\n", "odmr.listen"),
    ("[odmr]\nlisten = ,\n", "odmr.listen"),
    ("[domains]\n[[example.org]]\nmax_messages = -1\n", "domains.example.org.max_messages"),
    ("[tls]\ncertfile = x\n", "tls.certfile"),
], ids=["not-an-integer", "below-minimum", "not-a-boolean", "bad-option", "bad-duration",
        "unbracketed-ipv6", "empty-listen", "negative-quota", "misspelt-key"])
def test_single_errors_name_their_key(tmp_path, text, key):
    path = write(tmp_path, text)
    code, lines = check(path)
    assert code == 78
    assert len(lines) == 1 and key in lines[0], lines
    assert re.search(r"\(line \d+\)", lines[0]), lines


def test_syntax_error_gives_the_line(tmp_path):
    code, lines = check(write(tmp_path, "hostname = a\n[broken\n"))
    assert code == 78
    assert len(lines) == 1 and "line 2" in lines[0]


def test_missing_config_file(tmp_path):
    code, lines = check(str(tmp_path / "absent.conf"))
    assert code == 78 and len(lines) == 1 and "absent.conf" in lines[0]


@pytest.mark.slow
def test_check_config_checks_the_users_file(tmp_path):
    path = write(tmp_path, "hostname = odmr.test\nallow_root = yes\n")
    code, lines = check(path)
    assert code == 78 and any("users" in l for l in lines)
    users = str(tmp_path / "users")
    accounts.add_user(users, "alice", ["example.org"], PASSWORD)
    result = run_cli("-c", path, "check-config")
    assert result.returncode == 0 and result.stdout.strip().endswith(b"ok")
    os.chmod(users, 0o640)
    code, lines = check(path)
    assert code == 78 and any("chmod 600" in l for l in lines)
    os.chmod(users, 0o600)
    with open(users, "a") as fh:
        fh.write("[mallory]\ndomains = ../etc\nscram_sha_256 = nonsense\nfavourite = 1\n")
    code, lines = check(path)
    assert code == 78
    text = "\n".join(lines)
    assert "[mallory]" in text and "domains" in text and "scram_sha_256" in text and "favourite" in text
    with open(users) as fh:
        numbered = {line.split("=")[0].strip(): n for n, line in enumerate(fh, 1)}
    assert "[mallory] (line %d)" % numbered["[mallory]"] in text
    assert "unknown key favourite (line %d)" % numbered["favourite"] in text


@pytest.mark.slow
def test_check_config_print(tmp_path):
    path = write(tmp_path, "pid_file = run/odmrd.pid\n")
    result = run_cli("-c", path, "check-config", "--print", "pid_file")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == str(tmp_path / "run" / "odmrd.pid")
    result = run_cli("-c", path, "check-config", "--print", "no_such_key")
    assert result.returncode == 64 and b"Traceback" not in result.stderr


@pytest.mark.parametrize("text,get", [
    ("[domains]\n[[example.org]]\nrecipients = *\n", lambda s: s.policy("example.org").recipients),
    ("[domains]\n[[example.org]]\nrecipients = postmaster\n", lambda s: s.policy("example.org").recipients),
    ("[odmr]\nproxy_trusted = 10.0.0.1\n", lambda s: s.odmr.proxy_trusted),
    ("[fetch]\ndomains = example.org\n", lambda s: tuple(s.fetch["domains"])),
], ids=["recipients-star", "recipients-one", "proxy-trusted-one", "fetch-domains-one"])
def test_a_single_value_is_a_one_element_list(tmp_path, text, get):
    """The SPEC's own example writes `recipients = *`: a list key must take one value."""
    value = get(config.load(write(tmp_path, text)))
    assert len(value) == 1 and value[0] == text.split("= ")[1].strip()


# -- check-config refuses what serve would refuse ---------------------------------------

@pytest.mark.slow
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


def _check(tmp_path, extra: str = "", sections: str = "", odmr_extra: str = ""):
    from helpers import write_config
    from odmr import accounts
    path = write_config(str(tmp_path), 1, 2, extra=extra, sections=sections, odmr_extra=odmr_extra)
    if not os.path.exists(os.path.join(str(tmp_path), "users")):
        accounts.add_user(os.path.join(str(tmp_path), "users"), "alice", ["example.org"], "pw")
    return run_cli("-c", path, "check-config"), path


@pytest.mark.slow
@pytest.mark.parametrize("extra, sections, odmr_extra, expected", [
    ("", "[tls]\ncert_file = nocert.pem\nkey_file = nokey.pem", "", "[tls] cannot read cert_file"),
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
    from helpers import write_config
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


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the root-only refusal")
def test_check_config_as_root_refuses_what_serve_refuses_as_root(tmp_path):
    from odmr import accounts
    path = tmp_path / "odmrd.conf"
    path.write_text("hostname = odmr.test\n")
    accounts.add_user(str(tmp_path / "users"), "alice", ["example.org"], "pw")
    r = run_cli("-c", str(path), "check-config")
    assert r.returncode == 78 and b"refusing to run as root" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("cert,key,says", [
    ("server.pem", "server.pem", "key_file %(server.pem)s holds no PEM private key"),
    ("server.key", "server.key", "cert_file %(server.key)s holds no PEM certificate"),
    ("server.pem", "client.key", "key_file %(client.key)s does not go with cert_file %(server.pem)s"),
], ids=["cert-as-key", "key-as-cert", "mismatch"])
def test_a_wrong_tls_file_is_named_with_what_is_wrong(tmp_path, pki, cert, key, says):
    """OpenSSL's "PEM lib" names neither file: check-config says which one and why."""
    conf = tmp_path / "odmrd.conf"
    conf.write_text("allow_root = yes\nusers_file = users\n[tls]\ncert_file = %s\nkey_file = %s\n"
                    % (pki[cert], pki[key]))
    accounts.add_user(str(tmp_path / "users"), "alice", ["example.org"], PASSWORD)
    result = run_cli("-c", str(conf), "check-config")
    assert result.returncode == 78
    assert ("[tls] " + says % pki) in result.stderr.decode(), result.stderr


def test_check_config_reports_the_users_file_with_the_configuration(tmp_path):
    """SPEC §2: every error at once, not the users file's only after the configuration is fixed."""
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}x:example.org\nalice:{PLAIN}y:example.net\n")
    conf = tmp_path / "odmrd.conf"
    conf.write_text("allow_root = yes\nusers_file = users\nhostname = not a host\n")
    result = run_cli("-c", str(conf), "check-config")
    err = result.stderr.decode()
    assert result.returncode == 78
    assert "hostname" in err and str(users) in err, err


def test_a_postmaster_address_with_a_route_is_a_configuration_error(tmp_path):
    """It would be refused at every RCPT TO:<postmaster>: unreachable, so refused here."""
    conf = tmp_path / "odmrd.conf"
    conf.write_text("allow_root = yes\nusers_file = users\n[smtp]\npostmaster = pm%evil.com@example.org\n")
    accounts.add_user(str(tmp_path / "users"), "alice", ["example.org"], PASSWORD)
    result = run_cli("-c", str(conf), "check-config")
    assert result.returncode == 78
    assert "postmaster" in result.stderr.decode() and "carries a route" in result.stderr.decode()
