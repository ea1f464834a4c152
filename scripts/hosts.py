#!/usr/bin/env python3
"""Hosts on one machine: Linux network namespaces joined by a bridge, sharing the filesystem.

Each host is a network namespace with its own ``lo`` and an ``eth0`` (one end of a veth pair) whose
other end sits on a bridge inside a separate "switch" namespace, so the machine's own interfaces and
routes are never touched. Addresses come from 198.18.0.0/15 (RFC 2544, reserved for network tests)
and exist only inside these namespaces. A command run on a host also gets its own hostname (a UTS
namespace) and an /etc/hosts where that hostname resolves to 127.0.1.1, as on stock Debian/Ubuntu,
and the other hosts' names to their addresses — the setup that makes a process advertise loopback.

    python scripts/hosts.py up 2                  # hosts molmh-0 and molmh-1 (prints their addresses)
    python scripts/hosts.py up 2 --names node1,node2   # any names: they exist only inside the namespaces
    python scripts/hosts.py run 1 hostname -I     # a command on host 1 (by index or hostname)
    python scripts/hosts.py rsh molmh-1 CMD...    # the same, as an rsh/ssh agent (mpirun --mca plm_rsh_agent)
    python scripts/hosts.py ssh                   # an ssh server on every host, root's key authorised (asyncssh)
    python scripts/hosts.py cut 1 / mend 1        # pull / plug host 1's cable
    python scripts/hosts.py down                  # kill everything on the hosts and delete them
    python scripts/hosts.py clean                 # delete sets left behind by dead test runs

As a library (the pytest fixture in tests/multihost/conftest.py uses it): ``with Hosts(2) as h:
h.popen(0, argv)``. A set made by a library caller is named after its process (prefix
``molmh<pid>x<random>``) and removed at exit, on SIGTERM/SIGINT/SIGHUP, and by ``clean`` once that
process is gone. Needs root and iproute2 (``ip netns``); :func:`unavailable` says why not otherwise.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Hosts", "unavailable", "clean_stale", "SUBNET"]

SUBNET = "198.18.23"  # /24; host i is .(i+1)
STATE_DIR = Path("/run/molm-hosts")  # one JSON per live set (the CLI finds its set here)
CLI_PREFIX = "molmh"
_LIVE: dict[str, "Hosts"] = {}


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
    return p


def unavailable() -> str | None:
    """Why hosts cannot be made here (None when they can): not Linux, not root, no iproute2, or the
    kernel refuses network namespaces (an unprivileged container)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"{tool} not found (install iproute2 / util-linux)"
    probe = f"molmhprobe{os.getpid()}x{secrets.token_hex(2)}"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"cannot create a network namespace: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Hosts:
    """``n`` hosts: namespaces ``{prefix}-h{i}`` with address ``SUBNET.{i+1}`` on ``eth0``, hostname
    ``{prefix}-{i}``, plus ``{prefix}-sw`` holding the bridge. ``up()`` builds them, ``down()`` kills
    every process inside and deletes them (idempotent)."""

    def __init__(self, n: int, prefix: str | None = None, owner: int | None = None, names: list[str] | None = None):
        if not 1 <= n <= 200:
            raise ValueError(f"n must be in 1..200, got {n}")
        if names is not None and (len(names) != n or len(set(names)) != n):
            raise ValueError(f"names must be {n} distinct host names, got {names}")
        self.n = n
        self.names = list(names) if names else None  # hostnames only exist inside the namespaces: any will do
        self.owner = os.getpid() if owner is None else owner  # 0: a set made by the CLI, kept until `down`
        self.prefix = prefix or f"{CLI_PREFIX}{self.owner}x{secrets.token_hex(2)}"
        self.switch = f"{self.prefix}-sw"
        self.up_ = False

    # names and addresses
    def ns(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def hostname(self, i: int) -> str:
        return self.names[i] if self.names else f"{self.prefix}-{i}"

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def index(self, host: str | int) -> int:
        """A host given as an index, its hostname or its address."""
        s = str(host)
        for i in range(self.n):
            if s in (str(i), self.hostname(i), self.addr(i), self.ns(i)):
                return i
        raise KeyError(f"no host {host!r} (hosts: {[self.hostname(i) for i in range(self.n)]})")

    def hosts_file(self, i: int) -> str:
        lines = ["127.0.0.1 localhost", f"127.0.1.1 {self.hostname(i)}"]
        lines += [f"{self.addr(j)} {self.hostname(j)}" for j in range(self.n) if j != i]
        return "\n".join(lines) + "\n"

    # life cycle
    def up(self) -> "Hosts":
        _LIVE[self.prefix] = self
        _install_handlers()
        try:
            self._write_state()
            _ip("netns", "add", self.switch)
            _ip("link", "add", "br0", "type", "bridge", "forward_delay", "0", ns=self.switch)
            _ip("link", "set", "br0", "up", ns=self.switch)
            for i in range(self.n):
                ns = self.ns(i)
                _ip("netns", "add", ns)
                _ip("link", "set", "lo", "up", ns=ns)
                _ip("link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", ns, ns=self.switch)
                _ip("link", "set", f"h{i}", "master", "br0", ns=self.switch)
                _ip("link", "set", f"h{i}", "up", ns=self.switch)
                _ip("addr", "add", f"{self.addr(i)}/24", "dev", "eth0", ns=ns)
                _ip("link", "set", "eth0", "up", ns=ns)
                etc = Path("/etc/netns") / ns  # `ip netns exec` binds these over /etc inside the namespace
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(self.hosts_file(i))
                (etc / "hostname").write_text(self.hostname(i) + "\n")
            self.up_ = True
        except BaseException:
            self.down()
            raise
        return self

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / f"{self.prefix}.json").write_text(json.dumps({"prefix": self.prefix, "n": self.n, "owner": self.owner,
                                                                   "names": self.names}))

    def pids(self) -> list[int]:
        out: set[int] = set()
        for ns in [self.ns(i) for i in range(self.n)] + [self.switch]:
            p = _ip("netns", "pids", ns, check=False)
            out.update(int(x) for x in p.stdout.split() if x.strip().isdigit())
        out.discard(os.getpid())
        return sorted(out)

    def kill(self, i: int | None = None, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to every process on host ``i`` (all hosts when None); returns their pids."""
        nss = [self.ns(i)] if i is not None else [self.ns(j) for j in range(self.n)]
        pids = []
        for ns in nss:
            p = _ip("netns", "pids", ns, check=False)
            pids += [int(x) for x in p.stdout.split() if x.strip().isdigit()]
        for pid in pids:
            if pid != os.getpid():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        return pids

    def down(self) -> None:
        for _ in range(3):  # a dying launcher may fork once more
            if not self.kill():
                break
            time.sleep(0.2)
        for ns in [self.ns(i) for i in range(self.n)] + [self.switch]:
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        shutil.rmtree(self.ssh_dir(), ignore_errors=True)
        (STATE_DIR / f"{self.prefix}.json").unlink(missing_ok=True)
        _LIVE.pop(self.prefix, None)
        self.up_ = False

    def __enter__(self) -> "Hosts":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # the network
    def cut(self, i: int) -> None:
        """Pull host i's cable (its switch port goes down; the host sees no carrier)."""
        _ip("link", "set", f"h{self.index(i)}", "down", ns=self.switch)

    def mend(self, i: int) -> None:
        _ip("link", "set", f"h{self.index(i)}", "up", ns=self.switch)

    # passwordless ssh, as on a cluster
    def ssh_dir(self) -> Path:
        return STATE_DIR / f"{self.prefix}-ssh"

    def start_ssh(self, timeout: float = 60.0) -> None:
        """An ssh server on port 22 of every host (``sshd`` below; needs asyncssh) and, inside each host, an
        ssh client config (``/etc/netns/<ns>/ssh``, bound over ``/etc/ssh`` by ``ip netns exec``) that logs in
        with a key made for this set and trusts any host key. Commands started on a host afterwards reach
        every host with plain ``ssh node2 CMD``, so pdsh-style launchers run unchanged."""
        d = self.ssh_dir()
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        key = d / "id_ed25519"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.prefix, "-f", str(key)],
                           check=True, capture_output=True)
        config = (f"Host *\n    IdentityFile {key}\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n"
                  "    BatchMode yes\n    LogLevel ERROR\n")
        servers = []
        for i in range(self.n):
            etc = Path("/etc/netns") / self.ns(i) / "ssh"
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "ssh_config").write_text(config)
            log = open(d / f"sshd-{i}.log", "w")
            servers.append(self.popen(i, [sys.executable, str(Path(__file__).resolve()), "sshd", f"{key}.pub"],
                                      stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL))
            log.close()
        deadline = time.monotonic() + timeout
        for i, p in enumerate(servers):
            ready = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]
            line = p.stdout.readline() if ready else b""
            p.stdout.close()
            if line.strip() != b"ready":
                p.kill()
                why = (d / f"sshd-{i}.log").read_text().strip().splitlines()[-1:] or ["no answer"]
                raise RuntimeError(f"the ssh server on {self.hostname(i)} did not start: {why[0]}")

    # commands
    def argv(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run on host i: in its network namespace (with its /etc/hosts) and a UTS namespace
        carrying its hostname; the filesystem, users and PIDs are the machine's."""
        i = self.index(i)
        return ["ip", "netns", "exec", self.ns(i), "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname(i)] + list(argv)

    def popen(self, i: int, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(i, argv), **kw)

    def run(self, i: int, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(i, argv), **kw)


def _cleanup_all() -> None:
    for h in list(_LIVE.values()):
        if h.owner == os.getpid():
            h.down()


_HANDLERS = {"done": False}


def _install_handlers() -> None:
    if _HANDLERS["done"]:
        return
    _HANDLERS["done"] = True
    atexit.register(_cleanup_all)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            prev = signal.getsignal(sig)
        except ValueError:
            continue

        def handler(signum, frame, prev=prev):
            _cleanup_all()
            if callable(prev):
                prev(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread: atexit and the caller's finally still clean up
            pass


def _known_sets() -> list[dict]:
    out = []
    for f in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            f.unlink(missing_ok=True)
    return out


def clean_stale() -> list[str]:
    """Delete sets whose owner process is gone (a killed test run), plus orphaned molmh namespaces."""
    removed = []
    known = set()
    for st in _known_sets():
        known.add(st["prefix"])
        if st["owner"] and not _pid_alive(st["owner"]):
            Hosts(st["n"], st["prefix"], st["owner"], st.get("names")).down()
            removed.append(st["prefix"])
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    for line in names:
        name = line.split(" ")[0]
        if not name.startswith(CLI_PREFIX) or "-" not in name:
            continue
        prefix = name.rsplit("-", 1)[0]
        owner = prefix[len(CLI_PREFIX):].split("x")[0]
        if prefix in known or not owner.isdigit() or _pid_alive(int(owner)):
            continue
        for pid in _ip("netns", "pids", name, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", name, check=False)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        shutil.rmtree(STATE_DIR / f"{prefix}-ssh", ignore_errors=True)
        removed.append(name)
    return removed


def _sshd(authorized_keys: str) -> int:
    """An ssh server on port 22 of the host it runs on (asyncssh): the keys in ``authorized_keys`` log in
    as this user; each command runs under ``/bin/sh -c`` in a login environment (the login PATH, HOME,
    USER, no variables of the caller), as sshd gives it. A session whose client goes away takes its
    command's process group with it (SIGHUP), as with sshd. Prints ``ready`` once listening."""
    import asyncio
    import pwd

    import asyncssh

    pw = pwd.getpwuid(os.getuid())
    login = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": pw.pw_dir,
             "USER": pw.pw_name, "LOGNAME": pw.pw_name, "SHELL": "/bin/sh"}

    async def session(process) -> None:
        child = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", process.command or "exec /bin/sh", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=login, cwd=pw.pw_dir, start_new_session=True)
        await process.redirect(stdin=child.stdin, stdout=child.stdout, stderr=child.stderr)
        exited = asyncio.ensure_future(child.wait())
        gone = asyncio.ensure_future(process.channel.wait_closed())
        await asyncio.wait({exited, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not exited.done():
            try:
                os.killpg(child.pid, signal.SIGHUP)
            except ProcessLookupError:
                pass
            return
        await process.stdout.drain()
        await process.stderr.drain()
        rc = exited.result()
        process.exit(rc if rc >= 0 else 128 - rc)

    async def serve() -> None:
        key = asyncssh.generate_private_key("ssh-ed25519")
        await asyncssh.create_server(asyncssh.SSHServer, "", 22, server_host_keys=[key],
                                     authorized_client_keys=authorized_keys, process_factory=session,
                                     encoding=None)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())
    return 0


def _cli_set() -> Hosts:
    for st in _known_sets():
        if st["prefix"] == CLI_PREFIX:
            return Hosts(st["n"], st["prefix"], st["owner"], st.get("names"))
    print("error: no hosts are up; run `python scripts/hosts.py up 2` first", file=sys.stderr)
    sys.exit(2)


def _find(host: str) -> tuple[Hosts, int]:
    """A host of any live set by hostname or address (so a test's set works as an rsh target), or of
    the CLI's set by index."""
    sets = [Hosts(st["n"], st["prefix"], st["owner"], st.get("names")) for st in _known_sets()]
    # the set the caller runs in comes first (mpirun on host 0 of a set asks for host 1 of the same set),
    # so sets that reuse names (node1, node2 in every test) never mix
    here = subprocess.run(["ip", "netns", "identify", str(os.getpid())], capture_output=True, text=True).stdout.strip()
    for h in sorted(sets, key=lambda h: (not here.startswith(h.prefix + "-"), h.prefix != CLI_PREFIX)):
        for i in range(h.n):
            if host in (h.hostname(i), h.ns(i)) or (h.prefix == CLI_PREFIX and host in (str(i), h.addr(i))):
                return h, i
    print(f"error: no host {host!r} is up; `python scripts/hosts.py list` shows the hosts", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sshd"] and len(argv) == 2:  # internal: one host's server, started by Hosts.start_ssh
        return _sshd(argv[1])

    p = argparse.ArgumentParser(prog="scripts/hosts.py", description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("up", help="create N hosts")
    s.add_argument("n", type=int)
    s.add_argument("--names", help="comma-separated host names (default molmh-0, molmh-1, ...)")
    for name, hlp in (("run", "run a command on a host"), ("rsh", "rsh/ssh agent: HOST CMD...")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("host")
        s.add_argument("command", nargs=argparse.REMAINDER)
    for name in ("cut", "mend"):
        sub.add_parser(name, help=f"{name} a host's link").add_argument("host")
    sub.add_parser("ssh", help="start an ssh server on every host (passwordless ssh between them; asyncssh)")
    sub.add_parser("down", help="kill everything on the hosts and delete them")
    sub.add_parser("list", help="print the hosts")
    sub.add_parser("clean", help="delete sets left behind by dead test runs")
    a = p.parse_args(argv)

    if a.cmd == "up":
        why = unavailable()
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
        if any(st["prefix"] == CLI_PREFIX for st in _known_sets()):
            print("error: hosts are already up; run `python scripts/hosts.py down` first", file=sys.stderr)
            return 2
        h = Hosts(a.n, CLI_PREFIX, owner=0, names=a.names.split(",") if a.names else None).up()
        _LIVE.pop(h.prefix, None)  # the CLI's set outlives this process
        a.cmd = "list"
    if a.cmd == "clean":
        for name in clean_stale():
            print(f"removed {name}")
        return 0
    if a.cmd in ("run", "rsh"):
        h = None
    else:
        h = _cli_set()
    if a.cmd == "list":
        for i in range(h.n):
            print(f"{i} {h.hostname(i)} {h.addr(i)} netns={h.ns(i)}")
        return 0
    if a.cmd == "down":
        h.down()
        return 0
    if a.cmd in ("cut", "mend"):
        getattr(h, a.cmd)(a.host)
        return 0
    if a.cmd == "ssh":
        if importlib.util.find_spec("asyncssh") is None or not shutil.which("ssh-keygen"):
            print("error: the ssh servers need asyncssh and OpenSSH's client: `pip install asyncssh` and an "
                  "installed `ssh`", file=sys.stderr)
            return 2
        h.start_ssh()
        print(f"ssh servers up: `python scripts/hosts.py run {h.hostname(0)} ssh {h.hostname(h.n - 1)} hostname`")
        return 0
    cmd = a.command
    if a.cmd == "rsh":
        # ssh-style agents get the remote command as words to be joined and run by a shell
        cmd = ["sh", "-c", " ".join(cmd)]
    if not cmd:
        print("error: no command given; e.g. `python scripts/hosts.py run 0 hostname -I`", file=sys.stderr)
        return 2
    h, i = _find(a.host)
    os.execvp("ip", h.argv(i, cmd))


if __name__ == "__main__":
    sys.exit(main())
