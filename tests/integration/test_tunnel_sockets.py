"""The socket factory on loopback without namespaces or privileges (netns=None, mark=None).

The netns, SO_MARK, REDIRECT and transparent cases are in tests/privileged/test_tunnel_sockets_netns.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator

import pytest

from nodeagent.model import SocketAddress
from nodeagent.ztunnel import sockets

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


async def test_listener_serves_create_server_and_shares_its_port() -> None:
    loop = asyncio.get_running_loop()
    first = sockets.listener_in_netns(None, LOOPBACK, 0, mark=None)
    port = first.getsockname()[1]
    second = sockets.listener_in_netns(None, LOOPBACK, port, mark=None)  # SO_REUSEPORT
    assert not first.getblocking() and not second.getblocking()
    got: asyncio.Future[bytes] = loop.create_future()

    class Echo(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            if not got.done():
                got.set_result(data)

    servers = [await loop.create_server(Echo, sock=s) for s in (first, second)]
    try:
        client = await sockets.open_connection(SocketAddress(LOOPBACK, port), mark=None)
        await loop.sock_sendall(client, b"hello")
        assert await asyncio.wait_for(got, 5) == b"hello"
        client.close()
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


async def test_refused_connect_names_the_target() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(
        sockets.ConnectError, match=rf"connecting to 127\.0\.0\.1:{port} failed: .* nothing is listening"
    ):
        await sockets.open_connection(SocketAddress(LOOPBACK, port), mark=None)


@pytest.fixture
def full_hbone_listener() -> Iterator[SocketAddress]:
    """A listener on :15008 whose accept queue is full, so further SYNs are dropped (a silent firewall)."""
    listener = socket.socket()
    listener.bind(("127.42.0.8", sockets.HBONE_PORT))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        yield SocketAddress(ipaddress.IPv4Address("127.42.0.8"), sockets.HBONE_PORT)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_timeout_names_the_target_and_the_likely_cause(full_hbone_listener: SocketAddress) -> None:
    with pytest.raises(sockets.ConnectError) as err:
        await sockets.open_connection(full_hbone_listener, mark=None, connect_timeout=0.3)
    assert str(err.value) == (
        "timed out connecting to 127.42.0.8:15008 after 0.3 s — is a NetworkPolicy or firewall blocking the HBONE port?"
    )


def test_source_of_the_wrong_family_is_refused() -> None:
    with pytest.raises(ValueError, match="not of address family AF_INET6"):
        sockets.connect_socket(socket.AF_INET6, mark=None, source=LOOPBACK)


def test_non_local_source_without_transparent_says_what_is_missing() -> None:
    with pytest.raises(OSError, match=r"cannot bind source 192\.0\.2\.7: .*needs transparent=True"):
        sockets.connect_socket(socket.AF_INET, mark=None, source=ipaddress.IPv4Address("192.0.2.7"))
