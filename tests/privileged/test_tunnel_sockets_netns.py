"""The tunnel's socket factory in real network namespaces, checked with `ss`, iptables and a separate server.

Each test makes a throwaway netns (`ip netns add`) and deletes it in a finalizer. The oracles never ask
nodeagent: `ss` run inside or outside the netns shows where a socket lives and its fwmark, and the
spoofed-source check reads the peer address from a server process started with `ip netns exec`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from nodeagent.model import SocketAddress
from nodeagent.ztunnel import sockets

pytestmark = pytest.mark.privileged


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"na-sk-{uuid.uuid4().hex[:8]}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def add_address(netns: str, cidr: str) -> None:
    """Give the netns an interface with `cidr` (a veth pair with both ends inside; no dummy driver here)."""
    run("ip", "-n", netns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    run("ip", "-n", netns, "addr", "add", cidr, "dev", "va")
    run("ip", "-n", netns, "link", "set", "va", "up")
    run("ip", "-n", netns, "link", "set", "vb", "up")


def ss_listeners(netns: str | None) -> list[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return run(*prefix, "ss", "-H", "-tlne").splitlines()


def inode(sock: socket.socket) -> str:
    return f"ino:{os.fstat(sock.fileno()).st_ino}"


def test_listener_lives_in_the_netns_with_the_tunnel_mark(netns: str) -> None:
    sock = sockets.listener_in_netns(netns, ipaddress.IPv4Address("127.0.0.1"), sockets.OUTBOUND_PORT)
    try:
        assert not sock.getblocking()
        inside = [line for line in ss_listeners(netns) if inode(sock) in line.split()]
        assert len(inside) == 1, ss_listeners(netns)
        assert "127.0.0.1:15001" in inside[0]
        assert "fwmark:0x539" in inside[0].split()
        assert not [line for line in ss_listeners(None) if inode(sock) in line.split()], "visible in the root netns"
    finally:
        sock.close()


def test_reuseport_lets_two_listeners_share_the_port(netns: str) -> None:
    addr = ipaddress.IPv4Address("127.0.0.1")
    first = sockets.listener_in_netns(netns, addr, sockets.HBONE_PORT)
    second = sockets.listener_in_netns(netns, addr, sockets.HBONE_PORT)
    try:
        lines = [line for line in ss_listeners(netns) if "127.0.0.1:15008" in line]
        assert len(lines) == 2, lines
        assert {inode(first), inode(second)} <= {w for line in lines for w in line.split()}
        with pytest.raises(OSError, match="another process holds the port without SO_REUSEPORT"):
            sockets.listener_in_netns(netns, addr, sockets.HBONE_PORT, reuseport=False)
    finally:
        first.close()
        second.close()


async def test_original_dst_after_iptables_redirect(netns: str) -> None:
    add_address(netns, "10.99.0.2/24")
    run(
        "ip", "netns", "exec", netns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.99.0.1",
        "--dport", "8080", "-j", "REDIRECT", "--to-ports", str(sockets.OUTBOUND_PORT),
    )  # fmt: skip
    listener = sockets.listener_in_netns(netns, ipaddress.IPv4Address("0.0.0.0"), sockets.OUTBOUND_PORT)
    loop = asyncio.get_running_loop()
    try:
        client = await sockets.open_connection(SocketAddress.parse("10.99.0.1:8080"), netns=netns, mark=None)
        accepted, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
        assert sockets.original_dst(accepted) == SocketAddress.parse("10.99.0.1:8080")
        assert accepted.getsockname() == ("127.0.0.1", sockets.OUTBOUND_PORT)  # the redirect really happened
        accepted.close()
        client.close()
    finally:
        listener.close()


SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.88.0.1", 8080)); s.listen(); print("ready", flush=True)
c, peer = s.accept(); print(peer[0], flush=True); c.sendall(b"hi"); c.close()
"""


async def test_transparent_connect_from_a_spoofed_source(netns: str) -> None:
    add_address(netns, "10.88.0.1/24")
    # Replies to the spoofed client range are delivered locally (to the transparent socket), as the
    # capture backend's bypass-mark rule does for real pods.
    run("ip", "-n", netns, "rule", "add", "to", "10.77.0.0/24", "lookup", str(sockets.BYPASS_ROUTE_TABLE))
    run("ip", "-n", netns, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(sockets.BYPASS_ROUTE_TABLE))
    server = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns, sys.executable, "-c", SERVER, stdout=asyncio.subprocess.PIPE
    )  # fmt: skip
    assert server.stdout is not None
    try:
        assert (await asyncio.wait_for(server.stdout.readline(), 10)).strip() == b"ready"
        spoofed = ipaddress.IPv4Address("10.77.0.5")
        target = SocketAddress.parse("10.88.0.1:8080")
        with pytest.raises(OSError, match="needs transparent=True"):
            await sockets.open_connection(target, netns=netns, source=spoofed)
        sock = await sockets.open_connection(target, netns=netns, source=spoofed, transparent=True)
        try:
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.sock_recv(sock, 10), 5) == b"hi"
            peer = (await asyncio.wait_for(server.stdout.readline(), 5)).strip()
            assert peer == b"10.77.0.5", "the server must see the client's IP"
            established = [
                line for line in run("ip", "netns", "exec", netns, "ss", "-H", "-tne").splitlines()
                if line.split()[3].startswith("10.77.0.5:")
            ]  # fmt: skip
            assert established and "fwmark:0x539" in established[0].split(), established
        finally:
            sock.close()
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()
