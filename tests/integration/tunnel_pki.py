"""A tiny, self-contained test PKI for the HBONE TLS tests: roots and (deliberately broken) leaves.

Independent of nodeagent.ca on purpose: the TLS module is checked against certificates built here with
`cryptography` directly, so a bug in the CA cannot hide a bug in the verifier (or the other way round).
"""

from __future__ import annotations

import datetime
import pathlib
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeagent.ztunnel.tls import TlsMaterial

NOW = datetime.datetime.now(datetime.UTC)
_ONE_DAY = datetime.timedelta(days=1)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return _pem(self.cert)

    @classmethod
    def new(cls, name: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - _ONE_DAY)
            .not_valid_after(NOW + 30 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def leaf(
        self,
        *uris: str,
        ca: bool = False,
        cert_sign: bool = False,
        digital_signature: bool = True,
        key_usage: bool = True,
        expired: bool = False,
    ) -> tuple[bytes, bytes]:
        """(chain PEM, key PEM) of a leaf signed by this CA with the given URI SANs and flaws."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - (3 if expired else 1) * _ONE_DAY)
            .not_valid_after(NOW - 2 * _ONE_DAY if expired else NOW + _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if key_usage:
            builder = builder.add_extension(
                _key_usage(cert_sign=cert_sign, digital_signature=digital_signature), critical=True
            )
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return _pem(cert), _key_pem(key)

    def material(self, *uris: str, roots: bytes | None = None, **flaws: bool) -> TlsMaterial:
        """TlsMaterial for a leaf of this CA; trusts `roots` (default: this CA only)."""
        chain, key = self.leaf(*uris, **flaws)
        return TlsMaterial(chain, key, roots if roots is not None else self.pem)


def _key_usage(*, cert_sign: bool = False, digital_signature: bool = True) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def peer_context(
    *,
    server_side: bool,
    chain_key: tuple[bytes, bytes] | None,
    roots: bytes,
    alpn: list[str] | None = None,
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    tmp_dir: pathlib.Path,
) -> ssl.SSLContext:
    """A context for a peer that does *not* use nodeagent.ztunnel.tls (hostile or misconfigured)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.maximum_version = max_version
    ctx.load_verify_locations(cadata=roots.decode())
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    if chain_key is not None:
        chain_path, key_path = tmp_dir / "peer-chain.pem", tmp_dir / "peer-key.pem"
        chain_path.write_bytes(chain_key[0])
        key_path.write_bytes(chain_key[1])
        ctx.load_cert_chain(chain_path, key_path)
    return ctx


@dataclass
class Handshake:
    """Both ends of an in-memory TLS handshake (MemoryBIO, no sockets) and what each end raised."""

    client: ssl.SSLObject
    server: ssl.SSLObject
    client_error: ssl.SSLError | None
    server_error: ssl.SSLError | None

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.server_error is None


def handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, sni_seen: list[str | None] | None = None
) -> Handshake:
    """Run a handshake between two contexts in memory, then one round trip of application data.

    In TLS 1.3 the client finishes before the server has checked the client certificate; the round trip
    makes a server-side rejection surface on the client too, as it would on a real connection.
    """
    if sni_seen is not None:
        server_ctx.sni_callback = lambda _obj, name, _ctx: sni_seen.append(name)  # type: ignore[assignment,func-returns-value]
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=None)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    errors: dict[str, ssl.SSLError | None] = {"client": None, "server": None}
    done = {"client": False, "server": False}

    def step(name: str, obj: ssl.SSLObject, action: str) -> None:
        if errors[name] is not None:
            return
        try:
            if action == "handshake" and not done[name]:
                obj.do_handshake()
                done[name] = True
            elif action == "write":
                obj.write(b"ping")
            elif action == "read":
                obj.read(4)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLError as exc:
            errors[name] = exc

    for action in ("handshake",) * 4 + ("write", "read", "write", "read"):
        step("client", client, action)
        s_in.write(c_out.read())
        step("server", server, action)
        c_in.write(s_out.read())
    return Handshake(client, server, errors["client"], errors["server"])
