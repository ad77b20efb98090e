"""The CA state directory: key permissions, the published bundle, and the root rotation steps."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from identity_support import NOW, TD

from nodeagent.ca import authority
from nodeagent.ca import store as store_module
from nodeagent.ca.store import CAStore, StoreError


def _bundle_roots(store: CAStore) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(store.bundle_path.read_bytes())


def test_init_creates_private_key_once(tmp_path: Path) -> None:
    store = CAStore(tmp_path / "ca-state", TD, clock=lambda: NOW)
    assert store.init() is True
    key = tmp_path / "ca-state" / "ca" / "ca-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca-state").stat().st_mode) == 0o700
    first = store.load()
    assert _bundle_roots(store) == [first.signer.root]
    assert store.init() is False  # idempotent: the same root survives a restart
    assert store.load().signer.cert == first.signer.cert
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_load_without_init_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="nodeagent ca init"):
        CAStore(tmp_path, TD).load()


def test_rotation_a_to_ab_to_b(tmp_path: Path) -> None:
    store = CAStore(tmp_path, TD, clock=lambda: NOW)
    store.init()
    a = store.load().signer.root
    with pytest.raises(StoreError, match="prepare"):
        store.rotate_activate()

    store.rotate_prepare()
    state = store.load()
    b = next(r for r in state.bundle.roots if r != a)
    assert state.signer.root == a and state.rotation == "prepared"
    assert _bundle_roots(store) == [a, b]
    with pytest.raises(StoreError, match="already prepared"):
        store.rotate_prepare()

    store.rotate_activate()
    state = store.load()
    assert state.signer.root == b and state.rotation == "activated"
    assert set(_bundle_roots(store)) == {a, b}
    assert sorted(p.name for p in (tmp_path / "previous").iterdir()) == ["root-cert.pem"]  # A's key is gone

    store.rotate_finish()
    state = store.load()
    assert state.signer.root == b and state.rotation == "none"
    assert _bundle_roots(store) == [b]
    assert stat.S_IMODE((tmp_path / "ca" / "ca-key.pem").stat().st_mode) == 0o600


@pytest.mark.parametrize("resume", ["init", "rotate_activate"])
def test_an_activate_cut_short_between_its_renames_is_completed_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resume: str
) -> None:
    """A crash after ca/ -> previous/ and before next/ -> ca/ left no ca/: `ca serve` (init) then minted a
    third root C that signed, B stranded in next/ and A's key left in previous/."""
    store = CAStore(tmp_path, TD, clock=lambda: NOW)
    store.init()
    a = store.load().signer.root
    store.rotate_prepare()
    b = next(r for r in store.load().bundle.roots if r != a)
    real_rename = os.rename

    def crash_on_the_second(src: object, dst: object) -> None:
        if Path(str(src)).name == "next":
            raise SystemExit("power lost between the renames")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module.os, "rename", crash_on_the_second)
    with pytest.raises(SystemExit):
        store.rotate_activate()
    monkeypatch.setattr(store_module.os, "rename", real_rename)
    assert not (tmp_path / "ca").exists()

    if resume == "init":
        assert store.init() is False  # completed, not a new root
    else:
        store.rotate_activate()
    state = store.load()
    assert state.signer.root == b and state.rotation == "activated"
    assert set(_bundle_roots(store)) == {a, b}
    assert sorted(p.name for p in (tmp_path / "previous").iterdir()) == ["root-cert.pem"]  # A's key is gone


def test_init_refuses_a_rotation_it_cannot_complete(tmp_path: Path) -> None:
    store = CAStore(tmp_path, TD, clock=lambda: NOW)
    store.init()
    store.rotate_prepare()
    shutil.rmtree(tmp_path / "ca")  # and no previous/: nothing says which root should sign
    with pytest.raises(StoreError, match="interrupted"):
        store.init()
    assert not (tmp_path / "ca").exists()


