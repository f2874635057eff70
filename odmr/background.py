"""Threads that work beside the sessions (queue scans, the reaper, the start-up clean-up)."""
from __future__ import annotations

import os
import threading


def lower_this_thread() -> None:
    """Give the calling thread the lowest CPU priority, so sessions and deliveries go first
    (Linux: a thread has its own nice value; elsewhere nothing changes)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
