"""The bpf(2) system call through ctypes: pinned objects, map elements, links and kernel queries.

Why this module exists: reading and repairing pinned BPF state must not need bcc (which compiles C, pulls
in LLVM and is imported in exactly one module, nodeagent.ebpf.loader). The tunnel reads original
destinations and registers its :15006 listener through this module; the capture backend uses it to
open pins, create and pin links, ask the kernel what is attached where (BPF_PROG_QUERY) and describe
programs, maps and links (BPF_OBJ_GET_INFO_BY_FD). Every function is a thin, blocking system call; errors
are `BpfError` (an OSError) naming the operation, the object and a likely fix.

It also creates maps and loads programs from instructions bcc has already compiled (`map_create`,
`prog_load`): the loader compiles the C once per process and loads each pod's copy of the programs
against that pod's own maps, which is a bpf(2) call, not a compile.

What it deliberately does not do: no compiling (loader.py, the only bcc user), no policy about which
pins should exist (capture/ebpf.py), no caching of fds (callers close what they open: `Fd` is a context
manager).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from nodeagent.ebpf.structs import (
    FASTPATH_DIR,
    MAP_BYPASS,
    MAP_FP_PEER,
    MAP_FP_SOCKS,
    MAP_LISTENER,
    MAP_ORIG_DST,
    PIN_ROOT,
    NaAddr4,
    NaOrig,
    pin_dir,
)

# linux/bpf.h commands
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_BTF_LOAD = 18
BPF_BTF_GET_FD_BY_ID = 19
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_DETACH = 34

BPF_ANY = 0
BPF_NOEXIST = 1
SYS_BPF = 321  # x86-64; arm64 is 280 (see _sys_bpf_number)
SOL_SOCKET = 1
SO_NETNS_COOKIE = 71


class AttachType(enum.IntEnum):
    """enum bpf_attach_type values nodeagent uses (names as bpftool prints them, minus the prefix)."""

    CGROUP_INET_INGRESS = 0
    CGROUP_SOCK_OPS = 3
    SK_SKB_STREAM_PARSER = 4
    SK_SKB_STREAM_VERDICT = 5
    SK_MSG_VERDICT = 7
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    SK_LOOKUP = 36
    SK_SKB_VERDICT = 38


class ProgType(enum.IntEnum):
    SCHED_CLS = 3
    SOCK_OPS = 13
    SK_SKB = 14
    SK_MSG = 16
    CGROUP_SOCK_ADDR = 18
    SK_LOOKUP = 30


class LinkType(enum.IntEnum):
    CGROUP = 3
    NETNS = 5


class BpfError(OSError):
    """A bpf(2) call failed; str() names the call, the object and what to check."""

    def __str__(self) -> str:
        return str(self.strerror)


def _sys_bpf_number() -> int:
    machine = os.uname().machine
    return {"x86_64": 321, "aarch64": 280}.get(machine, SYS_BPF)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_NR_BPF = _sys_bpf_number()


def _hint(err: int) -> str:
    if err == errno.EPERM:
        return " (needs root, or CAP_BPF plus CAP_NET_ADMIN/CAP_SYS_ADMIN)"
    if err == errno.ENOENT:
        return " (no such object: not pinned, or already gone)"
    return ""


def bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    """One bpf(2) call; returns its result (an fd for commands that open one) or raises BpfError."""
    ret = _libc.syscall(_NR_BPF, ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({what}): {os.strerror(err)}{_hint(err)}")
    return int(ret)


class Fd:
    """An owned file descriptor (of a BPF object, cgroup or netns); close() or use as a context manager."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __int__(self) -> int:
        return self.fd


# --- attribute layouts (union bpf_attr members, only the fields used) -----------------------------------


