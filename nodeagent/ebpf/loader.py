"""Compiling (once), loading, pinning and attaching each pod's capture programs: the only module that imports bcc.

The design (why these hooks):

- OUTBOUND, cgroup/connect4 on the pod's cgroup (connect4.c). connect(2) of a process in the pod has its
  destination rewritten to the tunnel's :15001 listener in the pod's netns before the route lookup: no
  NAT, no conntrack, nothing per packet; with no tunnel listening the connect is refused (fail closed).
  The tunnel lives in the node's cgroup, so its own sockets in the pod's netns are never rewritten (no
  loop); loopback, the pod's own IP, the tunnel ports and sockets with the tunnel's mark are skipped too.
- THE SAME, cgroup/connect6 on the pod's cgroup (connect6.c). An IPv6 socket connecting to an IPv4-mapped
  address (::ffff:a.b.c.d, how Java's and .NET's dual-mode sockets reach IPv4) runs connect6 and never
  connect4, yet sends IPv4: without this hook it would leave the pod around the tunnel. It makes connect4's
  decision (one function in nodeagent.h) and rewrites to ::ffff:<pod IP>:15001; other IPv6 is left alone.
- ORIGINAL DESTINATION, sock_ops on the pod's cgroup (sockops.c). connect4 cannot know the source port
  yet, so it records the original destination by socket cookie; TCP_CONNECT_CB (source port chosen, SYN
  not yet sent) re-keys it by (source ip, source port) in the pinned map map_orig_dst, which the tunnel
  reads with the accepted socket's peer address (nodeagent.ebpf.maps, no bcc there). Merbridge answers
  SO_ORIGINAL_DST with a cgroup/getsockopt program instead; that would have to run in the *tunnel's*
  cgroup, coupling capture to where the tunnel runs, so a map it reads was preferred.
- INBOUND, sk_lookup on the pod's netns (sk_lookup.c). A SYN that finds no established socket is
  assigned (bpf_sk_assign) to the tunnel's :15006 listener, which the tunnel puts in the pinned SOCKMAP
  map_listener. No NAT and no per-packet program (unlike tc + bpf_sk_assign on eth0), any port, and the
  accepted socket's local address IS the original destination. SYNs from the pod's own address (the pod
  calling itself, the tunnel's connection to the app) and to :15008 (HBONE) are left alone; with no listener in
  the map the SYN is refused (fail closed). bpf_sk_assign needs no IP_TRANSPARENT listener here.

COMPILE ONCE, LOAD PER POD. bcc compiles the unit once per agent process (`compiled()`: ~0.5-1 s of
LLVM, which per pod made a namespace of 200 pods take minutes); the instructions it produced refer to maps
by fd, and `load()` points them at the pod's own maps (`relocate()`, what libbpf does for ELF objects)
and loads them with bpf(2). What differs between pods is data, in the pod's map_config (its IP), so the
code is the same for all. Every object is pinned under /sys/fs/bpf/nodeagent/<pod uid>/: maps (map_*,
re-opened when their layout is the compiled one, so a reload keeps their contents), programs
(prog_<hook>) and links (link_<hook>; the link is the attachment, so a pinned link keeps capture working
while no agent runs). `ensure()` reads what the kernel has first and loads only when a program pin is
missing, uses maps that are not the pinned ones, or is another build's (its kernel tag differs from this
build's, read once from a reference load: an upgraded agent); a reloaded program goes into the pod's
existing link in place (BPF_LINK_UPDATE, never a moment without capture); links that were detached or
unpinned are re-created from the pinned program. `remove()` detaches and unpins everything, idempotently.

- SOURCE-IP PRESERVATION (the tunnel connects to the app from the client's IP): sk_lookup cannot see
  socket marks, so the tunnel names its transparent upstream socket's address in map_bypass before
  connecting (sk_lookup passes it, sockops deletes the entry once the app accepted); the app's socket takes
  the SYN's mark 0x111 (tcp_fwmark_accept, set by nodeagent.capture.ebpf) and the pod's policy routing
  delivers its replies to the tunnel.
- SAME-NODE FAST PATH (fastpath.c, node-wide, `ensure_fastpath()`): an sk_skb verdict on a pinned
  SOCKHASH redirects each skb of a relayed socket to its peer's egress; maps.fastpath_splice() hands a
  pair of sockets over in order. Measured by bench/ebpf_fastpath.py; the tunnel splices instead
  (nodeagent/ztunnel/local.py says why).

What it deliberately does not do: no reading of state for inspection (pins.py, usable without bcc), no
decision about which pods are captured (the agent), no tc, no IPv6 capture: connect6.c only makes
connect4's decision for IPv4 reached through IPv6 sockets (::ffff:a.b.c.d); native IPv6 destinations are
left alone (pods have IPv4 addresses) and inbound IPv6 is refused by sk_lookup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.ebpf import maps, pins
from nodeagent.ebpf.structs import (
    FASTPATH_DIR,
    MAP_CONFIG,
    MAP_FP_PEER,
    MAP_FP_SOCKS,
    MAP_FP_STATS,
    MAPS,
    PIN_ROOT,
    PROG_FP_VERDICT,
    NaConfig,
    map_pin,
    pin_dir,
)

log = logging.getLogger(__name__)

PROGRAMS_DIR = Path(__file__).with_name("programs")
HEADER = "nodeagent.h"
BPFFS = "/sys/fs/bpf"
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


class EbpfUnavailable(RuntimeError):
    """eBPF capture cannot work here; the message names what is missing and how to fix it."""


@dataclass(frozen=True, slots=True)
class BuildConfig:
    """What the programs are compiled with: the same for every pod of a node (each becomes a -D flag)."""

    outbound_port: int = 15001
    inbound_port: int = 15006
    hbone_port: int = 15008
    tunnel_mark: int = 0x539

    def cflags(self) -> list[str]:
        return [
            f"-I{PROGRAMS_DIR}",
            f"-DNA_OUTBOUND_PORT={self.outbound_port}",
            f"-DNA_INBOUND_PORT={self.inbound_port}",
            f"-DNA_HBONE_PORT={self.hbone_port}",
            f"-DNA_TUNNEL_MARK={self.tunnel_mark:#x}",
        ]


@dataclass(frozen=True, slots=True)
class PodConfig:
    """One pod's capture: where its objects are pinned, what goes into its na_config, and the build."""

    uid: str
    pod_ip: ipaddress.IPv4Address | None
    pin_root: str = PIN_ROOT
    build: BuildConfig = BuildConfig()

    def __post_init__(self) -> None:
        if not _UID.fullmatch(self.uid) or self.uid == FASTPATH_DIR:
            raise ValueError(f"pod uid {self.uid!r} cannot name a pin directory")

    @property
    def pin_dir(self) -> str:
        return pin_dir(self.uid, self.pin_root)

    def na_config(self) -> bytes:
        """The value of slot 0 of the pod's map_config (struct na_config)."""
        return bytes(NaConfig.of(self.pod_ip))


