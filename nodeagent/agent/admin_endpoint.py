"""The agent's admin endpoints: /config_dump with a `redirects` section read from the kernel per request,
and /healthz/ready on a unix socket in the pod's own volume, for the DaemonSet's readiness probe.

Why this module exists: `nodeagent inspect redirects --node NODE` reaches a cluster node through the
API server's pods/portforward (nodeagent/kube_remote.py explains why port-forward rather than exec), so
something on the node's localhost must answer with the node's redirects. This endpoint runs the very
code `inspect redirects` runs on a node (agent/inspect.collect: iptables-save, routes and `ss` inside
each pod's netns, the kubelet-probe chain in the node's) at request time, with its own netns resolver: it
does not report the reconciler's records, so an agent that believes a pod is captured cannot hide a
missing rule. Only the pod list (the agent's current inventory, i.e. the API server's) and the STATUS
column (the status file) come from the agent, exactly as on the node.

Bound to 127.0.0.1 only (like the tunnel's 15000): nothing pod-facing. During a rolling update the
surge pod's agent (hostNetwork) finds the port taken; it retries every few seconds instead of failing,
because a debugging endpoint must never stop the data plane.

Readiness (`nodeagent agent --ready-socket PATH`) answers for this agent alone: on hostNetwork every TCP
port of the node is shared with a rolling update's other pod, and the ZDS socket (a hostPath) too, so
neither the tunnel's readiness nor any port can tell whether THIS pod's agent works. What "ready" means
is the agent's (service.Agent.readiness_pending, kube_agent.KubeAgent.readiness_pending); this module only
serves it, from the moment the agent starts, so a probe hears what is pending rather than a refused
connection.

What it deliberately does not do: no other sections (the tunnel's dump has the mesh state), no writes, no
readiness on the TCP port (during a rolling update it belongs to the old pod's agent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nodeagent.admin import CONFIG_DUMP, LOGGING, READY, AdminServer
from nodeagent.agent.inspect import Layout, collect
from nodeagent.agent.netns_resolver import NetnsResolver
from nodeagent.model import Inventory

log = logging.getLogger(__name__)

DEFAULT_AGENT_ADMIN = "127.0.0.1:15002"
# The agent runs in the node's netns (hostNetwork): its own is the node's, for the kubelet-probe chain.
OWN_NETNS = "/proc/self/ns/net"


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def redirects_server(
    node: str,
    inventory: Callable[[], Inventory | None],
    layout: Layout,
    resolver: NetnsResolver | None,
) -> AdminServer:
    """An AdminServer serving /config_dump {"redirects": ...} for `node` (pure construction, no I/O)."""
    server = AdminServer(routes={CONFIG_DUMP, LOGGING})

    async def redirects() -> dict[str, Any]:
        current = inventory()
        if current is None:
            raise RuntimeError("the agent has not listed its pods yet; try again once it is ready")
        report = await collect(current, [node], layout, resolver)
        return report.as_dict()

    server.add_async_config_provider("redirects", redirects)
    return server


async def serve(server: AdminServer, address: tuple[str, int], what: str = "agent admin endpoint") -> None:
    """Serve until cancelled; while the address is taken (a rolling update's old pod), retry (`what` names
    the endpoint in the log)."""
    await server.start_when_free(*address, what=what)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def readiness_server(pending: Callable[[], str | None]) -> AdminServer:
    """An AdminServer serving only /healthz/ready: 200 when `pending()` is None, else 500 and what is pending
    (pure construction; `await server.start_unix(path)` serves it)."""
    server = AdminServer(routes=(READY,))
    server.add_readiness_check("agent", pending)
    return server
