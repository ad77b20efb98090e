"""`nodeagent tunnel`: run the node's tunnel process.

Why this module exists: it turns command-line arguments into `TunnelInputs` — the production edges:
sockets in pod netns (NetnsSocketFactory), a certificate manager fetching from the CA, the inventory and
policy files reloaded when they change, one Prometheus registry — and runs the tunnel on uvloop.

The CA client is passed in by the CLI (`register(subparsers, ca_client=CAClient)`): the ztunnel and ca
packages are independent layers, so this module cannot import nodeagent.ca itself.

What it deliberately does not do: no logic of its own beyond parsing; see proxy/tunnel.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry

from nodeagent.admin import DAEMON_LOG_LEVELS, parse_endpoint, use_log_level
from nodeagent.admin_client import KUBECONFIG_HELP
from nodeagent.inventory.local import InventoryError, load_inventory
from nodeagent.inventory.policies import PolicyError, load_policies
from nodeagent.metrics import CertManagerMetrics
from nodeagent.model import Identity
from nodeagent.netns import SYSCTL_NET
from nodeagent.policy import PolicySet
from nodeagent.zds import wire
from nodeagent.ztunnel.certs import CertificateManager, CertManagerInputs
from nodeagent.ztunnel.edges import NetnsSocketFactory
from nodeagent.ztunnel.metrics import DEFAULT_CLUSTER_DOMAIN
from nodeagent.ztunnel.proxy.tunnel import DEFAULT_GRACE, TunnelInputs, file_source, run_tunnel

log = logging.getLogger(__name__)

# Like ztunnel's settings, also from the environment: the benchmark turns it off to measure HBONE same-node.
FAST_PATH_ENV = "NODEAGENT_SAME_NODE_FAST_PATH"


class CaClient(Protocol):
    async def fetch(self, identity: Identity, csr_pem: bytes) -> Sequence[str]: ...


CaClientFactory = Callable[[str, Callable[[], str], Callable[[], str]], CaClient]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], ca_client: CaClientFactory) -> None:
    summary = "run the node's tunnel: per-pod HBONE proxies fed by the node agent"
    p = subparsers.add_parser(
        "tunnel",
        help=summary,
        description=f"{summary}. Listens in each enrolled pod's netns (15001 outbound, 15006 plaintext inbound, "
        "15008 HBONE), fetches each local workload's certificate from the CA, enforces L4 policy, and serves "
        "metrics (:15020), readiness (:15021) and admin (127.0.0.1:15000).",
    )
    p.add_argument("--node", required=True, help="this node's name (as in the inventory)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--inventory", type=Path, help="inventory YAML (reloaded when it changes)")
    source.add_argument(
        "--kubernetes",
        action="store_true",
        help="watch pods, namespaces, services and security.istio.io/v1 policies in the API server",
    )
    p.add_argument("--kubeconfig", type=Path, help=f"with --kubernetes: {KUBECONFIG_HELP}")
    p.add_argument("--context", help="with --kubernetes: kubeconfig context")
    p.add_argument("--trust-domain", default="cluster.local", help="with --kubernetes: SPIFFE trust domain")
    p.add_argument("--zds-socket", default=wire.DEFAULT_SOCKET_PATH, help="the node agent's ZDS socket")
    p.add_argument("--ca", required=True, metavar="HOST:PORT", help="the CA's gRPC address")
    token = p.add_mutually_exclusive_group(required=True)
    token.add_argument("--ca-token", help="bearer token of this node's agent (lab inventories publish them)")
    token.add_argument("--ca-token-file", type=Path, help="file holding the token (re-read on every request)")
    p.add_argument("--trust-bundle", type=Path, required=True, help="PEM file of the mesh roots (watched)")
    p.add_argument("--policies", type=Path, help="AuthorizationPolicy/PeerAuthentication YAML (reloaded)")
    p.add_argument("--log-level", choices=DAEMON_LOG_LEVELS, default="info", help="(-v/-vv lower it further)")
    p.add_argument("--admin", default="127.0.0.1:15000", help="admin endpoint (/config_dump)")
    p.add_argument("--metrics", default=":15020", help="Prometheus endpoint (/metrics)")
    p.add_argument("--ready", default=":15021", help="readiness endpoint (/healthz/ready)")
    p.add_argument(
        "--ready-socket",
        metavar="PATH",
        help="readiness on this unix socket too, for a per-pod exec probe (`curl -sf --unix-socket PATH "
        "http://localhost/healthz/ready`): on hostNetwork the :15021 of a rolling update's old pod answers first",
    )
    p.add_argument(
        "--sysctl-net",
        default=SYSCTL_NET,
        metavar="DIR",
        help="a writable mount of the kernel's /proc/sys/net, to set net.ipv4.tcp_migrate_req in each pod's netns "
        "(hand-over of queued connections); in a container a hostPath mount of /proc/sys/net (default: %(default)s)",
    )
    p.add_argument(
        "--cluster-domain",
        default=DEFAULT_CLUSTER_DOMAIN,
        help="the cluster's DNS domain (the kubelet's --cluster-domain): destination_service in the Istio metrics "
        "is <service>.<namespace>.svc.<domain> (default: %(default)s)",
    )
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE, help="termination grace period in seconds")
    p.add_argument(
        "--spoof",
        action="store_true",
        help="connect to apps from the client's IP (needs the capture backend's bypass-mark routing)",
    )
    p.add_argument(
        "--same-node-fast-path",
        choices=("on", "off"),
        default=os.environ.get(FAST_PATH_ENV, "on"),
        help=f"connections between two pods of this node skip HBONE and are spliced by the kernel after the "
        f"inbound policy check (default: ${FAST_PATH_ENV}, else on)",
    )
    p.set_defaults(func=lambda args: cmd_tunnel(args, ca_client))


def build_inputs(args: argparse.Namespace, ca_client: CaClientFactory) -> TunnelInputs:
    if args.same_node_fast_path not in ("on", "off"):  # argparse does not check a default against choices
        raise ValueError(f"${FAST_PATH_ENV} must be on or off, not {args.same_node_fast_path!r}")
    if args.ca_token_file is not None:
        token_file: Path = args.ca_token_file
        token: Callable[[], str] = lambda: token_file.read_text().strip()  # noqa: E731
    else:
        fixed = args.ca_token
        token = lambda: fixed  # noqa: E731
    bundle: Path = args.trust_bundle

    def roots() -> str:
        # The manager's roots, not the file's bytes: a bundle file caught mid-write, emptied or deleted keeps
        # the last good roots there (and logs why), where reading it per call failed every CA request.
        return certs.bundle_pem

    client = ca_client(args.ca, token, roots)
    registry = CollectorRegistry()
    certs = CertificateManager(
        CertManagerInputs(fetch=client.fetch, bundle_path=bundle, metrics=CertManagerMetrics(registry))
    )
    empty = PolicySet()
    policies = (
        file_source(str(args.policies), load_policies, default=empty) if args.policies is not None else lambda: empty
    )
    if args.kubernetes:
        from nodeagent.inventory.kube import kube_tunnel_source

        inventory, policies = kube_tunnel_source(args.kubeconfig, args.context, args.trust_domain)
    else:
        inventory = file_source(str(args.inventory), load_inventory)
        # Read it once now: a missing or invalid file is a start-up error with its reason, not a traceback
        # (and never an empty inventory, which would plan every destination as plaintext passthrough).
        loaded = inventory()
        if loaded is None:
            raise ValueError(f"the inventory file {args.inventory} does not exist; write it first or use --kubernetes")
        # A node the file does not name has no pods: the tunnel would run and serve nothing, silently. (With
        # --kubernetes the node's pods come and go in the API server; nothing is checked there.)
        known = sorted(n.name for n in loaded.nodes)
        if args.node not in known:
            raise ValueError(
                f"node {args.node!r} is not in the inventory {args.inventory} (known: {', '.join(known)}); "
                "pass one of them as --node, or add the node to the inventory"
            )
    return TunnelInputs(
        node=args.node,
        socket_factory=NetnsSocketFactory(spoof=args.spoof),
        credentials=certs,
        inventory=inventory,
        policies=policies,
        registry=registry,
        zds_socket=args.zds_socket,
        admin=parse_endpoint(args.admin),
        metrics=parse_endpoint(args.metrics),
        ready=parse_endpoint(args.ready),
        ready_socket=args.ready_socket,
        sysctl_net=args.sysctl_net,
        cluster_domain=args.cluster_domain,
        grace=args.grace,
        same_node_fast_path=args.same_node_fast_path == "on",
    )


def cmd_tunnel(args: argparse.Namespace, ca_client: CaClientFactory) -> int:
    use_log_level(args.log_level)
    # One access-log line per connection is the tunnel's normal output, whatever its --log-level.
    logging.getLogger("nodeagent.access").setLevel(logging.INFO)
    try:
        inputs = build_inputs(args, ca_client)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        run_tunnel(inputs)
    except (OSError, InventoryError, PolicyError) as exc:
        # What the inputs name but cannot deliver (a missing trust bundle, an address this host cannot listen
        # on, a file that does not parse) stops the tunnel with the reason, not a traceback (-vv logs it).
        log.debug("the tunnel stopped", exc_info=True)
        print(f"error: {_reason(exc)}", file=sys.stderr)
        return 1
    return 0


def _reason(exc: BaseException) -> str:
    """The message of `exc` without the `[Errno N]` prefix of an OSError built from (errno, text)."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)
