"""`nodeagent inspect redirects --kubernetes`: the pod list from the API server (through the stand-in).

The kernel half of the command (rules, routes and listeners in each pod's netns) needs root and a lab:
tests/privileged/test_kube_mode.py runs it end to end. Here: which pods and namespaces it lists, what it
leaves out and says so, and the errors an operator gets instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kube_standin import KubeStandIn, forbidden, namespace, pod

from nodeagent.agent.enrollment import desired_pods
from nodeagent.agent.inspect import kube_inventory
from nodeagent.cli import main
from nodeagent.model import DEFAULT_EXCLUDED_NAMESPACES


@pytest.fixture
def api() -> Iterator[KubeStandIn]:
    server = KubeStandIn()
    server.apply(namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
    server.apply(namespace("legacy"))
    server.apply(pod("web-1", "shop", "node1", "10.1.0.5", uid="uid-web-1"))
    server.apply(pod("batch", "legacy", "node1", "10.1.0.6", uid="uid-batch"))
    server.apply(pod("web-2", "shop", "node2", "10.2.0.5", uid="uid-web-2"))
    yield server
    server.close()


def test_lists_the_named_nodes_pods_and_every_namespace(api: KubeStandIn) -> None:
    inventory, skipped = kube_inventory(api.api_client(), ["node1"])
    assert skipped == []
    assert sorted(p.key for p in inventory.pods) == ["legacy/batch", "shop/web-1"]
    assert {n.name for n in inventory.namespaces} == {"shop", "legacy"}
    assert set(desired_pods(inventory, "node1", DEFAULT_EXCLUDED_NAMESPACES)) == {"uid-web-1"}
    # one list per node, with the field selector the agent uses
    pod_lists = [path for _, path in api.requests if path.startswith("/api/v1/pods")]
    assert len(pod_lists) == 1 and "fieldSelector=spec.nodeName%3Dnode1" in pod_lists[0], pod_lists


def test_an_object_it_cannot_read_is_left_out_and_named(api: KubeStandIn) -> None:
    bad = pod("odd", "shop", "node1", "10.1.0.9", uid="uid-odd")
    bad["status"]["phase"] = "Exploded"
    api.apply(bad)
    inventory, skipped = kube_inventory(api.api_client(), ["node1"])
    assert sorted(p.key for p in inventory.pods) == ["legacy/batch", "shop/web-1"]
    assert len(skipped) == 1 and "shop/odd" in skipped[0] and "Exploded" in skipped[0], skipped


FORBIDDEN = forbidden("Namespace")
ERROR_CASES = {  # id -> (extra arguments, injected answer to the namespace list, what the operator reads)
    "no-node": ([], None, "name the node(s) whose kernel this machine holds: --node NODE"),
    "rbac": (["--node", "node1"], (403, FORBIDDEN), "forbidden by RBAC"),
    "api-down": (["--node", "node1"], (503, None), "HTTP 503"),
    "garbage": (["--node", "node1"], (200, b"<html>"), "not Kubernetes JSON"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors(api: KubeStandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    argv, failure, message = ERROR_CASES[case]
    kubeconfig = api.kubeconfig(str(tmp_path / "kubeconfig"))
    if failure is not None:
        status, body = failure
        api.fail(r"^/api/v1/namespaces($|\?)", status=status, body=body)
    code = main(["inspect", "redirects", "--kubernetes", "--kubeconfig", kubeconfig, *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
