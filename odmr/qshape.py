"""The shape of the queue, like Postfix's qshape: per domain, how much waits and how old.

Cheap by design: directory listings and one lstat per message file (its size
and mtime), no message is opened or parsed, so it can run every minute on a
spool of a million messages. `queue summary` prints it; the service keeps a copy
(a `Backlog` in its metrics, rescanned by a `QueueWatch` thread and nudged by
intake and delivery as they go) for `status` and `/metrics`, which never scan
on the request path. Nothing under the spool root is followed through a link.
"""
from __future__ import annotations

import bisect
import errno
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from odmr.background import lower_this_thread
from odmr.spool import QueueFiles, Spool

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
    counted: Optional[Dict[str, int]] = field(default=None, repr=False)    # buckets added up (TOTAL)

    def buckets(self, now: float) -> Dict[str, int]:
        """Messages per age bucket: the mtimes sorted once, each bucket's edge found by
        bisection (a million messages in well under a second, not one call each)."""
        if self.counted is not None:
            return dict(self.counted)
        mtimes = sorted(self.ages)
        counts = {}
        younger = 0             # messages in the buckets so far
        for bound, label in BUCKETS:
            if bound is None:
                inside = len(mtimes)
            else:               # age < bound  <=>  mtime > now - bound
                inside = len(mtimes) - bisect.bisect_right(mtimes, now - bound)
            counts[label] = inside - younger
            younger = inside
        return counts

    def as_json(self, now: float) -> Dict[str, object]:
        """The `queue summary --json` object (SPEC §2)."""
        return {"domain": self.domain, "messages": self.messages, "bytes": self.bytes,
                "oldest": age(self.oldest, now), "buckets": self.buckets(now)}


def age(mtime: float, now: float) -> int:
    return int(max(0.0, now - mtime)) if mtime else 0


def scan_queue(name: str, files: QueueFiles) -> QueueRow:
    """One queue's row from what its message files hold."""
    return QueueRow(name, files.messages, files.bytes, files.oldest, files.mtimes)


def summary(spool_root: str, keep_ages: bool = True, strict: bool = False, processes: int = 1,
            now: Optional[float] = None) -> List[QueueRow]:
    """Every non-empty queue's row, most messages first (then by name); `strict`: a queue
    directory that cannot be read raises OSError instead of being left out. `processes`
    over 1 shares the queues out among that many forked processes, each row's buckets
    then counted there as of `now` (never from a threaded daemon: fork copies one thread)."""
    spool = Spool(spool_root)
    queues = spool.queues()
    if processes > 1 and len(queues) >= PARALLEL_FROM:
        rows = _in_processes(spool_root, queues, keep_ages, strict, processes,
                             time.time() if now is None else now)
    else:
        rows = _rows(spool, queues, keep_ages, strict)
    rows = [r for r in rows if r.messages]
    rows.sort(key=lambda r: (-r.messages, r.domain))
    return rows


PARALLEL_FROM = 200         # queues: fewer are listed faster than processes start


def _rows(spool: Spool, queues: Iterable[str], keep_ages: bool, strict: bool) -> List[QueueRow]:
    return [scan_queue(name, files) for name, files in spool.shape(strict, queues, keep_ages)]


def _in_processes(spool_root: str, queues: List[str], keep_ages: bool, strict: bool,
                  processes: int, now: float) -> List[QueueRow]:
    """A million lstat calls take two seconds on one core; each core takes its share.
    Plain fork and a pipe, no multiprocessing: nothing is imported after a command has
    dropped its privileges. What comes back is small: a row per queue, its buckets
    counted, not its ages. The first share's OSError (strict) is raised here. Interrupted
    (KeyboardInterrupt, any exception), it ends and reaps the processes still listing."""
    shares: List[_Share] = []
    try:
        for n in range(processes):
            shares.append(_Share(spool_root, queues[n::processes], keep_ages, strict, now))
        answers = [share.answer() for share in shares]
    except BaseException:
        for share in shares:
            share.end()
        raise
    failures = [OSError(*a["error"]) for a in answers if "error" in a]
    if failures:
        raise failures[0]
    return [QueueRow(**fields) for a in answers for fields in a["rows"]]


class _Share:
    """A forked process listing some of the queues, and the pipe its rows come back on."""

    def __init__(self, spool_root: str, queues: List[str], keep_ages: bool, strict: bool,
                 now: float):
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read_fd)
            _list_share(write_fd, spool_root, _while_parent_lives(queues, parent), keep_ages,
                        strict, now)            # never returns
        os.close(write_fd)
        self.fd: Optional[int] = read_fd
        self.root = spool_root

    def answer(self) -> Dict[str, list]:
        """The child's rows (or error), once it has written them all and is reaped."""
        chunks = []
        while True:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        self.end()
        try:
            return json.loads(b"".join(chunks))
        except ValueError:          # nothing, or cut short: killed (OOM, a signal of its own)
            return {"error": [errno.EIO, "a listing process died", self.root]}

    def end(self) -> None:
        """Close the pipe and reap the child, killing it if it is still listing."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.pid:
            try:
                if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
            except OSError:
                pass                # reaped already
            self.pid = 0


def _while_parent_lives(queues: List[str], parent: int) -> Iterator[str]:
    """The queues, until the command is gone: one ended by a signal it does not catch
    (SIGTERM, SIGKILL) must not leave its listings running on a large spool."""
    for queue in queues:
        if os.getppid() != parent:
            os._exit(1)
        yield queue


def _list_share(write_fd: int, spool_root: str, queues: Iterable[str], keep_ages: bool, strict: bool,
                now: float) -> None:
    """In the child: list `queues`, write their rows (or the OSError) as JSON, exit."""
    code = 1
    try:
        try:
            answer: Dict[str, object] = {"rows": [
                {"domain": r.domain, "messages": r.messages, "bytes": r.bytes, "oldest": r.oldest,
                 "counted": r.buckets(now) if keep_ages else None}
                for r in _rows(Spool(spool_root), queues, keep_ages, strict) if r.messages]}
        except OSError as exc:
            answer = {"error": [exc.errno, exc.strerror, exc.filename]}
        with os.fdopen(write_fd, "w") as pipe:
            json.dump(answer, pipe)
        code = 0
    finally:
        os._exit(code)


def total(rows: List[QueueRow], now: float) -> QueueRow:
    """All rows added up (the TOTAL line), their buckets as of `now`."""
    whole = QueueRow("TOTAL", counted={label: 0 for _, label in BUCKETS})
    for row in rows:
        whole.messages += row.messages
        whole.bytes += row.bytes
        for label, count in row.buckets(now).items():
            whole.counted[label] += count
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
    for row in [total(rows, now)] + rows:
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
        lower_this_thread()
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
