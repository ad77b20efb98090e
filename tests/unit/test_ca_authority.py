"""The pure CA core: SVID shape, CSR refusals, TTLs, operator cacerts, node authorization (tables)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from identity_support import CART, CHECKOUT, CRASHED, FRONTEND, NODE_AGENT, NOW, TD, make_csr, pod, uri_sans

from nodeagent.ca import authority
from nodeagent.ca.authority import Caller, CAMaterialError, CSRError, Reason, TrustBundle
from nodeagent.model import Identity, PodPhase

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def root() -> authority.Signer:
    return authority.generate_root(NOW, TD)


def test_signed_svid_has_one_uri_san_and_leaf_usages(root: authority.Signer) -> None:
    issued = authority.sign_csr(root, make_csr([FRONTEND.uri]), FRONTEND, NOW, 0)
    leaf = issued.leaf
    assert uri_sans(leaf) == [FRONTEND.uri]
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # empty subject: the SAN must be critical (RFC 5280)
    assert san.value.get_values_for_type(x509.DNSName) == []
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign and not ku.key_encipherment
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_before_utc == NOW - authority.BACKDATE
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(hours=24)
    # Chain: leaf first, root last; the leaf is signed by the root.
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in issued.chain_pem]
    assert chain[0] == leaf and chain[-1] == root.cert and len(chain) == 2
    leaf.verify_directly_issued_by(root.cert)
    assert authority.svid_identity(leaf) == FRONTEND


def test_root_is_a_ten_year_p256_ca(root: authority.Signer) -> None:
    cert = root.cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - NOW == dt.timedelta(days=3650)
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD
    other = authority.generate_root(NOW, TD)
    assert other.cert.subject != cert.subject  # two roots in one bundle never look alike


def test_rsa_2048_csr_is_accepted_with_key_encipherment(root: authority.Signer) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = authority.sign_csr(root, make_csr([FRONTEND.uri], key), FRONTEND, NOW, 0).leaf
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


def _tampered_signature() -> bytes:
    der = x509.load_pem_x509_csr(make_csr([FRONTEND.uri])).public_bytes(serialization.Encoding.DER)
    bad = der[:-3] + bytes([der[-3] ^ 0x01]) + der[-2:]
    return x509.load_der_x509_csr(bad).public_bytes(serialization.Encoding.PEM)


def _weak_ec_key() -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    try:
        return ec.generate_private_key(ec.SECP192R1())
    except UnsupportedAlgorithm:
        return ed25519.Ed25519PrivateKey.generate()


def _csr_with(key: object) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(FRONTEND.uri)]), False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


CSR_REFUSALS = [
    ("no URI SAN", lambda: make_csr([]), Reason.CSR_URI_SAN_COUNT),
    ("two URI SANs", lambda: make_csr([FRONTEND.uri, CART.uri]), Reason.CSR_URI_SAN_COUNT),
    ("another identity", lambda: make_csr([CHECKOUT.uri]), Reason.CSR_IDENTITY_MISMATCH),
    ("not a SPIFFE workload id", lambda: make_csr(["https://example.com/x"]), Reason.CSR_IDENTITY_MISMATCH),
    ("no spiffe:// scheme", lambda: make_csr([FRONTEND.principal]), Reason.CSR_IDENTITY_MISMATCH),
    ("bad signature", _tampered_signature, Reason.CSR_BAD_SIGNATURE),
    (
        "RSA 1024",
        lambda: make_csr([FRONTEND.uri], rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        Reason.CSR_WEAK_KEY,
    ),
    (
        "P-384 (unsupported curve)",
        lambda: make_csr([FRONTEND.uri], ec.generate_private_key(ec.SECP384R1())),
        Reason.CSR_UNSUPPORTED_KEY,
    ),
    ("ed25519", lambda: _csr_with(ed25519.Ed25519PrivateKey.generate()), Reason.CSR_UNSUPPORTED_KEY),
    (
        "garbage",
        lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n",
        Reason.CSR_MALFORMED,
    ),
    ("empty", lambda: b"", Reason.CSR_MALFORMED),
    ("over 64 KiB", lambda: make_csr([FRONTEND.uri]) + b"x" * (64 * 1024), Reason.CSR_TOO_LARGE),
    # Hand-made DER (cryptography cannot build these): extensions it raises non-ValueErrors for.
    ("two SAN extensions", (DATA / "csr_dup_san_ext.pem").read_bytes, Reason.CSR_MALFORMED),
    ("x400Address in the SAN", (DATA / "csr_x400_in_san.pem").read_bytes, Reason.CSR_MALFORMED),
    ("EDIPartyName in the SAN", (DATA / "csr_ediparty_in_san.pem").read_bytes, Reason.CSR_MALFORMED),
]


@pytest.mark.parametrize(("case", "build", "reason"), CSR_REFUSALS, ids=[c[0] for c in CSR_REFUSALS])
def test_csr_refused(root: authority.Signer, case: str, build: object, reason: Reason) -> None:
    with pytest.raises(CSRError) as info:
        authority.sign_csr(root, build(), FRONTEND, NOW, 0)  # type: ignore[operator]
    assert info.value.reason is reason, info.value.message


def test_weak_curve_is_refused(root: authority.Signer) -> None:
    key = _weak_ec_key()
    expected = Reason.CSR_WEAK_KEY if isinstance(key, ec.EllipticCurvePrivateKey) else Reason.CSR_UNSUPPORTED_KEY
    with pytest.raises(CSRError) as info:
        authority.verify_csr(_csr_with(key), FRONTEND)
    assert info.value.reason is expected


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (0, dt.timedelta(hours=24)),
        (-5, dt.timedelta(hours=24)),
        (10, dt.timedelta(seconds=10)),
        (3600, dt.timedelta(hours=1)),
        (90 * 86400, dt.timedelta(days=90)),
        (365 * 86400, dt.timedelta(days=90)),
        (10**14, dt.timedelta(days=90)),  # beyond timedelta's range: capped, not an error
        (2**63 - 1, dt.timedelta(days=90)),
    ],
)
def test_ttl_resolution_and_cap(root: authority.Signer, requested: int, expected: dt.timedelta) -> None:
    assert authority.resolve_ttl(requested) == expected
    leaf = authority.sign_csr(root, make_csr([FRONTEND.uri]), FRONTEND, NOW, requested).leaf
    assert leaf.not_valid_after_utc - NOW == expected


def test_leaf_never_outlives_its_signer() -> None:
    short = authority.generate_root(NOW, TD, validity=dt.timedelta(hours=1))
    leaf = authority.sign_csr(short, make_csr([FRONTEND.uri]), FRONTEND, NOW, 86400).leaf
    assert leaf.not_valid_after_utc == short.cert.not_valid_after_utc


def test_an_expired_signer_refuses_to_issue() -> None:
    """An expired CA certificate used to sign leaves already expired (or fail deep inside cryptography):
    refused with a reason and what to do."""
    short = authority.generate_root(NOW, TD, validity=dt.timedelta(hours=1))
    with pytest.raises(authority.SignerExpired, match="rotate") as info:
        authority.sign_csr(short, make_csr([FRONTEND.uri]), FRONTEND, NOW + dt.timedelta(hours=1, seconds=30), 0)
    assert info.value.reason is Reason.SIGNER_EXPIRED


def test_naive_time_is_rejected(root: authority.Signer) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        authority.sign_csr(root, make_csr([FRONTEND.uri]), FRONTEND, NOW.replace(tzinfo=None), 0)


# --- operator cacerts -------------------------------------------------------------------------------


def _intermediate(root: authority.Signer) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    return cert, key


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_istio_cacerts_with_intermediate_gives_leaf_intermediate_root(root: authority.Signer) -> None:
    cert, key = _intermediate(root)
    signer = authority.load_signer(_pem(cert), _key_pem(key), _pem(root.cert), _pem(cert, root.cert))
    issued = authority.sign_csr(signer, make_csr([FRONTEND.uri]), FRONTEND, NOW, 0)
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in issued.chain_pem]
    assert chain[1:] == [cert, root.cert]
    chain[0].verify_directly_issued_by(cert)
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = chain[0].extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest


@pytest.mark.parametrize("problem", ["wrong key", "broken chain", "not a CA", "garbage"])
def test_inconsistent_cacerts_are_refused(root: authority.Signer, problem: str) -> None:
    cert, key = _intermediate(root)
    other_root = authority.generate_root(NOW, TD)
    files = {"ca_cert": _pem(cert), "ca_key": _key_pem(key), "root_cert": _pem(root.cert), "cert_chain": None}
    if problem == "wrong key":
        files["ca_key"] = _key_pem(ec.generate_private_key(ec.SECP256R1()))
    elif problem == "broken chain":
        files["root_cert"] = _pem(other_root.cert)
    elif problem == "not a CA":
        leaf = authority.sign_csr(root, make_csr([FRONTEND.uri], key), FRONTEND, NOW, 0).leaf
        files["ca_cert"] = _pem(leaf)
    else:
        files["ca_cert"] = b"garbage"
    with pytest.raises(CAMaterialError):
        authority.load_signer(**files)  # type: ignore[arg-type]


def test_trust_bundle_dedups_and_roundtrips(root: authority.Signer) -> None:
    other = authority.generate_root(NOW, TD)
    bundle = TrustBundle.of([root.cert, other.cert, root.cert])
    assert bundle.roots == (root.cert, other.cert)
    assert TrustBundle.from_pem(bundle.to_pem().encode()) == bundle
    assert bundle.fingerprints()[0] == root.cert.fingerprint(hashes.SHA256()).hex()


# --- node authorization ----------------------------------------------------------------------------

NODE1_PODS = (
    pod("frontend-1", "node1", "frontend"),
    pod("cart-1", "node1", "cart", phase=PodPhase.PENDING),
    pod("crashed-1", "node1", "crashed", phase=PodPhase.FAILED),
    pod("done-1", "node1", "batch", phase=PodPhase.SUCCEEDED),
    pod("agent-abc", "node1", "nodeagent", ns="nodeagent-system", uid="agent-uid"),
)
LAB_AGENT = Caller(identity=NODE_AGENT, node="node1")
K8S_AGENT = Caller(identity=NODE_AGENT, node="node1", pod_name="agent-abc", pod_uid="agent-uid")
OTHER_TD = Identity("other.domain", "shop", "frontend")

AUTHZ_TABLE = [
    # (case, caller, requested, granted identity or refusal reason)
    ("own identity without impersonation", LAB_AGENT, None, NODE_AGENT),
    ("workload on the caller's node", LAB_AGENT, FRONTEND, FRONTEND),
    ("pending pod counts", LAB_AGENT, CART, CART),
    ("workload only on another node", LAB_AGENT, CHECKOUT, Reason.IDENTITY_NOT_ON_NODE),
    ("only a failed pod", LAB_AGENT, CRASHED, Reason.IDENTITY_NOT_ON_NODE),
    ("only a succeeded pod", LAB_AGENT, Identity(TD, "shop", "batch"), Reason.IDENTITY_NOT_ON_NODE),
    ("foreign trust domain", LAB_AGENT, OTHER_TD, Reason.FOREIGN_TRUST_DOMAIN),
    ("not a node agent", Caller(FRONTEND, "node1"), FRONTEND, Reason.NOT_NODE_AGENT),
    ("not a node agent, own identity", Caller(FRONTEND, "node1"), None, Reason.NOT_NODE_AGENT),
    ("node unknown", Caller(NODE_AGENT, None), FRONTEND, Reason.CALLER_NODE_UNKNOWN),
    ("k8s caller pod matches", K8S_AGENT, FRONTEND, FRONTEND),
    (
        "k8s caller pod uid differs",
        Caller(NODE_AGENT, "node1", pod_name="agent-abc", pod_uid="stale"),
        FRONTEND,
        Reason.CALLER_POD_MISMATCH,
    ),
    (
        "k8s caller pod not on that node",
        Caller(NODE_AGENT, "node2", pod_name="agent-abc", pod_uid="agent-uid"),
        None,
        Reason.CALLER_POD_MISMATCH,
    ),
]


@pytest.mark.parametrize(("case", "caller", "requested", "expected"), AUTHZ_TABLE, ids=[c[0] for c in AUTHZ_TABLE])
def test_authorization(case: str, caller: Caller, requested: Identity | None, expected: object) -> None:
    pods = NODE1_PODS if caller.node == "node1" else ()

    def decide() -> Identity:
        return authority.authorize(
            caller, requested, trust_domain=TD, trusted_node_accounts=frozenset({NODE_AGENT}), pods_on_caller_node=pods
        )

    if isinstance(expected, Reason):
        with pytest.raises(authority.AuthorizationError) as info:
            decide()
        assert info.value.reason is expected
    else:
        assert decide() == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "spiffe://cluster.local/ns/x",
        "spiffe://UPPER/ns/a/sa/b",
        "x" * 3000,
        "cluster.local/ns/shop/sa/frontend",  # a policy principal, not a SPIFFE ID (REFERENCE: spiffe://...)
        "spiffe://cluster.local\n/ns/shop/sa/frontend",  # `$` matched before a trailing newline
    ],
)
def test_bad_impersonated_identity(text: str) -> None:
    with pytest.raises(authority.AuthorizationError) as info:
        authority.parse_impersonated(text)
    assert info.value.reason is Reason.BAD_IMPERSONATED_IDENTITY
