"""The certificate authority's decisions: who may have which identity, and what gets signed.

Why this module exists: the rules that make the CA safe — CSR checks, SPIFFE X.509-SVID shape, TTL
limits, node-scoped authorization — must be testable with plain values, without sockets, gRPC or a
clock of their own. Everything here takes its inputs (the time, the pods on the caller's node, the
signing key) as arguments and returns values or raises an `AuthorityError` carrying a `Reason`.

What it deliberately does not do: no files (ca.store persists keys and bundles), no network (ca.server
speaks gRPC, ca.authn checks tokens), no logging or metrics (callers record the `Reason`). It never looks
at the CSR's subject or extensions beyond the one URI SAN: the issued certificate is built from the
authorized identity alone.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeagent.model import Identity, IdentityError, Pod

ROOT_VALIDITY = dt.timedelta(days=3650)
DEFAULT_TTL = dt.timedelta(hours=24)
MAX_TTL = dt.timedelta(days=90)
# Issued certificates start slightly in the past so peers with a clock a little behind accept them.
BACKDATE = dt.timedelta(seconds=60)
MAX_CSR_BYTES = 64 * 1024
MIN_RSA_BITS = 2048
IMPERSONATED_IDENTITY_KEY = "ImpersonatedIdentity"
# The CA's own serving certificate: the Service name clients verify (grpc target name override).
DEFAULT_CA_NAME = "nodeagent-ca.nodeagent-system.svc"
DEFAULT_DNS_NAMES = (DEFAULT_CA_NAME, f"{DEFAULT_CA_NAME}.cluster.local", "localhost")

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_ACCEPTED_CSR_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


class Reason(enum.Enum):
    """Why a request was refused. The value is the `reason` label of the CA's request counter."""

    OK = "ok"
    MISSING_TOKEN = "missing_token"
    BAD_TOKEN = "bad_token"
    AUTHN_UNAVAILABLE = "authn_unavailable"
    NOT_NODE_AGENT = "not_node_agent"
    CALLER_NODE_UNKNOWN = "caller_node_unknown"
    CALLER_POD_MISMATCH = "caller_pod_mismatch"
    BAD_IMPERSONATED_IDENTITY = "bad_impersonated_identity"
    FOREIGN_TRUST_DOMAIN = "foreign_trust_domain"
    IDENTITY_NOT_ON_NODE = "identity_not_on_node"
    CSR_TOO_LARGE = "csr_too_large"
    CSR_MALFORMED = "csr_malformed"
    CSR_BAD_SIGNATURE = "csr_bad_signature"
    CSR_WEAK_KEY = "csr_weak_key"
    CSR_UNSUPPORTED_KEY = "csr_unsupported_key"
    CSR_URI_SAN_COUNT = "csr_uri_san_count"
    CSR_IDENTITY_MISMATCH = "csr_identity_mismatch"
    BAD_CA_MATERIAL = "bad_ca_material"
    REQUEST_MALFORMED = "request_malformed"  # the body is not an IstioCertificateRequest (e.g. a non-UTF-8 string)
    SIGNER_EXPIRED = "signer_expired"


class AuthorityError(Exception):
    """A refusal with a machine-readable reason and a message that says what to do."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class CSRError(AuthorityError):
    """The CSR itself is unacceptable (the caller is told why: INVALID_ARGUMENT)."""


class AuthorizationError(AuthorityError):
    """The caller may not have the identity it asked for (the caller sees only UNAUTHENTICATED)."""


class SignerExpired(AuthorityError):
    """The signing chain has expired: nothing it issued would be valid (the operator must rotate)."""


# What cryptography raises for extensions it cannot decode: not all of them are ValueErrors.
BAD_EXTENSION_ERRORS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


class CAMaterialError(AuthorityError):
    """Operator-supplied or stored CA keys and certificates are inconsistent."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.BAD_CA_MATERIAL, message)


# --- certificates -------------------------------------------------------------------------------


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as lowercase hex, the form `nodeagent ca show` prints."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _aware(when: dt.datetime) -> dt.datetime:
    if when.tzinfo is None:
        raise ValueError("times passed to the authority must be timezone-aware (use datetime.now(UTC))")
    return when


