"""TLS contexts for HBONE and the SPIFFE check of the peer after the handshake.

Why this module exists: HBONE's security rests on a handful of TLS settings that are easy to get subtly
wrong with Python's `ssl` defaults — TLS 1.3 only, AES-GCM suites only, ALPN `h2`, a client certificate
required, no SNI, no session resumption, and trust in *several* roots at once so the mesh can rotate its
root without downtime (istio/istio#47427). Building every context here keeps those rules in one place;
a context is immutable once built, so a certificate or root-bundle change means building new contexts
(cheap: a few milliseconds) and using them for new connections while old connections keep theirs.

OpenSSL verifies the chain, validity period and signatures during the handshake. What OpenSSL cannot
know is the SPIFFE part, so after the handshake the caller runs `verify_server_peer()` (client side:
the server must be exactly the expected destination identity) or `verify_client_peer()` (server side:
the client must be a workload of our trust domain). Both parse the peer's DER certificate with
`cryptography` and return a parsed `Identity`; a raw SAN string never leaves this module.

A connection is only as trustworthy as what its handshake rested on, and an HBONE connection outlives
that: a busy pooled connection never idles, so it would carry new streams long after either certificate
expired or a root was removed from the bundle (`nodeagent ca rotate finish`). So every context built here
is an `HboneContext` that remembers its own certificate's notAfter and the roots it verifies against;
`authentication()` takes those and the peer's notAfter from a finished handshake, and the pure `stale()`
says when a connection so authenticated must take no new stream (its owners ask once per new stream,
nodeagent.ztunnel.hbone_transport.Trust). Streams already open are never cut for it.

How things are done that Python's `ssl` has no API for:
- TLS 1.3 cipher suites: `SSLContext.set_ciphers()` only affects TLS <= 1.2, so the suites are set with
  OpenSSL's `SSL_CTX_set_ciphersuites` through ctypes on the context's own `SSL_CTX` (from the libssl
  that `_ssl` already loaded). The pointer is checked against `SSL_CTX_get_options` before use and the
  result is checked with `get_ciphers()`; any mismatch raises `TlsConfigError` instead of running with
  the defaults. The same handle turns the server-side session cache off.
- Private keys: `load_cert_chain()` only reads files, so the PEM is written to an anonymous memfd
  (memfd_create, close-on-exec) and loaded through /proc/self/fd/N. The key never touches a filesystem,
  and the fd is closed as soon as OpenSSL has read it.

What it deliberately does not do: no sockets or event loops (callers pass the finished SSLObject /
SSLSocket), no certificate issuance or rotation timing (nodeagent.ztunnel.certs), no authorization
(nodeagent.policy), no caching of contexts.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from nodeagent.model import MAX_SPIFFE_ID_BYTES, Identity, IdentityError

HBONE_ALPN = "h2"
CIPHER_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")


class TlsConfigError(ValueError):
    """Certificates, key or roots that cannot make a valid HBONE context, or an OpenSSL we cannot steer."""


class PeerFailure(enum.Enum):
    """Why a peer that completed the TLS handshake is still refused (the wire-level reason code)."""

    NO_CERTIFICATE = "no_certificate"
    NO_ALPN_H2 = "no_alpn_h2"
    MALFORMED_CERTIFICATE = "malformed_certificate"
    CA_CERTIFICATE = "ca_certificate"
    KEY_USAGE = "key_usage"
    URI_SAN_COUNT = "uri_san_count"
    ID_TOO_LONG = "id_too_long"
    INVALID_ID = "invalid_id"
    IDENTITY_MISMATCH = "identity_mismatch"
    TRUST_DOMAIN_MISMATCH = "trust_domain_mismatch"


class PeerVerificationError(Exception):
    """The peer's certificate is not acceptable for this HBONE connection: close the connection."""

    def __init__(self, reason: PeerFailure, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SslConnection(Protocol):
    """What the checks need from a finished handshake: both ssl.SSLObject and ssl.SSLSocket fit."""

    def getpeercert(self, binary_form: bool = ...) -> object: ...
    def selected_alpn_protocol(self) -> str | None: ...

    @property
    def context(self) -> ssl.SSLContext: ...


class HboneContext(ssl.SSLContext):
    """An HBONE SSLContext (client_context/server_context) and what it was built with: `not_after`, when the
    certificate it presents expires (wall seconds), and `roots`, the DER of the roots it verifies peers
    against. Set once when it is built; a context is never changed afterwards (see the module docstring)."""

    not_after: float
    roots: frozenset[bytes]


@dataclass(frozen=True, slots=True)
class Authentication:
    """What one HBONE connection's handshake rested on: both certificates' notAfter (wall seconds) and the
    roots the peer's chain was verified against."""

    local_not_after: float
    peer_not_after: float
    roots: frozenset[bytes]

    @property
    def expires(self) -> float:
        """When the first of the two certificates expires."""
        return min(self.local_not_after, self.peer_not_after)


def authentication(conn: SslConnection) -> Authentication:
    """The Authentication of a finished handshake made with an HboneContext. The peer's notAfter is OpenSSL's
    reading of the certificate it has just verified (no second parse)."""
    ctx = conn.context
    if not isinstance(ctx, HboneContext):
        raise TlsConfigError("the connection was not made with an HBONE context (tls.client_context/server_context)")
    peer = conn.getpeercert()
    not_after = peer.get("notAfter") if isinstance(peer, dict) else None
    if not isinstance(not_after, str):
        raise PeerVerificationError(PeerFailure.NO_CERTIFICATE, "peer presented no verified certificate")
    return Authentication(ctx.not_after, float(ssl.cert_time_to_seconds(not_after)), ctx.roots)


def trusted_roots(ctx: ssl.SSLContext) -> frozenset[bytes]:
    """The roots an HboneContext verifies peers against (DER)."""
    if not isinstance(ctx, HboneContext):
        raise TlsConfigError("not an HBONE context (tls.client_context/server_context)")
    return ctx.roots


def stale(auth: Authentication, now: float, roots: frozenset[bytes]) -> str | None:
    """Why a connection authenticated as `auth` must take no new stream at wall time `now`, with `roots` the
    bundle trusted now; None while it may. Any change of the set of roots counts, not only a removal of the
    connection's own root: which root the peer's chain ended in is not recorded, and a bundle changes rarely
    (a root rotation's steps), so retiring every connection then costs a few handshakes and keeps the rule
    sound."""
    if now >= auth.local_not_after:
        return "our certificate on it has expired"
    if now >= auth.peer_not_after:
        return "the peer's certificate on it has expired"
    if roots != auth.roots:
        return "the trust bundle has changed since its handshake"
    return None


@dataclass(frozen=True, slots=True, repr=False)
class TlsMaterial:
    """One identity's credentials plus the roots it trusts, as PEM bytes.

    `cert_chain_pem`: leaf first, then intermediates (the root may follow; it is harmless). `roots_pem`:
    one or more CA certificates; during a root rotation it holds the old and the new root.
    repr is disabled so the key never lands in a log line.
    """

    cert_chain_pem: bytes
    key_pem: bytes
    roots_pem: bytes

    def __post_init__(self) -> None:
        try:
            chain = x509.load_pem_x509_certificates(self.cert_chain_pem)
        except ValueError as exc:
            raise TlsConfigError(f"certificate chain is not PEM certificates: {exc}") from None
        try:
            load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise TlsConfigError(f"private key is not an unencrypted PEM key: {exc}") from None
        try:
            roots = x509.load_pem_x509_certificates(self.roots_pem)
        except ValueError as exc:
            raise TlsConfigError(f"root bundle is not PEM certificates: {exc}") from None
        for root in roots:
            if not _is_ca(root):
                raise TlsConfigError(
                    f"root bundle entry {root.subject.rfc4514_string()!r} is not a CA certificate; "
                    "pass the mesh root(s), not a leaf"
                )
        try:
            svid_identity(chain[0])
        except PeerVerificationError as exc:
            raise TlsConfigError(f"our own leaf certificate is not a workload SVID: {exc}") from None

    @property
    def identity(self) -> Identity:
        """The SPIFFE identity of the leaf certificate (checked in __post_init__)."""
        return svid_identity(x509.load_pem_x509_certificates(self.cert_chain_pem)[0])


def client_context(material: TlsMaterial) -> HboneContext:
    """Context for outbound HBONE: present `material`'s identity, verify the server against the roots.

    Wrap without SNI: `loop.create_connection(..., ssl=ctx, server_hostname="")` or
    `ctx.wrap_bio(..., server_hostname=None)`; then call `verify_server_peer()`.
    """
    ctx = HboneContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the identity check is SPIFFE's (verify_server_peer), not a host name
    _configure(ctx, material)
    return ctx


def server_context(material: TlsMaterial) -> HboneContext:
    """Context for inbound HBONE (15008): require a client certificate chaining to the roots.

    After the handshake call `verify_client_peer()` with our trust domain.
    """
    ctx = HboneContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.num_tickets = 0  # TLS 1.3 resumption is ticket-based: sending none disables it
    _configure(ctx, material)
    _OpenSsl.get().disable_session_cache(ctx)
    return ctx


def _configure(ctx: HboneContext, material: TlsMaterial) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols([HBONE_ALPN])
    _OpenSsl.get().set_tls13_ciphersuites(ctx, CIPHER_SUITES)
    try:
        ctx.load_verify_locations(cadata=material.roots_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise TlsConfigError(f"cannot load the root bundle: {exc}") from None
    with _memfd(material.cert_chain_pem) as chain_path, _memfd(material.key_pem) as key_path:
        try:
            ctx.load_cert_chain(chain_path, key_path)
        except ssl.SSLError as exc:
            raise TlsConfigError(
                f"cannot load certificate chain and key ({exc.reason or exc}); does the key belong to the leaf, "
                "and is the chain leaf-first?"
            ) from None
    ctx.not_after = x509.load_pem_x509_certificates(material.cert_chain_pem)[0].not_valid_after_utc.timestamp()
    ctx.roots = frozenset(ctx.get_ca_certs(binary_form=True))


@contextlib.contextmanager
def _memfd(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("nodeagent-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


# -- SPIFFE verification of the peer ---------------------------------------------------------------------


def verify_server_peer(conn: SslConnection, expected: Identity) -> Identity:
    """Client side: the server negotiated h2 and its SVID is exactly `expected`."""
    identity = _peer_identity(conn)
    if identity != expected:
        raise PeerVerificationError(
            PeerFailure.IDENTITY_MISMATCH,
            f"server presented {identity}, expected {expected}; is the destination pod's address stale "
            "or the wrong workload listening on it?",
        )
    return identity


def verify_client_peer(conn: SslConnection, trust_domain: str) -> Identity:
    """Server side: the client negotiated h2 and its SVID belongs to our trust domain."""
    identity = _peer_identity(conn)
    if identity.trust_domain != trust_domain:
        raise PeerVerificationError(
            PeerFailure.TRUST_DOMAIN_MISMATCH,
            f"client {identity} is from trust domain {identity.trust_domain!r}, not ours ({trust_domain!r})",
        )
    return identity


def _peer_identity(conn: SslConnection) -> Identity:
    alpn = conn.selected_alpn_protocol()
    if alpn != HBONE_ALPN:
        raise PeerVerificationError(
            PeerFailure.NO_ALPN_H2, f"peer negotiated ALPN {alpn!r}, HBONE needs {HBONE_ALPN!r}"
        )
    der = conn.getpeercert(binary_form=True)
    if not isinstance(der, bytes) or not der:
        raise PeerVerificationError(PeerFailure.NO_CERTIFICATE, "peer presented no certificate")
    return svid_identity_der(der)


def svid_identity_der(der: bytes) -> Identity:
    """The workload identity of a leaf X.509-SVID in DER form, or PeerVerificationError saying why not."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise PeerVerificationError(PeerFailure.MALFORMED_CERTIFICATE, f"unparseable certificate: {exc}") from None
    return svid_identity(cert)


def svid_identity(cert: x509.Certificate) -> Identity:
    """Apply the X.509-SVID leaf rules (REFERENCE.md) and return the parsed workload identity."""
    try:
        return _svid_identity(cert)
    except (x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:  # not ValueErrors
        raise PeerVerificationError(PeerFailure.MALFORMED_CERTIFICATE, f"bad extensions: {exc}") from None


def _svid_identity(cert: x509.Certificate) -> Identity:
    if _is_ca(cert):
        raise PeerVerificationError(PeerFailure.CA_CERTIFICATE, "leaf certificate is a CA (basicConstraints CA:TRUE)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise PeerVerificationError(
            PeerFailure.KEY_USAGE, "leaf certificate has no keyUsage; an SVID needs digitalSignature"
        ) from None
    except ValueError as exc:
        raise PeerVerificationError(PeerFailure.MALFORMED_CERTIFICATE, f"bad extensions: {exc}") from None
    if usage.key_cert_sign or usage.crl_sign:
        raise PeerVerificationError(PeerFailure.KEY_USAGE, "leaf certificate may sign certificates or CRLs")
    if not usage.digital_signature:
        raise PeerVerificationError(PeerFailure.KEY_USAGE, "leaf keyUsage lacks digitalSignature")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except ValueError as exc:
        raise PeerVerificationError(PeerFailure.MALFORMED_CERTIFICATE, f"bad subjectAltName: {exc}") from None
    if len(uris) != 1:
        raise PeerVerificationError(
            PeerFailure.URI_SAN_COUNT, f"an SVID has exactly one URI SAN, this certificate has {len(uris)}"
        )
    uri = uris[0]
    if len(uri.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
        raise PeerVerificationError(PeerFailure.ID_TOO_LONG, f"SPIFFE ID longer than {MAX_SPIFFE_ID_BYTES} bytes")
    try:
        return Identity.parse_uri(uri)
    except IdentityError as exc:
        raise PeerVerificationError(PeerFailure.INVALID_ID, str(exc)) from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


# -- the OpenSSL calls Python's ssl module does not expose -----------------------------------------------


class _OpenSsl:
    """libssl as already loaded by `_ssl`, and the SSL_CTX behind an SSLContext."""

    _instance: _OpenSsl | None = None
    _SSL_CTRL_SET_SESS_CACHE_MODE = 44
    _SSL_SESS_CACHE_OFF = 0

    def __init__(self) -> None:
        path = self._loaded_libssl()
        lib = ctypes.CDLL(path)
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        self._lib = lib

    @classmethod
    def get(cls) -> _OpenSsl:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    @staticmethod
    def _loaded_libssl() -> str:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libssl.so"):
                    return path
        raise TlsConfigError(
            f"cannot find the libssl that Python's ssl module uses ({ssl.OPENSSL_VERSION}); "
            "a statically linked OpenSSL cannot be restricted to the HBONE cipher suites"
        )

    def _ssl_ctx(self, ctx: ssl.SSLContext) -> int:
        # CPython's PySSLContext starts with PyObject_HEAD followed by `SSL_CTX *ctx`.
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not ptr or self._lib.SSL_CTX_get_options(ptr) != int(ctx.options):
            raise TlsConfigError(
                "cannot locate the OpenSSL SSL_CTX of an SSLContext on this Python build; "
                "the TLS 1.3 cipher suites cannot be restricted"
            )
        return ptr

    def set_tls13_ciphersuites(self, ctx: ssl.SSLContext, suites: tuple[str, ...]) -> None:
        if self._lib.SSL_CTX_set_ciphersuites(self._ssl_ctx(ctx), ":".join(suites).encode("ascii")) != 1:
            raise TlsConfigError(f"OpenSSL rejected the TLS 1.3 cipher suites {suites}")
        active = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"}
        if active != set(suites):
            raise TlsConfigError(f"TLS 1.3 cipher suites are {sorted(active)} after setting {list(suites)}")

    def disable_session_cache(self, ctx: ssl.SSLContext) -> None:
        self._lib.SSL_CTX_ctrl(self._ssl_ctx(ctx), self._SSL_CTRL_SET_SESS_CACHE_MODE, self._SSL_SESS_CACHE_OFF, None)
