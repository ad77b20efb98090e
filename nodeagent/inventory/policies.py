"""Istio AuthorizationPolicy and PeerAuthentication YAML -> nodeagent.policy values (the L4 subset).

Why this module exists: the lab and the tunnel's `--policies FILE` take policies in the shape users
already write for Istio (security.istio.io/v1), and policy.py evaluates plain values. This pure
translator sits between them, with the rules istiod applies when it sends ztunnel L4 policies
(REFERENCE.md, "L4 authorization"):

- scope: no selector in the root namespace -> global; a selector -> workload selector; else namespace;
- `action`: ALLOW (also when missing or null, the API's default) or DENY;
- `from.source`: principals, namespaces, ipBlocks, serviceAccounts and their `not*` forms; `to.operation`:
  ports and notPorts; `when`: the L4 keys source.ip, source.namespace, source.principal, destination.ip,
  destination.port (values and notValues) — istiod's l4WhenAttributes;
- HTTP-only attributes (hosts, methods, paths, requestPrincipals, remoteIpBlocks, and every other `when`
  key, source.serviceAccount included since istiod does not send it to ztunnel): an ALLOW rule using any
  is dropped whole (it can never match at L4, so it must not allow), a DENY rule loses only those parts
  (so it still denies at least as much);
- PeerAuthentication: mtls.mode, portLevelMtls and metadata.creationTimestamp (the oldest policy wins a
  conflict; policy.py); a document without a timestamp sorts as the oldest, so in a file whose
  policies carry none the name decides;
- left out, as istiod leaves them out of ztunnel's policies, with the reason in `notes` (`not_enforced`):
  an AuthorizationPolicy with action CUSTOM or AUDIT (enforced by an ext-authz provider or only logged,
  by a waypoint or sidecar — never by ztunnel; taken as ALLOW it would deny its whole scope), one
  annotated `istio.io/dry-run` true (Go's ParseBool spellings; an unparsable value is enforced, as
  istiod does, with a note), and one with `targetRef`/`targetRefs` (a waypoint's or gateway's: it would
  otherwise bind a whole namespace, or the mesh);
- an empty list or null is an unset field (the API is protobuf): `methods: []` is not an HTTP attribute.

A document of another kind is an error rather than silently ignored, so a typo cannot disable a policy.

What it deliberately does not do: no file watching (the caller reloads), no Kubernetes API, no
evaluation (policy.py); only `load_policies` logs (the notes), the rest is pure.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml

from nodeagent.policy import (
    DEFAULT_ROOT_NAMESPACE,
    Action,
    Clause,
    IPNetwork,
    Match,
    MtlsMode,
    PeerAuthentication,
    Policy,
    PolicySet,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)

_HTTP_SOURCE = {"requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks"}
_HTTP_OPERATION = {"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"}
_L4_SOURCE = {
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "serviceAccounts",
    "notServiceAccounts",
}
_L4_WHEN = {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
_ENFORCED_ACTIONS = {"ALLOW", "DENY"}
_IGNORED_ACTIONS = {"CUSTOM", "AUDIT"}
DRY_RUN_ANNOTATION = "istio.io/dry-run"
# Go's strconv.ParseBool, which istiod applies to the dry-run annotation.
_GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}

log = logging.getLogger(__name__)


class PolicyError(ValueError):
    """A policy document that cannot be translated; the message names the document and the field."""


def load_policies(path: str | Path, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> PolicySet:
    """Read a YAML file of AuthorizationPolicy / PeerAuthentication documents (`---` separated); documents
    left out (see `not_enforced`) are logged with the reason, as warnings."""
    try:
        text = Path(path).read_text()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: {exc}") from None
    notes: list[str] = []
    try:
        policies = parse_policies(docs, root_namespace, notes)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    for note in notes:
        log.warning("%s: %s", path, note)
    return policies


def parse_policies(
    docs: list[Any], root_namespace: str = DEFAULT_ROOT_NAMESPACE, notes: list[str] | None = None
) -> PolicySet:
    """Translate parsed YAML documents (pure). Why a document was left out, or read with a caveat, is
    appended to `notes` ("AuthorizationPolicy ns/name: ...")."""
    authz: list[Policy] = []
    peer: list[PeerAuthentication] = []
    for index, doc in enumerate(docs):
        where = f"document {index + 1}"
        if not isinstance(doc, Mapping):
            raise PolicyError(f"{where}: expected a mapping, got {type(doc).__name__}")
        kind = doc.get("kind")
        meta = _mapping(doc.get("metadata"), f"{where}.metadata")
        name, namespace = meta.get("name"), meta.get("namespace")
        if not isinstance(name, str) or not isinstance(namespace, str) or not name or not namespace:
            raise PolicyError(f"{where}: metadata.name and metadata.namespace are required strings")
        where = f"{kind} {namespace}/{name}"
        spec = _mapping(doc.get("spec", {}), f"{where}.spec")
        if kind == "AuthorizationPolicy":
            skipped = not_enforced(meta, spec, where)
            if skipped is not None:
                if notes is not None:
                    notes.append(f"{where}: {skipped}")
                continue
            caveat = _dry_run_caveat(meta, where)
            if caveat is not None and notes is not None:
                notes.append(f"{where}: {caveat}")
            authz.append(_authorization(name, namespace, spec, root_namespace, where))
        elif kind == "PeerAuthentication":
            created = creation_time(meta, where)
            peer.append(_peer_authentication(name, namespace, spec, where, created))
        else:
            raise PolicyError(f"{where}: unsupported kind {kind!r}; expected AuthorizationPolicy or PeerAuthentication")
    return PolicySet(tuple(authz), tuple(peer), root_namespace)


def not_enforced(meta: Mapping[str, Any], spec: Mapping[str, Any], where: str) -> str | None:
    """Why the node tunnel enforces nothing of this AuthorizationPolicy (None: it enforces it), as istiod
    sends ztunnel nothing for it: dry-run, action CUSTOM or AUDIT, or a targetRef binding."""
    if _dry_run(meta, where):
        return f"annotated {DRY_RUN_ANNOTATION}; a dry-run policy is not enforced (ignored)"
    action = spec.get("action")
    if isinstance(action, str) and action in _IGNORED_ACTIONS:
        return (
            f"action {action} is not enforced by the node tunnel (istiod sends ztunnel ALLOW and DENY policies "
            "only; CUSTOM and AUDIT take effect in a waypoint or sidecar); ignored"
        )
    if bound_to_target(spec):
        return "bound with targetRef(s) to a waypoint or gateway; not enforced at L4 (ignored)"
    return None


def _dry_run_caveat(meta: Mapping[str, Any], where: str) -> str | None:
    """A note when the dry-run annotation is set but not a boolean: the policy is enforced, as istiod does."""
    if _dry_run(meta, where) is None:
        value = _mapping(meta.get("annotations"), f"{where}.metadata.annotations").get(DRY_RUN_ANNOTATION)
        return f"annotation {DRY_RUN_ANNOTATION}: {value!r} is not a boolean (true/false); the policy is enforced"
    return None


def _dry_run(meta: Mapping[str, Any], where: str) -> bool | None:
    """The dry-run annotation read as istiod reads it (absent or empty: False); None when unparsable."""
    value = _mapping(meta.get("annotations"), f"{where}.metadata.annotations").get(DRY_RUN_ANNOTATION)
    if value is None or value == "":
        return False
    if isinstance(value, bool):  # an unquoted YAML true in a local file
        return value
    return _GO_BOOLS.get(str(value)) if isinstance(value, str | int) else None


def creation_time(meta: Mapping[str, Any], where: str) -> datetime | None:
    """metadata.creationTimestamp (RFC 3339; YAML may already have made it a datetime), in UTC when it names
    no zone; None when absent."""
    value = meta.get("creationTimestamp")
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise PolicyError(f"{where}: metadata.creationTimestamp {value!r} is not an RFC 3339 time") from None
    elif isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise PolicyError(f"{where}: metadata.creationTimestamp must be an RFC 3339 time")
    return value if value.utcoffset() is not None else value.replace(tzinfo=UTC)


def bound_to_target(spec: Mapping[str, Any]) -> bool:
    """An AuthorizationPolicy spec bound with targetRef(s) to a waypoint or a gateway (not the node tunnel's);
    an empty `targetRefs: []` or a null `targetRef` binds nothing, as in the API's protobuf."""
    return bool(_set(spec) & {"targetRef", "targetRefs"})


def _set(fields: Mapping[str, Any]) -> set[str]:
    """The fields that carry a value: null and empty lists or mappings are unset, as in the API's protobuf."""
    return {k for k, v in fields.items() if v is not None and not (isinstance(v, list | dict) and not v)}


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PolicyError(f"{where}: expected a mapping")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"{where}: expected a list")
    return value


