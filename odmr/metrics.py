"""Counters, live activity and the Prometheus endpoint (`[metrics] listen`).

Each service owns one `ServiceMetrics` (its counters, live activity and queue
backlog) and hands it to every snapshot it builds (`Runtime.metrics`), so a
SIGHUP never resets a counter and two services in one process count apart.
The places where events happen bump it with one call each (`message_received`,
`delivery_recorded`, `atrn_reply`, `auth_failed`); sessions and deliveries
register themselves so `odmrd status` and the `odmrd_sessions` gauge can list
them. Everything here is a few dictionary updates under one lock: a scrape
never touches the spool (the queue gauges come from the backlog) and never
holds up a session.
"""
from __future__ import annotations

import functools
import http.server
import logging
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, AbstractSet, Any, Callable, Dict, List, Optional, Tuple

from odmr import qshape
from odmr.spool import Message
from odmr.tcpserver import BoundServer

if TYPE_CHECKING:                   # queuemgr imports this module
    from odmr.queuemgr import Drain

log = logging.getLogger("odmrd.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_SCRAPERS = 16               # concurrent /metrics connections; more are refused
REQUEST_DEADLINE = 5.0          # seconds a scrape may take, from its connection to its answer
ATRN_CODES = ("250", "450", "451", "453", "501", "530")     # SPEC §4: shown from the start

HELP = {
    "odmrd_messages_received_total": ("counter", "Messages accepted at the SMTP intake "
                                      "(one per hosted domain's copy)."),
    "odmrd_messages_delivered_total": ("counter", "Messages a customer accepted after ATRN "
                                       "(for at least one recipient)."),
    "odmrd_recipients_deferred_total": ("counter", "Recipients a customer answered with 4xx, "
                                        "or in flight when a connection broke."),
    "odmrd_recipients_bounced_total": ("counter", "Recipients a customer refused with 5xx."),
    "odmrd_atrn_requests_total": ("counter", "ATRN commands by reply code."),
    "odmrd_auth_failures_total": ("counter", "Failed AUTH exchanges by SASL mechanism."),
    "odmrd_sessions": ("gauge", "Live sessions by listening port."),
    "odmrd_queue_messages": ("gauge", "Messages waiting (as of the last queue scan, "
                             "plus intake and delivery since)."),
    "odmrd_queue_bytes": ("gauge", "Bytes the waiting messages take in the spool."),
    "odmrd_queue_oldest_seconds": ("gauge", "Age of the oldest waiting message."),
    "odmrd_tls_certificate_expiry_seconds": ("gauge", "Seconds until the [tls] cert_file "
                                             "expires (negative: expired)."),
}

Labels = Tuple[Tuple[str, str], ...]


class Registry:
    """Counters by (name, labels); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: Dict[Tuple[str, Labels], float] = {}

    def count(self, name: str, amount: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def samples(self) -> Dict[Tuple[str, Labels], float]:
        with self._lock:
            return dict(self._values)


# A session as `status` shows it: a wire.Session, or an intake worker's
# intake_workers.HandedSession (None once gone); only what it has is read.
Shown = Any


class Activity:
    """Live sessions (per listening port) and deliveries in progress."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: Dict[int, Tuple[object, int, float]] = {}      # id -> (session, port, since)
        self._deliveries: Dict[int, List] = {}     # id -> [drain, since, messages sent]

    def session_opened(self, session: Shown, port: int = 0) -> None:
        """`port`: for a session served elsewhere (an intake worker), without its socket."""
        try:
            port = port or session.sock.getsockname()[1]
        except (OSError, IndexError, AttributeError):
            port = 0
        with self._lock:
            self._sessions[id(session)] = (session, port, time.time())

    def session_closed(self, session: Shown) -> None:
        with self._lock:
            self._sessions.pop(id(session), None)

    def delivery_began(self, drain: Drain) -> None:
        with self._lock:
            self._deliveries[id(drain)] = [drain, time.time(), 0]

    def delivery_sent(self, drain: Drain) -> None:
        with self._lock:
            entry = self._deliveries.get(id(drain))
            if entry is not None:
                entry[2] += 1

    def delivery_ended(self, drain: Drain) -> None:
        with self._lock:
            self._deliveries.pop(id(drain), None)

    def sessions(self, handed: bool = True) -> List[Dict[str, object]]:
        """{port, peer, state, since} of each live session (SPEC §2 `status`); `handed`:
        with those an intake worker serves (it is asked for them itself)."""
        with self._lock:
            sessions = [e for e in self._sessions.values()
                        if handed or not getattr(e[0], "handed", False)]
            reversed_peers = {getattr(d[0], "peer", "") for d in self._deliveries.values()}
        return [{"port": port, "peer": getattr(s, "peer", ""),
                 "state": session_state(s, reversed_peers), "since": int(since)}
                for s, port, since in sorted(sessions, key=lambda e: (e[1], e[2]))]

    def ports(self) -> Dict[int, int]:
        with self._lock:
            counts: Dict[int, int] = {}
            for _, port, _ in self._sessions.values():
                counts[port] = counts.get(port, 0) + 1
        return counts

    def deliveries(self) -> List[Dict[str, object]]:
        """{domains, peer, since, messages} of each delivery in progress."""
        with self._lock:
            entries = [list(e) for e in self._deliveries.values()]
        return [{"domains": list(drain.domains), "peer": drain.peer,
                 "since": int(since), "messages": sent}
                for drain, since, sent in sorted(entries, key=lambda e: e[1])]


def session_state(session: Shown, reversed_peers: AbstractSet[str] = frozenset()) -> str:
    """What a session is doing, from what it already keeps (no bookkeeping of its own)."""
    if hasattr(session, "account"):                 # the ODMR port
        if session.peer in reversed_peers:
            return "reversed"
        return "authenticated" if session.account is not None else "connected"
    if getattr(session, "tx", None) is not None:
        return "mail"
    return "ready" if getattr(session, "helo", None) else "connected"


class ServiceMetrics:
    """What one service counts and keeps live: counters, sessions and deliveries, the
    queue's backlog, its certificate's expiry. The hooks are the one-line calls made
    where the events happen."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.activity = Activity()
        self.backlog = qshape.Backlog()
        self.certificate = CertificateExpiry()     # [tls] cert_file's notAfter, read once per file
        # set in an intake worker: the count goes to the main process, which serves /metrics
        self.forward_received: Optional[Callable[[str, int, int], None]] = None

    def message_received(self, queue: str, size: int, count: int = 1) -> None:
        """Intake stored `count` copies for one domain, `size` bytes in all."""
        if self.forward_received is not None:
            self.forward_received(queue, size, count)
            return
        self.registry.count("odmrd_messages_received_total", count)
        self.backlog.added(queue, size, count)

    def delivery_recorded(self, drain: Drain, message: Message,
                          results: Dict[str, Tuple[int, str]]) -> None:
        """One message's replies from a customer (queuemgr.Drain.record)."""
        codes = [code for code, _ in results.values()]
        if any(200 <= c < 300 for c in codes):
            self.registry.count("odmrd_messages_delivered_total")
        deferred = sum(1 for c in codes if not (200 <= c < 300 or 500 <= c < 600))
        bounced = sum(1 for c in codes if 500 <= c < 600)
        if deferred:
            self.registry.count("odmrd_recipients_deferred_total", deferred)
        if bounced:
            self.registry.count("odmrd_recipients_bounced_total", bounced)
        self.activity.delivery_sent(drain)
        if not message.pending():
            self.backlog.removed(message.domain, message.size)

    def delivery_lost(self, drain: Drain, recipients: int) -> None:
        """The connection broke with a message in flight: its recipients wait."""
        self.registry.count("odmrd_recipients_deferred_total", recipients)

    def auth_failed(self, mechanism: str) -> None:
        self.registry.count("odmrd_auth_failures_total", mechanism=mechanism)

    def atrn_reply(self, code: int) -> None:
        self.registry.count("odmrd_atrn_requests_total", code=str(code))

    def exposition(self, ports: List[int], per_domain: bool, cert_file: str,
                   now: Optional[float] = None) -> str:
        """The Prometheus text format 0.0.4 of everything this service counts and keeps."""
        now = time.time() if now is None else now
        cert_expiry = self.certificate.get(cert_file)
        samples: Dict[str, List[Tuple[Labels, float]]] = {name: [] for name in HELP}
        _counter_samples(samples, self.registry.samples())
        live = self.activity.ports()
        for port in sorted(set(ports) | set(live)):
            samples["odmrd_sessions"].append(((("port", str(port)),), live.get(port, 0)))
        _queue_samples(samples, self.backlog.snapshot(), per_domain, now)
        if cert_expiry is not None:
            samples["odmrd_tls_certificate_expiry_seconds"].append(((), int(cert_expiry - now)))
        lines = []
        for name, entries in samples.items():
            if not entries and not name.startswith("odmrd_queue_"):
                continue                # (the queue families stay, empty, when no queue is left)
            kind, text = HELP.get(name, ("untyped", name))
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
            lines += [_sample(name, value, labels) for labels, value in entries]
        return "\n".join(lines) + "\n"


def counts_first_reply(verb: Callable) -> Callable:
    """Decorates a session's smtp_ATRN: the code of its first reply is counted (in the
    session's `runtime.metrics`) as it goes out (before a 250's delivery runs), without
    touching the verb's own code."""
    @functools.wraps(verb)
    def counted(self, arg: str):
        send = self.reply
        counted_already = []

        def reply(code: int, *lines: str) -> None:
            if not counted_already:
                counted_already.append(code)
                self.runtime.metrics.atrn_reply(code)
            send(code, *lines)
        self.reply = reply
        try:
            return verb(self, arg)
        finally:
            del self.reply
    return counted


# -- the exposition ----------------------------------------------------------------------
def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, value: float, labels: Labels = ()) -> str:
    text = ",".join('%s="%s"' % (k, _escape(str(v))) for k, v in labels)
    number = repr(float(value)) if value != int(value) else str(int(value))
    return "%s%s %s" % (name, "{%s}" % text if text else "", number)


