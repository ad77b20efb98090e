"""Table for nodeagent.ztunnel.local.same_node_destination: which plans the tunnel delivers itself."""

from __future__ import annotations

import ipaddress

import pytest

from nodeagent.model import Identity, Pod, SocketAddress
from nodeagent.ztunnel.edges import LocalPod
from nodeagent.ztunnel.local import same_node_destination
from nodeagent.ztunnel.routing import Denial, Hbone, OutboundPlan, Passthrough, PoolKey, Workload

TD = "cluster.local"
ip = ipaddress.IPv4Address
SERVER = Pod("server", "mesh", "uid-server", "node1", "server-sa", ip("10.1.0.7"))
SERVER_ID = Identity(TD, "mesh", "server-sa")
CLIENT_ID = Identity(TD, "mesh", "client-sa")
TARGET = SocketAddress(ip("10.1.0.7"), 8080)
HBONE = Hbone(TARGET, PoolKey(CLIENT_ID, SERVER_ID, ip("10.1.0.5"), SocketAddress(TARGET.ip, 15008)), "mesh/server")
SERVED = LocalPod("uid-server", "server", "mesh", SERVER_ID, None)
RENAMED = LocalPod("uid-server", "server", "mesh", Identity(TD, "mesh", "other-sa"), None)
WORKLOAD = Workload(SERVER, SERVER_ID, enrolled=True)

CASES: list[tuple[str, OutboundPlan | Denial, Workload | None, dict[str, LocalPod], bool]] = [
    ("enrolled pod served here", HBONE, WORKLOAD, {"uid-server": SERVED}, True),
    ("served by another tunnel (another node)", HBONE, WORKLOAD, {}, False),
    ("served here under another identity", HBONE, WORKLOAD, {"uid-server": RENAMED}, False),
    ("unknown workload", HBONE, None, {"uid-server": SERVED}, False),
    (
        "passthrough to a pod served here",
        Passthrough(TARGET, "not in the mesh"),
        WORKLOAD,
        {"uid-server": SERVED},
        False,
    ),
    ("denial", Denial("loop"), WORKLOAD, {"uid-server": SERVED}, False),
    (
        "workload is not the plan's target",
        Hbone(SocketAddress(ip("10.1.0.8"), 8080), HBONE.pool_key, "mesh/other"),
        WORKLOAD,
        {"uid-server": SERVED},
        False,
    ),
]


@pytest.mark.parametrize(("plan", "workload", "served", "local"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_same_node_destination(
    plan: OutboundPlan | Denial, workload: Workload | None, served: dict[str, LocalPod], local: bool
) -> None:
    got = same_node_destination(plan, workload, served.get)
    assert got is (SERVED if local else None)
