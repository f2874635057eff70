"""Listeners and the running service: sockets, session limits, reload, stop.

Each listen address gets a `ThreadingTCPServer` whose `serve_forever` runs in
its own thread; each connection gets a session thread. The service object
owns the current Runtime snapshot and swaps it on reload.
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from odmr.background import lower_this_thread
from odmr import accounts as accounts_mod
from odmr import config as config_mod
from odmr import control, metrics, qshape, replies
from odmr import proxy
from odmr import tls as tls_mod
from odmr.config import OdmrSettings, Settings, SmtpSettings
from odmr.intake import IntakeSession
from odmr.bounce_relay import RelayTimings
from odmr.delivery import Timeouts
from odmr.maintenance import TICK as MAINTENANCE_TICK
from odmr.maintenance import Maintenance
from odmr.names import plural
from odmr.odmr_session import ODMRSession
from odmr.queuemgr import QueueManager
from odmr.runtime import Runtime
from odmr.spool import Spool
from odmr.tcpserver import BoundServer
from odmr.wire import format_reply
from odmr.throttle import AuthThrottle
from odmr.wire import Session
from odmr.intake_workers import WorkerPool

log = logging.getLogger("odmrd")

CUT_WAIT = 5.0          # after the grace period: how long cut-off sessions get to record their state
GOODBYE_WAIT = 0.05      # seconds a client at its limit waits for a worker's report of its last QUIT
USERS_RECHECK = 2.0     # seconds between checks of the users file's mtime


class StartupError(Exception):
    """odmrd cannot start; the message is one line for the operator."""


def _restart_only_changes(old: Settings, new: Settings) -> List[str]:
    """What a reload changed that only a restart applies (bound sockets, forked workers)."""
    changed = [name for name in ("spool_dir", "user", "pid_file")
               if getattr(old, name) != getattr(new, name)]
    for what, read in (("listen addresses", lambda s: (s.odmr.listen, s.odmr.tls_listen,
                                                       s.smtp.listen, s.smtp.tls_listen)),
                       ("[smtp] workers", lambda s: s.smtp.workers),
                       ("[metrics] listen", lambda s: s.metrics.listen),
                       ("proxy_protocol", lambda s: (s.odmr.proxy_protocol, s.smtp.proxy_protocol))):
        if read(old) != read(new):
            changed.append(what)
    return changed


def section_for(settings: Settings, kind: str) -> Union[OdmrSettings, SmtpSettings]:
    """A listener's own settings: the [odmr] and [smtp] sections are named like the
    listener kinds, so no code has to branch on the kind to find them."""
    return getattr(settings, kind)


def _refuse(request: socket.socket, refusal: str) -> None:
    """A connection over a session limit hears why before it is closed."""
    try:
        request.settimeout(2.0)
        request.sendall(format_reply(replies.SESSION_LIMIT[0], replies.SESSION_LIMIT[1] % refusal))
    except OSError:
        pass


Address = Tuple[Any, ...]     # (host, port), or IPv6's (host, port, flowinfo, scope_id)


class Listener(BoundServer):
    request_queue_size = 1024

    kind = ""               # "odmr" or "smtp": the subclass, with its session class

    def __init__(self, address: Tuple[str, int], service: "Service", implicit_tls: bool = False):
        self.service = service
        self.implicit_tls = implicit_tls
        # fixed for the listener's life (a restart changes it, like the address)
        self.proxied = self.behind_proxy(service.settings)
        super().__init__(address)

    def label(self) -> str:
        host, port = self.server_address[:2]
        return ("[%s]:%d" % (host, port)) if ":" in host else "%s:%d" % (host, port)

    def behind_proxy(self, settings: Settings) -> bool:
        return section_for(settings, self.kind).proxy_protocol

    def new_session(self, request: socket.socket, peer: str, runtime: Runtime,
                    latest: Callable[[], Runtime]) -> Session:
        raise NotImplementedError

    def _proxied(self) -> bool:
        return self.proxied

    def verify_request(self, request: socket.socket, client_address: Address) -> bool:
        """socketserver's admission hook: over a session limit, a 421 and no thread.
        Behind a PROXY-speaking balancer every connection comes from it: the real
        client's address is counted later, in finish_request."""
        ip = client_address[0]
        refusal = self.service.admit(self.kind, ip, per_address=not self._proxied())
        if refusal:
            log.warning("%s: refused connection from %s: %s", self.kind, ip, refusal)
            _refuse(request, refusal)
            return False
        return True

    def finish_request(self, request: socket.socket, client_address: Address) -> None:
        ip = client_address[0]
        counted_ip = None if self._proxied() else ip
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            runtime = self.service.runtime
            if counted_ip is None:
                client = self._proxy_header(request, client_address, runtime)
                if client is None:
                    return
                refusal = self.service.admit_address(self.kind, client[0])
                if refusal:
                    log.warning("%s: refused connection from %s (via %s): %s", self.kind,
                                client[0], ip, refusal)
                    _refuse(request, refusal)
                    return
                counted_ip = client[0]
                client_address = client
            self.serve(request, client_address, runtime)
        finally:
            self.service.release(self.kind, counted_ip)

    def serve(self, request: socket.socket, client_address: Address, runtime: Runtime,
              on_goodbye: Optional[Callable[[], None]] = None) -> None:
        """One admitted connection, from the TLS handshake (implicit TLS) to its end;
        also what an intake worker process runs for a connection handed to it."""
        ip = client_address[0]
        peer = ("[%s]:%d" % (ip, client_address[1])) if ":" in ip else "%s:%d" % (ip, client_address[1])
        if self.implicit_tls:
            request = self._handshake(request, runtime, peer)
            if request is None:
                return
        session = self.new_session(request, peer, runtime, lambda: self.service.runtime)
        session.on_goodbye = on_goodbye
        if not self.service.register(session):
            session.request_stop()
        try:
            session.run()
        finally:
            self.service.unregister(session)

    def _proxy_header(self, request, client_address, runtime):
        """The real client from a trusted balancer's PROXY header; None drops the connection."""
        ip = client_address[0]
        if not proxy.trusted(ip, section_for(runtime.settings, self.kind).proxy_trusted):
            log.warning("%s: %s is not in proxy_trusted; connection dropped", self.kind, ip)
            return None
        try:
            client = proxy.read_header(request)
        except proxy.ProxyError as exc:
            log.warning("%s: bad PROXY header from %s: %s", self.kind, ip, str(exc))
            return None
        return client or tuple(client_address[:2])

    def _handshake(self, request, runtime, peer):
        """Implicit TLS ("odmrs"): the handshake runs in the session thread, bounded in time."""
        request.settimeout(min(section_for(runtime.settings, self.kind).idle_timeout, 60.0))
        try:
            return runtime.tls.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:
            log.info("%s: TLS handshake with %s failed: %s", self.kind, peer, str(exc))
            return None

    def handle_error(self, request: socket.socket, client_address: Address) -> None:
        log.exception("%s: internal error in session with %s", self.kind, client_address[0])


