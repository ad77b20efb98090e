"""Table for nodeagent.ztunnel.outbound.per_pod_limit: one pod's share of the tunnel's descriptors."""

from __future__ import annotations

import resource

import pytest

from nodeagent.ztunnel.outbound import per_pod_limit


@pytest.mark.parametrize(
    ("nofile", "limit"),
    [
        (1 << 20, 21845),  # containerd's usual 1 048 576: 1/8 of it at six descriptors per connection
        (100_000, 2083),
        (20000, 512),  # the lab's, and a tunnel left at the default soft limit: still a few hundred per pod
        (1024, 512),
        (resource.RLIM_INFINITY, 21845),
    ],
)
def test_per_pod_limit(nofile: int, limit: int) -> None:
    assert per_pod_limit(nofile) == limit
