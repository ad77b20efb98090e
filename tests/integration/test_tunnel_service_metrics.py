"""destination_service on both reporters: the Service a connection went to, as Istio's dashboards group it;
and the services section of /config_dump, read back by `nodeagent inspect services`.

The outbound side knows the Service when the app dialled its VIP; the inbound side only ever sees the pod's
own address (the CONNECT :authority, the captured original destination), so it reports the first Service
selecting the pod with a port forwarding to the one connected, as ztunnel does (guess_inbound_service).
Kiali and Istio's service dashboards read `reporter="destination"` series by destination_service, so an
inbound "unknown" hides every meshed service's inbound traffic. Oracle: the Prometheus registries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import ipaddress
import json
import socket
import urllib.request
from pathlib import Path
from types import MappingProxyType

import pytest
from tunnel_harness import APP_PORT, ByteServer, Cluster, Net, cluster, connect_captured, make_pod, recv_all

from nodeagent.model import Pod, Service, ServicePort, SocketAddress
from nodeagent.ztunnel import inspect, sockets

VIP = ipaddress.IPv4Address("10.96.0.10")
WEB = Service("web", "shop", MappingProxyType({"app": "server"}), (ServicePort(80, APP_PORT),), VIP)
# Selects the same pod, but none of its ports forwards to APP_PORT: never the guess for APP_PORT.
ADMIN = Service("admin", "shop", MappingProxyType({"app": "server"}), (ServicePort(9000, 9000),))


def pods(net: Net) -> list[Pod]:
    return [
        make_pod(net, "client", "node1", 10),
        make_pod(net, "neighbour", "node2", 11),  # the server's node: the same-node path
        make_pod(net, "legacy", "node1", 12, ns="legacy"),  # not in the mesh: plaintext on :15006
        make_pod(net, "server", "node2", 20),
    ]


def service_series(c: Cluster, node: str, source: str, reporter: str) -> dict[str, float]:
    """destination_service -> connections closed, of one source workload as `reporter` saw them on `node`."""
    found: dict[str, float] = {}
    for metric in c.registries[node].collect():
        for s in metric.samples:
            if (
                s.name == "istio_tcp_connections_closed_total"
                and s.labels["reporter"] == reporter
                and s.labels["source_workload"] == source
            ):
                found[s.labels["destination_service"]] = found.get(s.labels["destination_service"], 0) + s.value
    return found


async def exchange(c: Cluster, source: str, target: SocketAddress, via: int = sockets.OUTBOUND_PORT) -> None:
    sock = await connect_captured(c.net, c.pod(source), target, via)
    with sock:
        await asyncio.get_running_loop().sock_sendall(sock, b"hello")
        sock.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(10):
            got = await recv_all(sock)
    assert got.nbytes == 5


@pytest.mark.parametrize(
    ("source", "dial", "via", "outbound", "inbound"),
    [
        ("client", "vip", sockets.OUTBOUND_PORT, "web.shop.svc.cluster.local", "web.shop.svc.cluster.local"),
        ("client", "pod", sockets.OUTBOUND_PORT, "unknown", "web.shop.svc.cluster.local"),
        ("neighbour", "vip", sockets.OUTBOUND_PORT, "web.shop.svc.cluster.local", "web.shop.svc.cluster.local"),
        ("legacy", "pod", sockets.INBOUND_PLAINTEXT_PORT, None, "web.shop.svc.cluster.local"),
    ],
    ids=["hbone-via-vip", "hbone-via-pod-ip", "same-node-via-vip", "plaintext-15006"],
)
async def test_destination_service_on_both_reporters(
    tmp_path: Path, *, source: str, dial: str, via: int, outbound: str | None, inbound: str
) -> None:
    async with cluster(tmp_path, pods) as c:
        c.inventory[0] = dataclasses.replace(c.inventory[0], services=(ADMIN, WEB))
        await c.start_both()
        server = c.pod("server")
        assert server.ip is not None
        app = ByteServer(server.ip, size=5).start()
        try:
            target = SocketAddress(VIP, 80) if dial == "vip" else SocketAddress(server.ip, APP_PORT)
            await exchange(c, source, target, via)
        finally:
            await app.close()
        source_node = c.pod(source).node
        async with asyncio.timeout(5):
            while any(len(t.table) for t in c.tunnels.values()):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert service_series(c, "node2", source, "destination") == {inbound: 1}
        if outbound is not None:
            assert service_series(c, source_node, source, "source") == {outbound: 1}


def _inspect_services(admin: str) -> str:
    parser = argparse.ArgumentParser()
    inspect.register_inspect(parser.add_subparsers())
    args = parser.parse_args(["services", "--admin", admin])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return out.getvalue()


async def test_config_dump_services_and_inspect_services(tmp_path: Path) -> None:
    """Each Service with its VIP, ports and selected pods (an unready one Unhealthy, as its workload entry);
    `inspect services` prints istioctl's columns with ENDPOINTS healthy/all."""

    def with_unready(net: Net) -> list[Pod]:
        unready = dataclasses.replace(make_pod(net, "server2", "node2", 21), labels={"app": "server"}, ready=False)
        # A host-network pod (its node's IP): an endpoint the VIP routes to, not a workload address.
        hostnet = dataclasses.replace(
            make_pod(net, "exporter", "node2", 99), labels={"app": "server"}, host_network=True
        )
        return [*pods(net), unready, hostnet]

    async with cluster(tmp_path, with_unready) as c:
        c.inventory[0] = dataclasses.replace(c.inventory[0], services=(ADMIN, WEB))
        t1, _ = await c.start_both()
        host, port = t1.addresses["admin"]

        def fetch() -> dict:  # type: ignore[type-arg]
            with urllib.request.urlopen(f"http://{host}:{port}/config_dump", timeout=5) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]

        dump = await asyncio.to_thread(fetch)
        server, server2, exporter = c.pod("server"), c.pod("server2"), c.pod("exporter")
        web = next(s for s in dump["services"] if s["name"] == "web")
        assert web["hostname"] == "web.shop.svc.cluster.local"
        assert web["vips"] == [f"/{VIP}"] and web["ports"] == {"80": APP_PORT}
        assert {uid: (e["port"], e["status"]) for uid, e in web["endpoints"].items()} == {
            server.uid: ({"80": APP_PORT}, "Healthy"),
            server2.uid: ({"80": APP_PORT}, "Unhealthy"),
            exporter.uid: ({"80": APP_PORT}, "Healthy"),
        }
        admin = next(s for s in dump["services"] if s["name"] == "admin")
        assert admin["vips"] == [] and set(admin["endpoints"]) == {server.uid, server2.uid}
        status = {w["name"]: w["status"] for w in dump["workloads"]}
        assert status["server"] == "Healthy" and status["server2"] == "Unhealthy"

        table = await asyncio.to_thread(_inspect_services, f"{host}:{port}")
        assert [line.split() for line in table.splitlines()] == [
            ["NAMESPACE", "SERVICE", "NAME", "SERVICE", "VIP", "WAYPOINT", "ENDPOINTS"],
            ["shop", "admin", "None", "1/2"],  # headless: no VIP
            ["shop", "web", str(VIP), "None", "2/3"],
        ], table
