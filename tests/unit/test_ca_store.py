"""The CA state directory: key permissions, the published bundle, and the root rotation steps."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from identity_support import NOW, TD

from nodeagent.ca import authority
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
