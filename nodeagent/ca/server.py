"""The CA's gRPC service: Istio's `IstioCertificateService/CreateCertificate` over TLS on :15012.

Why this module exists: it is the only part of the CA that touches the network. It takes a request
apart (bearer token, CSR, ImpersonatedIdentity from the metadata Struct), asks ca.authn who is calling,
asks ca.authority what that caller may have and to sign it, and turns every refusal into a gRPC status:
authentication and authorization failures are an opaque UNAUTHENTICATED (the real reason goes to the
log and to the `nodeagent_ca_requests{result,reason}` counter), a bad CSR is INVALID_ARGUMENT with a
message that says what to fix. So is a body that does not parse: the request is decoded here, not by the
generated code, whose failure gRPC reports as INTERNAL before the handler runs.

It is bounded: requests larger than `max_message_bytes` are refused by gRPC (RESOURCE_EXHAUSTED), CSRs
over 64 KiB by the authority, at most `max_concurrent_rpcs` are admitted (more get RESOURCE_EXHAUSTED)
and a fixed thread pool does the work. The server's own certificate is issued by the CA for its own
identity and DNS names, and reissued when the signer changes or at half its lifetime; the signer and
the inventory are reloaded when their files change (mtime polling).

What it deliberately does not do: no signing or policy decisions of its own, no token parsing, no
Kubernetes watches (the node-scoped pod view is an injected callable).
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import DecodeError

from nodeagent.admin import ListenError, listen_error
from nodeagent.ca import authority
from nodeagent.ca.authn import AuthenticationError, Authenticator
from nodeagent.ca.authority import DEFAULT_DNS_NAMES, AuthorityError, CSRError, Reason
from nodeagent.ca.proto import ca_pb2, ca_pb2_grpc
from nodeagent.ca.store import CAState, CAStore, utcnow
from nodeagent.metrics import CAMetrics
from nodeagent.model import Identity, Pod

log = logging.getLogger(__name__)

DEFAULT_PORT = 15012
SERVING_TTL = dt.timedelta(hours=24)
OPAQUE_DENIAL = "request authentication failed"

T = TypeVar("T")


def file_stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a file is rewritten (mtime, size, inode); zeros when it is absent."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return (0, 0, 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Reloading(Generic[T]):
    """A value loaded by `load()` and loaded again when `stamp()` changes (mtime polling).

    Checks at most every `interval` seconds; a failed reload keeps the last good value and is logged,
    so a half-edited inventory or an interrupted rotation step never takes the CA down.
    """

    def __init__(
        self,
        name: str,
        load: Callable[[], T],
        stamp: Callable[[], Hashable],
        interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._load = load
        self._stamp_of = stamp
        self._interval = interval
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._stamp = stamp()
        self._value = load()
        self._checked = monotonic()

    def current(self) -> T:
        with self._lock:
            now = self._monotonic()
            if now - self._checked < self._interval:
                return self._value
            self._checked = now
            stamp = self._stamp_of()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._value = self._load()
                    log.info("reloaded %s", self.name)
                except Exception as exc:
                    log.error("cannot reload %s, keeping the previous version: %s", self.name, exc)
            return self._value


def watch_file(path: Path, load: Callable[[Path], T], interval: float = 1.0) -> Reloading[T]:
    """A file's parsed content, reloaded when the file changes (e.g. the lab inventory)."""
    return Reloading(str(path), lambda: load(path), lambda: file_stamp(path), interval)


@dataclass(frozen=True)
class ServerInputs:
    """Everything the CA server needs, injected (tests build their own)."""

    store: CAStore
    authenticator: Authenticator
    pods_on_node: Callable[[str], Sequence[Pod]]
    metrics: CAMetrics
    trusted_node_accounts: frozenset[Identity]
    clock: Callable[[], dt.datetime] = utcnow
    server_identity: Identity | None = None  # default spiffe://<td>/ns/nodeagent-system/sa/nodeagent-ca
    dns_names: tuple[str, ...] = DEFAULT_DNS_NAMES
    max_workers: int = 8
    max_concurrent_rpcs: int = 256
    max_message_bytes: int = 256 * 1024
    reload_interval: float = 1.0
    monotonic: Callable[[], float] = field(default=time.monotonic)
    # (namespace, name, uid) -> the pod's node: for pod-bound tokens that do not name their node (the
    # node-name claim is Kubernetes >= 1.30); Istio's node authorizer takes it from the pod the same way.
    node_of_pod: Callable[[str, str, str], str | None] = field(default=lambda namespace, name, uid: None)


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, result: str, error: AuthorityError, public: str) -> None:
        super().__init__(error.message)
        self.code = code
        self.result = result
        self.error = error
        self.public = public


