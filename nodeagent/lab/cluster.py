"""The lab: a simulated multi-node cluster made of network namespaces and cgroups on one Linux host.

Why this module exists: the demo, the privileged tests and the benchmarks need nodes, pods and a real
link between nodes without a Kubernetes cluster. This module builds the layout that
nodeagent.lab.plan computes (read its docstring for the names), records what it creates under
/run/nodeagent/lab/ (state.json, plus inventory.yaml: the copy of the topology the agents and the CA
read), and removes all of it again. Any process can pick a running lab up with `Lab.load()`.

How it stays complete and quick:
- everything is validated and named before the first object exists; the state file listing every
  object to create is written first, and a failure midway tears down whatever exists (`teardown`);
- iproute2 runs in batch mode (`ip -n NS -batch -`), one process per namespace, node and pod batches
  in parallel, because forking `ip` per command dominates the time otherwise;
- teardown does not trust the state file alone: it also sweeps every `na-` netns and the whole
  nodeagent-lab cgroup subtree, and first stops every process inside them (`lab exec` processes, agents
  started in a node's netns), so `lab down` works after a crash and with no state at all;
- BPF pins are the exception to sweeping: the lab's agents pin under the production pin root
  (/sys/fs/bpf/nodeagent/<pod uid>/, nodeagent.ebpf.structs.PIN_ROOT), where a real node agent on this
  host keeps its pods' capture. Teardown removes only the directories of the lab's own pod uids (recorded
  in the state file, plus any in the lab's inventory copy) and names what it removed and what it left.

What it deliberately does not do: no pyroute2 (the kernel is driven with the same `ip` commands a user
debugs with, and the capture code keeps pyroute2 to itself); no container runtime - a pod is a netns plus
a cgroup, and its processes are whatever `lab exec` starts there; no mount or PID namespaces (so `/sys`
inside `lab exec` still shows the host); no pod lifecycle (a pod's phase is inventory data only). One
lab per host: `lab up` and `lab down` refuse while a demo, benchmark or privileged test run holds the
host's lab lock (`exclusive`), instead of tearing that run's lab down under it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from nodeagent.inventory.local import load_inventory
from nodeagent.lab.plan import (
    BRIDGE,
    CGROUP_BASE,
    FABRIC_NETNS,
    NODE_FABRIC_IF,
    POD_IF,
    PREFIX,
    LabPlan,
    PlanError,
    PodPlan,
    plan_lab,
)
from nodeagent.model import Inventory
from nodeagent.netns import NETNS_RUN_DIR, enter_netns, in_netns

log = logging.getLogger(__name__)

DEFAULT_TOPOLOGY = Path(__file__).with_name("default.yaml")
STATE_DIR = Path("/run/nodeagent/lab")
# One lab per host (its namespaces have fixed names): whoever builds and tears labs down in a sequence of
# steps (the demo, the benchmark, the privileged tests) holds this lock so they never tear down each
# other's lab; the CLI's `lab up` and `lab down` take it without waiting and refuse when it is taken.
LAB_LOCK = Path("/run/nodeagent-lab.lock")
# Set in the environment by a holder of the lock (the privileged test session) for its children.
LAB_LOCK_HELD_ENV = "NODEAGENT_LAB_LOCK_HELD"


@contextlib.contextmanager
def exclusive(lock: Path = LAB_LOCK, *, wait: bool = True) -> Iterator[None]:
    """Hold the host's lab lock; if another run holds it, say so and wait (or raise LabBusyError). While it
    is held, LAB_LOCK_HELD_ENV tells this process's children (a benchmark's `nodeagent lab up`) that the
    lock is held for them."""
    if os.environ.get(LAB_LOCK_HELD_ENV) == str(lock):
        yield  # our parent holds it for us
        return
    fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise LabBusyError(
                    f"a demo, benchmark or privileged test run is using the lab (it holds {lock}): stop it "
                    "first (Ctrl-C in its terminal ends a demo and removes its lab)"
                ) from None
            log.warning("waiting for %s: another demo, benchmark or privileged test run uses the lab", lock)
            fcntl.flock(fd, fcntl.LOCK_EX)
        before = os.environ.get(LAB_LOCK_HELD_ENV)
        os.environ[LAB_LOCK_HELD_ENV] = str(lock)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(LAB_LOCK_HELD_ENV, None)
            else:
                os.environ[LAB_LOCK_HELD_ENV] = before
    finally:
        os.close(fd)


RUN_ROOT = Path("/run/nodeagent")
FALLBACK_CGROUP2 = RUN_ROOT / "cgroup2"  # mounted only where the host has no cgroup2 mount at all
BPF_PIN_DIR = Path("/sys/fs/bpf/nodeagent")  # = nodeagent.ebpf.structs.PIN_ROOT: shared with real agents
STATE_FILE = "state.json"
INVENTORY_FILE = "inventory.yaml"
STATE_VERSION = 1
STOP_GRACE_S = 2.0  # SIGTERM, then this long before SIGKILL

NOT_UP_HINT = "no lab is up: run `sudo nodeagent lab up`"


class LabError(RuntimeError):
    """The lab could not do what was asked; the message says what to do about it."""


class NoLabError(LabError):
    """There is no lab (no state file)."""


class LabBusyError(LabError):
    """Another run (demo, benchmark, privileged tests) holds the host's lab lock."""


