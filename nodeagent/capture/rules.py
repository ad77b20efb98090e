"""The iptables rules of the in-pod capture and of the node's kubelet-probe bypass, as plain values.

Why this module exists: "decide, then act". What the kernel should hold is computed here from nothing
but constants (the in-pod ruleset is the same for every pod) or a list of pod addresses (the node's
probe bypass); what it does hold is parsed here from `iptables-save`; and the difference - in words an
operator can act on, and as the exact `iptables-restore --noflush` payload that repairs it - is
computed here too. The executor (nodeagent.capture.iptables) only runs `iptables-save` and
`iptables-restore`; the decisions are tested with tables of plain strings.

The rules (REFERENCE.md, "Marks, rules and routing of the in-pod iptables mode"), under our own chains,
each entered from exactly one builtin-chain jump carrying a `nodeagent: ...` comment:

    nat    PREROUTING -> NODEAGENT_PRERT          probe source accepted; other TCP not to 127.0.0.1, not to
                                                  15008, not from the tunnel (mark 0x539) -> REDIRECT 15006
    nat    OUTPUT     -> NODEAGENT_OUTPUT         connmark-restored replies (0x111) and app -> own pod IP on
                                                  lo accepted; other TCP not to 127.0.0.1, not the tunnel's
                                                  -> REDIRECT 15001
    mangle PREROUTING -> NODEAGENT_MANGLE_PRERT   tunnel mark 0x539 -> connmark 0x111
    mangle OUTPUT     -> NODEAGENT_MANGLE_OUTPUT  connmark 0x111 restored onto the app's replies
    nat    POSTROUTING -> NODEAGENT_POSTRT        (node netns) node-originated TCP to an enrolled pod ->
                                                  SNAT 169.254.7.127, one commented rule per pod

and, with ip6tables, the IPv6 guard (`pod_ruleset6`):

    filter INPUT      -> NODEAGENT_IN6            loopback returned; every other TCP SYN -> REJECT tcp-reset

The capture is IPv4-only, but a pod's interface has an IPv6 link-local address wherever the kernel has
IPv6 (and a global one on dual-stack clusters), and an app listening on `::` (Go's default, nginx's) took
plaintext TCP over it from any neighbour on the node's bridge — around the tunnel, STRICT and every DENY
(measured in the lab, both capture modes). So an enrolled pod refuses new inbound IPv6 TCP, as Istio's
sidecar iptables do when IPv6 is not enabled; the pod's own outbound IPv6 connections (their SYN-ACKs are
no SYN) and loopback keep working.

Rules are written in the canonical form `iptables-save` prints (both the legacy and the nft flavour,
checked by tests/privileged), so desired and actual compare as strings.

What it deliberately does not do: no subprocesses and no netns (iptables.py), no routing (routing.py),
no IPv6 capture (the lab and the inventory are IPv4-only; IPv6 is refused, not captured), no DNS
capture (15053), and it never touches a chain
that is not ours: a payload only declares, flushes or deletes NODEAGENT_* chains and deletes jumps into
them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

TUNNEL_MARK = 0x539  # SO_MARK of every socket the tunnel opens in a pod netns
CAPTURE_MARK = 0x111  # connmark of connections the tunnel made towards the app (spoofed source)
MARK_MASK = 0xFFF
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_HBONE_PORT = 15008
PROBE_SOURCE = ipaddress.IPv4Address("169.254.7.127")
LOOPBACK = "127.0.0.1/32"

CHAIN_PREFIX = "NODEAGENT_"
COMMENT_PREFIX = "nodeagent: "

NAT = "nat"
MANGLE = "mangle"
FILTER = "filter"

_TUNNEL = f"{TUNNEL_MARK:#x}/{MARK_MASK:#x}"
_CAPTURED = f"{CAPTURE_MARK:#x}/{MARK_MASK:#x}"
_FULL_MASKS = "--nfmask 0xffffffff --ctmask 0xffffffff"
# A comment must survive iptables-save unchanged: no quotes or backslashes (they come back escaped).
_SAFE_COMMENT = re.compile(r"^[A-Za-z0-9 .,:/_=()+-]{1,200}$")
_TARGET = re.compile(r"(?:^|\s)-[jg]\s+(\S+)")


@dataclass(frozen=True, slots=True)
class Jump:
    """The one rule in a builtin chain that enters one of our chains."""

    table: str
    chain: str  # builtin: PREROUTING, OUTPUT, POSTROUTING
    target: str  # ours: NODEAGENT_*
    comment: str

    @property
    def spec(self) -> str:
        """The rule as iptables-save prints it after `-A <chain> `."""
        return f'-m comment --comment "{COMMENT_PREFIX}{self.comment}" -j {self.target}'


@dataclass(frozen=True, slots=True)
class Ruleset:
    """Desired state: our chains (table, chain) -> their rules, and the jumps into them."""

    chains: Mapping[tuple[str, str], tuple[str, ...]]
    jumps: tuple[Jump, ...]

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(sorted({table for table, _ in self.chains} | {j.table for j in self.jumps}))

    def lines(self) -> tuple[str, ...]:
        """Every rule as `-t TABLE -A CHAIN SPEC`: the listing `inspect` shows and tests compare."""
        out = [f"-t {j.table} -A {j.chain} {j.spec}" for j in self.jumps]
        for (table, chain), rules in sorted(self.chains.items()):
            out += [f"-t {table} -A {chain} {rule}" for rule in rules]
        return tuple(out)


def _chains(items: Mapping[tuple[str, str], tuple[str, ...]]) -> Mapping[tuple[str, str], tuple[str, ...]]:
    return MappingProxyType(dict(items))


def pod_ruleset() -> Ruleset:
    """The in-pod capture. It does not depend on the pod: every enrolled pod gets exactly this."""
    not_tunnel = f"-m mark ! --mark {_TUNNEL}"
    return Ruleset(
        chains=_chains(
            {
                (NAT, "NODEAGENT_PRERT"): (
                    f"-s {PROBE_SOURCE}/32 -p tcp -j ACCEPT",
                    f"! -d {LOOPBACK} -p tcp -m tcp ! --dport {INBOUND_HBONE_PORT} {not_tunnel} "
                    f"-j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}",
                ),
                (NAT, "NODEAGENT_OUTPUT"): (
                    f"-p tcp -m mark --mark {_CAPTURED} -j ACCEPT",
                    f"! -d {LOOPBACK} -o lo -j ACCEPT",
                    f"! -d {LOOPBACK} -p tcp {not_tunnel} -j REDIRECT --to-ports {OUTBOUND_PORT}",
                ),
                (MANGLE, "NODEAGENT_MANGLE_PRERT"): (f"-m mark --mark {_TUNNEL} -j CONNMARK --set-xmark {_CAPTURED}",),
                (MANGLE, "NODEAGENT_MANGLE_OUTPUT"): (
                    f"-m connmark --mark {_CAPTURED} -j CONNMARK --restore-mark {_FULL_MASKS}",
                ),
            }
        ),
        jumps=(
            Jump(NAT, "PREROUTING", "NODEAGENT_PRERT", "inbound capture to 15006"),
            Jump(NAT, "OUTPUT", "NODEAGENT_OUTPUT", "outbound capture to 15001"),
            Jump(MANGLE, "PREROUTING", "NODEAGENT_MANGLE_PRERT", "connmark the tunnel connections"),
            Jump(MANGLE, "OUTPUT", "NODEAGENT_MANGLE_OUTPUT", "restore the tunnel mark on replies"),
        ),
    )


def pod_ruleset6() -> Ruleset:
    """The in-pod IPv6 guard (ip6tables; see the module docstring): new inbound TCP is refused with a reset,
    so a client sees "connection refused" at once rather than a timeout. `RETURN`, not `ACCEPT`, for
    loopback: other INPUT rules of the pod still apply."""
    return Ruleset(
        chains=_chains(
            {
                (FILTER, "NODEAGENT_IN6"): (
                    "-i lo -j RETURN",
                    "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REJECT --reject-with tcp-reset",
                ),
            }
        ),
        jumps=(Jump(FILTER, "INPUT", "NODEAGENT_IN6", "no IPv6 TCP around the mesh"),),
    )


def probe_ruleset(pods: Mapping[str, ipaddress.IPv4Address]) -> Ruleset:
    """The node's kubelet-probe bypass: node-originated TCP to each enrolled pod (key -> IP) is SNATed.

    `-m owner --socket-exists` matches only packets of a local socket (kubelet's), never forwarded pod
    traffic. The rules are sorted by address, so the same pods always render the same chain.
    """
    rules = []
    for key, ip in sorted(pods.items(), key=lambda item: (item[1], item[0])):
        comment = f"{COMMENT_PREFIX}probe {key}"
        if not _SAFE_COMMENT.fullmatch(comment):
            raise ValueError(f"pod key {key!r} cannot be written into an iptables comment")
        rules.append(
            f'-d {ip}/32 -p tcp -m owner --socket-exists -m comment --comment "{comment}" '
            f"-j SNAT --to-source {PROBE_SOURCE}"
        )
    return Ruleset(
        chains=_chains({(NAT, "NODEAGENT_POSTRT"): tuple(rules)}),
        jumps=(Jump(NAT, "POSTROUTING", "NODEAGENT_POSTRT", "kubelet probes to enrolled pods"),),
    )


# --- what the kernel has --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SavedTable:
    chains: tuple[str, ...]  # every chain declared, builtin and user, in save order
    rules: Mapping[str, tuple[str, ...]]  # chain -> rule specs (the text after `-A <chain> `)


@dataclass(frozen=True, slots=True)
class Saved:
    """`iptables-save` output, parsed: table -> chains and rules."""

    tables: Mapping[str, SavedTable] = field(default_factory=lambda: MappingProxyType({}))

    def rules(self, table: str, chain: str) -> tuple[str, ...]:
        t = self.tables.get(table)
        return t.rules.get(chain, ()) if t is not None else ()

    def has_chain(self, table: str, chain: str) -> bool:
        t = self.tables.get(table)
        return t is not None and chain in t.chains

    def owned_chains(self) -> tuple[tuple[str, str], ...]:
        """Every NODEAGENT_* chain, wherever it is."""
        return tuple(
            (table, chain)
            for table, t in sorted(self.tables.items())
            for chain in t.chains
            if chain.startswith(CHAIN_PREFIX)
        )

    def jumps_into_owned(self) -> tuple[tuple[str, str, str], ...]:
        """(table, chain, spec) of every rule outside our chains that jumps into one of ours."""
        found = []
        for table, t in sorted(self.tables.items()):
            for chain in t.chains:
                if chain.startswith(CHAIN_PREFIX):
                    continue
                for spec in t.rules.get(chain, ()):
                    target = rule_target(spec)
                    if target is not None and target.startswith(CHAIN_PREFIX):
                        found.append((table, chain, spec))
        return tuple(found)

    def owned_lines(self) -> tuple[str, ...]:
        """Everything of ours in the kernel, as `-t TABLE -A CHAIN SPEC` lines (see Ruleset.lines)."""
        out = [f"-t {table} -A {chain} {spec}" for table, chain, spec in self.jumps_into_owned()]
        for table, chain in sorted(self.owned_chains()):
            out += [f"-t {table} -A {chain} {rule}" for rule in self.rules(table, chain)]
        return tuple(out)


class SaveParseError(ValueError):
    """iptables-save printed something this parser does not understand."""


def rule_target(spec: str) -> str | None:
    match = _TARGET.search(spec)
    return match.group(1) if match else None


def parse_save(text: str) -> Saved:
    """Parse `iptables-save` (without -c). Comments and blank lines are skipped; anything else unknown raises."""
    tables: dict[str, SavedTable] = {}
    table: str | None = None
    chains: list[str] = []
    rules: dict[str, list[str]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            if table is not None:
                raise SaveParseError(f"line {number}: table {line[1:]!r} starts before {table!r} was committed")
            table, chains, rules = line[1:], [], {}
        elif table is None:
            raise SaveParseError(f"line {number}: {line!r} outside a table")
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            chains.append(name)
            rules.setdefault(name, [])
        elif line.startswith("-A "):
            parts = line.split(" ", 2)
            if len(parts) < 3:
                raise SaveParseError(f"line {number}: a rule without a body: {line!r}")
            rules.setdefault(parts[1], []).append(parts[2])
        elif line == "COMMIT":
            tables[table] = SavedTable(tuple(chains), MappingProxyType({k: tuple(v) for k, v in rules.items()}))
            table = None
        else:
            raise SaveParseError(f"line {number}: unexpected {line!r}")
    if table is not None:
        raise SaveParseError(f"table {table!r} is not committed (truncated iptables-save output?)")
    return Saved(MappingProxyType(tables))


# --- desired vs actual ------------------------------------------------------------------------------------


def drift(desired: Ruleset, saved: Saved) -> tuple[str, ...]:
    """What differs between `desired` and the kernel, one sentence per problem; empty when they agree.

    Only the ruleset's own chains and the jumps into them are compared; any other NODEAGENT_* chain
    belongs to another ruleset (the node's probe chain is not the pod capture's business).
    """
    problems: list[str] = []
    for (table, chain), rules in sorted(desired.chains.items()):
        if not saved.has_chain(table, chain):
            problems.append(f"{table} chain {chain} is missing")
            continue
        have = saved.rules(table, chain)
        if len(have) != len(rules):
            problems.append(f"{table} chain {chain} has {_rules_word(len(have))}, expected {_rules_word(len(rules))}")
        elif have != rules:
            i = next(i for i, (a, b) in enumerate(zip(have, rules, strict=True)) if a != b)
            problems.append(f"{table} chain {chain} rule {i + 1} is `{have[i]}`, expected `{rules[i]}`")
    present = _present_jumps(desired, saved)
    for jump in desired.jumps:
        count = present.count((jump.table, jump.chain, jump.spec))
        if count == 0:
            problems.append(f"the jump from {jump.table} {jump.chain} to {jump.target} is missing")
        elif count > 1:
            problems.append(f"the jump from {jump.table} {jump.chain} to {jump.target} is there {count} times")
    wanted = {(j.table, j.chain, j.spec) for j in desired.jumps}
    problems += [f"unexpected jump in {t} {c}: {s}" for t, c, s in present if (t, c, s) not in wanted]
    return tuple(problems)


def _rules_word(n: int) -> str:
    return f"{n} rule" if n == 1 else f"{n} rules"


def _present_jumps(desired: Ruleset, saved: Saved) -> list[tuple[str, str, str]]:
    scope = scope_of(desired)
    return [jump for jump in saved.jumps_into_owned() if rule_target(jump[2]) in scope]


def apply_payload(desired: Ruleset, saved: Saved) -> str:
    """The `iptables-restore --noflush` input that turns `saved` into `desired` in one transaction.

    A table whose chains differ gets them declared (which creates or flushes them) and refilled; a
    missing jump is appended; duplicate or foreign jumps into our chains are deleted. Tables that
    already agree are left out, so a kernel that agrees gets an empty payload and is not touched.
    """
    present = _present_jumps(desired, saved)
    out: list[str] = []
    for table in desired.tables:
        chains = {chain: rules for (t, chain), rules in desired.chains.items() if t == table}
        wanted = {(j.chain, j.spec) for j in desired.jumps if j.table == table}
        kept: set[tuple[str, str]] = set()
        deletes: list[tuple[str, str]] = []
        for t, chain, spec in present:
            if t != table:
                continue
            if (chain, spec) in wanted and (chain, spec) not in kept:
                kept.add((chain, spec))
            else:
                deletes.append((chain, spec))
        appends = [j for j in desired.jumps if j.table == table and (j.chain, j.spec) not in kept]
        refill = [c for c, rules in chains.items() if not saved.has_chain(table, c) or saved.rules(table, c) != rules]
        if not (refill or deletes or appends):
            continue
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for chain in refill]
        out += [f"-D {chain} {spec}" for chain, spec in deletes]
        out += [f"-A {j.chain} {j.spec}" for j in appends]
        out += [f"-A {chain} {rule}" for chain in refill for rule in chains[chain]]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def removal_payload(ruleset: Ruleset, saved: Saved) -> str:
    """The `iptables-restore --noflush` input that deletes `ruleset`'s chains and every jump into them.

    Only the chain names matter (not their rules), so this removes whatever version of them the kernel
    has. Empty when none exist, so removing twice does nothing the second time.
    """
    owned_scope = scope_of(ruleset)
    out: list[str] = []
    for table in sorted(saved.tables):
        chains = [c for t, c in saved.owned_chains() if t == table and c in owned_scope]
        jumps = [(c, s) for t, c, s in saved.jumps_into_owned() if t == table and rule_target(s) in owned_scope]
        if not chains and not jumps:
            continue
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for chain in chains]  # flushes them, so -X may delete them
        out += [f"-D {chain} {spec}" for chain, spec in jumps]
        out += [f"-X {chain}" for chain in chains]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def scope_of(ruleset: Ruleset) -> frozenset[str]:
    """The chain names a ruleset owns."""
    return frozenset(chain for _, chain in ruleset.chains)
