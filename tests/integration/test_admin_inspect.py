"""The admin endpoint serving the certificate manager's state, read back by `nodeagent inspect certificates`;
which routes each admin port serves (the tunnel's 15000 / 15020 / 15021)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from identity_support import CART, FRONTEND, NODE1_TOKEN, start_ca
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from tunnel_harness import cluster

from nodeagent import admin as admin_module
from nodeagent.admin import (
    ALL_ROUTES,
    CONFIG_DUMP,
    LOGGING,
    METRICS,
    METRICS_ALIAS,
    READY,
    AdminServer,
)
from nodeagent.ca import commands
from nodeagent.ca.client import CAClient
from nodeagent.cli import main as cli_main
from nodeagent.metrics import CertManagerMetrics
from nodeagent.ztunnel.certs import CertificateManager, CertManagerInputs

GET_ROUTES = ALL_ROUTES - {LOGGING}  # /logging takes POST only


def _get(url: str, method: str = "GET") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _inspect(admin: str, output: str) -> str:
    parser = argparse.ArgumentParser()
    commands.register_inspect(parser.add_subparsers())
    args = parser.parse_args(["certificates", "--admin", admin, "-o", output])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return out.getvalue()


async def test_admin_serves_config_dump_metrics_and_readiness(tmp_path: Path) -> None:
    ca = start_ca(tmp_path / "ca")
    client = CAClient(ca.target, token=lambda: NODE1_TOKEN, bundle_pem=ca.bundle)
    registry = CollectorRegistry()
    manager = CertificateManager(
        CertManagerInputs(
            fetch=client.fetch,
            bundle_path=ca.store.bundle_path,
            metrics=CertManagerMetrics(registry),
        )
    )
    admin = AdminServer(registry)
    admin.add_config_provider("certificates", manager.config_dump)
    admin.add_readiness_check("certificates", manager.ready)
    host, port = await admin.start("127.0.0.1", 0)
    base = f"http://{host}:{port}"
    try:
        manager.set_local_workloads([FRONTEND, CART])
        status, _, body = await asyncio.to_thread(_get, base + "/healthz/ready")
        assert status == 500 and "first fetch" in body  # not started yet: pending

        await manager.start()
        for identity in (FRONTEND, CART):
            await asyncio.wait_for(manager.wait_available(identity), 10)
        status, _, body = await asyncio.to_thread(_get, base + "/healthz/ready")
        assert (status, body) == (200, "ready\n")

        status, ctype, body = await asyncio.to_thread(_get, base + "/config_dump")
        assert status == 200 and ctype == "application/json"
        dump = json.loads(body)["certificates"]
        assert {d["identity"] for d in dump} == {FRONTEND.uri, CART.uri}
        assert all(d["state"] == "Available" and len(d["certChain"]) == 1 for d in dump)

        status, _, body = await asyncio.to_thread(_get, base + "/metrics")
        assert status == 200 and 'nodeagent_cert_fetches_total{result="ok"} 2.0' in body

        assert (await asyncio.to_thread(_get, base + "/nope"))[0] == 404

        table = await asyncio.to_thread(_inspect, base, "table")
        lines = table.splitlines()
        assert lines[0].split("   ")[0].strip() == "CERTIFICATE NAME"
        assert len(lines) == 1 + 4  # two identities, each a leaf and a root
        leaf = manager.material(FRONTEND).leaf
        assert any(
            FRONTEND.uri in line and "Leaf" in line and format(leaf.serial_number, "x") in line for line in lines
        )
        as_json = json.loads(await asyncio.to_thread(_inspect, base, "json"))
        as_yaml = yaml.safe_load(await asyncio.to_thread(_inspect, base, "yaml"))
        assert as_json == as_yaml == dump
    finally:
        await admin.stop()
        await manager.stop()
        await client.close()
        ca.stop()


@pytest.mark.parametrize("request_bytes", [b"garbage\r\n\r\n", b"POST /metrics HTTP/1.1\r\n\r\n", b"x" * 20000])
async def test_admin_refuses_bad_requests(request_bytes: bytes) -> None:
    admin = AdminServer(CollectorRegistry())
    host, port = await admin.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request_bytes)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer == b"" or answer.split(b" ")[1] in (b"400", b"405")
        status, _, _ = await asyncio.to_thread(_get, f"http://{host}:{port}/healthz/ready")
        assert status == 200  # still serving; no readiness checks registered means ready
    finally:
        await admin.stop()


async def test_admin_serves_only_its_routes() -> None:
    registry = CollectorRegistry()
    servers = {
        "config": AdminServer(routes=[CONFIG_DUMP]),
        "metrics": AdminServer(registry, routes=[METRICS]),
        "all": AdminServer(registry),
    }
    bases = {}
    for name, server in servers.items():
        host, port = await server.start("127.0.0.1", 0)
        bases[name] = f"http://{host}:{port}"
    try:
        served = {
            name: {path for path in GET_ROUTES if (await asyncio.to_thread(_get, base + path))[0] == 200}
            for name, base in bases.items()
        }
        assert served == {"config": {CONFIG_DUMP}, "metrics": {METRICS}, "all": set(GET_ROUTES)}
        status, _, body = await asyncio.to_thread(_get, bases["metrics"] + CONFIG_DUMP)
        assert status == 404 and "this port serves /metrics" in body
    finally:
        for server in servers.values():
            await server.stop()


class _SlowCollector:
    """A registry collector that takes `delay` seconds to collect, and counts how often it is asked."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.calls += 1
        time.sleep(self.delay)
        yield GaugeMetricFamily("slow_collector_calls", "How often the slow collector was collected.", self.calls)


