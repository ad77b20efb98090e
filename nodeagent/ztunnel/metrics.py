"""What the tunnel reports about every proxied connection: Istio's TCP metrics, an access log, a table.

Why this module exists: operators compare the tunnel with Istio's ztunnel using the dashboards and
habits they have, so the counters carry Istio's names and labels (REFERENCE.md, "Telemetry"):
`istio_tcp_connections_opened_total`, `..._closed_total`, `istio_tcp_sent_bytes_total`,
`istio_tcp_received_bytes_total`, with reporter, source_/destination_ workload, namespace, principal,
app, version, cluster, canonical service and revision, destination_service*, request_protocol=tcp,
response_flags and connection_security_policy; a value nobody knows is "unknown". Two gauges show the
connections open now and those still being set up (pending, which must return to zero). Each
connection also gets exactly one access-log line when it ends, and sits in `ConnectionTable` while it
is open — the admin's `connections` section and the set that policy changes are re-checked against.

Byte directions follow Istio: *received* is what the client sent (towards the destination), *sent* is
what came back. Like ztunnel's, the byte counters move while a connection is open, not only when it
ends: `flush_bytes()` (run before every scrape) adds what open connections moved since the last one,
so a database connection open for hours shows its traffic in `rate()` and a crash loses at most one
scrape interval of it. The access log reads like ztunnel's (proxy/metrics.rs), so log tooling written for it
works: `bytes_sent`/`bytes_recv` are what the reporting tunnel sent/received on its peer's side — the
outbound side sent the request, the inbound side the response — and `dst.addr` is the address the
connection went to (the destination's :15008 for HBONE), `dst.hbone_addr` the CONNECT target inside.

What it deliberately does not do: no HTTP (nodeagent.admin serves the registry), no global registry,
no decisions — callers say what happened through `ConnectionRecord` and the methods here.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent.model import Identity, Pod
from nodeagent.policy import Connection
from nodeagent.ztunnel.fdshare import DescriptorShares

access_log = logging.getLogger("nodeagent.access")

UNKNOWN = "unknown"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"  # the kubelet's --cluster-domain: Service names end in .svc.<it>

ISTIO_LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)


class Direction(enum.Enum):
    OUTBOUND = "outbound"  # captured on :15001, reporter=source
    INBOUND = "inbound"  # HBONE on :15008, reporter=destination
    INBOUND_PLAINTEXT = "inbound_plaintext"  # captured on :15006, reporter=destination

    @property
    def reporter(self) -> str:
        return "source" if self is Direction.OUTBOUND else "destination"

    @property
    def reporter_side(self) -> str:
        """ztunnel's access-log direction: "inbound" for both inbound listeners."""
        return "outbound" if self is Direction.OUTBOUND else "inbound"


class Flags(enum.Enum):
    """Response flags for the ways a connection can fail; NONE is "-". DENY and CONNECT are ztunnel's values
    (proxy/metrics.rs), so dashboards built for it match; NR and DC (Envoy's) say more than ztunnel does."""

    NONE = "-"
    UPSTREAM_FAILURE = "CONNECT"  # the destination (app or remote tunnel) could not be reached
    NO_ROUTE = "NR"  # no such workload here, or a loop target
    DENIED = "DENY"  # refused by authorization (401 on HBONE, reset on :15006)
    DOWNSTREAM_CLOSED = "DC"  # the client went away before the tunnel was up
    OVERFLOW = "UO"  # its client held more than its share of the tunnel's descriptors, which ran short (fdshare)


@dataclass(frozen=True, slots=True)
class Peer:
    """One end of a connection as the labels and the log see it: metrics label the workload (a
    Deployment's name, not its pods': a series per pod would grow with every rollout), the access log and
    the connection table name the pod, as ztunnel's do."""

    workload: str = UNKNOWN
    pod: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    cluster: str = UNKNOWN

    @classmethod
    def of(cls, pod: Pod | None, identity: Identity | None, cluster: str) -> Peer:
        """The peer for `pod` seen as `identity`; memoised per pod object (pods are immutable and a view
        swap brings new objects), so a connection costs a dict lookup instead of a dozen label reads."""
        key = (id(pod), identity, cluster)
        hit = _PEERS.get(key)
        if hit is not None and hit[0] is pod:
            return hit[1]
        peer = cls._build(pod, identity, cluster)
        if len(_PEERS) >= _PEERS_MAX:
            _PEERS.clear()  # bounded; refilled by the next connections
        _PEERS[key] = (pod, peer)
        return peer

    @classmethod
    def _build(cls, pod: Pod | None, identity: Identity | None, cluster: str) -> Peer:
        principal = identity.uri if identity is not None else UNKNOWN
        if pod is None:
            return cls(principal=principal, namespace=identity.namespace if identity else UNKNOWN)
        return cls(
            workload=pod.workload,
            pod=pod.name,
            namespace=pod.namespace,
            principal=principal,
            canonical_service=canonical_service(pod),
            canonical_revision=canonical_revision(pod),
            cluster=cluster,
        )