class _ElemAttr(ctypes.Structure):
    _fields_ = (
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


class _ObjAttr(ctypes.Structure):
    _fields_ = (("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32))


class _InfoAttr(ctypes.Structure):
    _fields_ = (("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64))


class _QueryAttr(ctypes.Structure):
    _fields_ = (
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("prog_cnt", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint64 * 4),
    )


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = (
        ("link_fd", ctypes.c_uint32),
        ("new_prog_fd", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("old_prog_fd", ctypes.c_uint32),
    )


BPF_F_REPLACE = 1 << 2


class _DetachAttr(ctypes.Structure):
    _fields_ = (
        ("target_fd", ctypes.c_uint32),
        ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
    )


class _IdAttr(ctypes.Structure):
    _fields_ = (("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32))


class _ProgInfo(ctypes.Structure):  # struct bpf_prog_info, prefix
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    )


class _MapInfo(ctypes.Structure):  # struct bpf_map_info, prefix
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
    )


class _MapCreateAttr(ctypes.Structure):
    _fields_ = (
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
        ("map_ifindex", ctypes.c_uint32),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
    )


class _BtfInfo(ctypes.Structure):  # struct bpf_btf_info, prefix
    _fields_ = (("btf", ctypes.c_uint64), ("btf_size", ctypes.c_uint32), ("id", ctypes.c_uint32))


class _BtfLoadAttr(ctypes.Structure):
    _fields_ = (
        ("btf", ctypes.c_uint64),
        ("btf_log_buf", ctypes.c_uint64),
        ("btf_size", ctypes.c_uint32),
        ("btf_log_size", ctypes.c_uint32),
        ("btf_log_level", ctypes.c_uint32),
    )


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = (
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    )


class _LinkInfo(ctypes.Structure):  # struct bpf_link_info, prefix (cgroup / netns members of the union)
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("target", ctypes.c_uint64),  # cgroup.cgroup_id, or netns.netns_ino (u32) + netns.attach_type (u32)
        ("attach_type", ctypes.c_uint32),  # cgroup.attach_type
        ("pad2", ctypes.c_uint32),
    )


_INFO_BUFFER = 512  # larger than any info struct here; the kernel checks that the tail it does not know is 0


# --- objects -----------------------------------------------------------------------------------------------


def obj_get(path: str) -> Fd:
    """Open a pinned BPF object (BPF_OBJ_GET)."""
    raw = os.fsencode(path)
    attr = _ObjAttr(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0)
    return Fd(bpf(BPF_OBJ_GET, attr, f"OBJ_GET {path}"))


def obj_pin(fd: int, path: str) -> None:
    """Pin `fd` at `path` (BPF_OBJ_PIN); the directory must exist on a bpf filesystem."""
    raw = os.fsencode(path)
    attr = _ObjAttr(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0, bpf_fd=fd)
    try:
        bpf(BPF_OBJ_PIN, attr, f"OBJ_PIN {path}")
    except BpfError as exc:
        if exc.errno == errno.EPERM and not is_bpffs(os.path.dirname(path)):
            raise BpfError(
                exc.errno, f"cannot pin {path}: {os.path.dirname(path)} is not on a bpf filesystem"
            ) from None
        raise


def is_bpffs(path: str) -> bool:
    """True when `path` is on a bpf filesystem (statfs magic BPF_FS_MAGIC)."""
    try:
        with open("/proc/self/mounts") as mounts:
            best = ""
            for line in mounts:
                _, target, fstype, *_ = line.split()
                if (path == target or path.startswith(target.rstrip("/") + "/")) and len(target) >= len(best):
                    best, kind = target, fstype
            return bool(best) and kind == "bpf"
    except OSError:
        return False


def prog_fd_by_id(prog_id: int) -> Fd:
    return Fd(bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id), f"PROG_GET_FD_BY_ID {prog_id}"))


def map_fd_by_id(map_id: int) -> Fd:
    return Fd(bpf(BPF_MAP_GET_FD_BY_ID, _IdAttr(id=map_id), f"MAP_GET_FD_BY_ID {map_id}"))


def btf_fd_by_id(btf_id: int) -> Fd:
    return Fd(bpf(BPF_BTF_GET_FD_BY_ID, _IdAttr(id=btf_id), f"BTF_GET_FD_BY_ID {btf_id}"))


def link_fd_by_id(link_id: int) -> Fd:
    return Fd(bpf(BPF_LINK_GET_FD_BY_ID, _IdAttr(id=link_id), f"LINK_GET_FD_BY_ID {link_id}"))


# --- creating maps, loading programs ----------------------------------------------------------------------

_LOG_SIZE = 1 << 20
_MAX_INSNS = 1 << 20


def map_create(like: MapInfo, btf: Fd | None = None) -> Fd:
    """A new, empty map with `like`'s name, type, sizes, capacity and flags (BPF_MAP_CREATE).

    With `btf` (an fd of the BTF object `like.btf_id` names) the new map carries the same key and value
    types, so bpftool decodes its entries as it decodes the original's.
    """
    attr = _MapCreateAttr(
        map_type=like.type,
        key_size=like.key_size,
        value_size=like.value_size,
        max_entries=like.max_entries,
        map_flags=like.flags,
        map_name=like.name.encode()[:15],
    )
    if btf is not None and like.btf_id:
        attr.btf_fd = btf.fd
        attr.btf_key_type_id = like.btf_key_type_id
        attr.btf_value_type_id = like.btf_value_type_id
    return Fd(bpf(BPF_MAP_CREATE, attr, f"MAP_CREATE {like.name}"))


def btf_raw(fd: int) -> bytes:
    """The BTF object's data as loaded (type and string sections), to load it again elsewhere."""
    info = _BtfInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)), "btf")
    data = ctypes.create_string_buffer(info.btf_size)
    info = _BtfInfo(btf=ctypes.addressof(data), btf_size=len(data))
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)), "btf")
    return data.raw[: info.btf_size]