def source() -> str:
    """The C unit bcc compiles: the header, then one file per attach point, as they are.

    bcc rewrites map accesses (`map.lookup(...)`) only in the text it is given, not in files it
    #includes, so the header is part of the text; its include guard makes each file's own #include a no-op.
    """
    parts = [(PROGRAMS_DIR / HEADER).read_text()]
    parts += [(PROGRAMS_DIR / hook.file).read_text() for hook in pins.HOOKS]
    return "\n".join(parts)


def annotated_source(build: BuildConfig) -> str:
    """source() preceded by a comment with the exact compiler flags (`nodeagent ebpf source`)."""
    flags = "\n".join(f" *   {flag}" for flag in build.cflags())
    files = ", ".join([HEADER, *(hook.file for hook in pins.HOOKS)])
    header = (
        f"/* nodeagent eBPF unit ({files}), compiled by bcc once per agent and loaded for every pod, with:\n"
        f"{flags}\n * Per pod: its own maps, pinned under {PIN_ROOT}/<pod uid>/, and its IP in map_config.\n */\n"
    )
    return header + source()


# --- relocation: one compiled program, any pod's maps ----------------------------------------------------

_LD_IMM64 = 0x18  # BPF_LD | BPF_DW | BPF_IMM: a 64-bit immediate load spanning two instruction slots
_PSEUDO_MAP_FD = 1  # src_reg of an LD_IMM64 whose imm is a map fd
_PSEUDO_MAP_VALUE = 2  # ... whose imm is a map fd and the next slot's imm an offset into its value


