"""Small load programs the benchmark runs inside lab pods (as scripts, with the project's venv).

    load.py echo-server PORT               echo every byte back; many connections; until killed
    load.py connrate HOST PORT SECONDS N   N workers: connect, 1-byte echo, close; JSON latencies on stdout
    load.py hold HOST PORT COUNT           open COUNT connections (each echoed once), print "ready",
                                           keep them until stdin closes

Why a program of our own: neither iperf3 nor sockperf measures new connections per second through a
proxy, or holds thousands of idle connections, and both are what a connection-pooling tunnel changes.
The same client runs on every path, so ratios between paths are fair.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Echo(asyncio.Protocol):
    """Echo every byte back; close when the client does."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._transport.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False  # close our side too


async def echo_server(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "0.0.0.0", port, backlog=4096)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


class _Probe(asyncio.Protocol):
    """Client side of one connection: send one byte, resolve `echoed` when anything comes back."""

    def __init__(self, echoed: asyncio.Future[None]) -> None:
        self._echoed = echoed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"x")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self._echoed.done():
            self._echoed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._echoed.done():
            self._echoed.set_exception(exc or ConnectionResetError("closed before the echo"))


async def connrate(host: str, port: int, seconds: float, workers: int) -> dict[str, object]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    loop = asyncio.get_running_loop()

    async def worker() -> None:
        # Protocol callbacks rather than asyncio streams: the client costs a fraction of the CPU per
        # connection, so on a small machine it leaves the paths being measured more of it (every path uses
        # the same client, so ratios stay fair).
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            transport = None
            try:
                async with asyncio.timeout(10):
                    echoed: asyncio.Future[None] = loop.create_future()
                    transport, _ = await loop.create_connection(lambda e=echoed: _Probe(e), host, port)
                    await echoed
                latencies.append(time.perf_counter() - t0)
            except (TimeoutError, OSError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            finally:
                if transport is not None:
                    transport.close()

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.monotonic() - start
    return {"seconds": elapsed, "latencies_s": latencies, "errors": errors}


async def hold(host: str, port: int, count: int) -> None:
    conns = []
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"x")
            await reader.readexactly(1)
            conns.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    print(f"ready {len(conns)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in conns:
        w.close()


def print_all(text: str) -> None:
    """Write `text` and a newline to stdout, every byte of it, buffered or not.

    Why not print(): with PYTHONUNBUFFERED=1 (or -u), as the bench's environment has it, sys.stdout is a
    TextIOWrapper straight over the raw file, and it ignores a short write (python/cpython#85393). connrate's
    report is 0.3-1 MB, many times a pipe's 64 KiB, so the write blocks until the bench reads, and a
    blocking pipe write returns short, with what it has written so far, when the writer is signalled or
    stopped meanwhile. print() then dropped the rest without an error and the bench read 64 or 128 KiB
    and a newline (`json.loads`: "line 2 column 1 (char 131073)"). os.write in a loop writes the rest.
    """
    sys.stdout.flush()
    data = memoryview((text + "\n").encode())
    while data:
        data = data[os.write(sys.stdout.fileno(), data) :]


def main(argv: list[str]) -> None:
    _raise_fd_limit()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - the venv has uvloop
        run = asyncio.run
    mode = argv[1]
    if mode == "echo-server":
        run(echo_server(int(argv[2])))
    elif mode == "connrate":
        print_all(json.dumps(run(connrate(argv[2], int(argv[3]), float(argv[4]), int(argv[5])))))
    elif mode == "hold":
        run(hold(argv[2], int(argv[3]), int(argv[4])))
    else:
        raise SystemExit(f"unknown mode {mode!r}; see the module docstring")


if __name__ == "__main__":
    main(sys.argv)
