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
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from odmr.names import address_is_safe, normalize_domain

log = logging.getLogger("odmrd.spool")

MAGIC = b"ODMR-Spool: 1\n"
CHUNK = 65536
OUTBOUND = ".outbound"       # bounces for senders outside the hosted domains, waiting for bounce_relay
_STAT_TTL = 30.0


class SpoolError(Exception):
    """A spool operation failed; `temporary` says whether retrying may help."""

    def __init__(self, message: str, temporary: bool = True):
        super().__init__(message)
        self.temporary = temporary


class CorruptMessage(SpoolError):
    def __init__(self, message: str):
        super().__init__(message, temporary=False)


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

    def pending(self) -> List[Recipient]:
        final = set(self.state.done) | set(self.state.failed)
        return [r for r in self.envelope.recipients if r.address not in final]

    def open_data(self):
        fh = open(self.path, "rb")
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


def _valid_id(name: str) -> bool:
    return 13 < len(name) <= 40 and all(c in "0123456789abcdef" for c in name)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _GroupSync:
    """Directory fsync shared between threads: one fsync covers every rename before it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._requested: Dict[str, int] = {}
        self._completed: Dict[str, int] = {}
        self._running: Dict[str, bool] = {}

    def sync(self, path: str) -> None:
        with self._cond:
            mine = self._requested.get(path, 0) + 1
            self._requested[path] = mine
            while self._completed.get(path, 0) < mine:
                if self._running.get(path):
                    self._cond.wait()
                    continue
                self._running[path] = True
                target = self._requested[path]
                self._cond.release()
                try:
                    _fsync_dir(path)
                finally:
                    self._cond.acquire()
                    self._running[path] = False
                    self._cond.notify_all()
                self._completed[path] = max(self._completed.get(path, 0), target)


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
    system calls per file: fstat, lseek), flushed in CHUNK-sized writes."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buffer: List[bytes] = []
        self._size = 0

    def fileno(self) -> int:
        return self.fd

    def write(self, data: bytes) -> None:
        self._buffer.append(data)
        self._size += len(data)
        if self._size >= CHUNK:
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
        self.parts: List[Tuple[str, str, str, object]] = []   # domain, id, tmp path, file
        self.size = 0
        try:
            for domain, envelope in envelopes.items():
                directory = spool.domain_dir(domain, create=True)
                recreated = False
                while True:
                    msg_id = new_id()
                    tmp = os.path.join(directory, "tmp", msg_id)
                    try:
                        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        break
                    except FileExistsError:
                        continue
                    except FileNotFoundError:
                        if directory not in spool._ready or recreated:
                            raise
                        spool._ready.discard(directory)     # removed behind our back: recreate
                        directory = spool.domain_dir(domain, create=True)
                        recreated = True
                # held while writing: another node's prepare() leaves a live file alone
                fcntl.flock(fd, fcntl.LOCK_EX)
                fh = _SpoolFile(fd)
                self.parts.append((domain, msg_id, tmp, fh))
                fh.write(envelope.header_bytes(msg_id))
                if prefix is not None:
                    fh.write(prefix(domain, msg_id))
        except SpoolError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise SpoolError("cannot create spool file: %s" % exc.strerror) from None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        try:
            for part in self.parts:
                part[3].write(chunk)
        except OSError as exc:
            self.abort()
            raise SpoolError("cannot write spool file: %s" % exc.strerror) from None

    def commit(self) -> List[Tuple[str, str]]:
        """Make every copy durable; return [(domain, id)]. Raises SpoolError (all undone)."""
        try:
            for _, _, _, fh in self.parts:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
        except OSError as exc:
            self.abort()
            raise SpoolError("cannot sync spool file: %s" % exc.strerror) from None
        done = []
        try:
            for domain, msg_id, tmp, _ in self.parts:
                final = os.path.join(self.spool.domain_dir(domain), msg_id)
                os.rename(tmp, final)
                done.append(final)
            for domain, _, _, _ in self.parts:
                self.spool._group.sync(self.spool.domain_dir(domain))
        except OSError as exc:
            for path in done:
                _unlink_quietly(path)
            self.abort()
            raise SpoolError("cannot commit spool file: %s" % exc.strerror) from None
        for domain, _, _, _ in self.parts:
            self.spool._count_added(domain, self.size)
        return [(domain, msg_id) for domain, msg_id, _, _ in self.parts]

    def abort(self) -> None:
        for _, _, tmp, fh in self.parts:
            try:
                fh.close()
            except OSError:
                pass
            _unlink_quietly(tmp)
        self.parts = []


def _remove_if_abandoned(path: str) -> int:
    """Unlink a temporary file unless its writer (any process, any node) still holds its lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return 0
    try:
        os.unlink(path)
        return 1
    except OSError:
        return 0
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
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
            directory = self.spool.domain_dir(domain, create=True)
            fh = open(os.path.join(directory, ".lock"), "a+b")
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


