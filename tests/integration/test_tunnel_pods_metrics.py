"""The tunnel's count of the pods it serves (ztunnel's active proxy count and proxies started / stopped):
`nodeagent_tunnel_pods` and `nodeagent_tunnel_pods_{started,stopped}_total`, scraped from its metrics
endpoint while a node agent's ZDS server adds, removes and re-snapshots pods.

Why: the tunnel reported connections but not how many pods it serves, so a tunnel that refused or lost
pods the agent enrolled looked healthy. Oracle: a scrape of the tunnel's /metrics (tests/metrics_scrape.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from metrics_scrape import scrape_until
from tunnel_harness import Net, cluster, make_pod

from nodeagent.agent.zds_server import SnapshotEntry, ZdsServer
from nodeagent.model import Pod
from nodeagent.ztunnel.zds_client import Backoff

PODS, STARTED, STOPPED = (
    "nodeagent_tunnel_pods",
    "nodeagent_tunnel_pods_started_total",
    "nodeagent_tunnel_pods_stopped_total",
)


def pods(net: Net) -> list[Pod]:
    return [make_pod(net, "web", "node1", 10), make_pod(net, "cart", "node1", 11), make_pod(net, "db", "node2", 20)]


@pytest.fixture
def zds_path() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="tunnel-zds-", dir="/tmp")
    yield os.path.join(root, "ztunnel.sock")
    shutil.rmtree(root)


def counts(samples: dict[str, float]) -> tuple[float, float, float]:
    return samples[PODS], samples[STARTED], samples[STOPPED]


async def test_the_pods_gauge_follows_zds_adds_deletes_and_snapshots(tmp_path: Path, zds_path: str) -> None:
    async with cluster(tmp_path, pods) as c:
        web, cart = c.pod("web"), c.pod("cart")
        netns = os.open("/dev/null", os.O_RDONLY)  # a stand-in: the loopback socket factory places the listeners
        enrolled: list[SnapshotEntry] = [(web, netns), (cart, netns)]
        zds = ZdsServer(lambda: list(enrolled), zds_path)
        await zds.start()
        try:
            tunnel = await c.start_tunnel("node1", zds_socket=zds_path, zds_backoff=Backoff(0.01, 0.05))
            metrics = tunnel.addresses["metrics"]
            await c.wait_ready(tunnel)
            got = await scrape_until(metrics, lambda s: s[PODS] == 2, "both pods of the snapshot served")
            assert counts(got) == (2, 2, 0)

            # The agent restarts: its snapshot names web (same netns: its listeners stay, no new start) but no
            # longer cart, which the tunnel drops; then the agent adds cart again, and releases it.
            await zds.close()
            enrolled[:] = [(web, netns)]
            zds = ZdsServer(lambda: list(enrolled), zds_path)
            await zds.start()
            got = await scrape_until(metrics, lambda s: s[PODS] == 1, "cart, left out of the snapshot, dropped")
            assert counts(got) == (1, 2, 1)
            assert (await zds.add(cart, netns)).ok
            got = await scrape_until(metrics, lambda s: s[PODS] == 2, "cart served again")
            assert counts(got) == (2, 3, 1)
            await zds.delete(cart.uid)
            got = await scrape_until(metrics, lambda s: s[PODS] == 1, "the deleted pod no longer served")
            assert counts(got) == (1, 3, 2)

            await tunnel.drain()  # listeners closed: a draining tunnel serves no new connection of any pod
            got = await scrape_until(metrics, lambda s: s[PODS] == 0, "no pod served while draining")
            assert counts(got) == (0, 3, 2)
        finally:
            await zds.close()
            os.close(netns)
