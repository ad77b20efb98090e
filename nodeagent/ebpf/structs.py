"""ctypes mirrors of the structs in programs/nodeagent.h, and the pin layout of one pod's BPF objects.

Why this module exists: the tunnel and the capture backend read and write map entries whose layout the C
header defines. One source of truth (DESIGN.md, "One source of truth for kernel structs"): each class
below names the C struct it mirrors, and tests/privileged/test_ebpf_capture.py checks sizes and member
offsets against the BTF the kernel holds for the loaded programs (not against this file).

What it deliberately does not do: no I/O and no bpf(2) calls (maps.py), no knowledge of which map holds
what beyond the names the header gives them.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from dataclasses import dataclass

PIN_ROOT = "/sys/fs/bpf/nodeagent"

# Pins in one pod's directory (PIN_ROOT/<pod uid>/...), as the header and the loader name them.
MAP_COOKIE_DST = "map_cookie_dst"
MAP_ORIG_DST = "map_orig_dst"
MAP_LISTENER = "map_listener"
MAP_BYPASS = "map_bypass"
MAP_STATS = "map_stats"
MAP_CONFIG = "map_config"
MAPS = (MAP_COOKIE_DST, MAP_ORIG_DST, MAP_LISTENER, MAP_BYPASS, MAP_STATS, MAP_CONFIG)


def map_pin(kernel_name: str) -> str:
    """The pin name of a map the header declares as `na_<x>`: `map_<x>`."""
    if not kernel_name.startswith("na_"):
        raise ValueError(f"map {kernel_name!r} is not one of nodeagent's (na_*)")
    return "map_" + kernel_name[3:]


# The node-wide same-node fast path (programs/fastpath.c): PIN_ROOT/fastpath/...
FASTPATH_DIR = "fastpath"
MAP_FP_SOCKS = "map_fp_socks"
MAP_FP_PEER = "map_fp_peer"
MAP_FP_STATS = "map_fp_stats"
PROG_FP_VERDICT = "prog_fp_verdict"

NA_ORIG_CONNECTED = 1
STAT_NAMES = (
    "out_redirected",
    "out_skipped",
    "out_keyed",
    "in_steered",
    "in_refused",
    "in_bypassed",
    "in6_refused",
    "out_mapped",
)
STAT_SLOTS = 8  # NA_STAT_MAX


def pin_dir(uid: str, root: str = PIN_ROOT) -> str:
    return f"{root}/{uid}"


class NaAddr4(ctypes.Structure):
    """struct na_addr4: an IPv4 socket address, address and port in network byte order."""

    _fields_ = (("ip", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16))

    @classmethod
    def of(cls, ip: ipaddress.IPv4Address | str, port: int) -> NaAddr4:
        return cls(
            ip=int.from_bytes(ipaddress.IPv4Address(ip).packed, "little"),
            port=socket.htons(port),
            pad=0,
        )


class NaOrig(ctypes.Structure):
    """struct na_orig: where a captured outbound connection was going (network byte order)."""

    _fields_ = (
        ("ip", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("cookie", ctypes.c_uint64),
    )

    @property
    def address(self) -> tuple[ipaddress.IPv4Address, int]:
        return ipaddress.IPv4Address(int(self.ip).to_bytes(4, "little")), socket.ntohs(self.port)


class NaConfig(ctypes.Structure):
    """struct na_config: one pod's settings in slot 0 of its map_config (network byte order)."""

    _fields_ = (("pod_ip4", ctypes.c_uint32), ("pad", ctypes.c_uint32))

    @classmethod
    def of(cls, pod_ip: ipaddress.IPv4Address | None) -> NaConfig:
        return cls(pod_ip4=int.from_bytes(pod_ip.packed, "little") if pod_ip is not None else 0, pad=0)

    @property
    def pod_ip(self) -> ipaddress.IPv4Address | None:
        return ipaddress.IPv4Address(int(self.pod_ip4).to_bytes(4, "little")) if self.pod_ip4 else None


@dataclass(frozen=True, slots=True)
class Mirror:
    c_name: str
    ctype: type[ctypes.Structure]

    def layout(self) -> dict[str, int | dict[str, int]]:
        """sizeof and member offsets, the shape the test compares with the kernel's BTF."""
        members = {name: getattr(self.ctype, name).offset for name, *_ in self.ctype._fields_}
        return {"size": ctypes.sizeof(self.ctype), "members": members}


MIRRORS = (Mirror("na_addr4", NaAddr4), Mirror("na_orig", NaOrig), Mirror("na_config", NaConfig))
