"""Compiling, loading, pinning and attaching one pod's capture programs: the only module that imports bcc.

The design (why these hooks):

- OUTBOUND, cgroup/connect4 on the pod's cgroup (connect4.c). connect(2) of a process in the pod has its
  destination rewritten to the tunnel's :15001 listener in the pod's netns before the route lookup: no
  NAT, no conntrack, nothing per packet; with no tunnel listening the connect is refused (fail closed).
  The tunnel lives in the node's cgroup, so its own sockets in the pod's netns are never rewritten (no
  loop); loopback, the pod's own IP, the tunnel ports and sockets with the tunnel's mark are skipped too.
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

Every object is pinned under /sys/fs/bpf/nodeagent/<pod uid>/: maps (map_*, created and re-opened by bcc's
BPF_TABLE_PINNED, so a reload keeps their contents), programs (prog_<hook>) and links (link_<hook>; the
link is the attachment, so a pinned link keeps capture working while no agent runs). `ensure()` reads
what the kernel has first and only compiles when a program pin is missing; links that were detached or
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
decision about which pods are captured (the agent), no tc, no IPv6 capture (connect6 would mirror
connect4 when pods get IPv6 addresses).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.ebpf import maps, pins
from nodeagent.ebpf.structs import (
    FASTPATH_DIR,
    MAP_FP_PEER,
    MAP_FP_SOCKS,
    MAP_FP_STATS,
    MAPS,
    PIN_ROOT,
    PROG_FP_VERDICT,
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
class PodConfig:
    """Everything one pod's programs are compiled with (each becomes a -D flag)."""

    uid: str
    pod_ip: ipaddress.IPv4Address | None
    pin_root: str = PIN_ROOT
    outbound_port: int = 15001
    inbound_port: int = 15006
    hbone_port: int = 15008
    tunnel_mark: int = 0x539

    def __post_init__(self) -> None:
        if not _UID.match(self.uid) or self.uid == FASTPATH_DIR:
            raise ValueError(f"pod uid {self.uid!r} cannot name a pin directory")

    @property
    def pin_dir(self) -> str:
        return pin_dir(self.uid, self.pin_root)

    def cflags(self) -> list[str]:
        ip = int(self.pod_ip) if self.pod_ip is not None else 0
        return [
            f"-I{PROGRAMS_DIR}",
            f'-DNA_PIN_DIR="{self.pin_dir}"',
            f"-DNA_POD_IP4={ip:#010x}U",
            f"-DNA_OUTBOUND_PORT={self.outbound_port}",
            f"-DNA_INBOUND_PORT={self.inbound_port}",
            f"-DNA_HBONE_PORT={self.hbone_port}",
            f"-DNA_TUNNEL_MARK={self.tunnel_mark:#x}",
        ]


def source(config: PodConfig) -> str:
    """The C unit bcc compiles for `config`: the header, then one file per attach point, as they are.

    bcc rewrites map accesses (`map.lookup(...)`) only in the text it is given, not in files it
    #includes, so the header is part of the text; its include guard makes each file's own #include a no-op.
    """
    parts = [(PROGRAMS_DIR / HEADER).read_text()]
    parts += [(PROGRAMS_DIR / hook.file).read_text() for hook in pins.HOOKS]
    return "\n".join(parts)


def annotated_source(config: PodConfig) -> str:
    """source() preceded by a comment with the exact compiler flags (`nodeagent ebpf source`)."""
    flags = "\n".join(f" *   {flag}" for flag in config.cflags())
    files = ", ".join([HEADER, *(hook.file for hook in pins.HOOKS)])
    header = f"/* nodeagent eBPF unit for pod {config.uid} ({files}), compiled by bcc with:\n{flags}\n */\n"
    return header + source(config)


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


def _import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise EbpfUnavailable(
            f"bcc's Python bindings are not importable ({exc}): run `sudo make setup` (it installs Debian's "
            "python3-bpfcc and links it into .venv); the PyPI package named bcc is unrelated"
        ) from None
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
    _import_bcc()
    if mount:
        ensure_bpffs()
    elif not maps.is_bpffs(BPFFS):
        raise EbpfUnavailable(f"{BPFFS} is not a bpf filesystem: `mount -t bpf bpf {BPFFS}`")


