"""The certificate manager driven through its edges: a fake clock/sleep and an in-process `fetch`."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from identity_support import CART, CHECKOUT, FRONTEND, NOW, TD, make_csr
from prometheus_client import CollectorRegistry

from nodeagent.ca import authority
from nodeagent.ca.commands import certificate_rows, certificates_table
from nodeagent.metrics import CertManagerMetrics
from nodeagent.model import Identity
from nodeagent.ztunnel.certs import (
    CertificateManager,
    CertManagerInputs,
    CertState,
    CertUnavailable,
    backoff_delay,
    refresh_delay,
)


class FakeTime:
    """Wall clock and sleep under the test's control: each sleep waits until `release()`."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self._waiting: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((delay, future))
        await future

    async def next_sleep(self) -> float:
        for _ in range(1000):
            self._waiting = [w for w in self._waiting if not w[1].done()]  # drop sleeps of cancelled tasks
            if self._waiting:
                return self._waiting[0][0]
            await asyncio.sleep(0)
        raise AssertionError("the manager never went to sleep")

    async def release(self) -> float:
        """Let the first sleeper wake up (the clock moves by its delay) and run until it sleeps again."""
        delay = await self.next_sleep()
        _, future = self._waiting.pop(0)
        self.now += delay
        future.set_result(None)
        for _ in range(1000):
            await asyncio.sleep(0)
            if self._waiting:
                break
        return delay


class FakeCA:
    def __init__(self, time: FakeTime, ttl: int = 100) -> None:
        self.signer = authority.generate_root(NOW, TD)
        self.time = time
        self.ttl = ttl
        self.fail: str | None = None
        self.calls = 0
        self.skew = 0.0  # seconds the CA's clock is ahead of the node's

    async def fetch(self, identity: Identity, csr: bytes) -> Sequence[str]:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail:
            raise ConnectionError(self.fail)
        now = dt.datetime.fromtimestamp(self.time.now + self.skew, dt.UTC)
        return authority.sign_csr(self.signer, csr, identity, now, self.ttl).chain_pem


def _manager(tmp_path: Path, fetch: Callable[..., object], time: FakeTime, signer: authority.Signer):
    bundle = tmp_path / "trust-bundle.pem"
    bundle.write_text(authority.cert_pem(signer.root))
    registry = CollectorRegistry()
    inputs = CertManagerInputs(
        fetch=fetch,  # type: ignore[arg-type]
        bundle_path=bundle,
        metrics=CertManagerMetrics(registry),
        clock=time.clock,
        sleep=time.sleep,
        rng=random.Random(7),
        bundle_poll_interval=None,
    )
    return CertificateManager(inputs), registry


@pytest.mark.parametrize(
    ("now", "not_after", "jitter", "low", "high"),
    [
        (0.0, 10.0, 0.0, 5.0, 5.0),
        (0.0, 10.0, 0.1, 4.5, 5.0),
        (100.0, 86500.0, 0.1, 38880.0, 43200.0),
        (50.0, 40.0, 0.1, 0.0, 0.0),  # already expired: refresh now
    ],
)
def test_refresh_at_half_remaining_life(now: float, not_after: float, jitter: float, low: float, high: float) -> None:
    for seed in range(20):
        delay = refresh_delay(now, not_after, random.Random(seed), jitter)
        assert low <= delay <= high


@pytest.mark.parametrize(
    ("failures", "base"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 128.0), (10, 150.0), (50, 150.0), (10_000, 150.0)],
)
def test_backoff_doubles_from_half_a_second_to_150s(failures: int, base: float) -> None:
    delays = [backoff_delay(failures, random.Random(seed)) for seed in range(50)]
    assert all(min(base * 0.9, 150) <= d <= min(base * 1.1, 150) for d in delays)
    if base < 150:
        assert len(set(delays)) > 1  # jittered