def _strings(value: Any, where: str) -> list[str]:
    items = _list(value, where)
    if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in items):
        raise PolicyError(f"{where}: expected a list of strings")
    return [str(v) for v in items]


def _selector(spec: Mapping[str, Any], where: str) -> dict[str, str]:
    labels = _mapping(_mapping(spec.get("selector"), f"{where}.selector").get("matchLabels"), f"{where}.selector")
    return {str(k): str(v) for k, v in labels.items()}


def _authorization(name: str, namespace: str, spec: Mapping[str, Any], root: str, where: str) -> Policy:
    action_text = spec.get("action")
    if action_text is None:
        action_text = "ALLOW"  # the API's default, for a missing and a null action alike
    if not isinstance(action_text, str) or action_text not in _ENFORCED_ACTIONS:
        raise PolicyError(f"{where}: action {action_text!r} is not one of ALLOW, DENY, CUSTOM, AUDIT")
    action = Action(action_text)
    selector = _selector(spec, where)
    scope = Scope.WORKLOAD_SELECTOR if selector else Scope.GLOBAL if namespace == root else Scope.NAMESPACE
    rules: list[Rule] = []
    for i, raw in enumerate(_list(spec.get("rules"), f"{where}.rules")):
        rule = _rule(_mapping(raw, f"{where}.rules[{i}]"), namespace, action, f"{where}.rules[{i}]")
        if rule is not None:
            rules.append(rule)
    return Policy(name, namespace, action, scope, tuple(rules), selector)


