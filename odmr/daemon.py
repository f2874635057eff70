"""Running the provider as a process: logging, privileges, detaching, pid file, signals.

Start-up order (why it matters):

1. read the configuration and users file, decide where logs go;
2. refuse early: bad config, root without `user`, a live pid file;
3. bind the listening sockets (may need root: ports 25 and 366);
4. detach (unless -f): double fork; the original process stays around and
   waits on a pipe until the grandchild reports "ready" or its one-line error,
   so `odmrd serve` exits 0 only once the daemon really runs;
5. open the log file and the pid file (as root: they may live in /var/log and
   /run), then drop privileges for good, then touch the spool;
6. start serving; signal handlers only record the signal, the main loop acts.
"""
from __future__ import annotations

import errno
import fcntl
import grp
import logging
import logging.handlers
import os
import select
import signal
import socket
import stat
import sys
import time
from typing import List, Optional, Tuple

from odmr import config as config_mod
from odmr.config import Settings
from odmr import ports
from odmr.exits import (EX_CANTCREAT, EX_CONFIG, EX_NOPERM, EX_OK, EX_OSERR,
                         EX_SOFTWARE, EX_TEMPFAIL, EX_UNAVAILABLE, leave_forked_process)
from odmr.logline import DaemonLineFormatter
from odmr.server import Service, StartupError

log = logging.getLogger("odmrd")


SYSLOG_SOCKETS = ("/dev/log", "/var/run/log", "/var/run/syslog")
DEFAULT_LOG_FILE = "/var/log/odmrd.log"
STARTUP_TIMEOUT = 60.0      # seconds the foreground parent waits for the daemon's report


class DaemonError(Exception):
    """Start-up failed: a one-line message for the operator and a sysexits code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# -- logging -----------------------------------------------------------------

class _LogFile(logging.handlers.WatchedFileHandler):
    """Append-only log file, reopened after rotation; never follows a symlink."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._reopen_if_rotated()
        except OSError:
            pass                        # keep the old file: a log line must never fail a session
        if self.stream is not None:
            logging.FileHandler.emit(self, record)

    def _reopen_if_rotated(self) -> None:
        """Like WatchedFileHandler.reopenIfNeeded, but the old stream is kept until a new
        one is open: after dropping privileges the file may not be re-creatable."""
        try:
            st = os.stat(self.baseFilename)
            if (st.st_dev, st.st_ino) == (self.dev, self.ino):
                return
        except FileNotFoundError:
            pass
        new = self._open()
        old, self.stream = self.stream, new
        self._statstream()
        if old is not None:
            old.close()

    def _open(self):
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) \
            | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.baseFilename, flags, 0o640)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")


def syslog_handler() -> Optional[logging.Handler]:
    """A handler for facility mail on the local syslog socket; None if nothing listens."""
    for path in SYSLOG_SOCKETS:
        try:
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                continue
            return logging.handlers.SysLogHandler(address=path,
                                                  facility=logging.handlers.SysLogHandler.LOG_MAIL)
        except OSError:
            continue
    return None


def fallback_log_file(settings: Settings) -> str:
    """Where a detached daemon logs without syslog: `log_file`, /var/log/odmrd.log, or beside the pid file."""
    if settings.log_file:
        return settings.log_file
    if os.path.isdir(os.path.dirname(DEFAULT_LOG_FILE)) and os.access(os.path.dirname(DEFAULT_LOG_FILE), os.W_OK):
        return DEFAULT_LOG_FILE
    return os.path.join(os.path.dirname(settings.pid_file), "odmrd.log")


def log_target(settings: Settings, foreground: bool) -> Tuple[str, str]:
    """Decide where logs go: ("stderr", ""), ("syslog", "") or ("file", path)."""
    wants_syslog = settings.syslog == "yes" or (settings.syslog == "auto" and not foreground)
    if wants_syslog:
        probe = syslog_handler()
        if probe is not None:
            probe.close()
            return "syslog", ""
    if foreground:
        return "stderr", ""
    return "file", fallback_log_file(settings)


