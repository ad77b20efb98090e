"""The ZDS codec against bytes built by hand from Istio's field numbers: the wire must match upstream's.

The oracle is a ten-line protobuf encoder below (varint + length-delimited fields), independent of the
generated code: if a field number or a oneof member drifts from zds.proto upstream, these bytes differ.
"""

from __future__ import annotations

import pytest

from nodeagent.zds import zds_pb2
from nodeagent.zds.codec import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    Workload,
    ZdsProtocolError,
    decode_ack,
    decode_hello,
    decode_request,
    encode_ack,
    encode_hello,
    encode_request,
)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def vi(field: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    return varint(field << 3) + varint(value)


UID = "0c9e4f5a-3b7d-4d1e-9a51-7f2a33c1b001"
WORKLOAD = Workload(UID, "web-7d9f", "shop", "web-sa")
# WorkloadRequest.add=1 { AddWorkload.uid=1, workload_info=2 { name=1, namespace=2, service_account=3 } }
ADD_BYTES = ld(1, ld(1, UID.encode()) + ld(2, ld(1, b"web-7d9f") + ld(2, b"shop") + ld(3, b"web-sa")))
DEL_BYTES = ld(2, ld(2, UID.encode()))  # WorkloadRequest.del=2 { DelWorkload.uid=2 }
SNAPSHOT_BYTES = ld(3, b"")  # WorkloadRequest.snapshot_sent=3 {}
KEEP_BYTES = ld(5, ld(1, UID.encode()))  # WorkloadRequest.keep=5 { KeepWorkload.uid=1 }


@pytest.mark.parametrize(
    ("request_", "wire", "fds"),
    [
        (AddWorkload(WORKLOAD, 7), ADD_BYTES, [7]),
        (DelWorkload(UID), DEL_BYTES, []),
        (SnapshotSent(), SNAPSHOT_BYTES, []),
        (KeepWorkload(UID), KEEP_BYTES, []),
    ],
    ids=["add", "del", "snapshot_sent", "keep"],
)
def test_requests_match_hand_encoded_bytes(request_, wire, fds) -> None:
    assert encode_request(request_) == wire
    assert decode_request(wire, fds) == request_


def test_generated_class_decodes_hand_encoded_add_identically() -> None:
    msg = zds_pb2.WorkloadRequest()
    msg.ParseFromString(ADD_BYTES)
    assert msg.WhichOneof("payload") == "add"
    assert (msg.add.uid, msg.add.workload_info.name) == (UID, "web-7d9f")
    assert (msg.add.workload_info.namespace, msg.add.workload_info.service_account) == ("shop", "web-sa")
    assert msg.SerializeToString() == ADD_BYTES
    keep = zds_pb2.WorkloadRequest()
    keep.ParseFromString(KEEP_BYTES)
    assert (keep.WhichOneof("payload"), keep.keep.uid) == ("keep", UID)


def test_hello_and_acks_match_hand_encoded_bytes() -> None:
    assert encode_hello() == vi(1, 1) == b"\x08\x01"  # ZdsHello.version=1 (V1)
    assert decode_hello(vi(1, 1)) == 1
    assert decode_hello(vi(1, 2)) == 2  # unknown versions are reported, not hidden: the server decides
    assert encode_ack(Ack()) == ld(1, b"") == b"\x0a\x00"  # WorkloadResponse.ack=1 {}
    assert encode_ack(Ack("boom")) == ld(1, ld(1, b"boom"))  # Ack.error=1
    assert decode_ack(ld(1, ld(1, b"boom"))) == Ack("boom")
    assert decode_ack(b"\x0a\x00").ok


@pytest.mark.parametrize(
    ("wire", "fds", "message"),
    [
        (ADD_BYTES, [], "carried 0 file descriptors; it must carry exactly one"),
        (ADD_BYTES, [5, 6], "carried 2 file descriptors"),
        (KEEP_BYTES, [5], "keep carried 1 file descriptor"),
        (SNAPSHOT_BYTES, [5], "snapshot_sent carried 1"),
        (b"\xff\xff\xff", [], "undecodable WorkloadRequest"),
        (b"", [], "no payload"),
        (vi(4, 1), [], "no payload"),  # a field this side does not know, nothing it does
        (ld(1, ld(2, ld(1, b"web"))), [3], "without a uid"),
        (ld(1, ld(1, UID.encode())), [3], "without workload_info"),
        (ld(5, b""), [], "KeepWorkload without a uid"),
        (ld(2, b""), [], "DelWorkload without a uid"),
        (ld(1, ld(1, b"\xff\xfe")), [3], "undecodable"),  # proto3 strings must be UTF-8
    ],
)
def test_bad_requests_are_protocol_errors(wire: bytes, fds: list[int], message: str) -> None:
    with pytest.raises(ZdsProtocolError, match=message):
        decode_request(wire, fds)


def test_bad_hellos_and_acks_are_protocol_errors() -> None:
    with pytest.raises(ZdsProtocolError, match="ZdsHello carried 1 file descriptor"):
        decode_hello(vi(1, 1), [4])
    with pytest.raises(ZdsProtocolError, match="undecodable ZdsHello"):
        decode_hello(b"\x08")
    with pytest.raises(ZdsProtocolError, match="without an ack"):
        decode_ack(b"")
    with pytest.raises(ZdsProtocolError, match="WorkloadResponse carried 2"):
        decode_ack(b"\x0a\x00", [4, 5])


def test_oversized_messages_are_refused_before_sending() -> None:
    big = Workload(UID, "x" * 1000, "shop", "web-sa")
    with pytest.raises(ValueError, match="over ZDS's 1024-byte datagram limit"):
        encode_request(AddWorkload(big, 3))
    with pytest.raises(ValueError, match="1024"):
        encode_ack(Ack("e" * 2000))