def _counter_samples(samples, counted: Dict[Tuple[str, Labels], float]) -> None:
    """The counters; the totals and the SPEC's ATRN codes are shown from the start."""
    for name in ("odmrd_messages_received_total", "odmrd_messages_delivered_total",
                 "odmrd_recipients_deferred_total", "odmrd_recipients_bounced_total"):
        samples[name].append(((), counted.pop((name, ()), 0)))
    for code in ATRN_CODES:
        counted.setdefault(("odmrd_atrn_requests_total", (("code", code),)), 0)
    for (name, labels), value in sorted(counted.items()):
        samples.setdefault(name, []).append((labels, value))


def _queue_samples(samples, queues: Dict[str, Tuple[int, int, float]], per_domain: bool,
                   now: float) -> None:
    if per_domain:
        for queue in sorted(queues):
            messages, size, oldest = queues[queue]
            labels = (("domain", queue),)
            samples["odmrd_queue_messages"].append((labels, messages))
            samples["odmrd_queue_bytes"].append((labels, size))
            samples["odmrd_queue_oldest_seconds"].append((labels, qshape.age(oldest, now)))
        return
    oldest = min((q[2] for q in queues.values() if q[2]), default=0.0)
    samples["odmrd_queue_messages"].append(((), sum(q[0] for q in queues.values())))
    samples["odmrd_queue_bytes"].append(((), sum(q[1] for q in queues.values())))
    samples["odmrd_queue_oldest_seconds"].append(((), qshape.age(oldest, now)))


