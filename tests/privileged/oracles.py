"""Kernel oracles shared by the privileged tests: what the kernel holds, read with its own tools.

Why this module exists: the capture tests run in two modes and must check each with tools that do not
ask nodeagent. iptables mode: iptables-save (both flavours) and ip rule/route. eBPF mode: `bpftool -j`
(links on the pod's cgroup and netns, programs attached to the cgroup, pinned objects) and the pin
directory /sys/fs/bpf/nodeagent/<pod uid>/ — and, the point of that mode, NO rule of ours in the pod's
iptables (either flavour) or nft ruleset. Everything here shells out or reads /proc and /sys; it imports
no nodeagent module. Expected names (program, map and pin names, the lab's netns and cgroup layout, the
pod uid rule) are written out from nodeagent/ebpf/programs, the lab plan and the inventory format.

What it deliberately does not do: no waiting and no assertions (the tests decide what they expect).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from nodeagent.lab.cluster import DEFAULT_TOPOLOGY, Lab, teardown
from nodeagent.labmesh import Mesh

# The default lab topology's pods, as the tests address them (written out: oracles never ask nodeagent).
FRONTEND, PAYMENTS, CHECKOUT, BATCH = "shop/frontend", "shop/payments", "shop/checkout", "legacy/batch"
SHOP = [FRONTEND, PAYMENTS, CHECKOUT]  # enrolled once the shop namespace is labelled
IP = {FRONTEND: "10.10.1.10", PAYMENTS: "10.10.1.11", CHECKOUT: "10.10.2.10", BATCH: "10.10.2.11"}
NODE = {FRONTEND: "node1", PAYMENTS: "node1", CHECKOUT: "node2", BATCH: "node2"}
NETNS = {key: f"na-{NODE[key]}.{key.replace('/', '.')}" for key in IP}
TUNNEL_PORTS = {15001, 15006, 15008}
APP_PORT = 8080
# An AuthorizationPolicy, as a user writes it to a tunnel's --policies file: frontend may reach nothing in shop.
DENY_FRONTEND = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-frontend, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]}]
"""

PIN_ROOT = Path("/sys/fs/bpf/nodeagent")
# The pod's attachments as bpftool names them: attach type -> program name.
CGROUP_PROGS = {
    "cgroup_inet4_connect": "na_connect4",
    "cgroup_inet6_connect": "na_connect6",
    "cgroup_sock_ops": "na_sockops",
}
NETNS_PROGS = {"sk_lookup": "na_sk_lookup"}
POD_PROGS = {**CGROUP_PROGS, **NETNS_PROGS}
HOOK_OF = {
    "cgroup_inet4_connect": "connect4",
    "cgroup_inet6_connect": "connect6",
    "cgroup_sock_ops": "sockops",
    "sk_lookup": "sk_lookup",
}
OUR_PROGS = set(POD_PROGS.values())
OUR_MAPS = {"na_cookie_dst", "na_orig_dst", "na_listener", "na_bypass", "na_stats", "na_config"}
POD_PINS = sorted(
    [f"{kind}_{hook}" for kind in ("prog", "link") for hook in HOOK_OF.values()]
    + [f"map_{name[3:]}" for name in OUR_MAPS]
)


def sh(*argv: str, check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv[-6:]} exited {proc.returncode}: {proc.stderr[-2000:]}{proc.stdout[-500:]}")
    return proc.stdout


def bpftool(*args: str) -> Any:
    """`bpftool -j ARGS`, decoded (an empty answer is an empty list)."""
    return json.loads(sh("bpftool", "-j", *args).strip() or "[]")


def bpf_formatted(entry: dict[str, Any]) -> tuple[Any, Any]:
    """One entry of `bpftool -j map dump` of a map with BTF: key and value as bpftool decoded them."""
    fmt = entry.get("formatted", entry)
    return fmt["key"], fmt["value"]


# --- the lab's names (nodeagent/lab/plan.py layout, the inventory's default uid) ----------------------------


def netns_path(netns: str) -> str:
    return f"/var/run/netns/{netns}"


def cgroup2_root() -> str:
    for line in Path("/proc/mounts").read_text().splitlines():
        if line.split()[2] == "cgroup2":
            return line.split()[1]
    raise AssertionError("no cgroup v2 hierarchy is mounted")


def pod_cgroup(node: str, key: str) -> str:
    namespace, name = key.split("/")
    return f"{cgroup2_root()}/nodeagent-lab/{node}/{namespace}.{name}"


