"""Capture in one mode, remove in both: what a run of the agent in the other capture mode left goes too.

Why this module exists: the capture mode can change between runs of the agent (`--capture auto` choosing
differently after a kernel-header or capability change, an operator switching). The backend of one mode
knows only its own objects, so a pod captured by the previous mode would keep them: NODEAGENT_* chains
that redirect its TCP to 15001/15006, or pinned eBPF programs on its cgroup and netns. Once the pod is
unenrolled no tunnel serves it, and with those objects left all its TCP is refused. `BothModes` is the
agent's backend: `current` captures; removal (unenroll, the start-up sweep of strays, the per-uid state
of deleted pods) removes the other mode's objects as well, and says so when it finds any - as does the
first install of each pod in a run, so a mode switch shows in the log while the pods are still enrolled.

The other mode's eBPF objects are looked at only for pods whose uid has a pin directory (a mode that
never ran here has nothing, and its removal may need mounts an iptables-mode agent lacks); the other
mode's iptables rules are read in the pod's netns (one save per family, only on removal and on a pod's
first install in a run, beside the install so it costs no latency).

A switch with pods enrolled leaves them with both captures, complete, until they are unenrolled, and the
mesh stays whole that way, but for the gap below (tests/privileged/test_capture_mode_switch.py: both
directions; the DaemonSet's surge update, a stop-then-start of its pod, an agent-only restart; pod -> pod
with the client's IP, only HBONE on the fabric, non-mesh plaintext captured on 15006, `inspect redirects
--verify` clean, no packet of the app's port on the fabric during the switch). Both
captures agree on where a connection goes, and the first to see it wins: connect4 rewrites the app's
connect() to podIP:15001 before any iptables rule sees a packet (after eBPF -> iptables the old programs
capture all outbound; nat OUTPUT lets podIP:15001 on lo through), nat PREROUTING REDIRECTs inbound
plaintext to 15006 before sk_lookup, which steers it to that same listener; while the pod has pins the
tunnel connects to the app with the 0x111 mark, which tcp_fwmark_accept and the shared policy routing
route back to it. The costs: the agent verifies and repairs only the current mode's objects; the old
mode's stay unrepaired until unenroll (`inspect redirects` names them beside the pod's row).

What it deliberately does not do: it does not remove the other mode's objects from a pod that stays
enrolled (each backend's remove() also deletes the policy routing both modes use, and the pod's traffic
is flowing; a pod found so is logged, and cleaned when it is unenrolled), and it installs only the
current mode: a pod holds both only when an earlier run captured it in the other.

After iptables -> eBPF under a tunnel that kept its listeners (an agent-only restart, or a surge tunnel
that bound them on the old agent's snapshot) the new pins' map_listener is empty, and sk_lookup refuses
inbound plaintext (fail closed) until the tunnel puts its :15006 listener there: at once when the new
agent's snapshot names a pod it keeps, and within a second after a draining tunnel's listener empties the
slot (Tunnel._reclaim_listeners, outside this module).
"""

from __future__ import annotations

import asyncio
import logging

from nodeagent.capture.backend import CaptureBackend, CaptureError, CaptureState
from nodeagent.capture.ebpf import EbpfBackend
from nodeagent.capture.iptables import IptablesBackend
from nodeagent.model import Pod

log = logging.getLogger(__name__)


class BothModes:
    """A CaptureBackend: `current` captures; removal also removes what `other`, the other mode, left."""

    def __init__(self, current: CaptureBackend, other: IptablesBackend | EbpfBackend) -> None:
        if current.name == other.name:
            raise ValueError(f"both backends are {current.name}: `other` must be the other capture mode")
        self.current = current
        self.other = other
        self.name = current.name
        self._looked: set[str] = set()  # pods whose other-mode objects were looked for in this run

    async def install(self, pod: Pod, netns: str) -> tuple[str, ...]:
        if pod.uid in self._looked:
            return await self.current.install(pod, netns)
        repaired, found = await asyncio.gather(
            self.current.install(pod, netns), self._other_objects(pod, netns), return_exceptions=True
        )
        if isinstance(repaired, BaseException):
            raise repaired
        self._looked.add(pod.uid)
        if isinstance(found, tuple) and found:
            log.warning(
                "%s holds capture of the %s mode (%s) although this agent captures with %s: the capture mode "
                "changed between runs; those objects are removed when the pod is unenrolled",
                pod.key,
                self.other.name,
                "; ".join(found[:3]) + (f"; ... {len(found) - 3} more" if len(found) > 3 else ""),
                self.name,
            )
        return repaired

    async def remove(self, pod: Pod, netns: str) -> bool:
        removed = await self.current.remove(pod, netns)
        if isinstance(self.other, EbpfBackend) and pod.uid not in self.other.kept_uids():
            return removed
        if await self.other.remove(pod, netns):
            self._say_removed(pod.key)
            return True
        return removed

    async def forget(self, uid: str) -> bool:
        removed = await self.current.forget(uid)
        if uid in self.other.kept_uids() and await self.other.forget(uid):
            self._say_removed(f"pod uid {uid}")
            return True
        return removed

    def kept_uids(self) -> tuple[str, ...]:
        return tuple(sorted({*self.current.kept_uids(), *self.other.kept_uids()}))

    async def inspect(self, netns: str) -> CaptureState:
        return await self.current.inspect(netns)

    async def verify(self, netns: str) -> tuple[str, ...]:
        return await self.current.verify(netns)

    def _say_removed(self, who: str) -> None:
        log.warning(
            "%s: removed capture of the %s mode, left by an earlier run of the agent (this one captures with %s)",
            who,
            self.other.name,
            self.name,
        )

    async def _other_objects(self, pod: Pod, netns: str) -> tuple[str, ...]:
        """The other mode's objects of `pod` (a look only: a failure to read is not the install's failure)."""
        if isinstance(self.other, EbpfBackend):
            return (f"eBPF pins under {self.other.pin_root}/{pod.uid}",) if pod.uid in self.other.kept_uids() else ()
        try:
            return await self.other.rules(netns)
        except CaptureError as exc:
            log.debug("%s: could not look for iptables-mode rules: %s", pod.key, exc)
            return ()


def log_leftover_mode(backend: BothModes) -> None:
    """At start-up: say so when per-uid state of the other mode exists on the node (its rules, which live in
    pods' netns, are reported pod by pod as they are found)."""
    uids = backend.other.kept_uids()
    if uids:
        log.warning(
            "this agent captures with %s, but %d pods have state of the %s mode (left by an earlier run): it is "
            "removed as those pods are unenrolled or deleted",
            backend.name,
            len(uids),
            backend.other.name,
        )
