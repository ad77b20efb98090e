"""Two tunnels, a real CA and test apps on loopback, without root or network namespaces.

Each test gets its own random 127.X.Y.0/24 so tunnels of concurrent test runs never share ports (the
listeners use SO_REUSEPORT, which would otherwise let two runs silently split connections). The socket
factory binds each pod's listeners to the pod's loopback address and stands in for SO_ORIGINAL_DST
with a table the test fills before it connects (`Net.redirect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from identity_support import NODE1_TOKEN, NODE2_TOKEN, RunningCA, start_ca
from prometheus_client import CollectorRegistry

from nodeagent.ca.client import CAClient
from nodeagent.inventory.policies import parse_policies
from nodeagent.metrics import CertManagerMetrics
from nodeagent.model import Identity, Inventory, IPAddress, Namespace, Node, NodeAgentCredential, Pod, SocketAddress
from nodeagent.policy import PolicySet
from nodeagent.zds.codec import Workload
from nodeagent.ztunnel import sockets
from nodeagent.ztunnel.certs import CertificateManager, CertManagerInputs
from nodeagent.ztunnel.edges import LocalPod
from nodeagent.ztunnel.proxy.tunnel import Tunnel, TunnelInputs

TD = "cluster.local"
MESH = {"istio.io/dataplane-mode": "ambient"}
APP_PORT = 8080


@dataclass
class Net:
    """Addresses of one test and the original-destination table."""

    base: str = field(default_factory=lambda: f"127.{random.randint(1, 254)}.{random.randint(1, 254)}")
    redirects: dict[tuple[str, int], SocketAddress] = field(default_factory=dict)

    def ip(self, host: int) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(f"{self.base}.{host}")

    def redirect(self, client: socket.socket, target: SocketAddress) -> None:
        ip, port = client.getsockname()[:2]
        self.redirects[(ip, port)] = target


@dataclass
class LoopbackSockets:
    """The tunnel's SocketFactory on loopback: no netns, no marks, original dst from the test's table."""

    net: Net
    ips: dict[str, IPAddress]  # local pod uid -> its loopback address

    def listener(self, pod: LocalPod, ip: IPAddress | None, port: int, *, transparent: bool) -> socket.socket:
        return sockets.listener_in_netns(None, self.ips[pod.uid], port, mark=None)

    def outbound(self, pod: LocalPod, target: SocketAddress) -> socket.socket:
        return sockets.connect_socket(socket.AF_INET, mark=None, source=self.ips[pod.uid])

    def upstream(self, pod: LocalPod, target: SocketAddress, client: IPAddress | None) -> socket.socket:
        # Loopback accepts any 127/8 source, so the app sees the client's pod IP as on a spoofing node.
        return sockets.connect_socket(socket.AF_INET, mark=None, source=client)

    def reclaim_inbound(self, pod: LocalPod, listener: socket.socket) -> bool:
        return False  # loopback has no capture to put a listener in

    def original_dst(self, sock: socket.socket) -> SocketAddress:
        ip, port = sock.getpeername()[:2]
        try:
            return self.net.redirects[(ip, port)]
        except KeyError:
            raise OSError(f"no original destination registered for {ip}:{port}") from None


def make_pod(net: Net, name: str, node: str, host: int, *, ns: str = "shop", sa: str | None = None) -> Pod:
    return Pod(
        name=name,
        namespace=ns,
        uid=f"uid-{ns}-{name}",
        node=node,
        service_account=sa or name,
        ip=net.ip(host),
        labels={"app": name, "version": "v1"},
    )


def make_inventory(pods: list[Pod]) -> Inventory:
    return Inventory(
        cluster_name="test",
        trust_domain=TD,
        fabric_cidr=ipaddress.IPv4Network("10.99.0.0/24"),
        nodes=(
            Node("node1", ipaddress.IPv4Network("10.10.1.0/24"), ipaddress.IPv4Address("10.99.0.11")),
            Node("node2", ipaddress.IPv4Network("10.10.2.0/24"), ipaddress.IPv4Address("10.99.0.12")),
        ),
        namespaces=(Namespace("shop", MESH), Namespace("other", MESH), Namespace("legacy")),
        pods=tuple(pods),
        node_credentials=(NodeAgentCredential("node1", NODE1_TOKEN), NodeAgentCredential("node2", NODE2_TOKEN)),
    )


@dataclass
class Cluster:
    """The CA, the shared inventory/policy holders and one tunnel per node."""

    net: Net
    ca: RunningCA
    inventory: list[Inventory]
    policies: list[PolicySet]
    tunnels: dict[str, Tunnel] = field(default_factory=dict)
    registries: dict[str, CollectorRegistry] = field(default_factory=dict)
    clients: list[CAClient] = field(default_factory=list)
    certs: dict[str, CertificateManager] = field(default_factory=dict)  # node -> its tunnel's manager

    def pod(self, name: str) -> Pod:
        return self.inventory[0].pod(name)

    def identity(self, name: str) -> Identity:
        return self.pod(name).identity(TD)

    def set_policies(self, policies: PolicySet) -> None:
        self.policies[0] = policies

    def tunnel_inputs(
        self, node: str, *, cert_ttl: int = 0, bundle_path: Path | None = None, **overrides: object
    ) -> TunnelInputs:
        """`cert_ttl`: the lifetime (s) the node's workload certificates are asked for (0: the CA's default);
        `bundle_path`: the trust bundle its certificate manager reads (default: the CA's)."""
        token = NODE1_TOKEN if node == "node1" else NODE2_TOKEN
        client = CAClient(self.ca.target, token=lambda: token, bundle_pem=self.ca.bundle, ttl_seconds=cert_ttl)
        self.clients.append(client)
        registry = CollectorRegistry()
        self.registries[node] = registry
        certs = CertificateManager(
            CertManagerInputs(
                fetch=client.fetch,
                bundle_path=bundle_path or self.ca.store.bundle_path,
                metrics=CertManagerMetrics(registry),
                bundle_poll_interval=None,
            )
        )
        self.certs[node] = certs
        ips = {p.uid: p.ip for p in self.inventory[0].pods if p.ip is not None}
        fields: dict[str, object] = {
            "node": node,
            "socket_factory": LoopbackSockets(self.net, ips),
            "credentials": certs,
            "inventory": lambda: self.inventory[0],
            "policies": lambda: self.policies[0],
            "registry": registry,
            "admin": ("127.0.0.1", 0),
            "metrics": ("127.0.0.1", 0),
            "ready": ("127.0.0.1", 0),
            "grace": 5.0,
            "drain_margin": 4.0,
            "watch_interval": 0.05,
        }
        fields.update(overrides)
        return TunnelInputs(**fields)  # type: ignore[arg-type]

    async def start_tunnel(
        self, node: str, *, cert_ttl: int = 0, bundle_path: Path | None = None, **overrides: object
    ) -> Tunnel:
        tunnel = Tunnel(self.tunnel_inputs(node, cert_ttl=cert_ttl, bundle_path=bundle_path, **overrides))
        await tunnel.start()
        self.tunnels[node] = tunnel
        if overrides.get("zds_socket") is not None:
            return tunnel  # pods arrive over ZDS
        for pod in self.inventory[0].pods_on(node):
            if pod.namespace != "legacy":
                await tunnel.add_pod(Workload(pod.uid, pod.name, pod.namespace, pod.service_account), None)
        return tunnel

    async def start_ready(
        self, node: str, *, cert_ttl: int = 0, bundle_path: Path | None = None, **overrides: object
    ) -> Tunnel:
        """`node`'s tunnel (start_tunnel's arguments), once ready."""
        tunnel = await self.start_tunnel(node, cert_ttl=cert_ttl, bundle_path=bundle_path, **overrides)
        await self.wait_ready(tunnel)
        return tunnel

    async def wait_ready(self, tunnel: Tunnel) -> None:
        async with asyncio.timeout(10):
            while tunnel.readiness.readiness():  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    async def start_both(
        self, node1: Mapping[str, object] | None = None, node2: Mapping[str, object] | None = None
    ) -> tuple[Tunnel, Tunnel]:
        """node1's and node2's tunnels (each with its TunnelInputs overrides), both ready (the client side,
        the server side)."""
        t1 = await self.start_tunnel("node1", **(node1 or {}))
        t2 = await self.start_tunnel("node2", **(node2 or {}))
        await self.wait_ready(t1)
        await self.wait_ready(t2)
        return t1, t2


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, pods: Callable[[Net], list[Pod]] | None = None) -> AsyncIterator[Cluster]:
    net = Net()
    pod_list = (
        pods(net) if pods is not None else [make_pod(net, "client", "node1", 10), make_pod(net, "server", "node2", 20)]
    )
    inventory = [make_inventory(pod_list)]
    ca = start_ca(tmp_path / "ca", source=lambda: inventory[0])
    c = Cluster(net, ca, inventory, [PolicySet()])
    try:
        yield c
    finally:
        for tunnel in c.tunnels.values():
            await tunnel.stop()
        for client in c.clients:
            await client.close()
        ca.stop()


