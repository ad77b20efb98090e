"""The CLI's own edges: argument forms the commands share, help that says what the code does, entry points."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent import __version__
from nodeagent.admin_client import AdminError, admin_url
from nodeagent.cli import build_parser, main


def _commands(
    parser: argparse.ArgumentParser, path: str = "nodeagent"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command of `parser`, depth first, with its command line."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{path} {name}")


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("127.0.0.1:15000", "http://127.0.0.1:15000"),
        ("localhost:25000", "http://localhost:25000"),
        (":15000", "http://127.0.0.1:15000"),
        ("[::1]:15000", "http://[::1]:15000"),
        ("::1:15000", "http://[::1]:15000"),  # as parse_endpoint of `nodeagent tunnel --admin` reads it
        ("http://127.0.0.1:15000/", "http://127.0.0.1:15000"),
        ("https://admin.example:8443", "https://admin.example:8443"),
    ],
)
def test_inspect_admin_takes_host_port_as_the_tunnel_does_or_a_url(given: str, url: str) -> None:
    assert admin_url(given) == url


@pytest.mark.parametrize("given", ["127.0.0.1", "localhost:http", "127.0.0.1:99999", ""])
def test_inspect_admin_that_is_neither_is_refused_with_both_forms(given: str) -> None:
    with pytest.raises(AdminError, match="neither a URL nor HOST:PORT"):
        admin_url(given)


def test_every_kubeconfig_flag_says_the_same_accurate_thing() -> None:
    """One code path (inventory.kube.api_client) behind every --kubeconfig: in a pod the service account,
    else $KUBECONFIG (merged), else ~/.kube/config. The help said three different things."""
    helps = {}
    for path, parser in _commands(build_parser()):
        for action in parser._actions:
            if "--kubeconfig" in action.option_strings:
                assert action.help is not None
                helps[path] = re.sub(r"^with (?:--)?[a-z-]+: ", "", action.help)  # the mode or step it is for
    assert {"nodeagent agent", "nodeagent tunnel", "nodeagent ca serve", "nodeagent enroll"} <= helps.keys()
    assert {"nodeagent inspect redirects", "nodeagent inspect workloads"} <= helps.keys()
    assert len(set(helps.values())) == 1, helps
    text = next(iter(helps.values()))
    order = [text.find(source) for source in ("service account", "$KUBECONFIG", "~/.kube/config")]
    assert -1 not in order and order == sorted(order), text


def test_python_dash_m_nodeagent_is_the_nodeagent_command(tmp_path: Path) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "nodeagent", *argv]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)

    version = run("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"nodeagent {__version__}"), version.stderr
    refused = run("inspect", "workloads", "--admin", "127.0.0.1")  # the exit status is main()'s
    assert refused.returncode == 1 and refused.stderr.startswith("error: "), refused.stderr


@pytest.mark.parametrize("command", ["ca", "inspect"])
def test_a_command_summary_names_every_subcommand_it_has(command: str) -> None:
    """`nodeagent --help` lists `ca` and `inspect` with their subcommands; `export`, `workloads` and `policies`
    were missing."""
    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    summary = next(a.help for a in top._choices_actions if a.dest == command)
    children = next(a for a in top.choices[command]._actions if isinstance(a, argparse._SubParsersAction))
    listed = re.split(r",\s*", str(summary).split(": ", 1)[1])
    assert listed == list(children.choices), summary


def test_every_command_says_what_it_does_at_the_top_of_its_own_help() -> None:
    """`nodeagent demo --help` (and `ca`, `ebpf`, `inspect` and their subcommands) had no description line."""
    assert [path for path, p in _commands(build_parser()) if not p.description] == []


def test_the_demo_help_says_what_the_demo_does_and_what_it_needs() -> None:
    demo = dict(_commands(build_parser()))["nodeagent demo"]
    assert demo.description is not None and "--keep" in demo.description and "Needs root" in demo.description


# -- a kubeconfig file that cannot be read is one line naming it, from every command that reads one ---------

BAD_KUBECONFIGS = {
    "gzipped": b"\x1f\x8b\x08\x00" + bytes(range(256)),  # not UTF-8 at byte 1
    "json-syntax-error": b'{"apiVersion": "v1", "clusters": [',
    "yaml-syntax-error": b"apiVersion: v1\nkind: Config\nclusters: [\n",
    "a-list": b"- apiVersion\n- v1\n",
    "clusters-not-a-list": b"apiVersion: v1\nclusters: oops\n",
}
KUBE_COMMANDS = {  # each command line that reads a kubeconfig (split on blanks)
    "enroll": "enroll shop --dry-run",
    "inspect --node": "inspect workloads --node node1",
    "inspect redirects --kubernetes": "inspect redirects --kubernetes --node node1",
    "agent --kubernetes": "agent --node node1 --kubernetes --zds-socket {tmp}/zds.sock",
    "tunnel --kubernetes": "tunnel --node node1 --kubernetes --ca 127.0.0.1:1 --ca-token t "
    "--trust-bundle {tmp}/bundle.pem --zds-socket {tmp}/zds.sock",
    "ca serve --kubernetes": "ca serve --kubernetes --state-dir {tmp}/ca --listen 127.0.0.1:0",
}


@pytest.mark.parametrize("content", BAD_KUBECONFIGS.values(), ids=BAD_KUBECONFIGS.keys())
@pytest.mark.parametrize("command", KUBE_COMMANDS.values(), ids=KUBE_COMMANDS.keys())
def test_a_kubeconfig_that_is_not_one_is_an_error_naming_the_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    content: bytes,
) -> None:
    """A kubeconfig that does not parse (binary, a JSON or YAML syntax error, not a mapping) gave a yaml or
    TypeError traceback from inside the kubernetes client, naming no file; `agent --kubernetes` gave a
    traceback for any unusable kubeconfig. Now: one line, the file, what is wrong with it, what to do."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not the in-cluster path
    monkeypatch.delenv("KUBECONFIG", raising=False)
    (tmp_path / "bundle.pem").write_text("")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_bytes(content)
    rc = main([*command.format(tmp=tmp_path).split(), "--kubeconfig", str(kubeconfig)])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith(f"error: cannot configure the Kubernetes client: the kubeconfig file {kubeconfig} "), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.endswith("; fix it, or pass --kubeconfig a working one"), err