class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):  # type: ignore[misc]
    def __init__(self, inputs: ServerInputs, state: Reloading[CAState]) -> None:
        self._in = inputs
        self._state = state

    def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest | Undecodable, context: grpc.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        started = time.perf_counter()
        try:
            identity, chain = self._create(request, context)
        except _Denied as denied:
            reason = denied.error.reason.value
            log.warning(
                "CreateCertificate from %s %s: %s [reason=%s]", context.peer(), denied.result, denied.error, reason
            )
            self._in.metrics.record(denied.result, reason, time.perf_counter() - started)
            context.abort(denied.code, denied.public)
        except Exception:
            log.exception("CreateCertificate from %s failed", context.peer())
            self._in.metrics.record("error", "internal", time.perf_counter() - started)
            context.abort(grpc.StatusCode.INTERNAL, "internal error in the CA; see its log")
        log.info("issued %s to %s", identity, context.peer())
        self._in.metrics.record("issued", Reason.OK.value, time.perf_counter() - started)
        return ca_pb2.IstioCertificateResponse(cert_chain=list(chain))

    def _create(
        self, request: ca_pb2.IstioCertificateRequest | Undecodable, context: grpc.ServicerContext
    ) -> tuple[Identity, tuple[str, ...]]:
        if isinstance(request, Undecodable):
            error = AuthorityError(Reason.REQUEST_MALFORMED, request.problem)
            raise _Denied(grpc.StatusCode.INVALID_ARGUMENT, "invalid", error, error.message)
        csr = request.csr.encode()
        if len(csr) > authority.MAX_CSR_BYTES:
            error = CSRError(
                Reason.CSR_TOO_LARGE,
                f"CSR is {len(csr)} bytes, the limit is {authority.MAX_CSR_BYTES}: send one PEM CSR for one key",
            )
            raise _Denied(grpc.StatusCode.INVALID_ARGUMENT, "invalid", error, error.message)
        try:
            caller = self._in.authenticator.authenticate(_bearer(context))
            if caller.node is None and caller.pod_name is not None and caller.pod_uid is not None:
                node = self._in.node_of_pod(caller.identity.namespace, caller.pod_name, caller.pod_uid)
                caller = replace(caller, node=node)
            requested = _impersonated(request)
            pods = self._in.pods_on_node(caller.node) if caller.node else ()
            identity = authority.authorize(
                caller,
                requested,
                trust_domain=self._in.store.trust_domain,
                trusted_node_accounts=self._in.trusted_node_accounts,
                pods_on_caller_node=pods,
            )
        except AuthorityError as exc:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, "denied", exc, OPAQUE_DENIAL) from exc
        signer = self._state.current().signer
        self._in.metrics.signer_expiry.set(signer.not_after.timestamp())
        try:
            issued = authority.sign_csr(signer, csr, identity, self._in.clock(), request.validity_duration)
        except CSRError as exc:
            raise _Denied(grpc.StatusCode.INVALID_ARGUMENT, "invalid", exc, exc.message) from exc
        except authority.SignerExpired as exc:
            raise _Denied(grpc.StatusCode.UNAVAILABLE, "error", exc, exc.message) from exc
        return identity, issued.chain_pem


# -- the request body: decoded by us, so that a body protobuf refuses is INVALID_ARGUMENT, not INTERNAL ------
# gRPC answers a deserializer's exception with INTERNAL ("Exception deserializing request!") before the
# handler runs. protobuf refuses any body with a string field that is not UTF-8 (proto3 strings must be)
# and names neither the field nor the byte; the request's shape is small enough to say which.

SERVICE = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name
_LEN = 2  # the length-delimited wire type (strings, messages)
_MAX_DEPTH = 100  # protobuf's own recursion limit: a deeper body is refused before any string is looked at


@dataclass(frozen=True)
class Undecodable:
    """A request body that is not an IstioCertificateRequest; `problem` says what is wrong with it."""

    problem: str


def decode_request(data: bytes) -> ca_pb2.IstioCertificateRequest | Undecodable:
    try:
        return ca_pb2.IstioCertificateRequest.FromString(data)
    except DecodeError as exc:
        return Undecodable(_undecodable(data, exc))


