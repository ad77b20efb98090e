"""The istioctl-style rows of `nodeagent inspect workloads|connections|policies|certificates`, and their
-n NAMESPACE selection, from config_dump shapes."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.admin_client import identity_namespace, table
from nodeagent.ca.commands import certificates_in
from nodeagent.ztunnel.inspect import (
    address_names,
    connection_rows,
    connections_in,
    entries_in,
    policy_rows,
    service_rows,
    workload_rows,
)

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


def test_workload_rows_are_sorted() -> None:
    assert workload_rows(WORKLOADS) == [
        ("legacy", "batch", "10.10.2.3", "node2", "None", "TCP"),
        ("shop", "checkout", "10.10.2.2", "node2", "None", "HBONE"),
    ]


@pytest.mark.parametrize(("namespace", "names"), [(None, ["checkout", "batch"]), ("shop", ["checkout"]), ("x", [])])
def test_entries_in_a_namespace(namespace: str | None, names: list[str]) -> None:
    assert [w["name"] for w in entries_in(WORKLOADS, namespace)] == names


INBOUND_LEGACY = {**CONNECTIONS["inbound"][0], "dstWorkload": "batch.v2.legacy", "srcWorkload": "frontend.shop"}
POOLED = {"sourceIdentity": "spiffe://cluster.local/ns/shop/sa/frontend", "activeStreams": 1}


@pytest.mark.parametrize(
    ("namespace", "outbound", "inbound", "pool"),
    [
        (None, 1, 2, 1),
        ("shop", 1, 1, 1),  # inbound rows belong to their destination; outbound to their source
        ("legacy", 0, 1, 0),  # a dotted workload name: the namespace is the last part
        ("frontend", 0, 0, 0),
    ],
)
def test_connections_in_a_namespace(namespace: str | None, outbound: int, inbound: int, pool: int) -> None:
    dump: dict[str, Any] = {**CONNECTIONS, "inbound": [*CONNECTIONS["inbound"], INBOUND_LEGACY], "pool": [POOLED]}
    got = connections_in(dump, namespace)
    assert (len(got["outbound"]), len(got["inbound"]), len(got["pool"])) == (outbound, inbound, pool)
    assert dump["inbound"][1] is INBOUND_LEGACY  # the dump itself is not changed


@pytest.mark.parametrize(("namespace", "direction", "kept"), [(None, "inbound", 2), ("shop", "outbound", 1)])
def test_connections_in_one_direction(namespace: str | None, direction: str, kept: int) -> None:
    """--direction narrows -o json|yaml as it narrows the table: the other direction's list is gone."""
    dump: dict[str, Any] = {**CONNECTIONS, "inbound": [*CONNECTIONS["inbound"], INBOUND_LEGACY], "pool": [POOLED]}
    got = connections_in(dump, namespace, direction)
    assert set(got) == {direction, "pool"} and len(got[direction]) == kept


@pytest.mark.parametrize(
    ("uri", "namespace"),
    [
        ("spiffe://cluster.local/ns/shop/sa/frontend", "shop"),
        ("cluster.local/ns/shop/sa/frontend", "shop"),  # Istio principal form
        ("spiffe://cluster.local/shop", None),
        (None, None),
    ],
)
def test_identity_namespace(uri: object, namespace: str | None) -> None:
    assert identity_namespace(uri) == namespace


def test_certificates_in_a_namespace() -> None:
    dump = [{"identity": "spiffe://td/ns/shop/sa/a"}, {"identity": "spiffe://td/ns/legacy/sa/b"}, {"identity": "?"}]
    assert [e["identity"] for e in certificates_in(dump, "legacy")] == ["spiffe://td/ns/legacy/sa/b"]
    assert certificates_in(dump, None) == dump


def test_connection_rows_take_each_direction_from_the_local_side() -> None:
    inbound, out = connection_rows(CONNECTIONS, wide=False)  # raw addresses: istioctl's --raw
    assert out == ("frontend.shop", "Outbound", "10.10.1.2:40000", "10.10.2.2:15008", "10.10.2.2:8080", "HBONE")
    assert inbound == ("checkout.shop", "Inbound", "10.10.2.2:8080", "10.10.1.2:40000", "10.10.2.2:8080", "HBONE")


DUMP = {
    "workloads": [*WORKLOADS, {"name": "frontend", "namespace": "shop", "workloadIps": ["10.10.1.2"]}],
    "services": [{"hostname": "checkout.shop.svc.cluster.local", "vips": ["/10.96.0.10"]}],
}
VIA_VIP = {**CONNECTIONS["outbound"][0], "originalDst": "10.96.0.10:80"}