class ODMRListener(Listener):
    """The ATRN port: ODMR sessions, optionally behind a PROXY-speaking balancer."""

    kind = "odmr"

    def new_session(self, request: socket.socket, peer: str, runtime: Runtime,
                    latest: Callable[[], Runtime]) -> ODMRSession:
        return ODMRSession(request, peer, runtime, latest, self.service.queue,
                           self.service.stopping, self.service.delivery_timeouts)


class IntakeListener(Listener):
    """The SMTP port where mail for the customers' domains arrives."""

    kind = "smtp"

    def new_session(self, request: socket.socket, peer: str, runtime: Runtime,
                    latest: Callable[[], Runtime]) -> IntakeSession:
        return IntakeSession(request, peer, runtime, latest)

    def process_request(self, request: socket.socket, client_address: Address) -> None:
        """An admitted connection goes to an intake worker process when there are any
        (the count stays here: `release` runs when the worker reports the session's end);
        else, or if no worker takes it, to a session thread as always. Behind a PROXY
        balancer sessions stay here: the real client is counted before its session starts."""
        pool = self.service.workers if not self.proxied else None
        if pool is not None:
            try:
                request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)    # as finish_request
            except OSError:
                pass
        if pool is not None and pool.hand_over(request, client_address, self):
            self.close_request(request)         # our copy only: no shutdown(), the worker's is live
            return
        super().process_request(request, client_address)


