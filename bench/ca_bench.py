"""The CA in the benchmark: certificates per second over real gRPC, and certificates for stunnel.

Certificates per second: `nodeagent ca serve` runs as its own process on loopback (so the figure is the
CA's, not shared with the client), and 32 concurrent `CAClient` calls ask, as node1's agent, for the
identity of a pod on node1 for a fixed number of seconds. One CSR is reused: the CA verifies and signs
every request anew, which is its work; key generation is the client's.

stunnel's certificates come from the same CA code (a fresh CA state directory), so the C tunnel we
compare against authenticates with the same kind of SVIDs the mesh uses.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.ca import authority
from nodeagent.ca.client import CAClient
from nodeagent.ca.store import CAStore
from nodeagent.inventory.local import load_inventory
from nodeagent.lab.cluster import DEFAULT_TOPOLOGY
from nodeagent.model import DEFAULT_TRUST_DOMAIN, Identity

CONCURRENCY = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _csr(identity: Identity) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


async def _hammer(client: CAClient, identity: Identity, csr: bytes, seconds: float) -> int:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            chain = await client.fetch(identity, csr)
            if len(chain) < 2:
                raise RuntimeError(f"the CA returned a chain of {len(chain)} certificates")
            done += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done


def certificates_per_second(seconds: float) -> float:
    inventory = load_inventory(DEFAULT_TOPOLOGY)
    pod = inventory.pod("shop/frontend")
    token = next(c.token for c in inventory.node_credentials if c.node == pod.node)
    identity = pod.identity(inventory.trust_domain)
    with tempfile.TemporaryDirectory(prefix="nodeagent-bench-ca-") as tmp:
        state = Path(tmp) / "ca"
        port = _free_port()
        cli = [sys.executable, "-m", "nodeagent.cli", "ca"]
        subprocess.run([*cli, "init", "--state-dir", str(state)], check=True, capture_output=True)
        # Its log to a file, never an unread pipe: at info the CA logs each certificate it issues, and a full
        # pipe stops it mid-run (the run then fails with DEADLINE_EXCEEDED).
        log_file = (Path(tmp) / "ca.log").open("wb")
        server = subprocess.Popen(
            [
                *cli,
                "serve",
                "--state-dir",
                str(state),
                "--inventory",
                str(DEFAULT_TOPOLOGY),
                "--listen",
                f"127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        try:
            bundle = CAStore(state, DEFAULT_TRUST_DOMAIN).bundle_path.read_text()
            client = CAClient(f"127.0.0.1:{port}", lambda: token, lambda: bundle)
            csr = _csr(identity)

            async def run() -> float:
                try:
                    for _ in range(100):  # wait for the server, then warm up
                        try:
                            await client.fetch(identity, csr)
                            break
                        except Exception:
                            if server.poll() is not None:
                                raise
                            await asyncio.sleep(0.1)
                    t0 = time.monotonic()
                    count = await _hammer(client, identity, csr, seconds)
                    return count / (time.monotonic() - t0)
                finally:
                    await client.close()

            return asyncio.run(run())
        finally:
            server.terminate()
            server.wait(10)
            log_file.close()


def issue_pair(workdir: Path) -> None:
    """root.pem plus client.{pem,key} and server.{pem,key} for stunnel, signed by a fresh nodeagent CA."""
    store = CAStore(workdir / "ca", DEFAULT_TRUST_DOMAIN)
    store.init()
    state = store.load()
    now = dt.datetime.now(dt.UTC)
    (workdir / "root.pem").write_text(state.bundle.to_pem())
    for name, sa in (("client", "frontend"), ("server", "checkout")):
        key = ec.generate_private_key(ec.SECP256R1())
        issued = authority.issue(
            state.signer,
            key.public_key(),
            Identity(DEFAULT_TRUST_DOMAIN, "shop", sa),
            now=now,
            ttl=dt.timedelta(hours=1),
        )
        (workdir / f"{name}.pem").write_text("".join(issued.chain_pem))
        key_path = workdir / f"{name}.key"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        os.chmod(key_path, 0o600)


MANAGER_SCRIPT = r"""
import asyncio, datetime as dt, json, sys, tempfile
from pathlib import Path
from cryptography import x509
from prometheus_client import CollectorRegistry
from nodeagent.ca import authority
from nodeagent.ca.store import CAStore
from nodeagent.metrics import CertManagerMetrics
from nodeagent.model import Identity
from nodeagent.ztunnel.certs import CertificateManager, CertManagerInputs

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

async def main(count):
    tmp = Path(tempfile.mkdtemp(prefix="nodeagent-bench-mgr-"))
    store = CAStore(tmp / "ca", "cluster.local"); store.init(); state = store.load()
    async def fetch(identity, csr_pem):
        # The CA's own signing code, in process: the manager's memory is what is measured.
        return list(authority.sign_csr(state.signer, csr_pem, identity, dt.datetime.now(dt.UTC), 0).chain_pem)
    manager = CertificateManager(CertManagerInputs(fetch=fetch, bundle_path=store.bundle_path,
                                                   metrics=CertManagerMetrics(CollectorRegistry())))
    await manager.start()
    identities = [Identity("cluster.local", f"ns{i % 20}", f"sa{i}") for i in range(count)]
    before = rss()
    manager.set_local_workloads(identities)
    for identity in identities:
        await manager.wait_available(identity)
    after = rss()
    await manager.stop()
    print(json.dumps({"rss_bytes": after, "growth_bytes": after - before}))

asyncio.run(main(int(sys.argv[1])))
"""


def manager_memory(identities: int) -> dict[str, float]:
    """RSS of a process whose certificate manager holds `identities` certificates (total and growth)."""
    out = subprocess.run(
        [sys.executable, "-c", MANAGER_SCRIPT, str(identities)], check=True, capture_output=True, text=True
    ).stdout
    return {k: float(v) for k, v in json.loads(out).items()}