def map_references(insns: bytes) -> tuple[int, ...]:
    """The map fds the instructions load (LD_IMM64 with a map pseudo source), in order, with repeats."""
    return tuple(fd for _, fd in _map_slots(insns))


def relocate(insns: bytes, fds: dict[int, int]) -> bytes:
    """`insns` with every map fd `a` they load replaced by `fds[a]`; what the kernel relocates no further.

    This is what loading a compiled object always does (libbpf does it for ELF objects): the
    instructions name maps by fd, so one compile serves every pod once the fds are the pod's. An fd with
    no replacement is an error, never left pointing at whatever that number is now.
    """
    out = bytearray(insns)
    for offset, fd in _map_slots(insns):
        if fd not in fds:
            raise ValueError(f"instruction {offset // 8} loads map fd {fd}, which is not one of the program's maps")
        out[offset + 4 : offset + 8] = fds[fd].to_bytes(4, "little", signed=True)
    return bytes(out)


def _map_slots(insns: bytes) -> Iterator[tuple[int, int]]:
    if len(insns) % 8:
        raise ValueError(f"{len(insns)} bytes are not whole BPF instructions")
    offset = 0
    while offset < len(insns):
        if insns[offset] == _LD_IMM64:
            if insns[offset + 1] >> 4 in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
                yield offset, int.from_bytes(insns[offset + 4 : offset + 8], "little", signed=True)
            offset += 16
        else:
            offset += 8


@dataclass(frozen=True, slots=True)
class Compiled:
    """The programs as bcc compiled them, ready to be loaded for any pod (`load()` relocates them).

    bcc created the maps the code references while compiling; their fds are kept in the instructions as
    placeholders, each with the layout (and BTF type ids) of the map it stood for. `btf` is this
    process's copy of the BTF object describing the maps' types, held open so every pod's maps carry it.
    """

    license: bytes
    programs: dict[str, bytes]  # function name -> instructions with placeholder map fds
    layouts: dict[int, maps.MapInfo]  # placeholder fd -> the map's layout, name and BTF type ids
    btf: maps.Fd | None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)  # hook name -> the kernel's tag of its program


_compile_lock = threading.Lock()  # one compile at a time in this process
_compiled: dict[BuildConfig, Compiled] = {}
COMPILE_TIMEOUT = 120.0


def compiled(build: BuildConfig) -> Compiled:
    """The programs for `build`, compiled on first use in this process and kept.

    bcc runs in a child process (`python -m nodeagent.ebpf.loader`): importing it maps LLVM and clang
    into the process and a compile leaves ~40 MB of LLVM heap behind (measured: RSS 10 -> 146 MB), which
    an agent would carry for its lifetime. The child hands back the instructions, the maps' layouts and
    the raw BTF, and exits; this process loads the BTF and makes each pod's maps itself.
    """
    with _compile_lock:
        if build not in _compiled:
            _compiled[build] = _compile(build)
        return _compiled[build]


