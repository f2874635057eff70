"""The control socket: `odmrd status` asks the running daemon what it is doing.

A UNIX socket in the spool directory, one per node sharing the spool, named
after the node (`<spool>/.control.<nodename>`), mode 0600 and owned by the
service account; the server answers only peers running as that account or as
root (SO_PEERCRED), anyone else is hung up on without a byte. One request
line (`status`), one JSON line back, built from what the daemon keeps in
memory (its `metrics.ServiceMetrics`: activity and backlog): never a spool scan.

Nothing is followed through a link: a link (or any non-socket) where the socket
belongs stops the start-up; a socket nobody answers on is a crashed daemon's
and is replaced; a clean stop removes ours (only if the name still is ours).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import stat
import struct
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional

from odmr import qshape
from odmr.metrics import ServiceMetrics
from odmr.exits import LSB_NOT_RUNNING, LSB_UNKNOWN

log = logging.getLogger("odmrd.control")

REQUEST = b"status"
MAX_REPLY = 16 * 1024 * 1024
_SUN_PATH_MAX = 100            # sun_path is 108 bytes; longer paths are bound via /proc/self/fd



class ControlError(Exception):
    """A one-line message for the operator; `code` is the LSB status code for the client."""

    def __init__(self, message: str, code: int = LSB_UNKNOWN):
        super().__init__(message)
        self.code = code


class ControlInUse(ControlError):
    """Another live daemon of this node answers on the socket (two daemons on one spool)."""


def node_name() -> str:
    """This node's name as it may appear in a file name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname() or "localhost")[:64]
    return name.lstrip(".") or "localhost"


def socket_path(spool_root: str) -> str:
    return os.path.join(spool_root, ".control." + node_name())


