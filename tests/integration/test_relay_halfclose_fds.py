"""SpliceRelay: a direction that has ended gives its pipe back at once, while the other one runs on.

A tenant's connection half-closed by the client and never closed by its server (nodeagent.ztunnel.fdshare)
held the tunnel's two sockets plus this direction's pipe for as long as the server kept quiet.
Oracle: the process's descriptors in /proc/self/fd before the relay and after the EOF went through.
"""

from __future__ import annotations

import asyncio
import os
import socket

from nodeagent.ztunnel.relay import SpliceRelay


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_an_ended_direction_holds_no_pipe() -> None:
    client, downstream = tcp_pair()
    upstream, server = tcp_pair()
    server.setblocking(False)
    baseline = open_fds()
    relay = SpliceRelay(downstream, upstream)
    try:
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)  # the client is done; the server never answers nor closes
        loop = asyncio.get_running_loop()
        got = b""
        async with asyncio.timeout(5):
            while chunk := await loop.sock_recv(server, 100):
                got += chunk
        assert got == b"hello"  # the EOF went through: that direction has ended
        await asyncio.sleep(0.05)
        assert not relay.done.done()  # the other direction still runs
        assert open_fds() == baseline, "the ended direction still holds its pipe"
    finally:
        relay.abort()
        for sock in (client, server):
            sock.close()
