"""Hosts for multi-host tests: network namespaces on this machine (scripts/hosts.py).

``hosts2`` / ``hosts4`` give a fresh set of 2 / 4 hosts per test; ``make_hosts(n, names=None)`` makes any
number (named as given: names exist only inside the namespaces, so every test may call its hosts node1,
node2, and ports may be fixed: each set is its own network).
Every set is torn down after its test (also when it fails), at interpreter exit and on SIGTERM/SIGINT;
a set left by a killed run is removed by the next session's start (``clean_stale``). Where namespaces
cannot be made (not root, no iproute2, a container without CAP_SYS_ADMIN) the tests skip and say why.
"""

from __future__ import annotations

import pytest

from tests.multihost.harness import hosts_lib


@pytest.fixture(scope="session")
def _hosts_available():
    why = hosts_lib.unavailable()
    if why:
        pytest.skip(f"multi-host tests need network namespaces: {why}")
    hosts_lib.clean_stale()


@pytest.fixture
def make_hosts(_hosts_available):
    made = []

    def make(n: int, names=None):
        h = hosts_lib.Hosts(n, names=names).up()
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.down()


@pytest.fixture
def hosts2(make_hosts):
    return make_hosts(2)


@pytest.fixture
def hosts4(make_hosts):
    return make_hosts(4)
