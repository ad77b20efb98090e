"""ZDS end to end on a real SEQPACKET socket: the agent's server, the tunnel's client, and raw peers.

No root needed: any open file stands in for a pod's netns fd. Independent oracles: fd identity is
checked with os.fstat (st_dev, st_ino) in the receiving handler; hostile and reference peers are
written with plain socket.sendmsg/recvmsg and hand-encoded protobuf bytes.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import inspect
import ipaddress
import logging
import os
import re
import socket
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest

from nodeagent.agent.zds_server import Delivery, ServerEvent, TunnelDropped, TunnelReady, ZdsServer
from nodeagent.model import Pod, pod_uid
from nodeagent.zds import wire
from nodeagent.zds.codec import AddWorkload, Request, Workload, ZdsError
from nodeagent.ztunnel.zds_client import Backoff, ZdsClient

FAST = Backoff(initial=0.01, maximum=0.05)
DEADLINE = 2.0  # the server's hello/ack deadline (5 s in production): generous, well-behaved peers meet it
SHORT_DEADLINE = 0.5  # for hostile peers that stay silent: short, so the tests stay fast
HELLO_V1 = b"\x08\x01"
ACK_OK = b"\x0a\x00"


def make_pod(name: str) -> Pod:
    return Pod(
        name=name,
        namespace="shop",
        uid=pod_uid("shop", name),
        node="node-1",
        service_account=f"{name}-sa",
        ip=ipaddress.IPv4Address("10.1.0.9"),
    )


def file_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (at most 3 s) for state owned by the code under test; polling keeps that code unchanged."""
    async with asyncio.timeout(3):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


class Recorder:
    """A tunnel-side WorkloadHandler that records every call and keeps a pod table like a tunnel would."""

    def __init__(self, fail_add: str = "", block_add: asyncio.Event | None = None) -> None:
        self.fail_add = fail_add
        self.block_add = block_add
        self.in_add = asyncio.Event()
        self.adds: list[tuple[Workload, int, tuple[int, int]]] = []
        self.keeps: list[str] = []
        self.dels: list[str] = []
        self.snapshots: list[frozenset[str]] = []
        self.pods: set[str] = set()

    async def on_add(self, workload: Workload, netns_fd: int) -> None:
        self.adds.append((workload, netns_fd, file_id(netns_fd)))
        self.in_add.set()
        if self.block_add is not None:
            await self.block_add.wait()
        if self.fail_add:
            raise RuntimeError(self.fail_add)
        self.pods.add(workload.uid)

    async def on_keep(self, uid: str) -> None:
        self.keeps.append(uid)

    async def on_del(self, uid: str) -> None:
        self.dels.append(uid)
        self.pods.discard(uid)

    async def on_snapshot_done(self, known_uids: frozenset[str]) -> None:
        self.snapshots.append(known_uids)
        self.pods &= known_uids


@pytest.fixture
def netns_fds() -> Iterator[list[int]]:
    """Two stand-ins for pod netns fds: this process's own netns, and a plain file."""
    fds = [os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC), os.open("/etc/hostname", os.O_RDONLY)]
    yield fds
    for fd in fds:
        os.close(fd)


@asynccontextmanager
async def tunnel(path: str, handler: Recorder) -> AsyncIterator[ZdsClient]:
    client = ZdsClient(handler, path, backoff=FAST)
    client.start()
    try:
        yield client
    finally:
        await client.close()


@asynccontextmanager
async def agent(
    path: str, snapshot: Callable[[], list[tuple[Pod, int | None]]], deadline: float = DEADLINE
) -> AsyncIterator[tuple[ZdsServer, list[ServerEvent]]]:
    events: list[ServerEvent] = []
    server = ZdsServer(snapshot, path, deadline=deadline, on_event=events.append)
    await server.start()
    try:
        yield server, events
    finally:
        await server.close()


# -- the protocol between our two sides ---------------------------------------------------------------------