class _Short:
    """The socket's path for bind/connect: through /proc/self/fd when it is too long."""

    def __init__(self, path: str):
        self.path = path
        self.fd: Optional[int] = None
        self.address = path
        if len(os.fsencode(path)) > _SUN_PATH_MAX and os.path.isdir("/proc/self/fd"):
            self.fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
            self.address = "/proc/self/fd/%d/%s" % (self.fd, os.path.basename(path))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _connect(path: str, timeout: float) -> socket.socket:
    short = _Short(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(short.address)
        return sock
    except BaseException:
        sock.close()
        raise
    finally:
        short.close()


def peer_uid(sock: socket.socket) -> Optional[int]:
    """The uid of the process at the other end (Linux); None where the OS cannot tell."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    data = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    return struct.unpack("3i", data)[1]


# -- the daemon's side ----------------------------------------------------------------
class ControlServer:
    """The socket and its thread; `describe` builds the status object."""

    def __init__(self, spool_root: str, describe: Callable[[], Dict[str, object]]):
        self.path = socket_path(spool_root)
        self.describe = describe
        self.sock: Optional[socket.socket] = None
        self._identity: Optional[tuple] = None
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def open(self) -> None:
        """Bind the socket (replacing a crashed daemon's); ControlError when it cannot be.
        Run before any other thread exists: the umask is narrowed for the bind."""
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        short = _Short(self.path)
        old_umask = os.umask(0o177)
        try:
            sock.bind(short.address)
            st = os.lstat(self.path)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise ControlError("cannot create control socket %s: %s"
                               % (self.path, exc.strerror or exc)) from None
        finally:
            os.umask(old_umask)
            short.close()
        self._identity = (st.st_dev, st.st_ino)
        self.sock = sock        # blocking: close() wakes the accept with a shutdown

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise ControlError("%s is a symbolic link where the control socket belongs; "
                               "refusing it (remove it)" % self.path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError("%s exists and is not a socket; remove it" % self.path)
        try:
            _connect(self.path, 2.0).close()
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ControlError("control socket %s: %s" % (self.path, exc.strerror or exc)) from None
        else:
            raise ControlInUse("another odmrd on this node answers on %s" % self.path)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        log.info("control: replaced the stale control socket %s", self.path)

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:             # EINVAL once close() shut the socket down
                if self._stopped.is_set():
                    return
                time.sleep(0.1)
                continue
            with conn:
                try:
                    self._answer(conn)
                except Exception:  # a bad client must never end the thread
                    log.debug("control: request failed", exc_info=True)

    def _answer(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        if uid is not None and uid not in (0, os.geteuid()):
            log.warning("control: refused a status request from uid %d", uid)
            return
        conn.settimeout(2.0)
        request = b""
        while b"\n" not in request and len(request) < 64:
            chunk = conn.recv(64)
            if not chunk:
                break
            request += chunk
        if request.strip() != REQUEST:
            conn.sendall(b'{"error": "unknown request"}\n')
            return
        conn.sendall(json.dumps(self.describe()).encode("utf-8") + b"\n")

    def close(self) -> None:
        """Stop answering and remove the socket, if the name is still ours."""
        self._stopped.set()
        if self.sock is None:
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5.0)
        self.sock.close()
        self.sock = None
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except OSError:
            pass


def report(started: float, listeners: Iterable, seen: ServiceMetrics, now: Optional[float] = None,
           elsewhere: Optional[List[Dict[str, object]]] = None) -> Dict[str, object]:
    """The `status --json` object (SPEC §2) from what the daemon keeps in memory (`seen`);
    `elsewhere`: the sessions its intake workers serve, as they listed them."""
    now = time.time() if now is None else now
    sessions = seen.activity.sessions(handed=elsewhere is None)
    if elsewhere:
        sessions = sorted(sessions + elsewhere, key=lambda s: (s["port"], s["since"]))
    return {
        "pid": os.getpid(),
        "uptime": int(max(0.0, now - started)),
        "listeners": [{"port": l.server_address[1], "address": l.server_address[0],
                       "tls": bool(l.implicit_tls)} for l in listeners],
        "sessions": sessions,
        "deliveries": seen.activity.deliveries(),
        "backlog": {q: v[0] for q, v in sorted(seen.backlog.snapshot().items(),
                                                key=lambda i: (-i[1][0], i[0]))},
    }


# -- the client's side -------------------------------------------------------------------
def query(spool_root: str, trusted_uids: Iterable[int], timeout: float = 5.0) -> Dict[str, object]:
    """Ask the daemon of this node; ControlError (with its LSB code) when that fails."""
    path = socket_path(spool_root)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ControlError("odmrd is not running (no control socket %s)" % path, LSB_NOT_RUNNING) from None
    except PermissionError:
        raise ControlError("cannot reach %s: permission denied (run as root or as the service "
                           "account)" % path) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError("%s is not a socket; refusing it" % path)
    try:
        sock = _connect(path, timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        raise ControlError("odmrd is not running (stale control socket %s)" % path, LSB_NOT_RUNNING) from None
    except PermissionError:
        raise ControlError("cannot connect to %s: permission denied (run as root or as the "
                           "service account)" % path) from None
    except OSError as exc:
        raise ControlError("cannot connect to %s: %s" % (path, exc.strerror or exc)) from None
    with sock:
        uid = peer_uid(sock)
        if uid is not None and uid not in set(trusted_uids):
            raise ControlError("%s is answered by uid %d, not by odmrd's account; ignoring it"
                               % (path, uid))
        return _exchange(sock, path)


def _exchange(sock: socket.socket, path: str) -> Dict[str, object]:
    data = b""
    try:
        sock.sendall(REQUEST + b"\n")
        while not data.endswith(b"\n") and len(data) < MAX_REPLY:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ControlError("no answer on %s: %s" % (path, exc.strerror or exc)) from None
    try:
        answer = json.loads(data.decode("utf-8"))
    except ValueError:
        raise ControlError("no usable answer on %s (refused?)" % path) from None
    if not isinstance(answer, dict) or "pid" not in answer:
        raise ControlError("unexpected answer on %s: %s" % (path, str(answer)[:200]))
    return answer


def format_report(answer: Dict[str, object], now: Optional[float] = None) -> List[str]:
    """The human-readable `odmrd status`."""
    now = time.time() if now is None else now
    lines = ["odmrd is running (pid %s, up %s)" % (answer["pid"], qshape.short_age(int(answer["uptime"])))]
    listeners = answer.get("listeners") or []
    lines.append("listening on %s" % (", ".join(
        "%s:%s%s" % ("[%s]" % l["address"] if ":" in str(l["address"]) else l["address"], l["port"],
                     " (TLS)" if l["tls"] else "") for l in listeners) or "nothing"))
    sessions = answer.get("sessions") or []
    per_port: Dict[int, int] = {}
    for s in sessions:
        per_port[s["port"]] = per_port.get(s["port"], 0) + 1
    lines.append("sessions: %s" % (", ".join("%d on port %s" % (n, p) for p, n in sorted(per_port.items()))
                                   or "none"))
    for s in sessions:
        lines.append("  %-6s %-40s %-14s since %s" % (s["port"], s["peer"], s["state"], _when(s["since"], now)))
    deliveries = answer.get("deliveries") or []
    lines.append("deliveries in progress: %s" % (len(deliveries) or "none"))
    for d in deliveries:
        lines.append("  %s to %s since %s, %d messages sent" % (
            ",".join(d["domains"]), d["peer"], _when(d["since"], now), d["messages"]))
    backlog = answer.get("backlog") or {}
    lines.append("backlog: %s" % ("%d messages in %d queues" % (sum(backlog.values()), len(backlog))
                                  if backlog else "empty"))
    for queue, count in backlog.items():
        lines.append("  %-40s %8d" % (queue, count))
    return lines


def _when(stamp, now: float) -> str:
    return "%s (%s ago)" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)),
                            qshape.short_age(int(max(0, now - stamp))))