def pod_uid(key: str) -> str:
    """A lab pod's uid: the inventory's default, uuid5(URL, "nodeagent/<namespace>/<name>")."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"nodeagent/{key}"))


# --- iptables and nft: "no rule of ours" --------------------------------------------------------------------


def iptables_save(netns: str, flavour: str = "nft", counters: bool = False) -> str:
    return sh("ip", "netns", "exec", netns, f"iptables-{flavour}-save", *(["-c"] if counters else []))


RULE_TOOLS = (
    ["iptables-nft-save"],
    ["iptables-legacy-save"],
    ["ip6tables-nft-save"],
    ["ip6tables-legacy-save"],
    ["nft", "list", "ruleset"],
)


def rules_of_ours(netns: str) -> dict[str, list[str]]:
    """Lines that mention nodeagent in `ip(6)tables-{nft,legacy}-save` and `nft list ruleset`."""
    found = {}
    for tool in RULE_TOOLS:
        text = sh("ip", "netns", "exec", netns, *tool)
        found[" ".join(tool)] = [line for line in text.splitlines() if "nodeagent" in line.lower()]
    return found


def no_rule_of_ours(netns: str) -> bool:
    return not any(rules_of_ours(netns).values())


def fwmark_rules(netns: str) -> list[dict[str, Any]]:
    return [r for r in json.loads(sh("ip", "-n", netns, "-j", "rule")) if r.get("fwmark")]


# --- eBPF --------------------------------------------------------------------------------------------------


def bpf_links(cgroup: str, netns: str) -> dict[str, dict[str, Any]]:
    """attach type -> the `bpftool link show` entry of every link on the cgroup dir or the netns (by inode).

    `netns`: a netns name (/var/run/netns/NAME) or a path.
    """
    try:
        cg_id = os.stat(cgroup).st_ino  # a cgroup v2 directory's inode number is its cgroup id
    except FileNotFoundError:
        cg_id = -1
    ns_ino = os.stat(netns if netns.startswith("/") else netns_path(netns)).st_ino
    found = {}
    for link in bpftool("link", "show"):
        if link.get("cgroup_id") == cg_id or link.get("netns_ino") == ns_ino:
            found[link["attach_type"]] = link
    return found


def cgroup_progs(cgroup: str) -> dict[str, str]:
    """attach type -> program name of what `bpftool cgroup show` lists on the cgroup (effective, own level)."""
    if not os.path.isdir(cgroup):
        return {}
    return {p["attach_type"]: p["name"] for p in bpftool("cgroup", "show", cgroup)}


def prog_names() -> dict[int, str]:
    return {p["id"]: p.get("name", "") for p in bpftool("prog", "show")}


def pins(uid: str) -> list[str]:
    try:
        return sorted(os.listdir(PIN_ROOT / uid))
    except FileNotFoundError:
        return []


def pinned_id(uid: str, pin: str) -> int | None:
    """The id of the object pinned at PIN_ROOT/uid/pin (prog_*, link_*, map_*), from bpftool."""
    kind = {"prog": "prog", "link": "link", "map": "map"}[pin.split("_", 1)[0]]
    path = PIN_ROOT / uid / pin
    if not path.exists():
        return None
    return int(bpftool(kind, "show", "pinned", str(path))["id"])


def ebpf_attachments(node: str, key: str, netns: str) -> dict[str, tuple[int, int, str]]:
    """attach type -> (link id, program id, program name) of the pod's links, from bpftool alone."""
    names = prog_names()
    links = bpf_links(pod_cgroup(node, key), netns)
    return {t: (link["id"], link["prog_id"], names.get(link["prog_id"], "?")) for t, link in links.items()}