def test_a_bad_file_in_the_kubeconfig_list_is_named_among_the_good_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """$KUBECONFIG is a list, merged as kubectl merges it: the error names the one file that is broken and says to
    take it out of the list; a missing entry is skipped, as kubectl skips it."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    bad.write_bytes(BAD_KUBECONFIGS["json-syntax-error"])
    monkeypatch.setenv("KUBECONFIG", f"{good}:{tmp_path / 'missing'}:{bad}")
    assert main(["enroll", "shop", "--dry-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot configure the Kubernetes client: the kubeconfig file {bad} is not YAML"), err
    assert "(line 1, column 35)" in err and err.endswith("take it out of $KUBECONFIG, or pass --kubeconfig FILE"), err


def test_a_kubeconfig_flag_naming_no_file_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["enroll", "shop", "--kubeconfig", str(tmp_path / "nope")]) == 1
    assert f"the kubeconfig file {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


# -- the lab's inventory: `lab up` is the advice only when there is no file -----------------------------------


def test_inspect_redirects_without_the_lab_inventory_asks_whether_the_lab_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nodeagent.agent import commands

    missing = tmp_path / "lab" / "inventory.yaml"
    monkeypatch.setattr(commands, "LAB_INVENTORY", missing)
    assert main(["inspect", "redirects", "--inventory", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "(is the lab up? `sudo nodeagent lab up`)" in err and "invalid" not in err, err


def test_an_invalid_inventory_that_is_not_the_labs_is_named_with_its_field_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("cluster: {name: x, fabric_cidr: 10.99.0.0/24}\nnodes: []\n")
    assert main(["inspect", "redirects", "--inventory", str(inventory)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {inventory}: nodes: "), err
    assert "lab" not in err, err
