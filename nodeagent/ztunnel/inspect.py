"""`nodeagent inspect workloads|services|connections|policies`: the tunnel's view, in istioctl ztunnel-config
columns.

Why this module exists: operators know `istioctl ztunnel-config workloads|services|connections|policies`; these
commands print the same columns from the node tunnel's /config_dump, so the mesh's state on a node can
be read without learning a new vocabulary. The row builders are pure functions of the dump, and so are
the `-n NAMESPACE` selectors, which narrow a section in its own shape before it is printed in any form
(kubectl's -n: JSON and YAML show what the table shows).

What it deliberately does not do: it reports what the tunnel holds; what the kernel holds (capture rules,
listeners) is `nodeagent inspect redirects`, which reads the kernel itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

from nodeagent.admin_client import (
    add_admin_arguments,
    add_namespace_arguments,
    identity_namespace,
    namespace_of,
    print_section,
    table,
)

WORKLOAD_COLUMNS = ("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL")
CONNECTION_COLUMNS = ("WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL")
CONNECTION_WIDE_COLUMNS = (*CONNECTION_COLUMNS, "SOURCE IDENTITY", "DESTINATION IDENTITY")
POLICY_COLUMNS = ("NAMESPACE", "POLICY NAME", "ACTION", "SCOPE")
SERVICE_COLUMNS = ("NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS")


def workload_rows(dump: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    rows = [
        (
            str(w.get("namespace", "")),
            str(w.get("name", "")),
            ",".join(w.get("workloadIps") or []),
            str(w.get("node", "")),
            str(w.get("waypoint") or "None"),
            str(w.get("protocol", "")),
        )
        for w in dump
    ]
    return sorted(rows)


def service_rows(dump: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """As istioctl prints services: VIPs without their network prefix, ENDPOINTS as healthy/all."""
    rows = []
    for svc in dump:
        endpoints = list((svc.get("endpoints") or {}).values())
        healthy = sum(1 for e in endpoints if e.get("status") == "Healthy")
        rows.append(
            (
                str(svc.get("namespace", "")),
                str(svc.get("name", "")),
                ",".join(str(v).rpartition("/")[2] for v in svc.get("vips") or []),
                str(svc.get("waypoint") or "None"),
                f"{healthy}/{len(endpoints)}",
            )
        )
    return sorted(rows)


def address_names(dump: Mapping[str, Any]) -> dict[str, str]:
    """IP -> what istioctl prints for it: a service VIP as its hostname, a workload IP as name.namespace."""
    names: dict[str, str] = {}
    for w in dump.get("workloads") or []:
        for ip in (w.get("workloadIps") or [])[:1]:
            names[str(ip)] = f"{w.get('name', '')}.{w.get('namespace', '')}"
    for svc in dump.get("services") or []:
        for vip in (svc.get("vips") or [])[:1]:
            names[str(vip).rpartition("/")[2]] = str(svc.get("hostname", ""))
    return names


def _named(address: object, names: Mapping[str, str]) -> str:
    """`ip:port` with the IP's name from `names`, as istioctl's lookupIP; anything else as it is."""
    ip, sep, port = str(address).rpartition(":")
    name = names.get(ip) if sep else None
    return f"{name}:{port}" if name else str(address)


def connection_rows(
    dump: Mapping[str, Any], wide: bool, names: Mapping[str, str] | None = None, direction: str | None = None
) -> list[tuple[str, ...]]:
    """As istioctl ztunnel-config connections: grouped by local workload (by namespace, then name), its
    inbound rows before its outbound ones; outbound rows seen from the source workload, inbound rows from
    the destination. `names` (address_names) replaces addresses by service hostnames and workload names
    where istioctl does (not in an inbound REMOTE TARGET); None prints them raw (its --raw). DIRECTION is
    spelled as istioctl spells it (`Inbound`, `Outbound`); the dump's keys stay lowercase."""
    lookup = names or {}
    keyed = []
    for kind in ("inbound", "outbound"):
        if direction not in (None, kind):
            continue
        for c in dump.get(kind) or []:
            if kind == "inbound":
                workload = str(c.get("dstWorkload", ""))
                row: tuple[Any, ...] = (
                    workload,
                    "Inbound",
                    _named(c.get("originalDst", ""), lookup),
                    _named(c.get("src", ""), lookup),
                    c.get("originalDst", ""),
                    c.get("protocol", ""),
                )
            else:
                workload = str(c.get("srcWorkload", ""))
                row = (
                    workload,
                    "Outbound",
                    _named(c.get("src", ""), lookup),
                    _named(c.get("actualDst", ""), lookup),
                    _named(c.get("originalDst", ""), lookup),
                    c.get("protocol", ""),
                )
            if wide:
                row = (*row, c.get("srcIdentity", ""), c.get("dstIdentity", ""))
            name, _, namespace = workload.rpartition(".")
            keyed.append(((namespace, name, kind != "inbound"), tuple(str(x) for x in row)))
    keyed.sort(key=lambda item: item[0])  # stable: within a workload and direction, the dump's order
    return [row for _, row in keyed]


