"""The operator's side of a node's admin endpoint: read one section of /config_dump, print it.

Why this module exists: `nodeagent inspect certificates|workloads|connections|policies` all read the
tunnel's /config_dump (the same shape as ztunnel's) and print it as an istioctl-style table, JSON or
YAML. One reader and one table printer keep their errors and their look identical.

What it deliberately does not do: no reaching a remote node (in the lab, run the command inside the
node with `nodeagent lab exec --node N -- nodeagent inspect ...`); no interpretation of the sections,
which belongs to the subsystem that owns each one.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import yaml

DEFAULT_ADMIN = "http://127.0.0.1:15000"
OUTPUTS = ("table", "json", "yaml")


class AdminError(Exception):
    """The admin endpoint could not be read, or lacks the section asked for."""


def add_admin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", default=DEFAULT_ADMIN, help=f"admin endpoint of the node's tunnel ({DEFAULT_ADMIN})")
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="table")


def fetch_section(admin: str, section: str, timeout: float = 10.0) -> Any:
    url = admin.rstrip("/") + "/config_dump"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            dump = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise AdminError(
            f"cannot read {url}: {exc}; is the tunnel running on this node and --admin right? "
            "(in the lab: nodeagent lab exec --node NODE -- nodeagent inspect ...)"
        ) from None
    if not isinstance(dump, dict) or section not in dump:
        raise AdminError(f"{url} has no `{section}` section; is this a nodeagent tunnel?")
    return dump[section]


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An istioctl-style aligned table: columns separated by three spaces, no trailing blanks."""
    all_rows = [tuple(columns), *(tuple(r) for r in rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(columns))]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in all_rows]
    return "\n".join(lines) + "\n"


def print_section(args: argparse.Namespace, section: str, render: Callable[[Any], str]) -> int:
    """Fetch `section` from `args.admin` and print it in `args.output` form; 1 with a message on error."""
    try:
        data = fetch_section(args.admin, section)
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(data, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        print(render(data), end="")
    return 0