# -- test applications ------------------------------------------------------------------------------------


@dataclass
class Received:
    nbytes: int = 0
    digest: str = ""
    peer: tuple[str, int] | None = None
    eof: bool = False


def pattern(size: int) -> bytes:
    return random.Random(size).randbytes(size)


async def send_all(sock: socket.socket, total: int, block: bytes) -> str:
    loop = asyncio.get_running_loop()
    h = hashlib.sha256()
    view = memoryview(block)
    sent = 0
    while sent < total:
        chunk = view[: min(len(block), total - sent)]
        await loop.sock_sendall(sock, chunk)
        h.update(chunk)
        sent += len(chunk)
    return h.hexdigest()


async def recv_all(sock: socket.socket) -> Received:
    loop = asyncio.get_running_loop()
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    out = Received()
    while True:
        n = await loop.sock_recv_into(sock, buf)
        if n == 0:
            out.eof = True
            break
        h.update(memoryview(buf)[:n])
        out.nbytes += n
    out.digest = h.hexdigest()
    return out


async def answered(connecting: Awaitable[socket.socket], send: bytes = b"", size: int = 5) -> bool:
    """Whether a connection (`connecting`, e.g. connect_captured(...)) that sends `send`, then FIN, gets the
    app's `size` bytes back; False when the tunnel or the app refuses or resets it."""
    try:
        sock = await connecting
        with sock:
            if send:
                await asyncio.get_running_loop().sock_sendall(sock, send)
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(10):
                got = await recv_all(sock)
    except (ConnectionResetError, BrokenPipeError):
        return False
    return got.nbytes == size


