"""The Kubernetes workload source: list, then watch from the list's resourceVersion, through the official client.

Why this module exists: in a cluster the agent, the tunnel and the CA learn pods, namespaces, services and
Istio's L4 policies from the API server instead of the lab's inventory file. One `KubeSource` keeps a
local copy of each resource with the informer pattern and hands out the same `model.Inventory` /
`policy.PolicySet` snapshots the local source produces (built by the pure inventory/translate.py), so
their consumers cannot tell the two sources apart:

- `current()` returns an Inventory and `policies()` a PolicySet; both return the *same object* until
  something changed, so the tunnel's identity check (`is`) stays cheap;
- `on_change()` is called (from a reflector thread) after every applied change; consumers coalesce.

Per resource, a reflector thread runs: list (in pages of `page_size`, a consistent snapshot) -> replace
the local copy -> watch from the list's resourceVersion with bookmarks -> apply ADDED/MODIFIED/DELETED,
advance the resourceVersion on every event and BOOKMARK -> when the stream ends (server timeout, dropped
connection, garbage line) watch again from the last resourceVersion, so no event is lost -> on 410 Gone
(the resourceVersion was compacted away) list afresh. Errors (RBAC 403, 5xx, an API server that is down
or answers garbage) are logged with what to do, retried with exponential backoff and jitter, and never
touch the local copy: the last good state stays in use and nothing is unenrolled by mistake.
`synced` is set only when every resource has been listed once, so no consumer ever sees pods without
their namespaces (which would look unenrolled).

Scopes: the node agent needs its own node's pods (`node=`: field selector spec.nodeName) and namespaces;
the tunnel and the CA need every pod (destination lookup, node authorization), services and policies.

What it deliberately does not do: no kubeconfig reading at import (`api_client()` builds one when asked),
no enrollment decisions, no asyncio (threads: the client is blocking; asyncio callers wrap `on_change`
with call_soon_threadsafe), no writes (agent/kube_status.py patches pod status).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import kubernetes.client
import kubernetes.config
import urllib3.exceptions
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.config import kube_config
from kubernetes.watch.watch import iter_resp_lines

from nodeagent.inventory import translate
from nodeagent.model import DEFAULT_TRUST_DOMAIN, Inventory, Namespace, Pod, Service
from nodeagent.policy import DEFAULT_ROOT_NAMESPACE, PeerAuthentication, Policy, PolicySet

log = logging.getLogger(__name__)

T = TypeVar("T")

ISTIO_SECURITY = ("security.istio.io", "v1")
DEFAULT_PAGE_SIZE = 500
DEFAULT_WATCH_TIMEOUT = 300  # seconds the server keeps one watch open (it ends it cleanly; we re-watch)
DEFAULT_REQUEST_TIMEOUT = 30.0
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
DEFAULT_KUBECONFIG = "~/.kube/config"
_CANNOT = "cannot configure the Kubernetes client: "


class KubeConfigError(ValueError):
    """No usable way to reach the API server; the message says which were tried."""


def api_client(
    kubeconfig: str | os.PathLike[str] | None = None, context: str | None = None
) -> kubernetes.client.ApiClient:
    """A configured ApiClient (KUBECONFIG_HELP in nodeagent.admin_client says the same to users): in a pod,
    with neither `kubeconfig` nor `context`, the pod's service account; else the file `kubeconfig`, else
    the files of $KUBECONFIG merged as kubectl merges them, else ~/.kube/config; `context`, else the
    current-context.

    $KUBECONFIG's path list is merged by the client's own KubeConfigMerger (first file wins for each
    cluster, user and context; missing files skipped). Its loader takes the *last* file's current-context;
    kubectl takes the first file's, so without `context` that one is named explicitly.

    Every failure is a KubeConfigError with one line that says what to do; a kubeconfig file that does not
    exist (--kubeconfig) or cannot be read is named in it (the client's loader would raise a bare parser
    error naming no file).

    Called only when a command runs, never at import. In a pod the in-cluster loader re-reads the
    projected service-account token when it is rotated.
    """
    configuration = kubernetes.client.Configuration()
    try:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            # Passed on whole: the client's default reads $KUBECONFIG once, when it is imported.
            paths = (
                os.fspath(kubeconfig) if kubeconfig is not None else os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
            )
            if kubeconfig is not None and not os.path.exists(os.path.expanduser(paths)):  # $KUBECONFIG: skipped
                raise KubeConfigError(
                    f"{_CANNOT}the kubeconfig file {paths} does not exist; pass --kubeconfig an existing file"
                )
            for path in paths.split(kube_config.ENV_KUBECONFIG_PATH_SEPARATOR):
                problem = _kubeconfig_problem(os.path.expanduser(path))
                if problem is not None:
                    if kubeconfig is not None:
                        fix = "fix it, or pass --kubeconfig a working one"
                    elif os.environ.get("KUBECONFIG"):
                        fix = "fix it, take it out of $KUBECONFIG, or pass --kubeconfig FILE"
                    else:
                        fix = "fix it, or pass --kubeconfig FILE (or set KUBECONFIG)"
                    raise KubeConfigError(f"{_CANNOT}the kubeconfig file {os.path.expanduser(path)} {problem}; {fix}")
            if context is None:
                merged = kube_config.KubeConfigMerger(paths)  # type: ignore[no-untyped-call]
                context = next(
                    (c["current-context"] for c in merged.config_files.values() if c.get("current-context")), None
                )
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=paths, context=context, client_configuration=configuration
            )
    except KubeConfigError:
        raise
    except (kubernetes.config.ConfigException, OSError, ValueError) as exc:
        raise KubeConfigError(
            f"{_CANNOT}{exc}; pass --kubeconfig FILE (and --context), set "
            "KUBECONFIG, or run inside a pod with a service account"
        ) from None
    return kubernetes.client.ApiClient(configuration)


def _kubeconfig_problem(path: str) -> str | None:
    """What keeps the client's loader from reading the kubeconfig file `path`, or None (also when it is absent:
    the loader skips those). The loader takes for granted UTF-8 YAML (JSON is YAML) holding a mapping whose
    clusters, contexts and users are lists of named entries, and meets any other file with a parser's
    traceback (yaml.YAMLError, TypeError) that names no file."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            doc = yaml.safe_load(f.read().decode("utf-8"))
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    except UnicodeDecodeError as exc:
        return f"is not a text file (byte {exc.start} is not UTF-8)"
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"is not YAML or JSON{where}: {getattr(exc, 'problem', None) or exc}"
    if doc is None:
        return "is empty"
    if not isinstance(doc, dict):
        return f"holds a {type(doc).__name__}, not a kubeconfig (a mapping of apiVersion, clusters, users, ...)"
    for key in ("clusters", "contexts", "users"):
        entries = doc.get(key) or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
            return f"is not a kubeconfig: its `{key}` is not a list of entries with a `name`"
    return None