async def test_handshake_sends_fds_keeps_and_snapshot(sock_path: str, netns_fds: list[int]) -> None:
    web, db, cache = make_pod("web"), make_pod("db"), make_pod("cache")
    snapshot = [(web, netns_fds[0]), (db, netns_fds[1]), (cache, None)]
    rec = Recorder()
    async with agent(sock_path, lambda: snapshot) as (server, events), tunnel(sock_path, rec) as client:
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        await asyncio.wait_for(client.wait_ready(), 3)
        assert client.synced
        assert [w for w, _, _ in rec.adds] == [
            Workload(web.uid, "web", "shop", "web-sa"),
            Workload(db.uid, "db", "shop", "db-sa"),
        ]
        for (_, received_fd, received_id), sent_fd in zip(rec.adds, netns_fds, strict=True):
            assert received_fd != sent_fd  # a new descriptor in the receiver...
            assert received_id == file_id(sent_fd)  # ...for the same file
        assert rec.keeps == [cache.uid]
        assert rec.snapshots == [frozenset({web.uid, db.uid, cache.uid})]
        await eventually(lambda: bool(events))
        assert events == [TunnelReady(events[0].peer, frozenset({web.uid, db.uid, cache.uid}), {})]
        assert server.acked_uids() == {web.uid, db.uid, cache.uid}
        assert len(server.tunnels) == 1
    assert not os.path.exists(sock_path)  # noqa: ASYNC240 - the server removed its socket


async def test_add_goes_to_newest_tunnel_and_del_to_all(sock_path: str, netns_fds: list[int]) -> None:
    old, new = Recorder(), Recorder()
    pod = make_pod("web")
    async with agent(sock_path, list) as (server, _), tunnel(sock_path, old) as old_client:
        await asyncio.wait_for(old_client.wait_ready(), 3)
        async with tunnel(sock_path, new) as new_client:  # a second tunnel starts: the hand-over case
            await asyncio.wait_for(new_client.wait_ready(), 3)
            await eventually(lambda: len(server.tunnels) == 2)

            assert await server.add(pod, netns_fds[0]) == Delivery(True)
            assert [w.uid for w, _, _ in new.adds] == [pod.uid]
            assert old.adds == []
            assert new.adds[0][2] == file_id(netns_fds[0])
            assert server.acked_uids() == {pod.uid}

            await server.delete(pod.uid)
            assert old.dels == new.dels == [pod.uid]
            assert server.acked_uids() == frozenset()


async def test_tunnel_error_reaches_the_agent(sock_path: str, netns_fds: list[int]) -> None:
    in_snapshot, later = make_pod("web"), make_pod("db")
    rec = Recorder(fail_add="no room for listeners in this netns")
    async with (
        agent(sock_path, lambda: [(in_snapshot, netns_fds[0])]) as (server, events),
        tunnel(sock_path, rec) as client,
    ):
        await asyncio.wait_for(client.wait_ready(), 3)
        await eventually(lambda: bool(events))
        ready = events[0]
        assert isinstance(ready, TunnelReady)
        assert ready.acked == frozenset()
        assert ready.rejected == {in_snapshot.uid: "RuntimeError: no room for listeners in this netns"}
        delivery = await server.add(later, netns_fds[1])
        assert delivery == Delivery(False, "RuntimeError: no room for listeners in this netns")
        assert server.acked_uids() == frozenset()


async def test_long_tunnel_errors_are_cut_to_fit_one_datagram(sock_path: str, netns_fds: list[int]) -> None:
    rec = Recorder(fail_add="é" * 5000)  # 10 000 bytes of UTF-8
    async with agent(sock_path, list) as (server, _), tunnel(sock_path, rec) as client:
        await asyncio.wait_for(client.wait_ready(), 3)
        delivery = await server.add(make_pod("web"), netns_fds[0])
        assert not delivery.ok
        assert delivery.error.startswith("RuntimeError: éé")
        assert delivery.error.endswith("…")
        assert len(delivery.error) == 250
        assert (await server.add(make_pod("db"), netns_fds[0])).error == delivery.error  # still connected
        assert len(server.tunnels) == 1


