"""The certificate manager against the real CA over gRPC: renewal, a CA outage, and a root rotation.

These tests run in real time (certificates are wall-clock objects). To keep the tier fast, the long
outage test runs on uvloop (the production loop) and the plain renewal test on asyncio; the root
rotation runs on both. TLS contexts come from the manager's material and bundle exactly as the tunnel
builds them (nodeagent.ztunnel.edges.TlsContexts over tls.py: TLS 1.3, AES-GCM, ALPN h2, no SNI), and
each side checks the other's SPIFFE ID with tls.py's verifiers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from identity_support import CART, FRONTEND, NODE1_TOKEN, RunningCA, start_ca, uri_sans
from prometheus_client import CollectorRegistry

from nodeagent import cli
from nodeagent.ca.client import CAClient
from nodeagent.metrics import CertManagerMetrics
from nodeagent.model import Identity
from nodeagent.ztunnel import tls
from nodeagent.ztunnel.certs import CertificateManager, CertManagerInputs, CertState
from nodeagent.ztunnel.edges import TlsContexts


@dataclass
class Setup:
    ca: RunningCA
    client: CAClient
    manager: CertificateManager
    registry: CollectorRegistry
    contexts: TlsContexts  # rebuilt when a certificate or the bundle changes, as in the tunnel

    def sample(self, name: str, identity: Identity | None = None) -> float:
        labels = {"identity": identity.uri} if identity else {}
        return self.registry.get_sample_value(name, labels) or 0.0


async def _setup(tmp_path: Path, ttl: int, identities: list[Identity], **inputs: object) -> Setup:
    ca = start_ca(tmp_path / "ca", reload_interval=0.1)
    client = CAClient(ca.target, token=lambda: NODE1_TOKEN, bundle_pem=ca.bundle, ttl_seconds=ttl)
    registry = CollectorRegistry()
    manager = CertificateManager(
        CertManagerInputs(
            fetch=client.fetch,
            bundle_path=ca.store.bundle_path,
            metrics=CertManagerMetrics(registry),
            bundle_poll_interval=0.1,
            **inputs,  # type: ignore[arg-type]
        )
    )
    manager.set_local_workloads(identities)
    await manager.start()
    for identity in identities:
        await asyncio.wait_for(manager.wait_available(identity), 10)
    return Setup(ca, client, manager, registry, TlsContexts(manager))


@pytest.fixture
async def teardown() -> AsyncIterator[list[Setup]]:
    setups: list[Setup] = []
    yield setups
    for setup in setups:
        await setup.manager.stop()
        await setup.client.close()
        setup.ca.stop()


async def _watch_without_gap(manager: CertificateManager, identity: Identity, seconds: float) -> list[int]:
    """Sample every 100 ms that a valid certificate is held; return the serials seen in order."""
    serials: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        material = manager.material(identity)  # raises CertUnavailable on any gap
        assert material.valid_at(time.time())
        if not serials or serials[-1] != material.leaf.serial_number:
            serials.append(material.leaf.serial_number)
        await asyncio.sleep(0.1)
    return serials


@pytest.mark.asyncio(loop_factories=["asyncio"])
async def test_10s_certificates_renew_before_expiry_without_gap(tmp_path: Path, teardown: list[Setup]) -> None:
    setup = await _setup(tmp_path, ttl=10, identities=[FRONTEND])
    teardown.append(setup)
    first = setup.manager.material(FRONTEND)
    assert first.not_after - time.time() <= 10
    serials = await _watch_without_gap(setup.manager, FRONTEND, 11)
    assert len(serials) >= 2, "no renewal within 11 s of a 10 s certificate"
    assert setup.registry.get_sample_value("nodeagent_cert_fetches_total", {"result": "ok"}) >= 2


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_ca_outage_backs_off_keeps_the_cert_and_recovers(
    tmp_path: Path, teardown: list[Setup], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nodeagent.ztunnel.certs")
    setup = await _setup(tmp_path, ttl=10, identities=[FRONTEND], backoff_max=4.0)
    teardown.append(setup)

    held = setup.manager.material(FRONTEND)
    port = setup.ca.port
    setup.ca.stop()
    stopped = time.monotonic()
    kept_while_valid = expired_seen = False
    while time.monotonic() - stopped < 30:
        now = time.time()
        status = setup.manager.status(FRONTEND)
        if held.valid_at(now + 0.2):  # margin: sampling is not atomic with the clock
            assert status.state is CertState.AVAILABLE
            assert setup.manager.material(FRONTEND) is held  # the old certificate is kept
            kept_while_valid = True
        elif not held.valid_at(now - 0.2):
            assert status.state is CertState.UNAVAILABLE and "UNAVAILABLE" in status.reason
            expired_seen = True
        await asyncio.sleep(0.2)
    assert kept_while_valid and expired_seen
    assert "failed (attempt 3)" in caplog.text and "retrying in" in caplog.text
    assert "keeping the current certificate" in caplog.text
    errors = setup.registry.get_sample_value("nodeagent_cert_fetches_total", {"result": "error"})
    assert errors >= 5
    assert setup.registry.get_sample_value("nodeagent_cert_fetch_backoffs_total") == errors
    assert setup.sample("nodeagent_cert_backoff_seconds", FRONTEND) > 1

    setup.ca = start_ca(tmp_path / "ca", port=port, reload_interval=0.1)  # same state: same root
    recovered = await asyncio.wait_for(setup.manager.wait_available(FRONTEND), 10)
    assert recovered.leaf.serial_number != held.leaf.serial_number
    assert setup.manager.status(FRONTEND).state is CertState.AVAILABLE
    assert setup.sample("nodeagent_cert_backoff_seconds", FRONTEND) == 0


# --- root rotation ---------------------------------------------------------------------------------


async def _handshake(contexts: TlsContexts, server_id: Identity, client_id: Identity) -> None:
    """mTLS between two identities on loopback with the tunnel's contexts; each side checks the other."""
    seen_by_server: list[list[str]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        assert tls.verify_client_peer(ssl_object, server_id.trust_domain) == client_id
        seen_by_server.append(uri_sans(x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True))))
        writer.write(await reader.readexactly(4) + b"-ack")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=contexts.context(server_id, server_side=True))
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=contexts.context(client_id, server_side=False), server_hostname=""
        )
        ssl_object = writer.get_extra_info("ssl_object")
        assert tls.verify_server_peer(ssl_object, server_id) == server_id
        der = ssl_object.getpeercert(binary_form=True)
        assert uri_sans(x509.load_der_x509_certificate(der)) == [server_id.uri]
        writer.write(b"ping")
        assert await reader.readexactly(8) == b"ping-ack"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert seen_by_server == [[client_id.uri]]


