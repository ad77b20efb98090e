"""The CA client's gRPC channels across trust-bundle changes: one channel per bundle, and a replaced one is
closed as soon as no call uses it (it used to stay open until the client closed: a few per rotation, for
the tunnel's whole life). gRPC itself is faked at the channel: what is tested is the client's bookkeeping."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc.aio
import pytest

from nodeagent.ca import client as ca_client
from nodeagent.ca.proto import ca_pb2
from nodeagent.model import Identity

WORKLOAD = Identity.parse("spiffe://cluster.local/ns/shop/sa/frontend")


class FakeChannel:
    def __init__(self, bundle: bytes, answer: asyncio.Event | None) -> None:
        self.bundle = bundle
        self.answer = answer  # when set, calls wait for it
        self.closed = False
        self.calls = 0
        self.cancel_calls_on_close: asyncio.Event | None = None  # as grpc does: set, close() ends the calls

    def unary_unary(self, method: str, **_: Any) -> Any:
        async def call(request: Any, **_: Any) -> Any:  # metadata=, timeout=
            assert not self.closed, "a call on a closed channel"
            self.calls += 1
            if self.answer is not None:
                await self.answer.wait()
            if self.closed and self.cancel_calls_on_close is not None:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), "Channel closed!"
                )
            assert not self.closed, "the channel was closed under a call in flight"
            return ca_pb2.IstioCertificateResponse(cert_chain=["leaf", "root"])

        return call

    async def close(self, grace: float | None = None) -> None:
        self.closed = True
        if self.cancel_calls_on_close is not None:
            self.cancel_calls_on_close.set()


class FakeGrpc:
    """Stands in for grpc's channel factory; `answer`, when set, holds every call of new channels."""

    def __init__(self) -> None:
        self.made: list[FakeChannel] = []
        self.answer: asyncio.Event | None = None

    def secure_channel(self, target: str, credentials: Any, options: Any = None) -> FakeChannel:
        self.made.append(FakeChannel(credentials, self.answer))
        return self.made[-1]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeGrpc:
    faked = FakeGrpc()
    monkeypatch.setattr(grpc, "ssl_channel_credentials", lambda root_certificates: root_certificates)
    monkeypatch.setattr(grpc.aio, "secure_channel", faked.secure_channel)
    return faked


async def test_each_bundle_change_replaces_the_channel_and_closes_the_old_one(fake: FakeGrpc) -> None:
    bundle = {"pem": "root-1"}
    client = ca_client.CAClient("ca:15012", token=lambda: "t", bundle_pem=lambda: bundle["pem"])
    for generation in range(1, 6):
        bundle["pem"] = f"root-{generation}"
        assert await client.fetch(WORKLOAD, b"csr") == ["leaf", "root"]
        assert await client.fetch(WORKLOAD, b"csr") == ["leaf", "root"]  # same bundle: same channel
    channels = fake.made
    assert [c.bundle for c in channels] == [f"root-{g}".encode() for g in range(1, 6)]
    assert [c.closed for c in channels] == [True, True, True, True, False]
    assert [c.calls for c in channels] == [2, 2, 2, 2, 2]
    await client.close()
    assert all(c.closed for c in channels)


async def test_a_replaced_channel_with_a_call_in_flight_is_closed_by_that_call(fake: FakeGrpc) -> None:
    bundle = {"pem": "root-1"}
    client = ca_client.CAClient("ca:15012", token=lambda: "t", bundle_pem=lambda: bundle["pem"])
    slow = asyncio.Event()
    fake.answer = slow
    first = asyncio.create_task(client.fetch(WORKLOAD, b"csr"))
    await asyncio.sleep(0)
    fake.answer = None
    bundle["pem"] = "root-2"
    assert await client.fetch(WORKLOAD, b"csr") == ["leaf", "root"]  # over the new channel, at once
    old, new = fake.made
    assert not old.closed and not new.closed
    slow.set()
    assert await first == ["leaf", "root"]  # the call in flight was not cut
    assert old.closed and not new.closed
    await client.close()


async def test_closing_the_client_under_a_call_in_flight_fails_that_call_with_the_cas_error(fake: FakeGrpc) -> None:
    """grpc cancels the calls of a channel being closed; the call must report that (CARequestError, with its
    code), not a KeyError from the client's bookkeeping, which close() had already cleared."""
    client = ca_client.CAClient("ca:15012", token=lambda: "t", bundle_pem=lambda: "root-1")
    slow = asyncio.Event()
    fake.answer = slow
    call = asyncio.create_task(client.fetch(WORKLOAD, b"csr"))
    await asyncio.sleep(0)
    [channel] = fake.made
    channel.cancel_calls_on_close = slow
    await client.close()
    with pytest.raises(ca_client.CARequestError) as failed:
        await call
    assert failed.value.code is grpc.StatusCode.CANCELLED
    assert channel.closed
