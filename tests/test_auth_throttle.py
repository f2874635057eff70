"""The AUTH throttle counts a client, not an address: an IPv6 client by its /64.

Every home line gets at least a /64, so a guesser counted per exact IPv6 address
would rotate through addresses and never be throttled. IPv4 clients are counted
by their address, also when one arrives IPv4-mapped (`::ffff:a.b.c.d`). The log
keeps naming the real address.
"""
from __future__ import annotations

import base64
import logging
import socket

import pytest

from helpers import Customer, Provider, connect_with, free_port
from odmr.throttle import AuthThrottle

LIMIT, WINDOW = 2, 600.0


def failed(throttle: AuthThrottle, address: str, times: int = LIMIT) -> AuthThrottle:
    for _ in range(times):
        throttle.record(address)
    return throttle


def blocked(throttle: AuthThrottle, address: str) -> bool:
    return throttle.blocked(address, LIMIT, WINDOW)


# -- the key -----------------------------------------------------------------------------

def test_addresses_of_one_ipv6_64_are_blocked_together():
    throttle = failed(AuthThrottle(), "2001:db8:1:2::a")
    assert blocked(throttle, "2001:db8:1:2::a")
    assert blocked(throttle, "2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert blocked(throttle, "2001:DB8:1:2:0:0:0:b")


def test_failures_spread_over_one_64_add_up():
    throttle = AuthThrottle()
    throttle.record("2001:db8:1:2::1")
    assert not blocked(throttle, "2001:db8:1:2::3")
    throttle.record("2001:db8:1:2::2")
    assert blocked(throttle, "2001:db8:1:2::3")


def test_different_ipv6_64s_are_apart():
    throttle = failed(AuthThrottle(), "2001:db8:1:2::a")
    assert not blocked(throttle, "2001:db8:1:3::a")
    assert not blocked(throttle, "2001:db8:2:2::a")


def test_ipv4_and_its_mapped_form_are_one_client():
    throttle = failed(AuthThrottle(), "::ffff:192.0.2.7")
    assert blocked(throttle, "192.0.2.7")
    throttle = failed(AuthThrottle(), "192.0.2.7")
    assert blocked(throttle, "::ffff:192.0.2.7")
    assert not blocked(throttle, "192.0.2.8")            # IPv4 stays per address
    assert not blocked(throttle, "::ffff:192.0.2.8")


# -- over real sockets ---------------------------------------------------------------------

def cram_fail(c: Customer) -> int:
    assert c.cmd("AUTH CRAM-MD5")[0] == 334
    return c.cmd(base64.b64encode(b"alice " + b"0" * 32).decode())[0]


def throttling_provider(tmp_path, odmr_extra: str = "") -> Provider:
    p = Provider(str(tmp_path), odmr_extra="auth_throttle_failures = %d\nauth_throttle_window = 10m\n%s"
                 % (LIMIT, odmr_extra))
    p.add_user("alice", ["example.org"])
    return p


def via_balancer(port: int, client: str, client_port: int) -> Customer:
    return connect_with(port, b"PROXY TCP6 %s ::1 %d 3366\r\n" % (client.encode(), client_port))


def test_rotating_through_a_64_behind_a_balancer_is_throttled(tmp_path, caplog):
    """The ODMR port behind a PROXY balancer sees each client's real IPv6 address."""
    caplog.set_level(logging.INFO, logger="odmrd")
    p = throttling_provider(tmp_path, "proxy_protocol = yes\nproxy_trusted = 127.0.0.1").start()
    try:
        for n in range(LIMIT):
            c = via_balancer(p.odmr_port, "2001:db8:1:2::%x" % (n + 1), 1000 + n)
            assert c.reply()[0] == 220
            assert c.cmd("EHLO customer.test")[0] == 250
            assert cram_fail(c) == 535
            c.close()
        rotated = via_balancer(p.odmr_port, "2001:db8:1:2:ffff::9", 2000)
        code, lines = rotated.reply()
        rotated.close()
        assert code == 421 and "failed authentications" in lines[0]
        assert "[2001:db8:1:2:ffff::9]:2000 refused" in caplog.text     # the real address is logged
        neighbour = via_balancer(p.odmr_port, "2001:db8:1:3::1", 2001)     # another /64
        assert neighbour.reply()[0] == 220
        neighbour.close()
    finally:
        p.stop()


def ipv6_loopback_port() -> int:
    """A port free on both loopbacks (the harness checks only 127.0.0.1's)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET6) as s:
            try:
                s.bind(("::1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port on ::1")


class IPv6Customer(Customer):
    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("::1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) in this sandbox")
def test_failed_auth_over_ipv6_throttled_across_sessions(tmp_path):
    p = throttling_provider(tmp_path)
    port = ipv6_loopback_port()
    with open(p.config) as fh:
        text = fh.read()
    with open(p.config, "w") as fh:
        fh.write(text.replace("listen = 127.0.0.1:%d" % p.odmr_port, "listen = [::1]:%d" % port, 1))
    p.start()
    try:
        for _ in range(LIMIT):
            c = IPv6Customer(port)
            assert c.reply()[0] == 220
            assert c.cmd("EHLO customer.test")[0] == 250
            assert cram_fail(c) == 535
            c.close()
        c = IPv6Customer(port)
        assert c.reply()[0] == 421
        c.close()
    finally:
        p.stop()
