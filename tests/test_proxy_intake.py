"""PROXY protocol v1/v2 on the intake port: behind the load balancer in
front of the MX, the real client goes into the logs, the per-address limits and the
Received: header; anything else from the balancer, or anyone else, is dropped."""
from __future__ import annotations

import email
import logging

import pytest

from helpers import Customer, Daemon, Provider, connect_with, proxied_provider, v2_header

V1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 25\r\n"


def make(tmp_path, trusted_list: str = "127.0.0.1") -> Provider:
    return proxied_provider(tmp_path, trusted_list, port="smtp")


@pytest.fixture
def proxied(tmp_path):
    p = make(tmp_path)
    yield p
    p.stop()


def send_through(port: int, header: bytes) -> Customer:
    c = connect_with(port, header)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<s@outside.test>")[0] == 250
    assert c.cmd("RCPT TO:<u@example.org>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    assert c.cmd("Subject: via the balancer\r\n\r\nhi\r\n.")[0] == 250
    return c


def received_of(p: Provider) -> str:
    [msg_id] = p.spooled("example.org")
    return email.message_from_bytes(p.spool.load("example.org", msg_id).read_data())["Received"]


@pytest.mark.parametrize("header", [V1, v2_header("192.0.2.7", 5555)], ids=["v1", "v2"])
def test_the_real_client_is_logged_and_in_the_received_header(proxied, caplog, header):
    caplog.set_level(logging.INFO)
    send_through(proxied.smtp_port, header).close()
    assert "smtp: connect from 192.0.2.7:5555" in caplog.text
    assert "client=192.0.2.7:5555" in caplog.text
    assert "[192.0.2.7]" in received_of(proxied) and "127.0.0.1" not in received_of(proxied)


@pytest.mark.parametrize("header", [b"EHLO no.header\r\n", b"PROXY TCP4 nonsense\r\n",
                                    b"PROXY UNKNOWN-ish 1 2\r\n"], ids=["missing", "garbled", "odd"])
def test_a_missing_or_malformed_header_drops_the_connection(proxied, header):
    c = connect_with(proxied.smtp_port, header)
    c.sock.settimeout(15)
    assert c.sock.recv(100) == b""
    c.close()
    assert proxied.spooled("example.org") == []


def test_a_header_from_an_untrusted_peer_drops_the_connection(tmp_path):
    p = make(tmp_path, trusted_list="10.99.0.0/16")
    try:
        c = connect_with(p.smtp_port, V1)
        c.sock.settimeout(10)
        assert c.sock.recv(100) == b""
        c.close()
    finally:
        p.stop()


def test_the_per_address_limit_counts_the_real_client(proxied):
    held = [connect_with(proxied.smtp_port, b"PROXY TCP4 192.0.2.7 127.0.0.1 %d 25\r\n" % port)
            for port in (1, 2)]
    for c in held:
        assert c.reply()[0] == 220
    third = connect_with(proxied.smtp_port, b"PROXY TCP4 192.0.2.7 127.0.0.1 3 25\r\n")
    assert third.reply()[0] == 421
    other = connect_with(proxied.smtp_port, b"PROXY TCP4 192.0.2.8 127.0.0.1 4 25\r\n")
    assert other.reply()[0] == 220
    for c in held + [third, other]:
        c.close()


def test_the_odmr_port_setting_does_not_turn_it_on_at_intake(tmp_path):
    p = Provider(str(tmp_path), odmr_extra="proxy_protocol = yes")
    p.add_user("alice", ["example.org"])
    p.start()
    try:
        c = Customer(p.smtp_port)
        assert c.reply()[0] == 220            # no header expected: a plain SMTP client works
        c.close()
    finally:
        p.stop()


@pytest.mark.slow
def test_a_daemon_with_intake_workers_reads_the_header_too(tmp_path):
    """`odmrd serve` forks intake workers; behind a balancer the sessions stay where the
    real client is counted, and the header is never taken for a command."""
    d = Daemon(str(tmp_path), smtp_extra="proxy_protocol = yes\nworkers = 2").start()
    try:
        c = connect_with(d.smtp_port, V1)
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        c.close()
        assert "192.0.2.7:5555" in d.log()
    finally:
        d.cleanup()


@pytest.mark.parametrize("header", [
    b"PROXY TCP6 fe80::1%a ::1 5555 25\r\n",                                  # a zone id
    b"PROXY TCP6 fe80::1%a\nRecipient:\t<evil@b.test>\nBody:\t7BIT ::1 5555 25\r\n",
    b"PROXY TCP4 192.0.2.7 127.0.0.1 +55 25\r\n",
    b"PROXY TCP4 192.0.2.7\t127.0.0.1 5555 25\r\n",
], ids=["zone-id", "zone-id-injection", "signed-port", "tab"])
def test_anything_but_plain_addresses_in_a_v1_header_drops_the_connection(proxied, header):
    c = connect_with(proxied.smtp_port, header)
    c.sock.settimeout(15)
    assert c.sock.recv(100) == b""
    c.close()


def test_an_ipv4_mapped_client_is_the_same_client(proxied, caplog):
    caplog.set_level(logging.INFO)
    held = [connect_with(proxied.smtp_port, b"PROXY TCP4 198.51.100.50 127.0.0.1 %d 25\r\n" % port)
            for port in (1, 2)]
    for c in held:
        assert c.reply()[0] == 220
    mapped = connect_with(proxied.smtp_port, b"PROXY TCP6 ::ffff:198.51.100.50 ::1 3 25\r\n")
    assert mapped.reply()[0] == 421                       # the same address, the same limit
    for c in held + [mapped]:
        c.close()