class CommandNotFoundError(LabError):
    """`lab exec` was asked to run a program that is not in PATH."""


@dataclass
class LabState:
    """What a lab created (or is about to create), as stored in state.json."""

    topology: str  # the file `lab up` was given
    cgroup2_root: str
    netns: list[str]
    cgroups: list[str]  # relative to cgroup2_root, parents first
    status: str = "creating"  # "creating" until every object exists, then "up"
    mounted_cgroup2: bool = False
    mounted_netns_dir: bool = False  # `ip netns add` bind-mounts /run/netns on first use
    created_netns_dir: bool = False
    created_at: float = field(default_factory=time.time)
    version: int = STATE_VERSION
    # The only BPF pins teardown removes: <pin root>/<uid> of these pods (the lab's agents pin there).
    pod_uids: list[str] = field(default_factory=list)
    pin_root_existed: bool = True  # False: the pin root is removed again once the lab's pins are gone

    @classmethod
    def read(cls, state_dir: Path) -> LabState | None:
        try:
            raw = json.loads((state_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"{state_dir / STATE_FILE} is unreadable ({exc}): run `sudo nodeagent lab down`") from None
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            raise LabError(f"{state_dir / STATE_FILE} is from another nodeagent version: run `sudo nodeagent lab down`")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise LabError(f"{state_dir / STATE_FILE} is malformed ({exc}): run `sudo nodeagent lab down`") from None

    def write(self, state_dir: Path) -> None:
        tmp = state_dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, state_dir / STATE_FILE)


@dataclass(frozen=True)
class StatusRow:
    """One line of `lab status`, read from the kernel and compared with the plan."""

    kind: str  # fabric | node | pod
    name: str
    node: str
    netns: str
    ip: str  # what the kernel has; "" when nothing
    cgroup: str  # "yes" / "missing" / "" (not applicable)
    problem: str  # "" when the kernel matches the plan


