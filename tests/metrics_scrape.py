"""A /metrics endpoint read as Prometheus reads it: an HTTP GET, the text format parsed by prometheus_client's
parser. The metrics tests' oracle is what a scrape returns, not the metric objects the code under test holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[str, float]:
    """`name{label="value",...}` (labels sorted; `name` alone without labels) -> value."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            found[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return found


def registry_samples(registry: CollectorRegistry) -> dict[str, float]:
    """What a scrape of `registry` would return (for units without an HTTP endpoint)."""
    return samples(generate_latest(registry).decode())


async def scrape(address: tuple[str, int], path: str = "/metrics") -> tuple[int, dict[str, float]]:
    """GET `path` on host:port: (status, samples); samples are empty unless the status is 200."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    head, _, body = answer.decode().partition("\r\n\r\n")
    status = int(head.split()[1])
    return status, samples(body) if status == 200 else {}


async def scrape_until(
    address: tuple[str, int], check: Callable[[dict[str, float]], bool], what: str, limit: float = 10.0
) -> dict[str, float]:
    """Scrape until `check` holds (nothing listening yet counts as not yet); the samples it held for."""
    got: dict[str, float] = {}
    try:
        async with asyncio.timeout(limit):
            while True:
                with contextlib.suppress(ConnectionRefusedError):
                    status, got = await scrape(address)
                    if status == 200 and check(got):
                        return got
                await asyncio.sleep(0.02)
    except TimeoutError:
        seen = {k: v for k, v in got.items() if k.startswith("nodeagent_") and not k.endswith("_created")}
        raise AssertionError(f"timed out waiting for {what}; the nodeagent_ metrics: {seen}") from None
