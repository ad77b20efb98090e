"""`nodeagent tunnel` start-up errors: a missing or broken inventory is one line saying what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.cli import main


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