async def test_fetch_refresh_then_backoff_keeps_the_valid_cert(tmp_path: Path) -> None:
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time, ttl=100)
    manager, registry = _manager(tmp_path, ca.fetch, time, ca.signer)
    manager.set_local_workloads([FRONTEND])
    assert manager.status(FRONTEND).state is CertState.INITIALIZING
    await manager.start()
    refresh = await time.next_sleep()
    assert manager.status(FRONTEND).state is CertState.AVAILABLE
    first = manager.material(FRONTEND)
    assert 45 <= refresh <= 50
    assert registry.get_sample_value("nodeagent_cert_fetches_total", {"result": "ok"}) == 1
    assert registry.get_sample_value(
        "nodeagent_cert_expiry_timestamp_seconds", {"identity": FRONTEND.uri}
    ) == pytest.approx(first.not_after)

    ca.fail = "connection refused"
    await time.release()  # the refresh attempt fails
    delays = [await time.release() for _ in range(5)]
    assert [round(d / b, 1) for d, b in zip(delays, [0.5, 1, 2, 4, 8], strict=True)] == pytest.approx(
        [1.0] * 5, abs=0.11
    )
    assert manager.material(FRONTEND) is first  # still valid: kept
    assert manager.status(FRONTEND).state is CertState.AVAILABLE
    assert registry.get_sample_value("nodeagent_cert_fetches_total", {"result": "error"}) == 6
    assert registry.get_sample_value("nodeagent_cert_backoff_seconds", {"identity": FRONTEND.uri}) > 8

    time.now = first.not_after + 1  # the kept certificate expires while the CA is still down
    status = manager.status(FRONTEND)
    assert status.state is CertState.UNAVAILABLE and "connection refused" in status.reason
    with pytest.raises(CertUnavailable, match="connection refused"):
        manager.material(FRONTEND)

    ca.fail = None
    await time.release()
    assert manager.status(FRONTEND).state is CertState.AVAILABLE
    assert manager.material(FRONTEND).leaf.serial_number != first.leaf.serial_number
    assert registry.get_sample_value("nodeagent_cert_backoff_seconds", {"identity": FRONTEND.uri}) == 0
    await manager.stop()


async def test_at_most_eight_requests_in_flight(tmp_path: Path) -> None:
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time)
    gate = asyncio.Event()
    active = 0
    peak = 0

    async def fetch(identity: Identity, csr: bytes) -> Sequence[str]:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await gate.wait()
        active -= 1
        return await ca.fetch(identity, csr)

    manager, registry = _manager(tmp_path, fetch, time, ca.signer)
    identities = [Identity(TD, "shop", f"sa{i}") for i in range(20)]
    manager.set_local_workloads(identities)
    await manager.start()
    for _ in range(50):
        await asyncio.sleep(0)
    assert peak == 8
    assert registry.get_sample_value("nodeagent_cert_fetches_in_flight") == 8
    gate.set()
    for identity in identities:
        await asyncio.wait_for(manager.wait_available(identity), 5)
    assert peak == 8
    assert registry.get_sample_value("nodeagent_cert_identities") == 20
    await manager.stop()


async def test_forget_identity_when_last_workload_leaves(tmp_path: Path) -> None:
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time)
    manager, registry = _manager(tmp_path, ca.fetch, time, ca.signer)
    await manager.start()
    manager.set_local_workloads([FRONTEND, CART, CART])
    await asyncio.wait_for(manager.wait_available(CART), 5)
    await asyncio.wait_for(manager.wait_available(FRONTEND), 5)
    manager.set_local_workloads([FRONTEND])
    assert manager.identities() == [FRONTEND]
    assert manager.status(CART).state is CertState.UNAVAILABLE
    assert registry.get_sample_value("nodeagent_cert_expiry_timestamp_seconds", {"identity": CART.uri}) is None
    assert registry.get_sample_value("nodeagent_cert_identities") == 1
    calls = ca.calls
    await time.release()  # only FRONTEND's refresh is left to run
    assert ca.calls == calls + 1
    await manager.stop()


async def test_wrong_identity_from_ca_is_not_accepted(tmp_path: Path) -> None:
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time)

    async def confused(identity: Identity, csr: bytes) -> Sequence[str]:
        return await ca.fetch(CHECKOUT, make_csr([CHECKOUT.uri]))

    manager, _ = _manager(tmp_path, confused, time, ca.signer)
    manager.set_local_workloads([FRONTEND])
    await manager.start()
    await time.next_sleep()
    status = manager.status(FRONTEND)
    assert status.state is CertState.UNAVAILABLE and "not the requested" in status.reason
    await manager.stop()