@dataclass
class TeardownReport:
    processes: int = 0
    netns: list[str] = field(default_factory=list)  # the network namespaces removed, by name
    cgroups: int = 0  # cgroup directories removed: the pods' and their parents (nodeagent-lab/, one per node)
    pod_cgroups: int = 0  # of those, the pods' own: what `lab status` shows and a user calls the lab's cgroups
    unmounted: list[str] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)  # pin directories of the lab's pods that were removed
    pins_kept: list[str] = field(default_factory=list)  # other pin directories under the root: not the lab's
    problems: list[str] = field(default_factory=list)

    @property
    def removed_anything(self) -> bool:
        return bool(self.processes or self.netns or self.cgroups or self.unmounted or self.pins)

    def summary(self) -> str:
        """One line for a user: what was stopped and removed, and which BPF pins were left alone. Namespaces
        and cgroups are counted as `lab status` lists them: the fabric's, each node's and each pod's netns;
        a cgroup per pod (their parent directories go with them, uncounted)."""
        removed = []
        if self.netns:
            removed.append(f"{_count(len(self.netns), 'network namespace')} ({_netns_kinds(self.netns)})")
        if self.pod_cgroups:
            removed.append(_count(self.pod_cgroups, "pod cgroup"))
        elif self.cgroups:
            removed.append(f"the lab's empty cgroup directory ({CGROUP_BASE})")
        text = (
            f"stopped {_count(self.processes, 'process', 'processes')}, "
            + (f"removed {' and '.join(removed)}" if removed else "removed no namespaces or cgroups")
            + (f", unmounted {', '.join(self.unmounted)}" if self.unmounted else "")
            + (
                f", removed the BPF pins of {_count(len(self.pins), 'lab pod')} ({', '.join(self.pins)})"
                if self.pins
                else ""
            )
        )
        if self.pins_kept:
            kept = _count(len(self.pins_kept), "other pin directory", "other pin directories")
            text += f"; left {kept} alone ({', '.join(self.pins_kept)})"
        return text


def _count(n: int, noun: str, plural: str = "") -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _netns_kinds(names: list[str]) -> str:
    """`the fabric, 2 nodes, 4 pods` for the lab's netns names (plan.py's layout: pods' names are dotted)."""
    pods = sum(1 for n in names if "." in n)
    nodes = sum(1 for n in names if "." not in n and n != FABRIC_NETNS)
    kinds = ["the fabric"] if FABRIC_NETNS in names else []
    kinds += [_count(nodes, "node")] if nodes else []
    kinds += [_count(pods, "pod")] if pods else []
    return ", ".join(kinds)


