"""Policy routing in a pod's netns, so replies to the tunnel's spoofed connections reach the tunnel.

Why this module exists: the tunnel connects to the app from the client's real IP (IP_TRANSPARENT); the
app's replies carry connmark 0x111, restored as the packet mark by the mangle rules, and

    ip rule  add fwmark 0x111/0xfff lookup 100 pref 32764
    ip route add local 0.0.0.0/0 dev lo table 100

deliver them locally to the tunnel's transparent socket instead of routing them out of eth0. This is the
one module that imports pyroute2 (DESIGN.md). Every function is blocking and runs its netlink socket on a
short-lived thread inside the pod's netns (nodeagent.netns.in_netns), so call it via asyncio.to_thread.

What it deliberately does not do: no IPv6 rules, no other tables, and it never deletes a rule or route it
did not create: only rules matching fwmark 0x111/0xfff -> table 100 and the local default route of
table 100 are ever touched.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodeagent.capture.backend import CaptureError
from nodeagent.capture.rules import CAPTURE_MARK, MARK_MASK
from nodeagent.netns import NetnsError, in_netns

ROUTE_TABLE = 100
RULE_PRIORITY = 32764  # before `main` (32766)
_RTN_LOCAL = 2
_RULE = {"fwmark": CAPTURE_MARK, "fwmask": MARK_MASK, "table": ROUTE_TABLE}


@dataclass(frozen=True, slots=True)
class RoutingState:
    rules: int  # how many `fwmark 0x111/0xfff lookup 100` rules exist
    local_route: bool  # `local 0.0.0.0/0 dev lo table 100`

    def objects(self) -> tuple[str, ...]:
        rule = f"ip rule fwmark {CAPTURE_MARK:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE} pref {RULE_PRIORITY}"
        route = f"ip route local 0.0.0.0/0 dev lo table {ROUTE_TABLE}"
        return (*([rule] * self.rules), *([route] if self.local_route else []))

    def drift(self) -> tuple[str, ...]:
        problems = []
        if self.rules == 0:
            problems.append(f"the ip rule fwmark {CAPTURE_MARK:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE} is missing")
        elif self.rules > 1:
            problems.append(f"the ip rule fwmark {CAPTURE_MARK:#x}/{MARK_MASK:#x} is there {self.rules} times")
        if not self.local_route:
            problems.append(f"the local default route of table {ROUTE_TABLE} is missing")
        return tuple(problems)


def _ours(rule: Any) -> bool:
    return bool(
        rule.get("FRA_FWMARK") == CAPTURE_MARK
        and rule.get("FRA_FWMASK") == MARK_MASK
        and rule.get("FRA_TABLE", rule["table"]) == ROUTE_TABLE
    )


def _local_default(route: Any) -> bool:
    return bool(route["type"] == _RTN_LOCAL and route["dst_len"] == 0 and route.get("RTA_TABLE") == ROUTE_TABLE)


def _read(ipr: IPRoute) -> tuple[list[Any], list[Any]]:
    rules = [r for r in ipr.rule("dump", family=socket.AF_INET) if _ours(r)]
    routes = [r for r in ipr.route("dump", family=socket.AF_INET, table=ROUTE_TABLE) if _local_default(r)]
    return rules, routes


def _in(netns: str, what: str, fn: Any) -> Any:
    def work() -> Any:
        with IPRoute(groups=0) as ipr:
            return fn(ipr)

    try:
        return in_netns(netns, work)
    except NetnsError as exc:
        raise CaptureError(f"cannot {what} in {netns}: {exc.strerror} (was the pod deleted?)") from None
    except NetlinkError as exc:
        raise CaptureError(f"cannot {what} in {netns}: netlink error {exc.code} ({exc})") from None


def read(netns: str) -> RoutingState:
    def work(ipr: IPRoute) -> RoutingState:
        rules, routes = _read(ipr)
        return RoutingState(rules=len(rules), local_route=bool(routes))

    result: RoutingState = _in(netns, "read the policy routing", work)
    return result


def ensure(netns: str) -> tuple[str, ...]:
    """Exactly one rule and the route; returns the drift repaired (empty: the kernel already agreed)."""

    def work(ipr: IPRoute) -> tuple[str, ...]:
        rules, routes = _read(ipr)
        problems = RoutingState(len(rules), bool(routes)).drift()
        for extra in rules[1:]:
            ipr.rule("del", family=socket.AF_INET, priority=extra.get("FRA_PRIORITY"), **_RULE)
        if not rules:
            ipr.rule("add", family=socket.AF_INET, priority=RULE_PRIORITY, **_RULE)
        if not routes:
            lo = ipr.link_lookup(ifname="lo")
            if not lo:
                raise CaptureError(f"{netns} has no loopback interface")
            try:
                ipr.route("add", dst="0.0.0.0/0", type="local", oif=lo[0], table=ROUTE_TABLE, scope="host")
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:  # a route of another type there is not ours to replace
                    raise
        return problems

    result: tuple[str, ...] = _in(netns, "install the policy routing", work)
    return result


def remove(netns: str) -> bool:
    """Delete our rules and route; False when there was nothing to delete."""

    def work(ipr: IPRoute) -> bool:
        rules, routes = _read(ipr)
        for rule in rules:
            ipr.rule("del", family=socket.AF_INET, priority=rule.get("FRA_PRIORITY"), **_RULE)
        for route in routes:
            ipr.route("del", dst="0.0.0.0/0", type="local", oif=route.get("RTA_OIF"), table=ROUTE_TABLE, scope="host")
        return bool(rules or routes)

    result: bool = _in(netns, "remove the policy routing", work)
    return result