# Istio's canonical service and revision (pkg/config/labels CanonicalService): the first of these labels
# the pod has, even if empty; else the workload name and "latest".
_CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")


def _first_label(labels: Mapping[str, str], keys: tuple[str, ...], default: str) -> str:
    return next((labels[key] for key in keys if key in labels), default)


def canonical_service(pod: Pod) -> str:
    return _first_label(pod.labels, _CANONICAL_NAME_LABELS, pod.workload)


def canonical_revision(pod: Pod) -> str:
    return _first_label(pod.labels, _CANONICAL_REVISION_LABELS, "latest")


# Peer.of's memo: (id(pod), identity, cluster) -> (pod, peer); the pod is kept so its id stays its own.
_PEERS: dict[tuple[int, Identity | None, str], tuple[Pod | None, Peer]] = {}
_PEERS_MAX = 4096

_ids = itertools.count(1)


class RelayHandle(Protocol):
    """What a record needs of the relay carrying its connection (relay.Relay and relay.SpliceRelay)."""

    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    def abort(self, reason: BaseException | None = None) -> None: ...
    def close(self) -> None: ...


@dataclass(slots=True)
class ConnectionRecord:
    """One proxied connection from accept to close; filled in by inbound.py / outbound.py."""

    direction: Direction
    src_addr: str
    dst_addr: str
    src: Peer = field(default_factory=Peer)
    dst: Peer = field(default_factory=Peer)
    hbone_addr: str = ""
    original_addr: str = ""  # outbound: what the app dialled (a service VIP), when not dst_addr itself
    service: str | None = None  # "namespace/name" of the destination service
    mutual_tls: bool = False
    started: float = field(default_factory=time.monotonic)
    established: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    # While open: the relay carrying it (set once it runs), for live byte counts and closing. One
    # reference rather than a closure per operation: thousands of idle connections each keep a record.
    relay: RelayHandle | None = None
    # Inbound only: what authorization saw, so a policy change can re-check it.
    policy_view: Connection | None = None
    # Bytes already added to the counters while open (flush_bytes); finished() adds the rest.
    counted_in: int = 0
    counted_out: int = 0
    # The descriptor share it counts against (fdshare), given back by finished(): two references, not a
    # callback per connection (~300 bytes each).
    shares: DescriptorShares | None = None
    holder: Hashable = None

    def bytes_in(self) -> int:
        return self.relay.bytes_in if self.relay is not None else 0

    def bytes_out(self) -> int:
        return self.relay.bytes_out if self.relay is not None else 0

    def abort(self, reason: str) -> None:
        """Reset the connection now (e.g. a policy denies it); nothing before its relay runs."""
        if self.relay is not None:
            self.relay.abort(ConnectionAbortedError(reason))

    def close(self) -> None:
        """Graceful: FIN / END_STREAM after queued bytes; nothing before its relay runs."""
        if self.relay is not None:
            self.relay.close()

    def label_key(self, flags: Flags) -> tuple[object, ...]:
        """Everything `labels(flags)` depends on: connections with equal keys share metric children."""
        return (self.direction, self.src, self.dst, self.service, self.mutual_tls, flags)

    def labels(self, flags: Flags, cluster_domain: str) -> dict[str, str]:
        namespace, _, name = (self.service or "").partition("/")
        return {
            "reporter": self.direction.reporter,
            "source_workload": self.src.workload,
            "source_canonical_service": self.src.canonical_service,
            "source_canonical_revision": self.src.canonical_revision,
            "source_workload_namespace": self.src.namespace,
            "source_principal": self.src.principal,
            # ztunnel reports app and version as the canonical service and revision (proxy/metrics.rs).
            "source_app": self.src.canonical_service,
            "source_version": self.src.canonical_revision,
            "source_cluster": self.src.cluster,
            "destination_service": f"{name}.{namespace}.svc.{cluster_domain}" if self.service else UNKNOWN,
            "destination_service_namespace": namespace or UNKNOWN,
            "destination_service_name": name or UNKNOWN,
            "destination_workload": self.dst.workload,
            "destination_canonical_service": self.dst.canonical_service,
            "destination_canonical_revision": self.dst.canonical_revision,
            "destination_workload_namespace": self.dst.namespace,
            "destination_principal": self.dst.principal,
            "destination_app": self.dst.canonical_service,
            "destination_version": self.dst.canonical_revision,
            "destination_cluster": self.dst.cluster,
            "request_protocol": "tcp",
            "response_flags": flags.value,
            "connection_security_policy": "mutual_tls" if self.mutual_tls else UNKNOWN,
        }