class Spool:
    """All domains' directories under one root."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self._group = _GroupSync()
        self._locks: Dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._usage: Dict[str, List[float]] = {}      # domain -> [count, bytes, scanned_at]
        self._usage_guard = threading.Lock()
        self._ready: set = set()          # domain directories known to exist (with tmp/)
        self._checked: set = set()        # names known to be normalised domains

    # -- directories ------------------------------------------------------
    def domain_dir(self, domain: str, create: bool = False) -> str:
        path = self._dir(domain)
        if create and path not in self._ready and not os.path.isdir(os.path.join(path, "tmp")):
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            _mkdirs_private(path, os.path.join(path, "tmp"))
            _fsync_dir(path)
            _fsync_dir(self.root)
        if create:
            self._ready.add(path)
        return path

    def _dir(self, domain: str) -> str:
        """The directory of a queue: a normalised domain, or OUTBOUND."""
        if domain not in self._checked:
            if domain != OUTBOUND and normalize_domain(domain) != domain:
                raise ValueError("domain must be normalised before it reaches the spool")
            self._checked.add(domain)
        return os.path.join(self.root, domain)

    def domains(self) -> List[str]:
        """Domains that have a spool directory."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        result = []
        for name in names:
            if name.startswith(".") or not os.path.isdir(os.path.join(self.root, name)):
                continue
            try:
                if normalize_domain(name) == name:
                    result.append(name)
            except ValueError:
                continue
        return sorted(result)

    def prepare(self) -> int:
        """At start-up: create the root, remove debris of interrupted writes. Returns files removed."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        removed = 0
        for domain in self.domains() + [OUTBOUND]:
            directory = os.path.join(self.root, domain)
            tmp = os.path.join(directory, "tmp")
            for name in _listdir(tmp):
                removed += _remove_if_abandoned(os.path.join(tmp, name))
            names = set(_listdir(directory))
            for name in names:
                if name.endswith(".state") and name[:-6] not in names:
                    _unlink_quietly(os.path.join(directory, name))
                    removed += 1
                elif name.startswith(".state.") or name.startswith(".tmp."):
                    removed += _remove_if_abandoned(os.path.join(directory, name))
        return removed

    # -- intake -----------------------------------------------------------
    def begin(self, envelopes: Dict[str, Envelope],
              prefix: Optional[Callable[[str, str], bytes]] = None) -> IncomingMessage:
        """Start writing one message for several domains; `prefix` adds per-copy headers."""
        return IncomingMessage(self, envelopes, prefix)

    def store(self, domain: str, envelope: Envelope, data: bytes) -> str:
        """Spool a whole message held in memory (bounces, `enqueue` of small input)."""
        incoming = self.begin({domain: envelope})
        incoming.write(data)
        return incoming.commit()[0][1]

    # -- reading ----------------------------------------------------------
    def message_ids(self, domain: str) -> List[str]:
        return sorted(n for n in _listdir(self._dir(domain)) if _valid_id(n))

    def has_mail(self, domain: str) -> bool:
        try:
            with os.scandir(self._dir(domain)) as it:
                return any(_valid_id(e.name) for e in it)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def load(self, domain: str, msg_id: str) -> Message:
        if not _valid_id(msg_id):
            raise CorruptMessage("invalid message id")
        path = os.path.join(self._dir(domain), msg_id)
        try:
            with open(path, "rb") as fh:
                head = fh.read(CHUNK)
                end = head.find(b"\n\n")
                while end < 0 and len(head) < 16 * CHUNK:
                    more = fh.read(CHUNK)
                    if not more:
                        break
                    head += more
                    end = head.find(b"\n\n")
                size = os.fstat(fh.fileno()).st_size
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise SpoolError("cannot read %s: %s" % (msg_id, exc.strerror)) from None
        envelope, offset = parse_envelope(domain, msg_id, head)
        state = self.load_state(domain, msg_id)
        return Message(domain, msg_id, path, envelope, offset, size - offset, state)

    def load_state(self, domain: str, msg_id: str) -> State:
        path = os.path.join(self._dir(domain), msg_id + ".state")
        dropped: List[str] = []
        try:
            with open(path, "rb") as fh:
                state = State.from_json(fh.read(), dropped)
        except FileNotFoundError:
            return State()
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("spool: %s/%s: unreadable state file (%s); starting afresh", domain, msg_id, exc)
            return State()
        if dropped:
            log.warning("spool: %s/%s: state file fields of the wrong type ignored: %s",
                        domain, msg_id, ", ".join(dropped))
        return state

    def messages(self, domain: str, quarantine: bool = True) -> Iterator[Message]:
        """Every readable message of a domain, oldest first; corrupt ones are quarantined
        (or, for a look that must change nothing, only logged)."""
        for msg_id in self.message_ids(domain):
            try:
                yield self.load(domain, msg_id)
            except FileNotFoundError:
                continue
            except CorruptMessage as exc:
                if quarantine:
                    self.quarantine(domain, msg_id, str(exc))
                else:
                    log.warning("spool: %s/%s is corrupt (%s); the daemon will quarantine it",
                                domain, msg_id, exc)
            except SpoolError as exc:      # unreadable (EIO, EISDIR...): never stop the walk
                log.error("spool: %s/%s unreadable, skipped: %s", domain, msg_id, exc)

    def locate(self, msg_id: str) -> Optional[str]:
        """The queue (domain) holding a message file of this id, readable or not."""
        if not _valid_id(msg_id):
            return None
        for domain in self.domains() + [OUTBOUND]:
            if os.path.exists(os.path.join(self.root, domain, msg_id)):
                return domain
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
        _unlink_quietly(os.path.join(self.root, domain, msg_id))
        _unlink_quietly(os.path.join(self.root, domain, msg_id + ".state"))
        self._group.sync(os.path.join(self.root, domain))

    # -- changes ----------------------------------------------------------
    def save_state(self, message: Message) -> None:
        directory = os.path.join(self.root, message.domain)
        final = os.path.join(directory, message.id + ".state")
        tmp = os.path.join(directory, ".state.%s.%s" % (message.id, secrets.token_hex(4)))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(fd, "wb") as fh:
                fh.write(message.state.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, final)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        self._group.sync(directory)

    def remove(self, message: Message, sync: bool = True) -> None:
        """Delete a finished message (data first, then its state)."""
        directory = os.path.join(self.root, message.domain)
        try:
            os.unlink(message.path)
        except FileNotFoundError:
            pass
        _unlink_quietly(message.path + ".state")
        self._count_added(message.domain, -message.size, -1)
        if sync:
            self._group.sync(directory)

    def retire(self, message: Message, has_state: bool = True) -> str:
        """Take a delivered message out of the queue with one rename into its tmp/.

        Unlinking a file frees its blocks (slow on ext4, ~0.2 ms); the rename is
        the state change and the caller unlinks the returned path later, off the
        delivery path. Whatever is left in tmp/ is removed at start-up."""
        directory = os.path.join(self.root, message.domain)
        target = os.path.join(directory, "tmp", message.id + ".done")
        try:
            os.rename(message.path, target)
        except FileNotFoundError:
            return ""
        if has_state:
            _unlink_quietly(message.path + ".state")
        self._count_added(message.domain, -message.size, -1)
        return target

    def sync_domain(self, domain: str) -> None:
        self._group.sync(os.path.join(self.root, domain))

    def quarantine(self, domain: str, msg_id: str, reason: str) -> None:
        target = os.path.join(self.root, ".quarantine", domain)
        source = os.path.join(self.root, domain, msg_id)
        try:
            _mkdirs_private(os.path.join(self.root, ".quarantine"), target)
            os.rename(source, os.path.join(target, msg_id))
            if os.path.exists(source + ".state"):
                os.rename(source + ".state", os.path.join(target, msg_id + ".state"))
        except OSError as exc:
            log.error("spool: cannot quarantine %s/%s: %s", domain, msg_id, exc.strerror)
            return
        log.error("spool: quarantined %s/%s: %s", domain, msg_id, reason)

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
    def usage(self, domain: str) -> Tuple[int, int]:
        """(messages, bytes) waiting for a domain; cached, rescanned every 30 s."""
        now = time.monotonic()
        with self._usage_guard:
            entry = self._usage.get(domain)
            if entry and now - entry[2] < _STAT_TTL:
                return int(entry[0]), int(entry[1])
        count = total = 0
        directory = self._dir(domain)
        try:
            with os.scandir(directory) as it:
                for e in it:
                    if _valid_id(e.name):
                        try:
                            total += e.stat().st_size
                            count += 1
                        except OSError:
                            pass
        except FileNotFoundError:
            pass
        with self._usage_guard:
            self._usage[domain] = [count, total, now]
        return count, total

    def _count_added(self, domain: str, size: int, count: int = 1) -> None:
        with self._usage_guard:
            entry = self._usage.get(domain)
            if entry:
                entry[0] += count
                entry[1] += size


def _mkdirs_private(*paths: str) -> None:
    """Create each directory 0700 (os.makedirs gives only the last one the mode asked for)."""
    for path in paths:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass


def _listdir(path: str) -> List[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
