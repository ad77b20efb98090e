"""agent/kube_netns: a pod's IPs from a fib_trie dump, the IP -> netns mapping (pure), and the resolver over a
stand-in /proc."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from nodeagent.agent.kube_netns import NetnsSighting, ProcNetnsResolver, local_ipv4s, map_addresses
from nodeagent.model import Pod, PodPhase

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.42.0.0/24 2 0 2
        |-- 10.42.0.0
           /24 link UNICAST
        |-- 10.42.0.17
           /32 host LOCAL
  +-- 127.0.0.0/8 2 0 2
     |-- 127.0.0.1
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.42.0.17
        /32 host LOCAL
"""


def test_local_addresses_without_loopback() -> None:
    assert set(local_ipv4s(FIB_TRIE)) == {ipaddress.IPv4Address("10.42.0.17")}


def test_garbage_yields_nothing() -> None:
    assert list(local_ipv4s("|-- not-an-ip\n   /32 host LOCAL\n")) == []


def trie(*ips: str) -> str:
    """A minimal fib_trie dump whose Local table holds `ips` (and loopback)."""
    leaves = "".join(f"     |-- {ip}\n        /32 host LOCAL\n" for ip in (*ips, "127.0.0.1"))
    return f"Local:\n  +-- 0.0.0.0/0 3 0 5\n{leaves}"


@pytest.mark.parametrize(
    ("sightings", "exclude", "mapped", "ambiguous"),
    [
        # one pod netns: its IP maps to its path
        ([(1, "/run/netns/cni-a", ("10.42.0.17",))], set(), {"10.42.0.17": "/run/netns/cni-a"}, set()),
        # the same inode seen again (a process inside a mounted netns): the first path (the mount) wins
        (
            [(1, "/run/netns/cni-a", ("10.42.0.17",)), (1, "/proc/42/ns/net", ("10.42.0.17",))],
            set(),
            {"10.42.0.17": "/run/netns/cni-a"},
            set(),
        ),
        # two namespaces hold the same IP (an old sandbox after IP reuse): neither is handed out
        (
            [(1, "/run/netns/cni-a", ("10.42.0.17",)), (2, "/run/netns/cni-b", ("10.42.0.17", "10.42.0.18"))],
            set(),
            {"10.42.0.18": "/run/netns/cni-b"},
            {"10.42.0.17"},
        ),
        # the host's (or the agent's own) netns is never a pod's
        (
            [(7, "/proc/1/ns/net", ("10.0.0.5",)), (1, "/run/netns/cni-a", ("10.42.0.17",))],
            {7},
            {"10.42.0.17": "/run/netns/cni-a"},
            set(),
        ),
        # a netns with only loopback maps nothing
        ([(1, "/run/netns/empty", ())], set(), {}, set()),
    ],
    ids=["one", "mount-before-process", "ambiguous", "host-excluded", "loopback-only"],
)
def test_map_addresses(
    sightings: list[tuple[int, str, tuple[str, ...]]],
    exclude: set[int],
    mapped: dict[str, str],
    ambiguous: set[str],
) -> None:
    by_ip, twice = map_addresses([NetnsSighting(i, p, trie(*ips)) for i, p, ips in sightings], frozenset(exclude))
    assert {str(ip): path for ip, path in by_ip.items()} == mapped
    assert {str(ip) for ip in twice} == ambiguous


def test_a_finished_pod_is_never_resolved_to_the_netns_that_holds_its_old_ip(tmp_path: Path) -> None:
    """A Succeeded/Failed pod keeps its podIP in its status after its sandbox is gone; the node may have
    handed that IP to a live pod, whose netns must not be taken for the finished pod's."""
    proc = tmp_path / "proc"
    (proc / "1" / "ns").mkdir(parents=True)
    (proc / "1" / "ns" / "net").touch()  # the host's (a file with its own inode stands for a netns)
    (proc / "42" / "ns").mkdir(parents=True)
    (proc / "42" / "net").mkdir()
    (proc / "42" / "ns" / "net").touch()
    (proc / "42" / "net" / "fib_trie").write_text(trie("10.42.0.17"))
    resolver = ProcNetnsResolver(proc=str(proc), netns_dir=str(tmp_path / "netns"))
    ip = ipaddress.IPv4Address("10.42.0.17")
    live = Pod("web", "shop", "uid-web", "node1", "web", ip)
    assert resolver.resolve(live) == str(proc / "42" / "ns" / "net")
    for phase in (PodPhase.SUCCEEDED, PodPhase.FAILED):
        assert resolver.resolve(Pod("job", "shop", f"uid-job-{phase.value}", "node1", "job", ip, phase=phase)) is None


