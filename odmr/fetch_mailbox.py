"""Local mailboxes for `odmrd fetch --maildir/--mbox`: durable before we say 250.

Both take the message as CRLF text pieces (what `wire.iter_data` yields) and
store LF line endings, as every local mail reader expects.

- Maildir: write tmp/<unique>, fsync, rename into new/, fsync new/. A crash
  leaves at worst a stray file in tmp/, never a half message in new/.
- mbox (mboxrd): the message is staged first, so the mailbox is locked only
  while appending, not while the provider is sending. Locking is a `.lock`
  dotfile (for mail readers that only know that) plus an fcntl lock; a
  `From ` separator line; lines matching `>*From ` get one more `>`; fsync;
  on any failure the file is truncated back to where it was.

This module knows nothing of SMTP or sockets.
"""
from __future__ import annotations

import errno
import itertools
import os
import re
import socket
import tempfile
import time
from typing import List, Optional

from odmr.durable import fsync_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore

LOCK_WAIT = 30.0                # how long to wait for a busy mbox
STALE_DOTLOCK = 300.0           # a .lock older than this is a leftover of a crash
STAGE_IN_MEMORY = 4 * 1024 * 1024

_counter = itertools.count(1)
_FROM = re.compile(rb"^(>*From )", re.M)
_FROM_PREFIX = re.compile(rb">{0,4096}(?:F|Fr|Fro|From)?")


class StorageError(Exception):
    """The message could not be stored; the session answers 452 4.3.1.

    `disk_full` says the filesystem (or the quota) ran out of room: the
    run's summary then says so once, instead of a failure per message."""

    def __init__(self, message: str, cause: Optional[OSError] = None):
        super().__init__(message)
        self.disk_full = cause is not None and cause.errno in _FULL


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _lf(piece: bytes) -> bytes:
    return piece.replace(b"\r\n", b"\n")


class MailboxWriter:
    """One message on its way into a mailbox: write() pieces, then commit() or abort()."""

    def write(self, piece: bytes) -> None:
        raise NotImplementedError

    def commit(self) -> str:
        """Make the message durable; return where it went."""
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class Mailbox:
    """Somewhere to deliver messages to."""

    path = ""

    def begin(self, sender: str, header: bytes) -> MailboxWriter:
        """Start a message; `header` (CRLF lines) goes in front of it."""
        raise NotImplementedError

    def free_bytes(self) -> Optional[int]:
        """Space left for us on the mailbox's filesystem, if known."""
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)) or "/")
        except OSError:
            return None
        return st.f_bavail * st.f_frsize


# -- Maildir -----------------------------------------------------------------

