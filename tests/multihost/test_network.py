"""Each rank finds the interface that reaches MASTER_ADDR by itself, on hosts whose own name resolves to
loopback (Debian's 127.0.1.1), or stops with one line naming the variable to set."""

import subprocess
import sys

from tests.multihost.harness import REPO

PICK = """
import sys
from molm_ds.parallel.network import NetworkError, interface_for
try:
    print(interface_for(sys.argv[1], multi_host=sys.argv[2] == "1"))
except NetworkError as e:
    print("error:", e)
"""


def pick(h, i, master, multi=True):
    out = h.run(i, [sys.executable, "-c", PICK, master, "1" if multi else "0"], capture_output=True, text=True,
                cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_every_host_finds_the_interface_to_the_master(hosts2):
    h = hosts2
    assert pick(h, 1, h.hostname(0)) == "eth0"  # a remote master: the route's interface
    assert pick(h, 1, h.addr(0)) == "eth0"
    # the master's own host: its name resolves to 127.0.1.1, yet peers must reach it over eth0
    assert pick(h, 0, h.hostname(0)) == "eth0"
    assert pick(h, 0, h.hostname(0), multi=False) == "lo"  # one host: loopback is right
    assert pick(h, 0, "127.0.0.1") == "lo"  # a literal loopback master means one host, whatever the launcher says


def test_ambiguous_interfaces_stop_with_the_variable_to_set(hosts2):
    h = hosts2
    # a second outward interface and no default route: no way to tell which one the other hosts share
    subprocess.run(["ip", "-n", h.ns(0), "link", "add", "ib0", "type", "veth", "peer", "name", "ib0p"], check=True)
    subprocess.run(["ip", "-n", h.ns(0), "addr", "add", "10.99.0.1/24", "dev", "ib0"], check=True)
    subprocess.run(["ip", "-n", h.ns(0), "link", "set", "ib0", "up"], check=True)
    out = pick(h, 0, h.hostname(0))
    assert out.startswith("error: cannot tell which network interface") and "set GLOO_SOCKET_IFNAME" in out
    assert "eth0, ib0" in out and "MASTER_ADDR=" in out
    assert pick(h, 1, h.hostname(0)) == "eth0"  # the other host routes to the master's address: no ambiguity
