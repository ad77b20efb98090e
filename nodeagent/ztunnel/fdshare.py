"""The tunnel's file descriptors, shared fairly between the pods (and peers) that hold connections open.

Why this module exists: one tunnel process carries every pod of the node, and they all draw on its one
RLIMIT_NOFILE. Each proxied connection holds two to six descriptors (the two sockets, and a pipe per
direction on the spliced paths) for as long as *both* of its ends keep it: an app that connects to a
server of its own which accepts and never answers, then closes its own socket, leaves the tunnel holding
the rest — for good. A few thousand of those and the tunnel is at EMFILE: every pod on the node loses new
connections, and keeps losing them after the app has gone. ztunnel has no bound (it raises its soft limit,
ztunnel#1585); a per-pod hard limit would break legitimate heavy clients (a gateway, a load tester, 10 000
idle websockets), which a sidecar per pod never limited either.

So the share only applies under pressure: while at least 3/4 of the descriptors are in use, a holder (a
pod's uid for :15001; for :15006 and :15008 alike the client's IP address, which on :15008 is the client
pod's IP, the HBONE connection being made from its netns) that already has 1/16 of the limit in open
connections gets its new ones refused; below that, or below the pressure, everything is admitted as
before. The holders that caused the pressure are the ones refused; the others keep working. A connection
counts from its admission until its ConnectionRecord is finished (the record carries the count).

How much is in use is known cheaply: the kernel gives a new socket the lowest free descriptor, so every
descriptor below an accepted socket's number is in use — a lower bound at no cost. Churn leaves holes
that hide usage from it, so while that bound or the last count says half or more are in use, the
descriptors are also counted (/proc/self/fd) at most once a second — and at most 1/COUNT_DUTY of the time:
a count blocks the event loop for about 1 µs per open descriptor (20 ms at the lab's 20 000; at
containerd's limit of 1 048 576, half in use, half a second), so the next one waits COUNT_DUTY times as
long as the last one took.

`admit()` is the pure decision (tested with a table); `DescriptorShares` keeps the per-holder counts and
the estimate, with the clock and the counter injected.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Hashable

PRESSURE = (3, 4)  # under pressure from 3/4 of RLIMIT_NOFILE in use
SHARE_DIVISOR = 16  # under pressure, a holder may have at most 1/16 of RLIMIT_NOFILE in open connections
MIN_SHARE = 64  # ... and never fewer than this (a tunnel at a tiny limit still serves every pod a little)
COUNT_FROM = (1, 2)  # count the descriptors while half or more may be in use
COUNT_INTERVAL = 1.0  # seconds between two counts, at least
COUNT_DUTY = 50  # ... and at least this many times as long as the last count took (<= 2% of the loop)


def share(nofile: int, min_share: int = MIN_SHARE) -> int:
    """How many open connections one holder may have while the descriptors are under pressure."""
    return max(min_share, nofile // SHARE_DIVISOR)


def pressured(in_use: int, nofile: int) -> bool:
    return in_use * PRESSURE[1] >= nofile * PRESSURE[0]


def admit(held: int, in_use: int, nofile: int, limit: int) -> bool:
    """Whether a holder with `held` open connections may open one more, `in_use` of the process's `nofile`
    descriptors being in use (at least), `limit` being a holder's share under pressure."""
    return held < limit or not pressured(in_use, nofile)


def count_open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def descriptor_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


class DescriptorShares:
    """Open connections per holder, admitted by `admit()`; `release()` when one ends. `nofile` (the limit,
    read when the tunnel starts) and `share` (a holder's share under pressure) are plain attributes."""

    def __init__(
        self,
        nofile: int | None = None,
        *,
        min_share: int = MIN_SHARE,
        clock: Callable[[], float] = time.monotonic,
        count: Callable[[], int] = count_open_descriptors,
    ) -> None:
        self.nofile = descriptor_limit() if nofile is None else nofile
        self.share = share(self.nofile, min_share)
        self._clock = clock
        self._count = count
        self._counted = 0  # descriptors in use at the last count
        self._counted_at = -COUNT_INTERVAL
        self._count_interval = COUNT_INTERVAL
        self._held: dict[Hashable, int] = {}

    def held(self, holder: Hashable) -> int:
        return self._held.get(holder, 0)

    def in_use(self, fd: int) -> int:
        """At least how many descriptors are in use, `fd` being the one the kernel just handed out."""
        estimate = max(fd + 1, self._counted)
        if estimate * COUNT_FROM[1] >= self.nofile * COUNT_FROM[0]:
            now = self._clock()
            if now - self._counted_at >= self._count_interval:
                self._counted, self._counted_at = self._count(), now
                self._count_interval = max(COUNT_INTERVAL, (self._clock() - now) * COUNT_DUTY)
                estimate = max(fd + 1, self._counted)
        return estimate

    def admit(self, holder: Hashable, fd: int) -> bool:
        """Count one more connection of `holder`, whose newest socket is descriptor `fd`, if it may open it."""
        held = self._held.get(holder, 0)
        if held >= self.share and not admit(held, self.in_use(fd), self.nofile, self.share):
            return False
        self._held[holder] = held + 1
        return True

    def release(self, holder: Hashable) -> None:
        left = self._held[holder] - 1
        if left:
            self._held[holder] = left
        else:
            del self._held[holder]
