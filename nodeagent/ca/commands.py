"""`nodeagent ca ...` and `nodeagent inspect certificates`: the identity commands.

Why this module exists: operators create and inspect the CA's state (`ca init`, `ca show`), rotate its
root (`ca rotate prepare|activate|finish`, see nodeagent.ca.store for the procedure), run it
(`ca serve`), and look at the certificates a node holds (`inspect certificates`, istioctl's columns).
Each function here parses arguments, calls the module that does the work and prints the result.

What it deliberately does not do: no signing or policy (ca.authority), no file layout (ca.store). The
table of `inspect certificates` is rendered by a pure function (`certificates_table`) so it is tested
without a server.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry, start_http_server

from nodeagent.admin import DAEMON_LOG_LEVELS, use_log_level
from nodeagent.admin_client import (
    KUBECONFIG_HELP,
    add_admin_arguments,
    add_namespace_arguments,
    identity_namespace,
    namespace_of,
    print_section,
    table,
)
from nodeagent.ca import authority, rotation
from nodeagent.ca.authn import DEFAULT_NODE_ACCOUNT, Authenticator, LabTokenAuthenticator
from nodeagent.ca.authority import DEFAULT_DNS_NAMES
from nodeagent.ca.server import CAServer, ServerInputs, watch_file
from nodeagent.ca.store import CAStore, StoreError
from nodeagent.inventory.local import load_inventory
from nodeagent.metrics import CAMetrics
from nodeagent.model import DEFAULT_TRUST_DOMAIN, Identity, IdentityError, Pod

DEFAULT_STATE_DIR = "/var/lib/nodeagent/ca"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = subparsers.add_parser(
        "ca",
        help="the certificate authority: init, show, export, rotate, serve",
        description="The mesh's certificate authority, kept in a state directory (--state-dir): `init` creates "
        "its root or imports Istio-style cacerts, `show` prints the signer and the trusted roots, `export` writes "
        "them out for the cluster's Secret, `rotate` replaces the root in three steps without breaking "
        "connections, and `serve` issues workload certificates to the node tunnels over gRPC.",
    )
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="SUBCOMMAND")

    def state_args(p: argparse.ArgumentParser, trust_domain: bool = True) -> None:
        p.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE_DIR), help="CA state directory")
        if trust_domain:
            p.add_argument(
                "--trust-domain", type=trust_domain_arg, default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain"
            )

    init = ca_sub.add_parser("init", help="create a self-signed root if none exists (or import cacerts)")
    state_args(init)
    init.add_argument("--cacerts", type=Path, help="import an Istio-style cacerts directory instead")
    init.add_argument("--force", action="store_true", help="with --cacerts: replace the current signer")
    init.set_defaults(func=cmd_init)

    show = ca_sub.add_parser("show", help="print the signer, the trusted roots and the rotation step")
    state_args(show)
    show.add_argument("-o", "--output", choices=("text", "json"), default="text")
    show.set_defaults(func=cmd_show)

    export = ca_sub.add_parser(
        "export", help="write the signer as Istio cacerts, root-cert.pem = every trusted root (cluster Secret)"
    )
    state_args(export)
    export.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory for the four cacerts files (created if missing): an earlier export there is replaced; a "
        "directory holding any other file is refused",
    )
    export.set_defaults(func=cmd_export)

    rotate = ca_sub.add_parser(
        "rotate",
        help="rotate the root: prepare, then activate, then finish; `status` says when the next step is safe",
        description="Rotate the root in three steps, publishing the CA state after each (daemonset/README.md). "
        "`status` reads every node's tunnel through the API server (pods/portforward, as `inspect --node` does) "
        "and exits 0 only when the next step is safe: after prepare, once every tunnel trusts the new root; "
        "after activate, once every certificate in use chains to it.",
    )
    state_args(rotate)
    rotate.add_argument("step", choices=("prepare", "activate", "finish", "status"))
    rotate.add_argument("--kubeconfig", type=Path, help=f"with status: {KUBECONFIG_HELP}")
    rotate.add_argument("--context", help="with status: kubeconfig context")
    rotate.add_argument(
        "--agent-namespace", default="nodeagent-system", help="with status: the DaemonSet's namespace (%(default)s)"
    )
    rotate.add_argument("-o", "--output", choices=("table", "json"), default="table", help="with status")
    rotate.set_defaults(func=cmd_rotate)

    serve = ca_sub.add_parser("serve", help="serve CreateCertificate over TLS (lab: tokens from the inventory)")
    state_args(serve, trust_domain=False)
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--inventory", type=Path, help="inventory YAML: pods, node tokens and the trust domain")
    source.add_argument(
        "--kubernetes",
        action="store_true",
        help="TokenReview for node-agent tokens; pods of each node from the API server",
    )
    serve.add_argument("--kubeconfig", type=Path, help=f"with --kubernetes: {KUBECONFIG_HELP}")
    serve.add_argument("--context", help="with --kubernetes: kubeconfig context")
    serve.add_argument(
        "--trust-domain",
        type=trust_domain_arg,
        default=DEFAULT_TRUST_DOMAIN,
        help="with --kubernetes: SPIFFE trust domain",
    )
    serve.add_argument("--listen", default="127.0.0.1:15012", help="host:port to listen on")
    serve.add_argument(
        "--node-account",
        action="append",
        metavar="NS/SA",
        help=f"trusted node-agent account (repeatable; default {'/'.join(DEFAULT_NODE_ACCOUNT)})",
    )
    serve.add_argument("--dns-name", action="append", help="extra DNS name in the CA's serving certificate")
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics (request counts by result and reason) here, e.g. 127.0.0.1:15014",
    )
    serve.add_argument(
        "--log-level",
        choices=DAEMON_LOG_LEVELS,
        default="info",
        help="info logs each certificate issued and each request refused (-v/-vv lower it further)",
    )
    serve.set_defaults(func=cmd_serve)


def trust_domain_arg(text: str) -> str:
    """--trust-domain as workload identities accept it (model.Identity), so a root is never made for a trust
    domain no certificate could be issued in."""
    try:
        Identity(text, "ns", "sa")
    except IdentityError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def register_inspect(inspect_subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`nodeagent inspect certificates` (the `inspect` parser itself belongs to the CLI)."""
    certs = inspect_subparsers.add_parser("certificates", help="workload certificates held by a node's tunnel")
    add_admin_arguments(certs)
    add_namespace_arguments(certs)
    certs.set_defaults(func=cmd_inspect_certificates)


