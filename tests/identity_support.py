"""Builders shared by the identity tests (CA, authn, certificate manager): inventories, CSRs, a CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import CollectorRegistry

from nodeagent.ca.authn import LabTokenAuthenticator
from nodeagent.ca.server import CAServer, ServerInputs
from nodeagent.ca.store import CAStore
from nodeagent.metrics import CAMetrics
from nodeagent.model import Identity, Inventory, Namespace, Node, NodeAgentCredential, Pod, PodPhase

TD = "cluster.local"
NODE1_TOKEN = "node1-token-0123456789abcdef"
NODE2_TOKEN = "node2-token-fedcba9876543210"
NODE_AGENT = Identity(TD, "nodeagent-system", "nodeagent")
FRONTEND = Identity(TD, "shop", "frontend")  # runs on node1
CHECKOUT = Identity(TD, "shop", "checkout")  # runs on node2 only
CART = Identity(TD, "shop", "cart")  # runs on node1
CRASHED = Identity(TD, "shop", "crashed")  # only a Failed pod on node1
NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def pod(name: str, node: str, sa: str, *, ns: str = "shop", phase: PodPhase = PodPhase.RUNNING, uid: str = "") -> Pod:
    return Pod(
        name=name,
        namespace=ns,
        uid=uid or f"uid-{ns}-{name}",
        node=node,
        service_account=sa,
        ip=None,
        phase=phase,
    )


def inventory(pods: Sequence[Pod] | None = None) -> Inventory:
    if pods is None:
        pods = (
            pod("frontend-1", "node1", "frontend"),
            pod("cart-1", "node1", "cart"),
            pod("checkout-1", "node2", "checkout"),
            pod("crashed-1", "node1", "crashed", phase=PodPhase.FAILED),
        )
    return Inventory(
        cluster_name="test",
        trust_domain=TD,
        fabric_cidr=ipaddress.IPv4Network("10.99.0.0/24"),
        nodes=(
            Node("node1", ipaddress.IPv4Network("10.10.1.0/24"), ipaddress.IPv4Address("10.99.0.11")),
            Node("node2", ipaddress.IPv4Network("10.10.2.0/24"), ipaddress.IPv4Address("10.99.0.12")),
        ),
        namespaces=(Namespace("shop"),),
        pods=tuple(pods),
        node_credentials=(NodeAgentCredential("node1", NODE1_TOKEN), NodeAgentCredential("node2", NODE2_TOKEN)),
    )


def make_csr(
    uris: Sequence[str],
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    return builder.sign(key, algorithm or hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def uri_sans(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


@dataclass
class RunningCA:
    server: CAServer
    store: CAStore
    registry: CollectorRegistry
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def bundle(self) -> str:
        return self.store.bundle_path.read_text()

    def count(self, result: str, reason: str) -> float:
        value = self.registry.get_sample_value("nodeagent_ca_requests_total", {"result": result, "reason": reason})
        return value or 0.0

    def stop(self) -> None:
        self.server.stop(0)


def start_ca(
    state_dir: Path, port: int = 0, source: Callable[[], Inventory] | None = None, **overrides: object
) -> RunningCA:
    """A CA on loopback with a fresh registry; `source` supplies the inventory (default: `inventory()`)."""
    holder = [inventory()]
    current = source or (lambda: holder[0])
    store = CAStore(state_dir, TD)
    store.init()
    registry = CollectorRegistry()
    inputs = ServerInputs(
        store=store,
        authenticator=overrides.pop("authenticator", None) or LabTokenAuthenticator(current),  # type: ignore[arg-type]
        pods_on_node=lambda node: current().pods_on(node),
        metrics=CAMetrics(registry),
        trusted_node_accounts=frozenset({NODE_AGENT}),
        **overrides,  # type: ignore[arg-type]
    )
    server = CAServer(inputs)
    bound = server.start(f"127.0.0.1:{port}")
    return RunningCA(server, store, registry, bound)