def fake_proc(tmp_path: Path) -> Path:
    """A stand-in /proc whose pid 1 is the host's (its own inode) and pid 42 a pod's holding 10.42.0.17."""
    proc = tmp_path / "proc"
    (proc / "1" / "ns").mkdir(parents=True)
    (proc / "1" / "ns" / "net").touch()
    reuse_pid(proc, "42", None, trie("10.42.0.17"))
    return proc


def reuse_pid(proc: Path, pid: str, netns: str | None, fib_trie: str) -> None:
    """(Re)create process `pid`: its ns/net a symlink to `netns` (None: a netns of its own), and its fib_trie."""
    base = proc / pid
    if base.exists():
        for path in (base / "ns" / "net", base / "net" / "fib_trie"):
            path.unlink()
    (base / "ns").mkdir(parents=True, exist_ok=True)
    (base / "net").mkdir(exist_ok=True)
    if netns is None:
        (base / "ns" / "net").touch()
    else:
        (base / "ns" / "net").symlink_to(netns)
    (base / "net" / "fib_trie").write_text(fib_trie)


@pytest.mark.parametrize(
    "reused_by",
    ["/proc/self/ns/net", "host-pid-1", "another-pod"],
    ids=["the-agents-netns", "the-hosts-netns", "another-pods-netns"],
)
def test_a_pid_reused_by_a_process_in_another_netns_is_not_handed_out_again(tmp_path: Path, reused_by: str) -> None:
    """A /proc/<pid>/ns/net path outlives the pod's process: once the pid is reused it names the new
    process's netns - the node's (the agent's own, or pid 1's) or another pod's - which must never be
    taken for the pod's."""
    proc = fake_proc(tmp_path)
    resolver = ProcNetnsResolver(proc=str(proc), netns_dir=str(tmp_path / "netns"))
    pod = Pod("web", "shop", "uid-web", "node1", "web", ipaddress.IPv4Address("10.42.0.17"))
    path = str(proc / "42" / "ns" / "net")
    assert resolver.resolve(pod) == path
    assert resolver.resolve(pod) == path and resolver.scans == 1  # found: served without a scan

    other = tmp_path / "other-netns"
    other.touch()
    target = {"host-pid-1": str(proc / "1" / "ns" / "net"), "another-pod": str(other)}.get(reused_by, reused_by)
    reuse_pid(proc, "42", target, trie("10.42.0.99") if reused_by == "another-pod" else "Main:\n")
    assert resolver.resolve(pod) is None
    assert resolver.scans == 2  # a rescan found the pod's IP nowhere


def test_a_scan_never_hands_out_the_agents_own_netns(tmp_path: Path) -> None:
    """The exclusion of the node's netns holds at lookup too: a path that names it when looked up (a pid
    reused between the scan's stat and the lookup) is not a pod's."""
    proc = fake_proc(tmp_path)
    resolver = ProcNetnsResolver(proc=str(proc), netns_dir=str(tmp_path / "netns"))
    pod = Pod("web", "shop", "uid-web", "node1", "web", ipaddress.IPv4Address("10.42.0.17"))
    real_scan = resolver.scan

    def scan_then_reuse() -> None:
        real_scan()
        reuse_pid(proc, "42", "/proc/self/ns/net", "Main:\n")

    resolver.scan = scan_then_reuse  # type: ignore[method-assign]
    assert resolver.resolve(pod) is None