def btf_load(raw: bytes) -> Fd:
    """A BTF object made from `btf_raw()` data (BPF_BTF_LOAD)."""
    data = ctypes.create_string_buffer(raw, len(raw))
    return Fd(bpf(BPF_BTF_LOAD, _BtfLoadAttr(btf=ctypes.addressof(data), btf_size=len(raw)), "BTF_LOAD"))


def prog_load(prog_type: int, insns: bytes, name: str, license: bytes, expected_attach_type: int = 0) -> Fd:
    """Load a program from its instructions (BPF_PROG_LOAD); the verifier's log is in the error if refused."""
    if len(insns) % 8 or not 0 < len(insns) // 8 <= _MAX_INSNS:
        raise ValueError(f"program {name}: {len(insns)} bytes are not whole BPF instructions")
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    attr = _ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(insns) // 8,
        insns=ctypes.addressof(code),
        license=ctypes.addressof(lic),
        prog_name=name.encode()[:15],
        expected_attach_type=expected_attach_type,
    )
    try:
        return Fd(bpf(BPF_PROG_LOAD, attr, f"PROG_LOAD {name}"))
    except BpfError as exc:
        if exc.errno not in (errno.EACCES, errno.EINVAL):
            raise
        log = ctypes.create_string_buffer(_LOG_SIZE)  # load again for the verifier's reason
        attr.log_level, attr.log_size, attr.log_buf = 1, _LOG_SIZE, ctypes.addressof(log)
        with contextlib.suppress(BpfError):
            return Fd(bpf(BPF_PROG_LOAD, attr, f"PROG_LOAD {name}"))
        tail = log.value.decode(errors="replace").strip().splitlines()[-12:]
        raise BpfError(exc.errno, f"{exc.strerror}; the verifier said:\n" + "\n".join(tail)) from None


# --- descriptions ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str
    map_ids: tuple[int, ...]

    @property
    def type_name(self) -> str:
        try:
            return ProgType(self.type).name.lower()
        except ValueError:
            return str(self.type)


@dataclass(frozen=True, slots=True)
class MapInfo:
    id: int
    type: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    btf_id: int = 0  # 0: the map has no BTF
    btf_key_type_id: int = 0
    btf_value_type_id: int = 0

    def same_layout(self, other: MapInfo) -> bool:
        """True when an element of one is an element of the other (type, sizes, capacity, flags)."""
        mine = (self.type, self.key_size, self.value_size, self.max_entries, self.flags)
        return mine == (other.type, other.key_size, other.value_size, other.max_entries, other.flags)


