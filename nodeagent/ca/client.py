"""A client for Istio's CA API (ours or istiod's), used as the certificate manager's `fetch` edge.

Why this module exists: the tunnel's certificate manager (nodeagent.ztunnel.certs) must not import the
CA package, yet someone has to speak the CA's wire protocol. This client lives next to the generated
protobuf code; whoever assembles the tunnel passes `CAClient(...).fetch` to the manager. It calls
`CreateCertificate` over grpc.aio with TLS verified against the trust bundle, the node agent's token
as `authorization: Bearer`, and the workload as `ImpersonatedIdentity` in the request metadata, like
ztunnel does. The bundle is asked for per call; when it changes (a root rotation), calls go over a new
channel and the old one is closed as soon as no call is using it: a tunnel lives through many rotations.

What it deliberately does not do: no retries or backoff (the manager owns the schedule), no key or CSR
generation, no token minting (the token source is injected and re-read per call, so a projected token
that the kubelet rotates is picked up).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import grpc.aio

from nodeagent.ca.authority import DEFAULT_CA_NAME, IMPERSONATED_IDENTITY_KEY
from nodeagent.ca.proto import ca_pb2, ca_pb2_grpc
from nodeagent.model import Identity

log = logging.getLogger(__name__)

_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is the CA running and reachable, and does its certificate chain to the bundle?",
    grpc.StatusCode.UNAUTHENTICATED: "is the node token valid, and does a pod with this service account run on "
    "this node? The CA log has the exact reason",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the CA is slow or unreachable",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the CA is at its concurrency limit; the request will be retried",
}


class CARequestError(Exception):
    """The CA refused or did not answer; carries the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class CAClient:
    def __init__(
        self,
        target: str,
        token: Callable[[], str],
        bundle_pem: Callable[[], str],
        *,
        server_name: str = DEFAULT_CA_NAME,
        ttl_seconds: int = 0,
        timeout: float = 10.0,
        cluster_id: str = "Kubernetes",
    ) -> None:
        self._target = target
        self._token = token
        self._bundle_pem = bundle_pem
        self._server_name = server_name
        self._ttl = ttl_seconds
        self._timeout = timeout
        self._cluster_id = cluster_id
        self._channel: grpc.aio.Channel | None = None
        self._channel_bundle = ""
        # Calls in flight per channel: a channel replaced by a new bundle is closed when its last call ends.
        self._calls: dict[grpc.aio.Channel, int] = {}

    def _current(self) -> tuple[grpc.aio.Channel, grpc.aio.Channel | None]:
        """The channel for the bundle as it is now, and the channel it replaced if no call of ours is using
        that one any more (the caller closes it). A new bundle needs a new channel: gRPC's credentials are
        fixed per channel. A replaced channel still carrying calls is closed by the last of them."""
        bundle = self._bundle_pem()
        idle: grpc.aio.Channel | None = None
        if self._channel is None or bundle != self._channel_bundle:
            if self._channel is not None and not self._calls.get(self._channel):
                idle = self._channel
            credentials = grpc.ssl_channel_credentials(root_certificates=bundle.encode())
            options = [
                ("grpc.ssl_target_name_override", self._server_name),
                # Reconnect soon after a CA outage; the certificate manager's own backoff paces the requests.
                ("grpc.initial_reconnect_backoff_ms", 500),
                ("grpc.max_reconnect_backoff_ms", 5000),
            ]
            self._channel = grpc.aio.secure_channel(self._target, credentials, options=options)
            self._channel_bundle = bundle
        return self._channel, idle

    async def fetch(self, identity: Identity, csr_pem: bytes) -> list[str]:
        request = ca_pb2.IstioCertificateRequest(csr=csr_pem.decode("ascii"), validity_duration=self._ttl)
        request.metadata.update({IMPERSONATED_IDENTITY_KEY: identity.uri})
        metadata = (("authorization", f"Bearer {self._token()}"), ("clusterid", self._cluster_id))
        channel, idle = self._current()
        self._calls[channel] = self._calls.get(channel, 0) + 1
        try:
            if idle is not None:
                await idle.close()
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
            response = await stub.CreateCertificate(request, metadata=metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            hint = _HINTS.get(code, "")
            raise CARequestError(
                code, f"CA {self._target} answered {code.name}: {exc.details()}" + (f" — {hint}" if hint else "")
            ) from None
        finally:
            left = self._calls.get(channel)  # None: close() has closed every channel meanwhile
            if left is not None and left > 1:
                self._calls[channel] = left - 1
            elif left is not None:
                del self._calls[channel]
                if channel is not self._channel:  # replaced while this call ran: it was the last user
                    await channel.close()
        return list(response.cert_chain)

    async def close(self) -> None:
        for channel in {*self._calls, *([self._channel] if self._channel is not None else [])}:
            await channel.close()
        self._channel = None
        self._calls.clear()
