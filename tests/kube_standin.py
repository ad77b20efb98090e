"""An HTTP-level Kubernetes API-server stand-in for the integration and privileged tiers.

Why this exists: no API server can run on these machines, yet the Kubernetes workload source, the pod
status writer, `nodeagent enroll` and the CA's TokenReview must be tested through the real `kubernetes`
client. This server speaks the subset of the API they use, with the semantics that matter:

- one global resourceVersion counter (like etcd); lists answer with it in `metadata.resourceVersion`;
  `limit`/`continue` chunking over a consistent snapshot;
- watch (`?watch=1&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S`): a chunked HTTP/1.1
  stream of JSON lines ADDED / MODIFIED / DELETED / BOOKMARK, every event after N; a resourceVersion
  older than the compaction horizon gets the API server's answer — a 200 stream holding one ERROR event
  with a 410 Status ("too old resource version"); `timeoutSeconds` ends the stream cleanly;
- `fieldSelector=spec.nodeName=X` on pods (lists and watches), namespaced and cluster-wide paths;
- PATCH (merge patch, strategic merge patch treated as merge patch, JSON patch) on namespaces and pods,
  and on pods/status (metadata and status only, like the real subresource);
- POST tokenreviews answered from `self.tokens`;
- `serve_in_netns()`: the same server also listening inside a network namespace (the lab's API server
  on a node's fabric address, reached by agents running in the node namespaces);
- test controls: `compact()` (every older RV now 410s), `drop_watches()` (close open streams mid-way
  without the terminating chunk), `hold_watches()` (new watch requests wait until released, so changes
  made meanwhile happen while no client is watching), `bookmark()`, `fail(...)` (status codes, RBAC 403
  Status objects or garbage bodies for the next N matching requests), and a request log.

- RBAC, when `rbac` is set (an `Rbac` of daemonset/rbac.yaml's Roles, ClusterRoles and bindings): the
  bearer token names the user (`users`), each request is turned into the API server's request attributes
  (verb, API group, resource/subresource, namespace) and answered with the API server's 403 Status unless a
  bound rule allows it; `authorized` records every (user, attributes) checked, `denied` those refused.

What it deliberately does not do: no admission, no label selectors, no server-side apply, no protobuf, no
exec or attach, no RBAC aggregation or resourceNames. Two narrow additions:
- `labelSelector` on lists, equality terms only (`a=b,c=d`): what `nodeagent inspect --node` sends to
  find the DaemonSet's pod;
- pods/portforward over a websocket (`serve_portforward`): the channel protocol of the kubelet
  (v4.channel.k8s.io), really connected to the pod's port — like the kubelet, on 127.0.0.1 inside the
  pod's network namespace (`pod_netns`: pod IP -> netns, for the lab's nodes), or through `forwards`
  to a local address when the "pod" is a process of the test.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes.client
import wsproto
import wsproto.events

# kind -> (API prefix, plural, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Pod": ("/api/v1", "pods", True),
    "Namespace": ("/api/v1", "namespaces", False),
    "Service": ("/api/v1", "services", True),
    "Node": ("/api/v1", "nodes", False),
    "AuthorizationPolicy": ("/apis/security.istio.io/v1", "authorizationpolicies", True),
    "PeerAuthentication": ("/apis/security.istio.io/v1", "peerauthentications", True),
}
_PLURAL = {plural: kind for kind, (_, plural, _) in RESOURCES.items()}
_API_VERSION = {"Pod": "v1", "Namespace": "v1", "Service": "v1", "Node": "v1"}

_PORTFORWARD = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/portforward$")
_PATH = re.compile(
    r"^(?P<prefix>/api/v1|/apis/[a-z0-9.-]+/v[0-9a-z]+)"
    r"(?:/namespaces/(?P<ns>[^/]+)(?=/))?"
    r"/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?$"
)


@dataclass
class Failure:
    method: str
    path: re.Pattern[str]
    status: int
    body: bytes
    remaining: int


@dataclass
class _Event:
    rv: int
    kind: str
    type: str
    obj: dict[str, Any]


@dataclass
class _Watcher:
    kind: str
    namespace: str | None
    node: str | None
    conn: socket.socket
    dropped: threading.Event = field(default_factory=threading.Event)
    expired: bool = False


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def forbidden(kind: str, user: str = "system:serviceaccount:nodeagent-system:nodeagent") -> bytes:
    plural = RESOURCES[kind][1]
    message = f'{plural} is forbidden: User "{user}" cannot list resource "{plural}" at the cluster scope'
    return json.dumps(status_body(403, "Forbidden", message)).encode()


class KubeStandIn:
    def __init__(self, bookmark_interval: float = 1.0) -> None:
        self._lock = threading.Condition()
        self._rv = 1
        self._horizon = 0  # watches from an RV below this get 410 Gone
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in RESOURCES}
        self._events: list[_Event] = []
        self._watchers: list[_Watcher] = []
        self._failures: list[Failure] = []
        self.bookmark_interval = bookmark_interval
        self.tokens: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path with query)
        self.rbac: Rbac | None = None  # set: requests are authorized (users: bearer token -> user name)
        self.users: dict[str, str] = {}
        self.authorized: list[tuple[str, RequestAttributes]] = []  # (user, attributes) of every check
        self.denied: list[tuple[str, RequestAttributes]] = []
        self.patches: list[tuple[str, Any]] = []  # (path, body) of every PATCH
        self._held = False  # hold_watches(): new watch requests wait
        self.held_watches = 0  # how many watch requests wait right now
        self._netns_servers: list[ThreadingHTTPServer] = []
        # (pod IP, port) -> the address a pods/portforward connection really reaches (pods are local here)
        self.forwards: dict[tuple[str, int], tuple[str, int]] = {}
        # pod IP -> a network namespace: port-forward dials 127.0.0.1:port inside it, as the kubelet does
        self.pod_netns: dict[str, str] = {}
        outer = self

        class Handler(_Handler):
            server_ref = outer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kube-standin", daemon=True)
        self._thread.start()

    # --- client side -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def api_client(self, token: str | None = None) -> kubernetes.client.ApiClient:
        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        if token is not None:
            configuration.api_key = {"authorization": f"Bearer {token}"}
        return kubernetes.client.ApiClient(configuration)

    def kubeconfig(self, path: str, server: str | None = None, token: str = "test-token") -> str:
        """Write a kubeconfig pointing at this server (or at `server`, a URL of serve_in_netns); returns the path."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": server or self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "tester"}}],
            "current-context": "standin",
        }
        with open(path, "w") as f:
            json.dump(doc, f)
        return path

    def close(self) -> None:
        self.release_watches()
        self.drop_watches()
        for httpd in [self.httpd, *self._netns_servers]:
            httpd.shutdown()
            httpd.server_close()

    def serve_in_netns(self, netns: str, host: str, port: int = 0) -> str:
        """Also listen on host:port inside network namespace `netns` (a name or path); returns its URL."""
        from nodeagent.netns import in_netns

        sock = in_netns(netns, lambda: socket.create_server((host, port)))
        httpd = ThreadingHTTPServer(sock.getsockname(), self.httpd.RequestHandlerClass, bind_and_activate=False)
        httpd.socket.close()
        httpd.socket = sock
        httpd.server_address = sock.getsockname()
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, name=f"kube-standin-{netns}", daemon=True).start()
        self._netns_servers.append(httpd)
        return f"http://{host}:{httpd.server_address[1]}"

    # --- store -----------------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (ADDED or MODIFIED event); fills uid, resourceVersion, apiVersion."""
        kind = obj["kind"]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not RESOURCES[kind][2]:
            meta.pop("namespace", None)
        key = (meta.get("namespace", ""), meta["name"])
        obj.setdefault("apiVersion", _API_VERSION.get(kind, "security.istio.io/v1"))
        with self._lock:
            old = self._objects[kind].get(key)
            meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
            return self._commit(kind, key, obj, "MODIFIED" if old else "ADDED")

    def delete(self, kind: str, name: str, namespace: str = "") -> None:
        with self._lock:
            old = self._objects[kind].pop((namespace, name))
            self._rv += 1
            old = copy.deepcopy(old)
            old["metadata"]["resourceVersion"] = str(self._rv)
            self._events.append(_Event(self._rv, kind, "DELETED", old))
            self._lock.notify_all()

    def get(self, kind: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        with self._lock:
            obj = self._objects[kind].get((namespace, name))
            return copy.deepcopy(obj) if obj else None

    def objects(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(o) for o in self._objects[kind].values()]

    def _commit(self, kind: str, key: tuple[str, str], obj: dict[str, Any], type_: str) -> dict[str, Any]:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[kind][key] = obj
        self._events.append(_Event(self._rv, kind, type_, obj))
        self._lock.notify_all()
        return copy.deepcopy(obj)

    # --- test controls ---------------------------------------------------------------------------------

    def compact(self, expire_open_watches: bool = False) -> None:
        """Forget history: every watch from an RV before now gets 410 Gone. With `expire_open_watches`,
        open watches get that ERROR event too and end (as when the API server's watch cache falls behind)."""
        with self._lock:
            self._horizon = self._rv
            if expire_open_watches:
                for w in self._watchers:
                    w.expired = True
                self._lock.notify_all()

    def drop_watches(self) -> int:
        """Close every open watch stream abruptly (no terminating chunk); returns how many."""
        with self._lock:
            watchers, self._watchers = self._watchers, []
            self._lock.notify_all()
        for w in watchers:
            w.dropped.set()
            with contextlib.suppress(OSError):
                w.conn.shutdown(socket.SHUT_RDWR)
        return len(watchers)

    def hold_watches(self) -> None:
        """From now on new watch requests wait (before their first byte) until release_watches()."""
        with self._lock:
            self._held = True

    def release_watches(self) -> None:
        with self._lock:
            self._held = False
            self._lock.notify_all()

    def _wait_unheld(self) -> None:
        with self._lock:
            if not self._held:
                return
            self.held_watches += 1
            try:
                while self._held:
                    self._lock.wait()
            finally:
                self.held_watches -= 1

    def watch_count(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._watchers if kind is None or w.kind == kind)

    def bookmark(self) -> None:
        with self._lock:
            self._events.append(_Event(self._rv, "*", "BOOKMARK", {}))
            self._lock.notify_all()

    def fail(
        self,
        path: str,
        status: int = 500,
        body: bytes | None = None,
        times: int = 1,
        method: str = "GET",
    ) -> None:
        """The next `times` requests whose path (with query) matches the regex `path` get this answer."""
        if body is None:
            body = json.dumps(status_body(status, "InternalError", "injected failure")).encode()
        with self._lock:
            self._failures.append(Failure(method, re.compile(path), status, body, times))

    def _take_failure(self, method: str, path: str) -> Failure | None:
        with self._lock:
            for f in self._failures:
                if f.method == method and f.remaining > 0 and f.path.search(path):
                    f.remaining -= 1
                    return f
        return None

    # --- list and watch --------------------------------------------------------------------------------

    def _select(self, kind: str, namespace: str | None, node: str | None) -> list[dict[str, Any]]:
        out = []
        for (ns, _), obj in sorted(self._objects[kind].items()):
            if namespace is not None and ns != namespace:
                continue
            if node is not None and (obj.get("spec") or {}).get("nodeName") != node:
                continue
            out.append(obj)
        return out

    def list(
        self, kind: str, namespace: str | None, node: str | None, limit: int | None, cont: str | None
    ) -> dict[str, Any]:
        with self._lock:
            if cont:
                rv, offset = (int(x) for x in base64.b64decode(cont).decode().split(":"))
                if rv < self._horizon:
                    raise _Gone("continue token expired")
                # a consistent snapshot: objects as they were at rv (approximated by the current ones
                # whose resourceVersion is <= rv: enough for chunked lists in tests)
                items = [o for o in self._select(kind, namespace, node) if int(o["metadata"]["resourceVersion"]) <= rv]
            else:
                rv, offset = self._rv, 0
                items = self._select(kind, namespace, node)
            chunk = items[offset : offset + limit] if limit else items[offset:]
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if limit and offset + limit < len(items):
                meta["continue"] = base64.b64encode(f"{rv}:{offset + limit}".encode()).decode()
            prefix, _, _ = RESOURCES[kind]
            return {
                "kind": f"{kind}List",
                "apiVersion": prefix.removeprefix("/apis/").removeprefix("/api/"),
                "metadata": meta,
                "items": copy.deepcopy(chunk),
            }

    def _watch_events(
        self, watcher: _Watcher, since: int, bookmarks: bool, deadline: float
    ) -> Iterator[dict[str, Any] | None]:
        """Yield watch events after `since`; None when the stream must end (timeout or drop)."""
        index = 0
        with self._lock:
            if since < self._horizon:
                yield {
                    "type": "ERROR",
                    "object": status_body(410, "Expired", f"too old resource version: {since} ({self._horizon})"),
                }
                return
            self._watchers.append(watcher)
        last_bookmark = time.monotonic()
        try:
            while True:
                with self._lock:
                    while True:
                        if watcher.dropped.is_set():
                            return
                        if watcher.expired:
                            pending = [_Event(self._rv, "*", "EXPIRED", {})]
                            break
                        pending = [
                            e
                            for e in self._events[index:]
                            if e.rv > since and (e.kind == watcher.kind or e.type == "BOOKMARK")
                        ]
                        index = len(self._events)
                        now = time.monotonic()
                        if pending or now >= deadline:
                            break
                        if bookmarks and now - last_bookmark >= self.bookmark_interval:
                            pending = [_Event(self._rv, "*", "BOOKMARK", {})]
                            break
                        self._lock.wait(timeout=min(0.1, max(0.0, deadline - now)))
                for e in pending:
                    if e.type == "EXPIRED":
                        yield {"type": "ERROR", "object": status_body(410, "Expired", "too old resource version")}
                        return
                    if e.type == "BOOKMARK":
                        if not bookmarks:
                            continue
                        last_bookmark = time.monotonic()
                        yield {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": watcher.kind,
                                "apiVersion": _API_VERSION.get(watcher.kind, "security.istio.io/v1"),
                                "metadata": {"resourceVersion": str(max(e.rv, since))},
                            },
                        }
                        continue
                    meta = e.obj["metadata"]
                    if watcher.namespace is not None and meta.get("namespace") != watcher.namespace:
                        continue
                    if watcher.node is not None and (e.obj.get("spec") or {}).get("nodeName") != watcher.node:
                        continue
                    yield {"type": e.type, "object": e.obj}
                if time.monotonic() >= deadline:
                    return
        finally:
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)

    # --- writes ----------------------------------------------------------------------------------------

    def patch(
        self, kind: str, namespace: str, name: str, body: Any, *, content_type: str, sub: str | None
    ) -> dict[str, Any]:
        with self._lock:
            old = self._objects[kind].get((namespace, name))
            if old is None:
                raise _NotFound(f'{RESOURCES[kind][1]} "{name}" not found')
            wanted_uid = (body.get("metadata") or {}).get("uid") if isinstance(body, dict) else None
            if wanted_uid is not None and wanted_uid != old["metadata"]["uid"]:
                current = old["metadata"]["uid"]
                raise _Conflict(
                    f"Precondition failed: UID in precondition: {wanted_uid}, UID in object meta: {current}"
                )
            new = copy.deepcopy(old)
            new = _json_patch(new, body) if "json-patch" in content_type else _merge_patch(new, body)
            if sub == "status":  # the subresource changes metadata and status, never spec
                new["spec"] = copy.deepcopy(old.get("spec"))
            new["metadata"]["name"], new["metadata"]["uid"] = old["metadata"]["name"], old["metadata"]["uid"]
            return self._commit(kind, (namespace, name), new, "MODIFIED")


