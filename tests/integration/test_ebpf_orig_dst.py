"""The tunnel's original-destination edge without NAT (eBPF capture): loopback sockets, no root needed.

With no iptables REDIRECT, SO_ORIGINAL_DST has nothing (ENOENT, or the socket's own address when
conntrack tracks the flow). NetnsSocketFactory then answers with the accepted socket's local address
(sk_lookup steering: that IS where the client was going), except on :15001, where only the pod's pinned
eBPF map can answer - and without one the connection is refused with a reason, never guessed.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

import pytest

from nodeagent.model import SocketAddress
from nodeagent.ztunnel.edges import NetnsSocketFactory


def _pair(port: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.77", port))  # an address of its own: no clash on :15001
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    return listener, client, accepted


def test_a_steered_connection_reports_its_local_address() -> None:
    listener, client, accepted = _pair(0)
    try:
        got = NetnsSocketFactory().original_dst(accepted)
        assert got == SocketAddress(ipaddress.IPv4Address("127.0.0.77"), listener.getsockname()[1])
    finally:
        for s in (listener, client, accepted):
            s.close()


def test_outbound_without_nat_or_map_is_refused_with_a_reason() -> None:
    listener, client, accepted = _pair(15001)  # on 127.0.0.77, an address nothing else uses
    try:
        with pytest.raises(OSError) as raised:
            NetnsSocketFactory().original_dst(accepted)
        assert raised.value.errno == errno.ENOENT
        assert "no original destination" in str(raised.value)
    finally:
        for s in (listener, client, accepted):
            s.close()
