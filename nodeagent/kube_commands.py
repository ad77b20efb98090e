"""`nodeagent enroll NAMESPACE` / `nodeagent unenroll NAMESPACE`: the namespace label, with kubectl habits.

Why this module exists: enrolling a namespace is one label (`istio.io/dataplane-mode=ambient`), but users
want to know what it does before and after: which pods join the mesh (or leave it), which stay out and
why (hostNetwork, a pod's own `istio.io/dataplane-mode=none`, finished pods, excluded namespaces). The
summary uses the same rule the agent applies (model.enrolled), so it cannot disagree with what happens.
The label is changed with one JSON merge patch (needs `patch` on namespaces; the agent's RBAC does not
include it — this is an operator command).

Flags follow kubectl: `--kubeconfig`, `--context`, `-n/--namespace` (instead of the positional), `-o
table|json|yaml`, `--dry-run` to only print the summary. The kubeconfig is read when the command runs.

What it deliberately does not do: no waiting for the pods to become ready (watch their
`ambient.istio.io/redirection` annotation, or run `nodeagent inspect redirects`), no pod-level labels.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
import urllib3.exceptions
import yaml
from kubernetes.client.exceptions import ApiException

from nodeagent.admin_client import KUBECONFIG_HELP
from nodeagent.inventory import translate
from nodeagent.inventory.kube import KubeConfigError, api_client, describe
from nodeagent.model import (
    DATAPLANE_MODE_AMBIENT,
    DATAPLANE_MODE_LABEL,
    DATAPLANE_MODE_NONE,
    DEFAULT_EXCLUDED_NAMESPACES,
    Namespace,
    Pod,
    enrolled,
)

MERGE_PATCH = "application/merge-patch+json"
# What a 403 asks of the operator: these commands run as the operator's own user, not as the agent.
OPERATOR_GRANT = (
    "get and patch on namespaces and list on pods to the user of this kubeconfig: bind the nodeagent-operator "
    "ClusterRole, e.g. kubectl create clusterrolebinding nodeagent-operator --clusterrole=nodeagent-operator "
    "--user=USER"
)
COLUMNS = ("NAMESPACE", "POD", "NODE", "IP", "CHANGE", "WHY")


@dataclass(frozen=True)
class PodChange:
    namespace: str
    pod: str
    node: str
    ip: str
    change: str  # joins | leaves | stays in | stays out
    why: str


def add_kube_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", type=Path, help=KUBECONFIG_HELP)
    parser.add_argument("--context", help="kubeconfig context to use")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for verb, helptext in (
        ("enroll", "label a namespace istio.io/dataplane-mode=ambient; its pods join the mesh without a restart"),
        ("unenroll", "remove a namespace's istio.io/dataplane-mode label; its pods leave the mesh"),
    ):
        p = subparsers.add_parser(verb, help=helptext, description=helptext + ". Prints the pods that change.")
        p.add_argument("namespace_arg", nargs="?", metavar="NAMESPACE")
        p.add_argument("-n", "--namespace", help="the namespace (kubectl style; same as the positional)")
        p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
        p.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
        add_kube_arguments(p)
        p.set_defaults(func=lambda args, verb=verb: cmd_label(args, enroll=verb == "enroll"))


def plan(
    namespace: Namespace,
    pods: Sequence[Pod],
    *,
    enroll: bool,
    excluded: frozenset[str] = DEFAULT_EXCLUDED_NAMESPACES,
) -> list[PodChange]:
    """What happens to each pod when the label is set (enroll) or removed. Pure."""
    labels = dict(namespace.labels)
    if enroll:
        labels[DATAPLANE_MODE_LABEL] = DATAPLANE_MODE_AMBIENT
    else:
        labels.pop(DATAPLANE_MODE_LABEL, None)
    after_ns = Namespace(namespace.name, labels)
    changes = []
    for pod in sorted(pods, key=lambda p: p.name):
        before, after = enrolled(pod, namespace, excluded), enrolled(pod, after_ns, excluded)
        change = {
            (False, True): "joins",
            (True, False): "leaves",
            (True, True): "stays in",
            (False, False): "stays out",
        }[(before, after)]
        changes.append(
            PodChange(pod.namespace, pod.name, pod.node or "-", str(pod.ip or "-"), change, _why(pod, after, excluded))
        )
    return changes


def _why(pod: Pod, after: bool, excluded: frozenset[str]) -> str:
    mode = pod.labels.get(DATAPLANE_MODE_LABEL)
    if pod.host_network:
        return "hostNetwork pods are never captured"
    if pod.namespace in excluded:
        return "namespace is excluded from the mesh"
    if pod.terminated:
        return f"pod has finished ({pod.phase.value})"
    if mode == DATAPLANE_MODE_NONE:
        return f"pod opts out ({DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_NONE})"
    if mode == DATAPLANE_MODE_AMBIENT:
        return f"pod label {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}"
    return "namespace label" if after else "no label"


def cmd_label(args: argparse.Namespace, *, enroll: bool) -> int:
    name = args.namespace or args.namespace_arg
    if not name or (args.namespace and args.namespace_arg and args.namespace != args.namespace_arg):
        print("error: name exactly one namespace (NAMESPACE or -n NAMESPACE)", file=sys.stderr)
        return 2
    if enroll and name in DEFAULT_EXCLUDED_NAMESPACES:
        print(f"error: namespace {name!r} is excluded from the mesh; its pods would never be captured", file=sys.stderr)
        return 2
    what = f"reading namespace {name}"
    try:
        core = kubernetes.client.CoreV1Api(api_client(args.kubeconfig, args.context))
        raw_ns: Any = core.read_namespace(name, _preload_content=False)  # raw JSON: translate reads dicts
        namespace = translate.namespace(json.loads(raw_ns.data))
        what = f"listing the pods of namespace {name}"
        raw_list: Any = core.list_namespaced_pod(name, _preload_content=False)
        raw_pods = json.loads(raw_list.data)
        pods = [translate.pod(p) for p in raw_pods.get("items") or []]
        changes = plan(namespace, pods, enroll=enroll)
        current = namespace.labels.get(DATAPLANE_MODE_LABEL)
        wanted = DATAPLANE_MODE_AMBIENT if enroll else None
        if not args.dry_run and current != wanted:
            what = f"labelling namespace {name}"
            core.patch_namespace(
                name, {"metadata": {"labels": {DATAPLANE_MODE_LABEL: wanted}}}, _content_type=MERGE_PATCH
            )
    except KubeConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ApiException as exc:
        if exc.status == 404:
            print(f"error: namespace {name!r} not found", file=sys.stderr)
        else:
            print(f"error: {describe(exc, what, OPERATOR_GRANT)}", file=sys.stderr)
        return 1
    except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
        print(f"error: {describe(exc, what)}", file=sys.stderr)
        return 1
    verb = "enroll" if enroll else "unenroll"
    state = "unchanged (already so labelled)" if current == wanted else ("dry run" if args.dry_run else "labelled")
    doc: dict[str, Any] = {
        "namespace": name,
        "action": verb,
        "label": f"{DATAPLANE_MODE_LABEL}={wanted}" if wanted else f"{DATAPLANE_MODE_LABEL} removed",
        "result": state,
        "pods": [asdict(c) for c in changes],
    }
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    else:
        print(summary(doc, changes))
    return 0


def summary(doc: dict[str, Any], changes: Sequence[PodChange]) -> str:
    counts = {k: sum(1 for c in changes if c.change == k) for k in ("joins", "leaves", "stays in", "stays out")}
    head = f"namespace/{doc['namespace']} {doc['result']}: {doc['label']}"
    tally = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no pods"
    rows = [COLUMNS, *((c.namespace, c.pod, c.node, c.ip, c.change, c.why) for c in changes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    table = ["   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([head, f"pods: {tally}", *(table if changes else [])])