class _Gone(Exception):
    pass


class _NotFound(Exception):
    pass


class _Conflict(Exception):
    pass


def _merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _json_patch(doc: Any, ops: Any) -> Any:
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent.setdefault(p, {}) if isinstance(parent, dict) else parent[int(p)]
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            parent[last] = op["value"]
        elif op["op"] == "remove":
            parent.pop(last, None)
        else:
            raise ValueError(f"unsupported JSON patch op {op['op']!r}")
    return doc


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_ref: KubeStandIn

    def log_message(self, *args: object) -> None:
        pass

    # --- plumbing --------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: Any) -> None:
        self._send(status, json.dumps(doc).encode())

    def _error(self, code: int, reason: str, message: str) -> None:
        self._json(code, status_body(code, reason, message))

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else None

    def _route(self, method: str) -> tuple[str, dict[str, str], re.Match[str] | None] | None:
        s = self.server_ref
        s.requests.append((method, self.path))
        if s.rbac is not None and not self._authorize(method):
            return None
        failure = s._take_failure(method, self.path)
        if failure is not None:
            if method != "GET" and self.headers.get("Content-Length"):
                self.rfile.read(int(self.headers["Content-Length"]))
            self._send(failure.status, failure.body)
            return None
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        return url.path, query, _PATH.match(url.path)

    def _authorize(self, method: str) -> bool:
        """The API server's authentication (bearer token -> user) and RBAC authorization, answered as it does."""
        s = self.server_ref
        assert s.rbac is not None
        auth = self.headers.get("Authorization", "")
        user = s.users.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None
        if user is None:
            if method != "GET" and self.headers.get("Content-Length"):
                self.rfile.read(int(self.headers["Content-Length"]))
            self._error(401, "Unauthorized", "Unauthorized")
            return False
        upgrade = self.headers.get("Upgrade", "").lower() == "websocket"
        for attributes in request_attributes(method, self.path, websocket=upgrade):
            s.authorized.append((user, attributes))
            if not s.rbac.allows(user, attributes):
                s.denied.append((user, attributes))
                if method != "GET" and self.headers.get("Content-Length"):
                    self.rfile.read(int(self.headers["Content-Length"]))
                self._error(403, "Forbidden", attributes.forbidden(user))
                return False
        return True

    # --- verbs -----------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        routed = self._route("GET")
        if routed is None:
            return
        path, query, m = routed
        forward = _PORTFORWARD.match(path)
        if forward is not None:
            serve_portforward(self, forward.group("ns"), forward.group("name"), query)
            return
        if m is None or m.group("plural") not in _PLURAL:
            self._error(404, "NotFound", f"the server could not find the requested resource ({path})")
            return
        kind = _PLURAL[m.group("plural")]
        s = self.server_ref
        if m.group("name"):
            obj = s.get(kind, m.group("name"), m.group("ns") or "")
            if obj is None:
                self._error(404, "NotFound", f'{m.group("plural")} "{m.group("name")}" not found')
            else:
                self._json(200, obj)
            return
        node = None
        selector = query.get("fieldSelector", "")
        if selector:
            if kind != "Pod" or not selector.startswith("spec.nodeName="):
                self._error(400, "BadRequest", f"field selector {selector!r} is not supported here")
                return
            node = selector.split("=", 1)[1]
        namespace = m.group("ns")
        if query.get("watch") in ("1", "true"):
            self._watch(kind, namespace, node, query)
            return
        limit = int(query["limit"]) if query.get("limit") else None
        try:
            doc = s.list(kind, namespace, node, limit, query.get("continue"))
        except _Gone as exc:
            self._error(410, "Expired", str(exc))
            return
        if query.get("labelSelector"):
            doc["items"] = select_labels(doc["items"], query["labelSelector"])
        self._json(200, doc)

    def _watch(self, kind: str, namespace: str | None, node: str | None, query: dict[str, str]) -> None:
        s = self.server_ref
        since = int(query.get("resourceVersion") or s.resource_version)
        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        watcher = _Watcher(kind, namespace, node, self.connection)
        s._wait_unheld()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in s._watch_events(watcher, since, bookmarks, time.monotonic() + timeout):
                if event is None:
                    break
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                self.wfile.flush()
            if watcher.dropped.is_set():
                self.close_connection = True
                return
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def do_PATCH(self) -> None:
        routed = self._route("PATCH")
        if routed is None:
            return
        path, _, m = routed
        if m is None or m.group("plural") not in _PLURAL or not m.group("name"):
            self._error(404, "NotFound", f"the server could not find the requested resource ({path})")
            return
        body = self._body()
        self.server_ref.patches.append((path, body))
        kind = _PLURAL[m.group("plural")]
        try:
            obj = self.server_ref.patch(
                kind,
                m.group("ns") or "",
                m.group("name"),
                body,
                content_type=self.headers.get("Content-Type", ""),
                sub=m.group("sub"),
            )
        except _NotFound as exc:
            self._error(404, "NotFound", str(exc))
            return
        except _Conflict as exc:
            self._error(409, "Conflict", str(exc))
            return
        self._json(200, obj)

    def do_POST(self) -> None:
        routed = self._route("POST")
        if routed is None:
            return
        path, _, _ = routed
        body = self._body()
        if path == "/apis/authentication.k8s.io/v1/tokenreviews":
            token = body["spec"]["token"]
            status = self.server_ref.tokens.get(token, {"authenticated": False, "error": "invalid bearer token"})
            self._json(201, {**body, "status": status})
            return
        self._error(404, "NotFound", f"the server could not find the requested resource ({path})")


