"""Periodic work of a running provider, on one background thread.

- expiry: every EXPIRE_EVERY seconds, `queuemgr.expire_all` returns messages older
  than `[queue] max_age` to their senders (DSN), exactly as `odmrd queue expire`;
- delay notices: when `[queue] warn_after` > 0, `queuemgr.warn_all` sends one
  "delayed" DSN per message that has waited that long (remembered in its state,
  so never twice);
- the bounce relay: each TICK, `bounce_relay.relay_outbound` hands the DSNs
  waiting in the OUTBOUND queue to `[queue] bounce_relay`.

Everything a pass changes in a domain happens under that domain's delivery
claim, so it never races an ATRN session nor another `odmrd serve` process on
the same spool; a busy domain is simply tried again at the next pass.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, Optional

from odmr.bounce_relay import RelayTimings, relay_outbound
from odmr.queuemgr import expire_all, warn_all
from odmr.runtime import Runtime
from odmr.spool import OUTBOUND

log = logging.getLogger("odmrd.maintenance")

TICK = 5.0                  # seconds between looks at the OUTBOUND queue
EXPIRE_EVERY = 300.0        # seconds between expiry / delay-notice passes
EXPIRE_FIRST = 60.0         # the first pass waits this long: start-up (and ATRN) come first


class Maintenance:
    """The background thread; `runtime` is called for the current snapshot (reloads).
    The timing is the service's (a test's provider may look at OUTBOUND more often, and
    give the bounce relay shorter retries and timeouts)."""

    def __init__(self, runtime: Callable[[], Runtime], tick: float = TICK,
                 expire_every: float = EXPIRE_EVERY, expire_first: float = EXPIRE_FIRST,
                 relay_timings: RelayTimings = RelayTimings()):
        self._runtime = runtime
        self.tick = tick
        self.relay_timings = relay_timings
        self.expire_every = expire_every
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._next_expiry = time.monotonic() + expire_first
        self._warned_no_relay = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="maintenance", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:   # the thread must survive anything a pass meets
                log.exception("maintenance: pass failed")
            self._wake.wait(self.tick)
            self._wake.clear()

    def run_once(self, now: Optional[float] = None) -> Dict[str, int]:
        """One pass: expiry and delay notices when due, then the bounce relay. Given
        `now` (a wall-clock time to judge ages by), expiry and delay notices are due."""
        runtime = self._runtime()
        clock = time.monotonic()
        counts: Dict[str, int] = {}
        if now is not None or clock >= self._next_expiry:
            self._next_expiry = clock + self.expire_every
            counts.update(expire_all(runtime, now))
            if runtime.settings.queue.warn_after > 0:
                counts["warned"] = warn_all(runtime, now)
        if not self._stop.is_set():
            counts.update(self.relay(runtime, now))
        return counts

    def relay(self, runtime: Runtime, now: Optional[float] = None) -> Dict[str, int]:
        target = runtime.settings.queue.bounce_relay
        if not runtime.spool.has_mail(OUTBOUND):
            return {}
        if not target:
            if not self._warned_no_relay:
                log.warning("maintenance: bounces for outside senders are waiting in %s/%s but "
                            "[queue] bounce_relay is not set; they are dropped after max_age",
                            runtime.spool.root, OUTBOUND)
                self._warned_no_relay = True
            return {}
        self._warned_no_relay = False
        return relay_outbound(runtime, target, now, self.relay_timings)