def _roots(pem: str) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(pem.encode())]


def _root_of(manager: CertificateManager, identity: Identity) -> bytes:
    return manager.material(identity).root.public_bytes(serialization.Encoding.DER)


async def _until(condition: object, within: float, during: object = None) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        if during is not None:
            await during()  # type: ignore[operator]
        await asyncio.sleep(0.1)


async def test_root_rotation_keeps_connections_verifying(tmp_path: Path, teardown: list[Setup]) -> None:
    setup = await _setup(tmp_path, ttl=4, identities=[FRONTEND, CART])
    teardown.append(setup)
    manager, store = setup.manager, setup.ca.store

    async def both_ways() -> None:
        await _handshake(setup.contexts, FRONTEND, CART)
        await _handshake(setup.contexts, CART, FRONTEND)

    await both_ways()
    [root_a] = _roots(manager.bundle_pem)

    store.rotate_prepare()  # bundle A+B, A signs
    await _until(lambda: len(_roots(manager.bundle_pem)) == 2, 5, both_ways)
    [root_b] = [r for r in _roots(manager.bundle_pem) if r != root_a]
    await both_ways()

    store.rotate_activate()  # B signs; A still trusted
    await both_ways()
    # Until every certificate is reissued by B, connections mix A- and B-issued certificates.
    await _until(lambda: {_root_of(manager, FRONTEND), _root_of(manager, CART)} == {root_b}, 10, both_ways)

    store.rotate_finish()  # bundle B only
    await _until(lambda: _roots(manager.bundle_pem) == [root_b], 5, both_ways)
    await both_ways()


async def test_a_leaf_from_a_dropped_root_does_not_verify(tmp_path: Path, teardown: list[Setup]) -> None:
    """The oracle the rotation test relies on: verification really depends on the bundle's roots."""
    setup = await _setup(tmp_path, ttl=60, identities=[FRONTEND, CART])
    teardown.append(setup)
    other = await _setup(tmp_path / "other", ttl=60, identities=[CART])
    teardown.append(other)
    # A client trusting only the other CA's root must refuse FRONTEND's certificate from the first CA.
    client_ctx = other.contexts.context(CART, server_side=False)
    server = await asyncio.start_server(
        lambda r, w: w.close(), "127.0.0.1", 0, ssl=setup.contexts.context(FRONTEND, server_side=True)
    )
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="")
    finally:
        server.close()
        await server.wait_closed()


