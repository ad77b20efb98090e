"""Who is calling the CA: bearer tokens turned into an `authority.Caller`.

Why this module exists: the CA serves node agents, and must know which node a caller speaks for before
it lets it impersonate that node's workloads. Two deployments, one interface (`Authenticator`):
- the lab: per-node tokens listed in the inventory (`Inventory.node_credentials`); a token names its
  node directly and authenticates as the node-agent service account;
- Kubernetes: a TokenReview (audience `istio-ca`) through the official client; the reviewed user
  `system:serviceaccount:<ns>:<sa>` and the pod binding in its `extra` (pod name, pod uid, node name)
  describe the caller. A token bound to no pod is refused: authorization checks the caller's pod.

What it deliberately does not do: no authorization (whether the caller may have an identity is
decided by authority.authorize), no caching of reviews, no kubeconfig loading (the caller passes a
configured `kubernetes.client.ApiClient`).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Protocol

import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from nodeagent.ca.authority import AuthorityError, Caller, Reason
from nodeagent.model import Identity, IdentityError, Inventory

log = logging.getLogger(__name__)

DEFAULT_AUDIENCE = "istio-ca"
DEFAULT_NODE_ACCOUNT = ("nodeagent-system", "nodeagent")
SA_USER_PREFIX = "system:serviceaccount:"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"


class AuthenticationError(AuthorityError):
    """The token does not identify a caller (or could not be checked)."""


class Authenticator(Protocol):
    def authenticate(self, token: str) -> Caller:
        """Return the caller the token belongs to, or raise AuthenticationError."""
        ...


class LabTokenAuthenticator:
    """Per-node tokens from the inventory: the holder is the node agent of that node."""

    def __init__(
        self,
        inventory: Callable[[], Inventory],
        node_account: tuple[str, str] = DEFAULT_NODE_ACCOUNT,
    ) -> None:
        self._inventory = inventory
        self._node_account = node_account

    def authenticate(self, token: str) -> Caller:
        inventory = self._inventory()
        presented = token.encode()
        node = None
        for credential in inventory.node_credentials:
            # Compare every credential in constant time so timing does not reveal a matching prefix.
            if hmac.compare_digest(presented, credential.token.encode()):
                node = credential.node
        if node is None:
            raise AuthenticationError(Reason.BAD_TOKEN, "token matches no node credential in the inventory")
        namespace, account = self._node_account
        return Caller(identity=Identity(inventory.trust_domain, namespace, account), node=node)


class TokenReviewAuthenticator:
    """Kubernetes service-account tokens checked by the API server (TokenReview, audience istio-ca)."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        trust_domain: str,
        audience: str = DEFAULT_AUDIENCE,
        timeout_seconds: float = 5.0,
    ) -> None:
        self._api = kubernetes.client.AuthenticationV1Api(api_client)
        self._trust_domain = trust_domain
        self._audience = audience
        self._timeout = timeout_seconds

    def authenticate(self, token: str) -> Caller:
        review = kubernetes.client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=kubernetes.client.V1TokenReviewSpec(token=token, audiences=[self._audience]),
        )
        try:
            result = self._api.create_token_review(review, _request_timeout=self._timeout)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise AuthenticationError(
                Reason.AUTHN_UNAVAILABLE,
                f"TokenReview failed: {exc}; check the CA's RBAC allows creating tokenreviews and the API "
                "server is reachable",
            ) from exc
        status = result.status
        if status is None or not status.authenticated:
            detail = status.error if status is not None and status.error else "not authenticated"
            raise AuthenticationError(Reason.BAD_TOKEN, f"TokenReview rejected the token: {detail}")
        if self._audience not in (status.audiences or []):
            raise AuthenticationError(
                Reason.BAD_TOKEN, f"token is not valid for audience {self._audience!r}; mint it with that audience"
            )
        return self._caller(status.user)

    def _caller(self, user: kubernetes.client.V1UserInfo | None) -> Caller:
        username = (user.username if user else None) or ""
        if not username.startswith(SA_USER_PREFIX):
            raise AuthenticationError(Reason.BAD_TOKEN, f"{username!r} is not a service account")
        parts = username[len(SA_USER_PREFIX) :].split(":")
        if len(parts) != 2:
            raise AuthenticationError(Reason.BAD_TOKEN, f"malformed service-account user {username!r}")
        try:
            identity = Identity(self._trust_domain, parts[0], parts[1])
        except IdentityError as exc:
            raise AuthenticationError(Reason.BAD_TOKEN, f"service-account user {username!r}: {exc}") from exc
        extra = (user.extra if user else None) or {}

        def one(key: str) -> str | None:
            values = extra.get(key) or []
            return values[0] if len(values) == 1 else None

        pod_name, pod_uid = one(EXTRA_POD_NAME), one(EXTRA_POD_UID)
        if pod_name is None or pod_uid is None:
            # REFERENCE.md: the caller's pod must exist with matching UID and SA. A token bound to no pod
            # (a legacy Secret token, or one bound to a Secret or Node) names no pod to check.
            raise AuthenticationError(
                Reason.BAD_TOKEN,
                f"the token of {username!r} is not bound to a pod; mount a projected service-account token "
                f"with audience {self._audience!r}",
            )
        return Caller(identity=identity, node=one(EXTRA_NODE_NAME), pod_name=pod_name, pod_uid=pod_uid)
