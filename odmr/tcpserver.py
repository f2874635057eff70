"""The TCP servers odmrd listens with: the SMTP and ODMR listeners and /metrics.

socketserver binds in its constructor with the family it was told and leaves the
socket open when binding fails. Ours pick the family from the address, make an
IPv6 socket IPv6-only (`[::]` must not take the IPv4 port a separate `0.0.0.0`
line asks for) and close the socket when the address cannot be had.

socketserver's loop wakes every poll interval to see whether it should stop, so
an idle listener still wakes, and a stop waits up to that interval. Ours sleeps
until a connection comes or `shutdown()` writes to a wake-up socket.
"""
from __future__ import annotations

import selectors
import socket
import socketserver
import threading
from typing import Tuple


class BoundServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], handler=socketserver.BaseRequestHandler):
        self._wake_up, self._waker = socket.socketpair()
        self._wake_up.setblocking(False)
        self._stop_asked = False
        self._stopped = threading.Event()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler, bind_and_activate=False)
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise

    def serve_forever(self, poll_interval: float = 0.0) -> None:
        """Accept until shutdown(); `poll_interval` is only there for socketserver's signature."""
        self._stopped.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_up, selectors.EVENT_READ)
                while not self._stop_asked:
                    ready = selector.select()
                    if self._stop_asked:
                        break
                    if any(key.fileobj is self for key, _ in ready):
                        self._handle_request_noblock()
                    self.service_actions()
        finally:
            try:
                self._wake_up.recv(64)      # the wake-up, so that a later loop sleeps again
            except OSError:
                pass
            self._stop_asked = False
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever (running in another thread) and wait until it has."""
        self._stop_asked = True
        try:
            self._waker.send(b"!")
        except OSError:
            pass
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        self._wake_up.close()
        self._waker.close()

    def close_forked_copies(self) -> None:
        """In a forked process that never accepts here (an intake worker): close its
        copies of the listening socket and of the wake-up pair; the parent's stay open."""
        self.socket.close()
        self._wake_up.close()
        self._waker.close()
