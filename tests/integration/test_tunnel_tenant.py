"""A hostile tenant on the node, through the sockets an ordinary app in an enrolled pod can reach.

An app may bind its socket to any local address of its own netns before it connects. Under eBPF capture
the connect is rewritten to the tunnel's :15001 before the route is chosen, so a socket bound to
127.0.0.1 reaches the tunnel from there (reproduced in the lab: /tmp/s12/h2/explore.py; under iptables
capture the same connect() fails with EINVAL). The tunnel must still treat the connection as the pod's:
on the same-node path the destination app must see the client pod's IP, never a localhost peer, and a
source-IP policy must judge the pod's IP.

On loopback every pod address is a 127/8 address: the tenant's socket here is bound to a 127/8 address
that is not the client pod's (`OTHER_LOCAL`), the stand-in for the pod netns's 127.0.0.1. Oracles: the
peer address the server app's accept() returned, and whether the app saw a connection at all.

Every pod shares the tunnel's file descriptors: one pod's captured connections are limited to its share
(nodeagent.ztunnel.outbound.per_pod_limit), reproduced in the lab by /tmp/s12/h2/fd_exhaust.py.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import yaml
from tunnel_harness import ByteServer, Cluster, Net, cluster, connect_captured, make_pod, recv_all

from nodeagent.inventory.policies import parse_policies
from nodeagent.model import Pod, SocketAddress
from nodeagent.ztunnel import outbound, sockets

OTHER_LOCAL = 99  # host part of a local address that belongs to no pod


def one_node(net: Net) -> list[Pod]:
    return [make_pod(net, "client", "node1", 10), make_pod(net, "server", "node1", 20)]


async def connect_from(c: Cluster, bind_host: int, target: SocketAddress) -> socket.socket:
    """The client pod's app, its socket bound to another local address, captured towards `target`."""
    client = c.pod("client")
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((str(c.net.ip(bind_host)), 0))
    c.net.redirect(sock, target)
    await asyncio.get_running_loop().sock_connect(sock, (str(client.ip), sockets.OUTBOUND_PORT))
    return sock


async def exchange(c: Cluster, app: ByteServer) -> bool:
    """One connection from OTHER_LOCAL to the app; True when the app's 5 bytes came back."""
    try:
        sock = await connect_from(c, OTHER_LOCAL, app.address)
        with sock:
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(10):
                got = await recv_all(sock)
    except (ConnectionResetError, BrokenPipeError):
        return False
    return got.nbytes == 5


async def start(c: Cluster) -> None:
    tunnel = await c.start_tunnel("node1")
    await c.wait_ready(tunnel)


async def test_same_node_app_sees_the_client_pods_ip_not_the_bound_local_address(tmp_path: Path) -> None:
    async with cluster(tmp_path, one_node) as c:
        await start(c)
        server = c.pod("server")
        assert server.ip is not None
        app = ByteServer(server.ip, size=5).start()
        try:
            assert await exchange(c, app)
            async with asyncio.timeout(10):
                while not app.received:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        finally:
            await app.close()
        peer = app.received[0].peer
        assert peer is not None and peer[0] == str(c.pod("client").ip), peer


async def test_a_deny_on_the_pods_ip_holds_whatever_address_the_app_bound(tmp_path: Path) -> None:
    async with cluster(tmp_path, one_node) as c:
        deny = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-client-ip, namespace: shop}}
spec:
  action: DENY
  rules: [{{from: [{{source: {{ipBlocks: ["{c.pod("client").ip}/32"]}}}}]}}]
"""
        c.set_policies(parse_policies(list(yaml.safe_load_all(deny))))
        await start(c)
        server = c.pod("server")
        assert server.ip is not None
        app = ByteServer(server.ip, size=5).start()
        try:
            assert await exchange(c, app) is False
        finally:
            await app.close()
        assert not app.accepted.is_set()  # the app never saw the connection


class SilentServer:
    """A server of the tenant's outside the mesh: accepts, never reads, never closes until told."""

    def __init__(self, address: SocketAddress) -> None:
        self.address = address
        self.held: list[socket.socket] = []
        self._listener = socket.create_server((str(address.ip), address.port), backlog=64)
        self._listener.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._accept(), name="silent server")

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            self.held.append(sock)

    async def accepted(self, n: int) -> None:
        async with asyncio.timeout(10):
            while len(self.held) < n:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    def let_go(self) -> None:
        for sock in self.held:
            sock.close()
        self.held.clear()

    def close(self) -> None:
        self._task.cancel()
        self.let_go()
        self._listener.close()


async def refused(sock: socket.socket) -> bool:
    """Whether the tunnel reset (or closed) a captured connection rather than carrying it."""
    try:
        async with asyncio.timeout(2):
            return await asyncio.get_running_loop().sock_recv(sock, 1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False  # open and carried: the silent server says nothing


def three_pods(net: Net) -> list[Pod]:
    return [*one_node(net), make_pod(net, "neighbour", "node1", 30)]


async def test_one_pod_cannot_hold_more_than_its_share_of_the_tunnel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tenant opens connections to its silent server and closes its own ends at once: each one still
    holds two tunnel sockets and a pipe (the server never closes), so before the limit a pod could spend all of the
    tunnel's descriptors this way and every pod on the node lost its connections. Its limit here is 3."""
    monkeypatch.setattr(outbound, "per_pod_limit", lambda: 3, raising=False)
    async with cluster(tmp_path, three_pods) as c:
        tunnel = await c.start_tunnel("node1")
        await c.wait_ready(tunnel)
        silent = SilentServer(SocketAddress(c.net.ip(77), 9000))
        try:
            client, neighbour = c.pod("client"), c.pod("neighbour")
            for _ in range(3):
                sock = await connect_captured(c.net, client, silent.address)
                sock.close()  # the tenant keeps nothing; the tunnel's two sockets stay (half-closed)
            await silent.accepted(3)
            with await connect_captured(c.net, client, silent.address) as fourth:
                assert await refused(fourth)
            await asyncio.sleep(0.2)
            assert len(silent.held) == 3  # the fourth never reached the server
            with await connect_captured(c.net, neighbour, silent.address) as other:  # its own share
                assert not await refused(other)
                await silent.accepted(4)
            silent.let_go()  # the server ends them: the tunnel's relays end, the tenant may connect again
            async with asyncio.timeout(10):
                while tunnel.table:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            with await connect_captured(c.net, client, silent.address) as again:
                assert not await refused(again)
        finally:
            silent.close()