async def test_metrics_render_off_the_event_loop_once_for_concurrent_scrapes() -> None:
    """/metrics shares the tunnel's event loop and any pod can ask for it: a render never runs on the loop,
    concurrent scrapes share one render, a fresh render is served again; /stats/prometheus is an alias."""
    registry = CollectorRegistry()
    slow = _SlowCollector(0.3)
    registry.register(slow)
    hooks: list[int] = []
    server = AdminServer(registry, routes=[METRICS])
    server.add_scrape_hook(lambda: hooks.append(slow.calls))
    host, port = await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)

    tick = asyncio.create_task(ticker())
    try:

        async def scrape(path: str) -> bytes:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            answer = await reader.read()
            writer.close()
            return answer.split(b"\r\n", 1)[0]

        # Eight scrapes at once (/stats/prometheus is Istio's path for the same text).
        answers = await asyncio.gather(*(scrape(p) for p in [METRICS, METRICS_ALIAS] * 4))
        assert set(answers) == {b"HTTP/1.1 200 OK"}
        # One render at a time, each request served by one that began after it arrived: at most two for a
        # burst (the first, and one for all that came while it ran); the hook ran before each.
        assert slow.calls in (1, 2) and hooks == list(range(slow.calls)), (slow.calls, hooks)
        assert max(lags) < 0.2, f"the event loop stalled {max(lags):.3f} s during a 0.3 s render"
        calls = slow.calls
        _, _, body = await asyncio.to_thread(_get, f"http://{host}:{port}{METRICS}")
        assert slow.calls == calls + 1 and f"slow_collector_calls {calls + 1}.0" in body  # never stale
    finally:
        tick.cancel()
        await server.stop()


def test_admin_route_configuration_errors() -> None:
    with pytest.raises(ValueError, match="unknown admin routes"):
        AdminServer(CollectorRegistry(), routes=["/debug"])
    with pytest.raises(ValueError, match="needs a metrics registry"):
        AdminServer(routes=[METRICS])


async def test_tunnel_ports_serve_their_own_routes(tmp_path: Path) -> None:
    """15000: /config_dump and /healthz/ready; 15020: /metrics only; 15021: /healthz/ready only."""
    async with cluster(tmp_path) as c:
        tunnel = await c.start_tunnel("node1")
        await c.wait_ready(tunnel)
        served = {}
        for name in ("admin", "metrics", "ready"):
            host, port = tunnel.addresses[name]
            answers = {path: await asyncio.to_thread(_get, f"http://{host}:{port}{path}") for path in GET_ROUTES}
            served[name] = {path for path, (status, _, _) in answers.items() if status == 200}
            assert {status for status, _, _ in answers.values()} <= {200, 404}, answers
            # The one write, on the localhost admin port only.
            status, _, _ = await asyncio.to_thread(_get, f"http://{host}:{port}{LOGGING}?level=info", "POST")
            assert status == (200 if name == "admin" else 404)
        assert served == {"admin": {CONFIG_DUMP, READY}, "metrics": {METRICS}, "ready": {READY}}
        host, port = tunnel.addresses["admin"]
        dump = json.loads((await asyncio.to_thread(_get, f"http://{host}:{port}{CONFIG_DUMP}"))[2])
        assert {"workloads", "certificates", "trustBundle", "policies", "connections", "localPods"} <= dump.keys()


