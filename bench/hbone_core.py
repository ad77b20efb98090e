"""Micro-benchmark: DATA throughput through the HBONE core's receive (and send) path, no sockets.

Why: REFERENCE.md measured python-h2 4.4's receive path at 0.27-0.36 GB/s because h2 formats
`repr(frame)` for every received frame and hyperframe's repr hex-encodes the whole payload. The HBONE core
(nodeagent/ztunnel/hbone.py) replaces h2's frame buffer with one whose frames have a constant-time repr and
copy each payload once. This script feeds the same pre-built DATA frames, in 256 KiB reads as a socket
would deliver them, through:

  h2           plain h2.H2Connection (its own FrameBuffer and repr), the reference's baseline;
  core+hexrepr the HBONE server core with hyperframe's hex repr put back on its DATA frames;
  core         the HBONE server core as shipped;

and, for the other direction, the core's send path (send_data + data_to_send). Each receiver acknowledges
every byte as consumed, as the relay does. Run: `.venv/bin/python -m bench.hbone_core [--mib 512]`.
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
from hyperframe.frame import DataFrame

from nodeagent.model import SocketAddress
from nodeagent.ztunnel import hbone

READ = 256 * 1024
POD = ipaddress.ip_address("10.0.0.2")


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def client_prologue() -> bytes:
    settings = frame(4, 0, 0, (5).to_bytes(2, "big") + hbone.MiB.to_bytes(4, "big"))
    block = hpack.Encoder().encode([(b":method", b"CONNECT"), (b":authority", f"{POD}:8080".encode())])
    return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + frame(1, 0x4, 1, block)


def data_stream(total: int, frame_size: int) -> list[bytes]:
    one = frame(0, 0, 1, bytes(frame_size))
    wire = one * (total // frame_size)
    return [wire[i : i + READ] for i in range(0, len(wire), READ)]


def run_core(reads: list[bytes]) -> int:
    conn = hbone.HboneConnection(hbone.Role.SERVER, 0.0, local_addresses=frozenset({POD}))
    events = conn.receive_data(client_prologue())
    assert isinstance(events[0], hbone.StreamOpened), events
    conn.accept(1)
    conn.data_to_send()
    got = 0
    for chunk in reads:
        for event in conn.receive_data(chunk):
            if isinstance(event, hbone.DataReceived):
                got += len(event.data)
                conn.consumed(1, len(event.data))
        conn.data_to_send()
    return got


def run_h2(reads: list[bytes]) -> int:
    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    conn = h2.connection.H2Connection(config)
    conn.local_settings = h2.settings.Settings(
        client=False,
        initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4 * hbone.MiB,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: hbone.MiB,
        },
    )
    conn.max_inbound_frame_size = hbone.MiB
    conn.initiate_connection()
    conn.increment_flow_control_window(16 * hbone.MiB - 65535)
    conn.receive_data(client_prologue())
    conn.send_headers(1, [(b":status", b"200")])
    got = 0
    for chunk in reads:
        for event in conn.receive_data(chunk):
            if isinstance(event, h2.events.DataReceived):
                assert event.data is not None
                got += len(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length or 0, 1)
        conn.data_to_send()
    return got


def run_core_hexrepr(reads: list[bytes]) -> int:
    quiet = hbone._QuietDataFrame
    saved = quiet.__repr__
    quiet.__repr__ = DataFrame.__repr__  # type: ignore[method-assign]
    try:
        return run_core(reads)
    finally:
        quiet.__repr__ = saved  # type: ignore[method-assign]


def run_send(total: int) -> int:
    """Client core -> server core: the sender frames `total` bytes, the server reads them."""
    client = hbone.HboneConnection(hbone.Role.CLIENT, 0.0)
    server = hbone.HboneConnection(hbone.Role.SERVER, 0.0, local_addresses=frozenset({POD}))
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    sid = client.open_stream(hbone.ConnectRequest(SocketAddress(POD, 8080)))
    server.receive_data(client.data_to_send())
    server.accept(sid)
    client.receive_data(server.data_to_send())
    block = bytes(hbone.MiB)
    sent = got = 0
    while got < total:
        if sent < total and client.outbound_buffered(sid) < 4 * hbone.MiB:
            client.send_data(sid, block)
            sent += len(block)
        wire = client.data_to_send()
        for i in range(0, len(wire), READ):
            for event in server.receive_data(wire[i : i + READ]):
                if isinstance(event, hbone.DataReceived):
                    got += len(event.data)
                    server.consumed(sid, len(event.data))
        client.receive_data(server.data_to_send())
    return got


def measure(name: str, fn: Callable[[], int], repeat: int) -> float:
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        moved = fn()
        rates.append(moved / (time.perf_counter() - start) / 1e9)
    rate = statistics.median(rates)
    print(f"{name:<34} {rate:6.2f} GB/s  (median of {repeat}; {min(rates):.2f}..{max(rates):.2f})")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB moved per run")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    total = args.mib * hbone.MiB
    for size in (hbone.MiB, 16 * 1024):
        reads = data_stream(total, size)
        label = f"{size // 1024} KiB DATA frames"
        measure(f"receive h2 (hex repr), {label}", lambda r=reads: run_h2(r), args.repeat)
        measure(f"receive core+hexrepr, {label}", lambda r=reads: run_core_hexrepr(r), args.repeat)
        measure(f"receive core, {label}", lambda r=reads: run_core(r), args.repeat)
    measure("send+receive core, 1 MiB writes", lambda: run_send(total), args.repeat)


if __name__ == "__main__":
    main()
