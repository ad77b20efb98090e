"""Finding a pod's network namespace: the edge between "a pod in the inventory" and "a netns file".

Why this module exists: the agent captures inside the pod's netns, so it needs a path it can hand to
nsenter and open for the tunnel. Where that path comes from depends on the platform - the lab names its
namespaces `na-<node>.<namespace>.<pod>` under /var/run/netns; on Kubernetes it will be the CRI's
netns bind mount or /proc/<pid>/ns/net of the sandbox. The agent only sees `NetnsResolver`.

What it deliberately does not do: no CRI client yet (Kubernetes comes with the kube workload source), no
opening of the file (the reconciler owns fds), no creation of namespaces, ever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from nodeagent.model import Pod
from nodeagent.netns import NETNS_RUN_DIR

# The lab's layout (nodeagent/lab/plan.py documents it; the agent may not import the lab).
LAB_POD_PATTERN = "na-{node}.{namespace}.{name}"
LAB_NODE_PATTERN = "na-{node}"


class NetnsResolver(Protocol):
    def resolve(self, pod: Pod) -> str | None:
        """The path of `pod`'s netns file, or None when it does not exist (yet, or any more)."""
        ...


@dataclass(frozen=True, slots=True)
class DirectoryNetnsResolver:
    """Pods' namespaces are named files in one directory (`ip netns` style), after a format pattern."""

    directory: str = NETNS_RUN_DIR
    pattern: str = LAB_POD_PATTERN

    def path(self, pod: Pod) -> str:
        return os.path.join(self.directory, self.pattern.format(node=pod.node, namespace=pod.namespace, name=pod.name))

    def resolve(self, pod: Pod) -> str | None:
        path = self.path(pod)
        return path if os.path.exists(path) else None


def node_netns_path(node: str, directory: str = NETNS_RUN_DIR, pattern: str = LAB_NODE_PATTERN) -> str:
    return os.path.join(directory, pattern.format(node=node))