@dataclass(frozen=True, slots=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    target: int  # cgroup id (cgroup links) or netns inode (netns links); 0 once detached
    attach_type: int

    @property
    def attached(self) -> bool:
        return self.target != 0


def _info(fd: int, struct: type[ctypes.Structure], what: str) -> ctypes.Structure:
    buf = ctypes.create_string_buffer(_INFO_BUFFER)
    attr = _InfoAttr(bpf_fd=fd, info_len=_INFO_BUFFER, info=ctypes.addressof(buf))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, what)
    return struct.from_buffer_copy(buf.raw[: ctypes.sizeof(struct)])


def prog_info(fd: int) -> ProgInfo:
    first = _info(fd, _ProgInfo, "OBJ_GET_INFO_BY_FD prog")
    assert isinstance(first, _ProgInfo)
    count = first.nr_map_ids
    ids = (ctypes.c_uint32 * max(count, 1))()
    buf = ctypes.create_string_buffer(_INFO_BUFFER)
    info = _ProgInfo.from_buffer(buf)
    info.nr_map_ids = count
    info.map_ids = ctypes.addressof(ids)
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=_INFO_BUFFER, info=ctypes.addressof(buf)), "prog maps")
    return ProgInfo(
        id=first.id,
        type=first.type,
        name=first.name.decode(errors="replace"),
        tag=bytes(first.tag).hex(),
        map_ids=tuple(ids[i] for i in range(min(count, info.nr_map_ids))),
    )


def map_info(fd: int) -> MapInfo:
    info = _info(fd, _MapInfo, "OBJ_GET_INFO_BY_FD map")
    assert isinstance(info, _MapInfo)
    return MapInfo(
        info.id,
        info.type,
        info.name.decode(errors="replace"),
        info.key_size,
        info.value_size,
        info.max_entries,
        info.map_flags,
        info.btf_id,
        info.btf_key_type_id,
        info.btf_value_type_id,
    )


def link_info(fd: int) -> LinkInfo:
    info = _info(fd, _LinkInfo, "OBJ_GET_INFO_BY_FD link")
    assert isinstance(info, _LinkInfo)
    if info.type == LinkType.NETNS:
        target, attach_type = info.target & 0xFFFFFFFF, info.target >> 32
    else:
        target, attach_type = info.target, info.attach_type
    return LinkInfo(info.id, info.type, info.prog_id, target, attach_type)


def prog_query(target_fd: int, attach_type: int) -> tuple[int, ...]:
    """Ids of the programs attached to a cgroup or netns fd for one attach type (BPF_PROG_QUERY)."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _QueryAttr(target_fd=target_fd, attach_type=attach_type, prog_ids=ctypes.addressof(ids), prog_cnt=64)
    bpf(BPF_PROG_QUERY, attr, f"PROG_QUERY attach type {attach_type}")
    return tuple(ids[i] for i in range(min(attr.prog_cnt, 64)))


# --- links --------------------------------------------------------------------------------------------------


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> Fd:
    """Attach a program to a cgroup or netns through a link (BPF_LINK_CREATE); the link owns the attachment."""
    attr = _LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type)
    return Fd(bpf(BPF_LINK_CREATE, attr, f"LINK_CREATE attach type {attach_type}"))


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int) -> None:
    """Swap the program a link runs, atomically (BPF_LINK_UPDATE with BPF_F_REPLACE): the attach point is never
    without a program, and the swap fails (EPERM) unless the link still runs `old_prog_fd`'s program."""
    attr = _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd, flags=BPF_F_REPLACE, old_prog_fd=old_prog_fd)
    bpf(BPF_LINK_UPDATE, attr, "LINK_UPDATE")


def link_detach(link_fd: int) -> None:
    bpf(BPF_LINK_DETACH, _IdAttr(id=link_fd), "LINK_DETACH")


def prog_attach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    """Attach a program without a link (BPF_PROG_ATTACH), e.g. an sk_skb verdict to a SOCKHASH."""
    attr = _DetachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type)
    bpf(BPF_PROG_ATTACH, attr, f"PROG_ATTACH attach type {attach_type}")


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    """Detach a program attached without a link (BPF_PROG_ATTACH style), e.g. sk_msg from a sockhash."""
    attr = _DetachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type)
    bpf(BPF_PROG_DETACH, attr, f"PROG_DETACH attach type {attach_type}")