def _compile(build: BuildConfig) -> Compiled:
    argv = [sys.executable, "-m", __name__, json.dumps(dataclasses.asdict(build))]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMPILE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise EbpfUnavailable(f"compiling nodeagent's programs took over {COMPILE_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        raise EbpfUnavailable(why)
    unit = json.loads(done.stdout)
    btf = maps.btf_load(bytes.fromhex(unit["btf"])) if unit["btf"] else None
    log.info("compiled nodeagent's programs (%s) with %s", ", ".join(unit["programs"]), " ".join(build.cflags()[1:]))
    program = Compiled(
        unit["license"].encode(),
        {name: bytes.fromhex(code) for name, code in unit["programs"].items()},
        {int(fd): maps.MapInfo(**layout) for fd, layout in unit["layouts"].items()},
        btf,
    )
    return dataclasses.replace(program, tags=_reference_tags(program))


def _reference_tags(program: Compiled) -> dict[str, str]:
    """The kernel's tag of each of this build's programs (hook name -> tag), from one load on throwaway maps.

    How `ensure()` tells a pinned program of another build (an agent upgrade, a changed source) from this
    one's: the kernel hashes a program's instructions with its map references blanked (bpf_prog_calc_tag),
    so every pod's copy of one build has the same tag. It hashes them after its own rewrites, though: the
    tag is not the SHA-1 of the compiled bytes (measured), so it is read back from a load.
    """
    made: dict[int, maps.Fd] = {}
    try:
        for placeholder, layout in program.layouts.items():
            made[placeholder] = maps.map_create(layout, program.btf)
        targets = {placeholder: fd.fd for placeholder, fd in made.items()}
        tags = {}
        for hook in pins.HOOKS:
            with _load_program(hook, relocate(program.programs[hook.function], targets), program.license) as fd:
                tags[hook.name] = maps.prog_info(fd.fd).tag
        return tags
    except maps.BpfError as exc:
        raise EbpfUnavailable(f"loading nodeagent's programs once to read their tags failed: {exc}") from None
    finally:
        for fd in made.values():
            fd.close()


def _load_program(hook: pins.Hook, insns: bytes, license: bytes) -> maps.Fd:
    try:
        return maps.prog_load(int(hook.prog_type), insns, hook.function, license, int(hook.attach_type))
    except maps.BpfError as exc:
        raise EbpfUnavailable(
            f"the kernel refused program {hook.function} ({hook.prog_type.name.lower()}, attach "
            f"{hook.attach_type.name.lower()}): {exc}; the kernel is too old or built without this program "
            "type - use --capture iptables"
        ) from None


def _compile_here(build: BuildConfig) -> dict[str, Any]:
    """(In the child) compile with bcc and describe the result as JSON-able data for `_compile()`."""
    bcc = _import_bcc()
    try:
        module = bcc.BPF(text=source().encode(), cflags=build.cflags())
    except Exception as exc:
        hint = "" if kernel_headers() else " (no kernel headers: `sudo make setup`)"
        raise EbpfUnavailable(f"bcc could not compile nodeagent's programs: {exc}{hint}") from None
    programs = {hook.function: bytes(module.dump_func(hook.function.encode())) for hook in pins.HOOKS}
    placeholders = {fd for insns in programs.values() for fd in map_references(insns)}
    layouts = {fd: maps.map_info(fd) for fd in placeholders}
    pinned = sorted(map_pin(info.name) for info in layouts.values())
    if pinned != sorted(MAPS):
        raise EbpfUnavailable(f"the programs use maps {pinned}, but nodeagent pins {sorted(MAPS)}: build mismatch")
    btf_ids = {info.btf_id for info in layouts.values() if info.btf_id}
    if len(btf_ids) > 1:
        raise EbpfUnavailable(f"the programs' maps have {len(btf_ids)} BTF objects; nodeagent expects bcc's one")
    btf = b""
    for btf_id in btf_ids:
        with maps.btf_fd_by_id(btf_id) as fd:
            btf = maps.btf_raw(fd.fd)
    return {
        "license": bytes(bcc.libbcc.lib.bpf_module_license(module.module)).decode(),
        "programs": {name: code.hex() for name, code in programs.items()},
        "layouts": {str(fd): dataclasses.asdict(info) for fd, info in layouts.items()},
        "btf": btf.hex(),
    }


# --- environment -------------------------------------------------------------------------------------------


def _cap_eff() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def kernel_headers() -> Path | None:
    release = os.uname().release
    for sub in ("build", "source"):
        base = Path("/lib/modules") / release / sub
        if (base / "include/linux/kconfig.h").exists():
            return base
    return None


def ensure_bpffs(path: str = BPFFS) -> bool:
    """Mount a bpf filesystem at `path` when none is there (idempotent); True when this call mounted it."""
    if maps.is_bpffs(path) and _mountpoint(path):
        return False
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "bpf", "bpf", path], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise EbpfUnavailable(
            f"{path} is not a bpf filesystem and mounting one failed ({done.stderr.strip()}): "
            f"run `mount -t bpf bpf {path}` as root (in Kubernetes, mount the host's /sys/fs/bpf)"
        )
    log.warning("mounted a bpf filesystem at %s (it was not mounted)", path)
    return True


def _mountpoint(path: str) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == path.rstrip("/") and line.split()[2] == "bpf" for line in mounts)