def _cgroup2_mounted() -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[2] == "cgroup2" for line in mounts)


# --- load, attach, remove ------------------------------------------------------------------------------------


def load(config: PodConfig) -> dict[str, maps.Fd]:
    """Compile the unit with bcc, load every program and pin it (prog_<hook>); maps pin themselves.

    Returns an open fd per hook name; the caller closes them. Raises EbpfUnavailable when the kernel
    refuses a program (naming it and the likely cause).
    """
    bcc = _import_bcc()
    os.makedirs(config.pin_dir, exist_ok=True)
    _drop_incompatible_maps(config.pin_dir)
    try:
        module = bcc.BPF(text=source(config).encode(), cflags=config.cflags())
    except Exception as exc:
        hint = "" if kernel_headers() else " (no kernel headers: `sudo make setup`)"
        raise EbpfUnavailable(f"bcc could not compile nodeagent's programs: {exc}{hint}") from None
    fds: dict[str, maps.Fd] = {}
    try:
        for hook in pins.HOOKS:
            try:
                fn = module.load_func(hook.function.encode(), int(hook.prog_type), attach_type=int(hook.attach_type))
            except Exception as exc:
                raise EbpfUnavailable(
                    f"the kernel refused program {hook.function} ({hook.prog_type.name.lower()}, attach "
                    f"{hook.attach_type.name.lower()}): {exc}; the kernel is too old or built without this program "
                    "type - use --capture iptables"
                ) from None
            fd = maps.Fd(os.dup(fn.fd))
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
        with contextlib.suppress(Exception):
            module.cleanup()
    log.info("pod %s: compiled and pinned %s under %s", config.uid, ", ".join(fds), config.pin_dir)
    return fds


# (key size, value size) of each pinned map as the header declares it. BPF_TABLE_PINNED re-opens a pin
# without comparing layouts, so a pin left by an older layout is dropped here and created afresh.
MAP_LAYOUT = {
    MAPS[0]: (8, 16),  # map_cookie_dst: __u64 -> struct na_orig
    MAPS[1]: (8, 16),  # map_orig_dst: struct na_addr4 -> struct na_orig
    MAPS[2]: (4, 4),  # map_listener: int -> socket
    MAPS[3]: (8, 4),  # map_bypass: struct na_addr4 -> __u32
    MAPS[4]: (4, 8),  # map_stats: int -> __u64
}


def _drop_incompatible_maps(directory: str) -> None:
    for name, (key_size, value_size) in MAP_LAYOUT.items():
        path = os.path.join(directory, name)
        try:
            with maps.obj_get(path) as fd:
                info = maps.map_info(fd.fd)
        except maps.BpfError:
            continue
        if (info.key_size, info.value_size) != (key_size, value_size):
            log.warning(
                "%s has layout %d/%d, not %d/%d: recreating it",
                path,
                info.key_size,
                info.value_size,
                key_size,
                value_size,
            )
            os.unlink(path)


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

    Adopts what exists: a program pin is reused (no compile) and a link that is pinned and attached to
    the right cgroup/netns is left alone.
    """
    os.makedirs(config.pin_dir, exist_ok=True)
    targets = {"cgroup": cgroup, "netns": netns}
    observed = pins.observe(config.uid, cgroup, netns, config.pin_root)
    repaired: list[str] = []
    fresh: dict[str, maps.Fd] = {}
    try:
        if any(h.prog is None for h in observed.hooks):
            missing = [h.hook.name for h in observed.hooks if h.prog is None]
            fresh = load(config)
            repaired.append(f"programs {', '.join(missing)} were not pinned: compiled and pinned them")
        for state in observed.hooks:
            hook = state.hook
            if hook.name not in fresh and state.ok:
                continue
            link_path = os.path.join(config.pin_dir, hook.link_pin)
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
            elif state.link is not None or state.problem:
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