class ClusterCA:
    """The CA as daemonset/ runs it: an emptyDir state imported from the Secret at every start (`ca init
    --cacerts --force`), tunnels trusting the ConfigMap. The operator's state directory holds the keys."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.admin = tmp_path / "operator-state"
        self.secret = tmp_path / "secret"
        self.configmap = tmp_path / "configmap" / "root-cert.pem"
        self.configmap.parent.mkdir()
        self.starts = 0
        self.ca: RunningCA | None = None
        self.port = 0

    def ca_cli(self, *args: str) -> None:
        assert cli.main(["ca", *args]) == 0, args

    def publish(self) -> None:
        """`ca export`, then what `kubectl apply` of the Secret and ConfigMap and a CA restart do."""
        shutil.rmtree(self.secret, ignore_errors=True)
        self.ca_cli("export", "--state-dir", str(self.admin), "--out", str(self.secret))
        fresh = self.configmap.with_suffix(".new")
        shutil.copyfile(self.secret / "root-cert.pem", fresh)
        fresh.replace(self.configmap)  # the kubelet swaps ConfigMap volumes atomically too
        if self.ca is not None:
            self.ca.stop()
        self.starts += 1
        pod_state = self.tmp / f"ca-pod-{self.starts}"  # a fresh emptyDir
        self.ca_cli("init", "--cacerts", str(self.secret), "--state-dir", str(pod_state), "--force")
        self.ca = start_ca(pod_state, port=self.port, reload_interval=0.1)
        self.port = self.ca.port
        # The CA's own bundle is the tunnels' bundle.
        assert self.ca.store.bundle_path.read_bytes() == self.configmap.read_bytes()


async def test_root_rotation_in_a_cluster_through_the_secret_and_configmap(tmp_path: Path) -> None:
    """The procedure of daemonset/README.md, with the real CLI: each step on the operator's state, then
    export -> Secret + ConfigMap -> CA restarted from the Secret. Connections verify throughout."""
    cluster_ca = ClusterCA(tmp_path)
    cluster_ca.ca_cli("init", "--state-dir", str(cluster_ca.admin))
    cluster_ca.publish()
    assert cluster_ca.ca is not None
    client = CAClient(
        cluster_ca.ca.target, token=lambda: NODE1_TOKEN, bundle_pem=cluster_ca.configmap.read_text, ttl_seconds=4
    )
    registry = CollectorRegistry()
    manager = CertificateManager(
        CertManagerInputs(
            fetch=client.fetch,
            bundle_path=cluster_ca.configmap,
            metrics=CertManagerMetrics(registry),
            bundle_poll_interval=0.1,
        )
    )
    manager.set_local_workloads([FRONTEND, CART])
    await manager.start()
    contexts = TlsContexts(manager)
    try:
        for identity in (FRONTEND, CART):
            await asyncio.wait_for(manager.wait_available(identity), 10)

        async def both_ways() -> None:
            await _handshake(contexts, FRONTEND, CART)
            await _handshake(contexts, CART, FRONTEND)

        await both_ways()
        [root_a] = _roots(manager.bundle_pem)

        cluster_ca.ca_cli("rotate", "prepare", "--state-dir", str(cluster_ca.admin))
        cluster_ca.publish()  # Secret: A signs, root-cert.pem = A + B; ConfigMap = A + B
        await _until(lambda: len(_roots(manager.bundle_pem)) == 2, 5, both_ways)
        [root_b] = [r for r in _roots(manager.bundle_pem) if r != root_a]
        # What the operator checks on each node before the next step (:15000/config_dump, `trustBundle`),
        # in the form `nodeagent ca show` prints the roots.
        shown = [r["sha256"] for r in manager.trust_bundle_dump()]
        assert sorted(shown) == sorted(hashlib.sha256(r).hexdigest() for r in (root_a, root_b))
        await both_ways()
        assert _root_of(manager, FRONTEND) == root_a  # A still signs

        cluster_ca.ca_cli("rotate", "activate", "--state-dir", str(cluster_ca.admin))
        cluster_ca.publish()  # Secret: B signs, root-cert.pem = B + A
        assert _roots(cluster_ca.configmap.read_text()) == [root_b, root_a]
        await both_ways()
        await _until(lambda: {_root_of(manager, FRONTEND), _root_of(manager, CART)} == {root_b}, 10, both_ways)

        cluster_ca.ca_cli("rotate", "finish", "--state-dir", str(cluster_ca.admin))
        cluster_ca.publish()  # B only, everywhere
        await _until(lambda: _roots(manager.bundle_pem) == [root_b], 5, both_ways)
        await both_ways()
        assert (registry.get_sample_value("nodeagent_cert_fetches_total", {"result": "ok"}) or 0) >= 4
    finally:
        await manager.stop()
        await client.close()
        if cluster_ca.ca is not None:
            cluster_ca.ca.stop()
