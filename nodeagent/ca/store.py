"""The CA's state directory: signing keys on disk, the published trust bundle, and root rotation.

Why this module exists: the CA must come back after a restart with the same keys, keep private keys
readable by nobody else (mode 0600 in a 0700 directory), and publish the set of trusted roots to a
file the node agents read. Rotating the root without breaking connections (which Istio cannot do,
istio/istio#47427) is a sequence of small file operations, each done here and each leaving a
consistent, published bundle.

Layout (the active signer uses Istio's `cacerts` file names, so an operator can hand one in):

    <state>/ca/ca-cert.pem, ca-key.pem (0600), root-cert.pem, cert-chain.pem   the active signer
    <state>/next/...                     a new root prepared by `rotate prepare`, trusted, not signing
    <state>/previous/root-cert.pem       the old root after `rotate activate`, trusted until `finish`
    <state>/trusted/root-cert.pem        roots imported with cacerts besides the signer's (see below)
    <state>/trust-bundle.pem             every trusted root (ca, next, previous, trusted), written atomically

Root rotation, with A the current root:
  1. `nodeagent ca rotate prepare`   creates root B in next/; bundle = A + B; A still signs.
     Wait until every agent has reloaded the bundle (they poll it; a few seconds).
  2. `nodeagent ca rotate activate`  B signs; A moves to previous/ (its key is deleted); bundle = A + B.
     Wait until every workload certificate was reissued by B: at least half the longest TTL
     (workloads refresh at half-life) plus a margin, or until `nodeagent inspect certificates` on each
     node shows the new root.
  3. `nodeagent ca rotate finish`    drops A; bundle = B.
Peers keep verifying throughout because at every step each certificate in use chains to a root that
every agent trusts. Operator-supplied intermediates (`ca init --cacerts DIR`) are rotated by replacing
them with `init --cacerts --force` when their root stays the same.

In a cluster the CA pod's state is an emptyDir imported at start from the Secret nodeagent-ca-root, and
the tunnels trust the ConfigMap nodeagent-trust-bundle: the operator keeps this state directory (it
holds the keys) and runs the same three steps on it, each followed by `nodeagent ca export --out DIR`,
which writes the cacerts layout with root-cert.pem = the whole bundle (the signer's root first). DIR
becomes the Secret, DIR/root-cert.pem the ConfigMap, and the CA is restarted; its import keeps the
roots besides the signer's in trusted/, so the CA's bundle matches the tunnels' (daemonset/README.md).

What it deliberately does not do: no signing policy (ca.authority), no serving (ca.server), no locking
between concurrent operators: run one rotation command at a time.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from nodeagent.ca import authority
from nodeagent.ca.authority import Signer, TrustBundle

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
ROOT_CERT = "root-cert.pem"
CERT_CHAIN = "cert-chain.pem"
BUNDLE = "trust-bundle.pem"
SIGNER_FILES = (CA_CERT, CA_KEY, ROOT_CERT)  # what a signer needs (cert-chain.pem is optional)


class StoreError(Exception):
    """The state directory is missing, incomplete, or not in the state an operation needs."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` so readers see the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make renames in `path` durable (a crash must not undo them)."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class CAState:
    signer: Signer
    bundle: TrustBundle
    rotation: str  # "none", "prepared" (next/ exists) or "activated" (previous/ exists)


