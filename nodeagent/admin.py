"""The node-local admin HTTP endpoints: /config_dump, /metrics and /healthz/ready.

Why this module exists: operators and `nodeagent inspect` read what a node's processes hold (ztunnel's
admin port 15000 shape) without attaching a debugger. Subsystems register *providers* — a name and a
callable returning JSON-able data, e.g. the certificate manager's `certificates` section — and
readiness checks (a callable returning None when ready or what is pending). The admin server only
assembles and serves them.

Each instance serves the routes it is built with (`routes=`), like ztunnel's ports: the tunnel's
localhost admin port (15000) serves /config_dump and /healthz/ready, the Prometheus port (15020, on all
addresses) only /metrics (also as /stats/prometheus, the path Istio's scrape configurations use), the
readiness port (15021) only /healthz/ready. Anything else is a 404, so the config dump (workloads,
certificates, connections) is never reachable on a pod-facing port.

/metrics is reachable from every pod on the node and shares the event loop with the data plane, so a
render never runs on the loop: scrape hooks (e.g. the tunnel adding the bytes of open connections to its
counters) run first, the text is rendered on one worker thread, one render at a time, and requests
share it: each gets a render that began after it arrived (never stale data), so a burst of any size
costs at most two renders, and the loop only hands the interpreter over between a render's slices.

The one write is ztunnel's `POST /logging?level=...` (localhost ports only): `level=debug` sets the
process's level for every logger — as in ztunnel, a bare level replaces the named ones too, so
`level=off` also silences the access log, which the tunnel otherwise keeps at INFO —,
`level=nodeagent.access=warn,nodeagent.ztunnel=debug` sets named loggers, `reset` puts back the levels
the process started with; the answer lists the levels now in force.

What it deliberately does not do: no other writes, no TLS or authentication (bind it to localhost), no
keep-alive or HTTP/1.1 pipelining: one bounded request per connection, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8 * 1024
REQUEST_TIMEOUT = 5.0
BIND_RETRY_S = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


CONFIG_DUMP = "/config_dump"
METRICS = "/metrics"
METRICS_ALIAS = "/stats/prometheus"  # Istio's scrape path; served wherever METRICS is
READY = "/healthz/ready"
LOGGING = "/logging"
ALL_ROUTES = frozenset({CONFIG_DUMP, METRICS, READY, LOGGING})
# ztunnel's level names (tracing's) and Python's; `trace` is Python's DEBUG, `off` silences.
LOG_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 1,
}
RESET = "reset"
DAEMON_LOG_LEVELS = ("debug", "info", "warning", "error")  # a daemon's --log-level


def use_log_level(name: str) -> None:
    """A daemon's `--log-level` (agent, tunnel): the process's level, as ztunnel's RUST_LOG=info by default.
    The CLI's `-v`/`-vv` may only lower it (more detail), never raise it: `nodeagent -vv tunnel` debugs."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    requested = LOG_LEVELS[name.lower()]
    verbose = logging.NOTSET < root.level < logging.WARNING  # the CLI's WARNING, lowered by -v
    root.setLevel(min(requested, root.level) if verbose else requested)


def parse_endpoint(text: str) -> tuple[str, int]:
    """A daemon's endpoint option (`--metrics`, `--admin`, ...): `host:port` or `:port` (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port or :port")
    return (host.strip("[]") or "0.0.0.0", int(port))


class ListenError(OSError):
    """An address that cannot be listened on; str() is the message alone, without OSError's `[Errno N]`."""

    def __str__(self) -> str:
        return str(self.strerror)


