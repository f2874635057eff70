"""The flat-file spool: one directory per hosted domain. Knows nothing of SMTP.

Layout (all directories 0700, files 0600):

    <spool_dir>/<domain>/<id>          a message: envelope lines, blank line, RFC 5322 data (CRLF)
    <spool_dir>/<domain>/<id>.state    delivery state (JSON), only once an attempt was made
    <spool_dir>/<domain>/tmp/          files being written; anything here at start-up is debris
    <spool_dir>/<domain>/.lock         flock()ed by whoever is delivering the domain
    <spool_dir>/.quarantine/<domain>/  unreadable messages, moved aside for an operator

Every state change is one create+rename or one unlink, so a crash leaves each
message either fully present or absent; a message acknowledged with 250 was
fsync'd and its directory entry fsync'd first.

Nothing under the root is followed through a symbolic link (the root itself may
be one, made by the administrator): each queue directory and its tmp/ are
opened with O_NOFOLLOW and held open (a few dozen, the oldest closed first),
and every file is opened, renamed and unlinked relative to them. A link
found where the spool keeps a directory or file is logged and left alone.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import random
import secrets
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Protocol, Set, Tuple

from odmr.durable import fsync_dir
from odmr.names import address_is_safe, normalize_domain

log = logging.getLogger("odmrd.spool")

MAGIC = b"ODMR-Spool: 1\n"
FILE_IO_SIZE = 65536         # bytes per read or write of a spool file
OUTBOUND = ".outbound"       # bounces for senders outside the hosted domains, waiting for bounce_relay
QUARANTINE = ".quarantine"   # unusable messages set aside: <root>/.quarantine/<queue>/<id>
_STAT_TTL = 30.0
_MTIME_TICK_NS = 20_000_000  # directory mtimes move in coarse clock ticks (1-10 ms)
_OPEN_QUEUES = 64            # queue directories held open (two descriptors each), the oldest closed first
_LINK_LOG_EVERY = 60.0       # one warning per planted link and minute (the relay polls every 5 s)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK     # a planted FIFO must not hang a reader


def describe_error(exc: OSError) -> str:
    """`PATH: reason`: an operator must see which file or directory is at fault."""
    return "%s: %s" % (exc.filename, exc.strerror) if exc.filename else str(exc.strerror or exc)


def in_directory(exc: OSError, directory: str) -> OSError:
    """A failure to create or remove a file named relative to a directory descriptor
    carries the bare file name: the operator needs the directory whose mode or space
    is at fault."""
    return type(exc)(exc.errno, exc.strerror, directory)


class SpoolError(Exception):
    """A spool operation failed; `temporary` says whether retrying may help."""

    no_space = False

    def __init__(self, message: str, temporary: bool = True, no_space: bool = False):
        super().__init__(message)
        self.temporary = temporary
        self.no_space = no_space        # the disk or a quota is full (452 4.3.1, not 451 4.3.0)


def _full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class CorruptMessage(SpoolError):
    def __init__(self, message: str):
        super().__init__(message, temporary=False)


class UnreadableMessage(SpoolError):
    """A message file that exists but cannot be read (permissions, wrong owner, EIO);
    `errno` says why, so a passing shortage (EMFILE...) is told from a damaged file."""

    def __init__(self, msg_id: str, exc: OSError):
        super().__init__("cannot read %s: %s" % (msg_id, exc.strerror or exc),
                         temporary=exc.errno in _PASSING)
        self.errno = exc.errno

    @property
    def lasting(self) -> bool:
        """Will it fail again? (then the file is set aside, not retried forever)"""
        return self.errno not in _PASSING


_PASSING = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN, errno.ENOBUFS}
_FUTURE_SLACK = 300.0        # an Arrival this far ahead of the clock is impossible (not skew)


class LinkRefused(SpoolError, OSError):
    """A symbolic link where the spool keeps one of its own directories or files.

    An OSError too (ELOOP), so code that handles a failing spool call handles this."""

    def __init__(self, path: str):
        OSError.__init__(self, errno.ELOOP, "symbolic link refused", path)
        self.temporary = True

    def __str__(self) -> str:
        return "spool: %s is a symbolic link; refused" % self.filename


class DomainBusy(Exception):
    """Another session (thread, process or node) is delivering the domain."""


@dataclass(frozen=True)
class Recipient:
    address: str                 # without angle brackets
    notify: str = ""             # DSN NOTIFY=..., as received
    orcpt: str = ""              # DSN ORCPT=..., as received

    def to_line(self) -> bytes:
        extra = ""
        if self.notify:
            extra += " NOTIFY=" + self.notify
        if self.orcpt:
            extra += " ORCPT=" + self.orcpt
        return ("Recipient: <%s>%s\n" % (self.address, extra)).encode("utf-8")


@dataclass
class Envelope:
    sender: str                                  # "" for the null sender <>
    recipients: List[Recipient]
    body: str = ""                               # "", "7BIT" or "8BITMIME"
    smtputf8: bool = False
    ret: str = ""                                # DSN RET=
    envid: str = ""                              # DSN ENVID=
    arrival: float = field(default_factory=time.time)
    client: str = ""

    def header_bytes(self, msg_id: str) -> bytes:
        for address in [self.sender] + [r.address for r in self.recipients]:
            if not address_is_safe(address):
                raise SpoolError("address unfit for the spool: %r" % address[:100], temporary=False)
        parts = [MAGIC,
                 ("Id: %s\n" % msg_id).encode(),
                 ("Arrival: %.6f\n" % self.arrival).encode(),
                 ("Sender: <%s>\n" % self.sender).encode("utf-8")]
        parts += [r.to_line() for r in self.recipients]
        if self.body:
            parts.append(("Body: %s\n" % self.body).encode())
        if self.smtputf8:
            parts.append(b"SMTPUTF8: yes\n")
        if self.ret:
            parts.append(("Ret: %s\n" % self.ret).encode())
        if self.envid:
            parts.append(("Envid: %s\n" % self.envid).encode())
        if self.client:
            parts.append(("Client: %s\n" % self.client).encode("utf-8", "replace"))
        parts.append(b"\n")
        return b"".join(parts)


@dataclass
class State:
    """Per-message delivery progress; survives restarts in `<id>.state`."""
    attempts: int = 0
    last_error: str = ""
    last_attempt: float = 0.0
    done: Dict[str, str] = field(default_factory=dict)       # recipient -> 2xx reply
    failed: Dict[str, str] = field(default_factory=dict)     # recipient -> 5xx reply
    bounced: bool = False                                     # DSN for `failed` already spooled
    warned: bool = False

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, dropped: Optional[List[str]] = None) -> "State":
        """Parse a state file; a field of the wrong type is left at its default (and
        named in `dropped`), so a damaged field never stops delivery or loses the rest."""
        raw = json.loads(data.decode("utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        state = cls()
        for key, default in list(state.__dict__.items()):
            if key not in raw:
                continue
            value = _typed(raw[key], default)
            if value is None:
                if dropped is not None:
                    dropped.append(key)
                continue
            setattr(state, key, value)
        return state


def _typed(value, default):
    """`value` if it has the type of `default` (ints may stand for floats), else None."""
    if isinstance(default, bool):
        return value if isinstance(value, bool) else None
    if isinstance(default, int):
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else None
    if isinstance(default, str):
        return value if isinstance(value, str) else None
    if isinstance(default, dict):
        if not isinstance(value, dict):
            return None
        return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
    return None


@dataclass
class Message:
    """A spooled message as read back: where it is, its envelope and state."""
    domain: str
    id: str
    path: str
    envelope: Envelope
    data_offset: int
    size: int
    state: State
    has_state: bool = False      # a state file exists (retiring removes it too)

    def pending(self) -> List[Recipient]:
        final = set(self.state.done) | set(self.state.failed)
        return [r for r in self.envelope.recipients if r.address not in final]

    def open_data(self) -> BinaryIO:
        fh = os.fdopen(_open_in_queue(self.path), "rb")
        fh.seek(self.data_offset)
        return fh

    def read_data(self) -> bytes:
        with self.open_data() as fh:
            return fh.read()


# Ids need to be unique, not unpredictable: a generator seeded from the OS (and
# reseeded in every forked child) spares intake a getrandom() system call, and with
# it a GIL hand-over, per message.
_id_bits = random.Random()
os.register_at_fork(after_in_child=_id_bits.seed)


def new_id() -> str:
    """Sortable by arrival: microseconds in hex, then randomness."""
    return "%013x%08x" % (time.time_ns() // 1000, _id_bits.getrandbits(32))


_ID_DIGITS = "0123456789abcdef"


def _valid_id(name: str) -> bool:
    # strip() works in C: a name of those digits only leaves nothing (a million names
    # in 0.1 s; a generator over the characters took 1.5 s of `queue summary`)
    return 13 < len(name) <= 40 and not name.strip(_ID_DIGITS)


def _read_exactly(fd: int, size: int) -> bytes:
    data = os.read(fd, size)
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            break
        data += more
    return data


# -- never through a symbolic link ----------------------------------------------
_link_logged: Dict[str, float] = {}
_link_guard = threading.Lock()


def _refuse_link(path: str) -> LinkRefused:
    """Log (at most once a minute per path) a link found where the spool keeps its own
    directory or file; the caller leaves it alone and raises or skips."""
    if _first_in_a_while(path):
        log.warning("spool: %s is a symbolic link; refused, not followed and left in place", path)
    return LinkRefused(path)


def _first_in_a_while(path: str) -> bool:
    """True at most once a minute per path: the relay polls every few seconds, and one
    warning a minute about the same thing is enough."""
    now = time.monotonic()
    with _link_guard:
        last = _link_logged.get(path)
        if last is not None and now - last < _LINK_LOG_EVERY:
            return False
        if len(_link_logged) > 1000:
            _link_logged.clear()
        _link_logged[path] = now
    return True


def _stray_directory(path: str) -> None:
    """A directory in the root whose name is no domain as odmrd spells it (an IDNA 2003
    spool, a U-label, upper case, a typo): nothing in it is ever delivered, so say so."""
    if _first_in_a_while(path):
        log.warning("spool: %s is not named like a domain's spool directory (the lower-case "
                    "A-label, IDNA 2008); nothing in it is delivered or listed: pass its "
                    "messages to odmrd enqueue, or remove it", path)


def _is_link(name: str, dir_fd: Optional[int]) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_nofollow(name: str, dir_fd: Optional[int], shown: str, flags: int, mode: int = 0o600) -> int:
    """os.open that refuses (LinkRefused, logged) a link as the last component."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    except OSError as exc:
        # Linux says ELOOP (ENOTDIR with O_DIRECTORY), FreeBSD EMLINK
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK) and _is_link(name, dir_fd):
            raise _refuse_link(shown) from None
        raise OSError(exc.errno, exc.strerror, _at_fault(shown, exc)) from None


