"""Run one loopback tunnel (node2 of tunnel_harness's cluster) as its own process, for RSS measurements.

Usage: python loopback_tunnel.py BASE CA_TARGET BUNDLE_PATH [NODE]. NODE node2 (default) serves the
server pod; node1 serves the client pod and sends every captured connection to server:8080 (a fixed
original destination, for throughput runs from another process). Prints `ready` once its certificates
are in, then serves until SIGTERM (drain, stop), like `nodeagent tunnel`.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvloop
from identity_support import NODE1_TOKEN, NODE2_TOKEN
from prometheus_client import CollectorRegistry
from tunnel_harness import APP_PORT, LoopbackSockets, Net, make_inventory, make_pod

from nodeagent.ca.client import CAClient
from nodeagent.metrics import CertManagerMetrics
from nodeagent.model import SocketAddress
from nodeagent.policy import PolicySet
from nodeagent.zds.codec import Workload
from nodeagent.ztunnel.certs import CertificateManager, CertManagerInputs
from nodeagent.ztunnel.proxy.tunnel import Tunnel, TunnelInputs


async def main(base: str, ca_target: str, bundle: Path, node: str) -> None:
    net = Net(base=base)
    pods = [make_pod(net, "client", "node1", 10), make_pod(net, "server", "node2", 20)]
    inventory = make_inventory(pods)
    token = NODE1_TOKEN if node == "node1" else NODE2_TOKEN
    client = CAClient(ca_target, token=lambda: token, bundle_pem=bundle.read_text)
    served = pods[0] if node == "node1" else pods[1]
    assert pods[1].ip is not None
    fixed = SocketAddress(pods[1].ip, APP_PORT)
    factory = LoopbackSockets(net, {p.uid: p.ip for p in pods if p.ip is not None})
    if node == "node1":
        factory.original_dst = lambda sock: fixed  # type: ignore[method-assign]
    registry = CollectorRegistry()
    certs = CertificateManager(
        CertManagerInputs(fetch=client.fetch, bundle_path=bundle, metrics=CertManagerMetrics(registry))
    )
    policies = PolicySet()
    tunnel = Tunnel(
        TunnelInputs(
            node=node,
            socket_factory=factory,
            credentials=certs,
            inventory=lambda: inventory,
            policies=lambda: policies,
            registry=registry,
            admin=None,
            metrics=None,
            ready=("127.0.0.1", 0),
            grace=5.1,
        )
    )
    server = served
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    import signal

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await tunnel.start()
    await tunnel.add_pod(Workload(server.uid, server.name, server.namespace, server.service_account), None)
    while tunnel.readiness.readiness():  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    print("ready", flush=True)
    await stop.wait()
    await tunnel.drain()
    await tunnel.stop()
    await client.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "node2"))