class Maildir(Mailbox):
    def __init__(self, path: str):
        self.path = path
        self.host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
        self._ready = False

    def free_bytes(self) -> Optional[int]:
        try:
            st = os.statvfs(self.path if os.path.isdir(self.path) else
                            os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def prepare(self) -> None:
        """Create the Maildir (and its parents) if missing."""
        if self._ready:
            return
        try:
            created = not os.path.isdir(self.path)
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            for sub in ("tmp", "new", "cur"):
                if not os.path.isdir(os.path.join(self.path, sub)):
                    os.mkdir(os.path.join(self.path, sub), 0o700)
                    created = True
            if created:
                fsync_dir(self.path)
                fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError as exc:
            raise StorageError("cannot create Maildir %s: %s" % (self.path, exc.strerror or exc), exc) from None
        self._ready = True

    def unique_name(self) -> str:
        now = time.time()
        return "%d.M%06dP%dQ%d.%s" % (int(now), int((now % 1) * 1e6), os.getpid(),
                                      next(_counter), self.host)

    def begin(self, sender: str, header: bytes) -> MailboxWriter:
        self.prepare()
        for _ in range(5):
            name = self.unique_name()
            tmp = os.path.join(self.path, "tmp", name)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise StorageError("cannot create %s: %s" % (tmp, exc.strerror or exc), exc) from None
            writer = _MaildirWriter(self, name, tmp, fd)
            try:
                writer.write(header)
            except BaseException:
                writer.abort()
                raise
            return writer
        raise StorageError("cannot find a unique file name in %s/tmp" % self.path)


class _MaildirWriter(MailboxWriter):
    def __init__(self, box: Maildir, name: str, tmp: str, fd: int):
        self.box = box
        self.name = name
        self.tmp = tmp
        self.file = os.fdopen(fd, "wb", buffering=256 * 1024)

    def write(self, piece: bytes) -> None:
        try:
            self.file.write(_lf(piece))
        except OSError as exc:
            raise StorageError("write to %s failed: %s" % (self.tmp, exc.strerror or exc), exc) from None

    def commit(self) -> str:
        final = os.path.join(self.box.path, "new", self.name)
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.rename(self.tmp, final)
            fsync_dir(os.path.join(self.box.path, "new"))
        except OSError as exc:
            self.abort()
            raise StorageError("cannot deliver into %s: %s" % (self.box.path, exc.strerror or exc),
                               exc) from None
        return final

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


# -- mbox ----------------------------------------------------------------------

def from_line(sender: str, when: Optional[float] = None) -> bytes:
    """The mbox separator: `From sender asctime-date`."""
    who = "".join("_" if c.isspace() else c for c in sender) or "MAILER-DAEMON"
    return ("From %s %s\n" % (who, time.asctime(time.localtime(when)))).encode("utf-8", "replace")


def quote_from(text: bytes, at_line_start: bool) -> bytes:
    """mboxrd: '>' in front of every line matching `>*From ` (LF text)."""
    if at_line_start:
        return _FROM.sub(rb">\1", text)
    cut = text.find(b"\n")
    if cut < 0:
        return text
    return text[:cut + 1] + _FROM.sub(rb">\1", text[cut + 1:])


class Mbox(Mailbox):
    def __init__(self, path: str):
        self.path = path

    def begin(self, sender: str, header: bytes) -> MailboxWriter:
        try:
            stage = tempfile.SpooledTemporaryFile(max_size=STAGE_IN_MEMORY,
                                                  dir=os.path.dirname(os.path.abspath(self.path)))
        except OSError as exc:
            raise StorageError("cannot stage a message for %s: %s" % (self.path, exc), exc) from None
        writer = _MboxWriter(self, sender, stage)
        writer.write(header)
        return writer


class _MboxWriter(MailboxWriter):
    def __init__(self, box: Mbox, sender: str, stage):
        self.box = box
        self.sender = sender
        self.stage = stage
        self.at_line_start = True
        self.last = b"\n"
        self.held = b""             # a line start that may yet become `>*From `

    def write(self, piece: bytes) -> None:
        if not piece:
            return
        text = self.held + _lf(piece)
        self.held = b""
        cut = text.rfind(b"\n") + 1
        tail_starts_line = cut > 0 or self.at_line_start
        if tail_starts_line and _FROM_PREFIX.fullmatch(text[cut:]):
            # `From` may be cut between two pieces: decide when the line goes on
            text, self.held = text[:cut], text[cut:]
        self._stage(text)

    def _stage(self, text: bytes) -> None:
        if not text:
            return
        text = quote_from(text, self.at_line_start)
        try:
            self.stage.write(text)
        except OSError as exc:
            raise StorageError("cannot stage message: %s" % (exc.strerror or exc), exc) from None
        self.at_line_start = text.endswith(b"\n")
        self.last = text[-1:]

    def commit(self) -> str:
        path = self.box.path
        held, self.held = self.held, b""
        self._stage(held)
        try:
            with _MboxLock(path) as fd:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    self._append(fd, start)
                    os.fsync(fd)
                except BaseException:           # also Ctrl-C / SIGTERM mid-append: no half message
                    try:
                        os.ftruncate(fd, start)
                        os.fsync(fd)
                    except OSError:
                        pass
                    raise
        except OSError as exc:
            raise StorageError("cannot append to %s: %s" % (path, exc.strerror or exc), exc) from None
        finally:
            self.stage.close()
        return path

    def _append(self, fd: int, start: int) -> None:
        separator = b""
        if start > 0:
            # A well-formed mbox ends with an empty line; make sure ours starts a new one.
            tail = os.pread(fd, 2, max(0, start - 2))
            if tail.endswith(b"\n\n"):
                separator = b""
            elif tail.endswith(b"\n"):
                separator = b"\n"
            else:
                separator = b"\n\n"
        _write_all(fd, separator + from_line(self.sender))
        self.stage.seek(0)
        while True:
            chunk = self.stage.read(256 * 1024)
            if not chunk:
                break
            _write_all(fd, chunk)
        _write_all(fd, b"\n" if self.last == b"\n" else b"\n\n")

    def abort(self) -> None:
        try:
            self.stage.close()
        except OSError:
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _MboxLock:
    """Dotlock, then an fcntl lock, on an mbox opened for appending."""

    def __init__(self, path: str):
        self.path = path
        self.dotlock = path + ".lock"
        self.have_dotlock = False
        self.fd = -1

    def __enter__(self) -> int:
        deadline = time.monotonic() + LOCK_WAIT
        self._take_dotlock(deadline)
        try:
            created = not os.path.exists(self.path)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            if created:
                fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            while True:
                try:
                    fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except BaseException:
            self.__exit__()
            raise
        return self.fd

    def _take_dotlock(self, deadline: float) -> None:
        while True:
            try:
                fd = os.open(self.dotlock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                try:
                    if time.time() - os.stat(self.dotlock).st_mtime > STALE_DOTLOCK:
                        os.unlink(self.dotlock)
                        continue
                except FileNotFoundError:
                    continue
                if time.monotonic() > deadline:
                    raise OSError(errno.EAGAIN, "mailbox is locked (%s)" % self.dotlock) from None
                time.sleep(0.05)
                continue
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EROFS):
                    return      # no write access to the directory: rely on the fcntl lock
                raise
            try:
                os.write(fd, b"%d\n" % os.getpid())
            finally:
                os.close(fd)
            self.have_dotlock = True
            return

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)       # closing drops the fcntl lock
            except OSError:
                pass
            self.fd = -1
        if self.have_dotlock:
            try:
                os.unlink(self.dotlock)
            except OSError:
                pass
            self.have_dotlock = False


def open_mailbox(maildir: str = "", mbox: str = "") -> Mailbox:
    """The mailbox named by --maildir or --mbox."""
    if maildir:
        box = Maildir(maildir)
        box.prepare()
        return box
    return Mbox(mbox)


__all__: List[str] = ["StorageError", "Mailbox", "Maildir", "Mbox", "MailboxWriter",
                      "open_mailbox", "from_line", "quote_from"]
