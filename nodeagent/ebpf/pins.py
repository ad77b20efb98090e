"""What the kernel holds for one pod's eBPF capture: pins, programs, links, attachments - read, not assumed.

Why this module exists: verifying capture, repairing drift, `inspect redirects` and the agent's adoption
of a previous run's state all need the same answer to "is this pod's capture complete?", and none of
them should need bcc. The answer comes from the kernel: the pinned objects under
/sys/fs/bpf/nodeagent/<uid>/ (BPF_OBJ_GET + OBJ_GET_INFO_BY_FD) and, independently of our pins, what is
attached to the pod's cgroup and netns (BPF_PROG_QUERY). `HOOKS` is the single list of attach points:
a hook added to it is loaded, pinned, attached, observed, upgraded in place and removed like the others,
and a pod pinned by a build without it shows the hook as missing until `loader.ensure()` attaches it.

What it deliberately does not do: no changes (loader.py repairs), no compiling, no bcc.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from nodeagent.ebpf import maps
from nodeagent.ebpf.maps import AttachType, ProgType
from nodeagent.ebpf.structs import FASTPATH_DIR, MAPS, PIN_ROOT, pin_dir


@dataclass(frozen=True, slots=True)
class Hook:
    """One attach point: its C file and function, program type, attach type and what it attaches to."""

    name: str
    file: str
    function: str
    prog_type: ProgType
    attach_type: AttachType
    target: str  # "cgroup" (the pod's cgroup v2 dir) or "netns" (the pod's network namespace)

    @property
    def prog_pin(self) -> str:
        return f"prog_{self.name}"

    @property
    def link_pin(self) -> str:
        return f"link_{self.name}"


HOOKS = (
    Hook("connect4", "connect4.c", "na_connect4", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET4_CONNECT, "cgroup"),
    Hook("connect6", "connect6.c", "na_connect6", ProgType.CGROUP_SOCK_ADDR, AttachType.CGROUP_INET6_CONNECT, "cgroup"),
    Hook("sockops", "sockops.c", "na_sockops", ProgType.SOCK_OPS, AttachType.CGROUP_SOCK_OPS, "cgroup"),
    Hook("sk_lookup", "sk_lookup.c", "na_sk_lookup", ProgType.SK_LOOKUP, AttachType.SK_LOOKUP, "netns"),
)


@dataclass(frozen=True, slots=True)
class HookState:
    hook: Hook
    target: str  # the cgroup dir or netns file it should be attached to
    prog: maps.ProgInfo | None
    link: maps.LinkInfo | None
    attached: tuple[int, ...] | None  # program ids the kernel lists on the target for this attach type
    problem: str
    stray_maps: tuple[int, ...] = ()  # ids of maps the pinned program uses that are not the pod's pinned maps
    in_place: bool = False  # the pinned link is attached to the right target (whichever program it runs)
    outdated: bool = False  # the pinned program is another build's (its kernel tag is not the expected one)

    @property
    def ok(self) -> bool:
        return not self.problem

    def describe(self) -> str:
        prog = f"prog {self.prog.id} {self.prog.name} ({self.prog.type_name})" if self.prog else "prog (not pinned)"
        link = f"link {self.link.id}" + ("" if self.link.attached else " (detached)") if self.link else "no link"
        return f"{prog} -> {self.hook.attach_type.name.lower()} on {self.hook.target} {self.target} [{link}]"


@dataclass(frozen=True, slots=True)
class MapState:
    pin: str
    info: maps.MapInfo | None

    def describe(self) -> str:
        if self.info is None:
            return f"map {self.pin} (not pinned)"
        i = self.info
        return f"map {i.id} {i.name} (type {i.type}, {i.max_entries} entries) pinned {self.pin}"


@dataclass(frozen=True, slots=True)
class PodBpf:
    uid: str
    pin_dir: str
    hooks: tuple[HookState, ...]
    maps: tuple[MapState, ...]

    @property
    def present(self) -> bool:
        return any(h.prog or h.link for h in self.hooks) or any(m.info for m in self.maps)

    def objects(self) -> tuple[str, ...]:
        lines = [h.describe() for h in self.hooks if h.prog or h.link]
        lines += [m.describe() for m in self.maps if m.info]
        return tuple(lines)

    def drift(self) -> tuple[str, ...]:
        problems = [f"{h.hook.name}: {h.problem}" for h in self.hooks if h.problem]
        problems += [f"map {m.pin} is not pinned in {self.pin_dir}" for m in self.maps if m.info is None]
        return tuple(problems)


def _target_id(path: str) -> int | None:
    try:
        return os.stat(path).st_ino  # a cgroup v2 dir's inode is its cgroup id; a netns file's is its inode
    except FileNotFoundError:
        return None


_Info = TypeVar("_Info")


def _info(path: str, read: Callable[[int], _Info]) -> _Info | None:
    """`read(fd)` of the object pinned at `path`; None when nothing (or nothing of that kind) is pinned there."""
    try:
        with maps.obj_get(path) as fd:
            return read(fd.fd)
    except maps.BpfError as exc:
        if exc.errno in (errno.ENOENT, errno.EINVAL):
            return None
        raise


def attached_programs(path: str, attach_type: int) -> tuple[int, ...] | None:
    """Ids the kernel lists on a cgroup dir or netns file for `attach_type`; None when the target is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    except FileNotFoundError:
        return None
    with maps.Fd(fd):
        return maps.prog_query(fd, attach_type)


