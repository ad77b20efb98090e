"""`nodeagent ca init|show|rotate` on a temporary state directory, through the argparse registration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from nodeagent.ca import commands


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_init_show_rotate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["--state-dir", str(tmp_path / "ca")]
    assert _run(["ca", "show", *state, "-o", "json"]) == 1
    assert "nodeagent ca init" in capsys.readouterr().err
    assert _run(["ca", "init", *state]) == 0
    assert "created a new root" in capsys.readouterr().out
    assert _run(["ca", "init", *state]) == 0
    assert "nothing changed" in capsys.readouterr().out

    assert _run(["ca", "show", *state, "-o", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["rotation"] == "none" and len(shown["trusted_roots"]) == 1
    root_a = shown["signer_root"]
    assert shown["trusted_roots"][0]["sha256"] == root_a

    assert _run(["ca", "rotate", *state, "finish"]) == 1
    assert "activate" in capsys.readouterr().err
    for step, roots, rotation in (("prepare", 2, "prepared"), ("activate", 2, "activated"), ("finish", 1, "none")):
        assert _run(["ca", "rotate", *state, step]) == 0
        assert f"trusts {roots} root(s)" in capsys.readouterr().out
        assert _run(["ca", "show", *state, "-o", "json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["rotation"] == rotation and len(shown["trusted_roots"]) == roots
    assert shown["signer_root"] != root_a
    assert _run(["ca", "show", *state]) == 0
    assert "signer root:" in capsys.readouterr().out
