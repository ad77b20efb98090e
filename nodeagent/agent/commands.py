"""`nodeagent agent` and `nodeagent inspect redirects`: command lines into agent calls, results into text.

Why this module exists: the CLI, `python -m nodeagent.agent` (a fast entry for tests and the lab, which
skips the other subsystems' imports) and the demo all drive the same parser and code.

What it deliberately does not do: no agent logic (service.py, reconciler.py) and no kernel reading of its
own (inspect.py); nothing imports it except nodeagent.cli and nodeagent.agent.__main__.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from nodeagent.admin import DAEMON_LOG_LEVELS, parse_endpoint, use_log_level
from nodeagent.admin_client import (
    KUBECONFIG_HELP,
    AdminError,
    add_namespace_arguments,
    fetch_remote_dump,
    namespace_of,
    say_none_found,
    table,
)
from nodeagent.agent import inspect as redirects
from nodeagent.agent.kube_netns import ProcNetnsResolver
from nodeagent.agent.netns_resolver import NetnsResolver
from nodeagent.agent.service import CAPTURE_CHOICES, DEFAULT_METRICS_PORT, DEFAULT_VERIFY_S, AgentConfig, run
from nodeagent.agent.status import DEFAULT_STATE_DIR
from nodeagent.agent.workloads import DEFAULT_POLL_S
from nodeagent.capture.ebpf import KUBELET_CGROUPS, LAB_CGROUP_PATTERN
from nodeagent.inventory.local import InventoryError, lab_inventory_problem, load_inventory
from nodeagent.model import Inventory
from nodeagent.netns import NETNS_RUN_DIR, SYSCTL_NET
from nodeagent.zds.wire import DEFAULT_SOCKET_PATH

LAB_INVENTORY = Path("/run/nodeagent/lab/inventory.yaml")
_COLUMNS = ("NAMESPACE", "POD", "IP", "MODE", "STATUS", "RULES", "LISTENERS")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = subparsers.add_parser(
        "agent",
        help="run the node agent: enroll this node's pods, capture their traffic, hand them to the tunnel",
        description="The node agent for one node. Reads the inventory (re-read on change), captures every "
        "enrolled pod of NODE inside its netns, serves ZDS to the node's tunnel, and records each pod's "
        "status in STATE_DIR/NODE/status.json and its metrics on :15014. SIGTERM stops it and leaves capture in place.",
    )
    agent.add_argument("--node", required=True, help="the node this agent serves")
    agent.add_argument(
        "--inventory", type=Path, default=LAB_INVENTORY, metavar="FILE", help="local inventory (default: %(default)s)"
    )
    agent.add_argument("--zds-socket", default=DEFAULT_SOCKET_PATH, metavar="PATH", help="default: %(default)s")
    agent.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR", help="default: %(default)s")
    agent.add_argument(
        "--capture",
        choices=CAPTURE_CHOICES,
        default="iptables",
        help="capture backend: iptables rules, eBPF programs, or auto (eBPF where possible; default: %(default)s)",
    )
    agent.add_argument(
        "--iptables",
        choices=("auto", "legacy", "nft"),
        default="auto",
        help="iptables flavour (auto: the one the node already uses, else `iptables --version`'s)",
    )
    agent.add_argument("--netns-dir", default=NETNS_RUN_DIR, metavar="DIR", help="where pod netns files are")
    agent.add_argument(
        "--netns-pattern",
        default="na-{node}.{namespace}.{name}",
        metavar="FMT",
        help="pod netns file name in --netns-dir (default: the lab's, %(default)s)",
    )
    agent.add_argument(
        "--cgroup-pattern",
        default=None,
        metavar="FMT",
        help="pod cgroup v2 dir under the cgroup2 mount, for --capture ebpf: a pattern of {node}, {namespace}, "
        "{name} and {uid}, or `kubelet` (the kubelet's layout, either cgroup driver, found by pod uid; "
        "`kubelet:DIR` for a kubelet run with --cgroup-root=DIR). Default: kubelet with --kubernetes, else "
        f"the lab's {LAB_CGROUP_PATTERN}",
    )
    agent.add_argument(
        "--sysctl-net",
        default=SYSCTL_NET,
        metavar="DIR",
        help="a read-write mount of the kernel's /proc/sys/net, for --capture ebpf (it sets "
        "net.ipv4.tcp_fwmark_accept in each pod's netns); in a container, where /proc/sys is read-only, a "
        "hostPath mount of /proc/sys/net (default: %(default)s)",
    )
    agent.add_argument(
        "--verify-interval",
        type=_positive,
        default=DEFAULT_VERIFY_S,
        metavar="SECONDS",
        help="how often every pod's capture is checked against the kernel and repaired (default: %(default)s)",
    )
    agent.add_argument(
        "--inventory-poll",
        type=_positive,
        default=DEFAULT_POLL_S,
        metavar="SECONDS",
        help="how often the inventory file is checked for changes (default: %(default)s)",
    )
    agent.add_argument(
        "--ready-socket",
        metavar="PATH",
        help="serve /healthz/ready on this unix socket, for a per-pod exec probe (`curl -sf --unix-socket PATH "
        "http://localhost/healthz/ready`): 200 once the pods are listed, reconciled once and the ZDS socket is "
        "this agent's, else 500 and what is pending. On hostNetwork a rolling update's old pod shares the "
        "node's ports and the ZDS socket, so only a file in the pod's own volume answers for this agent",
    )
    agent.add_argument(
        "--metrics",
        type=_endpoint_or_off,
        default=f":{DEFAULT_METRICS_PORT}",
        metavar="HOST:PORT",
        help="Prometheus endpoint (/metrics, /stats/prometheus): pods by capture state, capture repairs and "
        "failures, tunnels connected over ZDS; HOST:PORT or :PORT (all addresses), `off`: not served "
        "(default: %(default)s, istio-cni's node agent's port)",
    )
    agent.add_argument("--log-level", choices=DAEMON_LOG_LEVELS, default="info", help="(-v/-vv lower it further)")
    kube = agent.add_argument_group("Kubernetes mode (instead of --inventory)")
    kube.add_argument(
        "--kubernetes",
        action="store_true",
        help="watch this node's pods and the namespaces in the API server; write ambient.istio.io/redirection",
    )
    kube.add_argument("--kubeconfig", type=Path, help=KUBECONFIG_HELP)
    kube.add_argument("--context", help="kubeconfig context")
    kube.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default: %(default)s)")
    kube.add_argument("--no-pod-status", action="store_true", help="do not patch pods/status (read-only RBAC)")
    kube.add_argument(
        "--kube-netns",
        choices=("proc", "pattern"),
        default="proc",
        help="find pod netns by pod IP (bind mounts in --netns-dir, then --host-proc) or by --netns-pattern",
    )
    kube.add_argument("--host-proc", default="/proc", metavar="DIR", help="the host's /proc (default: %(default)s)")
    kube.add_argument(
        "--admin",
        default="127.0.0.1:15002",
        metavar="HOST:PORT",
        help="serve /config_dump {redirects} here for `inspect redirects --node` (`none`: off; default: %(default)s)",
    )
    agent.set_defaults(func=_agent)


def register_inspect_redirects(inspect_subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = inspect_subparsers.add_parser(
        "redirects",
        help="each pod's capture as the kernel has it (rules, routes, tunnel listeners) and its status",
        description="A row per pod: rules and routes read with iptables-save and netlink inside the pod's "
        "netns, listeners with ss, STATUS from the node agent's status file. --verify says what is broken "
        "and exits 1 if anything is.",
    )
    cmd.add_argument("--node", action="append", metavar="NODE", help="only this node (repeatable; default: all)")
    cmd.add_argument("--inventory", type=Path, default=LAB_INVENTORY, metavar="FILE", help="default: %(default)s")
    cmd.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    add_namespace_arguments(cmd)
    cmd.add_argument("--verify", action="store_true", help="explain every problem; exit status 1 if there is one")
    cmd.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR", help="agents' status files")
    cmd.add_argument("--netns-dir", default=NETNS_RUN_DIR, metavar="DIR")
    cmd.add_argument("--netns-pattern", default="na-{node}.{namespace}.{name}", metavar="FMT")
    cmd.add_argument("--node-netns-pattern", default="na-{node}", metavar="FMT")
    kube = cmd.add_argument_group("Kubernetes mode (instead of --inventory): pods from the API server")
    kube.add_argument(
        "--kubernetes",
        action="store_true",
        help="list each --node's pods (and the namespaces) from the API server; netns found by pod IP",
    )
    kube.add_argument("--kubeconfig", type=Path, help=KUBECONFIG_HELP)
    kube.add_argument("--context", help="kubeconfig context")
    kube.add_argument("--host-proc", default="/proc", metavar="DIR", help="the host's /proc (default: %(default)s)")
    kube.add_argument(
        "--agent-namespace",
        default="nodeagent-system",
        help="without --kubernetes, --node with --kubeconfig/--context (or with no inventory file here) reads "
        "that node's kernel through the API server: pods/portforward to the agent of the DaemonSet in this "
        "namespace (default: %(default)s)",
    )
    cmd.set_defaults(func=_inspect_redirects)


def _endpoint_or_off(text: str) -> tuple[str, int] | None:
    if text.strip().lower() in ("", "off"):
        return None
    try:
        return parse_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; or off") from None


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _agent(args: argparse.Namespace) -> int:
    use_log_level(args.log_level)
    config = AgentConfig(
        node=args.node,
        inventory=args.inventory,
        zds_socket=args.zds_socket,
        state_dir=args.state_dir,
        capture=args.capture,
        iptables=args.iptables,
        netns_dir=args.netns_dir,
        netns_pattern=args.netns_pattern,
        cgroup_pattern=args.cgroup_pattern or (KUBELET_CGROUPS if args.kubernetes else LAB_CGROUP_PATTERN),
        sysctl_net=args.sysctl_net,
        verify_interval=args.verify_interval,
        inventory_poll=args.inventory_poll,
        ready_socket=args.ready_socket,
        metrics=args.metrics,
    )
    if args.kubernetes:
        from nodeagent.agent.kube_agent import KubeAgent, KubeSettings
        from nodeagent.inventory.kube import KubeConfigError

        settings = KubeSettings(
            args.kubeconfig,
            args.context,
            trust_domain=args.trust_domain,
            status=not args.no_pod_status,
            netns=args.kube_netns,
            proc=args.host_proc,
            admin=None if args.admin == "none" else args.admin,
        )
        try:
            return run(config, lambda c, f: KubeAgent(c, f, settings=settings))
        except KubeConfigError as exc:  # the kubeconfig is read when the agent starts: one line, not a traceback
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return run(config)


def _inspect_redirects(args: argparse.Namespace) -> int:
    resolver: NetnsResolver | None = None
    remote = args.node and not args.kubernetes and (args.kubeconfig or args.context or not args.inventory.exists())
    if remote:
        try:
            report = _remote_redirects(args)
        except AdminError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return _print_redirects(args, report)
    if args.kubernetes:
        loaded = _kube_inventory(args)
        if loaded is None:
            return 2
        inventory, nodes = loaded, args.node
        resolver = ProcNetnsResolver(proc=args.host_proc, netns_dir=args.netns_dir)
    else:
        try:
            inventory = load_inventory(args.inventory)
        except InventoryError as exc:
            print(f"error: {lab_inventory_problem(exc) if args.inventory == LAB_INVENTORY else exc}", file=sys.stderr)
            return 2
        known = [n.name for n in inventory.nodes]
        nodes = args.node or known
        unknown = [n for n in nodes if n not in known]
        if unknown:
            print(f"error: unknown node {', '.join(unknown)} (known: {', '.join(known)})", file=sys.stderr)
            return 2
    layout = redirects.Layout(args.netns_dir, args.netns_pattern, args.node_netns_pattern, args.state_dir)
    return _print_redirects(args, asyncio.run(redirects.collect(inventory, nodes, layout, resolver)))


def _remote_redirects(args: argparse.Namespace) -> redirects.Redirects:
    """Each --node's report from its agent's admin endpoint (agent/admin_endpoint.py), through the API server."""
    from nodeagent.kube_remote import AGENT_ADMIN_PORT

    report = redirects.Redirects([], [])
    for node in args.node:
        dump = fetch_remote_dump(args, node, AGENT_ADMIN_PORT)
        section = dump.get("redirects") if isinstance(dump, dict) else None
        if not isinstance(section, dict) or "rows" not in section:
            problem = section.get("error") if isinstance(section, dict) else None
            raise AdminError(f"the agent on node {node} sent no redirects report" + (f": {problem}" if problem else ""))
        try:
            report.rows += [redirects.RedirectRow(**row) for row in section["rows"]]
            report.nodes += [redirects.NodeReport(**n) for n in section["nodes"]]
        except (TypeError, KeyError) as exc:
            raise AdminError(f"the agent on node {node} sent a report of another version ({exc})") from None
    return report


def _print_redirects(args: argparse.Namespace, report: redirects.Redirects) -> int:
    namespace = namespace_of(args)
    if args.verify:  # before -n narrows the rows: what a node's sentences say depends on all of its pods
        redirects.verify(report)
    if namespace is not None:
        report.rows = [r for r in report.rows if r.namespace == namespace]
    problems = sum(len(r.problems) for r in report.rows) + sum(len(n.problems) for n in report.nodes)
    if args.output == "json":
        print(json.dumps(report.as_dict(), indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(report.as_dict(), sort_keys=False), end="")
    else:
        if namespace is not None and not report.rows:
            say_none_found(namespace)
        print(_table(report, show_problems=args.verify, pods=namespace is None or bool(report.rows)))
    return 1 if args.verify and problems else 0


def _kube_inventory(args: argparse.Namespace) -> Inventory | None:
    """The --node pods from the API server (None, after printing why, when they cannot be listed)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from nodeagent.inventory.kube import KubeConfigError, api_client, describe

    if not args.node:
        print(
            "error: with --kubernetes, name the node(s) whose kernel this machine holds: --node NODE",
            file=sys.stderr,
        )
        return None
    try:
        inventory, skipped = redirects.kube_inventory(api_client(args.kubeconfig, args.context), args.node)
    except KubeConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    except (ApiException, HTTPError, OSError, ValueError) as exc:
        print(f"error: {describe(exc, 'listing pods and namespaces')}", file=sys.stderr)
        return None
    for problem in skipped:
        print(f"warning: left out: {problem}", file=sys.stderr)
    return inventory


