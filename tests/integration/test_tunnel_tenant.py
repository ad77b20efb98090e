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

Every pod shares the tunnel's file descriptors: while they run short, a pod (outbound) or a client
(inbound) over its share has its new connections refused (nodeagent.ztunnel.fdshare); first reproduced in
the lab by a tenant holding half-closed connections to a silent server of its own until the tunnel sat at
EMFILE, for good. Here the tunnel's limit is made tiny (so the test process's own descriptors put it under
pressure) or huge (no pressure), and a holder's share is 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from tunnel_harness import ByteServer, Cluster, Net, answered, cluster, connect_captured, make_pod

from nodeagent.inventory.policies import parse_policies
from nodeagent.model import Pod, SocketAddress
from nodeagent.ztunnel import sockets
from nodeagent.ztunnel.edges import LocalPod
from nodeagent.ztunnel.inbound import PlaintextInbound
from nodeagent.ztunnel.metrics import Flags
from nodeagent.ztunnel.proxy.tunnel import Tunnel

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
    return await answered(connect_from(c, OTHER_LOCAL, app.address))


async def test_same_node_app_sees_the_client_pods_ip_not_the_bound_local_address(tmp_path: Path) -> None:
    async with cluster(tmp_path, one_node) as c:
        await c.start_ready("node1")
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
        await c.start_ready("node1")
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


@contextlib.asynccontextmanager
async def squeezed(
    c: Cluster, app: SocketAddress, *, pressure: bool, node: str = "node1"
) -> AsyncIterator[tuple[Tunnel, SilentServer]]:
    """`node`'s tunnel, ready, with a share of 3 connections per holder, under pressure from the start or
    never, and a SilentServer at `app`."""
    tunnel = await c.start_ready(node)
    shares = tunnel.deps.shares
    shares.nofile = 8 if pressure else 1 << 30  # 8: the test process has more than 6 descriptors open
    shares.share = 3
    silent = SilentServer(app)
    try:
        yield tunnel, silent
    finally:
        silent.close()


async def hold_three(c: Cluster, silent: SilentServer, source: Pod, port: int = sockets.OUTBOUND_PORT) -> None:
    """Three connections the tunnel must keep: the tenant closes its ends at once, the server never does."""
    for _ in range(3):
        sock = await connect_captured(c.net, source, silent.address, port)
        sock.close()
    await silent.accepted(3)


def over_share(c: Cluster, direction: str, node: str = "node1") -> float | None:
    return c.registries[node].get_sample_value(
        "nodeagent_tunnel_connections_over_share_total", {"direction": direction}
    )


def closed_with(c: Cluster, node: str, flags: Flags) -> float:
    return sum(
        sample.value
        for metric in c.registries[node].collect()
        for sample in metric.samples
        if sample.name == "istio_tcp_connections_closed_total" and sample.labels["response_flags"] == flags.value
    )


async def drained(tunnel: Tunnel) -> None:
    async with asyncio.timeout(10):
        while tunnel.table:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_under_descriptor_pressure_a_pod_over_its_share_is_refused_and_others_are_not(
    tmp_path: Path,
) -> None:
    """Outbound: each held connection keeps two tunnel sockets and a pipe. Before the share, a pod could
    spend all of the tunnel's descriptors this way and every pod on the node lost its connections."""
    async with (
        cluster(tmp_path, three_pods) as c,
        squeezed(c, SocketAddress(c.net.ip(77), 9000), pressure=True) as (
            tunnel,
            silent,
        ),
    ):
        await hold_three(c, silent, c.pod("client"))
        with await connect_captured(c.net, c.pod("client"), silent.address) as fourth:
            assert await refused(fourth)
        await asyncio.sleep(0.2)
        assert len(silent.held) == 3  # the fourth never reached the server
        with await connect_captured(c.net, c.pod("neighbour"), silent.address) as other:  # its own share
            assert not await refused(other)
            await silent.accepted(4)
        assert over_share(c, "outbound") == 1
        silent.let_go()  # the server ends them: the tunnel's relays end, the tenant may connect again
        await drained(tunnel)
        with await connect_captured(c.net, c.pod("client"), silent.address) as again:
            assert not await refused(again)