@dataclass(frozen=True)
class Signer:
    """A key that signs workload certificates, its certificate, and the issuers above it up to the root."""

    cert: x509.Certificate
    key: SigningKey
    # Issuers above `cert`, nearest first, ending with the root; empty when `cert` is the root itself.
    parents: tuple[x509.Certificate, ...] = ()
    _chain_pem: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _key_id: x509.SubjectKeyIdentifier = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_chain_pem", tuple(cert_pem(c) for c in (self.cert, *self.parents)))
        # Leaves name their issuer by the signer's own subjectKeyIdentifier (what chain builders match).
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            ski = _key_id(self.key.public_key())
        object.__setattr__(self, "_key_id", ski)

    @property
    def root(self) -> x509.Certificate:
        return self.parents[-1] if self.parents else self.cert

    @property
    def chain_pem(self) -> tuple[str, ...]:
        """The signer's certificate followed by its parents, root last (what follows a leaf)."""
        return self._chain_pem

    @property
    def not_after(self) -> dt.datetime:
        return min(c.not_valid_after_utc for c in (self.cert, *self.parents))


def _key_id(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def generate_root(now: dt.datetime, trust_domain: str, validity: dt.timedelta = ROOT_VALIDITY) -> Signer:
    """A new self-signed ECDSA P-256 root that signs workload certificates directly.

    Each root gets a distinct subject (it names its key id) so two roots trusted side by side during a
    rotation never look alike to a chain builder.
    """
    now = _aware(now)
    key = ec.generate_private_key(ec.SECP256R1())
    ski = _key_id(key.public_key())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"nodeagent root {ski.digest[:6].hex()}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Signer(cert=cert, key=key)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def load_signer(ca_cert: bytes, ca_key: bytes, root_cert: bytes, cert_chain: bytes | None = None) -> Signer:
    """Load a signer from PEMs laid out like Istio's `cacerts` secret.

    ca-cert.pem: the signing certificate; ca-key.pem: its key; root-cert.pem: the root, possibly followed or
    preceded by other roots trusted alongside it (a root rotation; see `other_roots`) — the signer's root
    is the one its chain ends at; cert-chain.pem: the chain from ca-cert up to the root (ca-cert and the
    root may be included or not). For a self-signed root used directly, ca-cert.pem and root-cert.pem are
    the same certificate.
    """
    try:
        cert = x509.load_pem_x509_certificate(ca_cert)
        roots = x509.load_pem_x509_certificates(root_cert)
        chain = x509.load_pem_x509_certificates(cert_chain) if cert_chain and cert_chain.strip() else []
        key = serialization.load_pem_private_key(ca_key, password=None)
    except (ValueError, TypeError) as exc:
        raise CAMaterialError(f"cannot parse the CA PEM files: {exc}; check they are unencrypted PEM") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAMaterialError("ca-key.pem must be an ECDSA or RSA private key")
    if key.public_key() != cert.public_key():
        raise CAMaterialError("ca-key.pem does not belong to ca-cert.pem; were they taken from different CAs?")
    if not _is_ca(cert):
        raise CAMaterialError("ca-cert.pem is not a CA certificate (basicConstraints CA:TRUE is required)")
    for root in roots:
        if not _issued_by(root, root):
            raise CAMaterialError(
                f"root-cert.pem holds {root.subject.rfc4514_string()!r}, which is not a self-signed root certificate"
            )
    errors = []
    for root in roots:
        parents = [c for c in chain if c not in (cert, *roots)]
        if cert != root:
            parents.append(root)
        broken = _broken_link(cert, parents)
        if broken is None:
            return Signer(cert=cert, key=key, parents=tuple(parents))
        errors.append(broken)
    if len(roots) == 1:
        raise CAMaterialError(f"cert-chain.pem is broken: {errors[0]}; list the chain from ca-cert up to the root")
    raise CAMaterialError(
        f"ca-cert.pem chains to none of the {len(roots)} roots in root-cert.pem ({'; '.join(errors)}); "
        "list the chain from ca-cert up to one of them in cert-chain.pem"
    )


def other_roots(root_cert: bytes, signer: Signer) -> tuple[x509.Certificate, ...]:
    """The roots in a cacerts root-cert.pem besides the signer's own: trusted alongside it (the roots of a
    rotation in progress, as `nodeagent ca export` writes them)."""
    return tuple(r for r in TrustBundle.from_pem(root_cert).roots if r != signer.root)


def _broken_link(cert: x509.Certificate, parents: list[x509.Certificate]) -> str | None:
    child = cert
    for parent in parents:
        if not _issued_by(child, parent):
            return f"{child.subject.rfc4514_string()!r} is not signed by {parent.subject.rfc4514_string()!r}"
        child = parent
    return None


@dataclass(frozen=True)
class TrustBundle:
    """The set of roots agents trust: one normally, two during a root rotation."""

    roots: tuple[x509.Certificate, ...]

    @classmethod
    def of(cls, roots: Iterable[x509.Certificate]) -> TrustBundle:
        unique: list[x509.Certificate] = []
        for root in roots:
            if root not in unique:
                unique.append(root)
        return cls(tuple(unique))

    @classmethod
    def from_pem(cls, pem: bytes) -> TrustBundle:
        try:
            roots = x509.load_pem_x509_certificates(pem)
        except ValueError as exc:
            raise CAMaterialError(f"trust bundle is not a list of PEM certificates: {exc}") from exc
        return cls.of(roots)

    def to_pem(self) -> str:
        return "".join(cert_pem(r) for r in self.roots)

    def fingerprints(self) -> tuple[str, ...]:
        return tuple(fingerprint(r) for r in self.roots)


# --- CSRs and issuance ----------------------------------------------------------------------------


def verify_csr(csr_pem: bytes, identity: Identity) -> x509.CertificateSigningRequest:
    """Check a PEM CSR asks for exactly `identity` with an acceptable key; raise CSRError otherwise."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CSRError(
            Reason.CSR_TOO_LARGE,
            f"CSR is {len(csr_pem)} bytes, the limit is {MAX_CSR_BYTES}: send one PEM CSR for one key",
        )
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CSRError(Reason.CSR_MALFORMED, f"CSR is not a PEM PKCS#10 request: {exc}") from exc
    _check_key(csr)
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError) as exc:
        raise CSRError(Reason.CSR_BAD_SIGNATURE, f"CSR signature cannot be checked: {exc}") from exc
    if not valid:
        raise CSRError(Reason.CSR_BAD_SIGNATURE, "CSR signature does not match its public key; re-create the CSR")
    if not isinstance(csr.signature_hash_algorithm, _ACCEPTED_CSR_HASHES):
        raise CSRError(Reason.CSR_WEAK_KEY, "CSR must be signed with SHA-256 or stronger")
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except BAD_EXTENSION_ERRORS as exc:
        raise CSRError(Reason.CSR_MALFORMED, f"CSR extensions cannot be parsed: {exc}") from exc
    if len(uris) != 1:
        raise CSRError(
            Reason.CSR_URI_SAN_COUNT,
            f"CSR has {len(uris)} URI SANs; an X.509-SVID request carries exactly one: {identity.uri}",
        )
    try:
        requested = Identity.parse_uri(uris[0])
    except IdentityError as exc:
        raise CSRError(Reason.CSR_IDENTITY_MISMATCH, f"CSR URI SAN is not a workload identity: {exc}") from exc
    if requested != identity:
        raise CSRError(
            Reason.CSR_IDENTITY_MISMATCH,
            f"CSR asks for {requested} but this request is authorized for {identity}",
        )
    return csr


def _check_key(csr: x509.CertificateSigningRequest) -> None:
    try:
        key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise CSRError(Reason.CSR_UNSUPPORTED_KEY, f"CSR public key is not usable: {exc}") from exc
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return
        if key.curve.key_size < 256:
            raise CSRError(Reason.CSR_WEAK_KEY, f"CSR key curve {key.curve.name} is too weak; use P-256")
        raise CSRError(Reason.CSR_UNSUPPORTED_KEY, f"CSR key curve {key.curve.name} is not supported; use P-256")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CSRError(
                Reason.CSR_WEAK_KEY, f"CSR RSA key has {key.key_size} bits; use P-256 or RSA >= {MIN_RSA_BITS}"
            )
        return
    raise CSRError(Reason.CSR_UNSUPPORTED_KEY, f"CSR key type {type(key).__name__} is not supported; use P-256")


def resolve_ttl(requested_seconds: int, default: dt.timedelta = DEFAULT_TTL) -> dt.timedelta:
    """The lifetime to issue: the request's if positive, else `default`; never more than MAX_TTL."""
    if requested_seconds <= 0:
        return min(default, MAX_TTL)
    # Compared in seconds first: any int64 is a valid request, and timedelta overflows near 10**14 s.
    return MAX_TTL if requested_seconds >= MAX_TTL.total_seconds() else dt.timedelta(seconds=requested_seconds)


@dataclass(frozen=True)
class Issued:
    leaf: x509.Certificate
    chain_pem: tuple[str, ...]  # leaf first, root last


def issue(
    signer: Signer,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    identity: Identity,
    *,
    now: dt.datetime,
    ttl: dt.timedelta,
    dns_names: Sequence[str] = (),
) -> Issued:
    """Issue an X.509-SVID: empty subject, one URI SAN, not a CA, for TLS client and server use.

    `dns_names` exist for the CA's own serving certificate only; workload certificates carry none.
    The lifetime is `ttl` from `now`, cut short so it never outlives the signer's chain.
    """
    now = _aware(now)
    if signer.not_after <= now:
        raise SignerExpired(
            Reason.SIGNER_EXPIRED,
            f"the CA's signing chain expired at {signer.not_after.isoformat()}: nothing it signs would be valid; "
            "give the CA new material (a new cacerts Secret, or `nodeagent ca rotate`)",
        )
    not_after = min(now + min(ttl, MAX_TTL), signer.not_after)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    sans += [x509.DNSName(name) for name in dns_names]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(signer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        # An empty subject makes the SAN the only name, so RFC 5280 requires it to be critical.
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(signer._key_id), critical=False)
        .sign(signer.key, hashes.SHA256())
    )
    return Issued(leaf=leaf, chain_pem=(cert_pem(leaf), *signer.chain_pem))


