"""The long-link bench's delaying proxy (bench/delay_proxy.py): a faithful, delayed pipe.

Its figures are only as good as the proxy: bytes must pass unchanged and in order,
each way, with the end of stream passed on, and each chunk held for the delay
without the chunks queueing behind one another. Lower bounds on time only, plus
one upper bound far above the expected figure (no test here measures a speed)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest

from helpers import close_listener, free_port

PROXY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "delay_proxy.py")


def echo_server(listener: socket.socket) -> None:
    """Echo every connection until its peer half-closes, then close."""
    def echo(conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def start_proxy(target_port: int, delay_ms: float) -> "tuple[subprocess.Popen, int]":
    port = free_port()
    proc = subprocess.Popen([sys.executable, PROXY, "--listen", str(port), "--to", str(target_port),
                             "--delay-ms", str(delay_ms)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout.readline().strip() == b"ready"
    return proc, port


@pytest.fixture
def echo_port() -> Iterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepting = threading.Thread(target=echo_server, args=(listener,), daemon=True)
    accepting.start()
    yield listener.getsockname()[1]
    close_listener(listener, [accepting])


@pytest.fixture
def proxy(echo_port, request) -> Iterator[int]:
    proc, port = start_proxy(echo_port, getattr(request, "param", 50))
    yield port
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


def read_all(sock: socket.socket) -> bytes:
    parts = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(parts)
        parts.append(data)


@pytest.mark.parametrize("proxy", [0, 20], indirect=True, ids=["no-delay", "20ms"])
def test_bytes_pass_unchanged_in_order_and_end_of_stream_follows(proxy):
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with socket.create_connection(("127.0.0.1", proxy), timeout=30) as sock:
        def send() -> None:
            for at in range(0, len(payload), 7919):         # many small writes, odd sizes
                sock.sendall(payload[at:at + 7919])
            sock.shutdown(socket.SHUT_WR)                    # the echo only ends when this arrives
        writer = threading.Thread(target=send)
        writer.start()
        echoed = read_all(sock)
        writer.join(30)
    assert echoed == payload


def test_each_direction_holds_the_delay(proxy):
    with socket.create_connection(("127.0.0.1", proxy), timeout=30) as sock:
        start = time.monotonic()
        sock.sendall(b"ping")
        assert sock.recv(100) == b"ping"
        elapsed = time.monotonic() - start
    assert elapsed >= 0.095, elapsed                        # 50 ms there, 50 ms back


@pytest.mark.slow
@pytest.mark.parametrize("proxy", [200], indirect=True, ids=["200ms"])
def test_chunks_are_delayed_independently_not_one_after_another(proxy):
    """20 chunks 10 ms apart through 400 ms of RTT: ~0.6 s; one at a time would be 8 s."""
    with socket.create_connection(("127.0.0.1", proxy), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.monotonic()
        for n in range(20):
            sock.sendall(b"%02d" % n)
            time.sleep(0.01)
        sock.shutdown(socket.SHUT_WR)
        echoed = read_all(sock)
        elapsed = time.monotonic() - start
    assert echoed == b"".join(b"%02d" % n for n in range(20))
    assert 0.4 <= elapsed < 4.0, elapsed
