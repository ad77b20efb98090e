"""Reaching a node's admin endpoints through the API server: `nodeagent inspect ... --node NODE`.

Why this module exists: on a cluster the operator is not on the node, and the admin endpoints are bound
to the node's localhost on purpose (admin.py: the config dump is never on a pod-facing port). kubectl's
answer is the pods/portforward subresource: the API server asks the kubelet to open a TCP connection to
a port inside the pod's network namespace — for the hostNetwork DaemonSet pod, the node's localhost. So
every `inspect` command finds the nodeagent DaemonSet pod on NODE (label app=nodeagent, field selector
spec.nodeName, in nodeagent-system), port-forwards to one admin port through the real `kubernetes`
client (kubernetes.stream.portforward: websocket, channel protocol v4.channel.k8s.io) and sends one
HTTP GET /config_dump through it:

- the tunnel's port 15000 for workloads, certificates, connections and policies;
- the agent's port 15002 for redirects: the agent answers with `inspect redirects`' own code
  (agent/inspect.collect), which reads the kernel (iptables-save, routes and `ss` in each pod's netns,
  the kubelet-probe chain) at request time; only the STATUS column comes from the agent's status file,
  exactly as when the command runs on the node.

Why port-forward and not pods/exec (running `nodeagent inspect redirects -o json` in the agent
container): exec into the agent's container — which holds NET_ADMIN, SYS_ADMIN and BPF and sees the host's
/proc — is root on every node for whoever may do it; port-forward to the pod reaches its localhost
ports and nothing else. One mechanism for all the inspect commands also means one RBAC grant
(daemonset/rbac.yaml: the nodeagent-operator Role), one failure vocabulary and no dependency on a shell
or the CLI inside the image.

What it deliberately does not do: no long-lived local listener (kubectl port-forward's job), no SPDY (the
client library speaks websockets only), no retry: an error says what is wrong and what to do.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward

from nodeagent.inventory.kube import KubeConfigError, api_client, describe

NODEAGENT_NAMESPACE = "nodeagent-system"
NODEAGENT_SELECTOR = "app=nodeagent"
TUNNEL_ADMIN_PORT = 15000
AGENT_ADMIN_PORT = 15002
TIMEOUT_S = 30.0  # collecting redirects runs iptables-save in every pod's netns: allow for a full node


class RemoteError(Exception):
    """The node's endpoint could not be reached through the API server; the message says what to do."""


@dataclass(frozen=True)
class Target:
    namespace: str
    pod: str
    node: str


def find_pod(core: kubernetes.client.CoreV1Api, node: str, namespace: str, selector: str) -> Target:
    """The running nodeagent pod on `node` (the newest, during a rolling update's surge)."""
    pods = _list_pods(core, namespace, selector, f"spec.nodeName={node}")
    running = _newest_running(pods, namespace)
    if not running:
        found = ", ".join(f"{p['metadata']['name']} ({(p.get('status') or {}).get('phase')})" for p in pods)
        raise RemoteError(
            f"no running nodeagent pod on node {node!r} (namespace {namespace}, selector {selector})"
            + (f"; found {found}" if found else "")
            + f"; is the node name right and the DaemonSet scheduled there? "
            f"(kubectl -n {namespace} get pods -l {selector} -o wide)"
        )
    return running[0]


def all_config_dumps(
    port: int,
    *,
    kubeconfig: str | os.PathLike[str] | None = None,
    context: str | None = None,
    namespace: str = NODEAGENT_NAMESPACE,
    selector: str = NODEAGENT_SELECTOR,
) -> dict[str, Any]:
    """node -> /config_dump of `port` on the node's running nodeagent pod (the newest during a surge), parsed,
    or the RemoteError that says why it could not be read; RemoteError if the pods cannot be listed."""
    try:
        api = api_client(kubeconfig, context)
    except KubeConfigError as exc:
        raise RemoteError(str(exc)) from None
    out: dict[str, Any] = {}
    with api:
        core = kubernetes.client.CoreV1Api(api)
        for target in _newest_running(_list_pods(core, namespace, selector, None), namespace):
            try:
                out[target.node] = _parse_dump(get(core, target, port, "/config_dump"), target, port)
            except RemoteError as exc:
                out[target.node] = exc
    return out


def _list_pods(
    core: kubernetes.client.CoreV1Api, namespace: str, selector: str, field_selector: str | None
) -> list[dict[str, Any]]:
    what = f"pods in namespace {namespace}"
    try:
        raw: Any = core.list_namespaced_pod(
            namespace, label_selector=selector, field_selector=field_selector, _preload_content=False
        )
        return list(json.loads(raw.data).get("items") or [])
    except ApiException as exc:
        if exc.status == 403:
            raise RemoteError(f"{describe_forbidden(exc, what)}; the nodeagent-operator Role grants it") from None
        raise RemoteError(describe(exc, what)) from None
    except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
        raise RemoteError(describe(exc, what)) from None


