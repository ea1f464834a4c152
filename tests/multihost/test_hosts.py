"""The hosts harness itself: separate network stacks that reach each other only over eth0, hostnames
that resolve to loopback on their own host, a cable that can be cut, and nothing left behind."""

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.multihost.harness import REPO, hosts_lib

PY = sys.executable

SERVE = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5601)); s.listen(); s.settimeout(20)
c, a = s.accept(); c.sendall(socket.gethostname().encode()); print(a[0])
"""
CONNECT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 5601), timeout=float(sys.argv[2]))
print(c.recv(100).decode())
"""


def _connect(h, i, target, timeout=5.0):
    return h.run(i, [PY, "-c", CONNECT, target, str(timeout)], capture_output=True, text=True, timeout=60)


def test_hosts_talk_over_eth0_and_resolve_each_other(hosts2):
    h = hosts2
    out = h.run(1, ["sh", "-c", "hostname; getent hosts $(hostname); ip -o -4 addr show"],
                capture_output=True, text=True, check=True).stdout
    name, own, *addrs = out.splitlines()
    assert name == h.hostname(1)
    assert own.split()[0] == "127.0.1.1"  # as on Debian/Ubuntu: the hostname is a loopback address
    assert any(h.addr(1) in a and "eth0" in a for a in addrs) and not any(h.addr(0) in a for a in addrs)
    server = h.popen(1, [PY, "-c", SERVE], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(50):  # until the server listens
            got = _connect(h, 0, h.hostname(1))
            if got.returncode == 0:
                break
        assert got.stdout.strip() == h.hostname(1)
        assert server.communicate(timeout=20)[0].strip() == h.addr(0)  # came from host 0's eth0
    finally:
        server.kill()


def test_cut_link_refuses_traffic_and_mend_restores_it(hosts2):
    h = hosts2
    h.cut(1)
    assert _connect(h, 0, h.addr(1), timeout=1.0).returncode != 0
    h.mend(1)
    server = h.popen(1, [PY, "-c", SERVE], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(50):
            got = _connect(h, 0, h.addr(1))
            if got.returncode == 0:
                break
        assert got.stdout.strip() == h.hostname(1)
    finally:
        server.kill()


def test_four_hosts_and_down_leaves_nothing(make_hosts):
    h = make_hosts(4)
    sleeper = h.popen(3, ["sleep", "300"])
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(h.ns(i) in names for i in range(4)) and h.switch in names
    h.down()
    assert sleeper.wait(timeout=10) != 0  # killed with its host
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert h.prefix not in names
    assert not (hosts_lib.STATE_DIR / f"{h.prefix}.json").exists()


def test_a_killed_owner_leaves_a_set_that_clean_stale_removes(_hosts_available, tmp_path):
    # a child makes a set and is SIGKILLed (no atexit, no handler): the set stays until clean_stale
    code = f"""
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("h", {str(REPO / 'scripts' / 'hosts.py')!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
h = m.Hosts(2).up(); print(h.prefix, flush=True); os.kill(os.getpid(), 9)
"""
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    prefix = p.stdout.strip()
    assert prefix and prefix in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert any(prefix in r for r in hosts_lib.clean_stale())
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_sigterm_to_the_owner_removes_its_set(_hosts_available):
    code = f"""
import importlib.util, os, time
spec = importlib.util.spec_from_file_location("h", {str(REPO / 'scripts' / 'hosts.py')!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
h = m.Hosts(2).up(); print(h.prefix, flush=True); time.sleep(60)
"""
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    prefix = p.stdout.readline().strip()
    assert prefix in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    p.terminate()
    p.wait(timeout=30)
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_cli_up_run_rsh_down(_hosts_available):
    cli = [PY, str(REPO / "scripts" / "hosts.py")]
    if any(st["prefix"] == hosts_lib.CLI_PREFIX for st in hosts_lib._known_sets()):
        pytest.skip("a person's `scripts/hosts.py up` set is live on this machine")
    try:
        up = subprocess.run(cli + ["up", "2"], capture_output=True, text=True, check=True).stdout
        assert "198.18.23.2" in up.splitlines()[1]
        assert subprocess.run(cli + ["run", "1", "hostname"], capture_output=True, text=True).stdout.strip() == "molmh-1"
        out = subprocess.run(cli + ["rsh", "molmh-0", "echo", "on", "$(hostname)"], capture_output=True, text=True)
        assert out.stdout.strip() == "on molmh-0"
        if importlib.util.find_spec("asyncssh") and shutil.which("ssh"):  # passwordless ssh between the hosts
            subprocess.run(cli + ["ssh"], capture_output=True, text=True, check=True, timeout=120)
            out = subprocess.run(cli + ["run", "0", "ssh", "molmh-1", "hostname"], capture_output=True, text=True,
                                 timeout=60)
            assert out.stdout.strip() == "molmh-1", out.stderr
        bad = subprocess.run(cli + ["run", "7", "true"], capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.startswith("error: no host '7'")
    finally:
        subprocess.run(cli + ["down"], capture_output=True)
    assert "molmh-h0" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not pathlib.Path("/etc/netns/molmh-h0").exists() and not list(hosts_lib.STATE_DIR.glob("molmh-*"))
