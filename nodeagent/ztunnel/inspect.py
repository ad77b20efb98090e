"""`nodeagent inspect workloads|connections|policies`: the tunnel's view, in istioctl ztunnel-config columns.

Why this module exists: operators know `istioctl ztunnel-config workloads|connections|policies`; these
commands print the same columns from the node tunnel's /config_dump, so the mesh's state on a node can
be read without learning a new vocabulary. The row builders are pure functions of the dump.

What it deliberately does not do: it reports what the tunnel holds; what the kernel holds (capture rules,
listeners) is `nodeagent inspect redirects`, which reads the kernel itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

from nodeagent.admin_client import add_admin_arguments, print_section, table

WORKLOAD_COLUMNS = ("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL")
CONNECTION_COLUMNS = ("WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL")
CONNECTION_WIDE_COLUMNS = (*CONNECTION_COLUMNS, "SOURCE IDENTITY", "DESTINATION IDENTITY")
POLICY_COLUMNS = ("NAMESPACE", "POLICY NAME", "ACTION", "SCOPE")


def workload_rows(dump: Iterable[Mapping[str, Any]], namespace: str | None) -> list[tuple[str, ...]]:
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
        if namespace is None or w.get("namespace") == namespace
    ]
    return sorted(rows)


def connection_rows(dump: Mapping[str, Any], wide: bool) -> list[tuple[str, ...]]:
    """Outbound rows are seen from the source workload, inbound rows from the destination."""
    rows = []
    for direction in ("outbound", "inbound"):
        row: tuple[Any, ...]
        for c in dump.get(direction) or []:
            if direction == "outbound":
                row = (
                    c.get("srcWorkload", ""),
                    direction,
                    c.get("src", ""),
                    c.get("actualDst", ""),
                    c.get("originalDst", ""),
                    c.get("protocol", ""),
                )
            else:
                row = (
                    c.get("dstWorkload", ""),
                    direction,
                    c.get("originalDst", ""),
                    c.get("src", ""),
                    c.get("originalDst", ""),
                    c.get("protocol", ""),
                )
            if wide:
                row = (*row, c.get("srcIdentity", ""), c.get("dstIdentity", ""))
            rows.append(tuple(str(x) for x in row))
    return rows


def policy_rows(dump: Iterable[Mapping[str, Any]], namespace: str | None) -> list[tuple[str, ...]]:
    return sorted(
        (
            str(p.get("namespace", "")),
            str(p.get("name", "")),
            str(p.get("action") or p.get("mode") or ""),
            str(p.get("scope") or p.get("kind") or ""),
        )
        for p in dump
        if namespace is None or p.get("namespace") == namespace
    )


def _namespace(args: argparse.Namespace) -> str | None:
    return None if args.all_namespaces else args.namespace


def register_inspect(inspect_subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    workloads = inspect_subparsers.add_parser("workloads", help="workloads the node's tunnel knows (istioctl columns)")
    policies = inspect_subparsers.add_parser("policies", help="L4 policies the node's tunnel enforces")
    for p in (workloads, policies):
        add_admin_arguments(p)
        scope = p.add_mutually_exclusive_group()
        scope.add_argument("-n", "--namespace", help="only this namespace")
        scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace (the default)")
    workloads.set_defaults(
        func=lambda a: print_section(a, "workloads", lambda d: table(WORKLOAD_COLUMNS, workload_rows(d, _namespace(a))))
    )
    policies.set_defaults(
        func=lambda a: print_section(a, "policies", lambda d: table(POLICY_COLUMNS, policy_rows(d, _namespace(a))))
    )
    connections = inspect_subparsers.add_parser("connections", help="open connections through the node's tunnel")
    add_admin_arguments(connections)
    connections.add_argument("--wide", action="store_true", help="also show both peers' SPIFFE identities")
    connections.set_defaults(
        func=lambda a: print_section(
            a,
            "connections",
            lambda d: table(CONNECTION_WIDE_COLUMNS if a.wide else CONNECTION_COLUMNS, connection_rows(d, a.wide)),
        )
    )
