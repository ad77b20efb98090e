"""Workload certificates for the tunnel: one key and X.509-SVID per local identity, kept fresh.

Why this module exists: the tunnel presents the *workload's* identity on every HBONE connection, so it
needs a valid certificate for every service account that has a pod on this node, before the first
connection and without a gap at rotation. The `CertificateManager` keeps, per identity, a state
(Initializing / Available / Unavailable with a reason), a fresh P-256 key and CSR per request, and the
newest chain; it refreshes at half the remaining life (with jitter), and on failure retries from 500 ms
doubling to 150 s (with jitter) while keeping the still-valid certificate. Those times are wall time, looked
at every minute or sooner, so a machine resumed from suspend renews at once instead of sleeping on. It
prefetches for the identities the node agent reports (`set_local_workloads`), forgets an identity when its last workload
leaves, and keeps at most 8 CA requests in flight. The trust bundle file (every root the CA publishes,
two during a rotation) is reloaded when it changes, and certificates whose root left the bundle are
renewed at once. The CA's answer is checked to be a chain from the leaf up to a root, taken apart
where an element holds several certificates (istiod sends its whole intermediate chain, and during a
root rotation two roots, as one element each; ztunnel splits them too).

What it deliberately does not do: it does not talk gRPC itself — the CA request is the injected
`fetch(identity, csr_pem) -> chain` edge (nodeagent.ca.client.CAClient in production, a function in
tests), so ca and ztunnel stay independent. It does not check peer identities on connections (the
tunnel's TLS layer does), and it builds no TLS contexts: it hands out each identity's `CertMaterial` and
the current `bundle_pem`, from which nodeagent.ztunnel.tls builds HBONE's contexts (TLS 1.3, AES-GCM,
ALPN h2, no tickets; cached per identity in nodeagent.ztunnel.edges.TlsContexts). A second context
builder here would be one without those settings.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.metrics import CertManagerMetrics
from nodeagent.model import Identity
from nodeagent.ztunnel.tls import PeerVerificationError, svid_identity

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 8
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 150.0
# The longest single sleep: the wall clock is looked at least this often (see CertificateManager._sleep).
WAKE_INTERVAL = 60.0


class Fetch(Protocol):
    def __call__(self, identity: Identity, csr_pem: bytes) -> Awaitable[Sequence[str]]:
        """Ask the CA to sign `csr_pem` for `identity`; return the PEM chain, leaf first, root last."""
        ...


class CertState(enum.Enum):
    INITIALIZING = "Initializing"
    AVAILABLE = "Available"
    UNAVAILABLE = "Unavailable"


@dataclass(frozen=True)
class CertStatus:
    state: CertState
    reason: str = ""

    def __str__(self) -> str:
        # ztunnel's config_dump spelling: "Unavailable: <reason>".
        return f"{self.state.value}: {self.reason}" if self.reason else self.state.value


class CertUnavailable(Exception):
    """No valid certificate for an identity right now; the message says why and what to check."""

    def __init__(self, identity: Identity, status: CertStatus) -> None:
        super().__init__(f"no valid certificate for {identity} ({status}); check `nodeagent inspect certificates`")
        self.identity = identity
        self.status = status


# --- pure schedule ----------------------------------------------------------------------------------


def refresh_delay(now: float, not_after: float, rng: random.Random, jitter: float = 0.1) -> float:
    """Seconds until the next refresh: half the remaining lifetime, minus up to `jitter` of it.

    Measured from receipt (not notBefore, which the CA backdates), so even a 10 s certificate is
    renewed about 5 s before it expires.
    """
    half = max(0.0, not_after - now) / 2
    return half * (1 - jitter * rng.random())


def backoff_delay(
    failures: int, rng: random.Random, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX
) -> float:
    """Retry delay after `failures` consecutive failures: initial * 2^(n-1), +-10 % jitter, capped."""
    base = initial * 2.0 ** min(failures - 1, 30)
    return min(maximum, base * rng.uniform(0.9, 1.1))


# --- certificate material ---------------------------------------------------------------------------


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# Intermediates and roots are the same few certificates for every identity: parse each once and share the
# object and its PEM string, instead of holding a copy per identity (about a fifth of the per-identity
# memory at 1000 identities). Bounded: a bundle rotation adds a handful of entries.
_SHARED: dict[str, tuple[str, x509.Certificate]] = {}
_SHARED_MAX = 64
_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----[^-]*-----END CERTIFICATE-----")


def _shared_cert(pem: str) -> tuple[str, x509.Certificate]:
    """The shared (PEM, certificate) of one PEM certificate block."""
    hit = _SHARED.get(pem)
    if hit is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.pop(next(iter(_SHARED)))
        hit = _SHARED[pem] = (pem, x509.load_pem_x509_certificate(pem.encode()))
    return hit


def _pem_blocks(element: str, position: int) -> list[str]:
    """The PEM certificates of one `cert_chain` element, one block each. Istio's API does not promise one
    certificate per element: istiod sends its whole cert-chain.pem (every intermediate, often the root too)
    as one element and root-cert.pem (two roots during a plug-in CA's root rotation) as the last."""
    blocks = [m.group(0) + "\n" for m in _PEM_CERTIFICATE.finditer(element)]
    if not blocks:
        raise ValueError(f"CA answer element {position} holds no PEM certificate")
    return blocks


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "the leaf"


def _path_to_root(
    leaf: x509.Certificate, offered: Sequence[tuple[str, x509.Certificate]]
) -> list[tuple[str, x509.Certificate]]:
    """The issuers of `leaf` among `offered`, nearest first, up to a self-signed root; ValueError where a link
    is missing. Certificates the path does not use are left out (the other roots of a rotation)."""
    path: list[tuple[str, x509.Certificate]] = []
    current = leaf
    while not (path and _issued_by(current, current)):
        issuer = next((o for o in offered if o not in path and o[1] is not current and _issued_by(current, o[1])), None)
        if issuer is None:
            if not offered:
                raise ValueError("CA returned the leaf alone, without the chain up to its root")
            offers = ", ".join(_name(c) for _, c in offered)
            raise ValueError(
                f"CA returned a broken chain: none of the certificates it sent ({offers}) signed {_name(current)}"
            )
        path.append(issuer)
        current = issuer[1]
    return path


@dataclass(frozen=True)
class CertMaterial:
    """A key and the chain the CA issued for it: what an SSLContext needs to present an identity.

    Held per local identity, so it is kept small: the leaf as DER plus the two times every refresh
    decision reads (a parsed leaf caches its decoded extensions, ~2 KB, and is rebuilt on demand for the
    rare config dump), and the issuers as objects shared by every identity (see `_shared_cert`).
    """

    identity: Identity
    leaf_der: bytes
    issuers: tuple[x509.Certificate, ...]  # intermediates then the root; shared objects
    chain_pem: tuple[str, ...]  # leaf first, root last, one certificate each
    key_pem: bytes  # PKCS#8, unencrypted
    not_before: float
    not_after: float

    @classmethod
    def from_response(
        cls, identity: Identity, chain_pem: Sequence[str], key: ec.EllipticCurvePrivateKey
    ) -> CertMaterial:
        """Check the CA's answer really is a chain for `identity` and `key`, from the leaf up to a root;
        ValueError otherwise. The answer is leaf first and root last, but an element may hold several
        certificates (istiod's, see `_pem_blocks`); the chain kept is the one that verifies, one each."""
        if not chain_pem:
            raise ValueError("CA returned an empty certificate chain")
        first = _pem_blocks(chain_pem[0], 0)
        leaf = x509.load_pem_x509_certificate(first[0].encode())
        offered: list[tuple[str, x509.Certificate]] = []
        for pem in [*first[1:], *(b for i, e in enumerate(chain_pem[1:], 1) for b in _pem_blocks(e, i))]:
            shared = _shared_cert(pem)
            if shared not in offered:
                offered.append(shared)
        try:
            got = svid_identity(leaf)  # the same X.509-SVID leaf rules peers apply to it
        except PeerVerificationError as exc:
            raise ValueError(f"CA issued a certificate that is not a valid SVID: {exc}") from None
        if got != identity:
            raise ValueError(f"CA issued a certificate for {got}, not the requested {identity}")
        if leaf.public_key() != key.public_key():
            raise ValueError("CA issued a certificate for a different key than the CSR's")
        path = _path_to_root(leaf, offered)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls(
            identity,
            leaf.public_bytes(serialization.Encoding.DER),
            tuple(c for _, c in path),
            (first[0], *(p for p, _ in path)),
            key_pem,
            leaf.not_valid_before_utc.timestamp(),
            leaf.not_valid_after_utc.timestamp(),
        )

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.leaf_der)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Leaf first, root last."""
        return (self.leaf, *self.issuers)

    @property
    def root(self) -> x509.Certificate:
        return self.issuers[-1] if self.issuers else self.leaf

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after

    def presented_chain_pem(self) -> str:
        """Leaf and intermediates (the root is not sent: peers have it in their bundle)."""
        return "".join(self.chain_pem[:-1] if len(self.chain_pem) > 1 else self.chain_pem)


def make_csr(identity: Identity) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and a CSR with an empty subject and the identity as its only URI SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


# --- the manager --------------------------------------------------------------------------------------


@dataclass
class _Entry:
    identity: Identity
    material: CertMaterial | None = None
    failures: int = 0
    last_error: str = ""
    task: asyncio.Task[None] | None = None
    available: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class CertManagerInputs:
    fetch: Fetch
    bundle_path: Path
    metrics: CertManagerMetrics
    clock: Callable[[], float] = time.time  # wall clock (certificate validity is wall time)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)
    max_in_flight: int = MAX_IN_FLIGHT
    # How often to look at the bundle file; None: only when reload_bundle() is called.
    bundle_poll_interval: float | None = 1.0
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    refresh_jitter: float = 0.1
    wake_interval: float = WAKE_INTERVAL


class CertificateManager:
    """Per-identity certificates for the local workloads. Start with `start()`, end with `stop()`."""

    def __init__(self, inputs: CertManagerInputs) -> None:
        self._in = inputs
        self._entries: dict[Identity, _Entry] = {}
        self._sem = asyncio.Semaphore(inputs.max_in_flight)
        self._bundle_pem = ""
        self._bundle_roots: frozenset[bytes] = frozenset()
        self._bundle_stamp: tuple[int, int, int] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()  # cancelled refresh tasks not finished yet
        self._running = False

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.reload_bundle()
        if not self._bundle_pem:
            raise FileNotFoundError(
                f"trust bundle {self._in.bundle_path} is missing or empty; is the CA initialised "
                "(`nodeagent ca init`) and its bundle shared with this node?"
            )
        self._running = True
        if self._in.bundle_poll_interval is not None:
            self._start_watch(self._in.bundle_poll_interval)
        for entry in self._entries.values():
            self._spawn(entry)

    async def stop(self) -> None:
        self._running = False
        tasks = [t for t in (self._watch, *(e.task for e in self._entries.values())) if t is not None]
        tasks += self._retiring
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watch = None
        for entry in self._entries.values():
            entry.task = None

    # --- workloads --------------------------------------------------------------------------------

    def set_local_workloads(self, identities: Iterable[Identity]) -> None:
        """The identities of the pods on this node now: fetch new ones, forget those no longer present."""
        wanted = set(identities)
        for identity in list(self._entries):
            if identity not in wanted:
                self._forget(identity)
        for identity in wanted - self._entries.keys():
            entry = _Entry(identity)
            self._entries[identity] = entry
            if self._running:
                self._spawn(entry)
        self._in.metrics.identities.set(len(self._entries))

    def _forget(self, identity: Identity) -> None:
        entry = self._entries.pop(identity)
        self._retire(entry.task)
        self._in.metrics.forget(str(identity))
        log.info("forgot the certificate of %s: no local workload uses it any more", identity)

    def identities(self) -> list[Identity]:
        return sorted(self._entries)

    # --- reading ----------------------------------------------------------------------------------

    def status(self, identity: Identity) -> CertStatus:
        entry = self._entries.get(identity)
        if entry is None:
            return CertStatus(CertState.UNAVAILABLE, "not a local workload identity")
        if entry.material is not None and entry.material.valid_at(self._in.clock()):
            return CertStatus(CertState.AVAILABLE)
        if entry.last_error:
            return CertStatus(CertState.UNAVAILABLE, entry.last_error)
        if entry.material is not None:
            return CertStatus(CertState.UNAVAILABLE, "certificate expired; renewal pending")
        return CertStatus(CertState.INITIALIZING)

    def material(self, identity: Identity) -> CertMaterial:
        """The current valid material for `identity`, or CertUnavailable."""
        entry = self._entries.get(identity)
        if entry is None or entry.material is None or not entry.material.valid_at(self._in.clock()):
            raise CertUnavailable(identity, self.status(identity))
        return entry.material

    async def wait_available(self, identity: Identity) -> CertMaterial:
        """Wait until `identity`, which must be local, has a valid certificate (bound it with asyncio.timeout)."""
        entry = self._entries.get(identity)
        if entry is None:
            raise CertUnavailable(identity, self.status(identity))
        while True:
            await entry.available.wait()
            if entry.material is not None and entry.material.valid_at(self._in.clock()):
                return entry.material
            entry.available.clear()

    @property
    def bundle_pem(self) -> str:
        return self._bundle_pem

    def ready(self) -> str | None:
        """None once every local identity's first fetch has ended, else the identities still waiting for it.

        A failed fetch does not hold readiness: one pod the CA refuses (a wrong service account, the CA's
        view of the node lagging behind) must not take the node's tunnel out of service for every other
        pod, nor stall a DaemonSet rollout. It retries with backoff, its state shows in /config_dump
        (`nodeagent inspect certificates`) and its failures in the fetch metrics."""
        pending = [str(i) for i in self.identities() if self.status(i).state == CertState.INITIALIZING]
        return f"certificates pending (first fetch): {', '.join(pending)}" if pending else None

    def config_dump(self) -> list[dict[str, Any]]:
        """The `certificates` section of /config_dump, shaped like ztunnel's."""
        out = []
        for identity in self.identities():
            entry = self._entries[identity]
            chain: list[dict[str, str]] = []
            roots: list[dict[str, str]] = []
            if entry.material is not None:
                certs = list(zip(entry.material.chain, entry.material.chain_pem, strict=True))
                described = [_describe(c, p) for c, p in certs]
                chain, roots = (described[:-1], described[-1:]) if len(described) > 1 else (described, [])
            out.append(
                {"identity": str(identity), "state": str(self.status(identity)), "certChain": chain, "rootCerts": roots}
            )
        return out

    def trust_bundle_dump(self) -> list[dict[str, str]]:
        """The `trustBundle` section of /config_dump: the roots this tunnel verifies peers with now (what a
        root rotation waits on before its next step)."""
        out = []
        for root in x509.load_pem_x509_certificates(self._bundle_pem.encode()) if self._bundle_pem else ():
            out.append(
                {
                    "subject": root.subject.rfc4514_string(),
                    "sha256": root.fingerprint(hashes.SHA256()).hex(),
                    "validFrom": _rfc3339(root.not_valid_before_utc),
                    "expirationTime": _rfc3339(root.not_valid_after_utc),
                }
            )
        return out

    # --- trust bundle -----------------------------------------------------------------------------

    def reload_bundle(self) -> bool:
        """Re-read the bundle file if it changed; True when the set of roots changed."""
        path = self._in.bundle_path
        try:
            st = path.stat()
        except FileNotFoundError:
            log.error("trust bundle %s disappeared; keeping the %d roots loaded", path, len(self._bundle_roots))
            return False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._bundle_stamp:
            return False
        self._bundle_stamp = stamp
        try:
            roots = x509.load_pem_x509_certificates(path.read_bytes())
        except ValueError as exc:
            log.error("trust bundle %s is not valid PEM (%s); keeping the previous roots", path, exc)
            return False
        der = frozenset(r.public_bytes(serialization.Encoding.DER) for r in roots)
        if der == self._bundle_roots:
            return False
        self._bundle_pem = "".join(r.public_bytes(serialization.Encoding.PEM).decode() for r in roots)
        self._bundle_roots = der
        log.info("trust bundle %s now holds %d root(s)", path, len(roots))
        if self._running:
            for entry in self._entries.values():
                if entry.material is not None and self._root_der(entry.material) not in der:
                    log.info("root of %s's certificate left the bundle; renewing now", entry.identity)
                    self._spawn(entry)
        return True

    @staticmethod
    def _root_der(material: CertMaterial) -> bytes:
        return material.root.public_bytes(serialization.Encoding.DER)

    def _check_trusted(self, entry: _Entry, material: CertMaterial) -> None:
        """ValueError when `material` chains to a root outside the bundle while a valid certificate is held:
        swapping it in would trade a working identity for one peers reject (a root activated before every
        node trusts it). With nothing valid held it is still better than none, and is used (with a warning)."""
        held = entry.material
        if self._root_der(material) in self._bundle_roots:
            return
        if held is not None and held.valid_at(self._in.clock()):
            raise ValueError(_untrusted_root(material.root))

    async def _watch_bundle(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reload_bundle()

    def _supervise_watch(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or not self._running:
            return
        log.error("trust bundle watcher died (%r); restarting it", task.exception())
        self._start_watch(self._in.bundle_poll_interval or 1.0)

    def _start_watch(self, interval: float) -> None:
        self._watch = asyncio.create_task(self._watch_bundle(interval), name="cert-bundle-watch")
        self._watch.add_done_callback(self._supervise_watch)

    # --- refresh loop -----------------------------------------------------------------------------

    def _spawn(self, entry: _Entry, delay: float = 0.0) -> None:
        """(Re)start the refresh task of `entry`, replacing a running one."""
        self._retire(entry.task)
        entry.task = asyncio.create_task(self._maintain(entry, delay), name=f"cert-refresh:{entry.identity}")
        entry.task.add_done_callback(lambda task: self._supervise(entry, task))

    def _retire(self, task: asyncio.Task[None] | None) -> None:
        if task is not None and not task.done():
            task.cancel()
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _supervise(self, entry: _Entry, task: asyncio.Task[None]) -> None:
        if task.cancelled() or not self._running or self._entries.get(entry.identity) is not entry:
            return
        if entry.task is not task:
            return
        exc = task.exception()
        log.error("certificate task for %s crashed (%r); restarting it after a backoff", entry.identity, exc)
        entry.failures += 1
        entry.last_error = f"internal error: {exc!r}"
        self._spawn(entry, backoff_delay(entry.failures, self._in.rng, self._in.backoff_initial, self._in.backoff_max))

    async def _maintain(self, entry: _Entry, delay: float) -> None:
        while True:
            await self._sleep(delay)
            delay = await self._attempt(entry)

    async def _sleep(self, delay: float) -> None:
        """Sleep `delay` seconds, or less once the wall clock has moved `delay` on. Validity is wall time but
        sleeps are monotonic, and a machine resumed from suspend (a laptop, a paused VM) has its monotonic clock
        behind by the suspend: one long sleep would hold an expired certificate for the rest of it (up to half
        its life). Sleeping in slices of `wake_interval` notices within one; the monotonic total still bounds
        the wait when the wall clock is stepped back."""
        due = self._in.clock() + delay
        while delay > 0 and (left := due - self._in.clock()) > 0:
            step = min(delay, left, self._in.wake_interval)
            await self._in.sleep(step)
            delay -= step

    async def _attempt(self, entry: _Entry) -> float:
        """One CA request for `entry`; returns the seconds until the next one."""
        identity = entry.identity
        key, csr = make_csr(identity)
        try:
            async with self._sem:
                self._in.metrics.in_flight.inc()
                try:
                    chain = await self._in.fetch(identity, csr)
                finally:
                    self._in.metrics.in_flight.dec()
            material = CertMaterial.from_response(identity, chain, key)
            _check_window(material, self._in.clock())
            self._check_trusted(entry, material)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            entry.failures += 1
            entry.last_error = f"{type(exc).__name__}: {exc}"
            delay = backoff_delay(entry.failures, self._in.rng, self._in.backoff_initial, self._in.backoff_max)
            self._in.metrics.failed(str(identity), delay)
            now = self._in.clock()
            kept = (
                f"keeping the current certificate (valid for {entry.material.not_after - now:.0f} s more)"
                if entry.material is not None and entry.material.valid_at(now)
                else "no valid certificate held"
            )
            log.warning(
                "certificate fetch for %s failed (attempt %d): %s; retrying in %.1f s, %s",
                identity,
                entry.failures,
                entry.last_error,
                delay,
                kept,
            )
            return delay
        if self._root_der(material) not in self._bundle_roots:
            log.warning(
                "certificate for %s chains to a root not in the trust bundle yet (%s); using it: no valid one is held",
                identity,
                material.root.subject.rfc4514_string(),
            )
        entry.material = material
        entry.failures = 0
        entry.last_error = ""
        entry.available.set()
        now = self._in.clock()
        self._in.metrics.fetched(str(identity), material.not_after)
        delay = refresh_delay(now, material.not_after, self._in.rng, self._in.refresh_jitter)
        log.info(
            "certificate for %s issued (serial %x, valid until %s); refreshing in %.1f s",
            identity,
            material.leaf.serial_number,
            _rfc3339(material.leaf.not_valid_after_utc),
            delay,
        )
        return delay


def _untrusted_root(root: x509.Certificate) -> str:
    return (
        f"CA issued a certificate chaining to {root.subject.rfc4514_string()}, a root not in this node's trust "
        "bundle: peers would refuse it. Was the CA's new root activated before every node trusted it "
        "(`nodeagent ca rotate`)?"
    )


def _check_window(material: CertMaterial, now: float) -> None:
    """ValueError unless the CA's answer is valid now: a certificate that is not (yet) valid would replace the
    one held for nothing (peers reject it too), and an expired one would be re-requested at once, in a loop
    (its half-life is already past). As a failed fetch it keeps the held certificate and backs off."""
    if material.not_after <= now:
        when = _rfc3339(dt.datetime.fromtimestamp(material.not_after, dt.UTC))
        raise ValueError(
            f"CA issued a certificate that expired at {when}: its signing certificate has expired or its clock "
            "is behind this node's"
        )
    if material.not_before > now:
        when = _rfc3339(dt.datetime.fromtimestamp(material.not_before, dt.UTC))
        raise ValueError(
            f"CA issued a certificate valid only from {when}: the CA's clock is ahead of this node's (check NTP)"
        )


def _describe(cert: x509.Certificate, pem: str) -> dict[str, str]:
    return {
        "pem": pem,
        "serialNumber": str(cert.serial_number),
        "validFrom": _rfc3339(cert.not_valid_before_utc),
        "expirationTime": _rfc3339(cert.not_valid_after_utc),
    }
