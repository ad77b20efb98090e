"""The operator's side of a node's admin endpoint: read one section of /config_dump, print it.

Why this module exists: `nodeagent inspect certificates|workloads|connections|policies` all read the
tunnel's /config_dump (the same shape as ztunnel's) and print it as an istioctl-style table, JSON or
YAML. One reader and one table printer keep their errors and their look identical.

Where the dump comes from: `--admin HOST:PORT` or `--admin URL` (default: this node's tunnel on
127.0.0.1:15000), or with `--node NODE` the nodeagent pod on that node through the API server
(kube_remote.py: pods/portforward, kubeconfig from `--kubeconfig`/`--context`, read when the command
runs — kube_remote and the Kubernetes client are imported only then). In the lab, without a cluster,
run the command inside the node with `nodeagent lab exec --node N -- nodeagent inspect ...`.

What it deliberately does not do: no interpretation of the sections, which belongs to the subsystem that
owns each one.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from nodeagent.model import Identity, IdentityError

DEFAULT_ADMIN = "http://127.0.0.1:15000"
# Every command's --kubeconfig reaches the API server through inventory.kube.api_client: one help for all.
KUBECONFIG_HELP = (
    "kubeconfig file (default: in a pod, and without --context, the pod's service account; else the files of "
    "$KUBECONFIG, merged as kubectl merges them; else ~/.kube/config)"
)
OUTPUTS = ("table", "json", "yaml")


class AdminError(Exception):
    """The admin endpoint could not be read, or lacks the section asked for."""


def add_admin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="HOST:PORT|URL",
        help=f"admin endpoint of the node's tunnel: HOST:PORT as `nodeagent tunnel --admin` takes it, or a URL "
        f"(default: {DEFAULT_ADMIN})",
    )
    # --node and the kubectl flags that reach a node's pod through the API server (instead of --admin)
    parser.add_argument("--node", help="the node to inspect, reached through the API server (pods/portforward)")
    parser.add_argument("--kubeconfig", type=Path, help=f"with --node: {KUBECONFIG_HELP}")
    parser.add_argument("--context", help="with --node: kubeconfig context")
    parser.add_argument(
        "--agent-namespace", default="nodeagent-system", help="with --node: the DaemonSet's namespace (%(default)s)"
    )
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="table")


def fetch_remote_dump(args: argparse.Namespace, node: str, port: int) -> Any:
    """The config dump of `port` on the nodeagent pod of `node`, through the API server (AdminError if not)."""
    from nodeagent import kube_remote  # the Kubernetes client, only for commands that use it

    try:
        return kube_remote.fetch_config_dump(
            node, port, kubeconfig=args.kubeconfig, context=args.context, namespace=args.agent_namespace
        )
    except kube_remote.RemoteError as exc:
        raise AdminError(str(exc)) from None


def admin_url(admin: str) -> str:
    """The base URL of `--admin`: a URL as given, or HOST:PORT / [V6]:PORT / :PORT (the form `nodeagent tunnel
    --admin` takes; an empty host is this node's 127.0.0.1) as http://. AdminError if it is neither."""
    if "://" in admin:
        return admin.rstrip("/")
    host, sep, port = admin.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise AdminError(
            f"--admin {admin!r} is neither a URL nor HOST:PORT (e.g. 127.0.0.1:15000 or http://127.0.0.1:15000)"
        )
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    host = host or "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def fetch_dump(admin: str, section: str, timeout: float = 10.0) -> dict[str, Any]:
    """The whole /config_dump of `admin`; AdminError unless it has `section`."""
    url = admin_url(admin) + "/config_dump"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            dump = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise AdminError(
            f"cannot read {url}: {exc}; is the tunnel running on this node and --admin right? "
            "(in the lab: nodeagent lab exec --node NODE -- nodeagent inspect ...)"
        ) from None
    if not isinstance(dump, dict) or section not in dump:
        raise AdminError(f"{url} has no `{section}` section; is this a nodeagent tunnel?")
    return dump


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An istioctl-style aligned table: columns separated by three spaces, no trailing blanks."""
    all_rows = [tuple(columns), *(tuple(r) for r in rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(columns))]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in all_rows]
    return "\n".join(lines) + "\n"


def add_namespace_arguments(parser: argparse.ArgumentParser) -> None:
    """kubectl's -n/-A: the section's entries of one namespace, or of all (the default)."""
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="only this namespace (every output form)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace (the default)")


def namespace_of(args: argparse.Namespace) -> str | None:
    """The namespace -n asked for; None for -A or neither."""
    return None if args.all_namespaces else args.namespace


def say_none_found(namespace: str) -> None:
    """kubectl's line for a -n that matches nothing, on stderr, instead of a table of headers only (exit 0)."""
    print(f"No resources found in {namespace} namespace.", file=sys.stderr)


def identity_namespace(uri: object) -> str | None:
    """The namespace of a SPIFFE ID as a dump spells it (certificates, pooled connections); None if it is
    not one."""
    try:
        return Identity.parse(str(uri)).namespace
    except IdentityError:
        return None


def print_section(
    args: argparse.Namespace,
    section: str,
    render: Callable[[Any, Mapping[str, Any]], str],
    select: Callable[[Any], Any] | None = None,
) -> int:
    """Fetch `section` from `args.admin` (or the tunnel on `args.node`) and print it in `args.output` form; 1
    with a message on error. `select` narrows the section first (e.g. to a namespace), in its own shape,
    so JSON and YAML show what the table shows. `render` makes the table from the section and the whole
    dump (where other sections name what the section holds by address)."""
    try:
        if args.node:
            from nodeagent.kube_remote import TUNNEL_ADMIN_PORT

            dump = fetch_remote_dump(args, args.node, TUNNEL_ADMIN_PORT)
            if not isinstance(dump, dict) or section not in dump:
                raise AdminError(
                    f"the tunnel on node {args.node} has no `{section}` section; is it a nodeagent tunnel?"
                )
        else:
            dump = fetch_dump(args.admin, section)
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    data = dump[section]
    if select is not None:
        data = select(data)
    if args.output == "json":
        print(json.dumps(data, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        rendered = render(data, dump)
        namespace = namespace_of(args) if hasattr(args, "all_namespaces") else None
        if namespace is not None and len(rendered.splitlines()) <= 1:  # `table` with its header line only
            say_none_found(namespace)
        else:
            print(rendered, end="")
    return 0