def _undecodable(data: bytes, exc: DecodeError) -> str:
    what = "the request is not an IstioCertificateRequest"
    try:
        for number, wire, value in _wire_fields(data):
            if number == 1 and wire == _LEN:
                _check_utf8(value, "csr (field 1)")
            elif number == 4 and wire == _LEN:
                _check_struct(value, "metadata (field 4)")
    except _NotUtf8 as bad:
        fix = (
            "send the CSR as PEM text"
            if str(bad).startswith("csr")
            else f"metadata keys and strings are text ({authority.IMPERSONATED_IDENTITY_KEY}: spiffe://<td>/ns/<ns>/sa/<sa>)"
        )
        return f"{what}: {bad} is not UTF-8 (at its byte {bad.at}), which protobuf strings must be; {fix}"
    except ValueError as bad:
        return f"{what}: {bad}; send one serialized istio.v1.auth.IstioCertificateRequest"
    return f"{what}: {exc}"


class _NotUtf8(ValueError):
    def __init__(self, where: str, at: int) -> None:
        super().__init__(where)
        self.at = at


def _check_utf8(value: bytes, where: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _NotUtf8(where, exc.start) from None


def _check_struct(data: bytes, where: str, depth: int = 0) -> None:
    """google.protobuf.Struct: fields = 1 (map entries: key = 1, Value = 2). As deep as protobuf parses."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where} nests deeper than {_MAX_DEPTH} levels")
    for number, wire, entry in _wire_fields(data):
        if number == 1 and wire == _LEN:
            key = ""
            for n, w, v in _wire_fields(entry):
                if n == 1 and w == _LEN:
                    key = _check_utf8(v, f"a key of {where}")
                elif n == 2 and w == _LEN:
                    _check_value(v, f"{where}[{key[:64]!r}]", depth)


def _check_value(data: bytes, where: str, depth: int) -> None:
    """google.protobuf.Value: string_value = 3, struct_value = 5, list_value = 6 (values = 1). Lists nest
    without a Struct in between, so the depth is checked here too."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where} nests deeper than {_MAX_DEPTH} levels")
    for number, wire, value in _wire_fields(data):
        if wire != _LEN:
            continue
        if number == 3:
            _check_utf8(value, where)
        elif number == 5:
            _check_struct(value, where, depth + 1)
        elif number == 6:
            for index, (n, w, item) in enumerate(_wire_fields(value)):
                if n == 1 and w == _LEN:
                    _check_value(item, f"{where}[{index}]", depth + 1)


