#!/usr/bin/env python3
"""A TCP proxy that holds every chunk D ms in each direction: a long link on loopback.

These machines have no `tc netem`, and a customer 10-80 ms away is what the
long-link drain bench must imitate. Each chunk read from one side is written to
the other side D ms after it arrived, in arrival order; chunks are delayed
independently (a chunk does not wait for the one before it to be written), so
the link's round trip is 2 D while its bandwidth stays that of loopback.
An end of stream is passed on D ms late too, as a half-close.

It runs as its own process (`python3 bench/delay_proxy.py --listen PORT
--to PORT --delay-ms D`, prints "ready" when it listens) so that its event loop
never waits for the bench's GIL: a late wake-up would look like a longer link.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from typing import Optional, Tuple

CHUNK = 1 << 16


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy one direction; each chunk leaves `delay` seconds after it came in."""
    loop = asyncio.get_running_loop()
    due: "asyncio.Queue[Tuple[float, Optional[bytes]]]" = asyncio.Queue()

    async def deliver() -> None:
        while True:
            when, data = await due.get()
            wait = when - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(CHUNK)
            due.put_nowait((loop.time() + delay, data or None))
            if not data:
                break
        await sender
    finally:
        if not sender.done():
            sender.cancel()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                      target: Tuple[str, int], delay: float) -> None:
    """One proxied connection: both directions until both have ended (or one broke)."""
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    for w in (client_w, server_w):
        _nodelay(w)
    pumps = [asyncio.ensure_future(_pump(client_r, server_w, delay)),
             asyncio.ensure_future(_pump(server_r, client_w, delay))]
    try:
        done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
        for task in done:
            task.exception()            # a reset is the link ending, not an error to report
    finally:
        for w in (client_w, server_w):
            w.close()


async def serve(listen_port: int, target_port: int, delay: float,
                host: str = "127.0.0.1") -> asyncio.AbstractServer:
    """Listen on host:listen_port and forward each connection to host:target_port."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _connection(r, w, (host, target_port), delay)
    return await asyncio.start_server(handle, host, listen_port)


async def _main(args: argparse.Namespace) -> None:
    server = await serve(args.listen, args.to, args.delay_ms / 1000.0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1 to listen on")
    parser.add_argument("--to", type=int, required=True, help="port on 127.0.0.1 to forward to")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (RTT = 2 x this)")
    asyncio.run(_main(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