@pytest.mark.parametrize(
    ("skew", "reason"),
    [
        (dt.timedelta(hours=2), "the CA's clock is ahead"),  # notBefore (backdated 60 s) still in the future
        (dt.timedelta(seconds=-200), "expired at"),  # a 100 s certificate, already over
    ],
)
async def test_a_certificate_not_valid_now_is_a_failed_fetch(tmp_path: Path, skew: dt.timedelta, reason: str) -> None:
    """REFERENCE: keep the still-valid certificate, back off from 500 ms. An answer not valid now replaced the
    held certificate (a CA clock ahead made the identity unavailable), and an expired one was asked for
    again at once - no sleep at all, a hot loop against the CA (its signer had expired, say)."""
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time, ttl=100)
    manager, _ = _manager(tmp_path, ca.fetch, time, ca.signer)
    manager.set_local_workloads([FRONTEND])
    await manager.start()
    await time.next_sleep()
    first = manager.material(FRONTEND)

    ca.skew = skew.total_seconds()
    await time.release()  # the refresh: its answer is refused
    delays = [await time.release() for _ in range(3)]
    assert [round(d / b, 1) for d, b in zip(delays, [0.5, 1, 2], strict=True)] == pytest.approx([1.0] * 3, abs=0.11)
    assert ca.calls == 5  # one per attempt: backing off, not looping
    assert manager.material(FRONTEND) is first  # the held certificate is kept while valid
    time.now = first.not_after + 1
    status = manager.status(FRONTEND)
    assert status.state is CertState.UNAVAILABLE and reason in status.reason, status
    await manager.stop()


async def test_config_dump_and_table(tmp_path: Path) -> None:
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time)
    manager, _ = _manager(tmp_path, ca.fetch, time, ca.signer)
    manager.set_local_workloads([FRONTEND, CART])
    ca.fail = "no route to CA"
    await manager.start()
    await time.next_sleep()
    ca.fail = None
    await time.release()  # one identity retries and succeeds; the other is still backing off
    await asyncio.sleep(0.01)
    dump = manager.config_dump()
    by_id = {d["identity"]: d for d in dump}
    assert set(by_id) == {FRONTEND.uri, CART.uri}
    available = [d for d in dump if d["state"] == "Available"]
    unavailable = [d for d in dump if d["state"].startswith("Unavailable: ")]
    assert len(available) == 1 and len(unavailable) == 1
    entry = available[0]
    assert len(entry["certChain"]) == 1 and len(entry["rootCerts"]) == 1
    leaf = manager.material(Identity.parse(entry["identity"])).leaf
    assert entry["certChain"][0]["serialNumber"] == str(leaf.serial_number)
    assert entry["certChain"][0]["expirationTime"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

    rows = certificate_rows(dump, NOW)
    kinds = {(r[0], r[1]) for r in rows}
    assert (entry["identity"], "Leaf") in kinds and (entry["identity"], "Root") in kinds
    leaf_row = next(r for r in rows if r[1] == "Leaf")
    assert leaf_row[2:5] == ("Available", "true", format(leaf.serial_number, "x"))
    missing = next(r for r in rows if r[0] == unavailable[0]["identity"])
    assert missing[1:] == ("NA", "Unavailable", "false", "NA", "NA", "NA")
    later = certificate_rows(dump, NOW + dt.timedelta(days=2))
    assert next(r for r in later if r[1] == "Leaf")[3] == "false"
    table = certificates_table(dump, NOW)
    header = table.splitlines()[0]
    for column in ("CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"):
        assert column in header
    assert len(table.splitlines()) == 1 + len(rows)
    await manager.stop()


async def test_readiness_waits_for_first_fetches_not_for_failing_identities(tmp_path: Path) -> None:
    """One identity the CA refuses must not keep the node's tunnel unready for every other pod (nor stall a
    rollout): readiness waits only for identities whose first fetch has not ended."""
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time)

    async def refuses_checkout(identity: Identity, csr: bytes) -> Sequence[str]:
        if identity == CHECKOUT:
            raise PermissionError("the CA refuses checkout on this node")
        return await ca.fetch(identity, csr)

    manager, _ = _manager(tmp_path, refuses_checkout, time, ca.signer)
    manager.set_local_workloads([FRONTEND, CHECKOUT])
    pending = manager.ready()
    assert pending is not None and FRONTEND.uri in pending and CHECKOUT.uri in pending  # first fetches not run
    await manager.start()
    for _ in range(1000):  # until both first fetches have ended (each task then sleeps)
        if CertState.INITIALIZING not in {manager.status(i).state for i in (FRONTEND, CHECKOUT)}:
            break
        await asyncio.sleep(0)
    assert manager.status(FRONTEND).state is CertState.AVAILABLE
    assert manager.status(CHECKOUT).state is CertState.UNAVAILABLE  # retrying with backoff, shown in config_dump
    assert manager.ready() is None
    await manager.stop()


