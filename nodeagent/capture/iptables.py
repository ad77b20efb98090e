"""Running iptables-save / iptables-restore inside a network namespace, in the host's flavour.

Why this module exists: the rules themselves are decided in nodeagent.capture.rules; something has to
read the kernel and apply a payload, atomically, in the right netns and with the right binary. Mixing
flavours is the classic way to get rules that "are there" for one tool and invisible to the other, so
the flavour is detected once like istio-cni does (whichever of legacy / nft already holds rules in the
agent's own netns - the node; when neither does, what `iptables --version` says) and used everywhere.

Commands run as subprocesses started from a worker thread that entered the pod's netns (the same as
`nsenter --net=<netns file> -- iptables-...`, which is what messages show, so an operator can paste it):
the event loop's thread never changes namespace and a child that hangs is killed.
`IptablesBackend` is the capture backend built from these pieces plus nodeagent.capture.routing, with
the IPv6 guard (rules.pod_ruleset6) through ip6tables of the same flavour wherever the kernel has IPv6;
`ProbeBypass` keeps the node's kubelet-probe SNAT chain.

What it deliberately does not do: no rule text of its own (rules.py), no retries (the agent's periodic
verify is the retry), no `iptables -A/-D` one rule at a time (never atomic), no IPv6 capture (the guard
refuses IPv6 TCP; it captures nothing).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import functools
import ipaddress
import logging
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from nodeagent.capture import routing
from nodeagent.capture.backend import CaptureError, CaptureState
from nodeagent.capture.rules import (
    Ruleset,
    Saved,
    SaveParseError,
    apply_payload,
    drift,
    parse_save,
    pod_ruleset,
    pod_ruleset6,
    probe_ruleset,
    removal_payload,
)
from nodeagent.model import Pod
from nodeagent.netns import NetnsError, in_netns

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 10.0
XTABLES_LOCK_WAIT_S = "5"  # legacy iptables serializes on /run/xtables.lock across every netns


class Flavour(enum.Enum):
    LEGACY = "legacy"
    NFT = "nft"

    @property
    def save(self) -> str:
        return self.tool("save", 4)

    def tool(self, verb: str, family: int) -> str:
        """iptables-nft-save, ip6tables-legacy-restore, ...: `verb` (save|restore) for IPv`family`."""
        return f"{'ip6tables' if family == 6 else 'iptables'}-{self.value}-{verb}"


@dataclass(frozen=True, slots=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


# The edge: run argv (inside the netns file `netns`, or where the agent is when None), feed it `stdin`.
Runner = Callable[[list[str], str | None, str | None], Awaitable[Completed]]


def in_netns_argv(argv: list[str], netns: str | None) -> list[str]:
    return argv if netns is None else ["nsenter", f"--net={netns}", "--", *argv]


async def run_command(argv: list[str], netns: str | None = None, stdin: str | None = None) -> Completed:
    """The real Runner: the command on a worker thread inside `netns`, killed after COMMAND_TIMEOUT_S.

    The worker thread enters the netns (nodeagent.netns.in_netns) and starts the command from there, so
    the child is born in the pod's netns - no nsenter to exec first - and through vfork (CPython's
    subprocess), where the event loop's own spawn would fork a copy of the whole agent: a pod's
    save + restore takes ~3 ms instead of ~10 on a loaded node, and the event loop never waits on a
    spawn. Messages still name the equivalent `nsenter --net=... -- ...` command an operator can paste.
    """
    shown = in_netns_argv(argv, netns)

    def run() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            argv,
            input=stdin.encode() if stdin is not None else None,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )

    try:
        proc = await asyncio.to_thread(run if netns is None else functools.partial(in_netns, netns, run))
    except FileNotFoundError:
        raise CaptureError(f"{argv[0]} is not installed: install iptables (and iproute2 for ss)") from None
    except NetnsError as exc:
        why = "does not exist (was the pod deleted?)" if exc.errno == errno.ENOENT else f"cannot be entered: {exc}"
        raise CaptureError(f"`{' '.join(shown)}` failed: the network namespace {netns} {why}") from None
    except subprocess.TimeoutExpired:
        raise CaptureError(f"`{' '.join(shown)}` did not finish within {COMMAND_TIMEOUT_S:g} s; killed it") from None
    return Completed(
        tuple(shown), proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    )


def detect_flavour(netns: str | None = None) -> Flavour:
    """The flavour the host uses: the one holding more rules in `netns` (default: here), else the default.

    Blocking (a few fork/execs); call it once at start-up.
    """
    counts: dict[Flavour, int] = {}
    for flavour in Flavour:
        if shutil.which(flavour.save) is None:
            continue
        proc = subprocess.run(
            in_netns_argv([flavour.save], netns), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
        if proc.returncode == 0:
            counts[flavour] = sum(1 for line in proc.stdout.splitlines() if line.startswith("-A "))
    if not counts:
        raise CaptureError("neither iptables-legacy-save nor iptables-nft-save works here: install iptables")
    best = max(counts.values())
    if best > 0:
        winners = [f for f, n in counts.items() if n == best]
        if len(winners) == 1:
            return winners[0]
    version = subprocess.run(["iptables", "--version"], capture_output=True, text=True, check=False).stdout
    if "nf_tables" in version and Flavour.NFT in counts:
        return Flavour.NFT
    if Flavour.LEGACY in counts:
        return Flavour.LEGACY
    return next(iter(counts))


def ipv6_available() -> bool:
    """Whether this kernel has IPv6 at all: booted with ipv6.disable=1 it has no IPv6 sockets, no IPv6
    traffic to guard and no ip6tables tables (ip6tables-restore would fail every pod's install)."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


class Iptables:
    """iptables-save / iptables-restore of one flavour (ip6tables-* with family 6), in any netns."""

    def __init__(self, flavour: Flavour, run: Runner = run_command, *, family: int = 4) -> None:
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family}")
        self.flavour = flavour
        self.family = family
        self._run = run

    async def save(self, netns: str | None) -> Saved:
        done = await self._run([self.flavour.tool("save", self.family)], netns, None)
        if done.returncode != 0:
            raise CaptureError(f"`{' '.join(done.argv)}` failed: {_why(done, netns)}")
        try:
            return parse_save(done.stdout)
        except SaveParseError as exc:
            raise CaptureError(f"could not read `{' '.join(done.argv)}`: {exc}") from None

    async def restore(self, netns: str | None, payload: str) -> None:
        restore = self.flavour.tool("restore", self.family)
        done = await self._run([restore, "--noflush", "-w", XTABLES_LOCK_WAIT_S], netns, payload)
        if done.returncode != 0:
            raise CaptureError(f"`{' '.join(done.argv)}` failed: {_why(done, netns)}\npayload:\n{payload}")

    async def ensure(self, netns: str | None, desired: Ruleset) -> tuple[str, ...]:
        """Make the kernel hold `desired`; returns the drift that was repaired (empty: nothing was touched)."""
        saved = await self.save(netns)
        problems = drift(desired, saved)
        if problems:
            await self.restore(netns, apply_payload(desired, saved))
        return problems

    async def remove(self, netns: str | None, ruleset: Ruleset) -> bool:
        """Delete `ruleset`'s chains and the jumps into them; False when there was nothing to delete."""
        payload = removal_payload(ruleset, await self.save(netns))
        if payload:
            await self.restore(netns, payload)
        return bool(payload)