async def recv_exactly(sock: socket.socket, size: int, limit: float = 5.0) -> bytes:
    """`size` bytes from `sock` (fewer only at EOF), within `limit` seconds."""
    loop = asyncio.get_running_loop()
    got = b""
    async with asyncio.timeout(limit):
        while len(got) < size:
            more = await loop.sock_recv(sock, size - len(got))
            if not more:
                break
            got += more
    return got


async def seconds_until_closed(sock: socket.socket, limit: float = 3.0) -> float:
    """Read and drop whatever arrives until `sock` is closed (EOF or reset); how long that took. TimeoutError
    after `limit` seconds."""
    loop = asyncio.get_running_loop()
    began = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(limit):
            while await loop.sock_recv(sock, 65536):
                pass
    return time.monotonic() - began


class ByteServer:
    """An app on ip:port: per connection, sends `size` bytes while reading until EOF, then closes."""

    def __init__(self, ip: IPAddress, port: int = APP_PORT, size: int = 0) -> None:
        self.address = SocketAddress(ip, port)
        self.size = size
        self.received: list[Received] = []
        self.sent_digests: list[str] = []
        self.accepted = asyncio.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((str(ip), port))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def start(self) -> ByteServer:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="test byte server")
        return self

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, peer = await loop.sock_accept(self._listener)
            self.accepted.set()
            task = loop.create_task(self._one(sock, peer), name="test byte server conn")
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _one(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        with sock:
            sending = asyncio.ensure_future(send_all(sock, self.size, pattern(min(self.size, 1 << 20) or 1)))
            received = await recv_all(sock)
            received.peer = peer
            self.sent_digests.append(await sending)
            self.received.append(received)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._conns):
            task.cancel()
        self._listener.close()


async def connect_captured(
    net: Net, source: Pod, target: SocketAddress, port: int = sockets.OUTBOUND_PORT
) -> socket.socket:
    """What an app in `source` does when capture redirects it: connect to its tunnel's listener."""
    assert source.ip is not None
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((str(source.ip), 0))
    net.redirect(sock, target)
    listener_ip = source.ip if port == sockets.OUTBOUND_PORT else target.ip
    await asyncio.get_running_loop().sock_connect(sock, (str(listener_ip), port))
    return sock


def uri_san(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert len(uris) == 1, uris
    return uris[0]


DENY_CLIENT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
"""


def deny_client(c: Cluster) -> None:
    """Apply DENY_CLIENT (the client pod's identity may reach nothing in shop) to the cluster's policies."""
    c.set_policies(parse_policies(list(yaml.safe_load_all(DENY_CLIENT))))
