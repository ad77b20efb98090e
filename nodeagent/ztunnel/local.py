"""Same-node fast path: a connection between two pods this tunnel serves skips HBONE, the kernel moves it.

Why this module exists: when the destination pod of an outbound connection is served by this very
tunnel, HBONE would encrypt the bytes in this process only to decrypt them again in this process (its own
:15008 listener), costing two TLS passes and two trips of every byte through Python. The tunnel already
holds both pods' certificates, so it knows both identities without a handshake. Like ztunnel's node-local
fast path (src/proxy/outbound.rs, RequestType::DirectLocal: the outbound side hands the captured stream
to the inbound handler, which runs the RBAC check with the source workload's identity and records both
the source- and the destination-reported connection, connection_security_policy=mutual_tls), the outbound
side here keeps every promise of the inbound side and only drops the tunnel-to-itself hop:

- authorization is the inbound decision (`inbound.authorize`, Istio L4 semantics, PeerAuthentication
  included) with the *source workload's identity* as the peer; a denial resets the captured connection;
- without a valid certificate for either identity the connection is refused, as HBONE would be;
- the application is connected from the destination pod's netns with the client pod's IP as source
  (the socket factory's transparent upstream, exactly as inbound.py does for HBONE);
- both connections are reported (an outbound record, reporter=source, and an inbound record,
  reporter=destination, both mutual_tls as in ztunnel), listed in /config_dump with an empty HBONE
  address, logged once each, and the inbound one carries its policy view, so a DENY policy added while
  it is open closes it (the tunnel's `refresh`, within its watch interval).

Why splice (nodeagent.ztunnel.relay.SpliceRelay) and not sockmap, measured on the 2-vCPU reference VM
(iperf3, bench topology, mesh/client -> mesh/local vs plain/client -> plain/local, eBPF capture): the
event loop issuing splice(2) through a 1 MiB pipe per direction moved one stream at 1.00-1.13x direct TCP
(5 s runs; direct TCP crosses two veths and a bridge, the fast path two loopback-local connections), with
the tunnel at ~40% of one CPU, almost all of it the kernel's TCP transmit (perf: Python below 2%); HBONE
to itself did 0.13-0.22x. The sk_skb verdict that redirects each skb to the peer socket's egress
(programs/fastpath.c via nodeagent.ebpf.maps.fastpath_splice, bench/ebpf_fastpath.py) reached only
0.28-0.68x against 0.68-1.07x for splice in the same runs: it re-enters TCP's send path per skb and cannot
coalesce, and a socket in the SOCKHASH reads EOF ambiguously, so half-close needs poll(POLLRDHUP)
bookkeeping on the side. With splice the payload never enters user space either (pages go socket -> pipe
-> socket; Python only sees readiness events), half-close and resets keep TCP's own semantics, byte
counts come for free, and no BPF is needed, so the path is the same under both capture backends: nothing
in it depends on how the connection was captured, and policy enforcement must not differ between them.
Known limit: one loop thread splices every connection, so 4 parallel streams reached ~0.55x direct TCP
(which spreads over both CPUs); `make bench` reports both.

What it deliberately does not do: no routing (routing.py decided HBONE; this only notices that the HBONE
peer would be ourselves), no policy logic (policy.py via inbound.authorize), no relaying code of its own
(relay.py), no listeners. A destination served by another tunnel process (during a hand-over, the pod
still being bound) takes the HBONE path.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from nodeagent.model import SocketAddress
from nodeagent.ztunnel import sockets
from nodeagent.ztunnel.certs import CertUnavailable
from nodeagent.ztunnel.edges import LocalPod
from nodeagent.ztunnel.inbound import (
    ProxyDeps,
    Refuse,
    _track,
    authorize,
    finish_when_done,
    reauthorize,
    reset_socket,
)
from nodeagent.ztunnel.metrics import ConnectionRecord, Direction, Flags, Peer
from nodeagent.ztunnel.relay import SpliceRelay
from nodeagent.ztunnel.routing import Denial, Hbone, OutboundPlan, Workload, inbound_service

log = logging.getLogger(__name__)

ServedPod = Callable[[str], LocalPod | None]  # pod uid -> the local pod this tunnel serves, if it does


def same_node_destination(
    plan: OutboundPlan | Denial, destination: Workload | None, served: ServedPod
) -> LocalPod | None:
    """The pod to deliver `plan` to in this process, or None to carry the plan out as planned (pure).

    Only HBONE plans qualify (passthrough and denials keep their paths), and only when the destination
    pod is one this tunnel serves under the identity the plan expects: a mismatch (a stale view, a pod
    re-created under another service account) takes HBONE, whose peer check then decides.
    """
    if not isinstance(plan, Hbone) or destination is None or destination.pod.ip != plan.target.ip:
        return None
    local = served(destination.pod.uid)
    if local is None or local.identity != plan.expected_identity:
        return None
    return local


class SameNodePath:
    """Carries out same-node deliveries for the outbound side (see the module docstring)."""

    def __init__(self, deps: ProxyDeps, served: ServedPod) -> None:
        self._deps = deps
        self._served = served

    def destination(self, plan: OutboundPlan | Denial, destination: Workload | None) -> LocalPod | None:
        return same_node_destination(plan, destination, self._served)

    async def deliver(
        self, sock: socket.socket, client: SocketAddress, plan: Hbone, dest: LocalPod, outbound: ConnectionRecord
    ) -> None:
        """Authorize, connect to the app in `dest` from the client's IP, and splice. `outbound` is pending;
        it (and the inbound record opened here) is finished when refused or when the relay ends; only a
        cancellation while connecting leaves `outbound` to the caller."""
        deps = self._deps
        view = deps.state.view
        outbound.hbone_addr = ""  # not through any :15008
        inbound = ConnectionRecord(
            Direction.INBOUND,
            src_addr=outbound.src_addr,
            dst_addr=str(plan.target),
            src=outbound.src,
            dst=Peer.of(view.pod_of(dest), dest.identity, view.cluster),
            service=inbound_service(view.routing, plan.target, told=plan.service),
            mutual_tls=True,
        )
        deps.table.pending(inbound)
        records = (outbound, inbound)

        def refuse(reason: str, out_flags: Flags, in_flags: Flags) -> None:
            reset_socket(sock)
            deps.table.finished(outbound, 0, 0, reason, out_flags)
            deps.table.finished(inbound, 0, 0, reason, in_flags)

        try:
            # Fail closed like HBONE: no handshake without a valid certificate for either end.
            deps.contexts.context(plan.source_identity, server_side=False)
            deps.contexts.context(dest.identity, server_side=True)
        except CertUnavailable as exc:
            log.info("same-node %s -> %s refused: %s", client, plan.target, exc)
            refuse(str(exc), Flags.UPSTREAM_FAILURE, Flags.UPSTREAM_FAILURE)
            return
        decision = authorize(view, dest, client.ip, plan.target, plan.source_identity)
        if isinstance(decision, Refuse):
            log.info("same-node %s -> %s refused (%d): %s", client, plan.target, decision.status, decision.reason)
            refuse(decision.reason, Flags.DENIED if decision.status == 401 else Flags.UPSTREAM_FAILURE, decision.flags)
            return
        try:
            upstream = deps.socket_factory.upstream(dest, plan.target, client.ip)
            upstream = await sockets.connect(upstream, plan.target, connect_timeout=deps.connect_timeout)
        except OSError as exc:
            refuse(str(exc), Flags.UPSTREAM_FAILURE, Flags.UPSTREAM_FAILURE)
            return
        except asyncio.CancelledError:
            deps.table.finished(inbound, 0, 0, "cancelled", Flags.DOWNSTREAM_CLOSED)
            raise  # the caller resets the captured socket and finishes `outbound`
        decision = reauthorize(
            deps, view, decision, lambda now: authorize(now, dest, client.ip, plan.target, plan.source_identity)
        )
        if isinstance(decision, Refuse):
            upstream.close()
            refuse(decision.reason, Flags.DENIED if decision.status == 401 else Flags.UPSTREAM_FAILURE, decision.flags)
            return
        relay = SpliceRelay(sock, upstream)
        inbound.policy_view = decision.connection
        for record in records:  # one relay, two records: closing either (policy, drain) closes both
            _track(record, relay)
            deps.table.established(record)
            finish_when_done(deps.table, record, relay)