class Lab:
    """A lab that is up. Build one with `Lab.up(topology)`, or find the running one with `Lab.load()`."""

    def __init__(self, state: LabState, inventory: Inventory, plan: LabPlan, state_dir: Path) -> None:
        self.state = state
        self.inventory = inventory
        self.plan = plan
        self.state_dir = state_dir

    # --- life cycle ----------------------------------------------------------------------------------

    @classmethod
    def up(cls, topology: str | os.PathLike[str], *, state_dir: Path = STATE_DIR, pin_root: Path = BPF_PIN_DIR) -> Lab:
        """Validate `topology`, then build the whole lab, or nothing (rolled back) and raise LabError.

        Raises nodeagent.inventory.local.InventoryError for a bad topology file (nothing is touched).
        """
        inventory = load_inventory(topology)
        try:
            plan = plan_lab(inventory)
        except PlanError as exc:
            raise LabError(f"{os.fspath(topology)}: {exc}") from None
        ip = _preflight(state_dir)
        cgroup2_root = _cgroup2_root()
        state = LabState(
            topology=os.path.abspath(topology),
            cgroup2_root=str(cgroup2_root or FALLBACK_CGROUP2),
            netns=list(plan.netns_names),
            cgroups=list(plan.cgroups),
            pod_uids=sorted({pod.uid for pod in inventory.pods}),
            pin_root_existed=pin_root.exists(),
        )
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(topology, state_dir / INVENTORY_FILE)
            state.write(state_dir)  # before the first kernel object, so teardown knows them all
            _build(ip, plan, state, state_dir, mount_cgroup2=cgroup2_root is None)
        except BaseException as exc:
            report = teardown(state_dir=state_dir, pin_root=pin_root)
            left = f"; teardown also reported: {'; '.join(report.problems)}" if report.problems else ""
            if not isinstance(exc, Exception):  # Ctrl-C, and the demo's SIGTERM/SIGHUP: rolled back, still stopping
                raise
            raise LabError(f"could not build the lab, rolled back: {exc}{left}") from exc
        state.status = "up"
        state.write(state_dir)
        return cls(state, inventory, plan, state_dir)

    @classmethod
    def load(cls, *, state_dir: Path = STATE_DIR) -> Lab:
        """The lab that is up, from its state directory; NoLabError when there is none."""
        state = LabState.read(state_dir)
        if state is None:
            raise NoLabError(NOT_UP_HINT)
        if state.status != "up":
            raise LabError("an earlier `lab up` did not finish: run `sudo nodeagent lab down`, then `lab up` again")
        inventory = load_inventory(state_dir / INVENTORY_FILE)
        return cls(state, inventory, plan_lab(inventory), state_dir)

    def down(self) -> TeardownReport:
        return teardown(state_dir=self.state_dir)

    # --- where things are ----------------------------------------------------------------------------

    @property
    def inventory_path(self) -> Path:
        """The lab's copy of its topology: the local inventory the agents and the CA read."""
        return self.state_dir / INVENTORY_FILE

    @property
    def cgroup_root(self) -> Path:
        return Path(self.state.cgroup2_root)

    def pod(self, key: str) -> PodPlan:
        """A pod by `namespace/name` (or a bare name when unambiguous); KeyError says what exists."""
        pod = self.inventory.pod(key)
        return next(p for p in self.plan.pods if p.key == pod.key)

    def pod_netns(self, key: str) -> str:
        """The netns name of a pod (its node's for a host-network pod); see nodeagent.netns.netns_path."""
        return self.pod(key).netns

    def pod_cgroup(self, key: str) -> Path:
        return self.cgroup_root / self.pod(key).cgroup

    def node_netns(self, node: str) -> str:
        try:
            return self.plan.node(node).netns
        except KeyError:
            known = ", ".join(n.name for n in self.plan.nodes)
            raise KeyError(f"no node {node!r} in the lab (known: {known})") from None

    @property
    def fabric_netns(self) -> str:
        return FABRIC_NETNS

    def fabric_interface(self) -> tuple[str, str]:
        """(netns, interface) where every cross-node packet passes: the fabric bridge, for tcpdump."""
        return FABRIC_NETNS, BRIDGE

    def exec_argv(self, key: str, argv: list[str]) -> list[str]:
        """argv that runs `argv` inside the pod's netns and cgroup (for subprocess)."""
        return [*_cli(), "exec", self.pod(key).key, "--", *argv]

    def node_exec_argv(self, node: str, argv: list[str]) -> list[str]:
        self.node_netns(node)  # fail here, not in the child, for an unknown node
        return [*_cli(), "exec", "--node", node, "--", *argv]

    def fabric_exec_argv(self, argv: list[str]) -> list[str]:
        return [*_cli(), "exec", "--fabric", "--", *argv]

    # --- reading the kernel --------------------------------------------------------------------------

    def status(self) -> list[StatusRow]:
        """One row per fabric, node and pod, as the kernel has them now (via `ip -j addr`)."""
        existing = _existing_netns()
        names = [n for n in self.state.netns if n in existing]
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            addrs = dict(zip(names, pool.map(_read_addrs, names), strict=True))

        def missing(netns: str) -> str:
            return "" if netns in addrs else f"netns {netns} is missing"

        fabric = addrs.get(FABRIC_NETNS, {})
        ports = sum(1 for a in fabric.values() if a["master"] == BRIDGE)
        fabric_problem = missing(FABRIC_NETNS) or (
            "" if BRIDGE in fabric and ports == len(self.plan.nodes) else f"bridge has {ports} node ports"
        )
        rows = [StatusRow("fabric", FABRIC_NETNS, "", FABRIC_NETNS, "", "", fabric_problem)]
        for node in self.plan.nodes:
            links = addrs.get(node.netns, {})
            have = links.get(NODE_FABRIC_IF, {}).get("ipv4", [])
            problem = missing(node.netns)
            if not problem and str(node.address) not in have:
                problem = f"{NODE_FABRIC_IF} lacks {node.address}"
            elif not problem and str(node.gateway) not in links.get(BRIDGE, {}).get("ipv4", []):
                problem = f"{BRIDGE} lacks the gateway {node.gateway}"
            rows.append(StatusRow("node", node.name, node.name, node.netns, ",".join(have), "", problem))
        for pod in self.plan.pods:
            cgroup_ok = (self.cgroup_root / pod.cgroup).is_dir()
            interface = NODE_FABRIC_IF if pod.host_network else POD_IF
            have = addrs.get(pod.netns, {}).get(interface, {}).get("ipv4", [])
            problem = missing(pod.netns)
            if not problem and str(pod.ip) not in have:
                problem = f"{interface} lacks {pod.ip}"
            elif not problem and not cgroup_ok:
                problem = f"cgroup {pod.cgroup} is missing"
            rows.append(
                StatusRow(
                    "pod", pod.key, pod.node, pod.netns, ",".join(have), "yes" if cgroup_ok else "missing", problem
                )
            )
        return rows


