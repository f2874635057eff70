"""Running the provider as a process: logging, privileges, detaching, signals.

Signal handlers only record what arrived; the main loop acts on it.
"""
from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time
from typing import List, Optional

from odmr.server import Service, StartupError

log = logging.getLogger("odmrd")

EX_OK = 0
EX_OSERR = 71
EX_CANTCREAT = 73
EX_NOPERM = 77
EX_CONFIG = 78


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace("\r", "\\r").replace("\n", " | ")


def setup_logging(level: str, use_syslog: bool, log_file: str = "") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level.upper())
    if use_syslog:
        handler = _syslog_handler()
        if handler is None and not log_file:
            log_file = "/var/log/odmrd.log"
        if handler is not None:
            handler.setFormatter(_Formatter("odmrd[%(process)d]: %(message)s"))
            root.addHandler(handler)
            return
    if log_file:
        try:
            handler = logging.FileHandler(log_file)
        except OSError:
            handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s odmrd[%(process)d]: %(levelname)s %(message)s",
                                    "%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)


def _syslog_handler() -> Optional[logging.Handler]:
    """Facility mail on /dev/log (or /var/run/log on the BSDs); None if there is no syslog."""
    for path in ("/dev/log", "/var/run/log", "/var/run/syslog"):
        if os.path.exists(path):
            try:
                return logging.handlers.SysLogHandler(address=path,
                                                      facility=logging.handlers.SysLogHandler.LOG_MAIL)
            except OSError:
                continue
    return None


def drop_privileges(user: str) -> None:
    """Permanently become `user` (setgroups, setgid, setuid), or raise StartupError."""
    import grp
    import pwd
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise StartupError("user %r does not exist" % user) from None
    try:
        groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem and g.gr_gid != entry.pw_gid]
        os.setgroups([entry.pw_gid] + groups)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise StartupError("cannot become %s: %s" % (user, exc.strerror)) from None
    try:
        os.setuid(0)
    except OSError:
        return
    raise StartupError("privileges could not be dropped permanently")


def _pid_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie (PID 1 here reaps late)."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not os.path.isdir("/proc/self")


def read_pid_file(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            text = fh.read().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def claim_pid_file(path: str) -> None:
    pid = read_pid_file(path)
    if pid and pid != os.getpid() and _pid_alive(pid):
        raise StartupError("already running with pid %d (pid file %s)" % (pid, path))
    tmp = "%s.%d" % (path, os.getpid())
    try:
        with open(tmp, "w") as fh:
            fh.write("%d\n" % os.getpid())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except OSError as exc:
        raise StartupError("cannot write pid file %s: %s" % (path, exc.strerror)) from None


def remove_pid_file(path: str) -> None:
    if read_pid_file(path) == os.getpid():
        try:
            os.unlink(path)
        except OSError:
            pass


def _detach() -> None:
    """Double fork, new session, cwd /, umask 077, stdio to /dev/null."""
    if os.fork():
        os._exit(0)
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


def serve(config_path: str, foreground: bool) -> int:
    """`odmrd serve`: returns an exit code."""
    os.umask(0o077)
    try:
        service = Service(config_path)
    except StartupError as exc:
        print("odmrd: %s" % exc, file=sys.stderr)
        return EX_CONFIG
    settings = service.settings
    use_syslog = settings.syslog == "yes" or (settings.syslog == "auto" and not foreground)
    setup_logging(settings.log_level, use_syslog and not foreground, settings.log_file)
    if not foreground and settings.syslog != "no" and _syslog_handler() is None:
        print("odmrd: no syslog socket; logging to %s" % (settings.log_file or "/var/log/odmrd.log"),
              file=sys.stderr)
    try:
        if os.getuid() == 0 and not settings.user and not settings.allow_root:
            raise StartupError("refusing to run as root: set 'user' (the service account) "
                               "or 'allow_root = yes' in %s" % settings.path)
        service.bind()
        if os.getuid() == 0 and settings.user:
            drop_privileges(settings.user)
        if not foreground:
            _detach()
            setup_logging(settings.log_level, use_syslog, settings.log_file)
        service.prepare_spool()
        claim_pid_file(settings.pid_file)
    except StartupError as exc:
        service.close()
        print("odmrd: %s" % exc, file=sys.stderr)
        log.error("%s", exc)
        return EX_OSERR
    try:
        service.start()
    except StartupError as exc:
        service.close()
        remove_pid_file(settings.pid_file)
        print("odmrd: %s" % exc, file=sys.stderr)
        log.error("%s", exc)
        return EX_CANTCREAT
    return _main_loop(service)


def _main_loop(service: Service) -> int:
    pending: List[int] = []
    wake = threading.Event()

    def record(signum, frame):
        pending.append(signum)
        wake.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, record)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    log.info("odmrd started (pid %d)", os.getpid())
    while True:
        wake.wait(60.0)
        wake.clear()
        while pending:
            signum = pending.pop(0)
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading")
                service.reload()
            else:
                log.info("%s: stopping", signal.Signals(signum).name)
                left = service.stop()
                if left:
                    log.warning("stopped with %d sessions still open after the grace period", left)
                remove_pid_file(service.settings.pid_file)
                log.info("odmrd stopped")
                return EX_OK
