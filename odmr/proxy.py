"""PROXY protocol v1/v2 (HAProxy) headers: the real client behind a load balancer.

Only read from addresses listed in `[odmr] proxy_trusted`; the header is read
byte-exactly from the raw socket, before TLS, so no client data is consumed.
"""
from __future__ import annotations

import ipaddress
import re
import select
import socket
import struct
import time
from typing import Iterable, Optional, Tuple

_ADDRESS_TEXT = re.compile(r"^[0-9A-Fa-f:.]{2,45}$")
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107


class ProxyError(Exception):
    """A missing, malformed or untrusted PROXY header; the connection is dropped."""


def trusted(address: str, networks: Iterable[str]) -> bool:
    """Whether `address` is in one of the configured addresses or networks."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    for item in networks:
        try:
            if ip in ipaddress.ip_network(item.strip(), strict=False):
                return True
        except ValueError:
            continue
    return False


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ProxyError("connection closed inside the PROXY header")
        data += chunk
    return data


def _peek_prefix(sock: socket.socket, deadline: float) -> bytes:
    """Peek until 16 bytes are there, a line ended, or the data can no longer be a header."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProxyError("timeout waiting for the PROXY header")
        sock.settimeout(remaining)
        start = sock.recv(16, socket.MSG_PEEK)
        if not start:
            raise ProxyError("connection closed before the PROXY header")
        could_be = V2_SIGNATURE.startswith(start[:12]) or b"PROXY ".startswith(start[:6])
        if len(start) >= 16 or not could_be or (start.startswith(b"PROXY ") and b"\n" in start):
            return start
        select.select([sock], [], [], min(0.05, remaining))


def read_header(sock: socket.socket, timeout: float = 10.0) -> Optional[Tuple[str, int]]:
    """Consume the header; return the client's (address, port), or None for LOCAL/UNKNOWN."""
    deadline = time.monotonic() + timeout
    try:
        start = _peek_prefix(sock, deadline)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        if start.startswith(V2_SIGNATURE):
            return _read_v2(sock)
        if start.startswith(b"PROXY "):
            return _read_v1(sock)
    except socket.timeout:
        raise ProxyError("timeout waiting for the PROXY header") from None
    except OSError as exc:
        raise ProxyError("reading the PROXY header: %s" % exc) from None
    raise ProxyError("connection does not start with a PROXY header")


def _read_v1(sock: socket.socket) -> Optional[Tuple[str, int]]:
    line = b""
    while not line.endswith(b"\r\n"):
        if len(line) >= V1_MAX:
            raise ProxyError("PROXY v1 header too long")
        line += _recv_exactly(sock, 1)
    parts = line[:-2].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyError("malformed PROXY v1 header")
    if not all(_ADDRESS_TEXT.match(text) for text in parts[2:4]) \
            or not all(text.isascii() and text.isdigit() and len(text) <= 5 for text in parts[4:6]):
        raise ProxyError("malformed PROXY v1 addresses")     # no zone id, nothing but an address
    try:
        address = ipaddress.ip_address(parts[2])
        port = int(parts[4])
    except ValueError:
        raise ProxyError("malformed PROXY v1 addresses") from None
    if (address.version == 4) != (parts[1] == "TCP4") or not 0 <= port <= 65535:
        raise ProxyError("malformed PROXY v1 addresses")
    return _plain(address), port


def _plain(address) -> str:
    """The client as one address for logs, limits and Received: (::ffff:a.b.c.d is a.b.c.d)."""
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _read_v2(sock: socket.socket) -> Optional[Tuple[str, int]]:
    head = _recv_exactly(sock, 16)
    if head[:12] != V2_SIGNATURE:
        raise ProxyError("bad PROXY v2 signature")
    version_command, family, length = head[12], head[13], struct.unpack("!H", head[14:16])[0]
    if version_command >> 4 != 2:
        raise ProxyError("unsupported PROXY version")
    if length > 4096:
        raise ProxyError("PROXY v2 header too long")
    body = _recv_exactly(sock, length)
    command = version_command & 0x0F
    if command == 0:                      # LOCAL: the proxy's own health check
        return None
    if command != 1:
        raise ProxyError("unknown PROXY v2 command")
    if family >> 4 == 1 and len(body) >= 12:
        return socket.inet_ntop(socket.AF_INET, body[0:4]), struct.unpack("!H", body[8:10])[0]
    if family >> 4 == 2 and len(body) >= 36:
        return _plain(ipaddress.IPv6Address(body[0:16])), struct.unpack("!H", body[32:34])[0]
    if family >> 4 == 0:
        return None
    raise ProxyError("unsupported PROXY v2 address family")