# --- RBAC ------------------------------------------------------------------------------------------------

_CONNECT = {"portforward", "exec", "attach"}  # subresources reached by a websocket upgrade


@dataclass(frozen=True)
class RequestAttributes:
    """What the API server authorizes a resource request by (k8s.io/apiserver RequestInfo)."""

    verb: str
    group: str
    resource: str  # with its subresource: "pods/status"
    namespace: str  # "" at the cluster scope
    name: str = ""

    def forbidden(self, user: str) -> str:
        plural, _, sub = self.resource.partition("/")
        what = f'{plural} "{self.name}"' if self.name else plural
        scope = f'in the namespace "{self.namespace}"' if self.namespace else "at the cluster scope"
        resource = f'resource "{plural}"' + (f' with subresource "{sub}"' if sub else "")
        return f'{what} is forbidden: User "{user}" cannot {self.verb} {resource} in API group "{self.group}" {scope}'


def request_attributes(method: str, path_with_query: str, *, websocket: bool = False) -> list[RequestAttributes]:
    """The attributes one request is authorized by: GET of a collection is list (watch with ?watch), of one
    object get, POST create, PATCH patch, PUT update, DELETE delete. A websocket upgrade to pods/portforward
    (exec, attach) is a GET, authorized as `get` - and as `create` too by API servers that check the upgrade
    as what it does (AuthorizePodWebsocketUpgradeCreatePermission): both are required here."""
    url = urlsplit(path_with_query)
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    parts = url.path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        raise ValueError(f"not a resource path: {url.path}")
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    elif len(rest) == 2 and rest[0] == "namespaces":  # the namespace object itself
        namespace = rest[1]
    resource, name, sub = rest[0], (rest[1] if len(rest) > 1 else ""), (rest[2] if len(rest) > 2 else "")
    if method == "GET":
        verb = "get" if name else "watch" if query.get("watch", "").lower() in ("1", "true") else "list"
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
    full = f"{resource}/{sub}" if sub else resource
    found = [RequestAttributes(verb, group, full, namespace, name)]
    if websocket and sub in _CONNECT and verb == "get":
        found.append(RequestAttributes("create", group, full, namespace, name))
    return found