_NO_BCC = (
    "bcc's Python bindings are not importable: run `sudo make setup` (it installs Debian's python3-bpfcc and "
    "links it into .venv); the PyPI package named bcc is unrelated"
)


def _import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise EbpfUnavailable(f"{_NO_BCC} ({exc})") from None
    return bcc


def check_environment(*, mount: bool = True) -> None:
    """Raise EbpfUnavailable naming the first thing missing for eBPF capture; mount bpffs if `mount`."""
    caps = _cap_eff()
    if os.geteuid() != 0 and not (caps >> CAP_BPF & 1 and caps >> CAP_NET_ADMIN & 1):
        raise EbpfUnavailable(
            "eBPF capture needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN (setns, cgroup attach): "
            "run with sudo, or add those capabilities to the agent's container"
        )
    if kernel_headers() is None:
        raise EbpfUnavailable(
            f"no kernel headers for {os.uname().release} under /lib/modules/{os.uname().release}/build: bcc "
            "compiles against them. Run `sudo make setup` (links Debian's linux-headers there) or "
            f"`apt-get install linux-headers-{os.uname().release}`"
        )
    release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    if release < (5, 10):
        raise EbpfUnavailable(
            f"kernel {os.uname().release} is too old for eBPF capture: it needs sk_lookup with bpf_sk_assign "
            "(5.9) and BPF links for cgroup and netns programs; use --capture iptables"
        )
    if not Path("/sys/fs/cgroup").exists() or not _cgroup2_mounted():
        raise EbpfUnavailable("no cgroup v2 hierarchy is mounted: eBPF capture attaches to pods' cgroup v2 dirs")
    if importlib.util.find_spec("bcc") is None:  # not imported here: compiled() runs bcc in a child
        raise EbpfUnavailable(_NO_BCC)
    if mount:
        ensure_bpffs()
    elif not maps.is_bpffs(BPFFS):
        raise EbpfUnavailable(f"{BPFFS} is not a bpf filesystem: `mount -t bpf bpf {BPFFS}`")


def _cgroup2_mounted() -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[2] == "cgroup2" for line in mounts)


# --- load, attach, remove ------------------------------------------------------------------------------------


def load(config: PodConfig) -> dict[str, maps.Fd]:
    """Load and pin (prog_<hook>) the pod's copy of every program, bound to the pod's own maps.

    The maps are adopted from their pins when their layout is the compiled one, else created and pinned.
    Compiles only on the first call in the process (`compiled()`). Returns an open fd per hook name; the
    caller closes them. Raises EbpfUnavailable when the kernel refuses a program (naming it and why).
    """
    program = compiled(config.build)
    os.makedirs(config.pin_dir, exist_ok=True)
    pod_maps = _ensure_maps(program, config.pin_dir)
    fds: dict[str, maps.Fd] = {}
    try:
        targets = {placeholder: fd.fd for placeholder, fd in pod_maps.items()}
        for hook in pins.HOOKS:
            fd = _load_program(hook, relocate(program.programs[hook.function], targets), program.license)
            fds[hook.name] = fd
            path = os.path.join(config.pin_dir, hook.prog_pin)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            maps.obj_pin(fd.fd, path)
    except BaseException:
        for fd in fds.values():
            fd.close()
        raise
    finally:
        for fd in pod_maps.values():
            fd.close()
    log.info("pod %s: loaded and pinned %s under %s", config.uid, ", ".join(fds), config.pin_dir)
    return fds


def _ensure_maps(program: Compiled, directory: str) -> dict[int, maps.Fd]:
    """The pod's maps by placeholder fd: each pin re-opened when its layout is the compiled one, else made."""
    opened: dict[int, maps.Fd] = {}
    try:
        for placeholder, layout in program.layouts.items():
            path = os.path.join(directory, map_pin(layout.name))
            fd = _open_map(path, layout)
            created = fd is None
            fd = opened[placeholder] = fd or maps.map_create(layout, program.btf)
            if created:
                maps.obj_pin(fd.fd, path)
    except BaseException:
        for fd in opened.values():
            fd.close()
        raise
    return opened


def _open_map(path: str, layout: maps.MapInfo) -> maps.Fd | None:
    """The pinned map at `path` if it has `layout`; a pin of another layout is unpinned (and None returned)."""
    try:
        fd = maps.obj_get(path)
    except maps.BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    info = maps.map_info(fd.fd)
    if info.same_layout(layout):
        return fd
    fd.close()
    log.warning("%s has another layout than the compiled %s (%s): recreating it", path, layout.name, info)
    os.unlink(path)
    return None


