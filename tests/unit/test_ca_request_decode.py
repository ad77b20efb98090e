"""The CA's own request deserializer: every body is either a request or an Undecodable saying why.

gRPC answers an exception from a deserializer with INTERNAL, so decode_request must never raise,
whatever the bytes (the server's limit is 256 KiB); tests/integration/test_ca_grpc.py checks the status
on the wire.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.ca.proto import ca_pb2
from nodeagent.ca.server import Undecodable, decode_request


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2), the only kind these bodies use."""
    length = len(payload)
    varint = bytearray()
    while True:
        varint.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    return bytes([number << 3 | 2]) + bytes(varint) + payload


@given(st.binary(max_size=512))
def test_any_bytes_decode_to_a_request_or_a_reason(data: bytes) -> None:
    decoded = decode_request(data)
    assert isinstance(decoded, ca_pb2.IstioCertificateRequest | Undecodable)
    if isinstance(decoded, Undecodable):
        assert decoded.problem.startswith("the request is not an IstioCertificateRequest: ")


def test_a_request_decodes_as_protobuf_does() -> None:
    request = ca_pb2.IstioCertificateRequest(csr="PEM", validity_duration=60)
    request.metadata.update({"ImpersonatedIdentity": "spiffe://cluster.local/ns/shop/sa/cart"})
    assert decode_request(request.SerializeToString()) == request


def test_a_list_value_deep_in_metadata_is_named_with_its_index() -> None:
    inner = _field(6, _field(1, _field(3, b"ok")) + _field(1, _field(3, b"\xff")))  # ListValue ["ok", <bad>]
    body = _field(4, _field(1, _field(1, b"k") + _field(2, inner)))
    decoded = decode_request(body)
    assert isinstance(decoded, Undecodable)
    assert "metadata (field 4)['k'][1] is not UTF-8 (at its byte 0)" in decoded.problem


@pytest.mark.parametrize("through", ["struct", "list"])
def test_metadata_nested_past_protobufs_limit_is_refused_without_recursing_into_it(through: str) -> None:
    """A 256 KiB body can nest Structs, or ListValues with no Struct between them, tens of thousands of
    levels deep, past Python's recursion limit; the walk stops where protobuf's parser does."""
    # Value{struct_value: Struct{fields: {"": value}}}, or Value{list_value: ListValue{values: [value]}}
    wrap = (
        (lambda v: _field(5, _field(1, _field(2, v)))) if through == "struct" else (lambda v: _field(6, _field(1, v)))
    )
    value = _field(3, b"\xff")
    for _ in range(5_000):
        value = wrap(value)
    decoded = decode_request(_field(4, _field(1, _field(2, value))))
    assert isinstance(decoded, Undecodable)
    assert "nests deeper than 100 levels" in decoded.problem
