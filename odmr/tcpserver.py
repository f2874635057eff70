"""The TCP servers odmrd listens with: the SMTP and ODMR listeners and /metrics.

socketserver binds in its constructor with the family it was told and leaves the
socket open when binding fails. Ours pick the family from the address, make an
IPv6 socket IPv6-only (`[::]` must not take the IPv4 port a separate `0.0.0.0`
line asks for) and close the socket when the address cannot be had.
"""
from __future__ import annotations

import socket
import socketserver
from typing import Tuple


class BoundServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], handler=socketserver.BaseRequestHandler):
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