def sign_csr(signer: Signer, csr_pem: bytes, identity: Identity, now: dt.datetime, requested_seconds: int) -> Issued:
    """Verify `csr_pem` asks for `identity` and issue it with the resolved TTL."""
    csr = verify_csr(csr_pem, identity)
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)  # checked by verify_csr
    return issue(signer, public_key, identity, now=now, ttl=resolve_ttl(requested_seconds))


def svid_identity(cert: x509.Certificate) -> Identity:
    """The one SPIFFE identity of an X.509-SVID; ValueError if it does not carry exactly one."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound as exc:
        raise ValueError("certificate has no subjectAltName; it is not an X.509-SVID") from exc
    except BAD_EXTENSION_ERRORS as exc:
        raise ValueError(f"certificate extensions cannot be parsed: {exc}") from None
    if len(uris) != 1:
        raise ValueError(f"certificate has {len(uris)} URI SANs; an X.509-SVID has exactly one")
    return Identity.parse_uri(uris[0])


# --- node authorization ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its service-account identity and, when known, its node and pod."""

    identity: Identity
    node: str | None
    pod_name: str | None = None
    pod_uid: str | None = None


def parse_impersonated(text: str) -> Identity:
    try:
        return Identity.parse_uri(text)
    except IdentityError as exc:
        raise AuthorizationError(Reason.BAD_IMPERSONATED_IDENTITY, f"{IMPERSONATED_IDENTITY_KEY}: {exc}") from exc