class _Relist(Exception):
    """The watch's resourceVersion is gone (410): list again."""


class _Stopped(Exception):
    pass


def _identical(old: object, new: object) -> bool:
    """Equal in every field, also those left out of == (a pod's readiness, its status annotation)."""
    if old is None or type(old) is not type(new):
        return False
    if dataclasses.is_dataclass(old):
        return all(getattr(old, f.name) == getattr(new, f.name) for f in dataclasses.fields(old))
    return old == new


# What a 404 on listing security.istio.io/v1 objects means: `kubectl apply -k daemonset/` does not install
# the CRDs (they would take versions away from Istio's own), and Istio serves v1 only from 1.22 on.
ISTIO_CRDS_MISSING = (
    "the security.istio.io/v1 AuthorizationPolicy and PeerAuthentication CRDs are not installed or do not serve "
    "v1: without Istio, kubectl apply -k daemonset/istio-crds/; with Istio, upgrade it to 1.22 or later "
    "(daemonset/README.md)"
)


def describe(
    exc: BaseException, what: str, grant: str = "list/watch on it to this service account", not_found: str = ""
) -> str:
    """A one-line explanation of a failed API call, with what to do about it (`grant`: the RBAC the call
    needs and for whom, for a 403; `not_found`: what a 404 means for this call)."""
    if isinstance(exc, ApiException):
        status = exc.status
        reason = exc.reason or ""
        message = ""
        try:
            body = json.loads(exc.body) if exc.body else {}
            message = body.get("message", "") if isinstance(body, dict) else ""
        except ValueError:
            pass
        detail = message or reason
        if status == 403:
            return f"{what}: forbidden by RBAC ({detail}); grant {grant} (daemonset/rbac.yaml)"
        if status == 401:
            return f"{what}: unauthorized ({detail}); the token or kubeconfig credentials are not accepted"
        if status == 404:
            return f"{what}: not found ({detail})" + (f"; {not_found}" if not_found else "")
        return f"{what}: HTTP {status} {detail}".rstrip()
    if isinstance(exc, ValueError):
        return f"{what}: the API server answered something that is not Kubernetes JSON ({exc})"
    return f"{what}: cannot reach the API server ({exc.__class__.__name__}: {exc})"


