"""pytest's hooks and the shared fixtures; the harness they build on is in helpers.py."""
from __future__ import annotations

from typing import List

import pytest

from helpers import (Customer, LocalServer, Provider, ScriptedMTA, Scripted, hosting_provider, make_pki,
                     relay_provider, stop_quickly, which)


def pytest_configure(config) -> None:
    """`-m "not slow"` is the fast subset (under a minute on two cores); CI runs everything."""
    config.addinivalue_line(
        "markers", "slow: over ~0.25 s here, or drives a real peer (fetchmail, Postfix, init scripts, "
        "a pyz build, kill -9 loops)")


@pytest.fixture
def provider(tmp_path):
    """A provider with account alice (example.org, example.com) and bob (example.net)."""
    p = hosting_provider(str(tmp_path))
    yield p
    p.stop()


@pytest.fixture
def customer_factory(provider):
    made = []

    def make(port=None):
        c = Customer(port or provider.odmr_port)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="module")
def shared_provider(tmp_path_factory):
    """One provider for the module (starting and stopping one costs more than most tests)."""
    p = Provider(str(tmp_path_factory.mktemp("provider")), odmr_extra="auth_throttle_failures = 0")
    p.add_user("alice", ["example.org", "example.com"])
    p.add_user("bob", ["example.net"])
    p.start()
    yield p
    stop_quickly(p)


# -- fixtures over the harnesses in helpers.py

@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA with server, client and stranger certificates (one set for the whole run)."""
    if which("openssl") is None:
        pytest.skip("openssl is not installed")
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def scripted():
    """A factory of scripted ODMR providers, all closed at teardown."""
    made: List[Scripted] = []

    def make(**kw) -> Scripted:
        s = Scripted(**kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


@pytest.fixture
def local(tmp_path):
    """A factory of fetch's local SMTP servers (one connection each), closed at teardown."""
    made: List[LocalServer] = []

    def make(**kw) -> LocalServer:
        server = LocalServer(str(tmp_path / ("Maildir%d" % len(made))), **kw)
        made.append(server)
        return server
    yield make
    for server in made:
        server.close()


@pytest.fixture
def relayed(tmp_path):
    """A provider whose bounce_relay is a ScriptedMTA offering `features`: (provider, sink)."""
    made = []

    def make(features=("8BITMIME",)):
        sink = ScriptedMTA([], features=list(features))
        made.append(sink)
        p = relay_provider(tmp_path, sink)
        made.append(p)
        return p, sink
    yield make
    for thing in reversed(made):
        thing.stop() if isinstance(thing, Provider) else thing.close()