def authorize(
    caller: Caller,
    requested: Identity | None,
    *,
    trust_domain: str,
    trusted_node_accounts: frozenset[Identity],
    pods_on_caller_node: Sequence[Pod],
) -> Identity:
    """Decide which identity `caller` may be issued, or raise AuthorizationError with the reason.

    Only node agents are served. A node agent asking for no particular identity gets its own; asking
    for `requested` (Istio's ImpersonatedIdentity) is granted only when a pod of that namespace and
    service account that has not terminated runs on the caller's node.
    """
    if caller.identity not in trusted_node_accounts:
        raise AuthorizationError(
            Reason.NOT_NODE_AGENT,
            f"{caller.identity} is not a trusted node-agent account "
            f"({', '.join(sorted(str(a) for a in trusted_node_accounts))})",
        )
    if caller.node is None:
        raise AuthorizationError(
            Reason.CALLER_NODE_UNKNOWN,
            f"the node of caller {caller.identity} is unknown; its token must be bound to a pod on a node",
        )
    if caller.pod_name is not None or caller.pod_uid is not None:
        own = [
            p
            for p in pods_on_caller_node
            if p.name == caller.pod_name
            and p.namespace == caller.identity.namespace
            and p.uid == caller.pod_uid
            and p.service_account == caller.identity.service_account
            and not p.terminated
        ]
        if not own:
            raise AuthorizationError(
                Reason.CALLER_POD_MISMATCH,
                f"caller pod {caller.identity.namespace}/{caller.pod_name} (uid {caller.pod_uid}) does not run "
                f"on node {caller.node} with account {caller.identity.service_account}",
            )
    if requested is None:
        return caller.identity
    if requested.trust_domain != trust_domain:
        raise AuthorizationError(
            Reason.FOREIGN_TRUST_DOMAIN,
            f"{requested} is outside this CA's trust domain {trust_domain!r}",
        )
    for pod in pods_on_caller_node:
        if (
            pod.namespace == requested.namespace
            and pod.service_account == requested.service_account
            and not pod.terminated
        ):
            return requested
    raise AuthorizationError(
        Reason.IDENTITY_NOT_ON_NODE,
        f"no running pod with service account {requested.namespace}/{requested.service_account} "
        f"on node {caller.node}; node agents may only ask for identities of their own pods",
    )
