"""Intake worker processes (`[smtp] workers`): SMTP sessions on more than one core.

Python runs one thread at a time per process, and an intake session is mostly
short system calls, each a GIL hand-over between the session threads; ten busy
senders keep one core busy handing the lock around. With `workers = N` the
main process forks N workers right after start-up (privileges already dropped,
the spool prepared, no other thread running yet). The main process keeps
everything else: the listeners, the ODMR port, deliveries, maintenance, the pid
file and the signals.

The main process still accepts every intake connection and counts it
(`max_sessions`, `max_sessions_per_address`: exact, in one place), then hands the
descriptor to the worker with the fewest sessions over a Unix socket
(SCM_RIGHTS). The worker runs the same session code in a thread and reports the
session's end, which releases the count. Quotas stay one process's view too: a
worker asks the main process for a domain's usage (its cache, which deliveries
update) and reports each message it stores for a domain with a quota.

Control messages (SOCK_SEQPACKET, one per datagram):
    main -> worker   S <token> <listener> <ip> <port> + descriptor, R (reload),
                     T <grace> (stop: finish, then cut after grace), u <count> <bytes>
    worker -> main   D <token> (session over), A <domain> <bytes> (stored, for the quota),
                     U <domain> (its usage?), M <domain> <count> <bytes> (stored: the
                     metrics, gathered over up to METRICS_EVERY and sent at each session's end)

A worker ignores signals (the service manager signals the main process) and
stops when the main process says so or goes away (end of file on its socket).
If a worker dies, the main process releases its sessions, logs it, and serves
with the others, or in its own threads when none is left.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from odmr.exits import EX_SOFTWARE, leave_forked_process
from odmr.logline import log_as

if TYPE_CHECKING:                   # server imports this module
    from odmr.server import Listener, Service

log = logging.getLogger("odmrd")

MESSAGE_MAX = 65536     # a datagram on the control channel (a worker's session list)
MAX_LISTED = 300        # sessions a worker lists for `status`
STATUS_WAIT = 0.5       # seconds `status` waits for a worker's session list
USAGE_WAIT = 10.0       # seconds a worker waits for the main process's quota figures
CUT_WAIT = 5.0          # as in server.py: cut-off sessions get this long to record their state
METRICS_EVERY = 0.1     # seconds a worker gathers "stored" reports: one datagram, and one
                        # wake-up of the main process, per domain and interval, not per message


class _Worker:
    """The main process's view of one worker."""

    def __init__(self, index: int, pid: int, channel: socket.socket):
        self.index, self.pid, self.channel = index, pid, channel
        self.sessions: Dict[int, str] = {}      # token -> client address (counted per address)
        self.shown: Dict[int, "HandedSession"] = {}     # token -> what `status` shows of it
        self.alive = True
        self.reader: Optional[threading.Thread] = None
        self.listings: "queue.Queue[bytes]" = queue.Queue()     # answers to Q


