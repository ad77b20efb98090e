"""`nodeagent lab up|down|status|exec`: the operator's handle on the simulated cluster.

Why this module exists: it turns command lines into calls of nodeagent.lab.cluster and results into
text, so the CLI, the tests, the benchmarks and the demo all drive one implementation.

What it deliberately does not do: no lab logic of its own (nothing here touches the kernel except
through nodeagent.lab.cluster), and nothing imports it except nodeagent.cli.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from nodeagent.inventory.local import InventoryError, lab_inventory_problem
from nodeagent.lab.cluster import (
    DEFAULT_TOPOLOGY,
    NOT_UP_HINT,
    CommandNotFoundError,
    Lab,
    LabError,
    NoLabError,
    exclusive,
    exec_in,
    teardown,
)
from nodeagent.netns import NetnsError

_COLUMNS = ("kind", "name", "node", "netns", "ip", "cgroup", "problem")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = subparsers.add_parser(
        "lab",
        help="a simulated cluster (nodes and pods in network namespaces) on this host",
        description="A simulated multi-node cluster on one Linux host: network namespaces for a fabric, "
        "nodes and pods, and a cgroup per pod. Needs root.",
    )
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="build the lab from a topology file", description="Build the lab.")
    up.add_argument(
        "--topology",
        "-t",
        type=Path,
        default=DEFAULT_TOPOLOGY,
        metavar="FILE",
        help="topology / local inventory YAML (default: the packaged 2-node lab, %(default)s)",
    )
    up.set_defaults(func=_up)

    down = sub.add_parser(
        "down", help="remove everything the lab created", description="Stop the lab's processes and remove it."
    )
    down.set_defaults(func=_down)

    status = sub.add_parser("status", help="the lab as the kernel has it", description="Nodes and pods, read back.")
    status.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    status.set_defaults(func=_status)

    run = sub.add_parser(
        "exec",
        help="run a command inside a pod (its netns and cgroup), a node or the fabric",
        description="Run CMD inside POD's network namespace and cgroup (or a node's / the fabric's netns). "
        "The exit status is CMD's.",
        usage="nodeagent lab exec [-h] [--node NODE | --fabric] [POD] -- CMD [ARG ...]",
    )
    where = run.add_mutually_exclusive_group()
    where.add_argument("--node", metavar="NODE", help="run in this node's netns instead of a pod")
    where.add_argument("--fabric", action="store_true", help="run in the fabric's netns (tcpdump -i br0)")
    run.add_argument("words", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run.set_defaults(func=_exec)


def _fail(command: str, message: str, rc: int = 1) -> int:
    print(f"nodeagent lab {command}: {message}", file=sys.stderr)
    return rc


def _up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    # Without root there is no lock to take: Lab.up still checks the topology, then says it needs root.
    busy_check = exclusive(wait=False) if os.geteuid() == 0 else contextlib.nullcontext()
    try:
        with busy_check:
            lab = Lab.up(args.topology)
    except InventoryError as exc:
        return _fail("up", f"bad topology, nothing was created: {exc}", 2)
    except LabError as exc:
        return _fail("up", str(exc))
    inv = lab.inventory
    print(
        f"lab up in {time.monotonic() - started:.2f} s: {len(inv.nodes)} nodes, {len(inv.pods)} pods; "
        f"inventory {lab.inventory_path}\n"
        "next: `nodeagent lab status`, `nodeagent lab exec POD -- CMD`, `nodeagent lab down`"
    )
    return 0


def _down(args: argparse.Namespace) -> int:
    del args
    if os.geteuid() != 0:
        return _fail("down", "the lab needs root: run `sudo nodeagent lab down`")
    started = time.monotonic()
    try:
        with exclusive(wait=False):
            report = teardown()
    except LabError as exc:
        return _fail("down", f"{exc}; nothing was removed")
    for problem in report.problems:
        print(f"nodeagent lab down: {problem}", file=sys.stderr)
    if report.problems:
        return _fail("down", "some leftovers remain; fix the above and run `sudo nodeagent lab down` again")
    if not report.removed_anything:
        print("no lab was up; nothing to remove")
        return 0
    print(f"lab down in {time.monotonic() - started:.2f} s: {report.summary()}")
    return 0


def _bad_inventory(command: str, exc: InventoryError) -> int:
    return _fail(command, lab_inventory_problem(exc))


def _status(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        return _fail("status", "reading the lab's namespaces needs root: run `sudo nodeagent lab status`")
    try:
        lab = Lab.load()
    except LabError as exc:
        return _fail("status", str(exc))
    except InventoryError as exc:
        return _bad_inventory("status", exc)
    rows = lab.status()
    doc = {
        "inventory": str(lab.inventory_path),
        "cgroup_root": str(lab.cgroup_root),
        "fabric": {"netns": lab.fabric_interface()[0], "interface": lab.fabric_interface()[1]},
        "rows": [asdict(r) for r in rows],
    }
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    else:
        table = [[c.upper() for c in _COLUMNS]] + [[str(getattr(r, c)) or "-" for c in _COLUMNS] for r in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
        for line in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    bad = [r for r in rows if r.problem]
    if bad:
        differ = "1 object differs" if len(bad) == 1 else f"{len(bad)} objects differ"
        return _fail("status", f"{differ} from the topology; `sudo nodeagent lab down` and up again")
    return 0


def _exec(args: argparse.Namespace) -> int:
    words: list[str] = args.words
    usage = "usage: nodeagent lab exec [--node NODE | --fabric] [POD] -- CMD [ARG ...]"
    pod = ""
    if not (args.node or args.fabric):
        if not words or words[0] == "--":
            return _fail("exec", f"name a pod, --node NODE or --fabric; {usage}", 2)
        pod, words = words[0], words[1:]
    if len(words) < 2 or words[0] != "--":
        return _fail("exec", usage, 2)
    command = words[1:]
    if os.geteuid() != 0:
        return _fail("exec", "entering the lab's namespaces needs root: run it with sudo")
    try:
        lab = Lab.load()
        if args.fabric:
            exec_in(lab.fabric_netns, None, command)
        elif args.node:
            exec_in(lab.node_netns(args.node), None, command)
        else:
            exec_in(lab.pod_netns(pod), lab.pod_cgroup(pod), command)
    except NoLabError:
        return _fail("exec", NOT_UP_HINT)
    except InventoryError as exc:
        return _bad_inventory("exec", exc)
    except KeyError as exc:
        return _fail("exec", str(exc.args[0]))
    except CommandNotFoundError as exc:
        return _fail("exec", str(exc), 127)
    except (LabError, NetnsError) as exc:
        return _fail("exec", str(exc))
