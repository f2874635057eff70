"""Who holds a listening port: for `check-config`, before an init script's restart.

A restart stops the running daemon before the new one binds. If another program
(a system MTA on port 25, a metrics agent) holds one of the configured addresses,
the new daemon cannot start and the service is down. A port the running daemon
itself holds is no problem: it lets go of it when it stops. The kernel's socket
tables (/proc/net/tcp, tcp6) and the daemon's open descriptors tell the two apart.
"""
from __future__ import annotations

import errno
import os
import socket
from typing import Optional, Set

LISTEN = "0A"       # TCP_LISTEN in /proc/net/tcp's "st" column


def in_use(host: str, port: int) -> bool:
    """Would binding this address fail because something listens there already?
    (Bound the way the daemon binds: SO_REUSEADDR, IPv6 sockets IPv6-only.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind((host, port))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    return False


def listening_inodes(port: int) -> Set[int]:
    """Inodes of every socket listening on `port`, any address, IPv4 and IPv6."""
    inodes: Set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def socket_inodes(pid: int) -> Optional[Set[int]]:
    """Inodes of the sockets process `pid` has open; None when we may not look."""
    base = "/proc/%d/fd" % pid
    try:
        names = os.listdir(base)
    except OSError:
        return None
    inodes = set()
    for name in names:
        try:
            target = os.readlink(os.path.join(base, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def held_by_another(host: str, port: int, daemon_pid: Optional[int]) -> bool:
    """The address is taken, and not by the running daemon `daemon_pid` (when we
    cannot see that daemon's descriptors, it gets the benefit of the doubt)."""
    if port == 0 or not in_use(host, port):
        return False
    if daemon_pid is None or daemon_pid <= 0:
        return True
    ours = socket_inodes(daemon_pid)
    if ours is None:
        return False
    return not (listening_inodes(port) & ours)