# --- map elements --------------------------------------------------------------------------------------------


def lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value of `key`, or None when absent."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value_size)
    attr = _ElemAttr(map_fd=map_fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf))
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, attr, "MAP_LOOKUP_ELEM")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return vbuf.raw


def update(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    attr = _ElemAttr(map_fd=map_fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf), flags=flags)
    bpf(BPF_MAP_UPDATE_ELEM, attr, "MAP_UPDATE_ELEM")


def delete(map_fd: int, key: bytes) -> bool:
    kbuf = ctypes.create_string_buffer(key, len(key))
    try:
        bpf(BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=map_fd, key=ctypes.addressof(kbuf)), "MAP_DELETE_ELEM")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def keys(map_fd: int, key_size: int) -> Iterator[bytes]:
    """Every key of a hash map (BPF_MAP_GET_NEXT_KEY from the start)."""
    current: ctypes.Array[ctypes.c_char] | None = None
    nbuf = ctypes.create_string_buffer(key_size)
    while True:
        attr = _ElemAttr(map_fd=map_fd, key=ctypes.addressof(current) if current is not None else 0)
        attr.value = ctypes.addressof(nbuf)
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, attr, "MAP_GET_NEXT_KEY")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        yield nbuf.raw
        current = ctypes.create_string_buffer(nbuf.raw, key_size)


def put_socket(map_path: str, key: int, sock_fd: int, flags: int = BPF_ANY) -> None:
    """Put a socket in a pinned SOCKMAP slot (the value is the socket's fd, in the caller's process)."""
    with obj_get(map_path) as m:
        update(m.fd, key.to_bytes(4, "little"), sock_fd.to_bytes(4, "little"), flags)


def netns_cookie(sock_fd: int) -> int:
    """The cookie of the netns a socket lives in (SO_NETNS_COOKIE, kernel >= 5.14)."""
    with socket.socket(fileno=os.dup(sock_fd)) as s:
        return int.from_bytes(s.getsockopt(SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


# --- the tunnel's two uses (eBPF capture mode) ------------------------------------------------------------


def register_inbound_listener(uid: str, sock_fd: int, pin_root: str | None = None) -> bool:
    """Put the tunnel's :15006 listener in the pod's pinned SOCKMAP (sk_lookup steers to it).

    Returns False when the pod has no eBPF capture (no pin: iptables mode), True when registered.
    """
    path = f"{pin_dir(uid, pin_root or PIN_ROOT)}/{MAP_LISTENER}"
    if not os.path.exists(path):
        return False
    put_socket(path, 0, sock_fd)
    return True


def reclaim_inbound_listener(uid: str, sock_fd: int, pin_root: str | None = None) -> bool:
    """Put the tunnel's :15006 listener in the pod's map_listener if its slot is empty; True if it was.

    The slot empties when the socket in it closes (the kernel unlinks a closed socket from every SOCKMAP),
    and nothing tells the other tunnel: a draining tunnel whose listener took the slot last, or pins made
    after this tunnel bound its listeners (the capture mode switched to eBPF under it), leave sk_lookup
    with no socket, and it refuses every inbound plaintext SYN. The tunnel calls this periodically.
    BPF_NOEXIST makes "if empty" part of the update, so a listener a successor has just put there stays.
    False, too, when the pod has no eBPF capture or its pins went away meanwhile (unenrolled).
    """
    path = f"{pin_dir(uid, pin_root or PIN_ROOT)}/{MAP_LISTENER}"
    try:
        put_socket(path, 0, sock_fd, BPF_NOEXIST)
    except BpfError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOENT):
            return False
        raise
    return True


def original_dst(uid: str, peer_ip: str, peer_port: int, pin_root: str | None = None) -> tuple[str, int] | None:
    """Where the app's connection from peer_ip:peer_port was going (map_orig_dst); None when unknown."""
    path = f"{pin_dir(uid, pin_root or PIN_ROOT)}/{MAP_ORIG_DST}"
    try:
        with obj_get(path) as m:
            raw = lookup(m.fd, bytes(NaAddr4.of(peer_ip, peer_port)), ctypes.sizeof(NaOrig))
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    if raw is None:
        return None
    ip, port = NaOrig.from_buffer_copy(raw).address
    return str(ip), port


def announce_bypass(uid: str, source_ip: str, source_port: int, pin_root: str | None = None) -> bool:
    """Let the tunnel's own connection from source_ip:source_port (the client's IP) through to the app.

    sk_lookup sees no socket marks, so the tunnel names the source address of its transparent upstream
    socket before connecting; the pod's sockops program deletes the entry once the app has accepted.
    False when the pod has no eBPF capture (nothing to announce).
    """
    path = f"{pin_dir(uid, pin_root or PIN_ROOT)}/{MAP_BYPASS}"
    if not os.path.exists(path):
        return False
    with obj_get(path) as m:
        update(m.fd, bytes(NaAddr4.of(source_ip, source_port)), (1).to_bytes(4, "little"))
    return True


def ebpf_captured(uid: str, pin_root: str | None = None) -> bool:
    """True when the pod's capture is eBPF (its pin directory exists)."""
    return os.path.isdir(pin_dir(uid, pin_root or PIN_ROOT))


# --- the same-node fast path (programs/fastpath.c) --------------------------------------------------------

SO_COOKIE = 57


def socket_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(SOL_SOCKET, SO_COOKIE, 8), "little")


