"""HBONE TLS contexts and peer SPIFFE verification, against a test PKI built here (tunnel_pki).

Most cases run the handshake in memory (MemoryBIO) so each end's outcome is visible; one test runs it
over real loopback sockets on both event loops, the way the tunnel will use the contexts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import ssl

import pytest
from tunnel_pki import Ca, handshake, peer_context

from nodeagent.model import Identity
from nodeagent.ztunnel import tls
from nodeagent.ztunnel.tls import PeerFailure, PeerVerificationError, TlsConfigError, TlsMaterial

TD = "cluster.local"
CLIENT = Identity(TD, "ns-a", "sa-a")
SERVER = Identity(TD, "ns-b", "sa-b")


@pytest.fixture(scope="module")
def root() -> Ca:
    return Ca.new("mesh root A")


@pytest.fixture(scope="module")
def other_root() -> Ca:
    return Ca.new("mesh root B")


@pytest.fixture(scope="module")
def server_ctx(root: Ca) -> ssl.SSLContext:
    return tls.server_context(root.material(SERVER.uri))


@pytest.fixture(scope="module")
def client_ctx(root: Ca) -> ssl.SSLContext:
    return tls.client_context(root.material(CLIENT.uri))


def fresh_server(root: Ca) -> ssl.SSLContext:
    return tls.server_context(root.material(SERVER.uri))


def test_mutual_handshake_returns_both_peer_identities(root: Ca, client_ctx: ssl.SSLContext) -> None:
    sni: list[str | None] = []
    hs = handshake(client_ctx, fresh_server(root), sni_seen=sni)
    assert hs.ok, (hs.client_error, hs.server_error)
    assert tls.verify_server_peer(hs.client, SERVER) == SERVER
    assert tls.verify_client_peer(hs.server, TD) == CLIENT
    assert hs.client.version() == "TLSv1.3"
    assert hs.client.cipher()[0] in tls.CIPHER_SUITES  # type: ignore[index]
    assert hs.client.selected_alpn_protocol() == "h2"
    assert sni == [None], "the client must not send SNI"
    assert hs.client.session is not None and not hs.client.session.has_ticket, "no session ticket may be issued"


def test_contexts_pin_tls13_aes_gcm_no_tickets(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> None:
    for ctx in (client_ctx, server_ctx):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"} == set(tls.CIPHER_SUITES)
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_TICKET
    assert server_ctx.num_tickets == 0


@pytest.mark.parametrize("suite", ["TLS_CHACHA20_POLY1305_SHA256"])
def test_client_offering_only_other_suites_is_refused(root: Ca, suite: str, tmp_path: pathlib.Path) -> None:
    ctx = peer_context(
        server_side=False, chain_key=root.leaf(CLIENT.uri), roots=root.pem, alpn=["h2"], tmp_dir=tmp_path
    )
    tls._OpenSsl.get().set_tls13_ciphersuites(ctx, (suite,))
    hs = handshake(ctx, fresh_server(root))
    assert hs.server_error is not None and "NO_SHARED_CIPHER" in str(hs.server_error).upper()


async def test_handshake_over_loopback_sockets(root: Ca, client_ctx: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    server_seen: asyncio.Future[Identity] = loop.create_future()
    sni: list[str | None] = []
    server_ctx = fresh_server(root)
    server_ctx.sni_callback = lambda _o, name, _c: sni.append(name)  # type: ignore[assignment,func-returns-value]

    class ServerSide(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            server_seen.set_result(tls.verify_client_peer(transport.get_extra_info("ssl_object"), TD))
            transport.close()

    server = await loop.create_server(ServerSide, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        transport, _ = await loop.create_connection(
            asyncio.Protocol, "127.0.0.1", port, ssl=client_ctx, server_hostname=""
        )
        assert tls.verify_server_peer(transport.get_extra_info("ssl_object"), SERVER) == SERVER
        assert await asyncio.wait_for(server_seen, 5) == CLIENT
        assert sni == [None]
        transport.close()
    finally:
        server.close()
        await server.wait_closed()


def test_client_without_certificate_is_refused(root: Ca, tmp_path: pathlib.Path) -> None:
    ctx = peer_context(server_side=False, chain_key=None, roots=root.pem, alpn=["h2"], tmp_dir=tmp_path)
    hs = handshake(ctx, fresh_server(root))
    assert hs.server_error is not None and "CERTIFICATE" in str(hs.server_error).upper()
    assert hs.client_error is not None  # the server's alert reaches the client


def test_foreign_trust_domain_same_root_is_refused_by_server(root: Ca) -> None:
    foreign = tls.client_context(root.material("spiffe://evil.example/ns/ns-a/sa/sa-a"))
    hs = handshake(foreign, fresh_server(root))
    assert hs.ok  # the chain is fine; the SPIFFE check is what refuses it
    with pytest.raises(PeerVerificationError) as err:
        tls.verify_client_peer(hs.server, TD)
    assert err.value.reason is PeerFailure.TRUST_DOMAIN_MISMATCH
    assert "evil.example" in str(err.value)


def test_foreign_trust_domain_other_root_fails_the_handshake(root: Ca, other_root: Ca) -> None:
    foreign = tls.client_context(other_root.material("spiffe://evil.example/ns/ns-a/sa/sa-a", roots=root.pem))
    hs = handshake(foreign, fresh_server(root))
    assert hs.server_error is not None and "certificate verify failed" in str(hs.server_error)


@pytest.mark.parametrize(
    ("uris", "flaws", "reason"),
    [
        ((), {}, PeerFailure.URI_SAN_COUNT),
        ((SERVER.uri, "spiffe://cluster.local/ns/x/sa/y"), {}, PeerFailure.URI_SAN_COUNT),
        ((SERVER.uri,), {"ca": True}, PeerFailure.CA_CERTIFICATE),
        ((SERVER.uri,), {"cert_sign": True}, PeerFailure.KEY_USAGE),
        ((SERVER.uri,), {"key_usage": False}, PeerFailure.KEY_USAGE),
        (("spiffe://cluster.local/ns/b/sa/" + "x" * 2100,), {}, PeerFailure.ID_TOO_LONG),
        (("https://cluster.local/ns/ns-b/sa/sa-b",), {}, PeerFailure.INVALID_ID),
        (("spiffe://cluster.local/workload/ns-b",), {}, PeerFailure.INVALID_ID),
        (("spiffe://Cluster.Local/ns/ns-b/sa/sa-b",), {}, PeerFailure.INVALID_ID),
    ],
    ids=[
        "0-uri-sans",
        "2-uri-sans",
        "ca-leaf",
        "key-cert-sign",
        "no-key-usage",
        "too-long",
        "not-spiffe",
        "not-workload",
        "bad-td",
    ],
)
@pytest.mark.parametrize("side", ["server-cert", "client-cert"])
def test_bad_svid_is_refused_after_handshake(
    root: Ca,
    client_ctx: ssl.SSLContext,
    uris: tuple[str, ...],
    flaws: dict[str, bool],
    reason: PeerFailure,
    *,
    side: str,
    tmp_path: pathlib.Path,
) -> None:
    bad = root.leaf(*uris, **flaws)
    if side == "server-cert":
        server = peer_context(server_side=True, chain_key=bad, roots=root.pem, alpn=["h2"], tmp_dir=tmp_path)
        hs = handshake(client_ctx, server)
        assert hs.client_error is None
        with pytest.raises(PeerVerificationError) as err:
            tls.verify_server_peer(hs.client, SERVER)
    else:
        client = peer_context(server_side=False, chain_key=bad, roots=root.pem, alpn=["h2"], tmp_dir=tmp_path)
        hs = handshake(client, fresh_server(root))
        assert hs.server_error is None
        with pytest.raises(PeerVerificationError) as err:
            tls.verify_client_peer(hs.server, TD)
    assert err.value.reason is reason, err.value


@pytest.mark.parametrize("side", ["server-cert", "client-cert"])
def test_expired_certificate_fails_the_handshake(
    root: Ca, client_ctx: ssl.SSLContext, side: str, tmp_path: pathlib.Path
) -> None:
    uri = SERVER.uri if side == "server-cert" else CLIENT.uri
    expired = root.leaf(uri, expired=True)
    if side == "server-cert":
        hs = handshake(
            client_ctx, peer_context(server_side=True, chain_key=expired, roots=root.pem, alpn=["h2"], tmp_dir=tmp_path)
        )
        failure = hs.client_error
    else:
        hs = handshake(
            peer_context(server_side=False, chain_key=expired, roots=root.pem, alpn=["h2"], tmp_dir=tmp_path),
            fresh_server(root),
        )
        failure = hs.server_error
    assert failure is not None and "certificate has expired" in str(failure)


def test_unknown_root_fails_the_handshake(root: Ca, other_root: Ca, client_ctx: ssl.SSLContext) -> None:
    stranger = tls.server_context(other_root.material(SERVER.uri, roots=root.pem))
    hs = handshake(client_ctx, stranger)
    assert hs.client_error is not None and "unable to get local issuer certificate" in str(hs.client_error)


def test_wrong_expected_identity_is_refused(root: Ca, client_ctx: ssl.SSLContext) -> None:
    hs = handshake(client_ctx, fresh_server(root))
    with pytest.raises(PeerVerificationError) as err:
        tls.verify_server_peer(hs.client, Identity(TD, "ns-b", "other"))
    assert err.value.reason is PeerFailure.IDENTITY_MISMATCH
    assert "expected spiffe://cluster.local/ns/ns-b/sa/other" in str(err.value)


def test_tls12_only_client_is_refused(root: Ca, tmp_path: pathlib.Path) -> None:
    old = peer_context(
        server_side=False,
        chain_key=root.leaf(CLIENT.uri),
        roots=root.pem,
        alpn=["h2"],
        max_version=ssl.TLSVersion.TLSv1_2,
        tmp_dir=tmp_path,
    )
    hs = handshake(old, fresh_server(root))
    assert hs.server_error is not None and "UNSUPPORTED_PROTOCOL" in str(hs.server_error).upper()


@pytest.mark.parametrize("alpn", [None, ["http/1.1"]], ids=["no-alpn", "http1-only"])
def test_client_without_h2_alpn_is_refused(root: Ca, alpn: list[str] | None, tmp_path: pathlib.Path) -> None:
    ctx = peer_context(server_side=False, chain_key=root.leaf(CLIENT.uri), roots=root.pem, alpn=alpn, tmp_dir=tmp_path)
    hs = handshake(ctx, fresh_server(root))
    with pytest.raises(PeerVerificationError) as err:
        tls.verify_client_peer(hs.server, TD)
    assert err.value.reason is PeerFailure.NO_ALPN_H2


def test_rotation_bundle_with_two_roots_accepts_leaves_of_both(root: Ca, other_root: Ca) -> None:
    bundle = root.pem + other_root.pem
    server = tls.server_context(root.material(SERVER.uri, roots=bundle))
    for issuer in (root, other_root):
        client = tls.client_context(issuer.material(CLIENT.uri, roots=bundle))
        hs = handshake(client, server)
        assert hs.ok, (issuer.cert.subject, hs.client_error, hs.server_error)
        assert tls.verify_client_peer(hs.server, TD) == CLIENT
        assert tls.verify_server_peer(hs.client, SERVER) == SERVER
    # and a server that trusts only root A still refuses B's leaves: the bundle is what makes the difference
    hs = handshake(tls.client_context(other_root.material(CLIENT.uri, roots=bundle)), fresh_server(root))
    assert hs.server_error is not None


def test_material_is_validated_and_never_printed(root: Ca, other_root: Ca) -> None:
    chain, key = root.leaf(SERVER.uri)
    _, other_key = root.leaf(SERVER.uri)
    material = TlsMaterial(chain, key, root.pem)
    assert material.identity == SERVER
    assert key.decode() not in repr(material) and "PRIVATE" not in repr(material)
    with pytest.raises(TlsConfigError, match="does the key belong to the leaf"):
        tls.client_context(TlsMaterial(chain, other_key, root.pem))
    with pytest.raises(TlsConfigError, match="not a CA certificate"):
        TlsMaterial(chain, key, chain)
    with pytest.raises(TlsConfigError, match="not a workload SVID"):
        TlsMaterial(*root.leaf(SERVER.uri, ca=True), root.pem)
    with pytest.raises(TlsConfigError, match="not PEM"):
        TlsMaterial(chain, key, b"")


def test_keys_are_loaded_without_touching_the_filesystem(root: Ca, monkeypatch: pytest.MonkeyPatch) -> None:
    material = root.material(CLIENT.uri)
    loaded: list[str] = []
    real = ssl.SSLContext.load_cert_chain

    def spy(self: ssl.SSLContext, certfile: str, keyfile: str | None = None, password: object = None) -> None:
        loaded.extend([certfile, keyfile or ""])
        real(self, certfile, keyfile)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    tls.client_context(material)
    assert loaded and all(p.startswith("/proc/self/fd/") for p in loaded)
    for path in loaded:  # closed right after loading: no memfd of ours is left open
        with contextlib.suppress(OSError):
            assert "nodeagent-tls" not in os.readlink(path)