def _configure(config: PodConfig) -> str | None:
    """Make slot 0 of the pod's map_config hold its settings; what it held instead, if anything."""
    want = config.na_config()
    with maps.obj_get(os.path.join(config.pin_dir, MAP_CONFIG)) as fd:
        had = maps.lookup(fd.fd, bytes(4), len(want)) or bytes(len(want))
        if had == want:
            return None
        maps.update(fd.fd, bytes(4), want)
    before = NaConfig.from_buffer_copy(had).pod_ip
    return f"map_config held pod IP {before or 'none'}, not {config.pod_ip or 'none'}: rewrote it"


@contextlib.contextmanager
def _open_target(path: str) -> Iterator[maps.Fd]:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    except FileNotFoundError:
        raise EbpfUnavailable(f"{path} does not exist (was the pod deleted?)") from None
    with maps.Fd(fd) as owned:
        yield owned


def ensure(config: PodConfig, cgroup: str, netns: str) -> tuple[str, ...]:
    """Make the kernel hold the pod's programs, pinned and attached; return what was repaired (empty: nothing).

    Adopts what exists: a program pin of this build (its kernel tag is this build's, see `_reference_tags`)
    that uses the pod's pinned maps is reused (nothing loaded), a link that is pinned and attached to the
    right cgroup/netns is left alone, and map_config is rewritten only when it does not hold the pod's IP.
    A pinned program of another build (the agent was upgraded) is reloaded and swapped into its link in
    place (BPF_LINK_UPDATE), so the pod is never without capture while its programs change.
    """
    program = compiled(config.build)  # known before adopting anything: the pins may hold another build's
    os.makedirs(config.pin_dir, exist_ok=True)
    targets = {"cgroup": cgroup, "netns": netns}
    observed = pins.observe(config.uid, cgroup, netns, config.pin_root, program.tags)
    repaired: list[str] = []
    fresh: dict[str, maps.Fd] = {}
    try:
        stale = [h for h in observed.hooks if h.prog is None or h.stray_maps or h.outdated]
        if stale or any(m.info is None for m in observed.maps):
            fresh = load(config)
            why = "; ".join(f"{h.hook.name}: {h.problem}" for h in stale) or "a map was not pinned"
            repaired.append(f"{why}: loaded and pinned the programs again")
        note = _configure(config)
        if note and not fresh:  # a fresh load reports itself
            repaired.append(note)
        for state in observed.hooks:
            hook = state.hook
            if hook.name not in fresh and state.ok:
                continue
            link_path = os.path.join(config.pin_dir, hook.link_pin)
            runs_other = state.link is not None and (state.prog is None or state.link.prog_id != state.prog.id)
            if state.in_place and state.link is not None and (hook.name in fresh or runs_other):
                # Attached where it belongs, with a program to replace (reloaded here, or another agent's
                # during a rolling update): swap it inside the link, so the hook never runs empty.
                new = fresh.get(hook.name) or maps.obj_get(os.path.join(config.pin_dir, hook.prog_pin))
                try:
                    with maps.obj_get(link_path) as link, maps.prog_fd_by_id(state.link.prog_id) as old:
                        maps.link_update(link.fd, new.fd, old.fd)
                finally:
                    if hook.name not in fresh:
                        new.close()
                repaired.append(f"{hook.name}: swapped the program in link {state.link.id} in place")
                continue
            _unpin_link(link_path)
            prog = fresh.get(hook.name) or maps.obj_get(os.path.join(config.pin_dir, hook.prog_pin))
            try:
                with _open_target(targets[hook.target]) as target:
                    try:
                        link = maps.link_create(prog.fd, target.fd, int(hook.attach_type))
                    except maps.BpfError as exc:
                        raise EbpfUnavailable(
                            f"attaching {hook.function} to {targets[hook.target]} failed: {exc}"
                            + (
                                "; another program owns this attach point exclusively?"
                                if exc.errno == errno.EBUSY
                                else ""
                            )
                        ) from None
                with link:
                    maps.obj_pin(link.fd, link_path)
            finally:
                if hook.name not in fresh:
                    prog.close()
            if hook.name not in fresh:
                repaired.append(f"{hook.name}: {state.problem or 'not attached'}; attached it again")
            elif state.link is not None or state.prog is not None:
                repaired.append(f"{hook.name}: re-attached the reloaded program")
            else:
                repaired.append(f"{hook.name}: attached to {targets[hook.target]}")
    finally:
        for fd in fresh.values():
            fd.close()
    return tuple(repaired)


