"""`python -m nodeagent.lab ARGS` is `nodeagent lab ARGS`, without loading the other subsystems' commands.

Why this module exists: `Lab.exec_argv()` prefixes start one process per command a test, benchmark or
demo runs inside a pod, and the full `nodeagent` CLI imports every subsystem (the Kubernetes client
alone takes ~0.4 s here). This entry point registers only the lab's commands, so `lab exec` starts in
about a tenth of that.

What it deliberately does not do: anything `nodeagent lab` does not; it is the same parser and code.
"""

from __future__ import annotations

import argparse
import sys

from nodeagent.lab import commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nodeagent")
    commands.register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
