"""When an HBONE connection may take no new stream: tls.stale (pure) and hbone_transport.Trust (its per-stream gate).

A connection is as trustworthy as its handshake's certificates and roots: once either certificate has expired
or the set of roots has changed, it takes no new stream (its open streams are not the gate's business).
"""

from __future__ import annotations

import pytest

from nodeagent.model import Identity
from nodeagent.ztunnel.certs import CertState, CertStatus, CertUnavailable
from nodeagent.ztunnel.hbone_transport import Trust
from nodeagent.ztunnel.tls import Authentication, stale

OLD = frozenset({b"root-1"})
ROTATING = frozenset({b"root-1", b"root-2"})
NEW = frozenset({b"root-2"})
IDENTITY = Identity.parse("spiffe://cluster.local/ns/shop/sa/client")
AUTH = Authentication(local_not_after=1000.0, peer_not_after=2000.0, roots=ROTATING)


@pytest.mark.parametrize(
    ("now", "roots", "expected"),
    [
        (999.0, ROTATING, None),  # both valid, same bundle
        (999.999, frozenset(ROTATING), None),  # an equal set (rebuilt), not only the same object
        (1000.0, ROTATING, "our certificate on it has expired"),  # notAfter itself is past
        (1500.0, ROTATING, "our certificate on it has expired"),
        (2500.0, ROTATING, "our certificate on it has expired"),  # both: ours is named first
        (999.0, NEW, "the trust bundle has changed since its handshake"),  # `ca rotate finish`: old root gone
        (999.0, OLD, "the trust bundle has changed since its handshake"),
        (999.0, frozenset({b"root-1", b"root-2", b"root-3"}), "the trust bundle has changed since its handshake"),
        (1500.0, NEW, "our certificate on it has expired"),
    ],
)
def test_stale_local_expiry_and_bundle(now: float, roots: frozenset[bytes], expected: str | None) -> None:
    assert stale(AUTH, now, roots) == expected


@pytest.mark.parametrize(
    ("local", "peer", "now", "roots", "expected"),
    [
        (2000.0, 1000.0, 999.0, OLD, None),
        (2000.0, 1000.0, 1000.0, OLD, "the peer's certificate on it has expired"),
        (2000.0, 1000.0, 1999.0, OLD, "the peer's certificate on it has expired"),
        (2000.0, 1000.0, 999.0, ROTATING, "the trust bundle has changed since its handshake"),
    ],
)
def test_stale_peer_expiry(
    local: float, peer: float, now: float, roots: frozenset[bytes], expected: str | None
) -> None:
    assert stale(Authentication(local, peer, OLD), now, roots) == expected


def test_expires_is_the_first_of_the_two() -> None:
    assert Authentication(5.0, 9.0, OLD).expires == 5.0
    assert Authentication(9.0, 5.0, OLD).expires == 5.0


class Bundle:
    """The current roots, counting how often the gate looks at them."""

    def __init__(self, roots: frozenset[bytes]) -> None:
        self.roots = roots
        self.looks = 0

    def __call__(self) -> frozenset[bytes]:
        self.looks += 1
        return self.roots


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_gate_looks_at_the_bundle_at_most_once_per_recheck() -> None:
    clock, bundle = Clock(100.0), Bundle(OLD)
    trust = Trust(Authentication(500.0, 600.0, OLD), clock, bundle, recheck=1.0)
    for _ in range(1000):  # a burst of new streams: one clock read and one comparison each
        assert trust.stale() is None
    assert bundle.looks == 0
    clock.now = 101.0
    assert trust.stale() is None
    assert bundle.looks == 1
    clock.now = 101.5
    assert trust.stale() is None
    assert bundle.looks == 1


def test_gate_retires_within_one_recheck_of_a_bundle_change_and_for_good() -> None:
    clock, bundle = Clock(100.0), Bundle(OLD)
    trust = Trust(Authentication(500.0, 600.0, OLD), clock, bundle, recheck=1.0)
    bundle.roots = ROTATING
    clock.now = 100.9
    assert trust.stale() is None  # not looked at yet
    clock.now = 101.0
    assert trust.stale() == "the trust bundle has changed since its handshake"
    bundle.roots = OLD  # changed back: a retired connection stays retired
    clock.now = 200.0
    assert trust.stale() == "the trust bundle has changed since its handshake"
    assert trust.retired == "the trust bundle has changed since its handshake"


def test_gate_retires_at_the_first_expiry_without_waiting_for_a_recheck() -> None:
    clock, bundle = Clock(100.0), Bundle(OLD)
    trust = Trust(Authentication(100.4, 600.0, OLD), clock, bundle, recheck=1.0)
    clock.now = 100.39
    assert trust.stale() is None
    clock.now = 100.4
    assert trust.stale() == "our certificate on it has expired"


def test_gate_fails_closed_when_the_current_bundle_cannot_be_had() -> None:
    """The tunnel's contexts raise CertUnavailable when the identity has no valid certificate now: the reason
    logged must be that (it says what to check), not a claim that the bundle could not be read."""

    def unavailable() -> frozenset[bytes]:
        raise CertUnavailable(IDENTITY, CertStatus(CertState.UNAVAILABLE, "certificate expired; renewal pending"))

    clock = Clock(100.0)
    trust = Trust(Authentication(500.0, 600.0, OLD), clock, unavailable, recheck=1.0)
    assert trust.stale() is None
    clock.now = 101.0
    reason = trust.stale()
    assert reason is not None
    assert "bundle cannot be read" not in reason
    assert reason.startswith("the current trust cannot be checked: no valid certificate for " + IDENTITY.uri)
    assert "nodeagent inspect certificates" in reason
