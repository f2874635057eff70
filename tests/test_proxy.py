"""PROXY protocol v1/v2 on the ODMR port: only from trusted balancers, real client address used."""
from __future__ import annotations

import logging

import pytest

from helpers import Customer, connect_with, proxied_provider, v2_header
from odmr.proxy import V2_SIGNATURE, trusted


@pytest.fixture
def proxied(tmp_path):
    p = proxied_provider(tmp_path)
    yield p
    p.stop()


@pytest.mark.slow
@pytest.mark.parametrize("header", [b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 3366\r\n",
                                    v2_header("192.0.2.7", 5555)], ids=["v1", "v2"])
def test_real_client_address_is_used(proxied, caplog, header):
    caplog.set_level(logging.INFO)
    c = connect_with(proxied.odmr_port, header)
    c.login()
    assert c.cmd("ATRN")[0] == 453
    c.close()
    assert "authenticated" in caplog.text and "192.0.2.7:5555" in caplog.text


@pytest.mark.slow
def test_header_sent_together_with_the_first_command(proxied):
    c = connect_with(proxied.odmr_port, b"PROXY TCP4 192.0.2.9 127.0.0.1 4444 3366\r\nEHLO x.test\r\n")
    assert c.reply()[0] == 220
    assert c.reply()[0] == 250           # the EHLO behind the header was not swallowed
    c.close()


@pytest.mark.slow
@pytest.mark.parametrize("header", [b"EHLO no.header\r\n", b"PROXY TCP4 nonsense\r\n",
                                    b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY " + b"x" * 120 + b"\r\n",
                                    V2_SIGNATURE + b"\x31\x11\x00\x00"],
                         ids=["missing", "garbled", "family", "long", "v2-version"])
def test_bad_header_drops_the_connection(proxied, header):
    c = connect_with(proxied.odmr_port, header)
    c.sock.settimeout(15)
    assert c.sock.recv(100) == b""
    c.close()


@pytest.mark.slow
def test_untrusted_sender_is_dropped(tmp_path):
    p = proxied_provider(tmp_path, trusted_list="10.99.0.0/16")
    try:
        c = connect_with(p.odmr_port, b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 3366\r\n")
        c.sock.settimeout(10)
        assert c.sock.recv(100) == b""
        c.close()
    finally:
        p.stop()


@pytest.mark.slow
def test_per_address_limit_counts_the_real_client(proxied):
    held = [connect_with(proxied.odmr_port, b"PROXY TCP4 192.0.2.7 127.0.0.1 %d 3366\r\n" % port)
            for port in (1, 2)]
    for c in held:
        assert c.reply()[0] == 220
    third = connect_with(proxied.odmr_port, b"PROXY TCP4 192.0.2.7 127.0.0.1 3 3366\r\n")
    assert third.reply()[0] == 421
    other = connect_with(proxied.odmr_port, b"PROXY TCP4 192.0.2.8 127.0.0.1 4 3366\r\n")
    assert other.reply()[0] == 220
    for c in held + [third, other]:
        c.close()


def test_trusted_matching():
    assert trusted("127.0.0.1", ["127.0.0.1"])
    assert trusted("::ffff:127.0.0.1", ["127.0.0.0/8"])
    assert trusted("::1", ["::1"])
    assert not trusted("127.0.0.2", ["127.0.0.1"])
    assert not trusted("garbage", ["127.0.0.1"])
    assert not trusted("127.0.0.1", ["not-a-network"])


@pytest.mark.slow
@pytest.mark.parametrize("version,split", [(1, 3), (1, 8), (2, 3), (2, 13)],
                         ids=["v1-in-prefix", "v1-after-prefix", "v2-in-signature", "v2-after-signature"])
def test_header_split_across_segments(proxied, version, split):
    import time
    header = b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 3366\r\n" if version == 1 else v2_header("192.0.2.7", 5)
    c = Customer(proxied.odmr_port)
    c.sock.sendall(header[:split])
    time.sleep(0.3)
    c.sock.sendall(header[split:])
    assert c.reply()[0] == 220
    c.close()