def test_connection_rows_name_addresses_as_istioctl_does() -> None:
    """Service VIPs by hostname, workload IPs as name.namespace; an inbound REMOTE TARGET stays raw."""
    rows = connection_rows({"outbound": [VIA_VIP], "inbound": CONNECTIONS["inbound"]}, False, address_names(DUMP))
    assert rows == [
        ("checkout.shop", "Inbound", "checkout.shop:8080", "frontend.shop:40000", "10.10.2.2:8080", "HBONE"),
        (
            "frontend.shop",
            "Outbound",
            "frontend.shop:40000",
            "checkout.shop:15008",
            "checkout.shop.svc.cluster.local:80",
            "HBONE",
        ),
    ]


def _conn(kind: str, workload: str, src: str) -> dict[str, str]:
    return {"src": src, "srcWorkload" if kind == "outbound" else "dstWorkload": workload}


def test_connection_rows_group_by_workload_inbound_first() -> None:
    """istioctl's order: workloads by namespace then name; each one's inbound rows, then its outbound ones
    (in the dump's order within each); --direction keeps one direction."""
    dump = {
        "outbound": [_conn("outbound", "web.shop", "o1"), _conn("outbound", "api.shop", "o2")],
        "inbound": [
            _conn("inbound", "web.shop", "i1"),
            _conn("inbound", "batch.legacy", "i2"),
            _conn("inbound", "web.shop", "i3"),
        ],
    }
    order = [(r[0], r[1], r[3] if r[1] == "Inbound" else r[2]) for r in connection_rows(dump, wide=False)]
    assert order == [
        ("batch.legacy", "Inbound", "i2"),
        ("api.shop", "Outbound", "o2"),
        ("web.shop", "Inbound", "i1"),
        ("web.shop", "Inbound", "i3"),
        ("web.shop", "Outbound", "o1"),
    ]
    assert [r[1] for r in connection_rows(dump, wide=False, direction="outbound")] == ["Outbound", "Outbound"]


def test_connection_direction_is_spelled_as_istioctl_spells_it() -> None:
    """istioctl ztunnel-config connections prints `Inbound` / `Outbound` (istioctl/pkg/writer/ztunnel/
    configdump/connections.go); users grep for those words. The dump's own keys stay lowercase."""
    assert sorted(row[1] for row in connection_rows(CONNECTIONS, wide=True)) == ["Inbound", "Outbound"]
    assert set(CONNECTIONS) == {"outbound", "inbound", "pool"}


def test_wide_connection_rows_carry_both_identities() -> None:
    row = connection_rows(CONNECTIONS, wide=True, direction="outbound")[0]
    assert row[-2:] == ("spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/shop/sa/checkout")


def test_policy_rows_cover_authorization_and_peer_authentication() -> None:
    dump: list[dict[str, Any]] = [
        {"name": "deny-legacy", "namespace": "shop", "action": "Deny", "scope": "Namespace", "rules": 1},
        {"name": "strict", "namespace": "shop", "kind": "PeerAuthentication", "mode": "STRICT", "scope": "Namespace"},
        {"name": "old", "namespace": "shop", "kind": "PeerAuthentication", "mode": "STRICT"},  # an older tunnel's
    ]
    assert policy_rows(dump) == [
        ("shop", "deny-legacy", "Deny", "Namespace"),
        ("shop", "old", "STRICT", "PeerAuthentication"),
        ("shop", "strict", "STRICT", "Namespace"),
    ]


def test_table_aligns_columns_without_trailing_blanks() -> None:
    text = table(("A", "LONG NAME"), [("x", "y"), ("longer", "")])
    assert text.splitlines() == ["A        LONG NAME", "x        y", "longer"]


def _endpoint(uid: str, status: str) -> dict[str, Any]:
    return {"workloadUid": uid, "service": "", "port": {"80": 8080}, "status": status}


SERVICES = [
    {
        "name": "web",
        "namespace": "shop",
        "vips": ["/10.96.0.10"],
        "endpoints": {"a": _endpoint("a", "Healthy"), "b": _endpoint("b", "Unhealthy")},
    },
    {"name": "db", "namespace": "shop", "vips": [], "endpoints": {}},  # headless, nothing selected
    {"name": "api", "namespace": "api", "vips": ["net1/10.96.0.11", "/10.96.0.12"], "endpoints": {}},
]


def test_service_rows_as_istioctl_prints_them() -> None:
    """VIPs without their network prefix, WAYPOINT None, ENDPOINTS healthy/all; sorted by namespace, name."""
    assert service_rows(SERVICES) == [
        ("api", "api", "10.96.0.11,10.96.0.12", "None", "0/0"),
        ("shop", "db", "", "None", "0/0"),
        ("shop", "web", "10.96.0.10", "None", "1/2"),
    ]
