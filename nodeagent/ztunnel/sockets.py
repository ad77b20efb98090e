"""The tunnel's socket factory: every socket it opens, made in the right netns with the right options.

Why this module exists: the tunnel serves every local pod from one process, so its listeners (15001,
15006, 15008) and its upstream connections must be created *inside each pod's network namespace*, carry
SO_MARK 0x539 so the pod's capture rules skip them, share ports with a successor tunnel (SO_REUSEPORT,
for hand-over) and, toward the app, connect from the client's real IP (IP_TRANSPARENT + IP_FREEBIND).
Sockets keep the namespace they were created in, so each one is made on a short-lived worker thread
that entered the netns (nodeagent.netns.in_netns); the event loop's thread never moves. The functions
here are the injected edge: tests and the lab pass a different factory or `netns=None`.

`original_dst()` reads where a redirected connection was going (SO_ORIGINAL_DST after an iptables
REDIRECT), and `connect()` turns connect failures into errors that name the target and a likely cause.

What it deliberately does not do: no policy, no retries, no pooling, no TLS; no iptables or routing
setup (the capture backend owns the rules that make transparent sockets and REDIRECT work).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import select
import socket
import struct
from collections.abc import Callable

from nodeagent.model import IPAddress, SocketAddress
from nodeagent.netns import in_netns, netns_path

# Ports (REFERENCE.md, "Ports").
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008
DNS_PORT = 15053
ADMIN_PORT = 15000
METRICS_PORT = 15020
READINESS_PORT = 15021
CA_PORT = 15012
# Original destinations on these ports are refused (routing/inbound): they would loop into a tunnel.
TUNNEL_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT})

# Marks (REFERENCE.md, "Marks, rules and routing").
TUNNEL_MARK = 0x539  # SO_MARK on every tunnel socket in a pod netns; capture rules skip it
BYPASS_MARK = 0x111  # connmark that routes the app's replies back to the tunnel's transparent socket
MARK_MASK = 0xFFF
BYPASS_ROUTE_TABLE = 100

# Linux socket options (linux/in.h, linux/in6.h, netfilter_ipv4.h); not all are in Python's socket module.
SOL_IP = 0
SOL_IPV6 = 41
IP_FREEBIND = 15
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IPV6_FREEBIND = 78
SO_ORIGINAL_DST = 80  # SOL_IP; IP6T_SO_ORIGINAL_DST is the same number at SOL_IPV6
SO_MARK = 36
IP_BIND_ADDRESS_NO_PORT = 24  # SOL_IP, for IPv4 and IPv6 sockets alike

DEFAULT_BACKLOG = 1024
CONNECT_TIMEOUT = 10.0  # REFERENCE.md, "Pooling": connect timeout 10 s

NetnsRef = str | int | None  # a netns name, a path, an open netns fd, or None for the caller's netns


class ConnectError(OSError):
    """An upstream connect failed; the message names the target and the likely cause."""

    def __str__(self) -> str:
        return str(self.strerror)


def _family(ip: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _set_common(sock: socket.socket, family: socket.AddressFamily, mark: int | None, transparent: bool) -> None:
    if mark is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except PermissionError:
            raise PermissionError(
                errno.EPERM, f"setting SO_MARK {mark:#x} needs CAP_NET_ADMIN; run the tunnel with NET_ADMIN"
            ) from None
    if transparent:
        level, opt, freebind = (
            (SOL_IPV6, IPV6_TRANSPARENT, IPV6_FREEBIND)
            if family == socket.AF_INET6
            else (SOL_IP, IP_TRANSPARENT, IP_FREEBIND)
        )
        try:
            sock.setsockopt(level, opt, 1)
        except PermissionError:
            raise PermissionError(
                errno.EPERM, "IP_TRANSPARENT needs CAP_NET_ADMIN; run the tunnel with NET_ADMIN"
            ) from None
        sock.setsockopt(level, freebind, 1)


def listener_in_netns(
    netns: NetnsRef,
    addr: IPAddress,
    port: int,
    *,
    transparent: bool = False,
    reuseport: bool = True,
    mark: int | None = TUNNEL_MARK,
    backlog: int = DEFAULT_BACKLOG,
) -> socket.socket:
    """A listening, non-blocking TCP socket bound to addr:port inside `netns`, for create_server(sock=...).

    Blocks for as long as it takes a thread to enter the netns (well under a millisecond; no thread at all
    when the caller already is in `netns`); call it from an executor if that matters. `mark=None` leaves
    SO_MARK unset (it needs CAP_NET_ADMIN).
    """
    family = _family(addr)

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _set_common(sock, family, mark, transparent)
            try:
                sock.bind((str(addr), port))
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"cannot listen on {SocketAddress(addr, port) if port else addr} in netns {netns!r}: "
                    f"{exc.strerror}"
                    + (
                        "; another process holds the port without SO_REUSEPORT?"
                        if exc.errno == errno.EADDRINUSE
                        else ""
                    ),
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    return make() if netns is None or _already_in(netns) else in_netns(netns, make)


def _already_in(netns: str | int) -> bool:
    """Whether the calling thread already is in `netns` (then a socket is made right here, with no thread:
    the tunnel makes a pod's three listeners on one thread that entered the pod's netns once)."""
    try:
        here = os.stat("/proc/thread-self/ns/net")
        there = os.fstat(netns) if isinstance(netns, int) else os.stat(netns_path(netns))
    except OSError:
        return False  # let in_netns() report a missing netns
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def connect_socket(
    family: socket.AddressFamily,
    *,
    netns: NetnsRef = None,
    mark: int | None = TUNNEL_MARK,
    source: SocketAddress | IPAddress | None = None,
    transparent: bool = False,
    make_socket: Callable[[socket.AddressFamily], socket.socket] | None = None,
    port_at_connect: bool = True,
) -> socket.socket:
    """An unconnected, non-blocking TCP socket for an upstream connection, made in `netns`.

    With `source` the socket is bound to it first (an IP alone: any port; an ip:port to keep the client's
    port too). A source IP that is not local (the client's IP, when connecting to the app on its behalf)
    needs `transparent=True` (IP_TRANSPARENT + IP_FREEBIND) and, for the replies to come back, the
    capture backend's bypass-mark routing.

    `make_socket(family)`, when given, supplies the bare socket instead (already in the right netns — a
    socket keeps the namespace it was created in, and options and bind() act on that namespace whatever
    thread sets them), and everything else happens on the calling thread: no thread per connection.
    An IP-only source is bound with IP_BIND_ADDRESS_NO_PORT, so the port is chosen at connect() per
    destination rather than reserved per source IP at bind() (which runs out under high connection rates);
    `port_at_connect=False` picks it at bind() instead, for callers that need getsockname()'s port before
    connecting.
    """
    bind_to = None
    if source is not None:
        ip, port = (source.ip, source.port) if isinstance(source, SocketAddress) else (source, 0)
        if _family(ip) != family:
            raise ValueError(f"source {source} is not of address family {family.name}")
        bind_to = (str(ip), port)

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM) if make_socket is None else make_socket(family)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _set_common(sock, family, mark, transparent)
            if bind_to is not None:
                if bind_to[1]:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                elif port_at_connect:
                    sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                try:
                    sock.bind(bind_to)
                except OSError as exc:
                    hint = (
                        "; a non-local source needs transparent=True and CAP_NET_ADMIN"
                        if exc.errno == errno.EADDRNOTAVAIL
                        else ""
                    )
                    raise OSError(exc.errno, f"cannot bind source {source}: {exc.strerror}{hint}") from None
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    return make() if netns is None or make_socket is not None else in_netns(netns, make)


def _connect_hint(target: SocketAddress, err: int | None) -> str:
    if err is None:  # timeout
        if target.port == HBONE_PORT:
            return "is a NetworkPolicy or firewall blocking the HBONE port?"
        return "is the destination down, or a firewall dropping packets?"
    if err == errno.ECONNREFUSED:
        if target.port == HBONE_PORT:
            return "is the destination node's tunnel running and the pod enrolled?"
        return "nothing is listening there"
    if err in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "no route to the destination from this netns"
    if err == errno.EADDRNOTAVAIL:
        return "the source address is not usable here (transparent source without IP_TRANSPARENT?)"
    if err == errno.EADDRINUSE:
        return "the source ip:port is already connected to this destination"
    return ""


def _wake(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if not fut.done():
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def _writable_now(sock: socket.socket) -> bool:
    """Already connected (or failed)? Over loopback and veth the handshake usually completes inside
    connect() itself: one zero-timeout poll then saves a writer registration, a timer and a loop turn."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    return bool(poller.poll(0))


async def _writable(sock: socket.socket, timeout: float) -> None:  # noqa: ASYNC109 (a timer, not a Timeout per connect)
    """Wait until a connecting socket is writable (connected or failed); TimeoutError after `timeout`."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _wake, fut, None)
    timer = loop.call_later(timeout, _wake, fut, TimeoutError())
    try:
        await fut
    finally:
        timer.cancel()
        loop.remove_writer(fd)


async def connect(
    sock: socket.socket, target: SocketAddress, *, connect_timeout: float = CONNECT_TIMEOUT
) -> socket.socket:
    """Connect a socket from `connect_socket()` to `target`; on failure close it and raise ConnectError.

    Loop prevention (refusing original destinations on the tunnel ports) is the caller's: the tunnel
    itself legitimately connects to peers' :15008.
    """
    try:
        # connect() ourselves rather than loop.sock_connect(): no address resolution pass and no Timeout
        # context per connection, just a writer callback and one timer while the handshake is in flight.
        err = sock.connect_ex((str(target.ip), target.port))
        if err == errno.EINPROGRESS and not _writable_now(sock):
            await _writable(sock, connect_timeout)
        if err == errno.EINPROGRESS:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except TimeoutError:
        sock.close()
        raise ConnectError(
            errno.ETIMEDOUT,
            f"timed out connecting to {target} after {connect_timeout:g} s — {_connect_hint(target, None)}",
        ) from None
    except OSError as exc:
        sock.close()
        hint = _connect_hint(target, exc.errno)
        raise ConnectError(
            exc.errno, f"connecting to {target} failed: {exc.strerror or exc}" + (f" — {hint}" if hint else "")
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


async def open_connection(
    target: SocketAddress,
    *,
    netns: NetnsRef = None,
    mark: int | None = TUNNEL_MARK,
    source: SocketAddress | IPAddress | None = None,
    transparent: bool = False,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> socket.socket:
    """`connect_socket()` then `connect()`: a connected, non-blocking socket to `target`."""
    sock = connect_socket(_family(target.ip), netns=netns, mark=mark, source=source, transparent=transparent)
    return await connect(sock, target, connect_timeout=connect_timeout)


_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, address, zero padding
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # family, port, flowinfo, address, scope id


def original_dst(sock: socket.socket) -> SocketAddress:
    """Where a connection redirected by iptables (nat REDIRECT/DNAT) was originally going."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
            port, _, addr, _ = _SOCKADDR_IN6.unpack(raw)
            return SocketAddress(ipaddress.IPv6Address(addr), port)
        raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
        port, addr = _SOCKADDR_IN.unpack(raw)
        return SocketAddress(ipaddress.IPv4Address(addr), port)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise OSError(
                exc.errno,
                "connection has no original destination: it was not redirected by iptables "
                "(nat REDIRECT) — is capture installed in this pod, or does the eBPF backend supply it?",
            ) from None
        raise