def exec_in(netns: str, cgroup: Path | None, argv: list[str]) -> NoReturn:
    """Replace this process with `argv` running in `netns` (and `cgroup`). The caller must be single-threaded.

    Exec'ing (rather than forking a child) means the command's exit status and signals reach whoever
    started `lab exec` directly.
    """
    if cgroup is not None:
        try:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        except FileNotFoundError:
            raise LabError(f"cgroup {cgroup} is missing: run `sudo nodeagent lab status`") from None
    enter_netns(netns)
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        raise CommandNotFoundError(f"{argv[0]}: command not found in PATH") from None


# --- building --------------------------------------------------------------------------------------------


def _preflight(state_dir: Path) -> str:
    if os.geteuid() != 0:
        raise LabError("the lab needs root: run `sudo nodeagent lab up`")
    ip = shutil.which("ip")
    if ip is None:
        raise LabError("iproute2's `ip` is not installed: run `sudo make setup`")
    if (state_dir / STATE_FILE).exists():
        raise LabError(f"a lab is already up (state in {state_dir}): run `sudo nodeagent lab down` first")
    stale = leftovers()
    if stale:
        raise LabError(f"leftovers of an earlier lab exist ({', '.join(stale)}): run `sudo nodeagent lab down` first")
    return ip


def leftovers() -> list[str]:
    """The lab's namespaces and cgroup tree that exist on this host now (whether a state file knows them or not)."""
    stale = sorted(n for n in _existing_netns() if n.startswith(PREFIX))
    root = _cgroup2_root()
    if root is not None and (root / CGROUP_BASE).exists():
        stale.append(str(root / CGROUP_BASE))
    return stale


def _build(ip: str, plan: LabPlan, state: LabState, state_dir: Path, *, mount_cgroup2: bool) -> None:
    if mount_cgroup2:
        FALLBACK_CGROUP2.mkdir(parents=True, exist_ok=True)
        state.mounted_cgroup2 = True
        state.write(state_dir)
        _run(["mount", "-t", "cgroup2", "none", str(FALLBACK_CGROUP2)])

    netns_dir = Path(NETNS_RUN_DIR).resolve()
    dir_existed, dir_was_mount = netns_dir.exists(), _is_mountpoint(netns_dir)
    # Record before acting: if `ip netns add` fails halfway, teardown still knows the mount is ours.
    state.created_netns_dir = not dir_existed
    state.mounted_netns_dir = not dir_was_mount
    state.write(state_dir)
    _ip_batch(ip, None, [f"netns add {name}" for name in plan.netns_names])
    _ip_batch(ip, FABRIC_NETNS, plan.fabric_batch())
    _parallel(_ip_batch, [(ip, node.netns, plan.node_batch(node.name)) for node in plan.nodes])
    _parallel(_ip_batch, [(ip, p.netns, plan.pod_batch(p.key)) for p in plan.pods if not p.host_network])
    for node in plan.nodes:
        in_netns(node.netns, lambda: Path("/proc/sys/net/ipv4/ip_forward").write_text("1"))
    root = Path(state.cgroup2_root)
    for cgroup in plan.cgroups:
        (root / cgroup).mkdir()


