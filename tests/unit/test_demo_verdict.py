"""The demo's verdict on what tcpdump saw on the fabric: a capture that saw nothing is not "plaintext"."""

from __future__ import annotations

import pytest

from nodeagent.demo import MARKER, OUTSIDER_MARKER, fabric_verdict, parse_tcpdump, redirects_heading

MESH = {"10.10.1.10", "10.10.2.10"}
TLS = (
    "12:00:00.000001 IP 10.10.1.10.35562 > 10.10.2.10.15008: Flags [P.], seq 1:518, length 517\n"
    "E..........\n"
    "12:00:00.000002 IP 10.10.2.10.15008 > 10.10.1.10.35562: Flags [.], ack 518, length 0\n"
)
OUTSIDER = f"12:00:00.000003 IP 10.10.2.11.45874 > 10.10.1.11.8080: Flags [P.], length 16\n..{OUTSIDER_MARKER}\n"
PLAIN = f"12:00:00.000004 IP 10.10.1.10.50000 > 10.10.2.10.8080: Flags [P.], length 21\n..{MARKER}\n"


def test_parse_counts_packets_between_mesh_pods_by_service_port() -> None:
    seen = parse_tcpdump(TLS + OUTSIDER, MESH)
    assert seen == {"mesh_packets": 2, "mesh_ports": {"15008": 2}, "marker_seen": False, "outsider_marker_seen": True}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TLS + OUTSIDER, None),
        ("", "tcpdump captured nothing between shop/frontend and shop/checkout"),
        (OUTSIDER, "tcpdump captured nothing between shop/frontend and shop/checkout"),
        (TLS + OUTSIDER + PLAIN, "the fabric carried plaintext between enrolled pods"),
        (TLS, "tcpdump did not see legacy/batch's plaintext either"),
    ],
    ids=["only-mtls", "empty-capture", "no-mesh-packets", "plaintext", "missed-outsider"],
)
def test_verdict(text: str, expected: str | None) -> None:
    verdict = fabric_verdict(parse_tcpdump(text, MESH))
    if expected is None:
        assert verdict is None
    else:
        assert verdict is not None and verdict.startswith(expected), verdict


def test_an_empty_capture_is_never_called_plaintext() -> None:
    verdict = fabric_verdict(parse_tcpdump("", MESH))
    assert verdict is not None and "plaintext" not in verdict.split(",")[0]


@pytest.mark.parametrize(
    ("capture", "tools"),
    [("iptables", "iptables-save and ss"), ("ebpf", "eBPF programs and maps"), ("auto", "whichever backend")],
)
def test_redirects_heading_names_the_backends_tools(capture: str, tools: str) -> None:
    heading = redirects_heading(capture)
    assert tools in heading
    if capture == "ebpf":
        assert "iptables" not in heading