def _wire_fields(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(field number, wire type, payload) of each field of one message level; ValueError where `data` is not
    protobuf wire format. Only length-delimited payloads are returned whole (others as b"")."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"field number 0 at byte {pos}")
        if wire == 0:
            _, pos = _varint(data, pos)
            payload = b""
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            payload = b""
        elif wire == _LEN:
            length, pos = _varint(data, pos)
            payload, pos = data[pos : pos + length], pos + length
        else:
            raise ValueError(f"field {number} has wire type {wire}, which this API never sends")
        if pos > len(data):
            raise ValueError(f"field {number} runs past the end of the request ({len(data)} bytes)")
        yield number, wire, payload


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError(f"a varint is cut off or too long at byte {pos}")


def _bearer(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise AuthenticationError(Reason.MISSING_TOKEN, "authorization header is not `Bearer <token>`")
    raise AuthenticationError(Reason.MISSING_TOKEN, "no `authorization: Bearer <token>` metadata")


def _impersonated(request: ca_pb2.IstioCertificateRequest) -> Identity | None:
    if not request.HasField("metadata"):
        return None
    value = request.metadata.fields.get(authority.IMPERSONATED_IDENTITY_KEY)
    if value is None:
        return None
    if value.WhichOneof("kind") != "string_value":
        raise authority.AuthorizationError(
            Reason.BAD_IMPERSONATED_IDENTITY, f"{authority.IMPERSONATED_IDENTITY_KEY} must be a string"
        )
    return authority.parse_impersonated(value.string_value)


class _ServingCert:
    """The server's own TLS certificate, issued by the current signer; reissued on signer change."""

    def __init__(self, inputs: ServerInputs, state: Reloading[CAState]) -> None:
        self._in = inputs
        self._state = state
        self._lock = threading.Lock()
        self._signer: authority.Signer | None = None
        self._renew_at = dt.datetime.min.replace(tzinfo=dt.UTC)
        self.identity = inputs.server_identity or Identity(
            inputs.store.trust_domain, "nodeagent-system", "nodeagent-ca"
        )

    def configuration(self) -> grpc.ServerCertificateConfiguration | None:
        """New material when due, else None (gRPC calls this before each handshake)."""
        with self._lock:
            signer = self._state.current().signer
            now = self._in.clock()
            if signer is self._signer and now < self._renew_at:
                return None
            self._in.metrics.signer_expiry.set(signer.not_after.timestamp())
            key = ec.generate_private_key(ec.SECP256R1())
            try:
                issued = authority.issue(
                    signer, key.public_key(), self.identity, now=now, ttl=SERVING_TTL, dns_names=self._in.dns_names
                )
            except authority.SignerExpired as exc:
                if self._signer is None:
                    raise  # nothing to serve with: `ca serve` fails, saying why
                log.error("cannot renew the CA's serving certificate: %s", exc)
                return None  # keep the current one
            if signer.not_after - now < authority.MAX_TTL:
                log.warning(
                    "the CA's signing chain expires at %s: workload certificates are cut short to it from now on; "
                    "rotate before then (`nodeagent ca rotate`, or new cacerts)",
                    signer.not_after.isoformat(),
                )
            self._signer = signer
            self._renew_at = now + (issued.leaf.not_valid_after_utc - now) / 2
            key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            log.info("serving certificate for %s issued by %s", self.identity, signer.cert.subject.rfc4514_string())
            return grpc.ssl_server_certificate_configuration([(key_pem, "".join(issued.chain_pem).encode())])


def check_listen(listen: str) -> None:
    """Raise the error listening on `listen` (gRPC's HOST:PORT) would meet, as one line naming the address, the
    cause and what to do; return if it can listen there. gRPC reports a failed bind as a RuntimeError that
    does not say why, so the cause is found the way gRPC binds: every address HOST resolves to, with
    SO_REUSEADDR, and a failure only if none of them binds."""
    host, _, port_text = listen.rpartition(":")
    if not host or not port_text.isdigit() or int(port_text) > 65535:  # gRPC takes no `:PORT` for all addresses
        raise ListenError(
            errno.EINVAL,
            f"cannot listen on {listen!r}: not HOST:PORT (e.g. 127.0.0.1:15012, or 0.0.0.0:15012 for all addresses)",
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise listen_error(host, port, exc) from None
    failure: OSError | None = None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                failure = failure or exc
                continue
        return
    if failure is not None:
        raise listen_error(host, port, failure)


class CAServer:
    """A running CA: `start(listen)` binds and serves, `stop()` drains."""

    def __init__(self, inputs: ServerInputs) -> None:
        self._in = inputs
        self.state = Reloading(
            f"CA state in {inputs.store.state_dir}",
            inputs.store.load,
            inputs.store.version,
            inputs.reload_interval,
            inputs.monotonic,
        )
        self._serving = _ServingCert(inputs, self.state)
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def serving_identity(self) -> Identity:
        return self._serving.identity

    def start(self, listen: str) -> int:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._in.max_workers, thread_name_prefix="ca-rpc"),
            maximum_concurrent_rpcs=self._in.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", self._in.max_message_bytes),
                ("grpc.max_send_message_length", self._in.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # No grpc.max_concurrent_streams: with grpcio 1.85 the per-connection stream quota leaks under
                # RESOURCE_EXHAUSTED overload and the connection then refuses every stream. maximum_concurrent_rpcs
                # bounds the work instead.
            ],
        )
        # The generated add_IstioCertificateServiceServicer_to_server, with our decode_request as the deserializer.
        service = CertificateService(self._in, self.state)
        handlers = {
            "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                service.CreateCertificate,
                request_deserializer=decode_request,
                response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)
        initial = self._serving.configuration()
        assert initial is not None
        credentials = grpc.dynamic_ssl_server_credentials(initial, self._serving.configuration)
        check_listen(listen)  # gRPC would fail without saying why (it logs the cause on stderr)
        try:
            port = int(server.add_secure_port(listen, credentials))
        except RuntimeError:  # grpcio raises "Failed to bind" where older versions returned 0
            port = 0
        if port == 0:
            check_listen(listen)  # taken since the check?
            raise OSError(f"cannot listen on {listen}: gRPC could not bind it; GRPC_VERBOSITY=debug logs why")
        server.start()
        self._server = server
        self.port = port
        log.info("CA serving on %s (port %d) as %s", listen, port, self._serving.identity)
        return port

    def stop(self, grace: float = 2.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()