def policy_rows(dump: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """ACTION is an AuthorizationPolicy's Allow/Deny or a PeerAuthentication's mTLS mode; SCOPE is where
    either applies (ztunnel's RbacScope: Global, Namespace, WorkloadSelector). A tunnel older than this
    CLI dumps PeerAuthentications without a scope: their kind stands there instead."""
    return sorted(
        (
            str(p.get("namespace", "")),
            str(p.get("name", "")),
            str(p.get("action") or p.get("mode") or ""),
            str(p.get("scope") or p.get("kind") or ""),
        )
        for p in dump
    )


# -- -n NAMESPACE: each section narrowed in its own shape (so JSON/YAML show what the table shows) -------


def entries_in(dump: Iterable[Mapping[str, Any]], namespace: str | None) -> list[Mapping[str, Any]]:
    """workloads, services, policies: the entries whose `namespace` is `namespace` (all for None)."""
    return [e for e in dump if namespace is None or e.get("namespace") == namespace]


def _workload_namespace(qualified: object) -> str:
    """`name.namespace` (the dump's srcWorkload/dstWorkload) -> namespace; namespaces have no dots."""
    return str(qualified).rpartition(".")[2]


def connections_in(dump: Mapping[str, Any], namespace: str | None, direction: str | None = None) -> dict[str, Any]:
    """connections: each entry belongs to its local workload's namespace (outbound: the source,
    inbound: the destination), as its table row shows; pooled HBONE connections to their source
    identity's. `direction` (inbound|outbound) drops the other direction's list. Other keys are kept."""
    out = dict(dump)
    if direction is not None:
        out.pop("outbound" if direction == "inbound" else "inbound", None)
    if namespace is None:
        return out
    for kind, local in (("outbound", "srcWorkload"), ("inbound", "dstWorkload")):
        if kind in out:
            out[kind] = [c for c in out[kind] or [] if _workload_namespace(c.get(local)) == namespace]
    if "pool" in dump:
        out["pool"] = [p for p in dump.get("pool") or [] if identity_namespace(p.get("sourceIdentity")) == namespace]
    return out


def register_inspect(inspect_subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    workloads = inspect_subparsers.add_parser("workloads", help="workloads the node's tunnel knows (istioctl columns)")
    services = inspect_subparsers.add_parser(
        "services", help="services the node's tunnel routes, with their VIPs and healthy/all endpoints"
    )
    policies = inspect_subparsers.add_parser("policies", help="L4 policies the node's tunnel enforces")
    connections = inspect_subparsers.add_parser("connections", help="open connections through the node's tunnel")
    for p in (workloads, services, policies, connections):
        add_admin_arguments(p)
        add_namespace_arguments(p)
    workloads.set_defaults(
        func=lambda a: print_section(
            a,
            "workloads",
            lambda d, _: table(WORKLOAD_COLUMNS, workload_rows(d)),
            lambda d: entries_in(d, namespace_of(a)),
        )
    )
    services.set_defaults(
        func=lambda a: print_section(
            a,
            "services",
            lambda d, _: table(SERVICE_COLUMNS, service_rows(d)),
            lambda d: entries_in(d, namespace_of(a)),
        )
    )
    policies.set_defaults(
        func=lambda a: print_section(
            a,
            "policies",
            lambda d, _: table(POLICY_COLUMNS, policy_rows(d)),
            lambda d: entries_in(d, namespace_of(a)),
        )
    )
    connections.add_argument("--wide", action="store_true", help="also show both peers' SPIFFE identities")
    connections.add_argument("--raw", action="store_true", help="addresses as they are, not service/workload names")
    connections.add_argument("--direction", choices=("inbound", "outbound"), help="only this direction's rows")
    connections.set_defaults(
        func=lambda a: print_section(
            a,
            "connections",
            lambda d, dump: table(
                CONNECTION_WIDE_COLUMNS if a.wide else CONNECTION_COLUMNS,
                connection_rows(d, a.wide, None if a.raw else address_names(dump), a.direction),
            ),
            lambda d: connections_in(d, namespace_of(a), a.direction),
        )
    )