@dataclass(frozen=True)
class RbacRule:
    role: str  # "ClusterRole/x" or "Role/ns/x"
    index: int  # the rule's position in the role
    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]

    def matches(self, a: RequestAttributes) -> bool:
        return (
            (a.group in self.groups or "*" in self.groups)
            and (a.resource in self.resources or "*" in self.resources)
            and (a.verb in self.verbs or "*" in self.verbs)
        )


class Rbac:
    """RBAC as the API server evaluates it, over the Roles, ClusterRoles and bindings of some manifests:
    a ClusterRoleBinding grants its role everywhere, a RoleBinding only in its own namespace. Subjects are
    service accounts (user system:serviceaccount:NS:NAME) and users. No aggregation, no resourceNames."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.roles: dict[str, list[RbacRule]] = {}
        self.grants: list[tuple[str, str, str]] = []  # (user, role key, namespace or "" for everywhere)
        for doc in docs:
            kind, meta = doc.get("kind"), doc.get("metadata") or {}
            if kind in ("ClusterRole", "Role"):
                key = (
                    f"ClusterRole/{meta['name']}"
                    if kind == "ClusterRole"
                    else f"Role/{meta['namespace']}/{meta['name']}"
                )
                self.roles[key] = [
                    RbacRule(
                        key, i, frozenset(r.get("apiGroups") or ()), frozenset(r["resources"]), frozenset(r["verbs"])
                    )
                    for i, r in enumerate(doc.get("rules") or [])
                ]
        for doc in docs:
            kind, meta = doc.get("kind"), doc.get("metadata") or {}
            if kind in ("ClusterRoleBinding", "RoleBinding"):
                for subject in doc.get("subjects") or []:
                    self.bind(
                        subject_user(subject),
                        doc["roleRef"],
                        meta.get("namespace", "") if kind == "RoleBinding" else "",
                    )

    def bind(self, user: str, role_ref: dict[str, str], namespace: str = "") -> None:
        """Grant `role_ref` ({kind, name}) to `user`: in `namespace` only (a RoleBinding), or everywhere."""
        key = (
            f"ClusterRole/{role_ref['name']}"
            if role_ref["kind"] == "ClusterRole"
            else f"Role/{namespace}/{role_ref['name']}"
        )
        if key not in self.roles:
            raise KeyError(f"binding to {key}, which the manifests do not define")
        self.grants.append((user, key, namespace))

    def rules_for(self, user: str, a: RequestAttributes) -> list[RbacRule]:
        """Every bound rule that allows `a` to `user`."""
        return [
            rule
            for who, key, namespace in self.grants
            if who == user and (not namespace or namespace == a.namespace)
            for rule in self.roles[key]
            if rule.matches(a)
        ]

    def allows(self, user: str, a: RequestAttributes) -> bool:
        return bool(self.rules_for(user, a))


def subject_user(subject: dict[str, str]) -> str:
    if subject["kind"] == "ServiceAccount":
        return f"system:serviceaccount:{subject['namespace']}:{subject['name']}"
    return subject["name"]


# --- object builders used by tests --------------------------------------------------------------------


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"kind": "Namespace", "metadata": {"name": name, "labels": dict(labels or {})}}


def pod(
    name: str,
    ns: str,
    node: str,
    ip: str | None,
    *,
    sa: str = "default",
    labels: dict[str, str] | None = None,
    uid: str | None = None,
    phase: str = "Running",
    host_network: bool = False,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": dict(labels or {})}
    if uid:
        meta["uid"] = uid
    if annotations:
        meta["annotations"] = dict(annotations)
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    spec: dict[str, Any] = {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app", "image": "x"}]}
    if host_network:
        spec["hostNetwork"] = True
    return {"kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def service(
    name: str, ns: str, selector: dict[str, str], ports: list[tuple[int, int]], cluster_ip: str | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": selector,
        "ports": [{"port": p, "targetPort": t, "protocol": "TCP"} for p, t in ports],
    }
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def authorization_policy(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "AuthorizationPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}


# --- label selectors and pods/portforward -----------------------------------------------------------------


def select_labels(items: list[dict[str, Any]], selector: str) -> list[dict[str, Any]]:
    """Equality-based label selection (`a=b,c==d,e!=f`); anything else is not supported here."""
    terms = []
    for term in selector.split(","):
        key, op, value = re.fullmatch(r"\s*([^=!\s]+)\s*(==|=|!=)\s*(\S*)\s*", term).groups()  # type: ignore[union-attr]
        terms.append((key, op != "!=", value))
    return [
        o for o in items if all(((o["metadata"].get("labels") or {}).get(k) == v) == equal for k, equal, v in terms)
    ]


WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455
# What the kubelet's websocket port-forward accepts (pkg/kubelet/cri/streaming/portforward/websocket.go):
# the binary channel protocol (v4 and its unversioned name).
PORTFORWARD_PROTOCOLS = ("v4.channel.k8s.io", "channel.k8s.io")


def serve_portforward(handler: _Handler, namespace: str, name: str, query: dict[str, str]) -> None:
    """pods/portforward like the kubelet behind the API server: one TCP connection per requested port.

    After the 101, every port i gets channels 2i (data) and 2i+1 (error), each opened by a frame of the
    channel byte and the port as uint16 little-endian; data frames are the channel byte + bytes; a failed
    dial is reported as text on the error channel. The websocket closes when the pod's side does."""
    s = handler.server_ref
    pod_obj = s.get("Pod", name, namespace)
    if pod_obj is None:
        handler._error(404, "NotFound", f'pods "{name}" not found')
        return
    if handler.headers.get("Upgrade", "").lower() != "websocket" or not handler.headers.get("Sec-WebSocket-Key"):
        handler._error(400, "BadRequest", "Upgrade request required")
        return
    offered = [p.strip() for p in handler.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    protocol = next((p for p in offered if p in PORTFORWARD_PROTOCOLS), None)
    if protocol is None:
        handler._error(400, "BadRequest", f"none of the offered subprotocols {offered} is supported")
        return
    try:
        ports = [int(p) for p in query.get("ports", "").split(",")]
        if not all(0 < p < 65536 for p in ports):
            raise ValueError
    except ValueError:
        handler._error(400, "BadRequest", f"invalid ports {query.get('ports')!r}")
        return
    pod_ip = (pod_obj.get("status") or {}).get("podIP")
    if (pod_obj.get("status") or {}).get("phase") != "Running" or not pod_ip:
        handler._error(400, "BadRequest", f"pod {name} is not running")
        return
    key = handler.headers["Sec-WebSocket-Key"].strip()
    accept = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode()
    handler.send_response(101, "Switching Protocols")
    handler.send_header("Upgrade", "websocket")
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Sec-WebSocket-Accept", accept)
    handler.send_header("Sec-WebSocket-Protocol", protocol)
    handler.end_headers()
    handler.wfile.flush()
    handler.close_connection = True
    _PortForwardSession(handler, s, pod_obj, pod_ip, ports).run()


class _PortForwardSession:
    def __init__(
        self, handler: _Handler, standin: KubeStandIn, pod_obj: dict[str, Any], pod_ip: str, ports: list[int]
    ) -> None:
        self.handler = handler
        self.ws = wsproto.Connection(wsproto.ConnectionType.SERVER)
        self.send_lock = threading.Lock()
        self.pod = f"{pod_obj['metadata']['name']}, uid {pod_obj['metadata']['uid']}"
        self.targets: dict[int, socket.socket] = {}  # data channel -> connection to the pod's port
        self.ports = ports
        self.netns = standin.pod_netns.get(pod_ip)
        self.addresses = [
            standin.forwards.get((pod_ip, p), ("127.0.0.1", p) if self.netns else (pod_ip, p)) for p in ports
        ]
        self.closed = threading.Event()

    def send(self, event: wsproto.events.Event) -> None:
        with self.send_lock:
            if self.ws.state is wsproto.ConnectionState.OPEN or isinstance(event, wsproto.events.CloseConnection):
                with contextlib.suppress(OSError, wsproto.utilities.LocalProtocolError):
                    self.handler.connection.sendall(self.ws.send(event))

    def run(self) -> None:
        for i, port in enumerate(self.ports):
            prefix = port.to_bytes(2, "little")
            self.send(wsproto.events.BytesMessage(bytes([2 * i]) + prefix))
            self.send(wsproto.events.BytesMessage(bytes([2 * i + 1]) + prefix))
        for i, (port, address) in enumerate(zip(self.ports, self.addresses, strict=True)):
            try:
                conn = self._dial(address)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                message = (
                    f"error forwarding port {port} to pod {self.pod}: failed to connect to localhost:{port} "
                    f"inside namespace: dial tcp4 127.0.0.1:{port}: connect: {reason.lower()}"
                )
                self.send(wsproto.events.BytesMessage(bytes([2 * i + 1]) + message.encode()))
                self.close()
                return
            conn.settimeout(None)
            self.targets[2 * i] = conn
            threading.Thread(target=self._pump, args=(2 * i, conn), daemon=True, name="standin-pf").start()
        self._read_client()
        for conn in self.targets.values():
            with contextlib.suppress(OSError):
                conn.close()

    def _dial(self, address: tuple[str, int]) -> socket.socket:
        if self.netns is None:
            return socket.create_connection(address, timeout=5)
        from nodeagent.netns import in_netns

        return in_netns(self.netns, lambda: socket.create_connection(address, timeout=5))

    def _pump(self, channel: int, conn: socket.socket) -> None:
        """The pod's bytes -> data frames; its EOF ends the session (like the kubelet's)."""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            self.send(wsproto.events.BytesMessage(bytes([channel]) + data))

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.send(wsproto.events.CloseConnection(code=1000))

    def _read_client(self) -> None:
        rfile = self.handler.rfile  # may already hold bytes the client sent right after the handshake
        message = b""  # wsproto hands a long message over in parts; the channel byte leads only the first
        while True:
            try:
                data = rfile.read1(65536)  # type: ignore[attr-defined]
            except OSError:
                data = b""
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, wsproto.events.BytesMessage):
                    message += event.data
                    if not event.message_finished:
                        continue
                    target = self.targets.get(message[0]) if message else None
                    if target is not None and len(message) > 1:
                        with contextlib.suppress(OSError):
                            target.sendall(message[1:])
                    message = b""
                elif isinstance(event, wsproto.events.CloseConnection):
                    self.closed.set()
                    self.send(event.response())
                    return
                elif isinstance(event, wsproto.events.Ping):
                    self.send(event.response())
            if not data:
                return


def one_ambient_pod() -> KubeStandIn:
    """A stand-in holding namespace shop, labelled ambient, and its pod web-1 (uid-web-1) on node1."""
    server = KubeStandIn(bookmark_interval=0.2)
    server.apply(namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
    server.apply(pod("web-1", "shop", "node1", "10.1.0.5", sa="web", uid="uid-web-1"))
    return server