def setup_logging(level: str, target: Tuple[str, str],
                  owner: Optional[Tuple[int, int]] = None) -> None:
    """Install the one root handler for `target`; `owner` gets a log file we create as root."""
    # what the line format never shows is not worth collecting for every record
    # (the logging HOWTO's "Optimization" table): the caller's frame and thread
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False            # DaemonLineFormatter fills in the cached pid
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level.upper())
    kind, path = target
    handler: Optional[logging.Handler] = None
    if kind == "syslog":
        handler = syslog_handler()
        if handler is not None:
            handler.setFormatter(DaemonLineFormatter("odmrd[%(process)d]: %(message)s"))
        else:  # the socket vanished between the probe and now
            kind, path = "stderr", ""
    if kind == "file":
        try:
            handler = _LogFile(path, encoding="utf-8")
        except OSError as exc:
            raise DaemonError(EX_CANTCREAT, "cannot open log file %s: %s"
                              % (path, exc.strerror or exc)) from None
        st = os.fstat(handler.stream.fileno())
        if owner is not None and st.st_uid == 0 and st.st_nlink == 1:
            try:
                os.fchown(handler.stream.fileno(), owner[0], owner[1])
            except OSError:
                pass
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
    if not isinstance(handler, logging.handlers.SysLogHandler):
        handler.setFormatter(DaemonLineFormatter(
            "%(asctime)s odmrd[%(process)d]: %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)


# -- privileges ----------------------------------------------------------------

class Account:
    """The service account to become after binding."""

    def __init__(self, name: str, uid: int, gid: int, groups: List[int]):
        self.name, self.uid, self.gid, self.groups = name, uid, gid, groups


def _user_entry(settings):
    import pwd
    try:
        return pwd.getpwnam(settings.user)
    except KeyError:
        raise DaemonError(EX_CONFIG, "user %r (in %s) does not exist"
                          % (settings.user, settings.path)) from None


def account_problem(settings: Settings) -> Optional[str]:
    """What `serve` would refuse about the service account, also asked when not root
    (check-config: the init script starts the daemon as root)."""
    try:
        if settings.user:
            _user_entry(settings)
        service_account(settings)
    except DaemonError as exc:
        return str(exc)
    return None


def service_account(settings: Settings) -> Optional[Account]:
    """The account to drop to, None to stay as we are; refuses root without `user`."""
    if os.geteuid() != 0:
        return None
    if settings.user:
        entry = _user_entry(settings)
        if entry.pw_uid != 0:
            try:
                groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
            except OSError:
                groups = [entry.pw_gid]
            return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)
    if settings.allow_root:
        return None
    raise DaemonError(EX_CONFIG, "refusing to run as root: set 'user' (the service account) "
                                 "or 'allow_root = yes' in %s" % settings.path)


def _allowed(path: str, uid: int, groups: List[int], need: int) -> bool:
    """`need` (rwx bits, 0o4 0o2 0o1) on `path` itself and search on every directory above,
    by mode bits: asked as root for the service account before it exists as a process
    (check-config), so os.access cannot answer. ACLs are not consulted."""
    if uid == 0:
        return os.path.exists(path)
    return _blocker(path, uid, groups, need) is None


def _blocker(path: str, uid: int, groups: List[int], need: int) -> Optional[str]:
    """The first of `path`'s directories (or `path` itself) that refuses `uid` access."""
    path = os.path.abspath(path)
    for step, bits in [(d, 0o1) for d in _parents(path)] + [(path, need)]:
        try:
            st = os.stat(step)
        except OSError:
            return step
        shift = 6 if st.st_uid == uid else 3 if st.st_gid in groups else 0
        if (st.st_mode >> shift) & bits != bits:
            return step
    return None


def spool_problems(settings: Settings, account: Optional[Account]) -> List[str]:
    """What keeps the account the daemon runs as from using the spool, each naming the
    directory at fault: `serve` refuses to start on any of them, so check-config asks too."""
    uid, groups, name = _identity(account)
    root = settings.spool_dir
    if not os.path.exists(root):
        parent = os.path.dirname(os.path.abspath(root))
        if _allowed(parent, uid, groups, 0o3):
            return []
        return ["spool directory %s does not exist and %s cannot create it in %s: "
                "install -d -o %s -m 700 %s" % (root, name, parent, name, root)]
    if not os.path.isdir(root):
        return ["spool directory %s is not a directory" % root]
    if not _allowed(root, uid, groups, 0o7):
        return [_unusable(root, uid, groups, name)]
    domains = sorted(os.path.join(root, e) for e in os.listdir(root))
    return [_unusable(path, uid, groups, name) for path in domains
            if os.path.isdir(path) and not os.path.islink(path)
            and not _allowed(path, uid, groups, 0o7)]


def _unusable(path: str, uid: int, groups: List[int], name: str) -> str:
    """The fix that works: a directory above that cannot be searched is named; one the
    account owns already wants its mode back; else a chown."""
    blocker = _blocker(path, uid, groups, 0o7) or os.path.abspath(path)
    if blocker != os.path.abspath(path):
        return ("spool directory %s is not usable by %s: directory %s above it is not "
                "searchable by it: chmod o+x %s" % (path, name, blocker, blocker))
    try:
        owned = os.stat(path).st_uid == uid
    except OSError:
        owned = False
    fix = "chmod 700 %s" % path if owned else "chown -R %s %s" % (name, path)
    return "spool directory %s is not writable by %s: %s" % (path, name, fix)


def log_file_problems(settings: Settings) -> List[str]:
    """A log file whose directory is missing: `serve` (detached, without syslog) stops
    at start-up on it, so an init script's restart would take the daemon down."""
    path = settings.log_file
    if not path or os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return []
    return ["log_file %s: its directory %s does not exist (create it, or change log_file)"
            % (path, os.path.dirname(os.path.abspath(path)))]


def listen_problems(settings: Settings, running_pid_file: Optional[str] = None) -> List[str]:
    """Listen addresses this host does not have, or that another program holds: binding
    them fails after a restart has already stopped the running daemon (the one holding
    the configured pid file, or `running_pid_file`, which it was started with)."""
    try:
        daemon_pid = PidFile(running_pid_file or settings.pid_file).holder()
    except DaemonError:
        daemon_pid = -1                 # cannot tell: a taken port is nobody's we know
    problems = []
    for where, (host, port) in _addresses(settings):
        reason = _not_local(host)
        if reason:
            problems.append("%s: %s is not an address of this host (%s)" % (where, host, reason))
        elif ports.held_by_another(host, port, daemon_pid):
            problems.append("%s: %s is in use by another program (ss -ltnp 'sport = :%d' "
                            "names it)" % (where, _label(host, port), port))
    return problems


def pid_file_problems(settings: Settings) -> List[str]:
    """A pid file `serve` could neither write nor make the directory of (it runs as the
    caller until the pid file is written)."""
    path = os.path.abspath(settings.pid_file)
    directory = os.path.dirname(path)
    kind = _not_a_plain_file(path)
    if kind:
        return ["pid file %s: %s, not a file (serve would refuse it)" % (path, kind)]
    if os.path.isdir(directory):
        target = path if os.path.lexists(path) else directory
        if os.access(target, os.W_OK):
            return []
        return ["pid file %s: uid %d cannot write %s" % (path, os.geteuid(), target)]
    existing = directory
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return ["pid file %s: %s is not a directory" % (path, existing)]
    if os.access(existing, os.W_OK | os.X_OK):
        return []
    return ["pid file %s: its directory %s does not exist and uid %d cannot create it in %s"
            % (path, directory, os.geteuid(), existing)]


def _not_a_plain_file(path: str) -> str:
    """What is in the way at `path` ("a directory", "a symbolic link"...), or "" when
    nothing or a regular file is there."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "a directory" if stat.S_ISDIR(mode) else "a special file"


def _addresses(settings) -> List[Tuple[str, Tuple[str, int]]]:
    """Every address `serve` binds, each with the setting that names it."""
    found = [("[%s] %s" % (name, key), address)
             for name, section in (("odmr", settings.odmr), ("smtp", settings.smtp))
             for key in ("listen", "tls_listen") for address in getattr(section, key, ())]
    if settings.metrics.listen is not None:
        found.append(("[metrics] listen", settings.metrics.listen))
    return found


def _label(host: str, port: int) -> str:
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def _not_local(host: str) -> Optional[str]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except socket.gaierror as exc:
        return exc.strerror
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            return exc.strerror
    return None


def _identity(account: Optional[Account]) -> Tuple[int, List[int], str]:
    if account is None:
        return os.getuid(), [os.getgid()] + os.getgroups(), "uid %d" % os.getuid()
    return account.uid, [account.gid] + list(account.groups), account.name


def _parents(path: str) -> List[str]:
    parents = []
    head = os.path.dirname(path)
    while head and head not in parents:
        parents.append(head)
        if head == os.path.dirname(head):
            break
        head = os.path.dirname(head)
    return list(reversed(parents))


def files_the_service_reads(settings: Settings) -> List[Tuple[str, str]]:
    """(path, what) of every file a reload reads again, after privileges are dropped."""
    from odmr.accounts import secret_path
    files = [(settings.path, "configuration file"), (settings.users_file, "users file"),
             (secret_path(settings.users_file), "users file's secret")]
    for attr, what in (("cert_file", "TLS certificate"), ("key_file", "TLS key"),
                       ("client_ca_file", "TLS client CA file")):
        path = getattr(settings.tls, attr)
        if path:
            files.append((path, "%s ([tls] %s)" % (what, attr)))
    return files


def unreadable_problems(settings: Settings, account: Optional[Account]) -> List[str]:
    """One line per file the service account could not read, with the fix: the daemon
    would start (root reads them before dropping privileges), but every reload would fail."""
    uid, groups, name = _identity(account)
    problems = []
    for path, what in files_the_service_reads(settings):
        if not os.path.exists(path) or _allowed(path, uid, groups, 0o4):
            continue
        blocker = _blocker(path, uid, groups, 0o4) or path
        if blocker == os.path.abspath(path):
            fix = _read_fix(path, what, account)
        else:
            fix = "directory %s is not searchable by %s: %s" % (blocker, name,
                                                                 _search_fix(blocker, account))
        problems.append("%s %s is not readable by %s, so every reload would fail: %s"
                        % (what, path, name, fix))
    return problems


def _search_fix(directory: str, account: Optional[Account]) -> str:
    if account is None:
        return "chmod o+x %s" % directory
    return "chgrp %s %s && chmod g+x %s" % (_group_name(account), directory, directory)


def _group_name(account: Account) -> str:
    try:
        return grp.getgrgid(account.gid).gr_name
    except KeyError:
        return str(account.gid)


def _read_fix(path: str, what: str, account: Optional[Account]) -> str:
    if account is None:
        return "make it readable by that user"
    if what.startswith("users file"):           # it must stay 0600: give it to the account
        return "chown %s %s" % (account.name, path)
    return "chgrp %s %s && chmod g+r %s" % (_group_name(account), path, path)


def drop_privileges(account: Account) -> None:
    """Become `account` for good (groups, gid, uid; real, effective and saved)."""
    try:
        os.setgroups(account.groups)
        if hasattr(os, "setresgid"):
            os.setresgid(account.gid, account.gid, account.gid)
            os.setresuid(account.uid, account.uid, account.uid)
        else:  # pragma: no cover - platforms without setres*id
            os.setgid(account.gid)
            os.setuid(account.uid)
    except OSError as exc:
        raise DaemonError(EX_NOPERM, "cannot become %s: %s" % (account.name, exc.strerror)) from None
    try:
        os.setuid(0)
    except OSError:
        return
    raise DaemonError(EX_NOPERM, "privileges could not be dropped permanently")


# -- pid file --------------------------------------------------------------------

def read_pid_file(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class PidFile:
    """The pid file, flock'ed for the daemon's lifetime.

    The lock (not the number inside) says whether a daemon runs, so a stale
    file whose pid was reused by another process is recognised as stale.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd: Optional[int] = None

    def holder(self) -> Optional[int]:
        """The pid of a live daemon holding this pid file, or None."""
        try:
            # O_NONBLOCK: a FIFO in its place must not hang `check-config` or `serve`
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DaemonError(EX_CANTCREAT, "pid file %s: %s" % (self.path, exc.strerror)) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return read_pid_file(self.path) or -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def check(self) -> None:
        pid = self.holder()
        if pid is not None:
            raise DaemonError(EX_CANTCREAT, "already running%s (pid file %s)"
                              % (" with pid %d" % pid if pid > 0 else "", self.path))

    def claim(self, owner: Optional[Tuple[int, int]] = None) -> None:
        """Lock the file and write our pid; replace a stale one; refuse if a daemon holds it."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        self._make_directory()
        for _ in range(10):
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as exc:
                raise DaemonError(EX_CANTCREAT, "cannot write pid file %s: %s"
                                  % (self.path, exc.strerror)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.check()
                continue
            mine = os.fstat(fd)
            try:
                there = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            if there is None or (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)        # the previous holder removed it as we opened it
                continue
            if not stat.S_ISREG(mine.st_mode):
                os.close(fd)
                raise DaemonError(EX_CANTCREAT, "pid file %s is not a regular file" % self.path)
            os.ftruncate(fd, 0)
            os.write(fd, b"%d\n" % os.getpid())
            os.fchmod(fd, 0o644)
            # stays root's: a service account able to rewrite it could make root's
            # init script signal any process
            self.fd = fd
            return
        raise DaemonError(EX_CANTCREAT, "cannot lock pid file %s" % self.path)

    def _make_directory(self) -> None:
        """/run is emptied at boot: make the pid file's directory as an init script
        would (root's, 755: the service account must not be able to forge the file)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, 0o755, exist_ok=True)
        except OSError as exc:
            raise DaemonError(EX_CANTCREAT, "cannot create the pid file's directory %s: %s"
                              % (directory, exc.strerror)) from None

    def release(self) -> None:
        """Remove the pid file; if its directory is not ours to write, leave it empty."""
        if self.fd is None:
            return
        try:
            there = os.stat(self.path, follow_symlinks=False)
            mine = os.fstat(self.fd)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = None


# -- signals and the main loop ---------------------------------------------------

class Signals:
    """SIGTERM, SIGINT and SIGHUP are blocked in every thread and taken with sigtimedwait.

    Blocked before the first thread starts, so every thread inherits the mask
    and the kernel keeps them pending for the main loop: no handler runs
    service code, and none can be lost to a thread that is not listening.
    """

    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def install(self) -> None:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        for signum in self.HANDLED:     # undo an inherited SIG_IGN (nohup, shells' & jobs)
            signal.signal(signum, _ignore_unblocked)
        signal.pthread_sigmask(signal.SIG_BLOCK, self.HANDLED)

    def next(self, timeout: float) -> Optional[int]:
        info = signal.sigtimedwait(self.HANDLED, timeout)
        return info.si_signo if info is not None else None


def _ignore_unblocked(signum, frame) -> None:
    """Only reached if a signal slips past the mask; the main loop owns them."""


def run_until_stopped(service: Service, signals: Signals, pidfile: PidFile) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code (0)."""
    while True:
        signum = signals.next(60.0)
        if signum is None:
            continue
        if signum == signal.SIGHUP:
            log.info("SIGHUP: reloading configuration, users and certificates")
            try:
                service.reload()
            except Exception:  # a bug in reload must not take the service down
                log.exception("reload failed; keeping the running configuration")
            continue
        log.info("%s: stopping (grace period %ds)", signal.Signals(signum).name,
                 service.settings.grace_period)
        left = service.stop(service.settings.grace_period)
        if left:
            log.warning("stopped with %d sessions still open after the grace period", left)
        pidfile.release()
        log.info("odmrd stopped")
        return EX_OK


# -- start-up ----------------------------------------------------------------------

def _start_serving(service: Service, target: Tuple[str, str], account: Optional[Account],
                   pidfile: PidFile, private_fds: Tuple[int, ...] = ()) -> None:
    """Steps 5 and 6 of the start-up: log file, pid file, drop privileges, spool, listen.
    `private_fds` (the start-up report's pipe) and the pid file stay out of intake workers."""
    settings = service.settings
    owner = (account.uid, account.gid) if account else None
    setup_logging(settings.log_level, target, owner)
    pidfile.claim(owner)
    if account is not None:
        drop_privileges(account)
        log.info("running as %s (uid %d)", account.name, account.uid)
    unreadable = unreadable_problems(settings, account)
    if unreadable:
        raise DaemonError(EX_NOPERM, unreadable[0])
    problems = spool_problems(settings, account)     # check-config asks the same
    if problems:
        raise DaemonError(EX_CANTCREAT, problems[0])
    try:
        service.prepare_spool()
    except StartupError as exc:
        raise DaemonError(EX_CANTCREAT, str(exc)) from None
    try:
        service.open_control()              # `odmrd status`: bound now, served once started
    except StartupError as exc:
        raise DaemonError(EX_CANTCREAT, str(exc)) from None
    try:
        service.start(settings.smtp.workers,
                      [pidfile.fd] + list(private_fds) + service.monitoring_fds())
    except StartupError as exc:
        raise DaemonError(EX_UNAVAILABLE, str(exc)) from None


def serve(config_path: str, foreground: bool) -> int:
    """`odmrd serve [-f]`: returns the exit code (0 once serving, or after a clean stop)."""
    os.umask(0o077)
    if not foreground:
        _close_inherited()      # before anything of ours is open: only stdio survives
    try:
        service = Service(config_path)
    except config_mod.ConfigError as exc:
        for line in exc.lines(config_path):
            print("odmrd: %s" % line, file=sys.stderr)
        return EX_CONFIG
    except StartupError as exc:
        print("odmrd: %s" % exc, file=sys.stderr)
        return EX_CONFIG
    settings = service.settings
    target = log_target(settings, foreground)
    pidfile = PidFile(settings.pid_file)
    _preload()
    try:
        account = service_account(settings)
        pidfile.check()
        try:
            service.bind()
        except StartupError as exc:
            raise DaemonError(EX_OSERR, str(exc)) from None
    except DaemonError as exc:
        service.close()
        print("odmrd: %s" % exc, file=sys.stderr)
        return exc.code
    if target[0] == "file" and settings.syslog != "no":
        print("odmrd: no syslog socket (%s); logging to %s"
              % (", ".join(SYSLOG_SOCKETS), target[1]), file=sys.stderr)
    signals = Signals()
    if foreground:
        signals.install()
        try:
            _start_serving(service, target, account, pidfile)
        except DaemonError as exc:
            service.close()
            pidfile.release()
            print("odmrd: %s" % exc, file=sys.stderr)
            return exc.code
        log.info("odmrd started in the foreground (pid %d)", os.getpid())
        return run_until_stopped(service, signals, pidfile)
    return _detach_and_serve(service, target, account, pidfile, signals)


def _preload() -> None:
    """Import every odmr module now, not lazily later.

    Run from the zipapp, a later import reads the archive again; if the file
    was replaced by an upgrade meanwhile, that read would fail mid-service.
    """
    import importlib
    import pkgutil
    import odmr
    for module in pkgutil.iter_modules(odmr.__path__):
        if module.name in ("__main__", "build"):
            continue
        try:
            importlib.import_module("odmr." + module.name)
        except Exception as exc:  # the import will fail again, and be reported, where it is used
            log.debug("preloading odmr.%s failed: %s", module.name, str(exc))


def _detach_and_serve(service: Service, target: Tuple[str, str], account: Optional[Account],
                      pidfile: PidFile, signals: Signals) -> int:
    """Double fork; the caller's process returns the daemon's start-up verdict."""
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    child = os.fork()
    if child:
        os.close(wfd)
        service.close()     # our copies only; the daemon keeps its own
        code, message = _await_report(rfd, child)
        if message:
            print("odmrd: %s" % message, file=sys.stderr)
        return code
    os.close(rfd)
    code = EX_SOFTWARE
    try:
        _detach()
        signals.install()
        code = _serve_detached(service, target, account, pidfile, signals, wfd)
    except BaseException as exc:  # never return into the caller's code in the daemon
        try:
            log.exception("odmrd: fatal error")
            _report(wfd, EX_SOFTWARE, "internal error: %s: %s" % (type(exc).__name__, exc))
            pidfile.release()
        except BaseException:
            pass
    finally:
        leave_forked_process(code)


def _detach() -> None:
    """The first child's part: a new session, then a grandchild that no terminal can
    ever reach, in / with its standard descriptors on /dev/null."""
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    os.umask(0o077)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _serve_detached(service: Service, target: Tuple[str, str], account: Optional[Account],
                    pidfile: PidFile, signals: Signals, report_fd: int) -> int:
    """Start serving, tell the caller waiting on `report_fd` how that went, then serve
    until stopped. Returns the daemon's exit code."""
    try:
        _start_serving(service, target, account, pidfile, (report_fd,))
    except DaemonError as exc:
        log.error("%s", str(exc))
        _report(report_fd, exc.code, str(exc))
        service.close()
        pidfile.release()
        return exc.code
    log.info("odmrd started (pid %d)", os.getpid())
    _report(report_fd, EX_OK, "ready")
    return run_until_stopped(service, signals, pidfile)


def _close_inherited() -> None:
    """Close descriptors above stdio that a caller leaked (its pipes would never see EOF)."""
    try:
        limit = os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        limit = 65536
    os.closerange(3, limit if limit > 3 else 65536)


def _report(fd: int, code: int, message: str) -> None:
    """Tell the waiting parent how start-up went (once; then the pipe is closed)."""
    try:
        os.write(fd, ("%d %s\n" % (code, message.replace("\n", " "))).encode("utf-8", "replace"))
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


def _await_report(fd: int, child: int) -> Tuple[int, str]:
    """Read the daemon's "<code> <message>" line: (0, "") when it runs, else its error."""
    data = b""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                return EX_TEMPFAIL, ("the daemon did not report back within %ds; see its log"
                                     % STARTUP_TIMEOUT)
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
        try:
            os.waitpid(child, 0)
        except ChildProcessError:
            pass
    line = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    code_text, _, message = line.partition(" ")
    if not code_text.isdigit():
        return EX_SOFTWARE, "the daemon exited during start-up; see its log"
    code = int(code_text)
    return (EX_OK, "") if code == EX_OK else (code, message)
