"""Failed AUTHs per client address, across sessions (`[odmr] auth_throttle_*`).

Kept by the service across reloads (a reload must not forgive a guesser) and
asked at connect and at every AUTH.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Deque, Dict


class AuthThrottle:
    """Failed AUTHs per client address across sessions, within a sliding window."""

    def __init__(self):
        self._lock = threading.Lock()
        self._failures: Dict[str, Deque[float]] = {}

    def record(self, address: str) -> None:
        with self._lock:
            self._failures.setdefault(address, deque(maxlen=1000)).append(time.monotonic())
            if len(self._failures) > 100000:          # bound memory under a spray of addresses
                self._failures.pop(next(iter(self._failures)))

    def blocked(self, address: str, limit: int, window: float) -> bool:
        if limit <= 0 or window <= 0:
            return False
        now = time.monotonic()
        with self._lock:
            times = self._failures.get(address)
            if not times:
                return False
            while times and now - times[0] > window:
                times.popleft()
            if not times:
                del self._failures[address]
                return False
            return len(times) >= limit
