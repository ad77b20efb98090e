"""`nodeagent tunnel` start-up errors: a missing or broken inventory is one line saying what to do."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509

from nodeagent.ca.store import CAStore
from nodeagent.cli import build_parser, main
from nodeagent.ztunnel import commands as tunnel_commands


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "does not exist; write it first or use --kubernetes"), ("nodes: [\n", "not valid YAML")],
    ids=["missing", "broken"],
)
def test_tunnel_refuses_to_start_without_a_valid_inventory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, expected: str
) -> None:
    inventory = tmp_path / "inventory.yaml"
    if content is not None:
        inventory.write_text(content)
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("")
    argv = ["tunnel", "--node", "node1", "--inventory", str(inventory), "--trust-bundle", str(bundle)]
    assert main([*argv, "--ca", "127.0.0.1:1", "--ca-token", "t"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err


LAB_INVENTORY = Path(__file__).resolve().parents[2] / "nodeagent" / "lab" / "default.yaml"


def _tunnel_argv(tmp_path: Path, bundle: Path, *extra: str) -> list[str]:
    return [
        "tunnel",
        "--node",
        "node1",
        "--inventory",
        str(LAB_INVENTORY),
        "--trust-bundle",
        str(bundle),
        "--ca",
        "127.0.0.1:1",
        "--ca-token",
        "t",
        "--zds-socket",
        str(tmp_path / "zds.sock"),
        "--metrics",
        "127.0.0.1:0",
        "--ready",
        "127.0.0.1:0",
        *extra,
    ]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if not line[:4].isdigit()]  # log lines start with the date
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_tunnel_with_a_missing_trust_bundle_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _tunnel_argv(tmp_path, tmp_path / "nonexistent.pem", "--admin", "127.0.0.1:0")
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "nonexistent.pem is missing or empty" in line and "nodeagent ca init" in line


def test_tunnel_on_an_address_this_host_lacks_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = CAStore(tmp_path / "ca", "cluster.local")
    store.init()
    # 192.0.2.1 (TEST-NET-1) is no address of this host: EADDRNOTAVAIL, which is not retried like EADDRINUSE.
    assert main(_tunnel_argv(tmp_path, store.bundle_path, "--admin", "192.0.2.1:25000")) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot listen on 192.0.2.1:25000: Cannot assign requested address" in line, line
    assert "is not an address of this host" in line, line


def test_tunnel_for_a_node_the_inventory_lacks_refuses_to_start_naming_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    started = []
    monkeypatch.setattr(tunnel_commands, "run_tunnel", started.append)
    argv = _tunnel_argv(tmp_path, tmp_path / "bundle.pem", "--admin", "127.0.0.1:0")
    argv[argv.index("node1")] = "nodeZZ"
    assert main(argv) == 1
    assert not started
    line = _one_error_line(capsys.readouterr().err)
    assert f"node 'nodeZZ' is not in the inventory {LAB_INVENTORY} (known: node1, node2)" in line, line

    assert main(_tunnel_argv(tmp_path, tmp_path / "bundle.pem", "--admin", "127.0.0.1:0")) == 0  # node1 is
    assert len(started) == 1 and started[0].node == "node1"


async def test_the_ca_client_gets_the_managers_last_good_roots_not_the_files_bytes(tmp_path: Path) -> None:
    # A bundle file caught mid-write or broken used to fail every CA request (the client read the file per
    # call); the certificate manager keeps its last good roots and logs why, and the client uses those.
    store = CAStore(tmp_path / "ca", "cluster.local")
    store.init()
    given: list[Callable[[], str]] = []

    def ca_client(target: str, token: Callable[[], str], bundle_pem: Callable[[], str]) -> Any:
        given.append(bundle_pem)
        return SimpleNamespace(fetch=None)

    args = build_parser().parse_args(_tunnel_argv(tmp_path, store.bundle_path, "--admin", "127.0.0.1:0"))
    inputs = tunnel_commands.build_inputs(args, ca_client)
    await inputs.credentials.start()
    try:
        good = given[0]()
        assert x509.load_pem_x509_certificates(good.encode())  # the roots, as PEM
        for broken in ("-----BEGIN CERTIFICATE-----\nMIIB", ""):
            store.bundle_path.write_text(broken)
            inputs.credentials.reload_bundle()
            assert given[0]() == good
        store.bundle_path.unlink()
        inputs.credentials.reload_bundle()
        assert given[0]() == good
    finally:
        await inputs.credentials.stop()
