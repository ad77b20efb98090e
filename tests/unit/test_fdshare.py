"""nodeagent.ztunnel.fdshare: a holder's share of the tunnel's descriptors applies only under pressure."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.ztunnel import fdshare
from nodeagent.ztunnel.fdshare import DescriptorShares
from nodeagent.ztunnel.metrics import ConnectionRecord, ConnectionTable, Direction, Flags, TunnelMetrics


@pytest.mark.parametrize(
    ("nofile", "limit"),
    [
        (1 << 20, 65536),  # containerd's usual 1 048 576: 1/16 of it
        (20000, 1250),  # the lab's
        (1024, 64),  # the default soft limit: never fewer than 64
    ],
)
def test_share(nofile: int, limit: int) -> None:
    assert fdshare.share(nofile) == limit


@pytest.mark.parametrize(
    ("held", "in_use", "admitted"),
    [
        (0, 19_999, True),  # below its share: always, even at the limit
        (1249, 19_999, True),
        (1250, 14_999, True),  # over its share, but 3/4 of the descriptors are not in use: no pressure
        (1250, 15_000, False),  # over its share under pressure: refused
        (9000, 15_000, False),
        (9000, 10_000, True),  # a heavy client (10 000 idle websockets) on a tunnel with room: admitted
    ],
)
def test_admit(held: int, in_use: int, admitted: bool) -> None:
    assert fdshare.admit(held, in_use, 20_000, fdshare.share(20_000)) is admitted


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_shares_count_per_holder_and_release() -> None:
    counts: list[int] = []
    shares = DescriptorShares(20_000, clock=Clock(), count=lambda: counts.append(1) or 0)
    for _ in range(3):
        assert shares.admit(("pod", "a"), fd=10)
    assert shares.held(("pod", "a")) == 3 and shares.held(("pod", "b")) == 0
    shares.release(("pod", "a"))
    assert shares.held(("pod", "a")) == 2
    shares.release(("pod", "a"))
    shares.release(("pod", "a"))
    assert shares.held(("pod", "a")) == 0
    assert not counts  # nobody over its share: the descriptors were never counted


def test_a_holder_over_its_share_is_refused_only_under_pressure() -> None:
    shares = DescriptorShares(100, min_share=2, clock=Clock(), count=lambda: 0)
    assert shares.share == 6
    for fd in range(6):
        assert shares.admit("hog", fd=10 + fd)
    assert shares.admit("hog", fd=40)  # 41 of 100 in use at least: room
    assert not shares.admit("hog", fd=75)  # the kernel's lowest free descriptor is 75: 76 in use
    assert shares.admit("other", fd=76)  # the others keep working
    assert shares.held("hog") == 7


def test_holes_hide_usage_from_the_descriptor_number_so_it_is_counted_at_most_once_a_second() -> None:
    clock = Clock()
    open_now = {"n": 90}
    counted: list[float] = []

    def count() -> int:
        counted.append(clock.now)
        return open_now["n"]

    shares = DescriptorShares(100, min_share=1, clock=clock, count=count)
    assert shares.share == 6
    for _ in range(6):
        assert shares.admit("hog", fd=5)
    assert shares.admit("hog", fd=5)  # a low descriptor number: below half, no count, admitted
    assert not counted
    assert not shares.admit("hog", fd=55)  # half or more may be in use: counted (90), refused
    assert counted == [100.0]
    open_now["n"] = 10  # the hog's connections ended elsewhere; the last count still says 90 ...
    assert not shares.admit("hog", fd=5)
    assert counted == [100.0]  # ... until a second has passed
    clock.now += 1.0
    assert shares.admit("hog", fd=5)
    assert counted == [100.0, 101.0]


def test_counting_takes_at_most_a_fiftieth_of_the_time() -> None:
    """A count blocks the loop ~1 µs per open descriptor: at a million descriptors, half in use, half a
    second. Once a second regardless, that was the loop stalled half of the time while under pressure."""
    clock = Clock()
    counted: list[float] = []

    def slow_count() -> int:
        counted.append(clock.now)
        clock.now += 0.5  # what listing 500 000 descriptors takes
        return 900

    shares = DescriptorShares(1000, min_share=1, clock=clock, count=slow_count)
    for _ in range(shares.share):
        assert shares.admit("hog", fd=5)
    assert not shares.admit("hog", fd=800)  # counted; fd 800: 801 of 1000 at least in use, pressure
    assert counted == [100.0]
    clock.now += 1.0
    assert not shares.admit("hog", fd=800)
    assert counted == [100.0]  # not again after a second: that count took half of one
    clock.now += 0.5 * fdshare.COUNT_DUTY
    assert not shares.admit("hog", fd=800)
    assert len(counted) == 2


def test_a_finished_connection_gives_its_share_back_once() -> None:
    """The record carries the count (two references rather than a done-callback per connection, ~300
    bytes each in both tunnels: the bench's idle memory per connection rose by ~1 KB with callbacks)."""
    shares = DescriptorShares(20_000, clock=Clock(), count=lambda: 0)
    table = ConnectionTable(TunnelMetrics(CollectorRegistry()))
    records = []
    for _ in range(2):
        assert shares.admit("pod-a", fd=10)
        record = ConnectionRecord(Direction.OUTBOUND, "10.0.0.1:40000", "10.0.1.9:80")
        record.shares, record.holder = shares, "pod-a"
        table.pending(record)
        records.append(record)
    table.established(records[0])
    table.finished(records[0], 1, 2)
    assert shares.held("pod-a") == 1
    table.finished(records[1], 0, 0, "refused", Flags.NO_ROUTE)  # never established: given back as well
    assert shares.held("pod-a") == 0
    table.finished(records[1], 0, 0, "again")  # a second finish gives nothing back twice
    assert shares.held("pod-a") == 0