def _unpin_link(path: str) -> None:
    """Detach and unpin a link pin if there is one (a detached link's pin is just garbage)."""
    try:
        with maps.obj_get(path) as link, contextlib.suppress(maps.BpfError):
            maps.link_detach(link.fd)
    except maps.BpfError as exc:
        if exc.errno != errno.ENOENT:
            raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def remove(uid: str, pin_root: str = PIN_ROOT) -> bool:
    """Detach every link of the pod and delete its pin directory; False when there was nothing."""
    directory = pin_dir(uid, pin_root)
    if not os.path.isdir(directory):
        return False
    for hook in pins.HOOKS:
        _unpin_link(os.path.join(directory, hook.link_pin))
    shutil.rmtree(directory, ignore_errors=True)
    if os.path.exists(directory):
        raise EbpfUnavailable(f"could not remove {directory}; remove it by hand with `rm -r {directory}`")
    return True


# --- the node-wide same-node fast path (programs/fastpath.c) ---------------------------------------------

FASTPATH_FILE = "fastpath.c"
FASTPATH_FUNCTION = "na_fp_verdict"
_FP_MAPS = {"na_fp_socks": MAP_FP_SOCKS, "na_fp_peer": MAP_FP_PEER, "na_fp_stats": MAP_FP_STATS}


def ensure_fastpath(pin_root: str = PIN_ROOT) -> tuple[str, ...]:
    """Pin the fast-path maps and verdict program and attach it to the SOCKHASH; adopt them when present."""
    directory = f"{pin_root}/{FASTPATH_DIR}"
    socks = f"{directory}/{MAP_FP_SOCKS}"
    prog = f"{directory}/{PROG_FP_VERDICT}"
    if all(os.path.exists(p) for p in (socks, prog, f"{directory}/{MAP_FP_PEER}")):
        with maps.obj_get(socks) as m, maps.obj_get(prog) as p:
            if maps.prog_info(p.fd).id in maps.prog_query(m.fd, int(maps.AttachType.SK_SKB_VERDICT)):
                return ()
            maps.prog_attach(m.fd, p.fd, int(maps.AttachType.SK_SKB_VERDICT))
            return ("fast path: re-attached the verdict program to the SOCKHASH",)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    bcc = _import_bcc()
    module = bcc.BPF(text=(PROGRAMS_DIR / FASTPATH_FILE).read_bytes())
    try:
        fn = module.load_func(
            FASTPATH_FUNCTION.encode(), int(maps.ProgType.SK_SKB), attach_type=int(maps.AttachType.SK_SKB_VERDICT)
        )
        maps.obj_pin(fn.fd, prog)
        for map_id in maps.prog_info(fn.fd).map_ids:
            with maps.map_fd_by_id(map_id) as m:
                name = maps.map_info(m.fd).name
                if name in _FP_MAPS:
                    maps.obj_pin(m.fd, f"{directory}/{_FP_MAPS[name]}")
        with maps.obj_get(socks) as m:
            maps.prog_attach(m.fd, fn.fd, int(maps.AttachType.SK_SKB_VERDICT))
    finally:
        with contextlib.suppress(Exception):
            module.cleanup()
    log.info("same-node fast path: compiled, pinned and attached under %s", directory)
    return ("fast path: compiled, pinned and attached",)


def remove_fastpath(pin_root: str = PIN_ROOT) -> bool:
    directory = f"{pin_root}/{FASTPATH_DIR}"
    if not os.path.isdir(directory):
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


if __name__ == "__main__":  # the compile child of `compiled()`: one BuildConfig as JSON in, the unit as JSON out
    try:
        print(json.dumps(_compile_here(BuildConfig(**json.loads(sys.argv[1])))))
    except EbpfUnavailable as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