class WorkerPool:
    """The main process's side: forks the workers, hands connections over, relays
    reloads and stops, and answers the workers' quota questions."""

    def __init__(self, service: "Service", count: int, private_fds: Sequence[int] = ()):
        self.service = service
        self.stopping = False
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._workers: List[_Worker] = []
        for index in range(count):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            main = os.getpid()
            pid = os.fork()
            if pid == 0:
                log_as(main)
                mine.close()
                _run_worker(service, theirs, index, [w.channel for w in self._workers],
                            private_fds)          # never returns
            theirs.close()
            self._workers.append(_Worker(index, pid, mine))
        for worker in self._workers:         # threads only now: every fork came before them
            worker.reader = threading.Thread(target=self._read, args=(worker,), daemon=True,
                                             name="worker-%d" % worker.index)
            worker.reader.start()
        log.info("intake: %d worker processes (pids %s)", count,
                 ", ".join(str(w.pid) for w in self._workers))

    def hand_over(self, request: socket.socket, client_address: Tuple[str, int], listener: Listener) -> bool:
        """Give an admitted connection to the least busy worker; False if none takes it."""
        ip, port = client_address[0], client_address[1]
        with self._lock:
            live = [w for w in self._workers if w.alive]
            if self.stopping or not live:
                return False
            worker = min(live, key=lambda w: len(w.sessions))
            token = next(self._tokens)
            worker.sessions[token] = ip
            worker.shown[token] = shown = HandedSession("%s:%d" % (ip, port))
        self.service.metrics.activity.session_opened(shown, listener.server_address[1])
        header = b"S %d %d %s %d" % (token, self.service.listeners.index(listener), ip.encode(), port)
        try:
            socket.send_fds(worker.channel, [header], [request.fileno()])
        except OSError as exc:
            with self._lock:
                worker.sessions.pop(token, None)
                worker.shown.pop(token, None)
            self.service.metrics.activity.session_closed(shown)
            log.warning("intake: cannot hand a connection to worker %d: %s", worker.index, str(exc))
            return False
        return True

    def _read(self, worker: _Worker) -> None:
        while True:
            try:
                data = worker.channel.recv(MESSAGE_MAX)
            except OSError:
                data = b""
            if not data:
                break
            kind, _, rest = data.partition(b" ")
            if kind == b"D":
                with self._lock:
                    ip = worker.sessions.pop(int(rest), None)
                    shown = worker.shown.pop(int(rest), None)
                self.service.metrics.activity.session_closed(shown)
                if ip is not None:
                    self.service.release("smtp", ip)
            elif kind == b"A":
                domain, size = rest.split()
                self.service.spool.count_added(domain.decode("ascii"), int(size))
            elif kind == b"q":
                worker.listings.put(rest)
            elif kind == b"M":
                domain, count, size = rest.split()
                self.service.metrics.message_received(domain.decode("ascii"), int(size), int(count))
            elif kind == b"U":
                domain, _, fresh = rest.partition(b" ")
                count, size = self.service.spool.usage(domain.decode("ascii"), fresh == b"1")
                self._send(worker, b"u %d %d" % (count, size))
        self._gone(worker)

    def _gone(self, worker: _Worker) -> None:
        with self._lock:
            worker.alive = False
            orphans = list(worker.sessions.values())
            worker.sessions.clear()
            shown, worker.shown = list(worker.shown.values()), {}
        for session in shown:
            self.service.metrics.activity.session_closed(session)
        for ip in orphans:
            self.service.release("smtp", ip)
        try:
            _, status = os.waitpid(worker.pid, 0)
        except ChildProcessError:
            status = 0
        worker.channel.close()
        if not self.stopping or status:
            log.error("intake worker %d (pid %d) ended unexpectedly (%s) with %d sessions; "
                      "the others take its share", worker.index, worker.pid, _describe(status),
                      len(orphans))

    def _send(self, worker: _Worker, message: bytes) -> None:
        try:
            worker.channel.send(message)
        except OSError:
            pass            # gone: its reader thread cleans up

    def sessions(self) -> List[Dict[str, object]]:
        """Every worker's live sessions as `status` shows them (a stuck worker's are left out)."""
        with self._lock:
            live = [w for w in self._workers if w.alive]
        for worker in live:
            while not worker.listings.empty():       # an answer that came too late last time
                worker.listings.get_nowait()
            self._send(worker, b"Q")
        found: List[Dict[str, object]] = []
        deadline = time.monotonic() + STATUS_WAIT
        for worker in live:
            try:
                found += json.loads(worker.listings.get(timeout=max(0.0, deadline - time.monotonic())))
            except (queue.Empty, ValueError):
                log.warning("intake worker %d did not list its sessions in time", worker.index)
        return found

    def reload(self) -> None:
        for worker in list(self._workers):
            if worker.alive:
                self._send(worker, b"R")

    def stop(self, grace: float) -> None:
        """Every worker ends its sessions at their next command boundary, cuts those
        still busy after `grace`, and exits."""
        with self._lock:
            self.stopping = True
        for worker in self._workers:
            if worker.alive:
                self._send(worker, b"T %f" % grace)

    def join(self, timeout: float) -> None:
        """Wait for the workers to exit; kill those that outlive `timeout`."""
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            if worker.reader is not None:
                worker.reader.join(max(0.0, deadline - time.monotonic()))
            if worker.reader is not None and worker.reader.is_alive():
                log.warning("intake worker %d (pid %d) did not stop; killing it", worker.index, worker.pid)
                try:
                    os.kill(worker.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                worker.reader.join(5.0)


class HandedSession:
    """What `status` and /metrics know of a session served by a worker."""

    handed = True               # `status` asks the worker for the session itself

    def __init__(self, peer: str):
        self.peer = peer


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "signal %d" % os.WTERMSIG(status)
    return "exit code %d" % os.waitstatus_to_exitcode(status) if status else "exit code 0"


# -- inside a worker ---------------------------------------------------------------

def _run_worker(service: "Service", channel: socket.socket, index: int, others: List[socket.socket],
                private_fds: Sequence[int]) -> None:
    """The forked child: never returns into the caller's code."""
    code = 0
    try:
        for sibling in others:
            sibling.close()
        for fd in private_fds:      # the pid file: its lock must go when the main process does
            try:
                os.close(fd)
            except OSError:
                pass
        for listener in service.listeners:
            listener.close_forked_copies()      # the main process accepts and wakes its loops
        service.workers = None
        service.echo_reload = False
        _WorkerSide(service, channel, index).run()
    except BaseException:
        code = EX_SOFTWARE
        try:
            log.exception("intake worker %d: fatal error", index)
        except BaseException:
            pass
    finally:
        leave_forked_process(code)


class _WorkerSide:
    """A worker's loop: sessions in threads, control messages from the main process."""

    def __init__(self, service: "Service", channel: socket.socket, index: int):
        self.service = service
        self.channel = channel
        self.index = index
        self._control: "queue.Queue[bytes]" = queue.Queue()
        self._answers: "queue.Queue[bytes]" = queue.Queue()
        self._ask_lock = threading.Lock()
        self._idle = threading.Condition()
        self._active = 0
        service.spool.authority = self              # the main process's figures, see the module doc
        service.metrics.forward_received = self.message_received     # counted where /metrics is served
        self._received: Dict[str, List[int]] = {}           # domain -> [messages, bytes] not sent yet
        self._received_lock = threading.Lock()
        self._received_due = threading.Event()

    def run(self) -> None:
        log.info("intake worker %d started (pid %d)", self.index, os.getpid())
        threading.Thread(target=self._read, name="control", daemon=True).start()
        threading.Thread(target=self._send_gathered, name="metrics", daemon=True).start()
        while True:
            message = self._control.get()
            if message == b"R":
                self.service.reload()
                continue
            grace = float(message[2:]) if message.startswith(b"T ") \
                else self.service.settings.grace_period          # the main process is gone
            self._stop(grace)
            return

    def _read(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.channel, MESSAGE_MAX, 1)
            except OSError:
                data, fds = b"", []
            if not data:
                self._control.put(b"")
                return
            if data.startswith(b"S ") and fds:
                self._start_session(data, fds[0])
            elif data.startswith(b"u "):
                self._answers.put(data)
            elif data == b"Q":
                listed = self.service.metrics.activity.sessions()[:MAX_LISTED]
                try:
                    self.channel.send(b"q " + json.dumps(listed).encode("utf-8"))
                except OSError:
                    pass
            else:
                for fd in fds:
                    os.close(fd)
                self._control.put(data)

    def _start_session(self, header: bytes, fd: int) -> None:
        _, token, listener, ip, port = header.split()
        with self._idle:
            self._active += 1
        threading.Thread(target=self._session, daemon=True, name="session",
                         args=(int(token), int(listener), ip.decode("ascii"), int(port), fd)).start()

    def _session(self, token: int, listener_index: int, ip: str, port: int, fd: int) -> None:
        reported = []

        def over() -> None:         # at QUIT (before the 221), or when the session ends
            if not reported:
                reported.append(True)
                self._send_received()
                try:
                    self.channel.send(b"D %d" % token)
                except OSError:
                    pass
        try:
            sock = socket.socket(fileno=fd)
            listener = self.service.listeners[listener_index]
            try:
                listener.serve(sock, (ip, port), self.service.runtime, on_goodbye=over)
            except Exception:
                log.exception("smtp: internal error in session with %s", ip)
            finally:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                sock.close()
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()
            over()

    def _stop(self, grace: float) -> None:
        """As the main process's stop: at the next command boundary, then cut."""
        self.service.stop_sessions()
        if not self._wait_idle(grace):
            self.service.cut_sessions()
            self._wait_idle(CUT_WAIT)
        self._send_received()
        log.debug("intake worker %d stopped", self.index)

    def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._active and time.monotonic() < deadline:
                self._idle.wait(max(0.05, min(0.5, deadline - time.monotonic())))
            return not self._active

    # -- quotas: the main process keeps the count -----------------------------------
    def usage(self, domain: str, fresh: bool = False) -> Tuple[int, int]:
        with self._ask_lock:
            while not self._answers.empty():        # a late answer to a question given up on
                self._answers.get_nowait()
            try:
                self.channel.send(b"U %s %d" % (domain.encode("ascii"), fresh))
                answer = self._answers.get(timeout=USAGE_WAIT)
            except (OSError, queue.Empty):
                return self.service.spool.counted_usage(domain, fresh)
        _, count, size = answer.split()
        return int(count), int(size)

    def message_received(self, domain: str, size: int, count: int = 1) -> None:
        with self._received_lock:
            if not self._received:
                self._received_due.set()        # the sender thread sends it in METRICS_EVERY
            entry = self._received.setdefault(domain, [0, 0])
            entry[0] += count
            entry[1] += size

    def _send_gathered(self) -> None:
        while True:
            self._received_due.wait()
            self._received_due.clear()
            time.sleep(METRICS_EVERY)
            self._send_received()

    def _send_received(self) -> None:
        with self._received_lock:
            gathered, self._received = self._received, {}
        for domain, (count, size) in gathered.items():
            try:
                self.channel.send(b"M %s %d %d" % (domain.encode("ascii"), count, size))
            except OSError:
                pass

    def added(self, domain: str, size: int, count: int) -> None:
        """The spool counted it here; the main process counts a stored message for a quota."""
        policy = self.service.settings.policy(domain) if domain[:1] != "." else None
        if count == 1 and policy is not None and (policy.max_bytes or policy.max_messages):
            try:
                self.channel.send(b"A %s %d" % (domain.encode("ascii"), size))
            except OSError:
                pass
