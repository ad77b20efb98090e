"""tunnel.file_source: the --inventory/--policies file reader (reloaded on change, missing = default)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nodeagent.ztunnel.proxy.tunnel import file_source


def test_a_missing_file_is_the_default_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "polcies.yaml"  # a typo: the tunnel would enforce no policy at all
    source = file_source(str(path), lambda p: Path(p).read_text(), default="", interval=0)
    with caplog.at_level(logging.INFO):
        assert source() == ""
    assert [(r.levelname, "does not exist" in r.getMessage()) for r in caplog.records] == [("WARNING", True)]
    caplog.clear()
    path.write_text("policies")
    with caplog.at_level(logging.INFO):
        assert source() == "policies"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("INFO", f"loaded {path}")]