def _newest_running(pods: list[dict[str, Any]], namespace: str) -> list[Target]:
    """The newest running pod of each node among `pods`, by node (a rolling update's surge runs two)."""
    newest: dict[str, dict[str, Any]] = {}
    for p in pods:
        node = (p.get("spec") or {}).get("nodeName")
        if not node or (p.get("status") or {}).get("phase") != "Running":
            continue
        stamp = p["metadata"].get("creationTimestamp") or ""
        if node not in newest or stamp > (newest[node]["metadata"].get("creationTimestamp") or ""):
            newest[node] = p
    return [Target(namespace, p["metadata"]["name"], node) for node, p in sorted(newest.items())]


def describe_forbidden(exc: ApiException, what: str) -> str:
    try:
        message = json.loads(exc.body).get("message", "") if exc.body else ""
    except (ValueError, AttributeError):
        message = ""
    return f"{what}: forbidden by RBAC ({message or exc.reason})"


def get(core: kubernetes.client.CoreV1Api, target: Target, port: int, path: str, timeout: float = TIMEOUT_S) -> bytes:
    """HTTP GET `path` on the pod's `port` through pods/portforward; the response body (status 200 only)."""
    where = f"pod {target.namespace}/{target.pod} (node {target.node}) port {port}"
    try:
        forward = portforward(
            core.connect_get_namespaced_pod_portforward, target.pod, target.namespace, ports=str(port)
        )
    except ApiException as exc:
        raise RemoteError(_handshake_error(exc, where, target)) from None
    sock = forward.socket(port)
    sock.settimeout(timeout)
    conn = http.client.HTTPConnection("localhost", port, timeout=timeout)
    conn.sock = sock  # the forwarded stream instead of a TCP connection (what the client's docs show)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
    except (http.client.HTTPException, OSError) as exc:
        error = forward.error(port)
        if error:
            raise RemoteError(
                f"{where}: the kubelet could not connect: {error.strip()}; is the container serving it running? "
                f"(kubectl -n {target.namespace} get pod {target.pod}; its logs)"
            ) from None
        if isinstance(exc, TimeoutError | socket.timeout):
            raise RemoteError(f"{where}: no answer within {timeout:.0f} s") from None
        raise RemoteError(f"{where}: the forwarded connection failed ({exc.__class__.__name__}: {exc})") from None
    finally:
        with contextlib.suppress(OSError):
            conn.close()
        forward.close()
    if response.status != 200:
        raise RemoteError(f"{where}: GET {path} answered {response.status}: {body[:200].decode(errors='replace')}")
    return body


def _handshake_error(exc: ApiException, where: str, target: Target) -> str:
    """The client wraps a refused websocket upgrade into ApiException(status=0); the cause keeps the answer."""
    cause = exc.__context__
    status = getattr(cause, "status_code", None)
    body = getattr(cause, "resp_body", None) or b""
    try:
        message = json.loads(body).get("message", "") if body else ""
    except (ValueError, AttributeError):
        message = ""
    detail = message or (body.decode(errors="replace")[:200] if isinstance(body, bytes) else str(body)) or str(cause)
    if status == 403:
        return (
            f"cannot port-forward to {where}: forbidden by RBAC ({detail}); port-forward needs get and create on "
            f"pods/portforward in {target.namespace} (the nodeagent-operator Role in daemonset/rbac.yaml)"
        )
    if status == 401:
        return f"cannot port-forward to {where}: unauthorized ({detail}); the kubeconfig's credentials are not accepted"
    if status is not None:
        return f"cannot port-forward to {where}: HTTP {status} {detail}"
    return f"cannot port-forward to {where}: cannot reach the API server ({exc.reason})"


def fetch_config_dump(
    node: str,
    port: int,
    *,
    kubeconfig: str | os.PathLike[str] | None = None,
    context: str | None = None,
    namespace: str = NODEAGENT_NAMESPACE,
    selector: str = NODEAGENT_SELECTOR,
) -> Any:
    """/config_dump of the nodeagent pod's `port` on `node`, parsed. The kubeconfig is read here, per call."""
    try:
        api = api_client(kubeconfig, context)
    except KubeConfigError as exc:
        raise RemoteError(str(exc)) from None
    with api:
        core = kubernetes.client.CoreV1Api(api)
        target = find_pod(core, node, namespace, selector)
        return _parse_dump(get(core, target, port, "/config_dump"), target, port)


def _parse_dump(body: bytes, target: Target, port: int) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise RemoteError(
            f"pod {target.namespace}/{target.pod} port {port} answered something that is not a config dump "
            f"({body[:80]!r}); is it a nodeagent admin port?"
        ) from None