def test_import_istio_cacerts(tmp_path: Path) -> None:
    source = tmp_path / "cacerts"
    CAStore(source.parent / "other", TD).init()
    (tmp_path / "other" / "ca").rename(source)
    store = CAStore(tmp_path / "state", TD)
    store.import_cacerts(source)
    assert store.load().signer.cert == x509.load_pem_x509_certificate((source / "ca-cert.pem").read_bytes())
    with pytest.raises(StoreError, match="--force"):
        store.import_cacerts(source)
    (source / "ca-key.pem").write_bytes(
        authority.generate_root(NOW, TD).key.private_bytes(
            authority.serialization.Encoding.PEM,
            authority.serialization.PrivateFormat.PKCS8,
            authority.serialization.NoEncryption(),
        )
    )
    with pytest.raises(authority.CAMaterialError, match="does not belong"):
        store.import_cacerts(source, force=True)


def test_version_changes_with_the_bundle(tmp_path: Path) -> None:
    store = CAStore(tmp_path, TD)
    store.init()
    before = store.version()
    store.rotate_prepare()
    assert store.version() != before


@pytest.mark.parametrize("step", ["none", "prepared", "activated", "finished"])
def test_export_then_import_gives_the_same_signer_and_bundle(tmp_path: Path, step: str) -> None:
    """The cluster's path (Secret and ConfigMap from `ca export`, the CA pod importing the Secret): at each
    rotation step the pod signs with the operator's signer and trusts exactly the operator's bundle."""
    admin = CAStore(tmp_path / "admin", TD, clock=lambda: NOW)
    admin.init()
    steps = {"none": [], "prepared": [admin.rotate_prepare], "activated": [admin.rotate_prepare, admin.rotate_activate]}
    for action in steps.get(step, [admin.rotate_prepare, admin.rotate_activate, admin.rotate_finish]):
        action()
    state = admin.load()
    exported = admin.export_cacerts(tmp_path / "secret")
    assert exported == state.bundle
    root_cert = x509.load_pem_x509_certificates((tmp_path / "secret" / "root-cert.pem").read_bytes())
    assert root_cert[0] == state.signer.root and set(root_cert) == set(state.bundle.roots)
    assert stat.S_IMODE((tmp_path / "secret" / "ca-key.pem").stat().st_mode) == 0o600

    pod = CAStore(tmp_path / "pod", TD)
    pod.import_cacerts(tmp_path / "secret")
    imported = pod.load()
    assert imported.signer.cert == state.signer.cert and imported.signer.root == state.signer.root
    assert set(imported.bundle.roots) == set(state.bundle.roots)
    assert set(_bundle_roots(pod)) == set(state.bundle.roots)


def test_import_force_replaces_the_roots_trusted_alongside(tmp_path: Path) -> None:
    admin = CAStore(tmp_path / "admin", TD, clock=lambda: NOW)
    admin.init()
    admin.rotate_prepare()
    admin.export_cacerts(tmp_path / "during")
    admin.rotate_activate()
    admin.rotate_finish()
    admin.export_cacerts(tmp_path / "after")
    pod = CAStore(tmp_path / "pod", TD)
    pod.import_cacerts(tmp_path / "during")
    assert len(pod.load().bundle.roots) == 2
    pod.import_cacerts(tmp_path / "after", force=True)  # a restart with the finished rotation's Secret
    assert pod.load().bundle.roots == admin.load().bundle.roots
    assert not (tmp_path / "pod" / "trusted").exists()


def test_export_refuses_a_directory_with_other_files(tmp_path: Path) -> None:
    store = CAStore(tmp_path / "state", TD)
    store.init()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="empty directory"):
        store.export_cacerts(tmp_path / "out")


def test_a_signer_that_chains_to_none_of_the_roots_is_refused(tmp_path: Path) -> None:
    store = CAStore(tmp_path / "state", TD, clock=lambda: NOW)
    store.init()
    store.export_cacerts(tmp_path / "secret")
    strangers = authority.TrustBundle.of([authority.generate_root(NOW, TD).root, authority.generate_root(NOW, TD).root])
    (tmp_path / "secret" / "root-cert.pem").write_text(strangers.to_pem())
    with pytest.raises(authority.CAMaterialError, match="none of the 2 roots"):
        CAStore(tmp_path / "pod", TD).import_cacerts(tmp_path / "secret")
