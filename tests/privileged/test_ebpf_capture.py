"""eBPF capture in a lab pod, checked with the kernel's own tools (bpftool -j, ss), not with nodeagent's records.

The code under test is nodeagent.ebpf.loader (compile, load, pin, attach, remove) and pins.observe (drift).
A stand-in tunnel process (it imports nodeagent.ebpf.maps, as the real tunnel does, to put its :15006
listener in the pinned SOCKMAP and to read original destinations) listens on 15001/15006/15008 in the
pod's netns but outside the pod's cgroup, like the real tunnel. Every oracle is bpftool's JSON, ss, or
the plain sockets of the stand-in and the clients.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import oracles
import pytest
from oracles import OUR_MAPS, PIN_ROOT, bpftool

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(240)]

LAB = [sys.executable, "-m", "nodeagent.lab"]
STATE_DIR = Path("/run/nodeagent/lab")
POD = "shop/frontend"
POD_IP = "10.10.1.10"
REMOTE = ("10.10.2.10", 8080)  # shop/checkout on node2: nothing needs to listen there
# hook (pin suffix) -> attach type as bpftool names it, and what bpftool lists on the pod's cgroup
ATTACH = {
    "connect4": "cgroup_inet4_connect",
    "connect6": "cgroup_inet6_connect",
    "sockops": "cgroup_sock_ops",
    "sk_lookup": "sk_lookup",
}
HOOKS = tuple(ATTACH)
ON_CGROUP = {
    "cgroup_inet4_connect": "na_connect4",
    "cgroup_inet6_connect": "na_connect6",
    "cgroup_sock_ops": "na_sockops",
}
PROGS = {*ON_CGROUP.values(), "na_sk_lookup"}

STANDIN = r"""
import json, select, socket, sys
from nodeagent.ebpf import maps, structs
uid = sys.argv[1]
listeners = {}
for port in (15001, 15006, 15008):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    listeners[s] = port
inbound = next(s for s, p in listeners.items() if p == 15006)
maps.put_socket(f"{structs.pin_dir(uid)}/{structs.MAP_LISTENER}", 0, inbound.fileno())
print("ready", flush=True)
held = []
while True:
    ready, _, _ = select.select(list(listeners) + [sys.stdin], [], [])
    if sys.stdin in ready:
        break
    for s in ready:
        conn, peer = s.accept()
        seen = {"listener": listeners[s], "peer": list(peer), "local": list(conn.getsockname())}
        if listeners[s] == 15001:
            with maps.obj_get(f"{structs.pin_dir(uid)}/{structs.MAP_ORIG_DST}") as m:
                raw = maps.lookup(m.fd, bytes(structs.NaAddr4.of(peer[0], peer[1])), 16)
            if raw:
                ip, port = structs.NaOrig.from_buffer_copy(raw).address
                seen["orig"] = [str(ip), port]
        conn.sendall(json.dumps(seen).encode() + b"\n")
        held.append(conn)  # keep it open: the app's socket stays alive, so its map entry does too
"""

CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)  # "::ffff:a.b.c.d": IPv6 socket
s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except OSError as exc:
    print("ERROR", exc.errno, flush=True)
    sys.exit(0)
print(s.recv(4096).decode().strip(), flush=True)
if len(sys.argv) > 3:
    sys.stdin.readline()  # hold the connection open until told
"""


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True, **kw)


def lab_exec(pod: str, code: str, *args: str) -> str:
    return run([*LAB, "exec", pod, "--", sys.executable, "-c", code, *args]).stdout.strip()


@pytest.fixture(scope="module")
def lab() -> Iterator[dict[str, str]]:
    if STATE_DIR.exists():
        pytest.fail("a lab is already up on this host: run `sudo nodeagent lab down` before the privileged tests")
    run([*LAB, "up"])
    try:
        inventory = run(
            [
                sys.executable,
                "-c",
                "from nodeagent.lab.cluster import Lab; import json; lab = Lab.load(); "
                "p = {x.key: x for x in lab.inventory.pods}['" + POD + "']; "
                "print(json.dumps({'uid': p.uid, 'cgroup': str(lab.pod_cgroup(p.key)), "
                "'netns': '/var/run/netns/' + lab.pod_netns(p.key)}))",
            ]
        ).stdout
        yield json.loads(inventory)
    finally:
        subprocess.run([*LAB, "down"], capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def ebpf() -> Any:
    from nodeagent.ebpf import loader, pins

    loader.ensure_bpffs()
    return loader, pins


@pytest.fixture
def captured(lab: dict[str, str], ebpf: Any) -> Iterator[dict[str, str]]:
    loader, _ = ebpf
    import ipaddress

    config = loader.PodConfig(lab["uid"], ipaddress.IPv4Address(POD_IP))
    loader.ensure(config, lab["cgroup"], lab["netns"])
    try:
        yield lab
    finally:
        loader.remove(lab["uid"])


def in_pod_netns(captured: dict[str, str], script: str) -> subprocess.Popen[str]:
    """`script` run with the pod's uid as argument in its netns (not its cgroup), as the tunnel runs."""
    proc = subprocess.Popen(
        ["nsenter", f"--net={captured['netns']}", "--", sys.executable, "-c", script, captured["uid"]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).parents[2]),
    )
    assert proc.stdout is not None and proc.stdin is not None
    return proc