def _rule(raw: Mapping[str, Any], namespace: str, action: Action, where: str) -> Rule | None:
    """None when an ALLOW rule uses HTTP attributes (dropped whole)."""
    http = False
    clauses: list[Clause] = []
    froms = _list(raw.get("from"), f"{where}.from")
    if froms:
        groups = []
        for j, entry in enumerate(froms):
            source = _mapping(_mapping(entry, f"{where}.from[{j}]").get("source"), f"{where}.from[{j}].source")
            unknown = set(source) - _L4_SOURCE - _HTTP_SOURCE
            if unknown:
                raise PolicyError(f"{where}.from[{j}].source: unknown fields {sorted(unknown)}")
            http |= bool(_set(source) & _HTTP_SOURCE)
            if _set(source) & _HTTP_SOURCE and not _set(source) & _L4_SOURCE:
                continue  # only HTTP parts: dropped (for DENY; an ALLOW rule is dropped whole below)
            groups.append(_source_match(source, namespace, f"{where}.from[{j}].source"))
        if groups:
            clauses.append(Clause(tuple(groups)))
    tos = _list(raw.get("to"), f"{where}.to")
    if tos:
        groups = []
        for j, entry in enumerate(tos):
            op = _mapping(_mapping(entry, f"{where}.to[{j}]").get("operation"), f"{where}.to[{j}].operation")
            unknown = set(op) - _HTTP_OPERATION - {"ports", "notPorts"}
            if unknown:
                raise PolicyError(f"{where}.to[{j}].operation: unknown fields {sorted(unknown)}")
            http |= bool(_set(op) & _HTTP_OPERATION)
            if _set(op) & _HTTP_OPERATION and not _set(op) & {"ports", "notPorts"}:
                continue
            groups.append(
                Match(
                    destination_ports=_ports(op.get("ports"), f"{where}.to[{j}].operation.ports"),
                    not_destination_ports=_ports(op.get("notPorts"), f"{where}.to[{j}].operation.notPorts"),
                )
            )
        if groups:
            clauses.append(Clause(tuple(groups)))
    for j, raw_cond in enumerate(_list(raw.get("when"), f"{where}.when")):
        cond = _mapping(raw_cond, f"{where}.when[{j}]")
        key = cond.get("key")
        if not isinstance(key, str):
            raise PolicyError(f"{where}.when[{j}]: key is required")
        if key not in _L4_WHEN:
            http = True  # request.*, connection.sni, ...: not evaluable at L4
            continue
        values = _strings(cond.get("values"), f"{where}.when[{j}].values")
        not_values = _strings(cond.get("notValues"), f"{where}.when[{j}].notValues")
        clauses.append(Clause((_when_match(key, values, not_values, f"{where}.when[{j}]"),)))
    if http and action is Action.ALLOW:
        return None
    # A DENY rule that had only HTTP parts keeps no clauses: it matches everything, like Istio's.
    return Rule(tuple(clauses))