def _ip_batch(ip: str, netns: str | None, lines: list[str], *, force: bool = False) -> None:
    """Run `lines` through one `ip -batch` process; with `force`, a failing line does not stop the rest."""
    argv = [ip, *(["-n", netns] if netns else []), *(["-force"] if force else []), "-batch", "-"]
    proc = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        where = f"in netns {netns}" if netns else "in the host netns"
        raise LabError(f"`ip -batch` {where} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def _parallel(fn: Any, calls: list[tuple[Any, ...]]) -> None:
    if not calls:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(calls))) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
    for future in futures:
        future.result()  # raises the first failure, after all have finished


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")


def _cli() -> list[str]:
    # `python -m nodeagent.lab` starts much faster than the full CLI (see nodeagent/lab/__main__.py).
    return [sys.executable, "-m", "nodeagent.lab"]


# --- tearing down ----------------------------------------------------------------------------------------


def teardown(*, state_dir: Path = STATE_DIR, pin_root: Path = BPF_PIN_DIR) -> TeardownReport:
    """Remove every trace of a lab - recorded in `state_dir` or not. Idempotent; never raises for leftovers.

    Order matters: processes first (they keep namespaces alive and cgroups busy), then the BPF pins of the
    lab's own pods (never anything else under `pin_root`: see the module doc), namespaces, cgroups,
    mounts, and the state directory last so a failed teardown can be re-run.
    """
    report = TeardownReport()
    try:
        state = LabState.read(state_dir)
    except LabError as exc:
        log.warning("ignoring the lab's state (%s); sweeping for leftovers by name instead", exc)
        state = None
    mounts = _mounts()
    roots = {Path(state.cgroup2_root)} if state else set()
    roots |= {Path(target) for target, fstype in mounts if fstype == "cgroup2"}
    cgroup_dirs = [d for root in roots for d in _subtree(root / CGROUP_BASE)]
    netns = sorted(n for n in _existing_netns() if n.startswith(PREFIX))  # a superset of state.netns

    pids = (_pids_in_netns(netns) | _pids_in_cgroups(cgroup_dirs)) - {os.getpid()}
    report.processes = len(pids)
    report.problems += _stop(pids)

    _remove_pins(pin_root, _lab_pod_uids(state, state_dir), state, report)
    if netns:
        ip = shutil.which("ip") or "ip"
        try:
            _ip_batch(ip, None, [f"netns del {name}" for name in netns], force=True)
        except LabError as exc:
            report.problems.append(str(exc))
        remaining = _existing_netns()
        report.netns = [name for name in netns if name not in remaining]
    removed, problems = _remove_cgroups(cgroup_dirs)
    report.cgroups = len(removed)
    report.pod_cgroups = sum(1 for d in removed if d.parent.parent.name == CGROUP_BASE)  # <base>/<node>/<ns>.<pod>
    report.problems += problems

    fallback = str(FALLBACK_CGROUP2)
    if any(target == fallback for target, _ in mounts):
        _unmount(FALLBACK_CGROUP2, report)
    with contextlib.suppress(OSError):
        FALLBACK_CGROUP2.rmdir()
    netns_dir = Path(NETNS_RUN_DIR).resolve()
    if state and state.mounted_netns_dir and netns_dir.is_dir() and not any(netns_dir.iterdir()):
        if _is_mountpoint(netns_dir):
            _unmount(netns_dir, report)
        if state.created_netns_dir:
            with contextlib.suppress(OSError):
                netns_dir.rmdir()
    if not report.problems:
        shutil.rmtree(state_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            RUN_ROOT.rmdir()  # only when empty: other parts of nodeagent may keep files there
    return report


def _lab_pod_uids(state: LabState | None, state_dir: Path) -> set[str]:
    """The uids whose pins are the lab's: recorded at `lab up`, plus any pod added to the inventory copy since."""
    uids = set(state.pod_uids) if state else set()
    if not (state_dir / INVENTORY_FILE).exists():
        return uids
    try:
        uids |= {pod.uid for pod in load_inventory(state_dir / INVENTORY_FILE).pods}
    except (OSError, ValueError) as exc:  # InventoryError is a ValueError: the recorded uids still hold
        log.warning("not reading pod uids from the lab's inventory (%s); using those recorded at `lab up`", exc)
    return {uid for uid in uids if uid and "/" not in uid and uid not in (".", "..")}


def _remove_pins(pin_root: Path, uids: set[str], state: LabState | None, report: TeardownReport) -> None:
    for uid in sorted(uids):
        directory = pin_root / uid
        if not directory.is_dir():
            continue
        try:
            shutil.rmtree(directory)
            report.pins.append(uid)
        except OSError as exc:
            report.problems.append(f"could not remove the lab's BPF pins in {directory}: {exc}")
    try:
        report.pins_kept = sorted(str(pin_root / e.name) for e in os.scandir(pin_root))
    except FileNotFoundError:
        return
    if not report.pins_kept and state is not None and not state.pin_root_existed:
        with contextlib.suppress(OSError):
            pin_root.rmdir()  # the lab's agents created it; a real agent would recreate it


def _stop(pids: set[int]) -> list[str]:
    if not pids:
        return []
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while True:
            pids = {pid for pid in pids if _alive(pid)}
            if not pids or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if not pids:
            return []
    return [f"processes {sorted(pids)} survived SIGKILL"]


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (exited, waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _pids_in_netns(names: list[str]) -> set[int]:
    wanted = set()
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(os.path.join(NETNS_RUN_DIR, name))
            wanted.add((st.st_dev, st.st_ino))
    if not wanted:
        return set()
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in wanted:
                pids.add(int(entry))
    return pids


def _pids_in_cgroups(dirs: list[Path]) -> set[int]:
    pids = set()
    for d in dirs:
        with contextlib.suppress(FileNotFoundError):
            pids |= {int(line) for line in (d / "cgroup.procs").read_text().split()}
    return pids


def _subtree(base: Path) -> list[Path]:
    """`base` and every directory below it, deepest first (the order rmdir needs)."""
    if not base.is_dir():
        return []
    dirs = [Path(top) for top, _, _ in os.walk(base)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def _remove_cgroups(dirs: list[Path]) -> tuple[list[Path], list[str]]:
    removed: list[Path] = []
    problems: list[str] = []
    for d in dirs:
        deadline = time.monotonic() + 1.0
        while True:
            try:
                d.rmdir()
                removed.append(d)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # EBUSY: a task that just exited may still be counted for a moment.
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    problems.append(f"could not remove cgroup {d}: {exc.strerror}")
                    break
                time.sleep(0.02)
    return removed, problems


def _unmount(path: Path, report: TeardownReport) -> None:
    try:
        _run(["umount", str(path)])
        report.unmounted.append(str(path))
    except LabError as exc:
        report.problems.append(str(exc))


# --- host facts ------------------------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount this process sees."""
    result = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                result.append((_unescape_mount(parts[1]), parts[2]))
    return result


def _unescape_mount(text: str) -> str:
    """/proc/self/mounts writes space, tab, newline and backslash as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _cgroup2_root() -> Path | None:
    """The host's cgroup2 mount (unified or hybrid); None when there is none."""
    for target, fstype in _mounts():
        if fstype == "cgroup2":
            return Path(target)
    return None


def _is_mountpoint(path: Path) -> bool:
    return any(target == str(path) for target, _ in _mounts())


def _existing_netns() -> set[str]:
    try:
        return set(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return set()


def _read_addrs(netns: str) -> dict[str, dict[str, Any]]:
    """{interface: {"ipv4": [addresses], "master": bridge or ""}} of one netns, from `ip -j addr`."""
    proc = subprocess.run(["ip", "-j", "-n", netns, "addr", "show"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {}
    links: dict[str, dict[str, Any]] = {}
    for link in json.loads(proc.stdout or "[]"):
        v4 = [a["local"] for a in link.get("addr_info", []) if a.get("family") == "inet"]
        links[link["ifname"]] = {"ipv4": v4, "master": link.get("master", "")}
    return links