class Service:
    """The provider: owns settings, accounts, spool, the queue manager (and its threads),
    the listeners, the stop event every session and delivery watches, and the metrics
    (counters, live sessions, backlog) they all report to."""

    metrics_server: Optional[metrics.MetricsServer] = None     # [metrics] listen
    control_server: Optional[control.ControlServer] = None     # `odmrd status` (daemon only)
    queue_watch: Optional[qshape.QueueWatch] = None
    echo_reload = True              # False in an intake worker: the main process says it
    _metrics_thread: Optional[threading.Thread] = None
    started = 0.0

    def __init__(self, config_path: str, delivery_timeouts: Timeouts = Timeouts(),
                 maintenance_tick: float = MAINTENANCE_TICK,
                 relay_timings: RelayTimings = RelayTimings()):
        self.config_path = config_path
        self.delivery_timeouts = delivery_timeouts      # every ATRN's delivery gets these
        self.maintenance_tick = maintenance_tick        # seconds between bounce relay looks
        self.relay_timings = relay_timings              # the bounce relay's backoff and timeout
        self.maintenance: Optional[Maintenance] = None  # expiry, delay notices, bounce relay
        self._spool_opened: Optional[float] = None        # when prepare_spool made the root
        self.settings = config_mod.load(config_path)
        self.spool = Spool(self.settings.spool_dir)
        self.queue = QueueManager(self.spool)       # removal sync and reaper threads
        self.stopping = threading.Event()           # deliveries finish the message in flight, then QUIT
        self._accounts = self._load_accounts(self.settings)
        self.throttle = AuthThrottle()
        self.metrics = metrics.ServiceMetrics()     # in every snapshot: a reload keeps the counts
        try:
            self.decoy_key = load_decoy_key(self.settings)
        except accounts_mod.AccountsError as exc:
            raise StartupError(str(exc)) from None
        self._runtime = Runtime(self.settings, self._accounts, self.spool,
                                self._tls_context(self.settings), self.throttle, self.decoy_key,
                                self.metrics)
        for problem in tls_listener_problems(self.settings, self._runtime.tls):
            raise StartupError(problem)
        self._users_checked = time.monotonic()
        self._users_mtime = _mtime(self.settings.users_file)
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()     # one snapshot builder at a time
        self._live: set = set()
        self._sessions: Dict[str, Dict[str, int]] = {"odmr": {}, "smtp": {}}
        self._totals: Dict[str, int] = {"odmr": 0, "smtp": 0}
        self._idle = threading.Condition(self._lock)
        self.listeners: List[Listener] = []
        self.threads: List[threading.Thread] = []
        self.workers: Optional[WorkerPool] = None   # intake worker processes ([smtp] workers)

    @staticmethod
    def _tls_context(settings):
        try:
            return tls_mod.server_context(settings.tls)
        except tls_mod.TLSConfigError as exc:
            raise StartupError(str(exc)) from None

    @staticmethod
    def _load_accounts(settings) -> accounts_mod.Accounts:
        try:
            os.stat(settings.users_file)
        except FileNotFoundError:
            log.warning("no users file at %s yet: no domains are hosted until "
                        "'odmrd user add' creates it", settings.users_file)
            return accounts_mod.Accounts([], settings.users_file)
        except OSError as exc:
            # there, but out of reach (a directory's mode changed): hosting nothing would
            # refuse every customer's mail for good, so this is an error, not "no file"
            raise StartupError("cannot read users file %s: %s" % (settings.users_file,
                                                                  exc.strerror)) from None
        try:
            return accounts_mod.load(settings.users_file)
        except accounts_mod.AccountsError as exc:
            raise StartupError(str(exc).replace("\n", "; ")) from None

    def _refresh_decoy_key(self, settings) -> None:
        """The users file may have come (and its secret with it) since start-up."""
        try:
            self.decoy_key = load_decoy_key(settings) or self.decoy_key
        except accounts_mod.AccountsError as exc:
            log.error("keeping the previous decoy secret: %s", str(exc))

    # -- the current snapshot ---------------------------------------------------
    @property
    def runtime(self) -> Runtime:
        """The current snapshot; picks up an edited users file within a few seconds."""
        now = time.monotonic()
        if now - self._users_checked >= USERS_RECHECK and self._reload_lock.acquire(blocking=False):
            try:
                self._users_checked = now
                mtime = _mtime(self.settings.users_file)
                if mtime != self._users_mtime:
                    self._users_mtime = mtime
                    self._reload_accounts()
            finally:
                self._reload_lock.release()
        return self._runtime

    def _reload_accounts(self) -> None:
        try:
            accounts = self._load_accounts(self.settings)
        except StartupError as exc:
            log.error("users file not reloaded, keeping the previous accounts: %s", str(exc))
            return
        self._refresh_decoy_key(self.settings)
        self._runtime = Runtime(self.settings, accounts, self.spool, self._runtime.tls, self.throttle,
                                self.decoy_key, self.metrics)
        self._say(logging.INFO, "users file reloaded: %s, %s", plural(len(accounts), "account"),
                 plural(len(self._runtime.hosted_domains()), "hosted domain"))

    def reload(self) -> None:
        """SIGHUP: fresh settings and accounts; listeners stay as they are."""
        with self._reload_lock:
            self._reload()
        if self.workers is not None:
            self.workers.reload()           # each reads the files again itself

    def _reload(self) -> None:
        try:
            settings = config_mod.load(self.config_path)
            accounts = self._load_accounts(settings)
            context = self._tls_context(settings)
        except (config_mod.ConfigError, StartupError) as exc:
            self._say(logging.ERROR, "reload failed, keeping the running configuration: %s",
                      str(exc).replace("\n", "; "))
            return
        old = self.settings
        for what in _restart_only_changes(old, settings):
            self._say(logging.WARNING, "reload: %s changed; that takes effect after a restart", what)
        settings = _keep(settings, old)
        self.settings = settings
        self._users_mtime = _mtime(settings.users_file)
        if context is None and any(l.implicit_tls for l in self.listeners):
            self._say(logging.ERROR, "reload: TLS certificates removed but implicit-TLS listeners "
                      "are running; keeping the previous certificates")
            context = self._runtime.tls
        self._refresh_decoy_key(settings)
        self._runtime = Runtime(settings, accounts, self.spool, context, self.throttle, self.decoy_key,
                                self.metrics)
        logging.getLogger().setLevel(settings.log_level.upper())
        self._say(logging.INFO, "configuration reloaded: %s, %s", plural(len(accounts), "account"),
                 plural(len(self._runtime.hosted_domains()), "hosted domain"))

    def _say(self, level: int, message: str, *args) -> None:
        """A reload's outcome, logged once: the intake workers reload too, and say it
        only at debug level (their lines carry the daemon's pid)."""
        log.log(level if self.echo_reload else logging.DEBUG, message, *args)

    # -- session limits -----------------------------------------------------------
    def admit(self, kind: str, ip: str, per_address: bool = True) -> Optional[str]:
        """Count a new session (and its address unless `per_address` is False), or say why not."""
        limits = section_for(self.settings, kind)
        with self._lock:
            if self._totals[kind] >= limits.max_sessions:
                return replies.TOO_MANY_SESSIONS
            if per_address:
                refusal = self._count_address(kind, ip, limits.max_sessions_per_address,
                                              wait_for_goodbyes=True)
                if refusal:
                    return refusal
            self._totals[kind] += 1
        return None

    def _count_address(self, kind: str, ip: str, limit: int, wait_for_goodbyes: bool) -> Optional[str]:
        """Count one more session from `ip` (the caller holds the lock), or say why not.
        `wait_for_goodbyes`: first give an intake worker's news of a session's end its moment."""
        per = self._sessions[kind]
        if per.get(ip, 0) >= limit and not (wait_for_goodbyes and self._freed_soon(per, ip, limit)):
            return replies.TOO_MANY_FROM_ADDRESS
        per[ip] = per.get(ip, 0) + 1
        return None

    def _freed_soon(self, per: Dict[str, int], ip: str, limit: int) -> bool:
        """With intake workers a session's end reaches this process a moment after the
        client's QUIT: wait that moment (the lock is released meanwhile) before refusing
        a client that reconnected at once."""
        if self.workers is None:
            return False
        deadline = time.monotonic() + GOODBYE_WAIT
        while per.get(ip, 0) >= limit:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._idle.wait(left)
        return True

    def admit_address(self, kind: str, ip: str) -> Optional[str]:
        """Count the real client behind a proxy against the per-address limit."""
        limits = section_for(self.settings, kind)
        with self._lock:        # served in this process, never by a worker: no goodbye to wait for
            return self._count_address(kind, ip, limits.max_sessions_per_address,
                                       wait_for_goodbyes=False)

    def release(self, kind: str, ip: Optional[str]) -> None:
        with self._lock:
            if ip is not None:
                per = self._sessions[kind]
                per[ip] = per.get(ip, 1) - 1
                if per[ip] <= 0:
                    del per[ip]
            self._totals[kind] -= 1
            self._idle.notify_all()

    def register(self, session: Session) -> bool:
        """Track a live session so stop() can end it; False once stopping has begun."""
        with self._lock:
            self._live.add(session)
            self.metrics.activity.session_opened(session)
            return not self.stopping.is_set()

    def unregister(self, session: Session) -> None:
        with self._lock:
            self._live.discard(session)
            self.metrics.activity.session_closed(session)

    def wait_for_sessions(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for every admitted session to end (one an intake
        worker serves ends when the worker says so); returns how many are still open."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while sum(self._totals.values()) and time.monotonic() < deadline:
                self._idle.wait(max(0.05, min(0.5, deadline - time.monotonic())))
            return sum(self._totals.values())

    # -- lifecycle ------------------------------------------------------------------
    def bind(self) -> None:
        """Open every listening socket (before privileges are dropped)."""
        wanted = [(a, ODMRListener, False) for a in self.settings.odmr.listen]
        wanted += [(a, ODMRListener, True) for a in self.settings.odmr.tls_listen]
        wanted += [(a, IntakeListener, False) for a in self.settings.smtp.listen]
        wanted += [(a, IntakeListener, True) for a in self.settings.smtp.tls_listen]
        for address, listener_class, tls in wanted:
            try:
                self.listeners.append(listener_class(address, self, tls))
            except OSError as exc:
                self.close()
                raise StartupError("cannot listen on %s (%s): %s" % (
                    _label(address), listener_class.kind, exc.strerror or exc)) from None
        self._bind_metrics()

    def prepare_spool(self) -> None:
        """Create the spool root (after dropping privileges); the debris of interrupted
        writes is cleaned once serving has begun (`start`): on a million messages that
        takes seconds a restart must not wait for."""
        try:
            os.makedirs(self.spool.root, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StartupError("spool %s: %s" % (exc.filename or self.spool.root,
                                                 exc.strerror)) from None
        self._spool_opened = time.time()

    def _clean_spool(self, before: float) -> None:
        """The start-up clean-up, beside the sessions: only debris older than this start."""
        lower_this_thread()
        try:
            removed = self.spool.prepare(before)
        except OSError as exc:
            log.error("spool: start-up clean-up stopped: %s: %s", exc.filename or self.spool.root,
                      exc.strerror)
            return
        if removed:
            log.info("spool: removed %d leftover temporary files", removed)

    def start(self, workers: int = 1, private_fds: Sequence[int] = ()) -> None:
        """Serve every listener in its own thread. `workers` > 1 forks that many intake
        worker processes first (no other thread may run yet); `private_fds` (the pid
        file) are closed in them."""
        if workers > 1 and any(l.kind == "smtp" for l in self.listeners):
            self.workers = WorkerPool(self, workers, private_fds)
        for listener in self.listeners:
            thread = threading.Thread(target=listener.serve_forever,
                                      name="listen-%s" % listener.label(), daemon=True)
            thread.start()
            self.threads.append(thread)
            log.info("listening on %s (%s%s)", listener.label(), listener.kind,
                     ", implicit TLS" if listener.implicit_tls else "")
        if self._spool_opened is not None:
            threading.Thread(target=self._clean_spool, args=(self._spool_opened,),
                             name="spool-clean", daemon=True).start()
        self.maintenance = Maintenance(lambda: self.runtime, self.maintenance_tick,
                                       relay_timings=self.relay_timings)
        self.maintenance.start()
        self._start_monitoring()

    def stop(self, grace: Optional[float] = None) -> int:
        """Stop accepting, give sessions `grace` seconds, return how many were cut off."""
        for listener in self.listeners:
            listener.shutdown()         # at once: its loop wakes on the request (tcpserver)
        self.close()
        self.stop_sessions()
        grace = self.settings.grace_period if grace is None else grace
        if self.workers is not None:
            self.workers.stop(grace)        # their sessions count in _totals until they end
        if self.maintenance is not None:
            self.maintenance.stop()
        left = self.wait_for_sessions(grace)
        if left:
            # out of time: cut the connections and let the threads record what was in flight
            self.cut_sessions()
            self.wait_for_sessions(CUT_WAIT)
        self.queue.stop()                   # removals durable, retired files freed
        if self.workers is not None:
            self.workers.join(CUT_WAIT + 5.0)
        self._stop_monitoring()
        return left

    def stop_sessions(self) -> None:
        """Idle sessions end now, busy ones after their command; deliveries finish the
        message in flight, then QUIT."""
        with self._lock:
            self.stopping.set()
            live = list(self._live)
        for session in live:
            session.request_stop()

    def cut_sessions(self) -> None:
        """Out of time: cut the connections; their threads record what was in flight."""
        with self._lock:
            live = list(self._live)
        for session in live:
            session.cut()

    def close(self) -> None:
        for listener in self.listeners:
            listener.server_close()
        if self.metrics_server is not None and self._metrics_thread is None:
            self.metrics_server.server_close()      # never served (start-up failed, or the parent)

    # -- what the operator sees: status socket, metrics endpoint, queue shape ---------
    def _bind_metrics(self) -> None:
        """[metrics] listen is bound with the other listeners, before privileges are dropped."""
        address = self.settings.metrics.listen
        if address is None:
            return
        try:
            self.metrics_server = metrics.MetricsServer(address, self.render_metrics)
        except OSError as exc:
            self.close()
            raise StartupError("cannot listen on %s (metrics): %s" % (
                _label(address), exc.strerror or exc)) from None

    def open_control(self) -> None:
        """The status socket in the spool: after dropping privileges (it is the service
        account's), before any thread runs (its bind narrows the umask); served from
        `start`, after the intake workers were forked."""
        server = control.ControlServer(self.spool.root, self.status_report)
        try:
            server.open()
        except control.ControlInUse as exc:
            # two daemons of one node on one spool (a test of two nodes): `status` asks the other
            log.warning("%s; this one has no control socket", str(exc))
            return
        except control.ControlError as exc:
            raise StartupError(str(exc)) from None
        self.started = time.time()
        self.control_server = server

    def monitoring_fds(self) -> List[int]:
        """The status socket and metrics listener: the intake workers close them."""
        fds = []
        if self.control_server is not None:
            fds.append(self.control_server.fileno())
        if self.metrics_server is not None:
            fds.append(self.metrics_server.fileno())
        return fds

    def _start_monitoring(self) -> None:
        self.started = self.started or time.time()
        if self.control_server is not None:
            self.control_server.start()
        if self.metrics_server is not None:
            self._metrics_thread = self.metrics_server.start()
            log.info("serving metrics on http://%s/metrics", _label(self.settings.metrics.listen))
        if self.metrics_server is not None or self.control_server is not None:
            self.queue_watch = qshape.QueueWatch(self.spool.root, self.metrics.backlog)
            self.queue_watch.start()

    def _stop_monitoring(self) -> None:
        """Last of all: `status` answers while sessions finish."""
        if self._metrics_thread is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self._metrics_thread = None
        if self.queue_watch is not None:
            self.queue_watch.stop()
        if self.control_server is not None:
            self.control_server.close()

    def status_report(self) -> dict:
        elsewhere = self.workers.sessions() if self.workers is not None else None
        return control.report(self.started, self.listeners, self.metrics, elsewhere=elsewhere)

    def render_metrics(self) -> str:
        """One scrape: counters and gauges from memory, never from the spool."""
        settings = self.settings
        return self.metrics.exposition(sorted({l.server_address[1] for l in self.listeners}),
                                       settings.metrics.per_domain,
                                       settings.tls.cert_file)


def _keep(new, old):
    """Settings that need a restart keep their running values on reload."""
    import dataclasses
    odmr = dataclasses.replace(new.odmr, listen=old.odmr.listen, tls_listen=old.odmr.tls_listen,
                               proxy_protocol=old.odmr.proxy_protocol)
    smtp = dataclasses.replace(new.smtp, listen=old.smtp.listen, tls_listen=old.smtp.tls_listen,
                               workers=old.smtp.workers, proxy_protocol=old.smtp.proxy_protocol)
    return dataclasses.replace(new, spool_dir=old.spool_dir, user=old.user, pid_file=old.pid_file,
                               odmr=odmr, smtp=smtp)


def tls_listener_problems(settings: Settings, context: Optional[ssl.SSLContext]) -> List[str]:
    """Implicit-TLS listeners configured without a certificate to serve them with."""
    if context is not None:
        return []
    return ["%s: implicit TLS listener needs [tls] cert_file and key_file" % _label(address)
            for address in settings.odmr.tls_listen + settings.smtp.tls_listen]


def _label(address: Tuple[str, int]) -> str:
    host, port = address
    return ("[%s]:%d" % (host, port)) if ":" in host else "%s:%d" % (host, port)


def _mtime(path: str) -> object:
    """What changes when the users file is edited, replaced, chowned, chmodded or put out of
    reach: any change makes the service read it again (and say so if it cannot)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return "unreachable: %s" % exc.errno
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_uid, st.st_mode)


def load_decoy_key(settings: Settings) -> bytes:
    """The key for unknown users' SCRAM salts, from beside the users file.

    Made if missing (start-up runs before privileges are dropped, so it can);
    b"" without a users file, or when it cannot be made (logged): then the
    salts hold only for this process. AccountsError when it is unsafe or
    malformed, like the users file itself."""
    if not os.path.exists(settings.users_file):
        return b""
    try:
        return accounts_mod.decoy_secret(settings.users_file) or b""
    except accounts_mod.SecretNotCreated as exc:
        log.warning("%s; until it exists, the SCRAM salts shown for unknown user names "
                    "change at every restart", exc)
        return b""


def decoy_key_problems(settings: Settings) -> List[str]:
    """For check-config: an existing decoy secret that serve would refuse."""
    try:
        accounts_mod.decoy_secret(settings.users_file, create=False)
    except accounts_mod.AccountsError as exc:
        return [str(exc)]
    return []
