"""The `nodeagent` command: the argparse front door.

Each subsystem contributes its own subcommands through a `register(subparsers)` function in its
`commands` module, so this file only wires them together. Nothing imports this module but
nodeagent/__main__.py (`python -m nodeagent`); only subcommands that work are registered.

Only the subsystem a command line names is imported: `nodeagent agent` is a long-running process, and
importing every subsystem (the Kubernetes client, gRPC, the tunnel) would cost it some 40 MB of RSS and
half a second of start-up for code it never runs. `nodeagent --help` imports them all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

from nodeagent import __version__

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _register(module: str, function: str = "register") -> Callable[[SubParsers], None]:
    def register(sub: SubParsers) -> None:
        getattr(importlib.import_module(module), function)(sub)

    return register


def _ca_client(*args: Any, **kwargs: Any) -> Any:
    # The tunnel fetches certificates with the CA's client; the CLI joins the two independent packages.
    from nodeagent.ca.client import CAClient

    return CAClient(*args, **kwargs)


def _register_tunnel(sub: SubParsers) -> None:
    from nodeagent.ztunnel import commands

    commands.register(sub, ca_client=_ca_client)


def _register_inspect(sub: SubParsers) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="look at what a node holds: redirects, certificates, workloads, services, policies, connections",
        description="Look at what a node holds, as a table (or -o json|yaml; -n/-A as kubectl's). `redirects` "
        "reads the kernel: this machine's, or a cluster node's through its agent (--node with --kubeconfig). The "
        "others print istioctl ztunnel-config's columns from the node tunnel's admin endpoint (--admin, or --node "
        "through the API server).",
    )
    inspect_sub = inspect.add_subparsers(dest="inspect_command", required=True, metavar="WHAT")
    for module, function in (
        ("nodeagent.agent.commands", "register_inspect_redirects"),
        ("nodeagent.ca.commands", "register_inspect"),
        ("nodeagent.ztunnel.inspect", "register_inspect"),
    ):
        _register(module, function)(inspect_sub)


# command -> how to register it (in the order `nodeagent --help` lists them)
COMMANDS: dict[str, Callable[[SubParsers], None]] = {
    "lab": _register("nodeagent.lab.commands"),
    "demo": _register("nodeagent.demo"),
    "ca": _register("nodeagent.ca.commands"),
    "agent": _register("nodeagent.agent.commands"),
    "tunnel": _register_tunnel,
    "ebpf": _register("nodeagent.ebpf.commands"),
    "enroll": _register("nodeagent.kube_commands"),  # also registers `unenroll`
    "inspect": _register_inspect,
}
ALIASES = {"unenroll": "enroll"}


def _wanted(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line, if it is one of ours (else every one is registered)."""
    for arg in argv:
        if not arg.startswith("-"):
            name = ALIASES.get(arg, arg)
            return name if name in COMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodeagent",
        description="A sidecar-free service mesh node agent (Istio ambient style).",
    )
    parser.add_argument("--version", action="version", version=f"nodeagent {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = None if argv is None else _wanted(argv)
    for name, register in COMMANDS.items():
        if wanted is None or wanted == name:
            register(sub)
    _describe(parser)
    return parser


def _describe(parser: argparse.ArgumentParser) -> None:
    """A (sub)command registered without a description gets its one-line help as one, so that its --help
    says what it does too, as the listing of its parent does."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                child = action.choices[choice.dest]
                if child.description is None and choice.help:
                    child.description = f"{choice.help[0].upper()}{choice.help[1:]}."
                _describe(child)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
