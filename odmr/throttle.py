"""Failed AUTHs per client, across sessions (`[odmr] auth_throttle_*`).

Kept by the service across reloads (a reload must not forgive a guesser) and
asked at connect and at every AUTH. An IPv6 client is counted by its /64: every
home line gets one, so counting single addresses would let a guesser rotate
through 2**64 of them.
"""
from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque
from typing import Deque, Dict


def client_key(address: str) -> str:
    """What one client is counted as: an IPv6 address's /64 (the least a home line gets),
    an IPv4 address itself, also when it arrives IPv4-mapped (`::ffff:a.b.c.d`)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthThrottle:
    """Failed AUTHs per client (see `client_key`) across sessions, within a sliding window."""

    def __init__(self):
        self._lock = threading.Lock()
        self._failures: Dict[str, Deque[float]] = {}

    def record(self, address: str) -> None:
        key = client_key(address)
        with self._lock:
            self._failures.setdefault(key, deque(maxlen=1000)).append(time.monotonic())
            if len(self._failures) > 100000:          # bound memory under a spray of addresses
                self._failures.pop(next(iter(self._failures)))

    def blocked(self, address: str, limit: int, window: float) -> bool:
        if limit <= 0 or window <= 0:
            return False
        key = client_key(address)
        now = time.monotonic()
        with self._lock:
            times = self._failures.get(key)
            if not times:
                return False
            while times and now - times[0] > window:
                times.popleft()
            if not times:
                del self._failures[key]
                return False
            return len(times) >= limit