@dataclass
class ReflectorStats:
    lists: int = 0
    watches: int = 0
    events: int = 0
    relists_after_gone: int = 0
    errors: int = 0


class _Reflector(Generic[T]):
    """One resource kept in sync: list -> watch -> (410) list again; errors back off, state is kept."""

    def __init__(
        self,
        owner: KubeSource,
        name: str,
        call: Callable[..., Any],
        convert: Callable[[Mapping[str, Any]], T | None],
        selector: dict[str, Any],
        *,
        not_found: str = "",
    ) -> None:
        self.owner = owner
        self.name = name
        self._call = call
        self._convert = convert
        self._selector = selector
        self._not_found = not_found  # what a 404 on this resource means (describe)
        self.items: dict[str, T] = {}
        self.rv: str | None = None
        self.synced = False
        self.error: str | None = None
        self.stats = ReflectorStats()
        self._resp: Any = None
        self._reported: dict[str, str] = {}  # key -> last problem logged (log once per problem)
        self.thread = threading.Thread(target=self._run, name=f"kube-{name}", daemon=True)

    # --- loop --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.owner.backoff_initial
        while not self.owner.stopping.is_set():
            try:
                if self.rv is None:
                    self._list()
                if self._watch_once():
                    delay = self.owner.backoff_initial
                else:  # the stream ended at once, eventless (a proxy, a sick API server): back off as after errors
                    if self.owner.stopping.wait(delay * random.random()):
                        return
                    delay = min(delay * 2, self.owner.backoff_max)
            except _Stopped:
                return
            except _Relist:
                self.stats.relists_after_gone += 1
                log.info("%s: resourceVersion %s expired (410 Gone); listing again", self.name, self.rv)
                self.rv = None
                delay = self.owner.backoff_initial
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if self.owner.stopping.is_set():
                    return
                self.stats.errors += 1
                problem = describe(
                    exc, f"{'watching' if self.synced else 'listing'} {self.name}", not_found=self._not_found
                )
                kept = "keeping the last good state" if self.synced else "nothing is known yet"
                wait = delay * (0.5 + random.random())
                if problem != self.error:
                    log.error(
                        "%s; %s, retrying in %.1f s (backing off up to %.0f s)",
                        problem,
                        kept,
                        wait,
                        self.owner.backoff_max,
                    )
                else:
                    log.debug("%s; retrying in %.1f s", problem, wait)
                self.error = problem
                self.owner._changed(None)
                if self.owner.stopping.wait(wait):
                    return
                delay = min(delay * 2, self.owner.backoff_max)

    def _list(self) -> None:
        fresh: dict[str, T] = {}
        cont: str | None = None
        paged = True
        while True:
            kwargs: dict[str, Any] = {**self._selector, "limit": self.owner.page_size} if paged else {**self._selector}
            if cont:
                kwargs["_continue"] = cont
            try:
                resp = self._call(_preload_content=False, _request_timeout=self.owner.request_timeout, **kwargs)
            except ApiException as exc:
                if exc.status != 410 or not cont:
                    raise
                # The snapshot the pages come from was compacted away (paging slower than etcd's compaction):
                # list again in one request, as client-go's pager does (FullListIfExpired), which cannot
                # expire so. Not an error to report.
                log.info(
                    "%s: the paged list's continue token expired (410 Gone); listing again in one piece", self.name
                )
                fresh.clear()
                cont = None
                paged = False
                continue
            try:
                doc = json.loads(resp.data)
            finally:
                resp.release_conn()
            if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
                raise ValueError(f"a list response without items (got {str(doc)[:80]!r})")
            meta = doc.get("metadata") or {}
            for obj in doc["items"]:
                if isinstance(obj, dict):
                    # As the watch does: an object that no longer translates keeps its previous version. A
                    # relist after 410 Gone that dropped it instead would unenroll a pod (capture removed).
                    key, value = self._translate(obj, previous=self.items)
                    if key is not None and value is not None:
                        fresh[key] = value
            cont = meta.get("continue") or None
            if cont is None:
                rv = meta.get("resourceVersion")
                if not isinstance(rv, str) or not rv:
                    raise ValueError("a list response without metadata.resourceVersion")
                break
        self.stats.lists += 1
        with self.owner.lock:
            self.items = fresh
            self.rv = rv
            self.synced = True
            self.error = None
        log.info("%s: listed %d at resourceVersion %s", self.name, len(fresh), rv)
        self.owner._changed(self)

    def _watch_once(self) -> bool:
        """One watch request from self.rv; True when it was a healthy stream (events, or open > 1 s)."""
        self.stats.watches += 1
        try:
            resp = self._call(
                watch=True,
                resource_version=self.rv,
                allow_watch_bookmarks=True,
                timeout_seconds=self.owner.watch_timeout,
                _preload_content=False,
                _request_timeout=(self.owner.request_timeout, self.owner.watch_timeout + self.owner.request_timeout),
                **self._selector,
            )
        except ApiException as exc:
            # The expiry may be the watch response's own status rather than an ERROR event in a 200 stream
            # (client-go's reflector handles both); retrying the same version would only 410 again.
            if exc.status == 410:
                raise _Relist from None
            raise
        self._resp = resp
        if self.error is not None:  # the API server answers again
            log.info("%s: watching again from resourceVersion %s", self.name, self.rv)
            self.error = None
            self.owner._changed(None)
        started, delivered = time.monotonic(), 0
        try:
            for line in self._lines(resp):
                self._event(line)
                delivered += 1
        except urllib3.exceptions.ProtocolError as exc:
            if not delivered and time.monotonic() - started < 1.0:
                raise
            # Routine: API server restarts and idle load balancers cut long streams. Nothing is lost:
            # the next watch starts from the last resourceVersion applied.
            log.info("%s: watch stream cut (%s); watching again from resourceVersion %s", self.name, exc, self.rv)
        finally:
            self._resp = None
            resp.release_conn()
        if self.owner.stopping.is_set():
            raise _Stopped
        return bool(delivered) or time.monotonic() - started >= 1.0

    def _lines(self, resp: Any) -> Iterator[str]:
        for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
            if self.owner.stopping.is_set():
                raise _Stopped
            if line:
                yield line

    def _event(self, line: str) -> None:
        event = json.loads(line)
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise ValueError(f"watch event without an object: {line[:80]!r}")
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Relist
            raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if isinstance(rv, str) and rv:
                self.rv = rv
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise ValueError(f"unknown watch event type {kind!r}")
        self.stats.events += 1
        with self.owner.lock:
            if kind == "DELETED":
                try:
                    key = translate.object_key(obj)
                except translate.TranslateError:
                    key = None
                if key is not None:
                    self.items.pop(key, None)
                    self._reported.pop(key, None)
            else:
                key, value = self._translate(obj, previous=self.items)
                if key is not None and value is not None:
                    if _identical(self.items.get(key), value):
                        # A change we do not read (a status timestamp, a condition we ignore): no rebuild
                        # of the model, and no re-check of every open connection in the tunnel.
                        if isinstance(rv, str) and rv:
                            self.rv = rv
                        self.error = None
                        return
                    self.items[key] = value
                elif key is not None:  # no longer applies (e.g. a policy now bound to a waypoint)
                    self.items.pop(key, None)
            if isinstance(rv, str) and rv:
                self.rv = rv
            self.error = None
        self.owner._changed(self)

    def _translate(self, obj: Mapping[str, Any], previous: Mapping[str, T] | None) -> tuple[str | None, T | None]:
        try:
            key = translate.object_key(obj)
        except translate.TranslateError as exc:
            log.error("%s: ignoring an object: %s", self.name, exc)
            return None, None
        try:
            value = self._convert(obj)
        except (translate.TranslateError, ValueError) as exc:
            kept = previous.get(key) if previous is not None else None
            uid = (obj.get("metadata") or {}).get("uid")
            if kept is not None and uid and getattr(kept, "uid", uid) != uid:
                kept = None  # deleted and made again under the same name: the old one's version is no stand-in
            self._report(key, f"{exc}; {'keeping its previous version' if kept is not None else 'ignored'}")
            return key, kept
        return key, value

    def _report(self, key: str, problem: str) -> None:
        if self._reported.get(key) != problem:
            self._reported[key] = problem
            log.error("%s: %s", self.name, problem)

    def interrupt(self) -> None:
        resp = self._resp
        if resp is not None:
            # best effort: the thread is a daemon and the watch times out anyway
            with contextlib.suppress(Exception):
                resp.shutdown()