async def test_an_add_that_cannot_be_encoded_fails_alone(sock_path: str, netns_fds: list[int]) -> None:
    """encode_request refuses a pod too big for one datagram (ValueError, not a ZdsError): the add() fails
    with the reason instead of waiting forever, and the connection serves the next pods."""
    rec = Recorder()
    huge = dataclasses.replace(make_pod("web"), name="w" * 2000)
    async with agent(sock_path, list) as (server, events), tunnel(sock_path, rec) as client:
        await asyncio.wait_for(client.wait_ready(), 3)
        delivery = await asyncio.wait_for(server.add(huge, netns_fds[0]), 3)
        assert not delivery.ok and "datagram limit" in delivery.error
        assert await asyncio.wait_for(server.add(make_pod("db"), netns_fds[0]), 3) == Delivery(True)
        assert [w.name for w, _, _ in rec.adds] == ["db"] and len(server.tunnels) == 1
        assert not any(isinstance(e, TunnelDropped) for e in events)


async def test_a_failure_after_the_send_resolves_the_add_and_drops_the_connection(
    sock_path: str, netns_fds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception once the request reached the tunnel (here: a stand-in bug right after the send) leaves
    the exchange out of step: the add() gets an answer and the connection is dropped (the tunnel reconnects)."""
    real = wire.ZdsChannel.send_request

    async def send_then_fail(self: wire.ZdsChannel, request: Request) -> None:
        await real(self, request)
        if isinstance(request, AddWorkload):
            raise RuntimeError("a bug after the send")

    rec = Recorder()
    async with agent(sock_path, list) as (server, events), tunnel(sock_path, rec) as client:
        await asyncio.wait_for(client.wait_ready(), 3)
        monkeypatch.setattr(wire.ZdsChannel, "send_request", send_then_fail)
        delivery = await asyncio.wait_for(server.add(make_pod("web"), netns_fds[0]), 3)
        assert not delivery.ok and "a bug after the send" in delivery.error
        await eventually(lambda: any(isinstance(e, TunnelDropped) for e in events))


async def test_cancelled_add_is_never_sent(sock_path: str, netns_fds: list[int]) -> None:
    release = asyncio.Event()
    rec = Recorder(block_add=release)
    first, second = make_pod("first"), make_pod("second")
    async with agent(sock_path, list) as (server, _), tunnel(sock_path, rec) as client:
        await asyncio.wait_for(client.wait_ready(), 3)
        busy = asyncio.ensure_future(server.add(first, netns_fds[0]))
        await asyncio.wait_for(rec.in_add.wait(), 3)
        queued = asyncio.ensure_future(server.add(second, netns_fds[1]))
        await asyncio.sleep(0.01)
        queued.cancel()  # the agent gave up on it (the pod went away) before the tunnel's turn came
        release.set()
        assert await busy == Delivery(True)
        await server.delete(first.uid)  # a later request on the same connection: the queue has moved on
        assert [w.uid for w, _, _ in rec.adds] == [first.uid]
        assert queued.cancelled()


async def test_add_is_pending_without_tunnel_or_when_it_disconnects(sock_path: str, netns_fds: list[int]) -> None:
    pod = make_pod("web")
    release = asyncio.Event()
    rec = Recorder(block_add=release)
    async with agent(sock_path, list) as (server, events):
        delivery = await server.add(pod, netns_fds[0])
        assert not delivery.ok
        assert "no tunnel is connected" in delivery.error

        client = ZdsClient(rec, sock_path, backoff=FAST)
        client.start()
        await asyncio.wait_for(client.wait_ready(), 3)
        add = asyncio.ensure_future(server.add(pod, netns_fds[0]))
        await asyncio.wait_for(rec.in_add.wait(), 3)
        await client.close()  # the tunnel dies while applying the Add
        delivery = await asyncio.wait_for(add, 3)
        assert not delivery.ok
        assert "closed the connection" in delivery.error
        await eventually(lambda: any(isinstance(e, TunnelDropped) for e in events))
        assert server.tunnels == ()
        assert server.acked_uids() == frozenset()
        assert not (await server.add(pod, netns_fds[0])).ok


async def test_agent_restart_reconnects_and_new_snapshot_drops_unknown_pods(
    sock_path: str, netns_fds: list[int]
) -> None:
    kept, gone = make_pod("kept"), make_pod("gone")
    rec = Recorder()
    async with tunnel(sock_path, rec) as client:
        await asyncio.sleep(0.05)  # the tunnel starts first and retries until an agent listens
        assert not client.ready
        async with agent(sock_path, lambda: [(kept, netns_fds[0]), (gone, netns_fds[1])]):
            await asyncio.wait_for(client.wait_ready(), 3)
            assert rec.pods == {kept.uid, gone.uid}
        await eventually(lambda: not client.synced)
        assert client.ready  # still serving its pods while the agent is away
        assert rec.pods == {kept.uid, gone.uid}
        assert rec.dels == []
        await asyncio.sleep(0.1)
        async with agent(sock_path, lambda: [(kept, netns_fds[0])]) as (server, events):
            await eventually(lambda: bool(events))
            assert events == [TunnelReady(events[0].peer, frozenset({kept.uid}), {})]
            assert client.synced
            assert rec.snapshots[-1] == frozenset({kept.uid})
            assert rec.pods == {kept.uid}
            assert server.acked_uids() == {kept.uid}


async def test_stale_socket_is_replaced_but_other_files_are_not(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(sock_path)
    stale.close()  # an agent killed without cleanup leaves this behind
    async with ZdsServer(list, sock_path), tunnel(sock_path, Recorder()) as client:
        await asyncio.wait_for(client.wait_ready(), 3)
    os.close(os.open(sock_path, os.O_CREAT | os.O_WRONLY, 0o600))  # a regular file where the socket goes
    with pytest.raises(ZdsError, match="exists and is not a socket"):
        await ZdsServer(list, sock_path).start()


async def test_a_second_agent_takes_the_socket_over_and_says_so(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling update starts the new agent beside the old one on the same hostPath socket: it must take
    the socket over (its tunnels then reach it), and say so, since two agents sharing a path by mistake
    look the same."""
    caplog.set_level(logging.INFO, logger="nodeagent.agent.zds_server")
    async with ZdsServer(list, sock_path):
        old = os.stat(sock_path).st_ino
        async with ZdsServer(list, sock_path):
            assert os.stat(sock_path).st_ino != old
            assert any("taking over the ZDS socket" in r.getMessage() for r in caplog.records)
            async with tunnel(sock_path, Recorder()) as client:
                await asyncio.wait_for(client.wait_ready(), 3)
            # The old agent saw the new one's check as a connection closed before its hello: no tunnel, and
            # nothing to warn about (it used to say "dropped tunnel #1 ... closed the connection").
            async with asyncio.timeout(3):
                while not (said := [r for r in caplog.records if "ZdsHello" in r.getMessage()]):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert [(r.levelname, "so it was no tunnel" in r.getMessage()) for r in said] == [("INFO", True)], said
    caplog.clear()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(sock_path)
    stale.close()
    async with ZdsServer(list, sock_path):
        assert not any("taking over" in r.getMessage() for r in caplog.records)  # a dead socket: quietly


# -- hostile tunnels against the agent's server -------------------------------------------------------------


def wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def raw_recvmsg(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One datagram and its fds, read with plain recvmsg (the caller closes the fds)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
            continue
        fds = [fd for _, _, payload in anc for fd in array.array("i", payload[: len(payload) // 4 * 4])]
        return data, fds


async def read_until_eof(sock: socket.socket) -> list[bytes]:
    """Everything the other side sends until it closes (fds closed as they arrive)."""
    received = []
    async with asyncio.timeout(3):
        while True:
            data, fds = await raw_recvmsg(sock)
            for fd in fds:
                os.close(fd)
            if not data and not fds:
                return received
            received.append(data)


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])


async def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, path)
    return sock


async def hello_then(sock: socket.socket, reply: Callable[[socket.socket], None]) -> None:
    """Say hello, receive the snapshot's first Add (closing its fd), then answer it with `reply`."""
    sock.send(HELLO_V1)
    _, fds = await raw_recvmsg(sock)
    assert len(fds) == 1
    os.close(fds[0])
    reply(sock)


# Each case: what the raw tunnel does (may return an awaitable), and what the server must say about it.
HOSTILE_TUNNELS: dict[str, tuple[Callable[[socket.socket, list[int]], object], str]] = {
    "garbage hello": (lambda s, fds: s.send(b"\xff\xff\xff\xff"), "sent a bad ZdsHello: undecodable"),
    "hello with two fds": (lambda s, fds: send_fds(s, HELLO_V1, fds[:2]), "ZdsHello carried 2 file descriptor"),
    "hello with an fd": (lambda s, fds: send_fds(s, HELLO_V1, fds[:1]), "ZdsHello carried 1 file descriptor"),
    "hello with eight fds": (lambda s, fds: send_fds(s, HELLO_V1, fds * 4), "more file descriptors than fit"),
    "oversized hello": (lambda s, fds: s.send(HELLO_V1 + b"\x12\x80\x10" + b"x" * 2048), "larger than 1024 bytes"),
    "hello version 2": (lambda s, fds: s.send(b"\x08\x02"), "speaks ZDS version 2, this agent only version 1"),
    "hello version NOT_USED": (lambda s, fds: s.send(b"\x08\x00"), "speaks ZDS version 0"),
    "silence": (lambda s, fds: None, "sent no ZdsHello within 0.5 s"),
    "no ack": (lambda s, fds: hello_then(s, lambda s: None), r"did not ack Add \S+ \(shop/web\) within 0.5 s"),
    "garbage ack": (lambda s, fds: hello_then(s, lambda s: s.send(b"\x0a\xff")), "undecodable WorkloadResponse"),
    "ack with an fd": (
        lambda s, fds: hello_then(s, lambda s: send_fds(s, ACK_OK, fds[:1])),
        "WorkloadResponse carried 1 file descriptor",
    ),
    "two acks": (
        lambda s, fds: hello_then(s, lambda s: [s.send(ACK_OK), s.send(ACK_OK)]),
        "sent an Ack with no request outstanding",
    ),
    "empty response": (lambda s, fds: hello_then(s, lambda s: s.send(b"\x10\x01")), "WorkloadResponse without an ack"),
}


@pytest.mark.parametrize("case", list(HOSTILE_TUNNELS))
async def test_hostile_tunnel_is_dropped_and_server_stays_up(sock_path: str, netns_fds: list[int], case: str) -> None:
    behave, reason = HOSTILE_TUNNELS[case]
    async with agent(sock_path, lambda: [(make_pod("web"), netns_fds[0])], SHORT_DEADLINE) as (server, events):
        raw = await raw_connect(sock_path)
        try:
            result = behave(raw, netns_fds)
            if inspect.isawaitable(result):
                await result
            await read_until_eof(raw)  # the server closes the connection...
        finally:
            raw.close()
        await eventually(lambda: bool(events))
        assert isinstance(events[0], TunnelDropped)
        assert re.search(reason, events[0].reason), events[0].reason
        assert server.tunnels == ()
        rec = Recorder()
        async with tunnel(sock_path, rec) as client:  # ...and keeps serving well-behaved tunnels
            await asyncio.wait_for(client.wait_ready(), 3)
            assert len(rec.adds) == 1


# -- hostile and reference agents against the tunnel's client -----------------------------------------------


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (tag, length and payload all fit one byte here)."""
    assert len(payload) < 128
    return bytes([field << 3 | 2, len(payload)]) + payload


# WorkloadRequest.add=1 {uid=1, workload_info=2 {name=1, namespace=2, service_account=3}}, by field number
ADD_WEB = ld(1, ld(1, b"uid") + ld(2, ld(1, b"web") + ld(2, b"shop") + ld(3, b"web-sa-xy")))
KEEP_WITH_UID = ld(5, ld(1, b"uid"))  # WorkloadRequest.keep=5 {uid=1}
DEL_UID = ld(2, ld(2, b"uid"))  # WorkloadRequest.del=2 {uid=2}
SNAPSHOT_SENT = ld(3, b"")  # WorkloadRequest.snapshot_sent=3 {}


@asynccontextmanager
async def raw_agent(path: str) -> AsyncIterator[socket.socket]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.setblocking(False)
    listener.bind(path)
    listener.listen(4)
    try:
        yield listener
    finally:
        listener.close()


async def accept_hello(listener: socket.socket) -> socket.socket:
    conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(listener), 3)
    conn.setblocking(False)
    data, fds = await raw_recvmsg(conn)
    assert (data, fds) == (HELLO_V1, [])
    return conn


async def test_client_speaks_to_a_hand_written_agent(sock_path: str, netns_fds: list[int]) -> None:
    rec = Recorder()
    async with raw_agent(sock_path) as listener, tunnel(sock_path, rec) as client:
        conn = await accept_hello(listener)
        try:
            send_fds(conn, ADD_WEB, netns_fds[:1])
            assert await raw_recvmsg(conn) == (ACK_OK, [])
            conn.send(SNAPSHOT_SENT)
            assert await raw_recvmsg(conn) == (ACK_OK, [])
            conn.send(DEL_UID)
            assert await raw_recvmsg(conn) == (ACK_OK, [])
        finally:
            conn.close()
        assert client.ready
        assert [(w, fid) for w, _, fid in rec.adds] == [
            (Workload("uid", "web", "shop", "web-sa-xy"), file_id(netns_fds[0]))
        ]
        assert rec.snapshots == [frozenset({"uid"})]
        assert rec.dels == ["uid"]


HOSTILE_AGENTS: dict[str, Callable[[socket.socket, list[int]], object]] = {
    "garbage": lambda c, fds: c.send(b"\xff\xff\xff"),
    "add without fd": lambda c, fds: c.send(ADD_WEB),
    "add with two fds": lambda c, fds: send_fds(c, ADD_WEB, fds[:2]),
    "keep with an fd": lambda c, fds: send_fds(c, KEEP_WITH_UID, fds[:1]),
    "snapshot with eight fds": lambda c, fds: send_fds(c, SNAPSHOT_SENT, fds * 4),
    "oversized": lambda c, fds: c.send(b"\x2a\x80\x10" + b"x" * 2048),
    "no payload": lambda c, fds: c.send(b"\x20\x01"),
}


@pytest.mark.parametrize("case", list(HOSTILE_AGENTS))
async def test_client_drops_a_hostile_agent_and_reconnects(sock_path: str, netns_fds: list[int], case: str) -> None:
    rec = Recorder()
    async with raw_agent(sock_path) as listener, tunnel(sock_path, rec) as client:
        conn = await accept_hello(listener)
        try:
            HOSTILE_AGENTS[case](conn, netns_fds)
            assert await read_until_eof(conn) == []  # no ack: the client hung up
        finally:
            conn.close()
        again = await accept_hello(listener)  # and came back for a fresh snapshot
        again.close()
        assert (rec.adds, rec.keeps, rec.snapshots, client.ready) == ([], [], [], False)


async def test_client_refuses_a_second_snapshot_on_one_connection(sock_path: str) -> None:
    rec = Recorder()
    async with raw_agent(sock_path) as listener, tunnel(sock_path, rec):
        conn = await accept_hello(listener)
        try:
            conn.send(SNAPSHOT_SENT)
            assert await raw_recvmsg(conn) == (ACK_OK, [])
            conn.send(SNAPSHOT_SENT)  # would otherwise tell the tunnel to drop every pod
            assert await read_until_eof(conn) == []
        finally:
            conn.close()
        assert rec.snapshots == [frozenset()]
        (await accept_hello(listener)).close()
