"""The `nodeagent` command: the argparse front door.

Each subsystem contributes its own subcommands through a `register(subparsers)` function in its
`commands` module, so this file only wires them together. Nothing imports this module; only
subcommands that work are registered.
"""

from __future__ import annotations

import argparse
import logging
import sys

from nodeagent import __version__, demo
from nodeagent.agent import commands as agent_commands
from nodeagent.ca import commands as ca_commands
from nodeagent.ca.client import CAClient
from nodeagent.lab import commands as lab_commands
from nodeagent.ztunnel import commands as ztunnel_commands
from nodeagent.ztunnel import inspect as ztunnel_inspect


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodeagent",
        description="A sidecar-free service mesh node agent (Istio ambient style).",
    )
    parser.add_argument("--version", action="version", version=f"nodeagent {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lab_commands.register(sub)
    demo.register(sub)
    ca_commands.register(sub)
    agent_commands.register(sub)
    inspect = sub.add_parser("inspect", help="look at what a node holds: certificates, workloads, connections")
    inspect_sub = inspect.add_subparsers(dest="inspect_command", required=True, metavar="WHAT")
    agent_commands.register_inspect_redirects(inspect_sub)
    ca_commands.register_inspect(inspect_sub)
    ztunnel_inspect.register_inspect(inspect_sub)
    # The tunnel fetches certificates with the CA's client; the CLI joins the two independent packages.
    ztunnel_commands.register(sub, ca_client=CAClient)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
