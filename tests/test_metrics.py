"""`[metrics] listen`: GET /metrics in the Prometheus text format 0.0.4, over real HTTP."""
from __future__ import annotations

import base64
import hmac
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from typing import Dict, Tuple

import pytest

from helpers import Customer, Daemon, Provider, accept_all, free_port, send_mail, wait_for
from odmr import accounts
from odmr.exits import EX_OSERR

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*\})? (-?[0-9.e+]+)$')

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """GET /metrics and parse every line: # HELP/# TYPE comments, then samples."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode("utf-8")
    assert text.endswith("\n")
    samples: Samples = {}
    typed = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge")
            typed.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE.match(line)
        assert m, "not a sample line: %r" % line
        assert m.group(1) in typed, line
        labels = tuple(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics_port():
    return free_port()


def make_daemon(tmp_path, port: int, more: str = "", extra: str = "") -> Daemon:
    d = Daemon(str(tmp_path), extra=extra, sections="[metrics]\nlisten = 127.0.0.1:%d\n%s" % (port, more))
    accounts.add_user(d.users, "alice", ["example.org"], "pw-alice-1", True)
    return d


@pytest.fixture
def daemon(tmp_path, metrics_port):
    d = make_daemon(tmp_path, metrics_port)
    d.start()
    yield d
    d.cleanup()


def login(port: int, password: str = "pw-alice-1") -> Tuple[Customer, int]:
    c = Customer(port)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO customer.test")[0] == 250
    code, lines = c.cmd("AUTH CRAM-MD5")
    digest = hmac.new(password.encode(), base64.b64decode(lines[0]), "md5").hexdigest()
    return c, c.cmd(base64.b64encode(b"alice " + digest.encode()).decode())[0]


def metric_sessions(metrics_port: int, port: int) -> float:
    return value(scrape(metrics_port), "odmrd_sessions", port=str(port))


@pytest.mark.slow
def test_counters_move_with_real_traffic(daemon, metrics_port):
    # the harness's start-up probe is a session until its intake worker says it ended
    wait_for(lambda: not metric_sessions(metrics_port, daemon.smtp_port), 15, "the start-up probe to end")
    before = scrape(metrics_port)
    assert value(before, "odmrd_messages_received_total") == 0
    assert value(before, "odmrd_atrn_requests_total", code="250") == 0
    assert value(before, "odmrd_sessions", port=str(daemon.smtp_port)) == 0
    assert value(before, "odmrd_queue_messages") == 0
    send_mail(daemon.smtp_port, "s@remote.test", ["u@example.org"], b"Subject: a\r\n\r\nhi\r\n")
    held = socket.create_connection(("127.0.0.1", daemon.smtp_port))
    held.recv(100)
    # the intake worker's reports (the message stored, the first session over) reach the
    # main process a moment after the client has its 221
    wait_for(lambda: value(scrape(metrics_port), "odmrd_messages_received_total") == 1
             and metric_sessions(metrics_port, daemon.smtp_port) == 1, 15, "the worker's reports")
    mid = scrape(metrics_port)
    assert value(mid, "odmrd_messages_received_total") == 1
    assert value(mid, "odmrd_queue_messages") == 1
    assert value(mid, "odmrd_queue_bytes") > 0
    assert value(mid, "odmrd_sessions", port=str(daemon.smtp_port)) == 1
    held.close()

    c, code = login(daemon.odmr_port, "wrong")
    assert code == 535
    c.close()
    c, code = login(daemon.odmr_port)
    assert code == 235
    assert c.cmd("ATRN example.org")[0] == 250
    accept_all(c, 1)
    c.close()
    wait_for(lambda: value(scrape(metrics_port), "odmrd_messages_delivered_total") == 1,
             what="the delivery to be counted")
    wait_for(lambda: not metric_sessions(metrics_port, daemon.odmr_port),
             what="the delivery session to end (it holds the domain until then: 451)")
    c, _ = login(daemon.odmr_port)
    assert c.cmd("ATRN example.org")[0] == 453
    assert c.cmd("ATRN example.net")[0] == 450
    c.close()
    after = scrape(metrics_port)
    assert value(after, "odmrd_atrn_requests_total", code="250") == 1
    assert value(after, "odmrd_atrn_requests_total", code="453") == 1
    assert value(after, "odmrd_atrn_requests_total", code="450") == 1
    assert value(after, "odmrd_auth_failures_total", mechanism="CRAM-MD5") == 1
    assert value(after, "odmrd_queue_messages") == 0
    assert value(after, "odmrd_recipients_bounced_total") == 0

    daemon.proc.send_signal(signal.SIGHUP)           # counters survive a reload
    wait_for(lambda: "reloaded" in daemon.log(), what="the reload")
    reloaded = scrape(metrics_port)
    assert value(reloaded, "odmrd_messages_received_total") == 1
    assert value(reloaded, "odmrd_atrn_requests_total", code="250") == 1


@pytest.mark.slow
def test_other_paths_are_404(daemon, metrics_port):
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen("http://127.0.0.1:%d/" % metrics_port, timeout=10)
    assert caught.value.code == 404


@pytest.mark.slow
def test_queue_gauges_per_domain_only_when_asked(tmp_path, metrics_port):
    d = make_daemon(tmp_path, metrics_port, "per_domain = yes\n")
    accounts.add_user(d.users, "bob", ["example.net"], "pw-bob-1", True)
    d.start()
    try:
        for rcpt in ("a@example.org", "b@example.org", "c@example.net"):
            send_mail(d.smtp_port, "s@remote.test", [rcpt], b"Subject: a\r\n\r\nhi\r\n")
        # an intake worker reports what it stored when its session ends, just after the 221
        wait_for(lambda: scrape(metrics_port).get(("odmrd_queue_messages", (("domain", "example.net"),))) == 1,
                 10, "the last message to reach /metrics")
        samples = scrape(metrics_port)
        assert value(samples, "odmrd_queue_messages", domain="example.org") == 2
        assert value(samples, "odmrd_queue_messages", domain="example.net") == 1
        assert ("odmrd_queue_messages", ()) not in samples
        assert 0 <= value(samples, "odmrd_queue_oldest_seconds", domain="example.org") < 60
    finally:
        d.cleanup()


@pytest.mark.slow
def test_per_domain_off_gives_one_series(daemon, metrics_port):
    send_mail(daemon.smtp_port, "s@remote.test", ["u@example.org"], b"Subject: a\r\n\r\nhi\r\n")
    samples = scrape(metrics_port)
    names = [labels for name, labels in samples if name == "odmrd_queue_messages"]
    assert names == [()]


@pytest.mark.slow
def test_port_taken_refuses_to_start(tmp_path, metrics_port):
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", metrics_port))
    taken.listen()
    d = make_daemon(tmp_path, metrics_port)
    try:
        with pytest.raises(AssertionError):
            d.start(timeout=10)
        assert d.proc.wait(10) == EX_OSERR
        assert "cannot listen on 127.0.0.1:%d (metrics): Address already in use" % metrics_port in d.log()
        assert "Traceback" not in d.log()
    finally:
        taken.close()
        d.cleanup()


@pytest.mark.slow
def test_certificate_expiry(tmp_path, metrics_port, pki):
    d = make_daemon(tmp_path, metrics_port,
                    "[tls]\ncert_file = %s\nkey_file = %s\n" % (pki["server.pem"], pki["server.key"]))
    d.start()
    try:
        left = value(scrape(metrics_port), "odmrd_tls_certificate_expiry_seconds")
        assert 29 * 86400 < left <= 30 * 86400 + 60      # make_pki issues 30-day certificates
    finally:
        d.cleanup()


@pytest.mark.slow
def test_a_trickling_client_cannot_hold_the_endpoint(daemon, metrics_port, monkeypatch):
    """Every scraper place taken by clients sending a byte now and then: each is cut at
    the whole-request deadline, and a real scrape gets through again."""
    from odmr import metrics
    held = []
    for _ in range(metrics.MAX_SCRAPERS + 2):
        s = socket.create_connection(("127.0.0.1", metrics_port), timeout=10)
        s.sendall(b"GET /metr")
        held.append(s)
    allowed = getattr(metrics, "REQUEST_DEADLINE", 5.0)
    started = time.monotonic()
    deadline = started + allowed + 10
    while time.monotonic() < deadline:
        for s in held:
            try:
                s.sendall(b"i")                    # a byte at a time, never the end of the line
            except OSError:
                pass
        try:
            scrape(metrics_port)
            break
        except OSError:
            time.sleep(0.5)
    else:
        pytest.fail("the endpoint stayed blocked")
    assert time.monotonic() - started < allowed + 10
    for s in held:
        s.close()


@pytest.mark.slow
def test_queue_families_stay_when_no_domain_is_queued(tmp_path, metrics_port):
    d = make_daemon(tmp_path, metrics_port, more="per_domain = yes\n")
    d.start()
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port, timeout=10) as r:
            text = r.read().decode("utf-8")
        for family in ("odmrd_queue_messages", "odmrd_queue_bytes", "odmrd_queue_oldest_seconds"):
            assert "# TYPE %s gauge" % family in text
    finally:
        d.cleanup()


@pytest.mark.slow
def test_two_services_in_one_process_count_apart(tmp_path):
    """Each service owns its counters, sessions and backlog: mail one takes, and a session
    it holds, never show in the other's /metrics (the harness runs several in one process)."""
    providers, ports = [], []
    try:
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
            ports.append(free_port())
            p = Provider(str(tmp_path / name), sections="[metrics]\nlisten = 127.0.0.1:%d\n" % ports[-1])
            p.add_user("alice", ["example.org"])
            providers.append(p)
            p.start()
        one, two = providers
        send_mail(one.smtp_port, "s@remote.test", ["u@example.org"], b"Subject: a\r\n\r\nhi\r\n")
        held = socket.create_connection(("127.0.0.1", one.smtp_port))
        held.recv(100)
        try:
            seen_by_one, seen_by_two = scrape(ports[0]), scrape(ports[1])
        finally:
            held.close()
        assert value(seen_by_one, "odmrd_messages_received_total") == 1
        assert value(seen_by_one, "odmrd_queue_messages") == 1
        assert value(seen_by_one, "odmrd_sessions", port=str(one.smtp_port)) == 1
        assert value(seen_by_two, "odmrd_messages_received_total") == 0
        assert value(seen_by_two, "odmrd_queue_messages") == 0
        assert ("odmrd_sessions", (("port", str(one.smtp_port)),)) not in seen_by_two
    finally:
        for p in providers:
            p.stop()