def observe(
    uid: str, cgroup: str, netns: str, pin_root: str = PIN_ROOT, tags: Mapping[str, str] | None = None
) -> PodBpf:
    """The pod's BPF objects as the kernel has them, and what is wrong with them. `tags` (hook name -> kernel
    tag of this build's program, loader.Compiled.tags): a pinned program with another tag is drift too (an
    agent upgrade left it); without them, which build a program is from is not judged (no bcc here)."""
    directory = pin_dir(uid, pin_root)
    targets = {"cgroup": cgroup, "netns": netns}
    states: list[HookState] = []
    for hook in HOOKS:
        target = targets[hook.target]
        prog = _info(os.path.join(directory, hook.prog_pin), maps.prog_info)
        link = _info(os.path.join(directory, hook.link_pin), maps.link_info)
        attached = None
        with contextlib.suppress(maps.BpfError):
            attached = attached_programs(target, int(hook.attach_type))
        expected_target = _target_id(target)
        if expected_target is None:
            problem = f"{hook.target} {target} does not exist"
        elif prog is None:
            problem = f"program pin {hook.prog_pin} is missing"
        elif link is None:
            problem = f"link pin {hook.link_pin} is missing (program not attached)"
        elif not link.attached:
            problem = f"link {link.id} was detached (by hand?)"
        elif link.target != expected_target:
            problem = f"link {link.id} is attached to another {hook.target} (id {link.target}, want {expected_target})"
        elif link.prog_id != prog.id:
            problem = f"link {link.id} runs program {link.prog_id}, not the pinned {prog.id}"
        elif attached is None or prog.id not in attached:
            problem = f"the kernel lists no program {prog.id} on {target} for {hook.attach_type.name.lower()}"
        else:
            problem = ""
        in_place = link is not None and link.attached and expected_target is not None and link.target == expected_target
        states.append(HookState(hook, target, prog, link, attached, problem, in_place=in_place))
    map_states = tuple(MapState(name, _info(os.path.join(directory, name), maps.map_info)) for name in MAPS)
    pinned_maps = {m.info.id for m in map_states if m.info}
    for i, state in enumerate(states):
        prog = state.prog
        stray = tuple(sorted(set(prog.map_ids) - pinned_maps)) if prog else ()
        want = tags.get(state.hook.name) if tags is not None else None
        problem = state.problem
        if prog and stray and not problem:  # it would read and write maps nobody else sees (a map pin was replaced)
            problem = f"program {prog.id} uses maps {list(stray)} that are not pinned in {directory}"
        outdated = bool(prog and want and prog.tag != want)
        if prog and outdated and not problem:
            problem = f"program {prog.id} is another build's (tag {prog.tag}, this agent's {want})"
        states[i] = dataclasses.replace(state, problem=problem, stray_maps=stray, outdated=outdated)
    return PodBpf(uid, directory, tuple(states), map_states)


def pinned_uids(pin_root: str = PIN_ROOT) -> tuple[str, ...]:
    """Pod uids with a pin directory (capture left by any run of the agent)."""
    try:
        return tuple(sorted(e.name for e in os.scandir(pin_root) if e.is_dir() and e.name != FASTPATH_DIR))
    except FileNotFoundError:
        return ()