def ebpf_problems(node: str, key: str, netns: str) -> list[str]:
    """Why the pod's eBPF capture is not complete per the kernel (empty: complete).

    Complete = the four links (connect4, connect6 and sock_ops on the pod's cgroup, sk_lookup on its netns)
    run our programs, `bpftool cgroup show` lists the three cgroup programs, and the pin directory holds every program,
    link and map, the pins being the very objects attached.
    """
    uid = pod_uid(key)
    problems = []
    attached = ebpf_attachments(node, key, netns)
    names = {t: name for t, (_, _, name) in attached.items()}
    if names != POD_PROGS:
        problems.append(f"links {names}, want {POD_PROGS}")
    on_cgroup = cgroup_progs(pod_cgroup(node, key))
    if on_cgroup != CGROUP_PROGS:
        problems.append(f"cgroup programs {on_cgroup}, want {CGROUP_PROGS}")
    if pins(uid) != POD_PINS:
        problems.append(f"pins {pins(uid)}, want {POD_PINS}")
    else:
        for attach_type, (link_id, prog_id, _) in attached.items():
            hook = HOOK_OF[attach_type]
            if pinned_id(uid, f"link_{hook}") != link_id or pinned_id(uid, f"prog_{hook}") != prog_id:
                problems.append(f"{hook}: the pinned link/program are not the attached link {link_id}/prog {prog_id}")
    return problems


def ebpf_nothing(node: str, key: str, netns: str) -> bool:
    """No link, no cgroup program and no pin directory of ours for the pod."""
    cgroup = pod_cgroup(node, key)
    return not bpf_links(cgroup, netns) and not cgroup_progs(cgroup) and not (PIN_ROOT / pod_uid(key)).exists()


def our_bpf_objects() -> dict[str, set[int]]:
    """Ids of every loaded program, map and link of the pods' capture, by kind (names written out above)."""
    progs = {p["id"] for p in bpftool("prog", "show") if p.get("name") in OUR_PROGS}
    maps = {m["id"] for m in bpftool("map", "show") if m.get("name") in OUR_MAPS}
    links = {link["id"] for link in bpftool("link", "show") if link.get("prog_id") in progs}
    return {"progs": progs, "maps": maps, "links": links}


# --- processes ----------------------------------------------------------------------------------------------


def fds(pid: int) -> list[str]:
    """What each of the process's fds points at, with inode numbers blanked (sorted)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(re.sub(r"\[\d+\]", "[]", os.readlink(f"/proc/{pid}/fd/{fd}")))
        except FileNotFoundError:  # closed between listing and reading: a transient fd
            continue
    return sorted(out)


class FabricCapture:
    """tcpdump on the lab's fabric bridge (every cross-node packet passes it), full packets to a pcap file;
    started when it says it is listening, stopped by `stop()` or the first `packets()`."""

    def __init__(self, lab: Lab, path: Path) -> None:
        self.path = path
        netns, iface = lab.fabric_interface()
        argv = ["ip", "netns", "exec", netns, "tcpdump", "-i", iface, "-nn", "-U", "--immediate-mode", "-s", "0",
                "-Z", "root", "-w", str(path), "tcp"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert "listening on" in line, line

    def stop(self) -> None:
        if self.proc.poll() is None:
            time.sleep(0.3)  # let the last packets reach the file
            self.proc.send_signal(signal.SIGINT)
            self.proc.communicate(timeout=20)

    def packets(self, bpf: str) -> list[str]:
        self.stop()
        return sh("tcpdump", "-r", str(self.path), "-nn", "-q", *bpf.split(), timeout=120).splitlines()


# An echo server for the pods: it first tells the client the peer address it accepted the connection
# from (the tunnel spoofs the client pod's IP), then echoes until EOF and half-closes.
PEER_ECHO_SERVER = r"""
import socket, sys, threading
s = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=4096)
print("listening", flush=True)
def serve(c, peer):
    try:
        c.sendall(b"peer " + peer[0].encode() + b"\n")
        while data := c.recv(262144):
            c.sendall(data)
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""


M = TypeVar("M", bound=Mesh)


@contextlib.contextmanager
def lab_mesh(tmp_path: Path, make: Callable[[Lab, Path], M], prefix: str = "na-mesh-") -> Iterator[M]:
    """The default lab with a mesh from `make(lab, run_dir)`, started; stopped and torn down after, the
    processes' logs kept in `tmp_path` for a post-mortem."""
    if Path("/run/nodeagent/lab/state.json").exists():
        raise AssertionError(
            "a lab is already up on this host: run `sudo nodeagent lab down` before the privileged tests"
        )
    run_dir = Path(tempfile.mkdtemp(prefix=prefix))  # short: ZDS socket paths must fit 108 bytes
    lab = Lab.up(DEFAULT_TOPOLOGY)
    mesh = make(lab, run_dir)
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()
        teardown()
        for log in run_dir.glob("*.log"):
            shutil.copy(log, tmp_path / log.name)
        shutil.rmtree(run_dir, ignore_errors=True)
