"""The CA's Kubernetes edges: TokenReview authentication and the pods of each node from the API server.

Why this module exists: in a cluster, `nodeagent ca serve --kubernetes` authenticates node agents by
their projected service-account tokens (TokenReview, audience istio-ca: ca/authn.py) and authorizes
them against the pods the API server says run on the caller's node — the token's bound pod must exist
there with the same name and UID, and a requested identity must belong to a pod on that node
(authority.authorize). The caller's node is the token's node-name claim, or where the bound pod (same
UID) is scheduled when the token has none (Kubernetes < 1.30), as Istio's node authorizer does.
The pods come from one cluster-wide watch (inventory/kube.KubeSource), so a
certificate request costs no API call beyond the TokenReview.

What it deliberately does not do: no authorization logic (authority.py), no caching of reviews.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import kubernetes.client

from nodeagent.ca.authn import DEFAULT_AUDIENCE, TokenReviewAuthenticator
from nodeagent.inventory.kube import KubeConfigError, KubeSource, api_client
from nodeagent.model import Pod

log = logging.getLogger(__name__)


@dataclass
class KubeCAEdges:
    authenticator: TokenReviewAuthenticator
    pods_on_node: Callable[[str], Sequence[Pod]]
    node_of_pod: Callable[[str, str, str], str | None]
    source: KubeSource


def kubernetes_edges(
    *,
    trust_domain: str,
    kubeconfig: Path | None = None,
    context: str | None = None,
    audience: str = DEFAULT_AUDIENCE,
    sync_timeout: float = 60.0,
    client: kubernetes.client.ApiClient | None = None,
) -> KubeCAEdges:
    """Start the pod watch and wait for its first complete list (a CA that knows no pods denies all)."""
    api = client if client is not None else api_client(kubeconfig, context)
    source = KubeSource(api, services=False, policies=False, trust_domain=trust_domain).start()
    if not source.wait_synced(sync_timeout):
        source.stop(timeout=0)
        raise KubeConfigError(f"no complete list of pods and namespaces in {sync_timeout:.0f} s: {source.error}")
    return KubeCAEdges(
        TokenReviewAuthenticator(api, trust_domain, audience),
        source.pods_on,
        source.node_of_pod,
        source,
    )
