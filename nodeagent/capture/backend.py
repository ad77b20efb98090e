"""The capture backend interface: what the agent asks of "capture", whatever implements it.

Why this module exists: the agent enrolls pods the same way whether their TCP is captured with iptables
(nodeagent.capture.iptables) or with eBPF programs (nodeagent.capture.ebpf). It needs four verbs, each
about one pod's network namespace (a path to a netns file) and each idempotent:

    install(pod, netns) -> drift repaired     read the kernel, repair what differs, touch nothing that agrees
    remove(pod, netns)  -> removed anything   delete every object the backend owns there
    inspect(netns)      -> CaptureState       every owned kernel object, listed, plus the drift
    verify(netns)       -> drift              the drift alone; empty means capture is complete

and two about what a backend may keep for a pod outside its netns, by pod uid (eBPF: the pinned programs,
maps and links), which must not outlive the pod when its netns is gone before the agent looks:

    forget(uid)         -> removed anything   delete that per-uid state (no netns needed)
    kept_uids()         -> uids               the pods with such state, whichever run of the agent left it

What it deliberately does not do: no implementation, no pod bookkeeping, no status - the agent decides
enabled / pending from the tunnel's acks, and a backend only reports the kernel's truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from nodeagent.model import Pod


class CaptureError(RuntimeError):
    """Reading or changing capture state failed; the message says where and what to check."""


@dataclass(frozen=True, slots=True)
class CaptureState:
    """One netns as the kernel has it: the backend's objects (one line each) and what is missing or extra."""

    backend: str
    objects: tuple[str, ...]
    drift: tuple[str, ...]

    @property
    def present(self) -> bool:
        return bool(self.objects)

    @property
    def complete(self) -> bool:
        return not self.drift


class CaptureBackend(Protocol):
    name: str

    async def install(self, pod: Pod, netns: str) -> tuple[str, ...]: ...

    async def remove(self, pod: Pod, netns: str) -> bool: ...

    async def inspect(self, netns: str) -> CaptureState: ...

    async def verify(self, netns: str) -> tuple[str, ...]: ...

    async def forget(self, uid: str) -> bool: ...

    def kept_uids(self) -> tuple[str, ...]: ...
