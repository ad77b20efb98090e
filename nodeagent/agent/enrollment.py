"""Which pods of this node the agent must capture, and what each pod's status is: pure decisions.

Why this module exists: "decide, then act". From an inventory and the node's name follows the set of
pods to enroll (model.enrolled: namespace label, pod opt-out, excluded namespaces, never hostNetwork);
from a pod's capture result and the tunnel's acks follows its status. The reconciler only carries these
decisions out, and they are tested with tables.

What it deliberately does not do: no I/O, no netns lookup (netns_resolver.py), no kernel state.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from nodeagent.model import DEFAULT_EXCLUDED_NAMESPACES, Inventory, Pod, enrolled


class Status(enum.Enum):
    """`ambient.istio.io/redirection` as the agent records it (REFERENCE.md, "Enrollment and status")."""

    ENABLED = "enabled"  # capture complete in the kernel and a tunnel acked the pod
    PENDING = "pending"  # captured (fail closed: no traffic passes) but no tunnel serves it yet
    FAILED = "failed"  # capture could not be installed (the detail says why); retried every verify


def desired_pods(
    inventory: Inventory, node: str, excluded: frozenset[str] = DEFAULT_EXCLUDED_NAMESPACES
) -> Mapping[str, Pod]:
    """uid -> pod, for every pod on `node` that must be captured."""
    return MappingProxyType(
        {pod.uid: pod for pod in inventory.pods_on(node) if enrolled(pod, inventory.namespace(pod.namespace), excluded)}
    )


def status_of(capture_error: str | None, acked: bool) -> Status:
    """A pod is enabled only when its capture is complete AND a tunnel acked it; never on a flag alone."""
    if capture_error is not None:
        return Status.FAILED
    return Status.ENABLED if acked else Status.PENDING