def _hang_up(request) -> None:
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- the certificate's expiry, read again only when the file changes ----------------------
class CertificateExpiry:
    """notAfter of the configured certificate, cached by the file's identity."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Optional[tuple] = None
        self._value: Optional[float] = None

    def get(self, path: str) -> Optional[float]:
        if not path:
            return None
        import os
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (path, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if key == self._key:
                return self._value
        value = _not_after(path)
        with self._lock:
            self._key, self._value = key, value
        return value


def _not_after(path: str) -> Optional[float]:
    try:
        decoded = ssl._ssl._test_decode_cert(path)      # type: ignore[attr-defined]
        return float(ssl.cert_time_to_seconds(decoded["notAfter"]))
    except (AttributeError, KeyError, ValueError, OSError, ssl.SSLError):
        return None


# -- the HTTP thread ------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "odmrd"
    sys_version = ""
    timeout = 10.0
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            body = b"Not Found: the metrics are at /metrics\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        else:
            body = self.server.render().encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.debug("metrics: %s %s", self.client_address[0], format % args)


class MetricsServer(BoundServer, http.server.HTTPServer):
    """GET /metrics on its own threads; bound at start-up (before privileges are dropped)."""

    def __init__(self, address: Tuple[str, int], render: Callable[[], str]):
        self.render = render
        self._busy = threading.Semaphore(MAX_SCRAPERS)
        super().__init__(address, _Handler)

    def verify_request(self, request: socket.socket, client_address: Tuple[Any, ...]) -> bool:
        return self._busy.acquire(blocking=False)

    def process_request_thread(self, request: socket.socket, client_address: Tuple[Any, ...]) -> None:
        # a whole request within REQUEST_DEADLINE: a client trickling bytes cannot hold one
        # of the MAX_SCRAPERS places longer (each read alone has its own timeout)
        cut = threading.Timer(REQUEST_DEADLINE, _hang_up, args=(request,))
        cut.daemon = True
        cut.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            cut.cancel()
            self._busy.release()

    def handle_error(self, request: socket.socket, client_address: Tuple[Any, ...]) -> None:
        log.debug("metrics: error answering %s", client_address[0], exc_info=True)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever,
                                  name="metrics", daemon=True)
        thread.start()
        return thread