def _why(done: Completed, netns: str | None) -> str:
    text = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[-1]
    if done.argv[0] == "nsenter" and netns is not None and "No such file" in text:
        return f"the network namespace {netns} does not exist (was the pod deleted?)"
    return text


class IptablesBackend:
    """The in-pod capture with iptables REDIRECT plus the policy routing of spoofed replies, and the IPv6
    guard through `iptables6` (None: this kernel has no IPv6, see `ipv6_available`).

    install() is "ensure": it reads the kernel first and only writes when something differs, which is
    also how the agent adopts a pod captured by its previous run without disturbing its traffic.
    """

    name = "iptables"

    def __init__(self, iptables: Iptables, iptables6: Iptables | None) -> None:
        self.iptables = iptables
        self.iptables6 = iptables6
        self.ruleset = pod_ruleset()
        self.ruleset6 = pod_ruleset6()

    @classmethod
    def for_host(cls, flavour: Flavour, run: Runner = run_command) -> IptablesBackend:
        """The backend for this kernel: with the IPv6 guard wherever it has IPv6."""
        return cls(Iptables(flavour, run), Iptables(flavour, run, family=6) if ipv6_available() else None)

    async def install(self, pod: Pod, netns: str) -> tuple[str, ...]:
        # The rules, the IPv6 guard and the routing are independent kernel objects, so all go in at once (the
        # caller hands the pod to a tunnel only after all are in; nothing can use the routing before that).
        jobs: list[Awaitable[tuple[str, ...]]] = [
            self.iptables.ensure(netns, self.ruleset),
            asyncio.to_thread(routing.ensure, netns),
        ]
        if self.iptables6 is not None:
            jobs.append(self._ensure6(self.iptables6, netns))
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return tuple(problem for outcome in outcomes if isinstance(outcome, tuple) for problem in outcome)

    async def _ensure6(self, iptables6: Iptables, netns: str) -> tuple[str, ...]:
        return tuple(f"ip6tables: {problem}" for problem in await iptables6.ensure(netns, self.ruleset6))

    async def remove(self, pod: Pod, netns: str) -> bool:
        removed = await self.iptables.remove(netns, self.ruleset)
        if self.iptables6 is not None:
            removed = await self.iptables6.remove(netns, self.ruleset6) or removed
        return await asyncio.to_thread(routing.remove, netns) or removed

    async def inspect(self, netns: str) -> CaptureState:
        saved = await self.iptables.save(netns)
        objects, problems = list(saved.owned_lines()), list(drift(self.ruleset, saved))
        if self.iptables6 is not None:
            saved6 = await self.iptables6.save(netns)
            objects += [f"(ip6tables) {line}" for line in saved6.owned_lines()]
            problems += [f"ip6tables: {problem}" for problem in drift(self.ruleset6, saved6)]
        routes = await asyncio.to_thread(routing.read, netns)
        return CaptureState(
            backend=f"{self.name} ({self.iptables.flavour.value})",
            objects=(*objects, *routes.objects()),
            drift=(*problems, *routes.drift()),
        )

    async def verify(self, netns: str) -> tuple[str, ...]:
        return (await self.inspect(netns)).drift

    async def rules(self, netns: str) -> tuple[str, ...]:
        """Our iptables and ip6tables lines in `netns`, without the policy routing (which the eBPF mode
        uses too): what tells that this mode captured the pod."""
        lines = (await self.iptables.save(netns)).owned_lines()
        if self.iptables6 is not None:
            lines += tuple(f"(ip6tables) {line}" for line in (await self.iptables6.save(netns)).owned_lines())
        return lines

    async def forget(self, uid: str) -> bool:
        """Nothing to do: every rule and route of this mode lives in the pod's netns and goes with it."""
        return False

    def kept_uids(self) -> tuple[str, ...]:
        """None: this mode keeps nothing per pod outside the pod's netns."""
        return ()


class ProbeBypass:
    """The node's kubelet-probe SNAT chain (NODEAGENT_POSTRT), in `netns` (None: the agent's own, the node)."""

    def __init__(self, iptables: Iptables, netns: str | None = None) -> None:
        self.iptables = iptables
        self.netns = netns

    async def ensure(self, pods: Mapping[str, ipaddress.IPv4Address]) -> tuple[str, ...]:
        return await self.iptables.ensure(self.netns, probe_ruleset(pods))

    async def remove(self) -> bool:
        return await self.iptables.remove(self.netns, probe_ruleset({}))

    async def inspect(self, pods: Mapping[str, ipaddress.IPv4Address]) -> CaptureState:
        saved = await self.iptables.save(self.netns)
        objects = tuple(line for line in saved.owned_lines() if "NODEAGENT_POSTRT" in line)
        if not pods:  # the agent keeps the chain only while a pod is captured: none is the desired state
            stale = [line for line in objects if " -j SNAT " in line]
            problem = f"{len(stale)} probe rules although no pod is captured (left by an agent run)"
            return CaptureState(backend="probe bypass", objects=objects, drift=(problem,) if stale else ())
        return CaptureState(backend="probe bypass", objects=objects, drift=drift(probe_ruleset(pods), saved))