def _table(report: redirects.Redirects, *, show_problems: bool, pods: bool = True) -> str:
    """The pods' table (unless not `pods`: -n matched none), then a line per node, then the problems."""
    rows = [
        (
            r.namespace,
            r.pod,
            r.ip,
            r.mode,
            r.status,
            r.rules if r.rules != "drift" else f"drift ({len(r.drift)})",
            ",".join(str(p) for p in r.listeners) or "none",
        )
        for r in report.rows
    ]
    out = table(_COLUMNS, rows).splitlines() if pods else []
    for r in report.rows:
        for o in r.objects if r.mode == "ebpf" else []:  # programs and maps, as the kernel lists them
            out.append(f"  {r.namespace}/{r.pod}: {o}")
        for d in r.drift if r.rules == "drift" else []:
            out.append(f"  {r.namespace}/{r.pod}: {d}")
        if r.other_mode and r.mode in ("ambient", "ebpf"):
            out.append(
                f"  {r.namespace}/{r.pod}: also holds the other capture mode's objects, from an earlier run of the "
                f"agent (harmless: both modes agree; removed when the pod is unenrolled): {', '.join(r.other_mode)}"
            )
    for n in report.nodes:
        state = "; ".join(n.probe_drift) if n.probe_drift else ("ok" if n.probe_bypass else "none (no pod captured)")
        out.append(f"node {n.node}: agent {n.agent}, iptables {n.iptables}, kubelet-probe bypass {state}")
    if show_problems:
        problems: list[tuple[str, Any]] = [(f"{r.namespace}/{r.pod}", p) for r in report.rows for p in r.problems]
        problems += [(f"node {n.node}", p) for n in report.nodes for p in n.problems]
        out.append("")
        out += [f"PROBLEM {who}: {what}" for who, what in problems] or ["verified: no problems found"]
    return "\n".join(out)