async def test_without_descriptor_pressure_a_pod_may_hold_more_than_its_share(tmp_path: Path) -> None:
    """A heavy client (a gateway, 10 000 idle websockets) is not limited while the tunnel has room."""
    async with (
        cluster(tmp_path, three_pods) as c,
        squeezed(c, SocketAddress(c.net.ip(77), 9000), pressure=False) as (
            _,
            silent,
        ),
    ):
        await hold_three(c, silent, c.pod("client"))
        with await connect_captured(c.net, c.pod("client"), silent.address) as fourth:
            assert not await refused(fourth)
            await silent.accepted(4)


def app_of(c: Cluster, name: str) -> SocketAddress:
    ip = c.pod(name).ip
    assert ip is not None
    return SocketAddress(ip, 9000)


async def test_under_descriptor_pressure_a_plaintext_client_over_its_share_is_refused(tmp_path: Path) -> None:
    """Inbound :15006: a neighbour holding connections to a pod's app (which never closes them) is refused
    past its share; another client of the same app is not."""
    async with cluster(tmp_path, three_pods) as c, squeezed(c, app_of(c, "server"), pressure=True) as (_, silent):
        plaintext = sockets.INBOUND_PLAINTEXT_PORT
        await hold_three(c, silent, c.pod("neighbour"), plaintext)
        with await connect_captured(c.net, c.pod("neighbour"), silent.address, plaintext) as fourth:
            assert await refused(fourth)
        with await connect_captured(c.net, c.pod("client"), silent.address, plaintext) as other:
            assert not await refused(other)
            await silent.accepted(4)
        assert over_share(c, "inbound") == 1


def two_nodes(net: Net) -> list[Pod]:
    return [make_pod(net, "client", "node2", 10), make_pod(net, "server", "node1", 20)]


async def test_under_descriptor_pressure_an_hbone_client_over_its_share_gets_503(tmp_path: Path) -> None:
    """Inbound :15008: streams from one client pod hold app sockets on the destination's tunnel; past the
    client's share (that tunnel under pressure) a new CONNECT is answered 503, flagged UO, and the pooled
    HBONE connection carries on."""
    async with cluster(tmp_path, two_nodes) as c:
        await c.start_ready("node2")
        async with squeezed(c, app_of(c, "server"), pressure=True) as (server_tunnel, silent):
            await hold_three(c, silent, c.pod("client"))
            with await connect_captured(c.net, c.pod("client"), silent.address) as fourth:
                assert await refused(fourth)
            assert len(silent.held) == 3
            assert over_share(c, "inbound") == 1
            assert closed_with(c, "node1", Flags.OVERFLOW) == 1  # reporter=destination, response_flags=UO
            silent.let_go()
            await drained(server_tunnel)
            with await connect_captured(c.net, c.pod("client"), silent.address) as again:
                assert not await refused(again)  # over the same pooled connection
                await silent.accepted(1)


class ZonePeer(socket.socket):
    """A connected socket whose peer is an IPv6 link-local address with a zone id, as getpeername() gives it
    for a neighbour on the pod's link that bound its fe80:: address (a loopback test cannot make one)."""

    def getpeername(self) -> tuple[str, int, int, int]:
        return ("fe80::1%eth0", 4321, 0, 2)


async def test_a_plaintext_client_with_a_zone_id_address_is_reset_not_a_crashed_task(tmp_path: Path) -> None:
    """The tunnel's addresses have no zone ids, so such a client is dropped (logged, reset) before it is
    counted against any share; the task must not crash with the address's ValueError (an ERROR with a
    traceback per connection a hostile neighbour opens, and its socket closed with a FIN when collected)."""
    async with cluster(tmp_path, one_node) as c:
        tunnel = await c.start_ready("node1")
        server = c.pod("server")
        local = LocalPod(server.uid, server.name, server.namespace, c.identity("server"), None)
        with socket.create_server((str(c.net.ip(OTHER_LOCAL)), 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            accepted, _ = listener.accept()
        with client:
            sock = ZonePeer(fileno=accepted.detach())
            await PlaintextInbound(tunnel.deps, local)._handle(sock)  # no ValueError
            assert sock.fileno() == -1
            client.settimeout(5)
            with pytest.raises(ConnectionResetError):
                client.recv(1)
        assert not tunnel.table  # dropped before any record, as before the share was counted