def _source_match(source: Mapping[str, Any], namespace: str, where: str) -> Match:
    def patterns(field: str) -> tuple[StringMatch, ...]:
        return tuple(StringMatch.parse(p) for p in _strings(source.get(field), f"{where}.{field}"))

    def accounts(field: str) -> tuple[ServiceAccountMatch, ...]:
        return tuple(ServiceAccountMatch.parse(a, namespace) for a in _strings(source.get(field), f"{where}.{field}"))

    return Match(
        principals=patterns("principals"),
        not_principals=patterns("notPrincipals"),
        namespaces=patterns("namespaces"),
        not_namespaces=patterns("notNamespaces"),
        source_ips=_networks(source.get("ipBlocks"), f"{where}.ipBlocks"),
        not_source_ips=_networks(source.get("notIpBlocks"), f"{where}.notIpBlocks"),
        service_accounts=accounts("serviceAccounts"),
        not_service_accounts=accounts("notServiceAccounts"),
    )


def _when_match(key: str, values: list[str], not_values: list[str], where: str) -> Match:
    if key == "source.ip":
        return Match(source_ips=_networks(values, where), not_source_ips=_networks(not_values, where))
    if key == "destination.ip":
        return Match(destination_ips=_networks(values, where), not_destination_ips=_networks(not_values, where))
    if key == "destination.port":
        return Match(destination_ports=_ports(values, where), not_destination_ports=_ports(not_values, where))
    positive, negative = tuple(map(StringMatch.parse, values)), tuple(map(StringMatch.parse, not_values))
    if key == "source.principal":
        return Match(principals=positive, not_principals=negative)
    return Match(namespaces=positive, not_namespaces=negative)


def _networks(value: Any, where: str) -> tuple[IPNetwork, ...]:
    out = []
    for text in _strings(value, where):
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise PolicyError(f"{where}: {text!r} is not an IP address or CIDR block") from None
    return tuple(out)


def _ports(value: Any, where: str) -> tuple[int, ...]:
    out = []
    for text in _strings(value, where):
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise PolicyError(f"{where}: {text!r} is not a port number")
        out.append(int(text))
    return tuple(out)


def _peer_authentication(
    name: str, namespace: str, spec: Mapping[str, Any], where: str, created: datetime | None = None
) -> PeerAuthentication:
    def mode(value: Any, at: str) -> MtlsMode:
        text = _mapping(value, at).get("mode", "UNSET")
        try:
            return MtlsMode(text)
        except ValueError:
            raise PolicyError(f"{at}.mode: {text!r} is not one of UNSET, STRICT, PERMISSIVE, DISABLE") from None

    ports = {}
    for port, value in _mapping(spec.get("portLevelMtls"), f"{where}.portLevelMtls").items():
        number = _ports([port], f"{where}.portLevelMtls")[0]
        ports[number] = mode(value, f"{where}.portLevelMtls.{port}")
    return PeerAuthentication(
        name, namespace, mode(spec.get("mtls"), f"{where}.mtls"), _selector(spec, where), ports, created=created
    )