# --- ca ------------------------------------------------------------------------------------------------


def _store(args: argparse.Namespace) -> CAStore:
    return CAStore(args.state_dir, args.trust_domain)


def cmd_init(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        if args.cacerts:
            store.import_cacerts(args.cacerts, force=args.force)
            print(f"imported the signer from {args.cacerts} into {store.state_dir}")
        elif store.init():
            print(f"created a new root in {store.state_dir}")
        else:
            print(f"{store.state_dir} already holds a signer; nothing changed")
    except (StoreError, authority.AuthorityError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"trust bundle: {store.bundle_path}")
    return 0


def _cert_info(cert: Any) -> dict[str, str]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "sha256": authority.fingerprint(cert),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        state = store.load()
    except (StoreError, authority.AuthorityError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info: dict[str, Any] = {
        "state_dir": str(store.state_dir),
        "signer": _cert_info(state.signer.cert),
        "signer_root": authority.fingerprint(state.signer.root),
        "trusted_roots": [_cert_info(r) for r in state.bundle.roots],
        "bundle_file": str(store.bundle_path),
        "rotation": state.rotation,
    }
    if args.output == "json":
        print(json.dumps(info, indent=2))
        return 0
    print(f"state directory: {info['state_dir']}")
    signer = info["signer"]
    print(f"signer:          {signer['subject']}  (expires {signer['not_after']})")
    print(f"signer root:     sha256 {info['signer_root']}")
    print(f"rotation:        {info['rotation']}")
    print(f"trust bundle:    {info['bundle_file']}")
    for root in info["trusted_roots"]:
        print(f"  root {root['subject']}  sha256 {root['sha256']}  expires {root['not_after']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        bundle = store.export_cacerts(args.out)
    except (StoreError, authority.AuthorityError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = args.out
    print(f"wrote {out}/{{ca-cert,ca-key,cert-chain,root-cert}}.pem; root-cert.pem trusts {len(bundle.roots)} root(s)")
    print("in a cluster (daemonset/README.md, root rotation):")
    print(
        "  kubectl -n nodeagent-system create configmap nodeagent-trust-bundle "
        f"--from-file=root-cert.pem={out}/root-cert.pem --dry-run=client -o yaml | kubectl apply -f -"
    )
    print(
        f"  kubectl -n nodeagent-system create secret generic nodeagent-ca-root --from-file={out} "
        "--dry-run=client -o yaml | kubectl apply -f -"
    )
    print("  kubectl -n nodeagent-system rollout restart deployment/nodeagent-ca")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.step == "status":
        return _rotation_status(args, store)
    step = {"prepare": store.rotate_prepare, "activate": store.rotate_activate, "finish": store.rotate_finish}
    try:
        bundle = step[args.step]()
    except (StoreError, authority.AuthorityError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"rotation step {args.step!r} done; the bundle now trusts {len(bundle.roots)} root(s):")
    for fp in bundle.fingerprints():
        print(f"  sha256 {fp}")
    follow = {
        "prepare": "publish it, then wait until every tunnel trusts the new root (`nodeagent ca rotate status` "
        "exits 0), then run `nodeagent ca rotate activate`",
        "activate": "publish it, then wait until every certificate chains to the new root (half the longest "
        "certificate TTL; `nodeagent ca rotate status` exits 0), then run `nodeagent ca rotate finish`",
        "finish": "publish it: rotation complete",
    }
    print(follow[args.step])
    return 0


def _rotation_status(args: argparse.Namespace, store: CAStore) -> int:
    """`ca rotate status`: each node's tunnel against the CA state (nodeagent.ca.rotation decides)."""
    from nodeagent import kube_remote  # the Kubernetes client, only for the command that uses it

    try:
        state = store.load()
        dumps = kube_remote.all_config_dumps(
            kube_remote.TUNNEL_ADMIN_PORT,
            kubeconfig=args.kubeconfig,
            context=args.context,
            namespace=args.agent_namespace,
        )
    except (StoreError, authority.AuthorityError, OSError, kube_remote.RemoteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The bundle as CAStore.load() builds it: the signing root, then the one a rotation in progress adds
    # (next after prepare, previous after activate), then any extra roots the state trusts.
    second = {"prepared": rotation.NEXT, "activated": rotation.PREVIOUS}.get(state.rotation, rotation.EXTRA)
    roles = {}
    for i, fp in enumerate(state.bundle.fingerprints()):
        roles[fp] = rotation.SIGNING if i == 0 else second if i == 1 else rotation.EXTRA
    views = [_node_view(node, dump) for node, dump in dumps.items()]
    verdict = rotation.assess(state.rotation, roles, views)
    if args.output == "json":
        doc = {
            "rotation": state.rotation,
            "roots": [{"sha256": fp, "role": role} for fp, role in roles.items()],
            "nodes": [dataclasses.asdict(r) for r in verdict.rows],
            "ready": verdict.ready,
            "verdict": verdict.verdict,
        }
        print(json.dumps(doc, indent=2))
    else:
        print(f"rotation: {state.rotation}; roots of the bundle:")
        for fp, role in roles.items():
            print(f"  {role:<9} sha256 {fp}")
        rows = [[r.node, r.trusts, r.certificates, r.problem or "-"] for r in verdict.rows]
        if rows:
            print(table(("NODE", "TRUSTS", "CERTIFICATES", "PROBLEM"), rows))
        print(verdict.verdict)
    return 0 if verdict.ready else 1


def _node_view(node: str, dump: Any) -> rotation.NodeView:
    """A tunnel's config dump (or the error reading it) as nodeagent.ca.rotation judges it."""
    if isinstance(dump, Exception):
        return rotation.NodeView(node, error=str(dump))
    try:
        trusted = frozenset(str(root["sha256"]) for root in dump.get("trustBundle") or ())
        cert_roots = tuple(
            _root_fingerprint(entry["rootCerts"][-1]["pem"])
            for entry in dump.get("certificates") or ()
            if entry.get("rootCerts")
        )
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as exc:
        return rotation.NodeView(node, error=f"its config dump is not a nodeagent tunnel's ({exc!r})")
    return rotation.NodeView(node, trusted, cert_roots)


def _root_fingerprint(pem: str) -> str:
    return authority.fingerprint(x509.load_pem_x509_certificate(pem.encode()))


def _accounts(values: Sequence[str] | None) -> list[tuple[str, str]]:
    out = []
    for value in values or ["/".join(DEFAULT_NODE_ACCOUNT)]:
        namespace, _, account = value.partition("/")
        if not namespace or not account:
            raise ValueError(f"--node-account {value!r} must be NAMESPACE/SERVICEACCOUNT")
        out.append((namespace, account))
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    use_log_level(args.log_level)
    try:
        accounts = _accounts(args.node_account)
        if args.kubernetes:
            from nodeagent.ca.kube import kubernetes_edges

            trust_domain = args.trust_domain
            edges = kubernetes_edges(trust_domain=trust_domain, kubeconfig=args.kubeconfig, context=args.context)
            authenticator: Authenticator = edges.authenticator
            pods_on_node: Callable[[str], Sequence[Pod]] = edges.pods_on_node
            node_of_pod: Callable[[str, str, str], str | None] = edges.node_of_pod
        else:
            inventory = watch_file(args.inventory, load_inventory)
            trust_domain = inventory.current().trust_domain
            authenticator = LabTokenAuthenticator(inventory.current, node_account=accounts[0])
            pods_on_node = lambda node: inventory.current().pods_on(node)  # noqa: E731
            node_of_pod = lambda namespace, name, uid: None  # noqa: E731  (lab tokens name their node)
        store = CAStore(args.state_dir, trust_domain)
        if store.init():
            print(f"created a new root in {store.state_dir}")
        registry = CollectorRegistry()
        if args.metrics:
            host, _, port_text = args.metrics.rpartition(":")
            start_http_server(int(port_text), addr=host or "0.0.0.0", registry=registry)
        inputs = ServerInputs(
            store=store,
            authenticator=authenticator,
            pods_on_node=pods_on_node,
            node_of_pod=node_of_pod,
            metrics=CAMetrics(registry),
            trusted_node_accounts=frozenset(Identity(trust_domain, ns, sa) for ns, sa in accounts),
            dns_names=(*DEFAULT_DNS_NAMES, *(args.dns_name or ())),
        )
        server = CAServer(inputs)
        port = server.start(args.listen)
    except (ValueError, StoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"CA serving on {args.listen} (port {port}); trust bundle {store.bundle_path}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


# --- inspect certificates ------------------------------------------------------------------------------

COLUMNS = ("CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE")


def _parse_time(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except (TypeError, ValueError):
        return None


def certificate_rows(dump: Iterable[Mapping[str, Any]], now: dt.datetime) -> list[tuple[str, ...]]:
    """One row per certificate (leaf, intermediates, roots) of each identity; one row if it has none."""
    rows: list[tuple[str, ...]] = []
    for entry in dump:
        name = str(entry.get("identity", "?"))
        state = str(entry.get("state", "?")).split(":", 1)[0]
        chain = list(entry.get("certChain") or [])
        roots = list(entry.get("rootCerts") or [])
        if not chain and not roots:
            rows.append((name, "NA", state, "false", "NA", "NA", "NA"))
            continue
        typed = [("Leaf" if i == 0 else "Intermediate", c) for i, c in enumerate(chain)]
        typed += [("Root", c) for c in roots]
        for kind, cert in typed:
            not_before = _parse_time(cert.get("validFrom", ""))
            not_after = _parse_time(cert.get("expirationTime", ""))
            valid = not_before is not None and not_after is not None and not_before <= now < not_after
            try:
                serial = format(int(cert.get("serialNumber", "")), "x")
            except ValueError:
                serial = "NA"
            rows.append(
                (
                    name,
                    kind,
                    state,
                    "true" if valid else "false",
                    serial,
                    cert.get("expirationTime") or "NA",
                    cert.get("validFrom") or "NA",
                )
            )
    return rows


def certificates_table(dump: Iterable[Mapping[str, Any]], now: dt.datetime) -> str:
    """istioctl-style aligned table of the `certificates` section of a config dump."""
    return table(COLUMNS, certificate_rows(dump, now))


def certificates_in(dump: Iterable[Mapping[str, Any]], namespace: str | None) -> list[Mapping[str, Any]]:
    """The certificate entries whose identity is in `namespace` (all for None)."""
    return [e for e in dump if namespace is None or identity_namespace(e.get("identity")) == namespace]


def cmd_inspect_certificates(args: argparse.Namespace) -> int:
    return print_section(
        args,
        "certificates",
        lambda section, _: certificates_table(section, dt.datetime.now(dt.UTC)),
        lambda dump: certificates_in(dump, namespace_of(args)),
    )