async def test_logging_post_sets_and_resets_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    """ztunnel's POST /logging?level=...: the process's level or named loggers; reset restores the start."""
    admin = AdminServer(routes=[LOGGING])
    host, port = await admin.start("127.0.0.1", 0)
    base = f"http://{host}:{port}{LOGGING}"
    access = logging.getLogger("nodeagent.access")
    monkeypatch.setattr(admin_module, "_initial_levels", {})  # a fresh process...
    levels = access.level, logging.root.level
    access.setLevel(logging.INFO)  # ...as `nodeagent tunnel` starts
    before = access.level
    try:
        status, _, body = await asyncio.to_thread(_get, base + "?level=nodeagent.access=warn", "POST")
        assert status == 200 and "nodeagent.access=WARNING" in body.splitlines()
        assert access.level == logging.WARNING
        status, _, body = await asyncio.to_thread(_get, base + "?reset", "POST")
        assert status == 200 and access.level == before
        # A bare level is the whole process's, as in ztunnel: named loggers follow it (off: no access log).
        status, _, body = await asyncio.to_thread(_get, base + "?level=off", "POST")
        assert status == 200 and not access.isEnabledFor(logging.CRITICAL)
        assert "nodeagent.access=Level 51" in body.splitlines()
        status, _, body = await asyncio.to_thread(_get, base + "?reset", "POST")
        assert access.level == logging.INFO and access.isEnabledFor(logging.INFO)
        for bad in ("?level=loud", "?level=urllib3=debug", "", "?level=info&level=debug"):
            status, _, body = await asyncio.to_thread(_get, base + bad, "POST")
            assert status == 400, (bad, body)
        assert (await asyncio.to_thread(_get, base + "?level=info"))[0] == 405  # GET
    finally:
        access.setLevel(levels[0])
        logging.root.setLevel(levels[1])
        await admin.stop()


async def test_inspect_reads_an_admin_given_as_host_port_like_the_tunnel_takes_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--admin 127.0.0.1:PORT` (what `nodeagent tunnel --admin` takes) was handed to urlopen as a URL."""
    workloads = [{"namespace": "shop", "name": "web-1", "workloadIps": ["10.1.0.5"], "node": "node1"}]
    admin = AdminServer(routes=[CONFIG_DUMP])
    admin.add_config_provider("workloads", lambda: workloads)
    host, port = await admin.start("127.0.0.1", 0)
    try:
        for given in (f"{host}:{port}", f"localhost:{port}", f"http://{host}:{port}/"):
            rc = await asyncio.to_thread(cli_main, ["inspect", "workloads", "--admin", given, "-o", "json"])
            out, err = capsys.readouterr()
            assert rc == 0, (given, err)
            assert json.loads(out) == workloads, given
        assert await asyncio.to_thread(cli_main, ["inspect", "workloads", "--admin", "127.0.0.1"]) == 1
        assert "neither a URL nor HOST:PORT" in capsys.readouterr().err
    finally:
        await admin.stop()


DUMP = {  # one entry of namespace `shop` in every section the inspect commands read
    "workloads": [{"namespace": "shop", "name": "web-1", "workloadIps": ["10.1.0.5"], "node": "node1"}],
    "services": [{"namespace": "shop", "name": "web", "vips": ["/10.96.0.10"], "endpoints": {}}],
    "policies": [{"namespace": "shop", "name": "allow-web", "action": "Allow", "scope": "Namespace"}],
    "connections": {
        "outbound": [{"srcWorkload": "web-1.shop", "src": "10.1.0.5:40000", "actualDst": "10.1.0.6:15008"}],
        "inbound": [],
    },
    "certificates": [{"identity": "spiffe://cluster.local/ns/shop/sa/web", "state": "Available"}],
}


@pytest.mark.parametrize("section", list(DUMP))
async def test_a_namespace_with_nothing_in_it_says_so_as_kubectl_does(
    section: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-n nosuch` printed a table of headers only; kubectl says "No resources found in nosuch namespace." on
    stderr (exit 0). JSON and YAML stay the section narrowed to nothing, in its own shape."""
    admin = AdminServer(routes=[CONFIG_DUMP])
    admin.add_config_provider(section, lambda: DUMP[section])
    host, port = await admin.start("127.0.0.1", 0)

    async def run(*argv: str) -> tuple[int, str, str]:
        rc = await asyncio.to_thread(cli_main, ["inspect", section, "--admin", f"{host}:{port}", *argv])
        out, err = capsys.readouterr()
        return rc, out, err

    try:
        assert await run("-n", "nosuch") == (0, "", "No resources found in nosuch namespace.\n")
        rc, out, err = await run("-n", "nosuch", "-o", "json")
        assert (rc, err) == (0, "")
        empty = json.loads(out)
        assert empty == [] or (isinstance(empty, dict) and not any(empty.values())), empty
        rc, out, err = await run("-n", "nosuch", "-o", "yaml")
        assert (rc, err, yaml.safe_load(out)) == (0, "", empty)
        rc, out, err = await run("-n", "shop")
        assert (rc, err) == (0, "") and len(out.splitlines()) == 2, out  # the header and shop's row
    finally:
        await admin.stop()
