"""`python -m nodeagent.agent ARGS` is `nodeagent agent ARGS` (and `... inspect redirects ARGS` is
`nodeagent inspect redirects ARGS`), without loading the other subsystems' commands.

Why this module exists: the lab, the tests and the benchmark start agents inside node netns; the full
CLI imports every subsystem (the Kubernetes client alone takes ~0.4 s), this entry only the agent's.

What it deliberately does not do: anything `nodeagent agent` / `nodeagent inspect redirects` do not; it
is the same parsers and code.
"""

from __future__ import annotations

import argparse
import sys

from nodeagent.agent import commands


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="nodeagent")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(sub)
    inspect = sub.add_parser("inspect", help="read what the node holds")
    commands.register_inspect_redirects(inspect.add_subparsers(dest="inspect_command", required=True))
    args = parser.parse_args(words if words[:1] == ["inspect"] else ["agent", *words])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
