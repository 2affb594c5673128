"""A TCP relay that adds a fixed one-way delay in each direction (the kernel here has no netem).

``python -m benchmarks.delay_proxy LISTEN_PORT UPSTREAM_HOST:PORT DELAY_MS`` relays
every connection to the upstream server, holding each chunk of bytes for
DELAY_MS milliseconds before passing it on, in both directions, so a round trip
costs 2 x DELAY_MS more. Order is kept and reading never waits for the delay,
so throughput is not capped by it: only latency is added, as on a long link.
It prints ``ready`` once listening. For the benchmarks only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys

CHUNK = 256 * 1024  # bytes read at once; bounds the memory of one chunk in flight


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    arrived = asyncio.Event()
    done = False

    async def deliver() -> None:
        while True:
            while not queue:
                if done:
                    return
                arrived.clear()
                await arrived.wait()
            due, data = queue.popleft()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            queue.append((loop.time() + delay, data))
            arrived.set()
    except (ConnectionError, OSError):
        pass
    finally:
        done = True
        arrived.set()
        with contextlib.suppress(ConnectionError, OSError):
            await delivering
            if writer.can_write_eof():
                writer.write_eof()


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    upstream: tuple[str, int],
    delay: float,
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*upstream)
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(
            _pipe(client_reader, server_writer, delay), _pipe(server_reader, client_writer, delay)
        )
    finally:
        for writer in (client_writer, server_writer):
            writer.close()


async def serve(listen_port: int, upstream: tuple[str, int], delay_ms: float) -> None:
    delay = delay_ms / 1000

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _relay(reader, writer, upstream, delay)

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    listen_port, upstream, delay_ms = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    host, _, port = upstream.rpartition(":")
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serve(listen_port, (host, int(port)), delay_ms))


if __name__ == "__main__":
    main()
