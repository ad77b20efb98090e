"""nodeagent.ca.rotation.assess: when the next step of a root rotation is safe, from the tunnels' view.

A table: the CA state's phase and roots, each node's trust bundle and certificates, and what the operator
must be told. Roots are SHA-256 fingerprints; A signs before the rotation, B after `activate`.
"""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.ca.rotation import NodeView, assess

A, B, X = "aa" * 32, "bb" * 32, "ee" * 32
NONE = {A: "signing"}
PREPARED = {A: "signing", B: "next"}
ACTIVATED = {B: "signing", A: "previous"}


def node(name: str, trusted: set[str], *certs: str, error: str = "") -> NodeView:
    return NodeView(name, frozenset(trusted), tuple(certs), error)


CASES = [
    # (id, phase, roles, nodes, ready, verdict fragment, {node: problem fragment})
    ("steady", "none", NONE, [node("n1", {A}, A, A), node("n2", {A}, A)], True, "no rotation in progress", {}),
    ("prepared, all trust B", "prepared", PREPARED, [node("n1", {A, B}, A), node("n2", {B, A}, A)],
     True, "`nodeagent ca rotate activate` is safe now", {}),
    ("prepared, n2 behind", "prepared", PREPARED, [node("n1", {A, B}, A), node("n2", {A}, A)],
     False, "`nodeagent ca rotate activate` is not safe yet: 1 of 2 nodes", {"n2": "does not trust the next root yet"}),
    ("activated, certs on A", "activated", ACTIVATED, [node("n1", {A, B}, B, A), node("n2", {A, B}, B)],
     False, "`nodeagent ca rotate finish` is not safe yet", {"n1": "1 certificate still chains to the previous root"}),
    ("activated, all on B", "activated", ACTIVATED, [node("n1", {A, B}, B, B), node("n2", {A, B})],
     True, "`nodeagent ca rotate finish` is safe now", {}),
    ("activated, n1 dropped A early", "activated", ACTIVATED, [node("n1", {B}, B), node("n2", {A, B}, B)],
     False, "not safe yet", {"n1": "does not trust the previous root yet"}),
    ("unreachable node", "prepared", PREPARED, [node("n1", {A, B}, A), node("n2", set(), error="no answer")],
     False, "not safe yet", {"n2": "unreachable: no answer"}),
    ("certificate of a foreign root", "none", NONE, [node("n1", {A}, X)],
     False, "the mesh's trust is inconsistent", {"n1": "1 certificate chains to a root outside the bundle"}),
    ("a newer bundle than the state", "none", NONE, [node("n1", {A, X}, A)], True, "no rotation in progress", {}),
    ("no pods", "none", NONE, [], False, "no nodeagent pod was found", {}),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_assess(case: tuple[Any, ...]) -> None:
    _, phase, roles, nodes, ready, verdict, problems = case
    got = assess(phase, roles, nodes)
    assert got.ready is ready and verdict in got.verdict, got
    for row in got.rows:
        want = problems.get(row.node)
        assert (want in row.problem) if want else row.problem == "", (row.node, row.problem)


def test_rows_name_the_roots_by_role() -> None:
    (row,) = assess("activated", ACTIVATED, [node("n1", {A, B, X}, B, A, B)]).rows
    assert row.trusts == "signing+previous (+1 root not in the bundle)"
    assert row.certificates == "1 previous, 2 signing"
