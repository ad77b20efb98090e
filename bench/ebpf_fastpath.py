"""Same-node fast path, measured: direct TCP vs a relay that moves bytes with splice(2) vs with sockmap.

    sudo .venv/bin/python -m bench.ebpf_fastpath [--seconds 5] [--rounds 3]

Two enrolled pods on node1 of the lab (shop/frontend -> shop/payments). The relay stands in for the
tunnel's same-node path after its policy check: it accepts the client's connection on :15001 in the
client pod's netns and connects to the server in the server pod's netns (both loopback-local), exactly the
two sockets the tunnel holds, then relays them either with splice(2) (a thread per direction: the
kernel copies through a pipe, Python only issues the calls) or by putting both in the fast-path SOCKHASH
(nodeagent.ebpf.maps.fastpath_splice: programs/fastpath.c's sk_skb verdict redirects each skb to the
peer's egress; Python then only waits for the close). iperf3 -J gives every number; rounds are
interleaved and the median is reported with its ratio to direct TCP.

What it deliberately does not do: no TLS/HBONE (the fast path skips them for same-node pairs by design),
no capture programs (connect4 costs nothing per byte; the client connects to :15001 directly), and not
the tunnel itself: the tunnel's same-node path (nodeagent/ztunnel/local.py, which picked splice from
these numbers) is measured end to end by `make bench` as "nodeagent (eBPF capture), same-node fast path".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
from collections.abc import Iterator

from nodeagent.ebpf import loader, maps
from nodeagent.lab.cluster import DEFAULT_TOPOLOGY, Lab, exclusive
from nodeagent.netns import in_netns, netns_path

CLIENT, SERVER = "shop/frontend", "shop/payments"
RELAY_PORT, IPERF_PORT = 15001, 5201


def _pipe_relay(src: socket.socket, dst: socket.socket) -> None:
    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(r, 1031, 1 << 20)  # F_SETPIPE_SZ 1 MiB
        while True:
            n = os.splice(src.fileno(), w, 1 << 20)
            if n == 0:
                break
            while n:
                n -= os.splice(r, dst.fileno(), n)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _sockmap_relay(a: socket.socket, b: socket.socket) -> None:
    maps.fastpath_splice(a, b)  # forwards what is queued, inserts, kicks the verdict: in order
    ca, cb = maps.socket_cookie(a), maps.socket_cookie(b)
    # Wait for each side's FIN (POLLRDHUP) without reading: on a socket in the SOCKHASH, recv() can return
    # 0 although the peer did not close (the skb went to the other socket), so EOF is read from poll.
    poller = select.poll()
    peer = {a.fileno(): b, b.fileno(): a}
    for s in (a, b):
        poller.register(s, select.POLLRDHUP)
    while peer:
        for fd, events in poller.poll():
            if fd not in peer:
                continue
            with contextlib.suppress(OSError):
                peer[fd].shutdown(socket.SHUT_WR)
            poller.unregister(fd)
            del peer[fd]
            if events & (select.POLLERR | select.POLLHUP) and not events & select.POLLRDHUP:
                peer.clear()
    maps.fastpath_forget(ca, cb)


def relay(lab: Lab, mode: str, stop: threading.Event) -> threading.Thread:
    client_ns, server_ns = netns_path(lab.pod_netns(CLIENT)), netns_path(lab.pod_netns(SERVER))
    server_ip = str(lab.pod(SERVER).ip)

    def make_listener() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", RELAY_PORT))
        s.listen(64)
        return s

    listener = in_netns(client_ns, make_listener)

    def handle(a: socket.socket) -> None:
        b = in_netns(server_ns, lambda: socket.create_connection((server_ip, IPERF_PORT)))
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if mode == "splice":
                t = threading.Thread(target=_pipe_relay, args=(b, a), daemon=True)
                t.start()
                _pipe_relay(a, b)
                t.join()
            else:
                _sockmap_relay(a, b)
        finally:
            a.close()
            b.close()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                a, _ = listener.accept()
            except TimeoutError:
                continue
            a.settimeout(None)
            threading.Thread(target=handle, args=(a,), daemon=True).start()
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def iperf(lab: Lab, host: str, port: int, seconds: int) -> float:
    argv = lab.exec_argv(CLIENT, ["iperf3", "-J", "-c", host, "-p", str(port), "-t", str(seconds)])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False).stdout
    if "sum_received" not in out:
        raise RuntimeError(f"iperf3 to {host}:{port} failed: {json.loads(out).get('error', out[-500:])}")
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


@contextlib.contextmanager
def iperf_server(lab: Lab) -> Iterator[None]:
    proc = subprocess.Popen(lab.exec_argv(SERVER, ["iperf3", "-s", "-p", str(IPERF_PORT)]), stdout=subprocess.DEVNULL)
    try:
        import time

        time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"direct TCP": [], "splice relay": [], "sockmap fast path": []}
    with exclusive():
        lab = Lab.up(DEFAULT_TOPOLOGY)
        try:
            loader.ensure_bpffs()
            loader.ensure_fastpath()
            server_ip = str(lab.pod(SERVER).ip)
            client_ip = str(lab.pod(CLIENT).ip)
            with iperf_server(lab):
                for _ in range(args.rounds):
                    results["direct TCP"].append(iperf(lab, server_ip, IPERF_PORT, args.seconds))
                    for name, mode in (("splice relay", "splice"), ("sockmap fast path", "sockmap")):
                        stop = threading.Event()
                        thread = relay(lab, mode, stop)
                        try:
                            results[name].append(iperf(lab, client_ip, RELAY_PORT, args.seconds))
                            print(f"{name}: {results[name][-1]:.2f} Gbit/s", file=sys.stderr)
                        finally:
                            stop.set()
                            thread.join(timeout=5)
            stats = subprocess.run(
                ["bpftool", "-j", "map", "dump", "pinned", "/sys/fs/bpf/nodeagent/fastpath/map_fp_stats"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        finally:
            lab.down()
    direct = statistics.median(results["direct TCP"])
    print(f"{'path':20s} {'median Gbit/s':>14s} {'vs direct':>10s}  rounds")
    for name, values in results.items():
        median = statistics.median(values)
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name:20s} {median:14.2f} {median / direct:9.2f}x  {rounds}")
    print(f"fast-path verdict counters (skbs, bytes redirected by the kernel): {stats.strip()[:400]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
