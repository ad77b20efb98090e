"""inventory/kube.py through the real kubernetes client against the API-server stand-in (tests/kube_standin.py).

Oracles: the stand-in's own store (what the "cluster" holds) and its request log, never the code under test.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator

import pytest
from kube_standin import KubeStandIn, authorization_policy, forbidden, namespace, pod, service, status_body

from nodeagent.inventory.kube import KubeSource
from nodeagent.policy import Action

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def api() -> Iterator[KubeStandIn]:
    server = KubeStandIn(bookmark_interval=0.2)
    server.apply(namespace("shop", AMBIENT))
    server.apply(namespace("other"))
    server.apply(pod("web-1", "shop", "node1", "10.1.0.5", sa="web", labels={"app": "web"}))
    server.apply(pod("web-2", "shop", "node2", "10.2.0.5", sa="web", labels={"app": "web"}))
    server.apply(pod("db-1", "other", "node1", "10.1.0.6", sa="db"))
    server.apply(service("web", "shop", {"app": "web"}, [(80, 8080)], "10.96.0.10"))
    yield server
    server.close()


@pytest.fixture
def source_factory(api: KubeStandIn) -> Iterator[Callable[..., KubeSource]]:
    started: list[KubeSource] = []

    def make(**options: object) -> KubeSource:
        options.setdefault("backoff_initial", 0.05)
        options.setdefault("backoff_max", 0.2)
        src = KubeSource(api.api_client(), **options).start()  # type: ignore[arg-type]
        started.append(src)
        return src

    yield make
    for src in started:
        src.stop()


def pod_names(src: KubeSource) -> set[str]:
    return {p.key for p in src.current().pods}


def test_an_update_of_nothing_the_model_reads_changes_nothing(
    api: KubeStandIn, source_factory: Callable[..., KubeSource]
) -> None:
    """The kubelet rewrites a pod's status often (probe times); the model read none of it, yet every such
    event rebuilt it and, in the tunnel, re-checked every open connection against the policies."""
    changes: list[int] = []
    src = source_factory(on_change=lambda: changes.append(1))
    assert src.wait_synced(5)
    api.apply(pod("before", "other", "node1", "10.1.0.8"))  # a real change first: the sync's events are in
    eventually(lambda: "other/before" in pod_names(src), what="the first marker pod")
    inv = src.current()
    changes.clear()
    churn = pod("web-1", "shop", "node1", "10.1.0.5", sa="web", labels={"app": "web"})
    for i in range(5):
        churn["status"]["conditions"] = [
            {"type": "Ready", "status": "True", "lastProbeTime": f"2026-11-21T10:00:0{i}Z"}
        ]
        api.apply(churn)
    marker = pod("marker", "other", "node1", "10.1.0.9")  # a real change after them: the watch got this far
    api.apply(marker)
    eventually(lambda: "other/marker" in pod_names(src), what="the marker pod")
    assert len(changes) == 1, changes  # the marker only
    assert src.current().pod("shop/web-1") is inv.pod("shop/web-1")
    # A change in a field left out of == (readiness) is still a change.
    churn["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    api.apply(churn)
    eventually(lambda: not src.current().pod("shop/web-1").ready, what="the readiness change")


def test_initial_list_then_watch_events(api: KubeStandIn, source_factory: Callable[..., KubeSource]) -> None:
    src = source_factory()
    assert src.wait_synced(5)
    inv = src.current()
    assert pod_names(src) == {"shop/web-1", "shop/web-2", "other/db-1"}
    assert inv.services[0].vip is not None and str(inv.services[0].vip) == "10.96.0.10"
    assert inv.namespace("shop") is not None
    assert src.current() is inv  # same object until something changes

    api.apply(pod("web-3", "shop", "node1", "10.1.0.7"))
    eventually(lambda: "shop/web-3" in pod_names(src), what="ADDED")
    api.apply(pod("web-3", "shop", "node1", "10.1.0.7", labels={"v": "2"}))
    eventually(lambda: dict(src.current().pod("shop/web-3").labels) == {"v": "2"}, what="MODIFIED")
    api.delete("Pod", "web-3", "shop")
    eventually(lambda: "shop/web-3" not in pod_names(src), what="DELETED")
    watches = [p for m, p in api.requests if "watch=" in p and "/pods" in p]
    assert all("allowWatchBookmarks=true" in p and "resourceVersion=" in p for p in watches)


def test_node_field_selector(api: KubeStandIn, source_factory: Callable[..., KubeSource]) -> None:
    src = source_factory(node="node1", services=False, policies=False)
    assert src.wait_synced(5)
    assert pod_names(src) == {"shop/web-1", "other/db-1"}
    assert [n.name for n in src.current().nodes] == ["node1"]
    api.apply(pod("late", "shop", "node2", "10.2.0.9"))
    api.apply(pod("late-1", "shop", "node1", "10.1.0.9"))
    eventually(lambda: "shop/late-1" in pod_names(src))
    assert "shop/late" not in pod_names(src)
    assert any("fieldSelector=spec.nodeName%3Dnode1" in p for _, p in api.requests)


def test_chunked_list(api: KubeStandIn, source_factory: Callable[..., KubeSource]) -> None:
    for i in range(7):
        api.apply(pod(f"bulk-{i}", "shop", "node1", f"10.1.1.{i + 1}"))
    src = source_factory(page_size=2)
    assert src.wait_synced(5)
    assert len(src.current().pods) == 10
    assert sum(1 for _, p in api.requests if p.startswith("/api/v1/pods?") and "continue=" in p) >= 4


def test_an_expired_continue_token_lists_again_in_one_piece(
    api: KubeStandIn, source_factory: Callable[..., KubeSource], caplog: pytest.LogCaptureFixture
) -> None:
    """A paged list slower than etcd's compaction gets 410 Gone on a `continue`: it is listed again in one
    request (client-go's pager), not reported as an error and retried after a backoff."""
    caplog.set_level(logging.INFO, logger="nodeagent.inventory.kube")
    for i in range(7):
        api.apply(pod(f"bulk-{i}", "shop", "node1", f"10.1.1.{i + 1}"))
    gone = json.dumps(status_body(410, "Expired", "The provided continue parameter is too old")).encode()
    api.fail(r"^/api/v1/pods\?.*continue=", status=410, body=gone)
    src = source_factory(page_size=2)
    assert src.wait_synced(5)
    assert len(src.current().pods) == 10
    assert "continue token expired (410 Gone); listing again in one piece" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert src.stats()["pods"].errors == 0
    lists = [p for _, p in api.requests if p.partition("?")[0] == "/api/v1/pods" and "watch=" not in p]
    assert lists[-1] == "/api/v1/pods" and "continue=" in lists[-2]  # the expired page, then all in one


def test_dropped_watch_loses_no_event(api: KubeStandIn, source_factory: Callable[..., KubeSource]) -> None:
    src = source_factory()
    assert src.wait_synced(5)
    eventually(lambda: api.watch_count("Pod") == 1)
    lists_before = src.stats()["pods"].lists
    api.drop_watches()
    api.apply(pod("during-drop", "shop", "node1", "10.1.0.20"))  # written while no watch is open
    api.delete("Pod", "web-2", "shop")
    eventually(lambda: "shop/during-drop" in pod_names(src) and "shop/web-2" not in pod_names(src), what="resume")
    assert src.stats()["pods"].lists == lists_before  # resumed from the resourceVersion, no relist


def test_410_on_open_watch_relists(api: KubeStandIn, source_factory: Callable[..., KubeSource]) -> None:
    src = source_factory()
    assert src.wait_synced(5)
    eventually(lambda: api.watch_count("Pod") == 1)
    api.apply(pod("before-gone", "shop", "node1", "10.1.0.21"))
    api.compact(expire_open_watches=True)
    api.apply(pod("after-gone", "shop", "node1", "10.1.0.22"))
    eventually(lambda: {"shop/before-gone", "shop/after-gone"} <= pod_names(src), what="relist")
    assert src.stats()["pods"].relists_after_gone >= 1


def test_a_relist_keeps_the_previous_version_of_an_object_that_no_longer_translates(
    api: KubeStandIn, source_factory: Callable[..., KubeSource]
) -> None:
    """The watch keeps the last good version of an object whose new version cannot be read; a relist after
    410 Gone dropped it instead - for a pod, an unenrollment (its capture removed) caused by bad data."""
    src = source_factory()
    assert src.wait_synced(5)
    eventually(lambda: api.watch_count("Pod") == 1)
    broken = pod("web-1", "shop", "node1", "10.1.0.5", sa="web", labels={"app": "web"})
    broken["status"]["podIP"] = "not-an-ip"
    events = src.stats()["pods"].events
    api.apply(broken)
    eventually(lambda: src.stats()["pods"].events > events, what="the watch to see the change (it keeps the pod)")
    api.compact(expire_open_watches=True)  # 410 Gone: the pods are listed again, the broken version with them
    eventually(lambda: src.stats()["pods"].relists_after_gone >= 1, what="a relist")
    eventually(lambda: src.stats()["pods"].lists >= 2, what="the relist to finish")
    web = next(p for p in src.current().pods if p.key == "shop/web-1")
    assert str(web.ip) == "10.1.0.5"  # the last good version, not gone


def test_a_relist_does_not_stand_an_old_pod_in_for_a_new_one_of_the_same_name(
    api: KubeStandIn, source_factory: Callable[..., KubeSource]
) -> None:
    """... but only the same object's: a pod deleted and made again under its name (a StatefulSet's) while
    the watch was gone is another pod, and the old one's uid and IP must not stand in for it."""
    src = source_factory()
    assert src.wait_synced(5)
    eventually(lambda: api.watch_count("Pod") == 1)
    api.compact(expire_open_watches=True)  # from here the source learns by relisting
    api.delete("Pod", "web-1", "shop")
    again = pod("web-1", "shop", "node1", "10.1.0.5", sa="web", uid="uid-web-1-again")
    again["status"]["podIP"] = "not-an-ip"
    api.apply(again)
    relists = src.stats()["pods"].lists
    api.compact(expire_open_watches=True)
    eventually(lambda: src.stats()["pods"].lists > relists, what="a relist with the new pod")
    assert "shop/web-1" not in pod_names(src)  # unreadable, and not the old pod either


def test_410_when_resuming_from_a_compacted_version(
    api: KubeStandIn, source_factory: Callable[..., KubeSource]
) -> None:
    src = source_factory(backoff_initial=0.5)
    assert src.wait_synced(5)
    eventually(lambda: api.watch_count("Pod") == 1)
    api.fail(r"^/api/v1/pods\?.*watch=", 503, times=1)  # the first re-watch fails: time to compact
    api.drop_watches()
    api.delete("Pod", "web-1", "shop")
    api.apply(pod("new", "shop", "node1", "10.1.0.30"))
    api.compact()
    eventually(lambda: "shop/new" in pod_names(src) and "shop/web-1" not in pod_names(src), timeout=8)
    assert src.stats()["pods"].relists_after_gone >= 1


def test_410_as_the_watch_response_status_relists_at_once(
    api: KubeStandIn, source_factory: Callable[..., KubeSource]
) -> None:
    """A too-old resourceVersion may also come back as the watch request's own HTTP status (410 Gone with a
    Status body, as client-go's reflector expects: apierrors.IsResourceExpired/IsGone), not only as an ERROR
    event in a 200 stream. Retrying the same version with backoff would never get anywhere: list again."""
    src = source_factory()
    assert src.wait_synced(5)
    eventually(lambda: api.watch_count("Pod") == 1)
    api.apply(pod("before-gone", "shop", "node1", "10.1.0.39"))  # the watch delivers: cutting it is routine
    eventually(lambda: "shop/before-gone" in pod_names(src), what="watch event")
    errors = src.stats()["pods"].errors
    gone = json.dumps(status_body(410, "Expired", "too old resource version: 1 (9)")).encode()
    api.fail(r"^/api/v1/pods\?.*watch=", 410, gone, times=2)
    api.drop_watches()
    api.apply(pod("after-gone", "shop", "node1", "10.1.0.40"))
    eventually(lambda: "shop/after-gone" in pod_names(src), what="relist")
    eventually(lambda: api.watch_count("Pod") == 1)
    # Each 410 was a relist, neither an error retried with the same version.
    assert (src.stats()["pods"].relists_after_gone, src.stats()["pods"].errors) == (2, errors)


def test_node_of_pod_needs_the_same_uid(api: KubeStandIn, source_factory: Callable[..., KubeSource]) -> None:
    """The CA's caller node for tokens without the node-name claim: the bound pod's, if its UID matches."""
    src = source_factory()
    assert src.wait_synced(5)
    [web] = [p for p in src.current().pods if p.key == "shop/web-1"]
    assert web.uid and src.node_of_pod("shop", "web-1", web.uid) == web.node == "node1"
    assert src.node_of_pod("shop", "web-1", "another-uid") is None  # deleted and re-created: not that pod
    assert src.node_of_pod("shop", "nope", web.uid) is None


def test_rbac_403_is_explained_and_retried(
    api: KubeStandIn, source_factory: Callable[..., KubeSource], caplog: pytest.LogCaptureFixture
) -> None:
    api.fail(r"^/api/v1/pods\?", 403, forbidden("Pod"), times=3)
    with caplog.at_level(logging.ERROR):
        src = source_factory()
        assert src.wait_synced(5)  # synced only after the list finally succeeded
    assert any("forbidden by RBAC" in r.getMessage() and "rbac.yaml" in r.getMessage() for r in caplog.records)
    assert len(src.current().pods) == 3


def test_missing_istio_crds_say_which_kustomization_installs_them(
    api: KubeStandIn, source_factory: Callable[..., KubeSource]
) -> None:
    """Without Istio (or with an Istio before 1.22, which serves no security.istio.io/v1) the tunnel's first list
    of policies is a 404 and the tunnel never serves. The error named `kubectl apply -k daemonset/`, which
    deliberately installs no CRD: the operator re-applied it and nothing changed."""
    missing = status_body(404, "NotFound", "the server could not find the requested resource")
    api.fail(r"^/apis/security\.istio\.io/v1/authorizationpolicies\?", 404, json.dumps(missing).encode(), times=1000)
    src = source_factory()
    eventually(lambda: src.error is not None, what="the 404 to be reported")
    assert not src.synced.is_set()
    error = src.error or ""
    assert "authorizationpolicies.security.istio.io: not found" in error, error
    assert "kubectl apply -k daemonset/istio-crds/" in error and "1.22" in error, error
    assert "kubectl apply -k daemonset/ " not in error, error


def test_garbage_and_outage_keep_the_last_good_state(
    api: KubeStandIn, source_factory: Callable[..., KubeSource]
) -> None:
    src = source_factory()
    assert src.wait_synced(5)
    good = pod_names(src)
    eventually(lambda: api.watch_count("Pod") == 1)
    api.fail(r"^/api/v1/pods\?", 200, b'{"type": "ADDED", "object": [not json\n', times=3)
    api.fail(r"^/api/v1/namespaces\?", 500, times=3)
    api.drop_watches()
    eventually(lambda: src.error is not None, what="an error to be reported")
    assert pod_names(src) == good
    assert src.current().namespace("shop") is not None
    api.apply(pod("recovered", "shop", "node1", "10.1.0.40"))
    eventually(lambda: "shop/recovered" in pod_names(src), timeout=8, what="recovery")
    eventually(lambda: src.error is None, what="error cleared")


def test_watches_that_end_at_once_are_retried_with_a_growing_backoff(
    api: KubeStandIn, source_factory: Callable[..., KubeSource]
) -> None:
    """A 200 that ends at once without an event (a proxy in front of a sick API server) is no error, but
    retrying it at the initial delay forever is a request storm: it backs off like an error does."""
    src = source_factory(backoff_initial=0.4, backoff_max=30)
    assert src.wait_synced(5)
    eventually(lambda: api.watch_count("Pod") == 1)
    api.fail(r"^/api/v1/pods\?.*watch=", 200, b"", times=1000)
    api.drop_watches()
    before = sum(1 for _, path in api.requests if "watch=" in path and "/pods" in path)
    time.sleep(4)
    tries = sum(1 for _, path in api.requests if "watch=" in path and "/pods" in path) - before
    assert 1 <= tries <= 8, tries  # delays ~0.2, 0.4, 0.8, 1.6 s on average (jittered); 11-16 without backoff


def test_api_server_down_keeps_state(api: KubeStandIn, source_factory: Callable[..., KubeSource]) -> None:
    src = source_factory()
    assert src.wait_synced(5)
    good = pod_names(src)
    api.close()
    eventually(lambda: src.error is not None and "cannot reach" in src.error, what="outage noticed")
    assert pod_names(src) == good


def test_policies_follow_changes_and_unknown_fields_fail_closed(
    api: KubeStandIn, source_factory: Callable[..., KubeSource], caplog: pytest.LogCaptureFixture
) -> None:
    src = source_factory()
    assert src.wait_synced(5)
    first = src.policies()
    assert first.authorization == ()
    assert src.policies() is first
    spec = {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}
    api.apply(authorization_policy("allow-shop", "shop", spec))
    eventually(lambda: len(src.policies().authorization) == 1, what="policy ADDED")
    with caplog.at_level(logging.ERROR):
        api.apply(authorization_policy("allow-shop", "shop", {**spec, "action": "DENY", "futureField": True}))
        eventually(lambda: src.policies().authorization[0].action is Action.DENY, what="fail-closed DENY")
    assert src.policies().authorization[0].rules[0].clauses == ()  # deny-all
    assert any("futureField" in r.getMessage() for r in caplog.records)
    api.delete("AuthorizationPolicy", "allow-shop", "shop")
    eventually(lambda: src.policies().authorization == (), what="policy DELETED")


def test_bookmarks_advance_the_resource_version(api: KubeStandIn, source_factory: Callable[..., KubeSource]) -> None:
    src = source_factory(services=False, policies=False)
    assert src.wait_synced(5)
    listed = int(src._pods.rv or 0)
    api.apply(namespace("unrelated"))  # moves the global RV; no pod event
    eventually(lambda: int(src._pods.rv or 0) > listed, what="a BOOKMARK")


def test_initial_sync_of_a_large_cluster(api: KubeStandIn, source_factory: Callable[..., KubeSource]) -> None:
    for n in range(20):
        api.apply(namespace(f"ns{n}", AMBIENT))
    for i in range(2000):
        api.apply(pod(f"p-{i}", f"ns{i % 20}", f"node{i % 10}", f"10.{i // 250}.{i % 250}.{i % 200 + 2}"))
    for i in range(400):
        api.apply(service(f"s-{i}", f"ns{i % 20}", {"app": f"a{i}"}, [(80, 8080)]))
    t0 = time.monotonic()
    src = source_factory()
    assert src.wait_synced(10)
    assert len(src.current().pods) == 2003
    assert time.monotonic() - t0 < 5