class KubeSource:
    """Pods, namespaces and (optionally) services and Istio policies, kept in sync with the API server."""

    def __init__(
        self,
        api: kubernetes.client.ApiClient,
        *,
        node: str | None = None,
        services: bool = True,
        policies: bool = True,
        cluster_name: str = "kubernetes",
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        on_change: Callable[[], None] | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        watch_timeout: int = DEFAULT_WATCH_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.node = node
        self.cluster_name = cluster_name
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.synced = threading.Event()
        self._on_change = on_change
        self._version = 0
        self._built: tuple[int, Inventory] | None = None
        self._built_policies: tuple[int, PolicySet] | None = None
        self._policy_version = 0

        core = kubernetes.client.CoreV1Api(api)
        custom = kubernetes.client.CustomObjectsApi(api)
        group, version = ISTIO_SECURITY
        self._pods: _Reflector[Pod] = _Reflector(
            self,
            "pods",
            core.list_pod_for_all_namespaces,
            translate.pod,
            {"field_selector": f"spec.nodeName={node}"} if node else {},
        )
        self._namespaces: _Reflector[Namespace] = _Reflector(
            self, "namespaces", core.list_namespace, translate.namespace, {}
        )
        self._reflectors: list[_Reflector[Any]] = [self._pods, self._namespaces]
        self._services: _Reflector[Service] | None = None
        self._policy_reflectors: list[_Reflector[Policy | PeerAuthentication]] = []
        if services:
            self._services = _Reflector(self, "services", core.list_service_for_all_namespaces, translate.service, {})
            self._reflectors.append(self._services)
        if policies:
            for plural in ("authorizationpolicies", "peerauthentications"):
                call = _custom_lister(custom, group, version, plural)
                reflector: _Reflector[Policy | PeerAuthentication] = _Reflector(
                    self, f"{plural}.{group}", call, self._convert_policy, {}, not_found=ISTIO_CRDS_MISSING
                )
                self._policy_reflectors.append(reflector)
                self._reflectors.append(reflector)

    # --- life cycle ------------------------------------------------------------------------------------

    def start(self) -> KubeSource:
        for r in self._reflectors:
            r.thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self.stopping.set()
        for r in self._reflectors:
            r.interrupt()
        for r in self._reflectors:
            if r.thread.is_alive():
                r.thread.join(timeout)

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self.synced.wait(timeout)

    # --- snapshots -------------------------------------------------------------------------------------

    def current(self) -> Inventory:
        """The inventory as of the last applied event (the same object until something changes)."""
        with self.lock:
            if self._built is not None and self._built[0] == self._version:
                return self._built[1]
            version = self._version
            pods = list(self._pods.items.values())
            namespaces = list(self._namespaces.items.values())
            services = list(self._services.items.values()) if self._services else []
        inventory = translate.inventory(
            pods=pods,
            namespaces=namespaces,
            services=services,
            nodes=(self.node,) if self.node else (),
            cluster_name=self.cluster_name,
            trust_domain=self.trust_domain,
        )
        with self.lock:
            if self._built is None or self._built[0] < version:
                self._built = (version, inventory)
        return inventory

    def policies(self) -> PolicySet:
        with self.lock:
            if self._built_policies is not None and self._built_policies[0] == self._policy_version:
                return self._built_policies[1]
            version = self._policy_version
            values = [v for r in self._policy_reflectors for v in r.items.values()]
        result = translate.policy_set(values, self.root_namespace)
        with self.lock:
            self._built_policies = (version, result)
        return result

    def pods_on(self, node: str) -> tuple[Pod, ...]:
        """Pods on `node` now (the CA's node authorization)."""
        with self.lock:
            return tuple(p for p in self._pods.items.values() if p.node == node)

    def node_of_pod(self, namespace: str, name: str, uid: str) -> str | None:
        """The node the pod `namespace/name` with this UID is scheduled on, or None (unknown, another UID,
        not scheduled): the CA's caller node when the token does not name it (Kubernetes < 1.30)."""
        with self.lock:
            pod = self._pods.items.get(f"{namespace}/{name}")
        return pod.node if pod is not None and pod.uid == uid else None

    @property
    def error(self) -> str | None:
        """Why the local copy may be stale (the last failed call of each resource), or None."""
        with self.lock:
            problems = [r.error for r in self._reflectors if r.error]
        return "; ".join(problems) if problems else None

    def stats(self) -> dict[str, ReflectorStats]:
        return {r.name: r.stats for r in self._reflectors}

    # --- internals -------------------------------------------------------------------------------------

    def _convert_policy(self, obj: Mapping[str, Any]) -> Policy | PeerAuthentication | None:
        result = translate.policy(obj, self.root_namespace)
        if result.problem is not None:
            log.error("%s", result.problem)
        return result.value

    def _changed(self, reflector: _Reflector[Any] | None) -> None:
        """`reflector` changed its items (None: only its error changed)."""
        with self.lock:
            if reflector is not None:
                if reflector in self._policy_reflectors:
                    self._policy_version += 1
                else:
                    self._version += 1
            if not self.synced.is_set() and all(r.synced for r in self._reflectors):
                log.info(
                    "kubernetes source synced: %s", ", ".join(f"{len(r.items)} {r.name}" for r in self._reflectors)
                )
                self.synced.set()
        if self._on_change is not None and self.synced.is_set():
            self._on_change()


def _custom_lister(
    api: kubernetes.client.CustomObjectsApi, group: str, version: str, plural: str
) -> Callable[..., Any]:
    def call(**kwargs: Any) -> Any:
        return api.list_cluster_custom_object(group, version, plural, **kwargs)

    return call


def read_token(path: Path) -> str:
    """A projected service-account token, re-read on every call (the kubelet rotates the file)."""
    return path.read_text().strip()


def kube_tunnel_source(
    kubeconfig: Path | None, context: str | None, trust_domain: str, sync_timeout: float | None = None
) -> tuple[Callable[[], Inventory], Callable[[], PolicySet]]:
    """The tunnel's inventory and policies from the API server, after a complete first sync.

    Waiting matters: a tunnel serving before the policies are listed would allow what they deny.
    """
    source = KubeSource(api_client(kubeconfig, context), trust_domain=trust_domain).start()
    while not source.wait_synced(10.0 if sync_timeout is None else sync_timeout):
        if sync_timeout is not None:
            source.stop(timeout=0)
            raise KubeConfigError(f"no complete list from the API server in {sync_timeout} s: {source.error}")
        log.warning("waiting for the API server before serving: %s", source.error or "still listing")
    return source.current, source.policies
