"""Whether the next step of a root rotation is safe: the tunnels' view, judged against the CA's state.

Why this module exists: a root rotation (`nodeagent ca rotate prepare|activate|finish`, nodeagent.ca.store)
keeps connections verifying only if each step waits for the cluster: `activate` (the new root signs) only
once every tunnel trusts the new root, or a tunnel that does not yet refuses every certificate it signs;
`finish` (the old root is no longer trusted) only once no certificate in use still chains to the old root,
or those connections fail. What a tunnel trusts and holds is in its config dump (`trustBundle`,
`certificates`); `nodeagent ca rotate status` reads every node's and this module decides. Istio leaves the
wait to the operator's judgement; here it is a command that exits 0 when the next step is safe.

The rules, for the bundle of the operator's CA state (every root it publishes, each with its role:
signing, next - prepared, not signing yet -, previous - the old root after activate -, extra):
- every tunnel must trust every root of the bundle (whatever the phase: a tunnel lacking one is behind
  the published trust bundle, and would refuse certificates that root signs);
- after `activate`, `finish` waits for every certificate held by a tunnel to chain to the signing root;
- a tunnel that cannot be read, or holds a certificate of a root outside the bundle, is a problem.
Roots a tunnel trusts beyond the bundle are reported, not a problem (its bundle may simply be newer).

What it deliberately does not do: no I/O (the caller reads the state and the config dumps), no
certificate parsing (roots are SHA-256 fingerprints, as `nodeagent ca show` prints them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SIGNING, NEXT, PREVIOUS, EXTRA = "signing", "next", "previous", "extra"
PHASE_STEP = {"none": "", "prepared": "activate", "activated": "finish"}  # phase -> the step it waits for


@dataclass(frozen=True)
class NodeView:
    """One node's tunnel as its config dump shows it."""

    node: str
    trusted: frozenset[str] = frozenset()  # SHA-256 of each root it verifies peers with
    cert_roots: tuple[str, ...] = ()  # per certificate it holds: the SHA-256 of the root its chain ends in
    error: str = ""  # why it could not be read ("" when it was)


@dataclass(frozen=True)
class Row:
    node: str
    trusts: str  # the bundle's roots it trusts, by role
    certificates: str  # its certificates by the role of their root
    problem: str  # "" when this node is ready for the next step


@dataclass(frozen=True)
class Assessment:
    rows: tuple[Row, ...]
    ready: bool  # the next step (or, with no rotation in progress, the mesh) is safe
    verdict: str  # one sentence: what to do now


def assess(phase: str, roles: Mapping[str, str], nodes: Sequence[NodeView]) -> Assessment:
    """`phase`: the CA state's rotation ("none", "prepared", "activated"); `roles`: SHA-256 -> role of every
    root in the CA's trust bundle; `nodes`: each node's tunnel."""
    step = PHASE_STEP[phase]
    rows = tuple(_row(view, roles, phase) for view in sorted(nodes, key=lambda v: v.node))
    behind = [r.node for r in rows if r.problem]
    if not rows:
        return Assessment(rows, False, "no nodeagent pod was found: nothing can be judged (is the DaemonSet running?)")
    if behind:
        what = f"`nodeagent ca rotate {step}` is not safe yet" if step else "the mesh's trust is inconsistent"
        return Assessment(rows, False, f"{what}: {len(behind)} of {len(rows)} nodes have a problem (above)")
    if not step:
        return Assessment(rows, True, "no rotation in progress; every tunnel trusts every root of the bundle")
    if step == "activate":
        return Assessment(rows, True, "every tunnel trusts the next root: `nodeagent ca rotate activate` is safe now")
    return Assessment(
        rows, True, "every certificate chains to the signing root: `nodeagent ca rotate finish` is safe now"
    )


def _row(view: NodeView, roles: Mapping[str, str], phase: str) -> Row:
    if view.error:
        return Row(view.node, "?", "?", f"unreachable: {view.error}")
    trusted = [roles[fp] for fp in roles if fp in view.trusted]
    lacking = [roles[fp] for fp in roles if fp not in view.trusted]
    beyond = len(view.trusted - roles.keys())
    trusts = "+".join(trusted) or "none of the bundle"
    if beyond:
        trusts += f" (+{beyond} root{'s' if beyond > 1 else ''} not in the bundle)"
    by_role = Counter(roles.get(fp, "unknown") for fp in view.cert_roots)
    certificates = ", ".join(f"{n} {role}" for role, n in sorted(by_role.items())) or "none"
    problems = []
    if lacking:
        problems.append(f"does not trust the {' and '.join(lacking)} root yet (its trust bundle is older)")
    if by_role["unknown"]:
        problems.append(f"{_certificates(by_role['unknown'])} to a root outside the bundle")
    if phase == "activated" and by_role[PREVIOUS]:
        problems.append(
            f"{_certificates(by_role[PREVIOUS], ' still')} to the previous root (renewed at half their lifetime)"
        )
    return Row(view.node, trusts, certificates, "; ".join(problems))


def _certificates(n: int, still: str = "") -> str:
    return f"{n} certificate{still} chains" if n == 1 else f"{n} certificates{still} chain"
