"""The shape of the queue, like Postfix's qshape: per domain, how much waits and how old.

Cheap by design: directory listings and one lstat per message file (its size
and mtime), no message is opened or parsed, so it can run every minute on a
spool of a million messages. `queue summary` prints it; the service keeps a copy
(a `Backlog` in its metrics, rescanned by a `QueueWatch` thread and nudged by
intake and delivery as they go) for `status` and `/metrics`, which never scan
on the request path. Nothing under the spool root is followed through a link.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from odmr.spool import Spool

log = logging.getLogger("odmrd.queue")

# (upper bound in seconds, label); the last bucket has no bound (SPEC §2)
BUCKETS: Tuple[Tuple[Optional[int], str], ...] = tuple(
    [(5 * 60, "0-5m")]
    + [(lo * 2 * 60, "%d-%dm" % (lo, lo * 2)) for lo in (5, 10, 20, 40, 80, 160, 320, 640)]
    + [(None, "older")])

RESCAN_EVERY = 30.0         # seconds between the watch's scans (at least 10x a scan's cost)


@dataclass
class QueueRow:
    """One queue's shape: `oldest` is the oldest message file's mtime (0: none)."""
    domain: str
    messages: int = 0
    bytes: int = 0
    oldest: float = 0.0
    ages: List[float] = field(default_factory=list, repr=False)

    def buckets(self, now: float) -> Dict[str, int]:
        counts = {label: 0 for _, label in BUCKETS}
        for mtime in self.ages:
            counts[bucket_of(now - mtime)] += 1
        return counts

    def as_json(self, now: float) -> Dict[str, object]:
        """The `queue summary --json` object (SPEC §2)."""
        return {"domain": self.domain, "messages": self.messages, "bytes": self.bytes,
                "oldest": age(self.oldest, now), "buckets": self.buckets(now)}


def bucket_of(seconds: float) -> str:
    for bound, label in BUCKETS:
        if bound is None or seconds < bound:
            return label
    return BUCKETS[-1][1]


def age(mtime: float, now: float) -> int:
    return int(max(0.0, now - mtime)) if mtime else 0


def scan_queue(name: str, stats: Iterable[os.stat_result], keep_ages: bool = True) -> QueueRow:
    """One queue's row from the lstat of its message files."""
    row = QueueRow(name)
    for st in stats:
        row.messages += 1
        row.bytes += st.st_size
        if keep_ages:
            row.ages.append(st.st_mtime)
        if not row.oldest or st.st_mtime < row.oldest:
            row.oldest = st.st_mtime
    return row


def summary(spool_root: str, keep_ages: bool = True, strict: bool = False) -> List[QueueRow]:
    """Every non-empty queue's row, most messages first (then by name); `strict`: a queue
    directory that cannot be read raises OSError instead of being left out."""
    shape = Spool(spool_root).shape(strict)
    rows = [scan_queue(name, stats, keep_ages) for name, stats in shape]
    rows = [r for r in rows if r.messages]
    rows.sort(key=lambda r: (-r.messages, r.domain))
    return rows


def total(rows: List[QueueRow]) -> QueueRow:
    """All rows added up (the TOTAL line)."""
    whole = QueueRow("TOTAL")
    for row in rows:
        whole.messages += row.messages
        whole.bytes += row.bytes
        whole.ages.extend(row.ages)
        if row.oldest and (not whole.oldest or row.oldest < whole.oldest):
            whole.oldest = row.oldest
    return whole


def format_table(rows: List[QueueRow], now: float) -> List[str]:
    """The text of `queue summary`: a TOTAL line, then one line per queue."""
    if not rows:
        return ["Mail queue is empty"]
    labels = [label for _, label in BUCKETS]
    widths = [max(6, len(label)) for label in labels]
    head = "%-30s %8s %12s %8s " % ("DOMAIN", "MESSAGES", "BYTES", "OLDEST")
    lines = [head + " ".join("%*s" % (w, l) for w, l in zip(widths, labels))]
    for row in [total(rows)] + rows:
        counts = row.buckets(now)
        lines.append("%-30s %8d %12d %8s " % (row.domain, row.messages, row.bytes,
                                             short_age(age(row.oldest, now)))
                     + " ".join("%*d" % (w, counts[l]) for w, l in zip(widths, labels)))
    return lines


def short_age(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


# -- the daemon's cached copy ---------------------------------------------------------
class Backlog:
    """Per queue [messages, bytes, oldest mtime], as of the last scan plus what intake and
    delivery reported since: what `status` and `/metrics` show without touching the disk.
    Another process's changes (`queue delete`, another node's drain) show after a rescan."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queues: Dict[str, List[float]] = {}
        self._touched: Optional[set] = None     # queues changed since the scan began

    def begin_scan(self) -> None:
        with self._lock:
            self._touched = set()

    def replace(self, rows: List[QueueRow]) -> None:
        """The scan's figures, except for a queue that changed while it ran: a listing
        taken before a delivery's removal must not bring the message back."""
        with self._lock:
            fresh = {r.domain: [r.messages, r.bytes, r.oldest] for r in rows}
            for queue in self._touched or ():
                if queue in self._queues:
                    fresh[queue] = self._queues[queue]
            self._queues = fresh
            self._touched = None

    def _touch(self, queue: str) -> None:
        if self._touched is not None:
            self._touched.add(queue)

    def added(self, queue: str, size: int, count: int = 1) -> None:
        with self._lock:
            self._touch(queue)
            entry = self._queues.setdefault(queue, [0, 0, 0.0])
            entry[0] += count
            entry[1] += size
            if not entry[2]:
                entry[2] = time.time()

    def removed(self, queue: str, size: int) -> None:
        with self._lock:
            self._touch(queue)
            entry = self._queues.get(queue)
            if entry is None:
                return
            entry[0] -= 1
            entry[1] = max(0, entry[1] - size)
            if entry[0] <= 0:
                del self._queues[queue]

    def snapshot(self) -> Dict[str, Tuple[int, int, float]]:
        """queue -> (messages, bytes, oldest mtime) of every non-empty queue."""
        with self._lock:
            return {q: (int(e[0]), int(e[1]), e[2]) for q, e in self._queues.items() if e[0] > 0}


class QueueWatch:
    """A low-priority thread that rescans the queue's shape into a service's backlog."""

    def __init__(self, spool_root: str, backlog: Backlog, every: float = RESCAN_EVERY):
        self.spool_root = spool_root
        self.backlog = backlog
        self.every = every
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="queue-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:   # Linux: a thread has its own nice value; sessions go first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.backlog.begin_scan()
                self.backlog.replace(summary(self.spool_root, keep_ages=False))
            except OSError as exc:
                log.warning("queue: cannot scan the spool for its shape: %s", str(exc))
            spent = time.monotonic() - started
            self._stop.wait(max(self.every, 10 * spent))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
