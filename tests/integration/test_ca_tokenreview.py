"""Kubernetes TokenReview authentication through the real kubernetes client, against a loopback stand-in."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import kubernetes.client
import pytest
from cryptography import x509
from identity_support import FRONTEND, NODE_AGENT, TD, inventory, make_csr, pod, start_ca, uri_sans

from nodeagent.ca.authn import AuthenticationError, TokenReviewAuthenticator
from nodeagent.ca.authority import Reason
from nodeagent.ca.client import CAClient, CARequestError

AGENT_USER = "system:serviceaccount:nodeagent-system:nodeagent"


def _user(username: str, pod_name: str, pod_uid: str, node: str | None) -> dict[str, Any]:
    extra = {
        "authentication.kubernetes.io/pod-name": [pod_name],
        "authentication.kubernetes.io/pod-uid": [pod_uid],
    }
    if node is not None:  # Kubernetes >= 1.30 (ServiceAccountTokenPodNodeInfo) names the pod's node too
        extra["authentication.kubernetes.io/node-name"] = [node]
    return {"username": username, "uid": "u-1", "groups": ["system:serviceaccounts"], "extra": extra}


REVIEWS: dict[str, dict[str, Any]] = {
    "agent-token": {
        "authenticated": True,
        "audiences": ["istio-ca"],
        "user": _user(AGENT_USER, "agent-abc", "agent-uid", "node1"),
    },
    # Kubernetes < 1.30: bound to the pod, but the node is not in the token.
    "agent-token-without-node": {
        "authenticated": True,
        "audiences": ["istio-ca"],
        "user": _user(AGENT_USER, "agent-abc", "agent-uid", None),
    },
    "stale-agent-token-without-node": {
        "authenticated": True,
        "audiences": ["istio-ca"],
        "user": _user(AGENT_USER, "agent-abc", "old-uid", None),
    },
    "stale-agent-token": {
        "authenticated": True,
        "audiences": ["istio-ca"],
        "user": _user(AGENT_USER, "agent-abc", "old-uid", "node1"),
    },
    "workload-token": {
        "authenticated": True,
        "audiences": ["istio-ca"],
        "user": _user("system:serviceaccount:shop:frontend", "frontend-1", "uid-shop-frontend-1", "node1"),
    },
    "other-audience-token": {
        "authenticated": True,
        "audiences": [],
        "user": _user(AGENT_USER, "agent-abc", "agent-uid", "node1"),
    },
    "user-token": {"authenticated": True, "audiences": ["istio-ca"], "user": {"username": "alice"}},
    # A legacy Secret token (or one bound to a Node): the right account, but no pod to check.
    "unbound-agent-token": {
        "authenticated": True,
        "audiences": ["istio-ca"],
        "user": {"username": AGENT_USER, "extra": {"authentication.kubernetes.io/node-name": ["node1"]}},
    },
}


class FakeAPIServer:
    """Answers POST /apis/authentication.k8s.io/v1/tokenreviews from REVIEWS; records what it was asked."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body})
                if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
                    self.send_response(404)
                    self.end_headers()
                    return
                status = REVIEWS.get(body["spec"]["token"], {"authenticated": False, "error": "invalid bearer token"})
                answer = json.dumps({**body, "status": status}).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fake-apiserver", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def apiserver() -> Iterator[FakeAPIServer]:
    server = FakeAPIServer()
    yield server
    server.close()


def _authenticator(url: str) -> TokenReviewAuthenticator:
    configuration = kubernetes.client.Configuration()
    configuration.host = url
    return TokenReviewAuthenticator(kubernetes.client.ApiClient(configuration), TD, timeout_seconds=2)


def test_agent_token_maps_to_caller_with_pod_binding(apiserver: FakeAPIServer) -> None:
    caller = _authenticator(apiserver.url).authenticate("agent-token")
    assert caller.identity == NODE_AGENT
    assert (caller.node, caller.pod_name, caller.pod_uid) == ("node1", "agent-abc", "agent-uid")
    sent = apiserver.requests[-1]["body"]
    assert sent["kind"] == "TokenReview"
    assert sent["spec"] == {"token": "agent-token", "audiences": ["istio-ca"]}


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("nonsense", Reason.BAD_TOKEN),
        ("other-audience-token", Reason.BAD_TOKEN),
        ("user-token", Reason.BAD_TOKEN),
        ("unbound-agent-token", Reason.BAD_TOKEN),
    ],
)
def test_rejected_tokens(apiserver: FakeAPIServer, token: str, reason: Reason) -> None:
    with pytest.raises(AuthenticationError) as info:
        _authenticator(apiserver.url).authenticate(token)
    assert info.value.reason is reason


def test_unreachable_api_server_is_authn_unavailable() -> None:
    server = FakeAPIServer()
    url = server.url
    server.close()
    with pytest.raises(AuthenticationError) as info:
        _authenticator(url).authenticate("agent-token")
    assert info.value.reason is Reason.AUTHN_UNAVAILABLE
    assert "tokenreviews" in info.value.message


@pytest.mark.parametrize(
    ("token", "granted", "reason"),
    [
        ("agent-token", True, "ok"),
        ("agent-token-without-node", True, "ok"),  # the node is the bound pod's, from the CA's pod watch
        ("workload-token", False, "not_node_agent"),  # a non-node account
        ("stale-agent-token", False, "caller_pod_mismatch"),
        ("stale-agent-token-without-node", False, "caller_node_unknown"),  # no pod with that UID
        ("unbound-agent-token", False, "bad_token"),
        ("nonsense", False, "bad_token"),
    ],
)
async def test_ca_with_tokenreview(
    tmp_path: Path, apiserver: FakeAPIServer, token: str, granted: bool, reason: str
) -> None:
    pods = [*inventory().pods, pod("agent-abc", "node1", "nodeagent", ns="nodeagent-system", uid="agent-uid")]
    current = inventory(pods)

    def node_of_pod(namespace: str, name: str, uid: str) -> str | None:  # what KubeSource.node_of_pod answers
        return next((p.node for p in current.pods if (p.namespace, p.name, p.uid) == (namespace, name, uid)), None)

    ca = start_ca(
        tmp_path / "ca", source=lambda: current, authenticator=_authenticator(apiserver.url), node_of_pod=node_of_pod
    )
    client = CAClient(ca.target, token=lambda: token, bundle_pem=ca.bundle)
    try:
        if granted:
            chain = await client.fetch(FRONTEND, make_csr([FRONTEND.uri]))
            assert uri_sans(x509.load_pem_x509_certificate(chain[0].encode())) == [FRONTEND.uri]
            assert ca.count("issued", reason) == 1
        else:
            with pytest.raises(CARequestError) as info:
                await client.fetch(FRONTEND, make_csr([FRONTEND.uri]))
            assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
            assert ca.count("denied", reason) == 1
    finally:
        await client.close()
        ca.stop()
