"""The ZDS transport: AF_UNIX SOCK_SEQPACKET, one message per datagram, the netns fd in SCM_RIGHTS.

Why this module exists: asyncio has no recvmsg/sendmsg coroutines and its streams would add framing, so
this wraps a non-blocking SEQPACKET socket with loop.add_reader/add_writer (the same on asyncio and on
uvloop) and owns every file descriptor that arrives: a datagram's fds are either handed to the caller
inside an AddWorkload or closed here, including when the datagram is truncated (MSG_TRUNC: over 1024
bytes) or its control data is (MSG_CTRUNC: more fds than fit), or when decoding fails.

What it deliberately does not do: no deadlines and no ordering policy (the server and the client know
which reply they wait for and how long), no reconnecting, no tasks of its own.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import TypeVar

from nodeagent.zds.codec import (
    MAX_MESSAGE_BYTES,
    Ack,
    AddWorkload,
    Request,
    ZdsClosed,
    ZdsError,
    ZdsProtocolError,
    decode_ack,
    decode_hello,
    decode_request,
    encode_ack,
    encode_hello,
    encode_request,
)

log = logging.getLogger(__name__)

DEFAULT_SOCKET_PATH = "/var/run/ztunnel/ztunnel.sock"

_INT_SIZE = array.array("i").itemsize
# Room for a few fds, so that "sent two fds" is reported as such; more than fit sets MSG_CTRUNC and the
# kernel closes the rest.
_ANCILLARY_BYTES = socket.CMSG_SPACE(4 * _INT_SIZE)

T = TypeVar("T")


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):  # already closed is fine: the goal is "not open"
            os.close(fd)
    fds.clear()


class ZdsChannel:
    """One ZDS connection. Typed send/recv of hellos, requests and acks; at most one reader and one writer
    at a time (the protocol is strictly request -> ack)."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self.peer = peer
        self._closed = False
        self._waiters: set[asyncio.Future[None]] = set()

    def close(self) -> None:
        """Close the socket; a recv or send waiting on it raises ZdsClosed."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ZdsClosed(f"connection to {self.peer} was closed locally"))
        self._sock.close()

    # -- typed messages ----------------------------------------------------------------------------------

    async def send_hello(self) -> None:
        await self._send(encode_hello(), None)

    async def send_request(self, request: Request) -> None:
        """Send one request; an AddWorkload's netns_fd is duplicated into the peer and stays the caller's."""
        fd = request.netns_fd if isinstance(request, AddWorkload) else None
        await self._send(encode_request(request), fd)

    async def send_ack(self, ack: Ack) -> None:
        await self._send(encode_ack(ack), None)

    async def recv_hello(self) -> int:
        return await self._recv(decode_hello, "ZdsHello")

    async def recv_request(self) -> Request:
        """The next request. An AddWorkload's netns_fd is now owned by the caller, who must close it."""
        return await self._recv(decode_request, "WorkloadRequest")

    async def recv_ack(self) -> Ack:
        return await self._recv(decode_ack, "WorkloadResponse")

    # -- datagrams ---------------------------------------------------------------------------------------

    async def _recv(self, decode: Callable[[bytes, list[int]], T], what: str) -> T:
        data, fds = await self._recv_datagram(what)
        try:
            return decode(data, fds)
        except ZdsProtocolError as exc:
            _close_all(fds)
            raise ZdsProtocolError(f"{self.peer} sent a bad {what}: {exc}; closing the connection") from None

    async def _recv_datagram(self, what: str) -> tuple[bytes, list[int]]:
        while True:
            self._check_open()
            try:
                data, ancdata, flags, _ = self._sock.recvmsg(
                    MAX_MESSAGE_BYTES, _ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                await self._wait(readable=True)
                continue
            except OSError as exc:
                raise ZdsClosed(f"reading from {self.peer} failed: {exc.strerror or exc}") from None
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % _INT_SIZE
                    fds.extend(array.array("i", payload[:usable]))
            if flags & socket.MSG_CTRUNC:
                _close_all(fds)
                raise ZdsProtocolError(
                    f"{self.peer} sent a {what} with more file descriptors than fit (control data truncated); "
                    "ZDS allows at most one, on AddWorkload; closing the connection"
                )
            if flags & socket.MSG_TRUNC:
                _close_all(fds)
                raise ZdsProtocolError(
                    f"{self.peer} sent a {what} datagram larger than {MAX_MESSAGE_BYTES} bytes; closing the connection"
                )
            if not data and not fds:
                raise ZdsClosed(f"{self.peer} closed the connection while this side waited for a {what}")
            return data, fds

    async def _send(self, data: bytes, fd: int | None) -> None:
        ancdata = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        while True:
            self._check_open()
            try:
                self._sock.sendmsg([data], ancdata)
                return
            except (BlockingIOError, InterruptedError):
                await self._wait(readable=False)
            except OSError as exc:
                raise ZdsClosed(f"sending to {self.peer} failed: {exc.strerror or exc}") from None

    def _check_open(self) -> None:
        if self._closed:
            raise ZdsClosed(f"connection to {self.peer} is closed")

    async def _wait(self, *, readable: bool) -> None:
        loop = self._loop
        waiter: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        add, remove = (loop.add_reader, loop.remove_reader) if readable else (loop.add_writer, loop.remove_writer)
        add(self._fd, wake)
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            if not self._closed:
                remove(self._fd)


def _seqpacket_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


async def connect(path: str) -> ZdsChannel:
    """Connect to a node agent's ZDS socket (the tunnel side)."""
    sock = _seqpacket_socket()
    try:
        await asyncio.get_running_loop().sock_connect(sock, path)
    except OSError as exc:
        sock.close()
        raise ZdsClosed(
            f"cannot connect to the node agent's ZDS socket {path}: {exc.strerror or exc}; "
            "is `nodeagent agent` running on this node, and is the path shared with the tunnel?"
        ) from None
    return ZdsChannel(sock, f"node agent at {path}")


def listen(path: str, backlog: int = 16) -> socket.socket:
    """Bind a SEQPACKET listener at `path` with mode 0600 (the agent side).

    Creates the parent directory and removes a socket left by an earlier agent; refuses to remove
    anything that is not a socket. A socket some agent still listens on is taken over too — that is a
    rolling update (the new pod starts beside the old one, and its tunnels must reach the new agent) —
    but said in a warning, since two agents sharing a path by mistake look the same.
    """
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ZdsError(f"{path} exists and is not a socket; move it away or choose another ZDS socket path")
        if _listened_on(path):
            log.warning(
                "taking over the ZDS socket %s from a running node agent: its tunnels reconnect to this one. "
                "Expected during a rolling update; otherwise two agents share this path — give one another "
                "--zds-socket (and its tunnel the same)",
                path,
            )
        os.unlink(path)
    sock = _seqpacket_socket()
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _listened_on(path: str) -> bool:
    """Whether a listener still owns the socket at `path` (a connect is not refused). The running agent
    sees the probe as a connection closed before its hello."""
    probe = _seqpacket_socket()
    try:
        probe.connect(path)
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)  # EAGAIN: a full backlog, still live
    finally:
        probe.close()
    return True


async def accept(listener: socket.socket, path: str, serial: int) -> ZdsChannel:
    """Accept one tunnel connection; the channel's peer names the path, a serial and the peer's pid."""
    conn, _ = await asyncio.get_running_loop().sock_accept(listener)
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        conn.close()
        raise
    pid, _uid, _gid = struct.unpack("3i", creds)
    return ZdsChannel(conn, f"tunnel #{serial} (pid {pid}) on {path}")
