"""What `nodeagent -v tunnel` logs for its endpoints: each line names the endpoint it is about.

The tunnel runs three HTTP endpoints (admin 15000, metrics 15020, readiness 15021) and optionally the
readiness unix socket; each logged "admin endpoint on ...", so the log did not say which port was which.
The oracle is the tunnel's own bound addresses and what each one answers, not the log's wording alone.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest
from tunnel_harness import cluster


async def _status(host: str, port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    head = await reader.readline()
    writer.close()
    return int(head.split()[1])


async def test_each_endpoint_log_line_names_what_the_endpoint_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nodeagent.admin")
    ready_socket = str(tmp_path / "ready.sock")
    async with cluster(tmp_path) as c:
        tunnel = await c.start_tunnel("node1", ready_socket=ready_socket)
        lines = {
            int(m.group(2)): m.group(1)
            for r in caplog.records
            if (m := re.fullmatch(r"(.*) on http://127\.0\.0\.1:(\d+)", r.getMessage()))
        }
        by_name = {name: lines[port] for name, (_, port) in tunnel.addresses.items()}
        assert by_name == {
            "admin": "admin endpoint (/config_dump, /healthz/ready, /logging)",
            "metrics": "metrics endpoint (/metrics)",
            "ready": "readiness endpoint (/healthz/ready)",
        }
        # what each line says is what the port serves
        _, metrics_port = tunnel.addresses["metrics"]
        _, ready_port = tunnel.addresses["ready"]
        assert await _status("127.0.0.1", metrics_port, "/metrics") == 200
        assert await _status("127.0.0.1", metrics_port, "/config_dump") == 404
        assert await _status("127.0.0.1", ready_port, "/config_dump") == 404
        assert f"readiness endpoint (/healthz/ready) on unix:{ready_socket}" in caplog.messages
        assert not [m for m in caplog.messages if m.startswith("admin endpoint on ")]