@pytest.fixture
def standin(captured: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = in_pod_netns(captured, STANDIN)
    assert proc.stdout is not None and proc.stdin is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready and proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    try:
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


links_of = oracles.bpf_links


def test_programs_are_attached_pinned_and_adopted(captured: dict[str, str], ebpf: Any) -> None:
    loader, _ = ebpf
    cgroup, netns, uid = captured["cgroup"], captured["netns"], captured["uid"]
    attached = {p["attach_type"]: p["name"] for p in bpftool("cgroup", "show", cgroup)}
    assert attached == ON_CGROUP
    links = links_of(cgroup, netns)
    assert set(links) == set(ATTACH.values())
    progs = {p["id"]: p for p in bpftool("prog", "show")}
    assert progs[links["sk_lookup"]["prog_id"]]["name"] == "na_sk_lookup"
    assert progs[links["sk_lookup"]["prog_id"]]["type"] == "sk_lookup"

    pin_dir = PIN_ROOT / uid
    assert sorted(os.listdir(pin_dir)) == sorted(
        [f"{kind}_{hook}" for kind in ("prog", "link") for hook in HOOKS]
        + ["map_cookie_dst", "map_orig_dst", "map_listener", "map_bypass", "map_stats", "map_config"]
    )
    for hook in HOOKS:
        pinned = bpftool("prog", "show", "pinned", str(pin_dir / f"prog_{hook}"))
        assert pinned["id"] == links[ATTACH[hook]]["prog_id"]
    map_names = {m["name"] for m in bpftool("map", "show")}
    assert map_names >= OUR_MAPS
    for name in ("map_orig_dst", "map_listener"):
        assert bpftool("map", "show", "pinned", str(pin_dir / name))["name"] == "na_" + name[4:]

    # A second ensure adopts: nothing repaired, the same kernel objects.
    import ipaddress

    assert loader.ensure(loader.PodConfig(uid, ipaddress.IPv4Address(POD_IP)), cgroup, netns) == ()
    assert links_of(cgroup, netns) == links


def test_outbound_reaches_15001_with_original_destination(
    captured: dict[str, str], standin: subprocess.Popen[str]
) -> None:
    holder = subprocess.Popen(
        [*LAB, "exec", POD, "--", sys.executable, "-c", CLIENT, *map(str, REMOTE), "hold"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        seen = json.loads(holder.stdout.readline())
        _check_outbound(captured, seen)
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)

    _check_entry_deleted(captured, seen["peer"][1])


def _check_entry_deleted(captured: dict[str, str], source_port: int) -> None:
    """Once the app's socket is closed its entry is deleted (sockops STATE_CB), not left for the LRU. The
    socket reaches TCP_CLOSE when its FIN is acked, in softirq: on a busy machine just after the app exits."""

    def left() -> list[Any]:
        dump = bpftool("map", "dump", "pinned", str(PIN_ROOT / captured["uid"] / "map_orig_dst"))
        return [k for k, _ in map(_formatted, dump) if k["port"] == _be16(source_port)]

    deadline = time.monotonic() + 5
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left() == []


def _stat(captured: dict[str, str], slot: int) -> int:
    """Slot `slot` of the pod's map_stats (nodeagent.h enum na_stat), read by bpftool."""
    dump = bpftool("map", "dump", "pinned", str(PIN_ROOT / captured["uid"] / "map_stats"))
    return int(next(v for k, v in map(_formatted, dump) if k == slot))


OUT_REDIRECTED, OUT_SKIPPED, OUT_MAPPED = 0, 1, 7  # enum na_stat


def test_an_ipv6_socket_to_an_ipv4_mapped_address_is_captured_like_ipv4(
    captured: dict[str, str], standin: subprocess.Popen[str]
) -> None:
    """Java's and .NET's dual-mode sockets reach IPv4 peers as AF_INET6 sockets connecting to ::ffff:a.b.c.d.
    The kernel runs cgroup/connect6 for them, never connect4, and sends IPv4: such a connection must reach the
    tunnel's :15001 with its original destination exactly as an AF_INET one does (not leave the pod in
    plaintext), with the same skips; an IPv6 destination that is not IPv4-mapped is left alone."""
    holder = subprocess.Popen(
        [*LAB, "exec", POD, "--", sys.executable, "-c", CLIENT, f"::ffff:{REMOTE[0]}", str(REMOTE[1]), "hold"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        line = holder.stdout.readline()
        assert line.startswith("{"), f"the connect was not captured: {line!r}"  # "ERROR 111": it went to node2
        seen = json.loads(line)
        _check_outbound(captured, seen)  # the same listener, peer, map entry and ss view as for AF_INET
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    _check_entry_deleted(captured, seen["peer"][1])
    assert (_stat(captured, OUT_MAPPED), _stat(captured, OUT_REDIRECTED)) == (1, 1)

    # The skips are connect4's: loopback reaches the port asked for, a tunnel port is not rewritten.
    seen = json.loads(lab_exec(POD, CLIENT, "::ffff:127.0.0.1", "15006"))
    assert seen["listener"] == 15006 and seen["local"] == ["127.0.0.1", 15006]
    assert lab_exec(POD, CLIENT, f"::ffff:{REMOTE[0]}", "15008") == "ERROR 111"
    assert lab_exec(POD, CLIENT, f"::ffff:{POD_IP}", "8080") == "ERROR 111"  # the pod's own IP: nothing there
    # Native IPv6 is not rewritten: the pod has no route to fd00::1 (ENETUNREACH), where :15001 would answer.
    assert lab_exec(POD, CLIENT, "fd00::1", "8080") == "ERROR 101"
    assert (_stat(captured, OUT_MAPPED), _stat(captured, OUT_REDIRECTED), _stat(captured, OUT_SKIPPED)) == (1, 1, 3)


_formatted = oracles.bpf_formatted


def _be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def _ip(text: str) -> int:
    return int.from_bytes(bytes(map(int, text.split("."))), "little")


def _check_outbound(captured: dict[str, str], seen: dict[str, Any]) -> None:
    assert seen["listener"] == 15001
    assert seen["peer"][0] == POD_IP and seen["local"] == [POD_IP, 15001]
    assert seen["orig"] == list(REMOTE)  # read from the pinned map by the stand-in, through ebpf.maps
    # Independently: bpftool's view of the pinned map holds the same entry, keyed by the app's source port.
    dump = bpftool("map", "dump", "pinned", str(PIN_ROOT / captured["uid"] / "map_orig_dst"))
    entries = {(k["ip"], k["port"]): v for k, v in map(_formatted, dump)}
    key = (
        int.from_bytes(bytes(map(int, POD_IP.split("."))), "little"),
        int.from_bytes(seen["peer"][1].to_bytes(2, "big"), "little"),
    )
    value = entries[key]
    assert value["ip"] == int.from_bytes(bytes(map(int, REMOTE[0].split("."))), "little")
    assert value["port"] == int.from_bytes(REMOTE[1].to_bytes(2, "big"), "little")
    # ss in the pod's netns: the app's connection ends at the tunnel's :15001, not at the remote pod.
    ss = run(["nsenter", f"--net={captured['netns']}", "--", "ss", "-tnH", "state", "established"]).stdout
    ss = ss.replace("[::ffff:", "").replace("]", "")  # an IPv6 socket's IPv4-mapped addresses, as IPv4
    assert f"{POD_IP}:15001" in ss and f"{REMOTE[0]}:{REMOTE[1]}" not in ss


def test_loopback_and_tunnel_ports_are_not_redirected(captured: dict[str, str], standin: subprocess.Popen[str]) -> None:
    seen = json.loads(lab_exec(POD, CLIENT, "127.0.0.1", "15006"))  # loopback: reaches the port asked for
    assert seen["listener"] == 15006 and seen["local"] == ["127.0.0.1", 15006]
    # A tunnel port is not rewritten: the connect goes to node2's pod, where nothing listens on 15008.
    assert lab_exec(POD, CLIENT, "10.10.2.10", "15008") == "ERROR 111"


def test_inbound_goes_to_15006_with_the_original_destination_as_local_address(
    captured: dict[str, str], standin: subprocess.Popen[str]
) -> None:
    seen = json.loads(lab_exec("shop/payments", CLIENT, POD_IP, "8080"))
    assert seen["listener"] == 15006
    assert seen["local"] == [POD_IP, 8080] and seen["peer"][0] == "10.10.1.11"
    seen = json.loads(lab_exec("shop/payments", CLIENT, POD_IP, "15008"))  # HBONE: reached directly
    assert seen["listener"] == 15008 and seen["local"] == [POD_IP, 15008]


def test_a_pod_cgroup_in_the_kubelets_layout_is_found_and_captured(
    captured: dict[str, str], standin: subprocess.Popen[str]
) -> None:
    """The agent's `--cgroup-pattern kubelet:DIR` (the default in Kubernetes mode) on a cgroup laid out as
    the kubelet's systemd driver lays it out: the programs move there, and a process in it is captured
    while the lab's own cgroup of the pod no longer is."""
    import asyncio
    import ipaddress

    from nodeagent.capture.ebpf import CgroupResolver, EbpfBackend
    from nodeagent.model import Pod

    uid = captured["uid"]
    flat = uid.replace("-", "_")
    kubelet_root = "nodeagent-test-kubelet"
    top = Path(oracles.cgroup2_root()) / kubelet_root
    pod_cgroup = top / f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{flat}.slice"
    pod_cgroup.mkdir(parents=True)
    namespace, name = POD.split("/")
    ip = ipaddress.IPv4Address(POD_IP)
    pod = Pod(name=name, namespace=namespace, uid=uid, node="node1", service_account="frontend", ip=ip)
    try:
        backend = EbpfBackend(CgroupResolver(f"kubelet:{kubelet_root}"))
        asyncio.run(backend.install(pod, captured["netns"]))
        attached = {p["attach_type"]: p["name"] for p in bpftool("cgroup", "show", str(pod_cgroup))}
        assert attached == ON_CGROUP
        assert bpftool("cgroup", "show", captured["cgroup"]) == []

        enter = f'echo $$ > {pod_cgroup}/cgroup.procs && exec "$0" -c "$1" "$2" "$3" hold'
        argv = ["sh", "-c", enter, sys.executable, CLIENT, *map(str, REMOTE)]
        holder = subprocess.Popen(
            ["nsenter", f"--net={captured['netns']}", "--", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdin is not None
        try:
            _check_outbound(captured, json.loads(holder.stdout.readline()))
        finally:
            holder.stdin.close()
            holder.wait(timeout=10)
        assert lab_exec(POD, CLIENT, *map(str, REMOTE)) == "ERROR 111"  # the lab's cgroup: not captured now
    finally:
        for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            directory.rmdir()
        top.rmdir()


APP = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
if s.family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual-stack: IPv4 peers arrive as ::ffff:a.b.c.d
s.bind((sys.argv[1], 8080))
s.listen(8)
print("listening", flush=True)
conn, peer = s.accept()
print(peer[0], peer[1], flush=True)
sys.stdin.readline()
"""

FROM_PORT = r"""
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[3])))
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
print("connected", flush=True)
"""


@pytest.mark.parametrize("listen", ["0.0.0.0", "::"], ids=["ipv4-app", "dual-stack-app"])
def test_a_bypass_entry_is_used_up_when_the_app_accepts(captured: dict[str, str], listen: str) -> None:
    """The tunnel's connection to the app from the client's IP passes sk_lookup through a na_bypass entry, which
    sockops deletes when the app accepts, so a later SYN from that address and port is captured again. An app
    listening on [::] (dual-stack, the default of Java and .NET) accepts IPv4 on an AF_INET6 socket: its
    entry must be used up all the same."""
    from nodeagent.ebpf import maps

    app = subprocess.Popen(
        [*LAB, "exec", POD, "--", sys.executable, "-c", APP, listen],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert app.stdout is not None and app.stdin is not None
    try:
        assert app.stdout.readline().strip() == "listening"
        client, port = "10.10.1.11", 40123 if listen == "0.0.0.0" else 40124  # shop/payments, not captured
        assert maps.announce_bypass(captured["uid"], client, port)
        bypass = PIN_ROOT / captured["uid"] / "map_bypass"
        assert len(bpftool("map", "dump", "pinned", str(bypass))) == 1
        assert lab_exec("shop/payments", FROM_PORT, POD_IP, "8080", str(port)) == "connected"
        assert app.stdout.readline().split() == [client if listen == "0.0.0.0" else f"::ffff:{client}", str(port)]
        assert bpftool("map", "dump", "pinned", str(bypass)) == []
    finally:
        app.stdin.close()
        try:
            app.wait(timeout=10)
        except subprocess.TimeoutExpired:  # still in accept(): the test failed before the connection
            app.kill()
            app.wait()


def test_fail_closed_without_a_tunnel(captured: dict[str, str]) -> None:
    # Nothing listens in the pod: the app's outbound connect and an inbound connection are both refused.
    assert lab_exec(POD, CLIENT, *map(str, REMOTE)) == "ERROR 111"
    assert lab_exec("shop/payments", CLIENT, POD_IP, "8080") == "ERROR 111"


RECLAIM = r"""
import json, select, socket, sys
from nodeagent.ebpf import maps
uid = sys.argv[1]
def listener():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", 15006))
    s.listen(8)
    return s
def serve_one(*listeners):
    ready, _, _ = select.select(listeners, [], [], 20)
    conn, _ = ready[0].accept()
    conn.sendall(json.dumps({"listener": 15006}).encode() + b"\n")
    conn.close()
old, new = listener(), listener()  # one reuseport group: a tunnel and its successor
maps.register_inbound_listener(uid, old.fileno())
print(json.dumps({"reclaimed": maps.reclaim_inbound_listener(uid, new.fileno())}), flush=True)
serve_one(old, new)
old.close()  # the kernel empties the slot: sk_lookup has nothing to steer to
print(json.dumps({"closed": True}), flush=True)
sys.stdin.readline()
print(json.dumps({"reclaimed": maps.reclaim_inbound_listener(uid, new.fileno())}), flush=True)
serve_one(new)
"""


def test_an_emptied_listener_slot_is_reclaimed_and_a_held_one_kept(captured: dict[str, str]) -> None:
    """maps.reclaim_inbound_listener, which the tunnel calls periodically: while a listener is in the pod's
    map_listener it is left there; once that socket closes, inbound plaintext is refused (fail closed)
    until the reclaim puts the other listener in, and then reaches it."""
    proc = in_pod_netns(captured, RECLAIM)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert json.loads(proc.stdout.readline() or "null") == {"reclaimed": False}, proc.stderr
        assert json.loads(lab_exec("shop/payments", CLIENT, POD_IP, "8080")) == {"listener": 15006}
        assert json.loads(proc.stdout.readline() or "null") == {"closed": True}
        assert lab_exec("shop/payments", CLIENT, POD_IP, "8080") == "ERROR 111"
        proc.stdin.write("reclaim\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline() or "null") == {"reclaimed": True}
        assert json.loads(lab_exec("shop/payments", CLIENT, POD_IP, "8080")) == {"listener": 15006}
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_detached_by_hand_is_detected_and_repaired(captured: dict[str, str], ebpf: Any) -> None:
    loader, pins = ebpf
    cgroup, netns, uid = captured["cgroup"], captured["netns"], captured["uid"]
    before = links_of(cgroup, netns)
    run(["bpftool", "link", "detach", "id", str(before["cgroup_inet4_connect"]["id"])])
    run(["bpftool", "link", "detach", "id", str(before["sk_lookup"]["id"])])
    assert sorted(p["attach_type"] for p in bpftool("cgroup", "show", cgroup)) == [
        "cgroup_inet6_connect",
        "cgroup_sock_ops",
    ]
    drift = pins.observe(uid, cgroup, netns).drift()
    assert any(d.startswith("connect4:") and "detached" in d for d in drift), drift
    assert any(d.startswith("sk_lookup:") and "detached" in d for d in drift), drift

    import ipaddress

    repaired = loader.ensure(loader.PodConfig(uid, ipaddress.IPv4Address(POD_IP)), cgroup, netns)
    assert len(repaired) == 2, repaired
    after = links_of(cgroup, netns)
    assert set(after) == set(ATTACH.values())
    assert after["cgroup_inet4_connect"]["prog_id"] == before["cgroup_inet4_connect"]["prog_id"]  # not recompiled
    assert after["sk_lookup"]["id"] != before["sk_lookup"]["id"]
    assert pins.observe(uid, cgroup, netns).drift() == ()


def test_unpinned_program_is_reloaded_keeping_the_maps(captured: dict[str, str], ebpf: Any) -> None:
    loader, _ = ebpf
    cgroup, netns, uid = captured["cgroup"], captured["netns"], captured["uid"]
    maps_before = bpftool("map", "show", "pinned", str(PIN_ROOT / uid / "map_listener"))["id"]
    os.unlink(PIN_ROOT / uid / "prog_sockops")
    import ipaddress

    repaired = loader.ensure(loader.PodConfig(uid, ipaddress.IPv4Address(POD_IP)), cgroup, netns)
    assert repaired and "prog_sockops is missing" in repaired[0] and "loaded" in repaired[0]
    assert bpftool("map", "show", "pinned", str(PIN_ROOT / uid / "map_listener"))["id"] == maps_before
    assert sorted(p["name"] for p in bpftool("cgroup", "show", cgroup)) == sorted(ON_CGROUP.values())


def test_a_replaced_map_pin_reloads_the_programs_onto_the_pinned_maps(captured: dict[str, str], ebpf: Any) -> None:
    loader, pins = ebpf
    cgroup, netns, uid = captured["cgroup"], captured["netns"], captured["uid"]
    old_map = bpftool("map", "show", "pinned", str(PIN_ROOT / uid / "map_orig_dst"))["id"]
    os.unlink(PIN_ROOT / uid / "map_orig_dst")  # sockops keeps writing the old map; the tunnel reads the pin
    drift = pins.observe(uid, cgroup, netns).drift()
    assert any(d.startswith("sockops:") and str(old_map) in d for d in drift), drift
    assert any("map_orig_dst is not pinned" in d for d in drift), drift
    import ipaddress

    repaired = loader.ensure(loader.PodConfig(uid, ipaddress.IPv4Address(POD_IP)), cgroup, netns)
    assert repaired and "loaded" in repaired[0], repaired
    pinned = {bpftool("map", "show", "pinned", str(PIN_ROOT / uid / f"map_{n[3:]}"))["id"] for n in OUR_MAPS}
    assert old_map not in pinned
    for hook in HOOKS:
        assert set(bpftool("prog", "show", "pinned", str(PIN_ROOT / uid / f"prog_{hook}"))["map_ids"]) <= pinned
    assert pins.observe(uid, cgroup, netns).drift() == ()


def test_programs_of_another_build_are_swapped_into_their_links_in_place(
    captured: dict[str, str], ebpf: Any, standin: subprocess.Popen[str]
) -> None:
    """An agent upgrade: the pod's pinned programs are another build's (here: the same sources built for another
    tunnel mark, so other instructions and another kernel tag). ensure() must replace them - a restarted agent
    that adopted them as they are would never roll out a fixed program - and without a moment of no capture:
    the links stay (same ids, never detached), only the programs inside them change."""
    loader, pins = ebpf
    cgroup, netns, uid = captured["cgroup"], captured["netns"], captured["uid"]
    import ipaddress

    ip = ipaddress.IPv4Address(POD_IP)
    current = loader.PodConfig(uid, ip)
    older = loader.PodConfig(uid, ip, build=loader.BuildConfig(tunnel_mark=0x540))
    assert loader.compiled(older.build).tags != loader.compiled(current.build).tags
    for prog in (f"prog_{hook}" for hook in HOOKS):
        os.unlink(PIN_ROOT / uid / prog)  # the fixture's programs go; the links keep running them
    repaired = loader.ensure(older, cgroup, netns)
    assert repaired and "loaded" in repaired[0]
    links = links_of(cgroup, netns)
    old_tags = {hook: bpftool("prog", "show", "id", str(link["prog_id"]))["tag"] for hook, link in links.items()}
    # Which build a program is from is judged with this build's tags (ensure(), which the agent's periodic pass
    # runs: an older agent overlapping a rolling update may swap its own back until it exits); `inspect`
    # reads the kernel without compiling, so without tags, and does not judge it.
    assert pins.observe(uid, cgroup, netns).drift() == ()
    drift = pins.observe(uid, cgroup, netns, tags=loader.compiled(current.build).tags).drift()
    assert drift and all("is another build's" in line for line in drift), drift

    repaired = loader.ensure(current, cgroup, netns)
    assert "another build's" in repaired[0] and "loaded" in repaired[0], repaired
    assert sum("in place" in line for line in repaired) == len(HOOKS), repaired
    after = links_of(cgroup, netns)
    assert {hook: link["id"] for hook, link in after.items()} == {hook: link["id"] for hook, link in links.items()}
    new_tags = {hook: bpftool("prog", "show", "id", str(link["prog_id"]))["tag"] for hook, link in after.items()}
    assert sorted(new_tags.values()) == sorted(loader.compiled(current.build).tags.values())
    assert new_tags != old_tags  # the mark is in some programs only; all of them are reloaded together
    for hook in HOOKS:  # the pins name the programs the links run
        pinned = bpftool("prog", "show", "pinned", str(PIN_ROOT / uid / f"prog_{hook}"))
        assert pinned["tag"] == loader.compiled(current.build).tags[hook]
    assert pins.observe(uid, cgroup, netns).drift() == ()
    assert loader.ensure(current, cgroup, netns) == ()  # this build's programs are adopted as they are
    # ... and capture works through them: an inbound connection still reaches the tunnel's :15006.
    seen = json.loads(lab_exec("shop/payments", CLIENT, POD_IP, "8080"))
    assert seen["listener"] == 15006 and seen["local"] == [POD_IP, 8080]


def test_a_link_running_another_program_than_its_pin_is_repaired_in_place(
    captured: dict[str, str], ebpf: Any, standin: subprocess.Popen[str]
) -> None:
    """Two agents overlapping in a rolling update: one has re-pinned its programs while the links still run
    the other's. The repair swaps the pinned program into each link (same link ids) rather than detaching
    and re-creating the links, which would leave the hooks empty for a moment."""
    loader, pins = ebpf
    cgroup, netns, uid = captured["cgroup"], captured["netns"], captured["uid"]
    import ipaddress

    current = loader.PodConfig(uid, ipaddress.IPv4Address(POD_IP))
    older = loader.PodConfig(uid, ipaddress.IPv4Address(POD_IP), build=loader.BuildConfig(tunnel_mark=0x540))
    links = {hook: link["id"] for hook, link in links_of(cgroup, netns).items()}
    for fd in loader.load(older).values():  # the pins now name the other build's programs; the links run ours
        fd.close()
    repaired = loader.ensure(current, cgroup, netns)
    assert sum("in place" in line for line in repaired) == len(HOOKS), repaired
    after = links_of(cgroup, netns)
    assert {hook: link["id"] for hook, link in after.items()} == links
    for hook in HOOKS:
        pinned = bpftool("prog", "show", "pinned", str(PIN_ROOT / uid / f"prog_{hook}"))
        assert pinned["tag"] == loader.compiled(current.build).tags[hook]
    assert sorted(link["prog_id"] for link in after.values()) == sorted(
        bpftool("prog", "show", "pinned", str(PIN_ROOT / uid / f"prog_{hook}"))["id"] for hook in HOOKS
    )
    assert pins.observe(uid, cgroup, netns).drift() == () and loader.ensure(current, cgroup, netns) == ()
    seen = json.loads(lab_exec("shop/payments", CLIENT, POD_IP, "8080"))
    assert seen["listener"] == 15006


def test_a_pod_pinned_by_a_build_without_connect6_gets_it_on_upgrade(
    captured: dict[str, str], ebpf: Any, standin: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pods enrolled by an agent from before connect6 have three hooks, another build's programs in them, and
    so the IPv4-mapped hole. The upgraded agent's ensure() (its install at start and its verify repairs) must
    attach connect6 as well as swap the other three programs into their links in place."""
    loader, pins = ebpf
    cgroup, netns, uid = captured["cgroup"], captured["netns"], captured["uid"]
    import ipaddress

    current = loader.PodConfig(uid, ipaddress.IPv4Address(POD_IP))
    # What the previous agent left: its hook list (no connect6), its build (another tunnel mark: other code).
    previous = loader.PodConfig(uid, current.pod_ip, build=loader.BuildConfig(tunnel_mark=0x541))
    run(["bpftool", "link", "detach", "id", str(links_of(cgroup, netns)["cgroup_inet6_connect"]["id"])])
    for pin in ("link_connect6", *(f"prog_{hook}" for hook in HOOKS)):
        os.unlink(PIN_ROOT / uid / pin)
    with monkeypatch.context() as old_agent:
        old_agent.setattr(pins, "HOOKS", tuple(h for h in pins.HOOKS if h.name != "connect6"))
        loader.ensure(previous, cgroup, netns)
    links = {attach: link["id"] for attach, link in links_of(cgroup, netns).items()}
    assert set(links) == {ATTACH[hook] for hook in HOOKS if hook != "connect6"}
    assert sorted(os.listdir(PIN_ROOT / uid)) == sorted(
        [f"{kind}_{hook}" for kind in ("prog", "link") for hook in HOOKS if hook != "connect6"]
        + ["map_cookie_dst", "map_orig_dst", "map_listener", "map_bypass", "map_stats", "map_config"]
    )
    mapped = (f"::ffff:{REMOTE[0]}", str(REMOTE[1]))
    assert lab_exec(POD, CLIENT, *mapped) == "ERROR 111"  # the hole: straight to node2, where nothing listens
    # What the agent's verify sees (it judges no build without compiling): connect6 is missing.
    drift = pins.observe(uid, cgroup, netns).drift()
    assert drift == ("connect6: program pin prog_connect6 is missing",), drift

    repaired = loader.ensure(current, cgroup, netns)
    assert sum("in place" in line for line in repaired) == 3, repaired
    assert f"connect6: attached to {cgroup}" in repaired, repaired
    after = links_of(cgroup, netns)
    assert {attach: after[attach]["id"] for attach in links} == links  # never detached
    assert {p["attach_type"]: p["name"] for p in bpftool("cgroup", "show", cgroup)} == ON_CGROUP
    for hook in HOOKS:
        pinned = bpftool("prog", "show", "pinned", str(PIN_ROOT / uid / f"prog_{hook}"))
        assert pinned["id"] == after[ATTACH[hook]]["prog_id"]
        assert pinned["tag"] == loader.compiled(current.build).tags[hook]
    assert pins.observe(uid, cgroup, netns).drift() == () and loader.ensure(current, cgroup, netns) == ()
    seen = json.loads(lab_exec(POD, CLIENT, *mapped))
    assert seen["listener"] == 15001 and seen["orig"] == list(REMOTE)


def test_pods_are_loaded_from_one_compile_with_their_ip_as_data(
    captured: dict[str, str], ebpf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader, pins = ebpf
    cgroup, netns, uid = captured["cgroup"], captured["netns"], captured["uid"]
    import ipaddress

    def no_compile(build: Any) -> None:
        raise AssertionError("the programs were compiled twice in one process")

    monkeypatch.setattr(loader, "_compile", no_compile)
    assert loader.remove(uid)
    other_ip = ipaddress.IPv4Address("10.10.1.99")
    loader.ensure(loader.PodConfig(uid, other_ip), cgroup, netns)
    assert pins.observe(uid, cgroup, netns).drift() == ()
    config = PIN_ROOT / uid / "map_config"

    def pod_ip4() -> int:
        key, value = oracles.bpf_formatted(bpftool("map", "dump", "pinned", str(config))[0])
        assert key == 0
        return int(value["pod_ip4"])

    assert pod_ip4() == int.from_bytes(other_ip.packed, "little")

    # The pod's IP is data the agent keeps right: overwritten by hand, it is put back and reported.
    run(["bpftool", "map", "update", "pinned", str(config), "key", *["0"] * 4, "value", *["0"] * 8])
    repaired = loader.ensure(loader.PodConfig(uid, ipaddress.IPv4Address(POD_IP)), cgroup, netns)
    assert repaired == (f"map_config held pod IP none, not {POD_IP}: rewrote it",)
    assert pod_ip4() == int.from_bytes(ipaddress.IPv4Address(POD_IP).packed, "little")
    assert loader.ensure(loader.PodConfig(uid, ipaddress.IPv4Address(POD_IP)), cgroup, netns) == ()


def test_remove_leaves_nothing(lab: dict[str, str], ebpf: Any) -> None:
    loader, _ = ebpf
    import ipaddress

    cgroup, netns, uid = lab["cgroup"], lab["netns"], lab["uid"]
    loader.ensure(loader.PodConfig(uid, ipaddress.IPv4Address(POD_IP)), cgroup, netns)
    assert loader.remove(uid) is True
    assert loader.remove(uid) is False  # idempotent
    assert not (PIN_ROOT / uid).exists()
    assert bpftool("cgroup", "show", cgroup) == []
    assert links_of(cgroup, netns) == {}
    deadline = time.monotonic() + 10  # programs and maps are freed after an RCU grace period
    while True:
        names = {p.get("name") for p in bpftool("prog", "show")} | {m.get("name") for m in bpftool("map", "show")}
        if not names & (PROGS | OUR_MAPS) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not names & (PROGS | OUR_MAPS)


def test_ctypes_mirrors_match_the_c_structs_in_btf(captured: dict[str, str]) -> None:
    from nodeagent.ebpf.structs import MIRRORS

    btf_ids = {
        bpftool("map", "show", "pinned", str(PIN_ROOT / captured["uid"] / name))["btf_id"]
        for name in ("map_orig_dst", "map_cookie_dst", "map_config")
    }
    structs: dict[str, Any] = {}
    for btf_id in btf_ids:
        for t in bpftool("btf", "dump", "id", str(btf_id))["types"]:
            if t.get("kind") == "STRUCT" and t.get("name", "").startswith("na_"):
                structs[t["name"]] = t
    assert {"na_addr4", "na_orig", "na_config"} <= set(structs)
    for mirror in MIRRORS:
        if mirror.c_name not in structs:
            continue
        c = structs[mirror.c_name]
        layout = mirror.layout()
        assert layout["size"] == c["size"], mirror.c_name
        assert layout["members"] == {m["name"]: m["bits_offset"] // 8 for m in c["members"]}, mirror.c_name


# --- the node agent with --capture ebpf ------------------------------------------------------------------

NODE1_ENROLLED = ("shop/frontend", "shop/payments")


def pod_targets(key: str) -> tuple[str, str]:
    """(cgroup dir, netns file) of a lab pod, from the lab's naming (nodeagent/lab/plan.py)."""
    namespace, name = key.split("/")
    mounts = Path("/proc/mounts").read_text().splitlines()
    cgroup2 = next(line.split()[1] for line in mounts if line.split()[2] == "cgroup2")
    return f"{cgroup2}/nodeagent-lab/node1/{namespace}.{name}", f"/var/run/netns/na-node1.{namespace}.{name}"


def wait_for(what: str, check: Any, timeout: float = 20.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def attached(key: str) -> dict[str, int]:
    """attach type -> link id of the pod's links, from bpftool."""
    return {t: link["id"] for t, link in links_of(*pod_targets(key)).items()}


FULL = set(ATTACH.values())


class AgentProc:
    def __init__(self, tmp: Path, capture: str) -> None:
        self.tmp = tmp
        self.log_path = tmp / "agent.log"
        argv = [
            *LAB, "exec", "--node", "node1", "--", sys.executable, "-m", "nodeagent.agent", "--node", "node1",
            "--inventory", str(STATE_DIR / "inventory.yaml"), "--zds-socket", str(tmp / "zds.sock"),
            "--state-dir", str(tmp / "state"), "--capture", capture, "--verify-interval", "1",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for("the agent to be ready", lambda: (s := self.status()) is not None and s["ready"], 60)

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.tmp / "state" / "node1" / "status.json").read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


def test_agent_ebpf_mode_captures_repairs_survives_and_is_inspectable(
    lab: dict[str, str], ebpf: Any, tmp_path: Path
) -> None:
    loader, _ = ebpf
    agent = AgentProc(tmp_path, "ebpf")
    try:
        wait_for("both node1 pods captured", lambda: all(set(attached(k)) == FULL for k in NODE1_ENROLLED))
        assert agent.status()["capture"] == "ebpf"  # type: ignore[index]
        # bcc compiled in a child process: the agent itself never maps bcc's library (nor LLVM with it).
        assert "libbcc" not in Path(f"/proc/{agent.status()['pid']}/maps").read_text()  # type: ignore[index]
        for key in NODE1_ENROLLED:  # no rule of ours in the pod: neither iptables flavour nor nft
            netns = pod_targets(key)[1]
            for tool in (["iptables-nft-save"], ["iptables-legacy-save"], ["nft", "list", "ruleset"]):
                out = run(["nsenter", f"--net={netns}", "--", *tool]).stdout
                assert "nodeagent" not in out.lower(), (key, tool, out)
        # Fail closed: no tunnel serves the pods, so the app's outbound connect is refused.
        assert lab_exec(POD, CLIENT, *map(str, REMOTE)) == "ERROR 111"

        # inspect redirects: MODE ebpf, the programs and maps read from the kernel.
        out = run(
            [
                sys.executable,
                "-m",
                "nodeagent.agent",
                "inspect",
                "redirects",
                "--node",
                "node1",
                "-o",
                "json",
                "--inventory",
                str(STATE_DIR / "inventory.yaml"),
                "--state-dir",
                str(tmp_path / "state"),
            ]
        ).stdout
        rows = {f"{r['namespace']}/{r['pod']}": r for r in json.loads(out)["rows"]}
        front = rows[POD]
        assert front["mode"] == "ebpf" and front["rules"] == "ok", front
        links = attached(POD)
        progs = {p["id"]: p["name"] for p in bpftool("prog", "show")}
        text = "\n".join(front["objects"])
        for link in links_of(*pod_targets(POD)).values():
            assert f"prog {link['prog_id']} {progs[link['prog_id']]}" in text and f"link {link['id']}" in text
        for m in bpftool("map", "show"):
            if m.get("name") in OUR_MAPS and f"map {m['id']} " in text:
                break
        else:
            raise AssertionError(f"no map of ours in {text}")

        # Drift: a link detached by hand is re-attached within 10 s.
        run(["bpftool", "link", "detach", "id", str(links["cgroup_inet4_connect"])])
        assert "cgroup_inet4_connect" not in attached(POD)
        took = wait_for("the agent to repair connect4", lambda: set(attached(POD)) == FULL, 10)
        assert attached(POD)["cgroup_inet4_connect"] != links["cgroup_inet4_connect"], took

        # Agent down: capture stays pinned and attached (fail closed still).
        before = {k: attached(k) for k in NODE1_ENROLLED}
        agent.stop()
        assert {k: attached(k) for k in NODE1_ENROLLED} == before
        assert lab_exec(POD, CLIENT, *map(str, REMOTE)) == "ERROR 111"

        # What an agent from before connect6 left on one pod: no connect6 link, no connect6 pins.
        run(["bpftool", "link", "detach", "id", str(before[POD].pop("cgroup_inet6_connect"))])
        for pin in ("link_connect6", "prog_connect6"):
            os.unlink(PIN_ROOT / lab["uid"] / pin)

        # A new agent (auto picks eBPF here) adopts: the same links, nothing re-attached; and the pod left
        # without connect6 gets it (an upgrade: pods enrolled before it must not keep the IPv4-mapped hole).
        agent = AgentProc(tmp_path, "auto")
        assert "capture auto: using eBPF" in agent.log_path.read_text()
        wait_for("the agent to attach connect6", lambda: "cgroup_inet6_connect" in attached(POD), 10)
        time.sleep(2.5)  # two verify rounds
        now = {k: attached(k) for k in NODE1_ENROLLED}
        assert now[POD].pop("cgroup_inet6_connect") not in before[POD].values()
        assert now == before
    finally:
        agent.stop()
        for key in NODE1_ENROLLED:
            uid = run(
                [
                    sys.executable,
                    "-c",
                    "from nodeagent.lab.cluster import Lab; "
                    f"print({{p.key: p.uid for p in Lab.load().inventory.pods}}['{key}'])",
                ]
            ).stdout.strip()
            loader.remove(uid)


# --- the same-node fast path ------------------------------------------------------------------------------

FASTPATH_RELAY = r"""
import select, socket, sys
from nodeagent.ebpf import maps
echo_port = int(sys.argv[1])
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
a, _ = listener.accept()
b = socket.create_connection(("127.0.0.1", echo_port))
maps.fastpath_splice(a, b)  # from here on the kernel moves the bytes; this process never reads them
poller = select.poll()
for s in (a, b):
    poller.register(s, select.POLLRDHUP)
poller.poll()
"""

ECHO = r"""
import socket, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
while data := conn.recv(65536):
    conn.sendall(data)
"""


def test_fast_path_moves_bytes_in_the_kernel(ebpf: Any, tmp_path: Path) -> None:
    loader, _ = ebpf
    import socket

    loader.ensure_fastpath()
    assert loader.ensure_fastpath() == ()  # adopted
    root = PIN_ROOT / "fastpath"
    prog = bpftool("prog", "show", "pinned", str(root / "prog_fp_verdict"))
    assert prog["type"] == "sk_skb" and prog["name"] == "na_fp_verdict"
    socks = bpftool("map", "show", "pinned", str(root / "map_fp_socks"))
    assert socks["type"] == "sockhash" and socks["id"] in prog["map_ids"]

    def stats() -> int:  # bytes the verdict program redirected (slot 1 of map_fp_stats), read by bpftool
        dump = bpftool("map", "dump", "pinned", str(root / "map_fp_stats"))
        return int(next(v for k, v in map(_formatted, dump) if k == 1))

    before = stats()
    cwd = str(Path(__file__).parents[2])
    procs = []
    try:
        port = ""
        for code in (ECHO, FASTPATH_RELAY):  # each prints the port it listens on
            p = subprocess.Popen([sys.executable, "-c", code, port], stdout=subprocess.PIPE, text=True, cwd=cwd)
            procs.append(p)
            assert p.stdout is not None
            port = p.stdout.readline().strip()
            assert port.isdigit()
        payload = os.urandom(4 << 20)
        with socket.create_connection(("127.0.0.1", int(port))) as c:
            import threading

            c.settimeout(20)
            # A request sent before the relay has handed over (it is still connecting to the echo server):
            # bytes queued before the hand-over must come through, first and in order.
            c.sendall(b"hello")
            assert c.recv(100) == b"hello"

            sender = threading.Thread(target=c.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < len(payload):
                chunk = c.recv(1 << 20)
                assert chunk
                got += chunk
            sender.join()
        assert bytes(got) == payload
        assert stats() - before >= 2 * len(payload)  # both directions went through the verdict program
        procs[1].wait(timeout=10)  # the relay saw both sides close without reading a byte
    finally:
        for p in procs:
            p.kill()
            p.wait()
    loader.remove_fastpath()
    assert not root.exists()