async def test_a_certificate_from_an_untrusted_root_does_not_replace_a_working_one(tmp_path: Path) -> None:
    """The CA signs with a root this node does not trust yet (activated before every node reloaded the
    bundle): peers would refuse the new certificate, so it is a failed fetch while the held one is valid;
    with nothing valid held it is used. A chain whose links do not verify is refused either way."""
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time, ttl=100)
    manager, _ = _manager(tmp_path, ca.fetch, time, ca.signer)  # the bundle trusts only the first root
    manager.set_local_workloads([FRONTEND])
    await manager.start()
    await time.next_sleep()
    first = manager.material(FRONTEND)

    ca.signer = authority.generate_root(NOW, TD)  # a second root, not in this node's bundle
    await time.release()  # the refresh: refused, the held certificate kept, backing off
    assert manager.material(FRONTEND) is first
    assert await time.next_sleep() == pytest.approx(0.5, rel=0.11)
    status = manager.status(FRONTEND)
    assert status.state is CertState.AVAILABLE

    time.now = first.not_after + 1  # the held one expired: the untrusted one beats none
    await time.release()
    assert manager.material(FRONTEND).root.subject != first.root.subject
    await manager.stop()


async def test_a_broken_chain_is_a_failed_fetch(tmp_path: Path) -> None:
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time)
    other = authority.generate_root(NOW, TD)

    async def wrong_issuer(identity: Identity, csr: bytes) -> Sequence[str]:
        leaf, _root = await ca.fetch(identity, csr)
        return [leaf, authority.cert_pem(other.root)]  # claims an issuer that did not sign it

    manager, _ = _manager(tmp_path, wrong_issuer, time, ca.signer)
    manager.set_local_workloads([FRONTEND])
    await manager.start()
    await time.next_sleep()
    status = manager.status(FRONTEND)
    assert status.state is CertState.UNAVAILABLE and "broken chain" in status.reason, status
    await manager.stop()