def _open_dir(name: str, dir_fd: Optional[int], shown: str, create: bool = False) -> Tuple[int, bool]:
    """A spool directory opened without following a link in its place (made 0700 if asked);
    returns the descriptor and whether it was created."""
    created = False
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            # making it needs write access to the directory above: that is the one at fault
            raise OSError(exc.errno, exc.strerror, _at_fault(shown, exc, os.W_OK | os.X_OK)) from None
    return _open_nofollow(name, dir_fd, shown, _DIR_FLAGS), created


def _at_fault(path: str, exc: OSError, need: int = os.X_OK) -> str:
    """The path an operator must fix: `path`, or the directory above it when that is
    what refused us (a spool root the account cannot search, or write in to make `path`)."""
    parent = os.path.dirname(path)
    if exc.errno in (errno.EACCES, errno.EPERM) and parent and not os.access(parent, need):
        return parent
    return path


def _open_in_queue(path: str) -> int:
    """Open <root>/<queue>/<name> for reading with neither the queue directory nor the
    file followed through a link (the root is the administrator's and may be one)."""
    directory = os.path.dirname(path)
    dir_fd, _ = _open_dir(directory, None, directory)
    try:
        return _open_nofollow(os.path.basename(path), dir_fd, path, _READ_FLAGS)
    finally:
        os.close(dir_fd)


def _scan(dir_fd: int) -> Iterator["os.DirEntry[str]"]:
    """The entries of an open directory, read through a descriptor of its own: a shared
    descriptor shares its read position with every other thread listing it."""
    fd = os.open(".", _DIR_FLAGS, dir_fd=dir_fd)
    try:
        with os.scandir(fd) as entries:
            yield from entries
    finally:
        os.close(fd)


