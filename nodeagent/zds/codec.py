"""ZDS messages as small dataclasses, and their exact protobuf encoding (pure: no sockets, no fds opened).

Why this module exists: the generated zds_pb2 classes are permissive (any bytes that happen to be valid
protobuf parse, unknown fields are kept, an empty oneof is legal). The protocol is not: an Add must name
a uid and a workload and carry exactly one fd, nothing else may carry one, a datagram holds at most
1024 bytes. This module is the one place where those rules are checked, so the server and the client
only ever see the dataclasses below, never raw protobuf objects.

What it deliberately does not do: no I/O. File descriptors appear only as integers that the transport
(wire.py) received or will send; the decoder checks how many there are and places them, and the
transport closes them when decoding fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from nodeagent.zds import zds_pb2

ZDS_VERSION = 1
# Both sides read with a buffer of this size; anything longer is truncated by the kernel.
MAX_MESSAGE_BYTES = 1024


class ZdsError(Exception):
    """A ZDS connection failed; the message names the peer and says what to check."""


class ZdsProtocolError(ZdsError):
    """The peer sent something the protocol does not allow; the connection must be closed."""


class ZdsClosed(ZdsError):
    """The connection is gone (peer closed it, reset, or it was closed locally)."""


class ZdsTimeout(ZdsError):
    """The peer did not answer within the deadline."""


@dataclass(frozen=True, slots=True)
class Workload:
    """What the agent tells the tunnel about a pod (WorkloadInfo plus the pod uid)."""

    uid: str
    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class AddWorkload:
    """Serve this pod. `netns_fd` travels in SCM_RIGHTS; whoever holds this value does not own it
    unless the API that produced it says so."""

    workload: Workload
    netns_fd: int


@dataclass(frozen=True, slots=True)
class KeepWorkload:
    uid: str


@dataclass(frozen=True, slots=True)
class DelWorkload:
    uid: str


@dataclass(frozen=True, slots=True)
class SnapshotSent:
    pass


Request = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent


@dataclass(frozen=True, slots=True)
class Ack:
    """The tunnel's answer to one request; an empty error means it was applied."""

    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def describe(request: Request) -> str:
    """A short human form for logs and errors: `Add 2f1c… (default/web)`."""
    match request:
        case AddWorkload(workload=w):
            return f"Add {w.uid} ({w.namespace}/{w.name})"
        case KeepWorkload(uid=uid):
            return f"Keep {uid}"
        case DelWorkload(uid=uid):
            return f"Del {uid}"
        case SnapshotSent():
            return "SnapshotSent"


def _checked(data: bytes, what: str) -> bytes:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"{what} encodes to {len(data)} bytes, over ZDS's {MAX_MESSAGE_BYTES}-byte datagram limit; "
            "a pod name, namespace or service account this long cannot be sent to a tunnel"
        )
    return data


def encode_hello() -> bytes:
    """The tunnel's first datagram: this side speaks ZDS_VERSION."""
    return zds_pb2.ZdsHello(version=zds_pb2.V1).SerializeToString()


def encode_request(request: Request) -> bytes:
    """The datagram bytes of `request` (an Add's fd is sent beside them, not in them)."""
    msg = zds_pb2.WorkloadRequest()
    match request:
        case AddWorkload(workload=w):
            msg.add.uid = w.uid
            msg.add.workload_info.name = w.name
            msg.add.workload_info.namespace = w.namespace
            msg.add.workload_info.service_account = w.service_account
        case KeepWorkload(uid=uid):
            msg.keep.uid = uid
        case DelWorkload(uid=uid):
            getattr(msg, "del").uid = uid  # `del` is a Python keyword
        case SnapshotSent():
            msg.snapshot_sent.SetInParent()
    return _checked(msg.SerializeToString(), describe(request))


def encode_ack(ack: Ack) -> bytes:
    msg = zds_pb2.WorkloadResponse()
    msg.ack.error = ack.error
    return _checked(msg.SerializeToString(), "Ack")


def _no_fds(fds: Sequence[int], what: str) -> None:
    if fds:
        raise ZdsProtocolError(f"{what} carried {len(fds)} file descriptor(s); only AddWorkload may carry one")


def decode_hello(data: bytes, fds: Sequence[int] = ()) -> int:
    """The version a tunnel announced (not checked here: the server decides what it accepts)."""
    _no_fds(fds, "ZdsHello")
    msg = zds_pb2.ZdsHello()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise ZdsProtocolError(f"undecodable ZdsHello ({len(data)} bytes): {exc}") from None
    return int(msg.version)


def decode_request(data: bytes, fds: Sequence[int] = ()) -> Request:
    """Parse one WorkloadRequest datagram and the fds that came with it; an Add gets fds[0]."""
    msg = zds_pb2.WorkloadRequest()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise ZdsProtocolError(f"undecodable WorkloadRequest ({len(data)} bytes): {exc}") from None
    kind = msg.WhichOneof("payload")
    if kind == "add":
        if len(fds) != 1:
            raise ZdsProtocolError(f"AddWorkload carried {len(fds)} file descriptors; it must carry exactly one")
        if not msg.add.uid:
            raise ZdsProtocolError("AddWorkload without a uid")
        if not msg.add.HasField("workload_info"):
            raise ZdsProtocolError(f"AddWorkload {msg.add.uid} without workload_info")
        info = msg.add.workload_info
        workload = Workload(msg.add.uid, info.name, info.namespace, info.service_account)
        return AddWorkload(workload, fds[0])
    _no_fds(fds, kind or "WorkloadRequest")
    if kind == "keep":
        if not msg.keep.uid:
            raise ZdsProtocolError("KeepWorkload without a uid")
        return KeepWorkload(msg.keep.uid)
    if kind == "del":
        uid = getattr(msg, "del").uid
        if not uid:
            raise ZdsProtocolError("DelWorkload without a uid")
        return DelWorkload(uid)
    if kind == "snapshot_sent":
        return SnapshotSent()
    raise ZdsProtocolError("WorkloadRequest with no payload this side understands (add, del, snapshot_sent, keep)")


def decode_ack(data: bytes, fds: Sequence[int] = ()) -> Ack:
    _no_fds(fds, "WorkloadResponse")
    msg = zds_pb2.WorkloadResponse()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise ZdsProtocolError(f"undecodable WorkloadResponse ({len(data)} bytes): {exc}") from None
    if msg.WhichOneof("payload") != "ack":
        raise ZdsProtocolError("WorkloadResponse without an ack")
    return Ack(msg.ack.error)