class CAStore:
    def __init__(self, state_dir: Path, trust_domain: str, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.state_dir = state_dir
        self.trust_domain = trust_domain
        self.clock = clock

    @property
    def bundle_path(self) -> Path:
        return self.state_dir / BUNDLE

    def _dir(self, name: str) -> Path:
        return self.state_dir / name

    def exists(self) -> bool:
        return (self._dir("ca") / CA_CERT).exists()

    # --- creating signers --------------------------------------------------------------------------

    def init(self) -> bool:
        """Create a self-signed root in ca/ unless one exists; publish the bundle. True if created.

        A state directory with a rotation in it but no ca/ is a `rotate activate` cut short: it is
        completed, never answered with a new root (which would sign as a third root, stranding B)."""
        self._ensure_state_dir()
        created = False
        self._complete_activate()
        if not self.exists():
            rotation = [name for name in ("next", "previous") if self._dir(name).exists()]
            if rotation:
                raise StoreError(
                    f"{self.state_dir} holds {' and '.join(f'{n}/' for n in rotation)} but no ca/: a root rotation "
                    "was interrupted and cannot be completed automatically; restore ca/ from a backup "
                    "(`nodeagent ca export`) rather than creating a new root"
                )
            self._write_signer(self._dir("ca"), authority.generate_root(self.clock(), self.trust_domain))
            created = True
        self.publish()
        return created

    def import_cacerts(self, source: Path, force: bool = False) -> None:
        """Install an operator-supplied signer from a directory laid out like Istio's cacerts."""
        if self.exists() and not force:
            raise StoreError(f"{self._dir('ca')} already holds a signer; pass --force to replace it")
        signer = self._read_signer(
            source,
            lambda m: (
                f"{source} (--cacerts) lacks {', '.join(m)}: Istio-style cacerts hold "
                f"{', '.join(SIGNER_FILES)} and optionally {CERT_CHAIN}"
            ),
        )
        others = authority.other_roots((source / ROOT_CERT).read_bytes(), signer)
        self._ensure_state_dir()
        self._write_signer(self._dir("ca"), signer)
        trusted = self._dir("trusted")
        if others:
            trusted.mkdir(mode=0o700, exist_ok=True)
            write_atomic(trusted / ROOT_CERT, TrustBundle.of(others).to_pem().encode())
        elif trusted.exists():
            shutil.rmtree(trusted)
        self.publish()

    def export_cacerts(self, target: Path) -> TrustBundle:
        """Write the active signer in Istio's cacerts layout into `target`, with root-cert.pem = every trusted
        root, the signer's first: what the cluster's Secret and ConfigMap need (`import_cacerts` of it gives the
        same signer and bundle). `target` is created if missing; the cacerts files of an earlier export there
        are replaced; any other file refuses the export (the Secret is made of the whole directory)."""
        state = self.load()
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        stray = sorted(p.name for p in target.iterdir() if p.name not in (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN))
        if stray:
            raise StoreError(
                f"{target} holds other files ({', '.join(stray)}); export into a new or empty directory, or one "
                "holding only an earlier export (its files are replaced)"
            )
        self._write_signer(target, state.signer)
        write_atomic(target / ROOT_CERT, state.bundle.to_pem().encode())
        return state.bundle

    def _ensure_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)

    def _write_signer(self, target: Path, signer: Signer) -> None:
        target.mkdir(mode=0o700, exist_ok=True)
        key = signer.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomic(target / CA_KEY, key, mode=0o600)
        write_atomic(target / CA_CERT, signer.chain_pem[0].encode())
        write_atomic(target / ROOT_CERT, authority.cert_pem(signer.root).encode())
        write_atomic(target / CERT_CHAIN, "".join(signer.chain_pem).encode())

    def _read_signer(self, source: Path, lacking: Callable[[list[str]], str]) -> Signer:
        """The signer in `source`; StoreError worded by `lacking` (given the missing files) if it is not there."""
        missing = [n for n in SIGNER_FILES if not (source / n).is_file()]
        if missing:
            raise StoreError(lacking(missing))
        chain = source / CERT_CHAIN
        return authority.load_signer(
            ca_cert=(source / CA_CERT).read_bytes(),
            ca_key=(source / CA_KEY).read_bytes(),
            root_cert=(source / ROOT_CERT).read_bytes(),
            cert_chain=chain.read_bytes() if chain.is_file() else None,
        )

    # --- reading -----------------------------------------------------------------------------------

    def _no_signer(self, missing: list[str]) -> str:
        """Said in terms of the --state-dir the user gave (its ca/ subdirectory is the store's business)."""
        init = f"nodeagent ca init --state-dir {self.state_dir}"
        if len(missing) == len(SIGNER_FILES):
            return (
                f"no CA in {self.state_dir} (--state-dir): run `{init}` to create a root, "
                f"or `{init} --cacerts DIR` to import Istio-style cacerts"
            )
        return (
            f"the CA in {self.state_dir} (--state-dir) is incomplete: its signer lacks {', '.join(missing)}; "
            f"import a signer (a `nodeagent ca export` of it, say) with `{init} --cacerts DIR --force`"
        )

    def load(self) -> CAState:
        signer = self._read_signer(self._dir("ca"), self._no_signer)
        roots = [signer.root]
        rotation = "none"
        if (self._dir("next") / ROOT_CERT).is_file():
            nxt = self._dir("next")
            roots.append(
                self._read_signer(
                    nxt, lambda m: f"the root prepared by `rotate prepare` in {nxt} lacks {', '.join(m)}"
                ).root
            )
            rotation = "prepared"
        if (self._dir("previous") / ROOT_CERT).is_file():
            roots.append(TrustBundle.from_pem((self._dir("previous") / ROOT_CERT).read_bytes()).roots[0])
            rotation = "activated"
        if (self._dir("trusted") / ROOT_CERT).is_file():
            roots.extend(TrustBundle.from_pem((self._dir("trusted") / ROOT_CERT).read_bytes()).roots)
        return CAState(signer=signer, bundle=TrustBundle.of(roots), rotation=rotation)

    def publish(self) -> TrustBundle:
        """Write trust-bundle.pem from the roots in the state directory (atomically)."""
        bundle = self.load().bundle
        write_atomic(self.bundle_path, bundle.to_pem().encode())
        return bundle

    def version(self) -> tuple[int, ...]:
        """Changes whenever the signer or the bundle changes on disk (for polling reloads)."""
        stamps = []
        for path in (self._dir("ca") / CA_CERT, self.bundle_path):
            try:
                st = path.stat()
                stamps += [st.st_mtime_ns, st.st_ino, st.st_size]
            except FileNotFoundError:
                stamps += [0, 0, 0]
        return tuple(stamps)

    # --- root rotation -----------------------------------------------------------------------------

    def rotate_prepare(self) -> TrustBundle:
        """Step 1: create root B in next/ and trust it alongside A. A keeps signing."""
        state = self.load()
        if state.rotation != "none":
            raise StoreError(f"a rotation is already {state.rotation}; run `nodeagent ca rotate` with the next step")
        self._write_signer(self._dir("next"), authority.generate_root(self.clock(), self.trust_domain))
        return self.publish()

    def rotate_activate(self) -> TrustBundle:
        """Step 2: B signs; A's root stays trusted in previous/ (its key is removed). Two renames (ca/ ->
        previous/, next/ -> ca/); a crash between them is completed by the next init() or activate."""
        if self._complete_activate():
            return self.publish()
        state = self.load()
        if state.rotation != "prepared":
            raise StoreError("nothing to activate; run `nodeagent ca rotate prepare` first")
        previous = self._dir("previous")
        if previous.exists():
            shutil.rmtree(previous)
        os.rename(self._dir("ca"), previous)
        fsync_dir(self.state_dir)
        self._complete_activate()
        return self.publish()

    def _complete_activate(self) -> bool:
        """The second half of `rotate_activate` when ca/ is gone but next/ holds B and previous/ A: True if done."""
        previous, nxt = self._dir("previous"), self._dir("next")
        if self.exists() or not previous.is_dir() or not (nxt / CA_CERT).is_file():
            return False
        os.rename(nxt, self._dir("ca"))
        for name in (CA_KEY, CA_CERT, CERT_CHAIN):
            (previous / name).unlink(missing_ok=True)
        fsync_dir(self.state_dir)
        return True

    def rotate_finish(self) -> TrustBundle:
        """Step 3: stop trusting A. Run it only after every workload certificate was reissued by B."""
        state = self.load()
        if state.rotation != "activated":
            raise StoreError("nothing to finish; run `nodeagent ca rotate activate` first")
        shutil.rmtree(self._dir("previous"))
        return self.publish()
