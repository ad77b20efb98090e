/* sk_lookup.c - sk_lookup on the pod's netns: inbound plaintext TCP goes to the tunnel's :15006 listener.
 *
 * Runs when a SYN finds no established socket, before the listener lookup, so it costs nothing per
 * packet and NATs nothing: the tunnel accepts a socket whose local address IS the original destination.
 * The listener is the one the tunnel put in na_listener; when there is none (no tunnel, or it died) the
 * SYN is refused (SK_DROP -> RST): fail closed, never a plaintext path to the app.
 *
 * Left alone: non-TCP, HBONE on NA_HBONE_PORT, 127.0.0.0/8, kubelet probes from NA_PROBE_SRC4, and
 * connections from the pod's own address (the pod calling itself, the app's captured connect to :15001,
 * the tunnel's own connection to the app). Measured on 6.18: a SYN the pod sends to its own IP reports
 * ingress_ifindex = eth0's (inet_iif of a local output route), not lo's, so the interface cannot tell
 * local from remote; the source address can. Nor can it see socket marks, so the tunnel's connections
 * to the app from the client's IP (IP_TRANSPARENT) are announced by the tunnel in na_bypass.
 *
 * IPv6 is not captured, so it must not reach the app around the tunnel either: the pod's interface has a
 * link-local address wherever the kernel has IPv6, and an app listening on :: took plaintext from any
 * neighbour on the node's bridge (measured in the lab). A new IPv6 TCP connection is refused (RST) unless
 * the pod is talking to itself (::1, or from the very address it connects to); the pod's own outbound
 * IPv6 connections are untouched (their replies find an established socket and never come here).
 */
#include "nodeagent.h"

static __always_inline int na_refuse_ip6(struct bpf_sk_lookup *ctx)
{
    int self = ctx->remote_ip6[0] == ctx->local_ip6[0] && ctx->remote_ip6[1] == ctx->local_ip6[1] &&
               ctx->remote_ip6[2] == ctx->local_ip6[2] && ctx->remote_ip6[3] == ctx->local_ip6[3];
    int loopback = !ctx->local_ip6[0] && !ctx->local_ip6[1] && !ctx->local_ip6[2] && ctx->local_ip6[3] == NA_BE32(1);
    if (self || loopback)
        return SK_PASS;
    na_count(NA_STAT_IN6_REFUSED);
    return SK_DROP;
}

int na_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    if (ctx->family == AF_INET6)
        return na_refuse_ip6(ctx);
    if (ctx->family != AF_INET)
        return SK_PASS;
    __u32 pod_ip = na_pod_ip4();
    if (ctx->local_port == NA_HBONE_PORT || NA_LOOPBACK_NET(ctx->local_ip4) || NA_LOOPBACK_NET(ctx->remote_ip4) ||
        ctx->remote_ip4 == ctx->local_ip4 || (pod_ip && ctx->remote_ip4 == pod_ip) ||
        ctx->remote_ip4 == NA_BE32(NA_PROBE_SRC4))
        return SK_PASS;
    struct na_addr4 from = {.ip = ctx->remote_ip4, .port = (__u16)ctx->remote_port, .pad = 0};
    if (na_bypass.lookup(&from)) {
        na_count(NA_STAT_IN_BYPASSED);
        return SK_PASS;
    }
    int zero = 0;
    struct bpf_sock *sk = (struct bpf_sock *)na_listener.lookup(&zero);
    if (!sk) {
        na_count(NA_STAT_IN_REFUSED);
        return SK_DROP;
    }
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        na_count(NA_STAT_IN_REFUSED);
        return SK_DROP;
    }
    na_count(NA_STAT_IN_STEERED);
    return SK_PASS;
}
