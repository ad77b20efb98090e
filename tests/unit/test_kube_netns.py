"""agent/kube_netns.local_ipv4s: a pod's IPs from its /proc/<pid>/net/fib_trie (pure parsing)."""

from __future__ import annotations

import ipaddress

from nodeagent.agent.kube_netns import local_ipv4s

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.42.0.0/24 2 0 2
        |-- 10.42.0.0
           /24 link UNICAST
        |-- 10.42.0.17
           /32 host LOCAL
  +-- 127.0.0.0/8 2 0 2
     |-- 127.0.0.1
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.42.0.17
        /32 host LOCAL
"""


def test_local_addresses_without_loopback() -> None:
    assert set(local_ipv4s(FIB_TRIE)) == {ipaddress.IPv4Address("10.42.0.17")}


def test_garbage_yields_nothing() -> None:
    assert list(local_ipv4s("|-- not-an-ip\n   /32 host LOCAL\n")) == []
