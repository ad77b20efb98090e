"""`nodeagent ca init|show|rotate` on a temporary state directory, through the argparse registration."""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Iterator
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


LAB_INVENTORY = Path(__file__).resolve().parents[2] / "nodeagent" / "lab" / "default.yaml"


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:{taken}", "cannot listen on 127.0.0.1:{taken}: Address already in use; another process listens"),
        ("192.0.2.1:15012", "cannot listen on 192.0.2.1:15012: Cannot assign requested address; 192.0.2.1 is not"),
        ("bogus.invalid:15012", "cannot listen on bogus.invalid:15012: cannot resolve 'bogus.invalid'"),
        ("bogus", "cannot listen on 'bogus': not HOST:PORT"),
        (":15012", "cannot listen on ':15012': not HOST:PORT (e.g. 127.0.0.1:15012, or 0.0.0.0:15012 for all"),
    ],
    ids=["in-use", "not-local", "unresolvable", "no-port", "no-host"],
)
def test_serve_on_an_address_it_cannot_listen_on_says_which_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], taken_port: int, listen: str, expected: str
) -> None:
    state = ["--state-dir", str(tmp_path / "ca"), "--inventory", str(LAB_INVENTORY)]
    assert _run(["ca", "serve", *state, "--listen", listen.format(taken=taken_port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected.format(taken=taken_port) in err, err


@pytest.mark.parametrize("command", [["init"], ["serve", "--kubernetes"]])
def test_a_trust_domain_identities_would_reject_is_refused_before_a_root_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    state = tmp_path / "ca"
    with pytest.raises(SystemExit) as exited:
        _run(["ca", *command, "--state-dir", str(state), "--trust-domain", "bad domain/x"])
    assert exited.value.code == 2
    assert "--trust-domain: trust domain 'bad domain/x' must be" in capsys.readouterr().err
    assert not state.exists()


def test_show_without_a_ca_speaks_of_the_state_dir_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said "<state-dir>/ca lacks ca-cert.pem ..." (/var/lib/nodeagent/ca/ca by default): the store's ca/
    subdirectory is no name the user gave."""
    state = tmp_path / "ca"
    assert _run(["ca", "show", "--state-dir", str(state)]) == 1
    assert capsys.readouterr().err == (
        f"error: no CA in {state} (--state-dir): run `nodeagent ca init --state-dir {state}` to create a root, "
        f"or `nodeagent ca init --state-dir {state} --cacerts DIR` to import Istio-style cacerts\n"
    )
    assert _run(["ca", "init", "--state-dir", str(state)]) == 0
    (state / "ca" / "ca-key.pem").unlink()
    capsys.readouterr()
    assert _run(["ca", "show", "--state-dir", str(state)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: the CA in {state} (--state-dir) is incomplete: its signer lacks ca-key.pem; "), err
    assert f"`nodeagent ca init --state-dir {state} --cacerts DIR --force`" in err, err


def test_importing_cacerts_that_lack_files_names_them_not_ca_init(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cacerts").mkdir()
    (tmp_path / "cacerts" / "root-cert.pem").write_text("")
    assert _run(["ca", "init", "--state-dir", str(tmp_path / "ca"), "--cacerts", str(tmp_path / "cacerts")]) == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'cacerts'} (--cacerts) lacks ca-cert.pem, ca-key.pem: Istio-style cacerts hold "
        "ca-cert.pem, ca-key.pem, root-cert.pem and optionally cert-chain.pem\n"
    )


def test_export_help_says_what_export_does_to_an_existing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The help said "a new or empty directory", but an earlier export there is replaced (only other files are
    refused): the help says so, and the code does what it says."""
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["ca", "export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--out DIR directory for the four cacerts files (created if missing): an earlier export there is " in text
    assert "replaced; a directory holding any other file is refused" in text, text

    state, out = ["--state-dir", str(tmp_path / "ca")], tmp_path / "out"
    assert _run(["ca", "init", *state]) == 0
    for _ in range(2):
        assert _run(["ca", "export", *state, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _run(["ca", "export", *state, "--out", str(out)]) == 1
    assert "holds other files (notes.txt)" in capsys.readouterr().err
