"""Entering network namespaces from Python, safely.

Why this module exists: `setns()` changes the namespace of the *calling thread* only, and Python 3.11 has
no `os.setns`. Sockets keep the namespace they were created in, so the safe pattern is: a short-lived
worker thread enters the target netns, creates (and binds) the socket, and returns it; the event loop's
thread never moves. `in_netns()` packages that pattern; `enter_netns()` is for processes that are about
to exec (the lab's `exec`), where moving the whole (single-threaded) process is the point.

What it deliberately does not do: no mount or PID namespaces, no pyroute2 (which has its own netns
helpers, used only behind nodeagent.capture).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"
# Where the net sysctls are: any mount of the kernel's /proc/sys/net acts on the netns of the thread that
# opens the file, so a container (whose /proc/sys is read-only) writes through a hostPath mount of it.
SYSCTL_NET = "/proc/sys/net"

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


class NetnsError(OSError):
    """Entering a network namespace failed."""


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace referred to by `fd`."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns failed: {os.strerror(err)} (needs root / CAP_SYS_ADMIN)")


def netns_inode(path: str) -> int | None:
    """The inode of a netns file (what identifies the namespace), or None when it cannot be read (gone)."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def netns_path(name_or_path: str) -> str:
    """`/var/run/netns/<name>` for a bare name; paths (/proc/PID/ns/net, bind mounts) pass through."""
    return name_or_path if "/" in name_or_path else os.path.join(NETNS_RUN_DIR, name_or_path)


@contextlib.contextmanager
def _open_ns(target: str | int) -> Iterator[int]:
    if isinstance(target, int):
        yield target
        return
    try:
        fd = os.open(netns_path(target), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(2, f"no network namespace {target!r} (see `ip netns list`)") from None
    try:
        yield fd
    finally:
        os.close(fd)


def enter_netns(target: str | int) -> None:
    """Move the current thread into `target` for good (for a process about to exec)."""
    with _open_ns(target) as fd:
        setns(fd)


def in_netns(target: str | int, fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread inside netns `target` and return its result (or raise its error).

    The calling thread's namespace never changes, so this is safe to call from an event loop's executor.
    Sockets created by `fn` stay in `target`'s namespace after the thread ends.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            with _open_ns(target) as fd:
                setns(fd)
                result.append(fn())
        except BaseException as exc:  # handed back to the caller below
            error.append(exc)

    thread = threading.Thread(target=run, name="netns-worker", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def net_sysctl(name: str, value: str | None = None, sysctl_net: str = SYSCTL_NET) -> str:
    """Read the net sysctl `name` (e.g. "ipv4/tcp_fwmark_accept") of the calling thread's netns and, with
    `value`, set it when it differs; returns the value before. Call it on a thread inside the target netns
    (in_netns). An EROFS says what to mount: a container's own /proc/sys is read-only."""
    path = os.path.join(sysctl_net, name)
    try:
        with open(path) as f:
            before = f.read().strip()
        if value is not None and before != value:
            with open(path, "w") as f:
                f.write(value)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            exc.strerror = (
                f"{exc.strerror}; {sysctl_net} is read-only here (a container's /proc/sys is): mount the host's "
                "/proc/sys/net read-write and pass its path with --sysctl-net (daemonset/daemonset.yaml does)"
            )
        raise
    return before