def fastpath_splice(a: socket.socket, b: socket.socket, pin_root: str | None = None) -> None:
    """Hand the relaying of a <-> b to the kernel: each socket's bytes go to the other's egress, in order.

    1. Bytes already queued on either socket are read here and written to the other (blocking), so they
       are in the peer's send queue before any redirected byte can be.
    2. Peers, then sockets go into the maps: from then on arriving skbs are redirected by fastpath.c.
    3. Bytes that arrived between 1 and 2 sit in the receive queue, and the verdict only runs when data
       arrives; setting SO_RCVLOWAT calls the socket's data_ready (tcp_set_rcvlowat), which now runs the
       verdict over that queue first - so they are redirected ahead of anything newer.
    Afterwards the caller must not read either socket (recv() on a redirected socket can return 0 without
    an EOF); it waits for the close with poll(POLLRDHUP).
    """
    for src, dst in ((a, b), (b, a)):
        while True:
            try:
                data = src.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if not data:
                break
            dst.setblocking(True)
            dst.sendall(data)
    root = f"{pin_root or PIN_ROOT}/{FASTPATH_DIR}"
    ca, cb = socket_cookie(a), socket_cookie(b)
    with obj_get(f"{root}/{MAP_FP_PEER}") as peers, obj_get(f"{root}/{MAP_FP_SOCKS}") as socks:
        update(peers.fd, ca.to_bytes(8, "little"), cb.to_bytes(8, "little"))
        update(peers.fd, cb.to_bytes(8, "little"), ca.to_bytes(8, "little"))
        update(socks.fd, ca.to_bytes(8, "little"), a.fileno().to_bytes(4, "little"))
        update(socks.fd, cb.to_bytes(8, "little"), b.fileno().to_bytes(4, "little"))
    for sock in (a, b):
        sock.setsockopt(SOL_SOCKET, socket.SO_RCVLOWAT, 1)  # run the verdict over what is already queued


def fastpath_forget(a_cookie: int, b_cookie: int, pin_root: str | None = None) -> None:
    """Drop the peer entries of a closed pair (the SOCKHASH drops closed sockets by itself)."""
    root = f"{pin_root or PIN_ROOT}/{FASTPATH_DIR}"
    with obj_get(f"{root}/{MAP_FP_PEER}") as peers:
        for cookie in (a_cookie, b_cookie):
            delete(peers.fd, cookie.to_bytes(8, "little"))


def fastpath_available(pin_root: str | None = None) -> bool:
    return os.path.exists(f"{pin_root or PIN_ROOT}/{FASTPATH_DIR}/{MAP_FP_SOCKS}")