class TunnelMetrics:
    """Istio's TCP counters plus the tunnel's own gauges, on an injected registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened.", ISTIO_LABELS, registry=registry
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed.", ISTIO_LABELS, registry=registry
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes",
            "Bytes sent back to the client (response direction).",
            ISTIO_LABELS,
            registry=registry,
        )
        self.received = Counter(
            "istio_tcp_received_bytes",
            "Bytes received from the client (request direction).",
            ISTIO_LABELS,
            registry=registry,
        )
        self.active = Gauge(
            "nodeagent_tunnel_connections_active",
            "Proxied connections open now, by direction.",
            ["direction"],
            registry=registry,
        )
        self.pending = Gauge(
            "nodeagent_tunnel_connections_pending",
            "Connections accepted but not yet established (planning, connecting, authorizing).",
            ["direction"],
            registry=registry,
        )
        self.hbone_connections = Gauge(
            "nodeagent_tunnel_hbone_connections",
            "HBONE (mTLS HTTP/2) connections open now, by role (client|server).",
            ["role"],
            registry=registry,
        )
        self.rejected_streams = Counter(
            "nodeagent_tunnel_hbone_rejected_streams",
            "CONNECT streams answered with an error status, by status.",
            ["status"],
            registry=registry,
        )
        self.refused_over_share = Counter(
            "nodeagent_tunnel_connections_over_share",
            "New connections reset because, while the tunnel's file descriptors ran short, their holder (the "
            "source pod outbound, the client inbound) already held more than its share; by direction.",
            ["direction"],
            registry=registry,
        )
        self.peer_failures = Counter(
            "nodeagent_tunnel_peer_verification_failures",
            "HBONE connections dropped because the peer's certificate or ALPN was not acceptable, by reason.",
            ["reason"],
            registry=registry,
        )
        self.pods = Gauge(
            "nodeagent_tunnel_pods",
            "Pods this tunnel serves now (listeners up; 0 while it drains). Below the agent's enrolled pods "
            "(nodeagent_agent_pods) for long: the tunnel refused some (its log says why: certificate, netns, "
            "listen errors) or is not connected to the agent.",
            registry=registry,
        )
        self.pods_started = Counter(
            "nodeagent_tunnel_pods_started",
            "Pods this tunnel started serving (listeners bound, after the agent's ZDS Add). Rising while the "
            "node's pods do not change: pods are re-added over and over; see the tunnel's and the agent's logs.",
            registry=registry,
        )
        self.pods_stopped = Counter(
            "nodeagent_tunnel_pods_stopped",
            "Pods this tunnel stopped serving (ZDS Del, left out of the agent's snapshot, a new netns, shutdown).",
            registry=registry,
        )
        for d in Direction:
            self.active.labels(d.value)
            self.pending.labels(d.value)


# Label children per distinct label set, at most this many (then the cache starts over): resolving 23
# labels through prometheus_client costs ~10 us per counter, four counters per connection.
_CHILDREN_MAX = 4096


class _Children:
    """The four Istio counters' children for one label set."""

    __slots__ = ("closed", "opened", "received", "sent")

    def __init__(self, metrics: TunnelMetrics, labels: dict[str, str]) -> None:
        self.opened = metrics.opened.labels(**labels)
        self.closed = metrics.closed.labels(**labels)
        self.received = metrics.received.labels(**labels)
        self.sent = metrics.sent.labels(**labels)


