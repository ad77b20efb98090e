"""The istioctl-style rows of `nodeagent inspect workloads|connections|policies`, from config_dump shapes."""

from __future__ import annotations

from nodeagent.admin_client import table
from nodeagent.ztunnel.inspect import connection_rows, policy_rows, workload_rows

WORKLOADS = [
    {"name": "checkout", "namespace": "shop", "workloadIps": ["10.10.2.2"], "node": "node2", "protocol": "HBONE"},
    {"name": "batch", "namespace": "legacy", "workloadIps": ["10.10.2.3"], "node": "node2", "protocol": "TCP"},
]

CONNECTIONS = {
    "outbound": [
        {
            "src": "10.10.1.2:40000",
            "originalDst": "10.10.2.2:8080",
            "actualDst": "10.10.2.2:15008",
            "protocol": "HBONE",
            "srcWorkload": "frontend.shop",
            "dstWorkload": "checkout.shop",
            "srcIdentity": "spiffe://cluster.local/ns/shop/sa/frontend",
            "dstIdentity": "spiffe://cluster.local/ns/shop/sa/checkout",
        }
    ],
    "inbound": [
        {
            "src": "10.10.1.2:40000",
            "originalDst": "10.10.2.2:8080",
            "actualDst": "10.10.2.2:8080",
            "protocol": "HBONE",
            "srcWorkload": "frontend.shop",
            "dstWorkload": "checkout.shop",
            "srcIdentity": "spiffe://cluster.local/ns/shop/sa/frontend",
            "dstIdentity": "spiffe://cluster.local/ns/shop/sa/checkout",
        }
    ],
    "pool": [],
}


def test_workload_rows_are_sorted_and_filtered_by_namespace() -> None:
    assert workload_rows(WORKLOADS, None) == [
        ("legacy", "batch", "10.10.2.3", "node2", "None", "TCP"),
        ("shop", "checkout", "10.10.2.2", "node2", "None", "HBONE"),
    ]
    assert [r[1] for r in workload_rows(WORKLOADS, "shop")] == ["checkout"]


def test_connection_rows_take_each_direction_from_the_local_side() -> None:
    out, inbound = connection_rows(CONNECTIONS, wide=False)
    assert out == ("frontend.shop", "outbound", "10.10.1.2:40000", "10.10.2.2:15008", "10.10.2.2:8080", "HBONE")
    assert inbound == ("checkout.shop", "inbound", "10.10.2.2:8080", "10.10.1.2:40000", "10.10.2.2:8080", "HBONE")


def test_wide_connection_rows_carry_both_identities() -> None:
    row = connection_rows(CONNECTIONS, wide=True)[0]
    assert row[-2:] == ("spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/shop/sa/checkout")


def test_policy_rows_cover_authorization_and_peer_authentication() -> None:
    dump = [
        {"name": "deny-legacy", "namespace": "shop", "action": "Deny", "scope": "Namespace", "rules": 1},
        {"name": "strict", "namespace": "shop", "kind": "PeerAuthentication", "mode": "STRICT"},
    ]
    assert policy_rows(dump, None) == [
        ("shop", "deny-legacy", "Deny", "Namespace"),
        ("shop", "strict", "STRICT", "PeerAuthentication"),
    ]


def test_table_aligns_columns_without_trailing_blanks() -> None:
    text = table(("A", "LONG NAME"), [("x", "y"), ("longer", "")])
    assert text.splitlines() == ["A        LONG NAME", "x        y", "longer"]
