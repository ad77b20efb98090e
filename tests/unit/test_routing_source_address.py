"""Table for nodeagent.ztunnel.routing.source_address: who a captured connection is attributed to."""

from __future__ import annotations

import ipaddress

import pytest

from nodeagent.model import Pod, SocketAddress
from nodeagent.ztunnel.routing import source_address


def pod(addr: str | None) -> Pod:
    return Pod("frontend", "shop", "uid-frontend", "node1", "frontend", ipaddress.ip_address(addr) if addr else None)


@pytest.mark.parametrize(
    ("pod_ip", "peer", "expected"),
    [
        # The app connected from the pod's own IP (iptables capture, eBPF with an unbound socket): as is.
        ("10.10.1.10", "10.10.1.10:40000", "10.10.1.10:40000"),
        # eBPF capture, the app bound 127.0.0.1 (or the BPF config had no pod IP yet): the pod's IP.
        ("10.10.1.10", "127.0.0.1:40000", "10.10.1.10:40000"),
        ("10.10.1.10", "127.0.0.5:41000", "10.10.1.10:41000"),
        # Any other address in the pod's netns (a second interface): still the pod's IP.
        ("10.10.1.10", "192.168.7.3:42000", "10.10.1.10:42000"),
        # No IP known for the pod: left alone (plan_outbound denies such a source anyway).
        (None, "127.0.0.1:40000", "127.0.0.1:40000"),
    ],
)
def test_source_address(pod_ip: str | None, peer: str, expected: str) -> None:
    assert source_address(pod(pod_ip), SocketAddress.parse(peer)) == SocketAddress.parse(expected)