class ConnectionTable:
    """The open connections: gauges, metrics at open/close, the access log, and the admin dump."""

    def __init__(self, metrics: TunnelMetrics, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> None:
        self.metrics = metrics
        self.cluster_domain = cluster_domain
        self._open: dict[int, ConnectionRecord] = {}
        self.in_setup = 0  # connections accepted (pending) and not yet established nor finished
        # Children resolved once: per direction (gauges) and per label set (counters).
        self._pending = {d: metrics.pending.labels(d.value) for d in Direction}
        self._active = {d: metrics.active.labels(d.value) for d in Direction}
        self._children: dict[tuple[object, ...], _Children] = {}

    def _counters(self, record: ConnectionRecord, flags: Flags) -> _Children:
        key = record.label_key(flags)
        children = self._children.get(key)
        if children is None:
            if len(self._children) >= _CHILDREN_MAX:
                self._children.clear()
            children = self._children[key] = _Children(self.metrics, record.labels(flags, self.cluster_domain))
        return children

    def pending(self, record: ConnectionRecord) -> None:
        self.in_setup += 1
        self._pending[record.direction].inc()

    def established(self, record: ConnectionRecord) -> None:
        """The tunnel is up: count it as opened and keep it in the table until `finished`."""
        record.established = True
        self.in_setup -= 1
        self._pending[record.direction].dec()
        self._active[record.direction].inc()
        self._counters(record, Flags.NONE).opened.inc()
        self._open[record.id] = record

    def finished(
        self, record: ConnectionRecord, bytes_in: int, bytes_out: int, error: str = "", flags: Flags = Flags.NONE
    ) -> None:
        """The connection is over (or never got up): metrics, gauges and its one access-log line; its
        descriptor share is given back."""
        if record.shares is not None:
            record.shares.release(record.holder)
            record.shares = None
        if record.established:
            self._open.pop(record.id, None)
            self._active[record.direction].dec()
        else:
            self.in_setup -= 1
            self._pending[record.direction].dec()
        children = self._counters(record, flags)
        if not record.established:
            children.opened.inc()
        children.closed.inc()
        if bytes_in > record.counted_in:
            children.received.inc(bytes_in - record.counted_in)
        if bytes_out > record.counted_out:
            children.sent.inc(bytes_out - record.counted_out)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("%s", format_access_log(record, bytes_in, bytes_out, error))

    def flush_bytes(self) -> None:
        """Add what the open connections moved since the last flush to the byte counters (they count under
        the labels of an established connection, response_flags "-", as finished() does for them)."""
        for record in self._open.values():
            moved_in, moved_out = record.bytes_in(), record.bytes_out()
            if moved_in == record.counted_in and moved_out == record.counted_out:
                continue
            children = self._counters(record, Flags.NONE)
            if moved_in > record.counted_in:
                children.received.inc(moved_in - record.counted_in)
                record.counted_in = moved_in
            if moved_out > record.counted_out:
                children.sent.inc(moved_out - record.counted_out)
                record.counted_out = moved_out

    def __iter__(self) -> Iterator[ConnectionRecord]:
        return iter(list(self._open.values()))

    def __len__(self) -> int:
        return len(self._open)

    def inbound_views(self) -> Mapping[int, Connection]:
        return {r.id: r.policy_view for r in self._open.values() if r.policy_view is not None}

    def get(self, record_id: int) -> ConnectionRecord | None:
        return self._open.get(record_id)

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """ztunnel-style: inbound and outbound lists of src / originalDst / actualDst."""
        out: dict[str, list[dict[str, Any]]] = {"inbound": [], "outbound": []}
        for r in self._open.values():
            entry = {
                "src": r.src_addr,
                "originalDst": r.original_addr or r.dst_addr,
                "actualDst": r.hbone_addr or r.dst_addr,
                "protocol": "HBONE" if r.mutual_tls else "TCP",
                "srcWorkload": f"{r.src.pod}.{r.src.namespace}",
                "dstWorkload": f"{r.dst.pod}.{r.dst.namespace}",
                "srcIdentity": r.src.principal,
                "dstIdentity": r.dst.principal,
                "bytesIn": r.bytes_in(),
                "bytesOut": r.bytes_out(),
            }
            out["outbound" if r.direction is Direction.OUTBOUND else "inbound"].append(entry)
        return out


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_access_log(record: ConnectionRecord, bytes_in: int, bytes_out: int, error: str) -> str:
    """One access-log line. `bytes_in`: what the client sent (the request side), `bytes_out`: what came back."""
    duration_ms = (time.monotonic() - record.started) * 1000
    src, dst = record.src, record.dst
    sent, recv = (bytes_in, bytes_out) if record.direction is Direction.OUTBOUND else (bytes_out, bytes_in)
    addr, inner = (record.hbone_addr, record.dst_addr) if record.hbone_addr else (record.dst_addr, "-")
    line = (
        f"connection complete src.addr={record.src_addr} src.workload={_quote(src.pod)}"
        f" src.namespace={_quote(src.namespace)} src.identity={_quote(src.principal)}"
        f" dst.addr={addr} dst.hbone_addr={inner}"
        f" dst.workload={_quote(dst.pod)} dst.identity={_quote(dst.principal)}"
        f' direction="{record.direction.reporter_side}" bytes_sent={sent} bytes_recv={recv}'
        f' duration="{duration_ms:.0f}ms"'
    )
    return f"{line} error={_quote(error)}" if error else line