def _intermediate(name: str, parent: authority.Signer) -> authority.Signer:
    """A CA certificate `name` issued by `parent` (built here, not by the authority under test)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(parent.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(parent.key, hashes.SHA256())
    )
    return authority.Signer(cert=cert, key=key, parents=(parent.cert, *parent.parents))


# How istiod answers (security/pkg/server/ca/server.go): the leaf, then its whole cert-chain.pem as ONE element
# (every intermediate, often the root too), then root-cert.pem as one element - two roots during a plug-in CA's
# root rotation (ztunnel splits that last element for the same reason). Letters: the leaf, intermediates 2 (the
# signer) and 1, the root R the chain ends at, and another root O trusted alongside it.
ISTIOD_SHAPES = [
    ("one certificate each (nodeagent's CA)", ["L", "2", "1", "R"]),
    ("cert-chain.pem in one element", ["L", "21", "R"]),
    ("cert-chain.pem with the root, then the root", ["L", "21R", "R"]),
    ("two roots in the last element, the chain's second", ["L", "21", "OR"]),
    ("two roots in the last element, the chain's first", ["L", "2", "1", "RO"]),
    ("the leaf element carries the chain", ["L21", "R"]),
]


@pytest.mark.parametrize(("case", "shape"), ISTIOD_SHAPES, ids=[c[0] for c in ISTIOD_SHAPES])
async def test_an_answer_with_several_certificates_in_one_element_is_taken_apart(
    tmp_path: Path, case: str, shape: list[str]
) -> None:
    """An istiod-shaped answer was refused as "a broken chain" (only each element's first certificate was read),
    so the tunnel could not use istiod's CA with an intermediate chain or during a root rotation."""
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time)
    root, other = ca.signer, authority.generate_root(NOW, TD)
    one = _intermediate("intermediate 1", root)
    ca.signer = two = _intermediate("intermediate 2", one)
    pems = {"2": authority.cert_pem(two.cert), "1": authority.cert_pem(one.cert)}
    pems |= {"R": authority.cert_pem(root.cert), "O": authority.cert_pem(other.cert)}

    async def istiod(identity: Identity, csr: bytes) -> Sequence[str]:
        leaf = (await ca.fetch(identity, csr))[0]
        return ["".join(leaf if c == "L" else pems[c] for c in element) for element in shape]

    manager, _ = _manager(tmp_path, istiod, time, root)
    manager.set_local_workloads([FRONTEND])
    await manager.start()
    await time.next_sleep()
    assert manager.status(FRONTEND).state is CertState.AVAILABLE, manager.status(FRONTEND)
    material = manager.material(FRONTEND)
    assert material.issuers == (two.cert, one.cert, root.cert)
    assert material.chain_pem[1:] == (pems["2"], pems["1"], pems["R"])  # one certificate each, leaf to root
    presented = x509.load_pem_x509_certificates(material.presented_chain_pem().encode())
    assert presented[1:] == [two.cert, one.cert]  # what peers get: leaf and intermediates, in order
    dump = manager.config_dump()[0]
    assert [c["serialNumber"] for c in dump["rootCerts"]] == [str(root.cert.serial_number)]
    assert len(dump["certChain"]) == 3
    await manager.stop()


async def test_a_leaf_without_its_chain_is_a_failed_fetch(tmp_path: Path) -> None:
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time)

    async def leaf_only(identity: Identity, csr: bytes) -> Sequence[str]:
        return (await ca.fetch(identity, csr))[:1]

    manager, _ = _manager(tmp_path, leaf_only, time, ca.signer)
    manager.set_local_workloads([FRONTEND])
    await manager.start()
    await time.next_sleep()
    status = manager.status(FRONTEND)
    assert status.state is CertState.UNAVAILABLE and "without the chain up to its root" in status.reason, status
    await manager.stop()


async def test_a_suspended_machine_renews_soon_after_it_resumes(tmp_path: Path) -> None:
    """Certificate validity is wall time, but sleeps are monotonic, and a suspended machine (a laptop running the
    lab, a paused VM) resumes with its monotonic clock behind the wall clock by the length of the suspend. The
    refresh slept on for the rest of its half-life - up to 12 h of a 24 h certificate - holding an expired one."""
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time, ttl=24 * 3600)
    manager, _ = _manager(tmp_path, ca.fetch, time, ca.signer)
    manager.set_local_workloads([FRONTEND])
    await manager.start()
    await time.next_sleep()
    first = manager.material(FRONTEND)

    time.now = first.not_after + 3600  # suspended 11 h into the refresh sleep, resumed an hour past expiry
    assert manager.status(FRONTEND).state is CertState.UNAVAILABLE
    slept = 0.0
    while manager.status(FRONTEND).state is not CertState.AVAILABLE and slept < 24 * 3600:
        slept += await time.release()
    assert manager.material(FRONTEND).valid_at(time.now)
    assert slept <= 60, f"renewed {slept:.0f} s (monotonic) after resuming"
    await manager.stop()


async def test_a_wall_clock_stepped_back_does_not_postpone_the_refresh(tmp_path: Path) -> None:
    time = FakeTime(NOW.timestamp())
    ca = FakeCA(time, ttl=1000)
    manager, _ = _manager(tmp_path, ca.fetch, time, ca.signer)
    manager.set_local_workloads([FRONTEND])
    await manager.start()
    await time.next_sleep()
    calls = ca.calls
    time.now -= 3600  # NTP steps the clock back an hour: the refresh is still due at half-life (jittered)
    slept = 0.0
    while ca.calls == calls:
        slept += await time.release()
    assert 450 <= slept <= 500
    await manager.stop()
