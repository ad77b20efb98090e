"""`nodeagent ebpf source`: the C unit exactly as bcc compiles it, with its -D flags.

Why this module exists: the programs are configured with -D flags (the node's ports and mark), so what
runs in the kernel is the files in nodeagent/ebpf/programs/ plus those flags, loaded once per pod against
the pod's own maps; printing both lets an operator read (and recompile by hand) precisely what is
attached. Importing this module does not import bcc.

What it deliberately does not do: no loading or attaching (the agent's eBPF capture backend does that).
"""

from __future__ import annotations

import argparse

from nodeagent.ebpf.loader import FASTPATH_FILE, PROGRAMS_DIR, BuildConfig, annotated_source


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ebpf = subparsers.add_parser(
        "ebpf",
        help="nodeagent's eBPF programs",
        description="The eBPF programs of the agent's eBPF capture (`nodeagent agent --capture ebpf`): `source` "
        "prints them as bcc compiles them for every pod.",
    )
    sub = ebpf.add_subparsers(dest="ebpf_command", required=True)
    src = sub.add_parser(
        "source",
        help="print the C as compiled for every pod, with its -D flags",
        description="Prints the compiler flags (as a comment) and the C unit bcc compiles once per agent and "
        "loads for every pod: programs/nodeagent.h followed by one file per attach point. A pod's own "
        "settings (its IP) are not in the code but in its map_config.",
    )
    src.add_argument(
        "--fastpath", action="store_true", help="print the node-wide same-node fast-path unit (fastpath.c) instead"
    )
    src.set_defaults(func=_source)


def _source(args: argparse.Namespace) -> int:
    if args.fastpath:
        text = (PROGRAMS_DIR / FASTPATH_FILE).read_text()
        print(f"/* nodeagent fast-path unit ({FASTPATH_FILE}), compiled by bcc with no flags */\n{text}", end="")
        return 0
    print(annotated_source(BuildConfig()), end="")
    return 0
