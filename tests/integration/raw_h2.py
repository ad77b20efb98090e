"""A hand-written HTTP/2 client for hostile tests: frames and HPACK blocks are built byte by byte here,
never by h2, so the tunnel's parser is checked against bytes it did not produce. Responses are decoded
with the hpack package (only to read the status)."""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass, field

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes, *, index: bool = False) -> bytes:
    """Literal header field with a new name, without (0x00) or with (0x40) incremental indexing."""
    return bytes([0x40 if index else 0x00]) + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def block(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(literal(n, v) for n, v in headers)


def connect_block(authority: str, method: bytes = b"CONNECT", extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    return block([(b":method", method), (b":authority", authority.encode()), *(extra or [])])


@dataclass
class Outcome:
    statuses: dict[int, int] = field(default_factory=dict)
    resets: dict[int, int] = field(default_factory=dict)
    goaway: int | None = None
    data: dict[int, bytes] = field(default_factory=dict)
    closed: bool = False


class RawClient:
    """Blocking TLS (or plain) socket speaking raw frames; use from a thread."""

    def __init__(self, address: tuple[str, int], ctx: ssl.SSLContext | None, timeout: float = 10.0) -> None:
        raw = socket.create_connection(address, timeout=timeout)
        self.sock: socket.socket = ctx.wrap_socket(raw, server_hostname=None) if ctx is not None else raw
        self._buf = b""
        self._decoder = hpack.Decoder()
        self.outcome = Outcome()

    def start(self) -> None:
        self.send(PREFACE + frame(SETTINGS, 0, 0))

    def send(self, data: bytes) -> None:
        """Send everything, or note that the server closed first: a flood the tunnel cuts off with GOAWAY
        and close may still be on its way, and the unread rest turns the close into a reset."""
        try:
            self.sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):  # as read_until(): the peer is gone
            self.outcome.closed = True

    def read_until(self, done: callable, limit: float = 10.0) -> Outcome:  # type: ignore[valid-type]
        """Read frames until `done(outcome)` or the connection closes."""
        self.sock.settimeout(limit)
        while not done(self.outcome):
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:  # nothing more within `limit`: the caller judges the outcome so far
                break
            except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.outcome.closed = True
                break
            self._buf += chunk
            self._parse()
        return self.outcome

    def _parse(self) -> None:
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[:3], "big")
            if len(self._buf) < 9 + length:
                return
            kind, flags = self._buf[3], self._buf[4]
            stream = int.from_bytes(self._buf[5:9], "big") & 0x7FFFFFFF
            payload, self._buf = self._buf[9 : 9 + length], self._buf[9 + length :]
            if kind == HEADERS:
                headers = dict(self._decoder.decode(payload, raw=True))
                if b":status" in headers:
                    self.outcome.statuses[stream] = int(headers[b":status"])
            elif kind == RST_STREAM:
                self.outcome.resets[stream] = int.from_bytes(payload[:4], "big")
            elif kind == GOAWAY:
                self.outcome.goaway = int.from_bytes(payload[4:8], "big")
            elif kind == DATA:
                self.outcome.data[stream] = self.outcome.data.get(stream, b"") + payload
            elif kind == SETTINGS and not flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))

    def close(self) -> None:
        self.sock.close()
