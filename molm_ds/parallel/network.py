"""Which network interface this rank talks through (see ``molm_ds.train.distributed`` for why).

    set_socket_ifname()     # GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME for MASTER_ADDR, unless already set
    interface_for("10.0.0.1", multi_host=True) -> "eth0"

Linux only for the interface table (``SIOCGIFADDR``); IPv4.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

from molm_ds.errors import UserError

__all__ = ["NetworkError", "IFNAME_VARS", "interfaces", "interface_for", "set_socket_ifname", "outward_address",
           "outward_interface", "multi_host"]

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class NetworkError(UserError, RuntimeError):
    """This rank cannot tell how to reach the others; the message names the variable to set.
    Each rank decides for itself, so each prints its own line."""

    every_rank = True


def interfaces() -> dict[str, str]:
    """This host's IPv4 address per interface (interfaces without one are left out)."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                out[name] = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])  # SIOCGIFADDR
            except OSError:
                continue
    return out


def _resolve(host: str) -> str:
    return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]


def _route_source(addr: str) -> str:
    """The local address the kernel would send from to reach ``addr`` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        return s.getsockname()[0]


def _is_loopback(addr: str) -> bool:
    return ipaddress.ip_address(addr).is_loopback


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def _ifname_error(master: str, why: str) -> NetworkError:
    return NetworkError(f"cannot tell which network interface of {socket.gethostname()} reaches MASTER_ADDR={master} "
                        f"({why}); set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on GPUs) to the interface "
                        f"that the hosts share, e.g. GLOO_SOCKET_IFNAME=eth0")


def interface_for(master: str, *, multi_host: bool) -> str:
    """The interface this host reaches ``master`` through. ``master`` resolving to this host itself
    (loopback, or one of its own addresses) in a job that spans hosts: the interface other hosts can
    reach, i.e. the only one with a non-loopback address, else the default route's."""
    try:
        addr = _resolve(master)
    except OSError as e:
        raise _ifname_error(master, f"the name does not resolve: {e.strerror or e}") from None
    ifs = interfaces()
    try:
        src = _route_source(addr)
    except OSError as e:
        raise _ifname_error(master, f"no route to {addr}: {e.strerror or e}") from None
    name = next((n for n, a in ifs.items() if a == src), None)
    if name is None and _is_loopback(src):  # 127.0.1.1 and the like: the loopback interface, under another address
        name = next((n for n, a in ifs.items() if _is_loopback(a)), None)
    if name is None:
        raise _ifname_error(master, f"no interface holds the route's source address {src}")
    literal_loopback = master == "localhost" or _is_ip(master) and _is_loopback(master)
    if not (multi_host and _is_loopback(src)) or literal_loopback:  # 127.0.0.1 given: one host, whatever the launcher says
        return name
    return outward_interface(ifs, why=f"MASTER_ADDR={master} resolves to this host ({addr}) and the job spans hosts")


def outward_interface(ifs: dict[str, str] | None = None, *, why: str = "the job spans hosts") -> str:
    """The interface other hosts reach this one through: the only one with a non-loopback address,
    else the one the default route leaves through."""
    ifs = interfaces() if ifs is None else ifs
    outward = sorted(n for n, a in ifs.items() if not _is_loopback(a))
    if len(outward) == 1:
        return outward[0]
    try:  # several: the default route's (a documentation address: a UDP connect sends nothing)
        dflt = _route_source("192.0.2.1")
        name = next((n for n, a in ifs.items() if a == dflt and not _is_loopback(a)), None)
    except OSError:
        name = None
    if name is None:
        raise NetworkError(f"cannot tell which network interface of {socket.gethostname()} the other hosts reach ({why}, "
                           f"and this host has {len(outward)} outward interfaces: {', '.join(outward) or 'none'}, "
                           f"without a default route among them); set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on "
                           f"GPUs) to the interface that the hosts share, e.g. GLOO_SOCKET_IFNAME=eth0")
    return name


def multi_host() -> bool:
    """Whether the launcher says the job spans hosts (local process count below the world size)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").isdigit():
            return int(env[key]) < world
    for key in ("CROSS_SIZE", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "GROUP_WORLD_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key]) > 1
    return False


def set_socket_ifname() -> Optional[str]:
    """Export GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME for MASTER_ADDR unless set; returns the interface."""
    if all(os.environ.get(v) for v in IFNAME_VARS):
        return os.environ["GLOO_SOCKET_IFNAME"]
    explicit = next((os.environ[v] for v in IFNAME_VARS if os.environ.get(v)), None)
    name = explicit or interface_for(os.environ["MASTER_ADDR"], multi_host=multi_host())
    for v in IFNAME_VARS:
        os.environ.setdefault(v, name)
    return name


def outward_address() -> str:
    """An address of this host that other hosts can reach (MASTER_ADDR under mpirun across hosts):
    GLOO_SOCKET_IFNAME's when set, else the host name's unless that is loopback, else the outward
    interface's."""
    ifs = interfaces()
    name = os.environ.get("GLOO_SOCKET_IFNAME")
    if name:
        if name not in ifs:
            raise NetworkError(f"GLOO_SOCKET_IFNAME={name} has no IPv4 address on {socket.gethostname()} "
                               f"(interfaces: {', '.join(sorted(ifs))}); set it to one of them")
        return ifs[name]
    try:
        addr = _resolve(socket.gethostname())
        if not _is_loopback(addr):
            return addr
    except OSError:
        pass
    return ifs[outward_interface(ifs, why="the host name resolves to loopback")]