class _QueueDir:
    """A queue directory and its tmp/, opened without following links; every file of
    the queue is reached relative to these descriptors. They are closed when the last
    user lets go (so one thread's descriptor is never closed under another's feet)."""

    __slots__ = ("path", "fd", "tmp_fd", "key", "tmp_key", "tmp_error")

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd
        self.tmp_fd: Optional[int] = None       # None: tmp/ missing, or a link (refused)
        self.tmp_key: Optional[Tuple[int, int]] = None
        self.tmp_error: Optional[OSError] = None   # why tmp/ is not held, when it is there
        st = os.fstat(fd)
        self.key = (st.st_dev, st.st_ino)

    def hold_tmp(self, fd: int) -> None:
        self.tmp_fd = fd
        st = os.fstat(fd)
        self.tmp_key = (st.st_dev, st.st_ino)

    def __del__(self):
        for fd in (self.fd, self.tmp_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def show(self, *names: str) -> str:
        return os.path.join(self.path, *names)

    def scan(self) -> Iterator["os.DirEntry[str]"]:
        return _scan(self.fd)

    def still_there(self) -> bool:
        """Are the directories at `path` and `path`/tmp (not links, not new ones) those held open?"""
        try:
            st = os.stat(self.path, follow_symlinks=False)
            if not (stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == self.key):
                return False
            if self.tmp_fd is None:
                return True
            st = os.stat("tmp", dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == self.tmp_key


class _GroupSync:
    """Directory fsync shared between threads: one fsync covers every rename before it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._requested: Dict[tuple, int] = {}
        self._completed: Dict[tuple, int] = {}
        self._running: Dict[tuple, bool] = {}

    def sync(self, directory: _QueueDir) -> None:
        key = directory.key
        with self._cond:
            mine = self._requested.get(key, 0) + 1
            self._requested[key] = mine
            while self._completed.get(key, 0) < mine:
                if self._running.get(key):
                    self._cond.wait()
                    continue
                self._running[key] = True
                target = self._requested[key]
                self._cond.release()
                try:
                    os.fsync(directory.fd)
                finally:
                    self._cond.acquire()
                    self._running[key] = False
                    self._cond.notify_all()
                self._completed[key] = max(self._completed.get(key, 0), target)


def parse_header(data: bytes) -> Tuple[Envelope, str]:
    """Parse the envelope block (everything before the first empty line)."""
    if not data.startswith(MAGIC):
        raise CorruptMessage("not an odmrd spool file")
    env = Envelope(sender="", recipients=[], arrival=0.0)
    msg_id = ""
    for raw in data[len(MAGIC):].split(b"\n"):
        if not raw:
            continue
        key, sep, value = raw.decode("utf-8", "replace").partition(": ")
        if not sep:
            raise CorruptMessage("bad envelope line")
        if key == "Id":
            msg_id = value
        elif key == "Arrival":
            env.arrival = float(value)
        elif key == "Sender":
            env.sender = value.strip()[1:-1]
        elif key == "Recipient":
            addr, _, params = value.partition("> ")
            notify = orcpt = ""
            for param in params.split():
                name, _, pval = param.partition("=")
                if name == "NOTIFY":
                    notify = pval
                elif name == "ORCPT":
                    orcpt = pval
            env.recipients.append(Recipient(addr.strip().lstrip("<").rstrip(">"), notify, orcpt))
        elif key == "Body":
            env.body = value
        elif key == "SMTPUTF8":
            env.smtputf8 = value == "yes"
        elif key == "Ret":
            env.ret = value
        elif key == "Envid":
            env.envid = value
        elif key == "Client":
            env.client = value
    if not env.recipients:
        raise CorruptMessage("no recipients")
    return env, msg_id


def _sane_arrival(arrival: float, written: float) -> float:
    """An Arrival that cannot be true (missing, not finite, before 1970 or in the future)
    counts as the time the file was written (its mtime, at most now): expiry and delay
    notices must still come, and stay put across restarts."""
    now = time.time()
    if math.isfinite(arrival) and 0 < arrival <= now + _FUTURE_SLACK:
        return arrival
    return written if math.isfinite(written) and 0 < written <= now else now


def parse_envelope(domain: str, msg_id: str, head: bytes) -> Tuple[Envelope, int]:
    """The envelope at the start of a spool file and where the message data begins."""
    end = head.find(b"\n\n")
    if end < 0:
        raise CorruptMessage("%s/%s: truncated envelope" % (domain, msg_id))
    try:
        envelope, _ = parse_header(head[:end + 1])
    except (ValueError, UnicodeError) as exc:
        raise CorruptMessage("%s/%s: %s" % (domain, msg_id, exc)) from None
    return envelope, end + 2


class _SpoolFile:
    """Buffered writes straight to a descriptor (a BufferedWriter costs extra
    system calls per file: fstat, lseek), flushed in FILE_IO_SIZE-sized writes."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buffer: List[bytes] = []
        self._size = 0

    def fileno(self) -> int:
        return self.fd

    def write(self, data: bytes) -> None:
        self._buffer.append(data)
        self._size += len(data)
        if self._size >= FILE_IO_SIZE:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = memoryview(b"".join(self._buffer))
        self._buffer, self._size = [], 0
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self._buffer = []
            os.close(fd)


class IncomingMessage:
    """One message being written to one or more domains at once (split at intake)."""

    def __init__(self, spool: "Spool", envelopes: Dict[str, Envelope],
                 prefix: Optional[Callable[[str, str], bytes]] = None):
        self.spool = spool
        self.parts: List[Tuple[str, str, _QueueDir, _SpoolFile]] = []   # domain, id, directory, file
        self.size = 0
        try:
            for domain, envelope in envelopes.items():
                directory, msg_id, fd = self._create(domain)
                # held while writing: another node's prepare() leaves a live file alone
                fcntl.flock(fd, fcntl.LOCK_EX)
                fh = _SpoolFile(fd)
                self.parts.append((domain, msg_id, directory, fh))
                fh.write(envelope.header_bytes(msg_id))
                if prefix is not None:
                    fh.write(prefix(domain, msg_id))
        except SpoolError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise SpoolError("cannot create spool file: %s" % describe_error(exc),
                             no_space=_full(exc)) from None

    def _create(self, domain: str) -> Tuple[_QueueDir, str, int]:
        """A new file in the domain's tmp/ (O_EXCL: never an existing name, never a link).
        The held directories are checked first (two fstatat calls): one renamed away, or
        replaced by a link, must not go on taking mail acknowledged with 250."""
        directory = self.spool._queue_dir(domain, create=True, fresh=True)
        recreated = False
        while True:
            msg_id = new_id()
            try:
                fd = os.open(msg_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                             dir_fd=directory.tmp_fd)
                return directory, msg_id, fd
            except FileExistsError:
                continue
            except FileNotFoundError:
                if recreated:
                    raise
                self.spool._forget(domain, directory)     # removed behind our back: recreate
                directory = self.spool._queue_dir(domain, create=True, fresh=True)
                recreated = True
            except OSError as exc:
                raise in_directory(exc, os.path.join(directory.path, "tmp")) from None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        try:
            for part in self.parts:
                part[3].write(chunk)
        except OSError as exc:
            self.abort()
            raise SpoolError("cannot write spool file: %s" % describe_error(exc),
                             no_space=_full(exc)) from None

    def commit(self) -> List[Tuple[str, str]]:
        """Make every copy durable; return [(domain, id)]. Raises SpoolError (all undone)."""
        try:
            for _, _, _, fh in self.parts:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
        except OSError as exc:
            self.abort()
            raise SpoolError("cannot sync spool file: %s" % describe_error(exc),
                             no_space=_full(exc)) from None
        done: List[Tuple[_QueueDir, str]] = []
        try:
            for _, msg_id, directory, _ in self.parts:
                os.rename(msg_id, msg_id, src_dir_fd=directory.tmp_fd, dst_dir_fd=directory.fd)
                done.append((directory, msg_id))
            for _, _, directory, _ in self.parts:
                self.spool._group.sync(directory)
        except OSError as exc:
            for directory, msg_id in done:
                _unlink_quietly(msg_id, directory.fd)
            self.abort()
            raise SpoolError("cannot commit spool file: %s" % describe_error(exc),
                             no_space=_full(exc)) from None
        for domain, _, _, _ in self.parts:
            self.spool.count_added(domain, self.size)
        return [(domain, msg_id) for domain, msg_id, _, _ in self.parts]

    def abort(self) -> None:
        for _, msg_id, directory, fh in self.parts:
            try:
                fh.close()
            except OSError:
                pass
            _unlink_quietly(msg_id, directory.tmp_fd)
        self.parts = []


def _remove_if_abandoned(name: str, dir_fd: int, shown: str = "") -> int:
    """Unlink a temporary file unless its writer (any process, any node) still holds its lock.

    One this account cannot open (another owner, mode 000: left by a command run under
    another account) has no writer of ours and is removed too; an empty directory is
    removed; a link is never followed (O_NOFOLLOW) nor removed here."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM) or _is_link(name, dir_fd):
            return 0
        log.warning("spool: removing leftover %s, which this account cannot open", shown or name)
        return _unlink_or_rmdir(name, dir_fd, shown)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return 0
    try:
        return _unlink_or_rmdir(name, dir_fd, shown)
    finally:
        os.close(fd)


def _unlink_or_rmdir(name: str, dir_fd: int, shown: str) -> int:
    try:
        os.unlink(name, dir_fd=dir_fd)
        return 1
    except IsADirectoryError:
        pass
    except OSError:
        return 0
    try:
        os.rmdir(name, dir_fd=dir_fd)
        return 1
    except OSError as exc:
        log.warning("spool: leftover directory %s not removed: %s", shown or name, exc.strerror)
        return 0


def _unlink_quietly(name: str, dir_fd: Optional[int]) -> None:
    if dir_fd is None:       # never relative to the working directory
        return
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


class DomainClaim:
    """Exclusive right to deliver some domains; released by `release()` or `with`."""

    def __init__(self, spool: "Spool", domains: Iterable[str]):
        self.spool = spool
        self.domains: List[str] = []
        self._held: List[Tuple[threading.Lock, object]] = []
        try:
            for domain in domains:
                self._claim(domain)
        except BaseException:
            self.release()
            raise

    def _claim(self, domain: str) -> None:
        thread_lock = self.spool._thread_lock(domain)
        if not thread_lock.acquire(blocking=False):
            raise DomainBusy(domain)
        try:
            directory = self.spool._queue_dir(domain, create=True, fresh=True)
            fd = _open_nofollow(".lock", directory.fd, directory.show(".lock"), os.O_RDWR | os.O_CREAT)
            fh = os.fdopen(fd, "r+b", buffering=0)
        except OSError:
            thread_lock.release()
            raise
        try:
            os.fchmod(fh.fileno(), 0o600)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            thread_lock.release()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DomainBusy(domain) from None
            raise
        self._held.append((thread_lock, fh))
        self.domains.append(domain)

    def release(self) -> None:
        while self._held:
            thread_lock, fh = self._held.pop()
            try:
                fh.close()       # closing the descriptor drops the flock
            finally:
                thread_lock.release()
        self.domains = []

    def __enter__(self) -> "DomainClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class UsageAuthority(Protocol):
    """Who keeps the quota counts when this process does not (an intake worker's main
    process): asked for a domain's usage, told of each message this process adds."""

    def usage(self, domain: str, fresh: bool) -> Tuple[int, int]: ...

    def added(self, domain: str, size: int, count: int) -> None: ...


class Spool:
    """All domains' directories under one root."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.authority: Optional[UsageAuthority] = None     # None: this process counts
        self._group = _GroupSync()
        self._locks: Dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._usage: Dict[str, list] = {}      # domain -> [count, bytes, scanned_at, dir mtime_ns]
        self._usage_guard = threading.Lock()
        self._open: "OrderedDict[str, _QueueDir]" = OrderedDict()   # queue -> its open directory
        self._open_guard = threading.Lock()
        self._checked: set = set()        # names known to be normalised domains
        self._unusable: Dict[Tuple[str, str], int] = {}    # (queue, id) -> ctime: not quarantinable

    # -- directories ------------------------------------------------------
    def _dir(self, domain: str) -> str:
        """The directory of a queue: a normalised domain, or OUTBOUND."""
        if domain not in self._checked:
            if domain != OUTBOUND and normalize_domain(domain) != domain:
                raise ValueError("domain must be normalised before it reaches the spool")
            self._checked.add(domain)
        return os.path.join(self.root, domain)

    def _queue_dir(self, queue: str, create: bool = False, fresh: bool = False) -> _QueueDir:
        """The queue's directory held open. `create`: with its tmp/ (made if missing);
        `fresh`: check (two lstat calls) that the paths still name the directories held open —
        for the start of an operation, not for each message of it. Raises
        FileNotFoundError, NotADirectoryError or LinkRefused."""
        held = self._open.get(queue)        # one dict look-up: atomic, no lock on the hot path
        if held is not None and (held.tmp_fd is not None or not create) \
                and (not fresh or held.still_there()):
            return held
        try:
            opened = self._open_queue(queue, create)
        except OSError:
            self._forget(queue, held)
            raise
        with self._open_guard:
            self._open.pop(queue, None)
            self._open[queue] = opened
            while len(self._open) > _OPEN_QUEUES:
                self._open.popitem(last=False)     # the longest held; closed once its last user lets go
        return opened

    def _open_queue(self, queue: str, create: bool) -> _QueueDir:
        path = self._dir(queue)
        if create:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        fd, created = _open_dir(path, None, path, create)
        directory = _QueueDir(path, fd)
        try:
            tmp_fd, made_tmp = _open_dir("tmp", fd, directory.show("tmp"), create)
        except OSError as exc:           # missing, a link (logged), unreadable, not a directory...
            if create:
                raise
            if not isinstance(exc, (FileNotFoundError, LinkRefused)):
                directory.tmp_error = exc
            return directory             # readable; nothing can be written or retired here
        directory.hold_tmp(tmp_fd)
        if created or made_tmp:
            os.fsync(fd)
        if created:
            fsync_dir(self.root)
        return directory

    def _forget(self, queue: str, directory: Optional[_QueueDir]) -> None:
        with self._open_guard:
            if directory is not None and self._open.get(queue) is directory:
                del self._open[queue]

    def domains(self) -> List[str]:
        """Domains that have a spool directory (a link in the root is logged, never listed)."""
        result = []
        try:
            with os.scandir(self.root) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        _refuse_link(entry.path)
                    elif not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                        result.append(entry.name)
        except FileNotFoundError:
            return []
        for name in result:
            if not _normalised(name):
                _stray_directory(os.path.join(self.root, name))
        return sorted(name for name in result if _normalised(name))

    def queues(self) -> List[str]:
        """The domains' queues and OUTBOUND: what `shape` goes through."""
        return self.domains() + [OUTBOUND]

    def shape(self, strict: bool = False, queues: Optional[Iterable[str]] = None,
              mtimes: bool = True) -> Iterator[Tuple[str, QueueFiles]]:
        """Every queue (or those named) with what its message files hold, read from
        directory listings and one lstat per file only: no file opened, nothing followed
        through a link (each is logged, as by `domains` and `listing`; a message whose state
        file is a link is left out, as by `listing`). Cheap enough for `queue summary` on a
        million messages. A queue directory that cannot be read is skipped, or with
        `strict` (an operator asking) raises OSError naming it: an unreadable queue is not
        an empty one. `mtimes`: each message's, not only the oldest."""
        try:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return
        try:
            for queue in self.queues() if queues is None else queues:
                yield queue, _queue_files(root_fd, queue, self._dir(queue), strict, mtimes)
        finally:
            os.close(root_fd)

    def prepare(self, before: Optional[float] = None) -> int:
        """At start-up: create the root, remove debris of interrupted writes, report links.
        Returns files removed. `before`: only debris last changed before then, for a
        clean-up that runs while sessions already write (the daemon's, see `Service.start`).
        A queue that cannot be read or cleaned (mode, owner, I/O error) is logged, naming
        its directory, and the others are cleaned all the same: one bad queue must not
        leave every queue after it uncleaned. Only a root that cannot be listed raises."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        removed = 0
        for queue in self.queues():
            try:
                directory = self._queue_dir(queue, fresh=True)
                removed += _clean(directory, lambda name, q=queue, d=directory: self._set_aside(q, d, name),
                                  before, lambda msg_id, q=queue: self._in_quarantine(q, msg_id))
                if directory.tmp_error is not None:     # its debris stays; mail cannot arrive either
                    log.error("spool: start-up clean-up of %s skipped: %s", directory.show("tmp"),
                              describe_error(directory.tmp_error))
            except (FileNotFoundError, NotADirectoryError, LinkRefused):
                continue
            except OSError as exc:
                log.error("spool: start-up clean-up of %s skipped: %s", self._dir(queue),
                          describe_error(exc))
        return removed

    def _in_quarantine(self, queue: str, msg_id: str) -> bool:
        """Whether the quarantine holds the message (True when that cannot be told)."""
        held: List[int] = []
        try:
            return _exists(msg_id, self._quarantine_dir(queue, held, create=False))
        except FileNotFoundError:
            return False
        except OSError:                 # a link where the quarantine belongs, a mode: unknown
            return True
        finally:
            for fd in held:
                os.close(fd)

    def _set_aside(self, queue: str, directory: _QueueDir, name: str) -> int:
        """A directory where a state file belongs: removed when empty, else moved to the
        quarantine under a name of its own (logged either way). Returns 1 when gone."""
        shown = directory.show(name)
        try:
            os.rmdir(name, dir_fd=directory.fd)
            log.warning("spool: removed %s, a directory where a state file belongs", shown)
            return 1
        except OSError:
            pass
        held: List[int] = []
        aside = "%s.%s" % (name, secrets.token_hex(4))
        try:
            fd = self._quarantine_dir(queue, held)
            os.rename(name, aside, src_dir_fd=directory.fd, dst_dir_fd=fd)
        except OSError as exc:
            log.error("spool: %s is a directory where a state file belongs and cannot be "
                      "quarantined: %s", shown, describe_error(exc))
            return 0
        finally:
            for fd in held:
                os.close(fd)
        log.error("spool: %s is a directory where a state file belongs; moved to %s", shown,
                  os.path.join(self.root, QUARANTINE, queue, aside))
        return 1

    # -- intake -----------------------------------------------------------
    def begin(self, envelopes: Dict[str, Envelope],
              prefix: Optional[Callable[[str, str], bytes]] = None) -> IncomingMessage:
        """Start writing one message for several domains; `prefix` adds per-copy headers."""
        return IncomingMessage(self, envelopes, prefix)

    # -- reading ----------------------------------------------------------
    def listing(self, queue: str) -> Tuple[List[str], Set[str]]:
        """The queue's message ids, oldest first, and those of them that have a state file.
        A message that is a link, or whose state file is one, is logged and left out."""
        try:
            directory = self._queue_dir(queue, fresh=True)
        except (FileNotFoundError, NotADirectoryError, LinkRefused):
            return [], set()
        ids: List[str] = []
        states: Set[str] = set()
        links: Set[str] = set()
        for entry in directory.scan():
            name = entry.name
            if entry.is_symlink():
                _refuse_link(directory.show(name))
                links.add(name)
            elif _valid_id(name):
                ids.append(name)
            elif name.endswith(".state"):
                states.add(name[:-6])
        if links:
            ids = [i for i in ids if i + ".state" not in links]
        ids.sort()
        return ids, states.intersection(ids)

    def has_mail(self, domain: str) -> bool:
        """Does a message wait that a delivery session can send? ATRN must not answer 250
        for nothing. Headers are read in directory order until the first usable one (at
        ATRN that is nearly always the first file); unusable ones met on the way are
        quarantined, or passed over unread once known to stay (`_remember_unusable`)."""
        try:
            directory = self._queue_dir(domain, fresh=True)
            for entry in directory.scan():
                name = entry.name
                if not _valid_id(name) or entry.is_symlink() or self._known_unusable(domain, entry):
                    continue
                if self._deliverable(domain, name):
                    return True
        except (FileNotFoundError, NotADirectoryError, LinkRefused):
            return False
        return False

    def _known_unusable(self, queue: str, entry: "os.DirEntry[str]") -> bool:
        known = self._unusable.get((queue, entry.name))
        if known is None:
            return False
        try:
            return entry.stat(follow_symlinks=False).st_ctime_ns == known
        except OSError:
            return True

    def _deliverable(self, queue: str, msg_id: str) -> bool:
        """A message with recipients still to deliver, or a DSN still to queue."""
        try:
            message, _ = self.read(queue, msg_id)
        except (FileNotFoundError, LinkRefused):
            return False
        except (CorruptMessage, IsADirectoryError, UnreadableMessage) as exc:
            if isinstance(exc, UnreadableMessage) and not exc.lasting:
                return True             # a passing shortage: the file is probably fine
            self._corrupt(queue, msg_id, exc, "quarantine")
            return False
        except (SpoolError, OSError):
            return True
        state = message.state
        return bool(message.pending()) or bool(state.failed and not state.bounced)

    def read(self, queue: str, msg_id: str, inline: int = 0,
             has_state: Optional[bool] = None) -> Tuple[Message, Optional[bytes]]:
        """The one reader of a spool file, with one open(): the message, and its text too
        when the file is at most `inline` bytes (delivery sends that in one write).
        `has_state` comes from a listing (it spares looking for a state file); None: look.
        Raises FileNotFoundError (gone), LinkRefused (logged), IsADirectoryError (a
        directory in a message's place), CorruptMessage, SpoolError (unreadable)."""
        if not _valid_id(msg_id):
            raise CorruptMessage("invalid message id")
        try:
            directory = self._queue_dir(queue)
        except (FileNotFoundError, LinkRefused):
            raise
        except OSError as exc:
            raise SpoolError("cannot read %s: %s" % (msg_id, exc.strerror)) from None
        try:
            fd = _open_nofollow(msg_id, directory.fd, directory.show(msg_id), _READ_FLAGS)
            try:
                st = os.fstat(fd)
                total = st.st_size
                whole = total <= inline
                head = _read_exactly(fd, total if whole else FILE_IO_SIZE)
                while not whole and b"\n\n" not in head and len(head) < 16 * FILE_IO_SIZE:
                    more = os.read(fd, FILE_IO_SIZE)
                    if not more:
                        break
                    head += more
            finally:
                os.close(fd)
        except (FileNotFoundError, LinkRefused, IsADirectoryError):
            raise
        except OSError as exc:
            raise UnreadableMessage(msg_id, exc) from None
        envelope, offset = parse_envelope(queue, msg_id, head)
        envelope.arrival = _sane_arrival(envelope.arrival, st.st_mtime)
        state = self._read_state(queue, msg_id) if has_state is not False else None
        message = Message(queue, msg_id, directory.show(msg_id), envelope, offset, total - offset,
                          state or State(), state is not None)
        return message, (head[offset:] if whole else None)

    def load(self, domain: str, msg_id: str) -> Message:
        """One message (`read` without its text); a directory in its place is unreadable."""
        try:
            return self.read(domain, msg_id)[0]
        except IsADirectoryError as exc:
            raise SpoolError("cannot read %s: %s" % (msg_id, exc.strerror)) from None

    def _read_state(self, domain: str, msg_id: str) -> Optional[State]:
        """The state file's content; None when there is none (a fresh State when unreadable)."""
        name = msg_id + ".state"
        dropped: List[str] = []
        try:
            directory = self._queue_dir(domain)
            with os.fdopen(_open_nofollow(name, directory.fd, directory.show(name), _READ_FLAGS),
                           "rb") as fh:
                state = State.from_json(fh.read(), dropped)
        except LinkRefused:
            raise
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("spool: %s/%s: unreadable state file (%s); starting afresh", domain, msg_id, str(exc))
            return State()
        if dropped:
            log.warning("spool: %s/%s: state file fields of the wrong type ignored: %s",
                        domain, msg_id, ", ".join(dropped))
        return state

    def walk(self, queue: str, corrupt: str = "quarantine", inline: int = 0,
             unreadable: Optional[List[Tuple[str, str, str]]] = None,
             ) -> Iterator[Tuple[Message, Optional[bytes]]]:
        """Every readable message of a queue, oldest first, each with `read`.

        A file that cannot be used never stops the walk: a corrupt or unreadable one (or
        a directory in a message's place) is quarantined, or with `corrupt="report"` only
        logged, an unreadable one added to `unreadable` as (queue, id, reason) (a look that
        must change nothing), or with `"skip"` passed over in silence (a scan whose finds are read
        again before anything is done to them); a vanished one or a link is passed over.
        A file that could not be quarantined stays, logged at each walk."""
        ids, with_state = self.listing(queue)
        for msg_id in ids:
            try:
                found = self.read(queue, msg_id, inline, msg_id in with_state)
            except (FileNotFoundError, LinkRefused):    # gone (queue delete), or a link (logged)
                continue
            except (CorruptMessage, IsADirectoryError, UnreadableMessage) as exc:
                self._corrupt(queue, msg_id, exc, corrupt, unreadable)
                continue
            except (SpoolError, OSError) as exc:        # the directory itself: never stop the walk
                if corrupt != "skip":
                    log.error("spool: %s/%s unreadable, skipped: %s", queue, msg_id, str(exc))
                continue
            yield found

    def _corrupt(self, queue: str, msg_id: str, exc: Exception, action: str,
                 unreadable: Optional[List[Tuple[str, str, str]]] = None) -> bool:
        """Deal with a message file that cannot be used; True when it was moved aside."""
        reason = "a directory where a message should be" if isinstance(exc, IsADirectoryError) \
            else str(exc)
        passing = isinstance(exc, UnreadableMessage) and not exc.lasting
        if action == "quarantine" and not passing:
            if self.quarantine(queue, msg_id, reason):
                return True
            self._remember_unusable(queue, msg_id)
        elif action == "report":
            if unreadable is not None and isinstance(exc, UnreadableMessage):
                unreadable.append((queue, msg_id, reason))
            log.warning("spool: %s/%s is %s (%s); the daemon will quarantine it", queue, msg_id,
                        "unreadable" if isinstance(exc, UnreadableMessage) else "corrupt", reason)
        elif action != "skip":
            log.error("spool: %s/%s unreadable, skipped: %s", queue, msg_id, reason)
        return False

    def _remember_unusable(self, queue: str, msg_id: str) -> None:
        """A file that could be neither read nor quarantined: `has_mail` passes over it
        (without reading it again) until it changes (chmod, chown, rewrite: a new ctime)."""
        try:
            directory = self._queue_dir(queue)
            st = os.stat(msg_id, dir_fd=directory.fd, follow_symlinks=False)
        except OSError:
            return
        if len(self._unusable) > 10000:
            self._unusable.clear()
        self._unusable[(queue, msg_id)] = st.st_ctime_ns

    def messages(self, domain: str, quarantine: bool = True,
                 unreadable: Optional[List[Tuple[str, str, str]]] = None) -> Iterator[Message]:
        """Every readable message of a domain, oldest first; corrupt and unreadable ones are
        quarantined (or, for a look that must change nothing, only reported: `walk`)."""
        for message, _ in self.walk(domain, "quarantine" if quarantine else "report",
                                    unreadable=unreadable):
            yield message

    def file_stat(self, queue: str, msg_id: str) -> Optional[os.stat_result]:
        """lstat of a queue's file (None when it cannot be had): for what cannot be read."""
        try:
            return os.stat(msg_id, dir_fd=self._queue_dir(queue).fd, follow_symlinks=False)
        except OSError:
            return None

    def locate(self, msg_id: str) -> Optional[str]:
        """The queue (domain) holding a message file of this id, readable or not. When
        it is in none of those that could be searched, a queue directory that could not
        be is reported (OSError naming it): the message may well be there."""
        if not _valid_id(msg_id):
            return None
        unsearchable: Optional[OSError] = None
        for queue in self.domains() + [OUTBOUND]:
            try:
                directory = self._queue_dir(queue, fresh=True)
            except (FileNotFoundError, NotADirectoryError, LinkRefused):
                continue
            except OSError as exc:
                unsearchable = unsearchable or in_directory(exc, self._dir(queue))
                continue
            try:
                os.stat(msg_id, dir_fd=directory.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                unsearchable = unsearchable or in_directory(exc, directory.path)
                continue
            return queue
        if unsearchable is not None:
            raise unsearchable
        return None

    def find(self, msg_id: str) -> Optional[Message]:
        """The message of this id; CorruptMessage (naming domain/id) when it cannot be parsed."""
        domain = self.locate(msg_id)
        if domain is None:
            return None
        try:
            return self.load(domain, msg_id)
        except FileNotFoundError:
            return None
        except CorruptMessage as exc:
            raise CorruptMessage("%s/%s: corrupt spool file (%s)" % (domain, msg_id, exc)) from None

    def discard(self, domain: str, msg_id: str) -> None:
        """Delete a message file that cannot be parsed (operator's `queue delete`)."""
        directory = self._queue_dir(domain, fresh=True)
        for name in (msg_id, msg_id + ".state"):
            if _is_link(name, directory.fd):
                _refuse_link(directory.show(name))
            else:
                _unlink_quietly(name, directory.fd)
        self._group.sync(directory)

    # -- changes ----------------------------------------------------------
    def save_state(self, message: Message) -> None:
        directory = self._queue_dir(message.domain)
        final = message.id + ".state"
        tmp = ".state.%s.%s" % (message.id, secrets.token_hex(4))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=directory.fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(fd, "wb") as fh:
                fh.write(message.state.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.rename(tmp, final, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
            except IsADirectoryError:           # a directory in the state file's place
                if not self._set_aside(message.domain, directory, final):
                    raise
                os.rename(tmp, final, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
        except BaseException:
            _unlink_quietly(tmp, directory.fd)
            raise
        self._group.sync(directory)

    def _drop_state(self, queue: str, directory: "_QueueDir", msg_id: str) -> None:
        """A finished message's state file goes with it; a directory there is set aside."""
        try:
            os.unlink(msg_id + ".state", dir_fd=directory.fd)
        except IsADirectoryError:
            self._set_aside(queue, directory, msg_id + ".state")
        except OSError:
            pass

    def remove(self, message: Message, sync: bool = True) -> None:
        """Delete a finished message (data first, then its state)."""
        try:
            directory = self._queue_dir(message.domain)
        except FileNotFoundError:
            return
        try:
            os.unlink(message.id, dir_fd=directory.fd)
        except FileNotFoundError:
            pass
        self._drop_state(message.domain, directory, message.id)
        self.count_added(message.domain, -message.size, -1)
        if sync:
            self._group.sync(directory)

    def retire(self, message: Message, has_state: bool = True) -> str:
        """Take a delivered message out of the queue with one rename into its tmp/.

        Unlinking a file frees its blocks (slow on ext4, ~0.2 ms); the rename is
        the state change and the caller has the returned name unlinked later
        (`unlink_retired`), off the delivery path. Whatever is left in tmp/ is
        removed at start-up. Where the rename cannot be made (ENOSPC for tmp/'s entry,
        EPERM...) the message is unlinked at once and "" returned, as when it was gone.
        Raises OSError when neither can be done."""
        directory = self._queue_dir(message.domain, create=True)
        retired = message.id + ".done"
        try:
            os.rename(message.id, retired, src_dir_fd=directory.fd, dst_dir_fd=directory.tmp_fd)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            # a full disk may have no block for tmp/'s new entry, or tmp/ refuses it:
            # an unlink needs no space and is the same state change, only slower
            log.warning("spool: cannot retire %s/%s into tmp/ (%s); unlinking it instead",
                        message.domain, message.id, describe_error(exc))
            try:
                os.unlink(message.id, dir_fd=directory.fd)
            except FileNotFoundError:
                return ""
            retired = ""
        if has_state:
            self._drop_state(message.domain, directory, message.id)
        self.count_added(message.domain, -message.size, -1)
        return retired

    def probe(self, domain: str) -> None:
        """Can the queue's directory still be changed? Creates and unlinks an empty file in
        it (named like the debris start-up removes). Raises OSError when it cannot."""
        directory = self._queue_dir(domain, create=True, fresh=True)
        name = ".tmp.probe.%s" % secrets.token_hex(4)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                         dir_fd=directory.fd)
            os.close(fd)
            os.unlink(name, dir_fd=directory.fd)
        except OSError as exc:
            raise in_directory(exc, directory.path) from None

    def unlink_retired(self, queue: str, name: str) -> None:
        """Free a retired message's blocks (a name `retire` returned)."""
        try:
            directory = self._queue_dir(queue)
        except OSError:
            return
        _unlink_quietly(name, directory.tmp_fd)

    def sync_domain(self, domain: str) -> None:
        self._group.sync(self._queue_dir(domain))

    def quarantine(self, domain: str, msg_id: str, reason: str) -> bool:
        """Move an unusable message (and its state) to .quarantine/<domain>/ (the reason is
        logged); False (logged) when it cannot be moved: it stays where it is."""
        held: List[int] = []
        try:
            directory = self._queue_dir(domain)
            fd = self._quarantine_dir(domain, held)
            shown = os.path.join(self.root, QUARANTINE, domain, msg_id)
            try:                              # never replaced: someone (or something) put it there
                os.stat(msg_id, dir_fd=fd, follow_symlinks=False)
                raise _refuse_link(shown) if _is_link(msg_id, fd) else \
                    FileExistsError(errno.EEXIST, "already in the quarantine", shown)
            except FileNotFoundError:
                pass
            os.rename(msg_id, msg_id, src_dir_fd=directory.fd, dst_dir_fd=fd)
            self._move_state(msg_id, directory.fd, fd, directory.show(msg_id + ".state"))
            os.fsync(fd)
        except OSError as exc:
            log.error("spool: cannot quarantine %s/%s (%s): %s", domain, msg_id, reason,
                      describe_error(exc))
            return False
        finally:
            for fd in held:
                os.close(fd)
        self.count_added(domain, 0, -1)
        log.error("spool: quarantined %s/%s: %s", domain, msg_id, reason)
        return True

    def _quarantine_dir(self, queue: str, held: List[int], create: bool = True) -> int:
        """.quarantine/<queue> opened without following links (made 0700 when asked); the
        descriptors opened are appended to `held` for the caller to close."""
        top = os.path.join(self.root, QUARANTINE)
        fd, _ = _open_dir(top, None, top, create)
        held.append(fd)
        fd, _ = _open_dir(queue, fd, os.path.join(top, queue), create)
        held.append(fd)
        return fd

    @staticmethod
    def _move_state(msg_id: str, from_fd: int, to_fd: int, shown: str) -> None:
        state = msg_id + ".state"
        if _is_link(state, from_fd):
            _refuse_link(shown)
            return
        try:
            os.rename(state, state, src_dir_fd=from_fd, dst_dir_fd=to_fd)
        except FileNotFoundError:
            pass

    def quarantined(self) -> List["Quarantined"]:
        """What the quarantine holds, oldest first (read only; links logged and left out)."""
        top = os.path.join(self.root, QUARANTINE)
        try:
            top_fd, _ = _open_dir(top, None, top)
        except (FileNotFoundError, NotADirectoryError, LinkRefused):
            return []
        found: List[Quarantined] = []
        try:
            for entry in [(e.name, e.is_symlink()) for e in _scan(top_fd)]:
                name, is_link = entry
                if is_link:
                    _refuse_link(os.path.join(top, name))
                elif name == OUTBOUND or _normalised(name):
                    found.extend(_quarantined_in(top_fd, top, name))
        finally:
            os.close(top_fd)
        found.sort(key=lambda q: (q.when, q.id))
        return found

    def requeue(self, msg_id: str) -> str:
        """Put a repaired message back into its queue; returns the queue. It must be a
        regular file (never a link) that this account can read and that parses. Raises
        FileNotFoundError (no such id), LinkRefused, UnreadableMessage, CorruptMessage, or
        SpoolError (the queue already holds that id)."""
        if not _valid_id(msg_id):
            raise FileNotFoundError(errno.ENOENT, "no quarantined message", msg_id)
        top = os.path.join(self.root, QUARANTINE)
        try:
            queues = sorted(os.listdir(top))
        except (FileNotFoundError, NotADirectoryError):
            queues = []
        for queue in queues:
            if (queue == OUTBOUND or _normalised(queue)) \
                    and os.path.lexists(os.path.join(top, queue, msg_id)):
                self._requeue(queue, msg_id)
                return queue
        raise FileNotFoundError(errno.ENOENT, "no quarantined message", msg_id)

    def _requeue(self, queue: str, msg_id: str) -> None:
        held: List[int] = []
        try:
            fd = self._quarantine_dir(queue, held, create=False)
            shown = os.path.join(self.root, QUARANTINE, queue, msg_id)
            _check_whole(fd, queue, msg_id, shown)
            directory = self._queue_dir(queue, create=True, fresh=True)
            try:
                os.stat(msg_id, dir_fd=directory.fd, follow_symlinks=False)
                raise SpoolError("%s/%s: the queue holds a file of that id already" % (queue, msg_id),
                                 temporary=False)
            except FileNotFoundError:
                pass
            os.rename(msg_id, msg_id, src_dir_fd=fd, dst_dir_fd=directory.fd)
            self._move_state(msg_id, fd, directory.fd, shown + ".state")
            self._group.sync(directory)
            self._unusable.pop((queue, msg_id), None)
        finally:
            for fd in held:
                os.close(fd)

    # -- locks --------------------------------------------------------------
    def _thread_lock(self, domain: str) -> threading.Lock:
        with self._locks_guard:
            lock = self._locks.get(domain)
            if lock is None:
                lock = self._locks[domain] = threading.Lock()
            return lock

    def claim(self, domains: Iterable[str]) -> DomainClaim:
        """Claim every domain or none (DomainBusy)."""
        return DomainClaim(self, domains)

    # -- usage (quotas) -----------------------------------------------------
    @contextlib.contextmanager
    def quota_lock(self, domain: str) -> Iterator[None]:
        """Held from a quota domain's fresh count to its new message's rename, by every
        thread, process and node (flock on its own open file): concurrent transactions
        never grow the domain past its quota together."""
        directory = self._queue_dir(domain, create=True)
        fd = _open_nofollow(".quota.lock", directory.fd, directory.show(".quota.lock"),
                            os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def usage(self, domain: str, fresh: bool = False) -> Tuple[int, int]:
        """(messages, bytes) waiting for a domain, from the authority if there is one."""
        if self.authority is not None:
            return self.authority.usage(domain, fresh)
        return self.counted_usage(domain, fresh)

    def counted_usage(self, domain: str, fresh: bool = False) -> Tuple[int, int]:
        """(messages, bytes) waiting for a domain, as this process counts them. Cached
        while the domain directory's mtime stays what it was (any process or node adding
        or removing a message changes it), at most 30 s; `fresh`: counted now."""
        now = time.monotonic()
        stamp = self._dir_stamp(domain)
        # a directory changed within a clock tick may change again without a new mtime
        settled = stamp is not None and time.time_ns() - stamp > _MTIME_TICK_NS
        with self._usage_guard:
            entry = self._usage.get(domain)
            if not fresh and settled and entry and entry[3] == stamp and now - entry[2] < _STAT_TTL:
                return int(entry[0]), int(entry[1])
        count = total = 0
        try:
            for e in self._queue_dir(domain, fresh=True).scan():
                if _valid_id(e.name) and not e.is_symlink():
                    try:
                        total += e.stat(follow_symlinks=False).st_size
                        count += 1
                    except OSError:
                        pass
        except (FileNotFoundError, NotADirectoryError, LinkRefused):
            pass
        with self._usage_guard:
            self._usage[domain] = [count, total, now, stamp]
        return count, total

    def _dir_stamp(self, domain: str) -> Optional[int]:
        try:
            return os.lstat(os.path.join(self.root, domain)).st_mtime_ns
        except OSError:
            return None

    def count_added(self, domain: str, size: int, count: int = 1) -> None:
        """A change made by this process (or, in the main process, reported by a worker)."""
        self._count_locally(domain, size, count)
        if self.authority is not None:
            self.authority.added(domain, size, count)

    def _count_locally(self, domain: str, size: int, count: int) -> None:
        """Counted, and the directory's new mtime taken as known."""
        if domain not in self._usage:             # never counted (no quota asked): nothing to keep
            return
        stamp = self._dir_stamp(domain)
        with self._usage_guard:
            entry = self._usage.get(domain)
            if entry:
                entry[0] += count
                entry[1] += size
                entry[3] = stamp


@dataclass
class Quarantined:
    """A file in the quarantine, as `queue list --quarantine` shows it."""
    domain: str
    id: str
    size: int
    when: float              # set aside at (the file's ctime: the rename that moved it)
    reason: str              # why it cannot be used now (read again for the listing)


def _quarantined_in(top_fd: int, top: str, queue: str) -> List[Quarantined]:
    try:
        fd, _ = _open_dir(queue, top_fd, os.path.join(top, queue))
    except (OSError, LinkRefused):
        return []
    found = []
    try:
        for entry in _scan(fd):
            if entry.is_symlink():
                _refuse_link(os.path.join(top, queue, entry.name))
                continue
            if not _valid_id(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            found.append(Quarantined(queue, entry.name, st.st_size, st.st_ctime,
                                     _why_unusable(fd, queue, entry.name, os.path.join(top, queue, entry.name))))
    finally:
        os.close(fd)
    return found


def _why_unusable(dir_fd: int, queue: str, msg_id: str, shown: str) -> str:
    """Why a quarantined file cannot be used, as it is now (asked at each listing, so a
    repaired file says so)."""
    try:
        _check_whole(dir_fd, queue, msg_id, shown)
    except (SpoolError, OSError) as exc:
        return str(exc)
    return "readable and parses now: odmrd queue requeue %s" % msg_id


def _check_whole(dir_fd: int, queue: str, msg_id: str, shown: str) -> None:
    """Read a whole file (a fault may lie past the header) and parse its envelope."""
    try:
        st = os.stat(msg_id, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no quarantined message", msg_id) from None
    if stat.S_ISLNK(st.st_mode):
        raise LinkRefused(shown)            # the operator's command says so, in one line
    if not stat.S_ISREG(st.st_mode):
        raise CorruptMessage("%s/%s is not a regular file" % (queue, msg_id))
    head = b""
    try:
        fd = _open_nofollow(msg_id, dir_fd, shown, _READ_FLAGS)
        try:
            while True:
                chunk = os.read(fd, FILE_IO_SIZE)
                if not chunk:
                    break
                if len(head) < 16 * FILE_IO_SIZE:
                    head += chunk
        finally:
            os.close(fd)
    except LinkRefused:
        raise
    except OSError as exc:
        raise UnreadableMessage(msg_id, exc) from None
    parse_envelope(queue, msg_id, head)


@dataclass
class QueueFiles:
    """One queue's message files as their lstat showed them: what `queue summary` counts.
    `mtimes` only when asked for (a million floats for one big queue); `oldest` always."""
    messages: int = 0
    bytes: int = 0
    oldest: float = 0.0                 # 0: no message
    mtimes: List[float] = field(default_factory=list)


def _queue_files(root_fd: int, queue: str, shown: str, strict: bool, mtimes: bool) -> QueueFiles:
    """The message files of the queue at `shown` (none when it is a link or vanished; when
    it cannot be read either, unless `strict`), from one pass over the listing and one
    lstat each. As by `listing`, a message whose state file is a link is left out (each
    link is logged): skipped when the listing names the link first, taken back at the end
    when it names the message first."""
    found = QueueFiles()
    try:
        fd = os.open(queue, _DIR_FLAGS, dir_fd=root_fd)
    except (FileNotFoundError, NotADirectoryError):
        return found
    except OSError as exc:
        if strict and exc.errno != errno.ELOOP:
            raise in_directory(exc, shown) from None
        return found
    links: Set[str] = set()
    left_out: Set[str] = set()          # messages met after their state file's link
    times: List[float] = []
    size = count = 0
    oldest = 0.0
    retaken = False                     # the oldest counted was taken back (mtimes off)
    try:
        with os.scandir(fd) as entries:
            for entry in entries:       # a million of them: no calls that can be saved
                name = entry.name
                if entry.is_symlink():
                    _refuse_link(os.path.join(shown, name))
                    links.add(name)
                elif 13 < len(name) <= 40 and not name.strip(_ID_DIGITS):      # _valid_id
                    if links and name + ".state" in links:
                        left_out.add(name)
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue            # delivered while we looked
                    if st.st_mode & 0o170000 == 0o100000:       # S_ISREG
                        size += st.st_size
                        if mtimes:
                            times.append(st.st_mtime)
                        else:
                            count += 1
                            if not oldest or st.st_mtime < oldest:
                                oldest = st.st_mtime
        for link in links:
            message = link[:-len(".state")]
            if link.endswith(".state") and _valid_id(message) and message not in left_out:
                try:                        # met after its message, which was counted
                    st = os.stat(message, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if mtimes and st.st_mtime in times:
                    times.remove(st.st_mtime)
                    size -= st.st_size
                elif not mtimes:
                    count -= 1
                    size -= st.st_size
                    retaken = retaken or st.st_mtime <= oldest
        if retaken:             # the oldest was taken back: a rare link (logged), a second listing
            oldest = _oldest_without(fd, links)
    finally:
        os.close(fd)
    if mtimes:
        count, oldest = len(times), min(times, default=0.0)
        found.mtimes = times
    found.messages, found.bytes, found.oldest = count, size, oldest
    return found


def _oldest_without(fd: int, links: Set[str]) -> float:
    """The oldest mtime among a queue's message files, leaving out those whose state file
    is one of `links` (0: none)."""
    oldest = 0.0
    for entry in _scan(fd):
        name = entry.name
        if _valid_id(name) and not entry.is_symlink() and name + ".state" not in links:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (not oldest or st.st_mtime < oldest):
                oldest = st.st_mtime
    return oldest


def _normalised(name: str) -> bool:
    try:
        return normalize_domain(name) == name
    except ValueError:
        return False


def _clean(directory: _QueueDir, set_aside: Callable[[str], int], before: Optional[float] = None,
           quarantined: Callable[[str], bool] = lambda msg_id: False) -> int:
    """Start-up clean-up of one queue: unlink abandoned temporary files and state files
    without a message, set aside a directory where a state file belongs (no state could
    ever be saved over it); report every link found (and leave it). Returns files removed.
    `before`: only what was last changed before then (a clean-up running beside the
    sessions leaves alone what they are making)."""
    removed = 0
    if directory.tmp_fd is not None:
        for name, is_link in [(e.name, e.is_symlink()) for e in _scan(directory.tmp_fd)]:
            if is_link:
                _refuse_link(directory.show("tmp", name))
            elif _changed_before(name, directory.tmp_fd, before):
                removed += _remove_if_abandoned(name, directory.tmp_fd, directory.show("tmp", name))
    names = set()
    odd = []            # the entries that are not plain message files
    for entry in directory.scan():
        name = entry.name
        names.add(name)
        if name.endswith(".state") or name[:1] == "." or entry.is_symlink():
            odd.append((name, entry.is_symlink(), entry.is_dir(follow_symlinks=False)))
    for name, is_link, is_dir in odd:
        if is_link:
            _refuse_link(directory.show(name))
        elif not _changed_before(name, directory.fd, before):
            continue
        elif is_dir and name.endswith(".state"):
            removed += set_aside(name)
        elif name.endswith(".state") and name[:-6] not in names:
            if _message_moved(name[:-6], directory, quarantined):
                continue            # the listing is older than a quarantine that takes it along
            _unlink_quietly(name, directory.fd)
            removed += 1
        elif name.startswith(".state.") or name.startswith(".tmp."):
            removed += _remove_if_abandoned(name, directory.fd, directory.show(name))
    return removed


def _message_moved(msg_id: str, directory: _QueueDir, quarantined: Callable[[str], bool]) -> bool:
    """A state file's message, missing from a listing, is back or in the quarantine now:
    a quarantine moves the message first, then its state (`Spool.quarantine`)."""
    return _exists(msg_id, directory.fd) or quarantined(msg_id)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return True                 # cannot tell: leave the state file alone


def _changed_before(name: str, dir_fd: int, before: Optional[float]) -> bool:
    if before is None:
        return True
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime < before
    except OSError:
        return False            # gone already