def listen_error(host: str, port: int, exc: OSError) -> ListenError:
    """`exc`, raised listening on host:port, as one line naming the address, the cause and what to do; the
    errno is kept, so a caller can still tell an address in use (which frees up) from the others."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return ListenError(
            exc.errno,
            f"cannot listen on {where}: cannot resolve {host!r} ({exc.strerror}); give an IP "
            "address of this host, or 0.0.0.0 for all of them",
        )
    hints = {
        errno.EADDRINUSE: "another process listens there; stop it or choose another port",
        errno.EADDRNOTAVAIL: f"{host} is not an address of this host (or of this network namespace); give one of "
        "its addresses, 127.0.0.1, or 0.0.0.0 for all of them",
        errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE; choose a higher port",
    }
    cause = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = hints.get(exc.errno or 0)
    return ListenError(exc.errno, f"cannot listen on {where}: {cause}" + (f"; {hint}" if hint else ""))


class LogLevelError(ValueError):
    pass


def parse_log_levels(query: str) -> dict[str, int] | str:
    """The levels a /logging query asks for (logger name -> level; "" is the root logger), or RESET.

    `level=info`, `level=nodeagent.access=warn,nodeagent=debug` (names under `nodeagent` or the root), or
    `reset`. Raises LogLevelError saying what is accepted."""
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    if set(params) == {RESET}:
        return RESET
    if set(params) != {"level"} or len(params["level"]) != 1:
        raise LogLevelError("send level=LEVEL, level=LOGGER=LEVEL[,...] or reset")
    levels: dict[str, int] = {}
    for item in params["level"][0].split(","):
        name, _, level = item.strip().rpartition("=")
        if level.lower() not in LOG_LEVELS:
            raise LogLevelError(f"unknown level {level!r}; use one of {', '.join(LOG_LEVELS)}")
        if name and name != "nodeagent" and not name.startswith("nodeagent."):
            raise LogLevelError(f"logger {name!r} is not nodeagent's; name one under nodeagent")
        levels[name] = LOG_LEVELS[level.lower()]
    return levels


_initial_levels: dict[str, int] = {}  # levels before the first /logging change, for `reset`


def apply_log_levels(request: dict[str, int] | str) -> str:
    """Set (or reset) logger levels; returns the levels now in force, one `name=LEVEL` per line."""
    if request == RESET:
        for name, level in _initial_levels.items():
            logging.getLogger(name or None).setLevel(level)
    else:
        assert not isinstance(request, str)
        if "" in request:  # the process's level: named loggers follow it unless named here too
            for name, logger in list(logging.root.manager.loggerDict.items()):
                if isinstance(logger, logging.Logger) and name.startswith("nodeagent") and logger.level:
                    _initial_levels.setdefault(name, logger.level)
                    logger.setLevel(logging.NOTSET)
        for name, level in request.items():
            logger = logging.getLogger(name or None)
            _initial_levels.setdefault(name, logger.level)
            logger.setLevel(level)
    names = sorted({"", *_initial_levels})
    return "".join(
        f"{name or 'root'}={logging.getLevelName(logging.getLogger(name or None).getEffectiveLevel())}\n"
        for name in names
    )


def endpoint_name(routes: Iterable[str]) -> str:
    """What the log calls an instance serving `routes`, e.g. `metrics endpoint (/metrics)`: a process runs
    several (the tunnel's admin, metrics and readiness ports), and "admin endpoint" for each of them left
    the reader to guess which port is which."""
    served = frozenset(routes)
    if served & {CONFIG_DUMP, LOGGING}:
        kind = "admin"
    elif METRICS in served:
        kind = "metrics"
    else:
        kind = "readiness"
    return f"{kind} endpoint ({', '.join(sorted(served))})"


class AdminServer:
    def __init__(self, registry: CollectorRegistry | None = None, routes: Iterable[str] = ALL_ROUTES) -> None:
        """`routes`: which of CONFIG_DUMP, METRICS, READY and LOGGING this instance serves (others get 404)."""
        self.routes = frozenset(routes)
        unknown = self.routes - ALL_ROUTES
        if unknown:
            raise ValueError(f"unknown admin routes {sorted(unknown)}; choose from {sorted(ALL_ROUTES)}")
        if METRICS in self.routes and registry is None:
            raise ValueError(f"serving {METRICS} needs a metrics registry")
        self.name = endpoint_name(self.routes)
        self._registry = registry
        self._providers: dict[str, Callable[[], Any]] = {}
        self._async_providers: dict[str, Callable[[], Awaitable[Any]]] = {}
        self._checks: dict[str, Callable[[], str | None]] = {}
        self._scrape_hooks: list[Callable[[], None]] = []
        self._render: tuple[asyncio.Future[bytes], float] | None = None  # the render in flight, when it began
        self._executor: ThreadPoolExecutor | None = None
        self._servers: list[asyncio.Server] = []

    def add_config_provider(self, name: str, provider: Callable[[], Any]) -> None:
        """`provider()` becomes the `name` section of /config_dump."""
        if name in self._providers:
            raise ValueError(f"config_dump section {name!r} is already provided")
        self._providers[name] = provider

    def add_async_config_provider(self, name: str, provider: Callable[[], Awaitable[Any]]) -> None:
        """`await provider()` becomes the `name` section: for a section built with I/O at request time."""
        if name in self._providers or name in self._async_providers:
            raise ValueError(f"config_dump section {name!r} is already provided")
        self._async_providers[name] = provider

    async def config_dump_async(self) -> dict[str, Any]:
        """config_dump() plus the async providers' sections (a failing one reports its error in place)."""
        dump = self.config_dump()
        for name, provider in self._async_providers.items():
            try:
                dump[name] = await provider()
            except Exception as exc:
                log.exception("config_dump provider %s failed", name)
                dump[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return dump

    def add_scrape_hook(self, hook: Callable[[], None]) -> None:
        """`hook()` runs on the event loop before each /metrics render: bring counters up to date."""
        self._scrape_hooks.append(hook)

    async def metrics_text(self) -> bytes:
        """The registry in Prometheus' text format, from a render that began after this call: off the loop,
        one at a time, shared by every request that arrived before it began."""
        assert self._registry is not None  # checked in __init__
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        while self._render is not None:
            render, began = self._render
            if began >= arrived:
                return await asyncio.shield(render)
            with contextlib.suppress(Exception):  # an older render: wait for it (one at a time), then ours
                await asyncio.shield(render)
        for hook in self._scrape_hooks:
            try:
                hook()
            except Exception:
                log.exception("metrics scrape hook %r failed", hook)
        if self._executor is None:  # its own thread: the default executor may be busy with slow work
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-render")
        render = loop.run_in_executor(self._executor, generate_latest, self._registry)
        self._render = (render, loop.time())
        render.add_done_callback(self._rendered_done)
        return await asyncio.shield(render)

    def _rendered_done(self, render: asyncio.Future[bytes]) -> None:
        if self._render is not None and self._render[0] is render:
            self._render = None

    def add_readiness_check(self, name: str, check: Callable[[], str | None]) -> None:
        """`check()` returns None when ready, else a short description of what is pending."""
        self._checks[name] = check

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (0 picks a port); returns the bound address. A failure is an OSError saying
        what to do (listen_error), with the errno of the cause."""
        try:
            server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_HEAD)
        except OSError as exc:
            raise listen_error(host, port, exc) from None
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        log.info("%s on http://%s:%d", self.name, bound[0], bound[1])
        return bound[0], bound[1]

    async def start_unix(self, path: str) -> None:
        """Also serve the same routes on a unix socket at `path` (a stale socket there is replaced; any
        other file is an error). Why: on hostNetwork the node's TCP ports are shared with a rolling
        update's other pod, so only a file in the pod's own volume answers for this process alone — what
        a kubelet exec probe (`curl --unix-socket`) needs."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket; remove it or choose another path")
            os.unlink(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._servers.append(await asyncio.start_unix_server(self._handle, path, limit=MAX_REQUEST_HEAD))
        log.info("%s on unix:%s", self.name, path)

    async def start_when_free(self, host: str, port: int, what: str) -> tuple[str, int]:
        """start(), retrying every BIND_RETRY_S while the address is taken: on hostNetwork a rolling update's
        old pod holds the node's ports until it stops, and an endpoint must never keep the data plane from
        starting. Any other bind error is raised."""
        retry_s = BIND_RETRY_S
        warned = False
        while True:
            try:
                return await self.start(host, port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if not warned:
                    log.warning("%s: %s; retrying every %.0f s", what, exc.strerror, retry_s)
                    warned = True
            await asyncio.sleep(retry_s)

    async def stop(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
            await server.wait_closed()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def config_dump(self) -> dict[str, Any]:
        dump: dict[str, Any] = {}
        for name, provider in self._providers.items():
            try:
                dump[name] = provider()
            except Exception as exc:
                log.exception("config_dump provider %s failed", name)
                dump[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return dump

    def readiness(self) -> list[str]:
        """What is pending (empty when ready)."""
        pending = []
        for name, check in self._checks.items():
            try:
                problem = check()
            except Exception as exc:
                problem = f"check failed: {exc!r}"
            if problem:
                pending.append(f"{name}: {problem}")
        return pending

    async def respond(self, method: str, target: str) -> tuple[int, str, bytes]:
        """route(), plus the answers built with awaits: /metrics and a config dump with async sections."""
        path = target.partition("?")[0]
        if method == "GET" and path in (METRICS, METRICS_ALIAS) and METRICS in self.routes:
            return 200, CONTENT_TYPE_LATEST, await self.metrics_text()
        if method == "GET" and path == CONFIG_DUMP and path in self.routes and self._async_providers:
            dump = await self.config_dump_async()
            return 200, "application/json", json.dumps(dump, indent=2, sort_keys=True).encode()
        return self.route(method, target)

    def route(self, method: str, target: str) -> tuple[int, str, bytes]:
        """Status, content type and body for one request (pure apart from the providers it calls and, for
        POST /logging, the logging levels it sets); respond() serves GET /metrics."""
        path, _, query = target.partition("?")
        if path == METRICS_ALIAS and METRICS in self.routes:
            path = METRICS
        if path not in self.routes:
            return 404, "text/plain", f"unknown path; this port serves {', '.join(sorted(self.routes))}\n".encode()
        if path == LOGGING:
            if method != "POST":
                return 405, "text/plain", b"only POST is supported: POST /logging?level=LEVEL\n"
            try:
                return 200, "text/plain", apply_log_levels(parse_log_levels(query)).encode()
            except LogLevelError as exc:
                return 400, "text/plain", f"{exc}\n".encode()
        if method != "GET":
            return 405, "text/plain", b"only GET is supported\n"
        if path == CONFIG_DUMP:
            return 200, "application/json", json.dumps(self.config_dump(), indent=2, sort_keys=True).encode()
        assert path != METRICS, "respond() serves /metrics, off the event loop"
        pending = self.readiness()
        if pending:
            return 500, "text/plain", ("not ready\n" + "\n".join(pending) + "\n").encode()
        return 200, "text/plain", b"ready\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                status, ctype, body = 400, "text/plain", b"malformed request line\n"
            else:
                status, ctype, body = await self.respond(parts[0], parts[1])
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
