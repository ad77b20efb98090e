/* connect4.c - cgroup/connect4 on the pod's cgroup: the pod's outbound TCP goes to the tunnel's :15001.
 *
 * Runs inside connect(2) for every IPv4 socket of a process in the pod's cgroup, before the route
 * lookup, so rewriting user_ip4/user_port sends the SYN straight to the tunnel's listener in the pod's
 * netns: no NAT, no conntrack, and with no tunnel listening the connect is refused (fail closed). The
 * original destination is recorded by socket cookie; sockops re-keys it by source address once the
 * kernel has picked the source port.
 *
 * Not rewritten: non-TCP sockets, 127.0.0.0/8, the pod's own IP, the tunnel ports (loop prevention)
 * and sockets carrying the tunnel's mark (the tunnel is not in the pod's cgroup; this is belt and
 * braces, like the iptables mode's mark rule).
 */
#include "nodeagent.h"

int na_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != NA_SOCK_STREAM || (ctx->protocol != IPPROTO_TCP && ctx->protocol != 0))
        return 1;
    __u32 dst = ctx->user_ip4;
    __u16 port = (__u16)ctx->user_port;
    __u16 hport = NA_BE16(port);
    __u32 pod_ip = na_pod_ip4();
    if (NA_LOOPBACK_NET(dst) || dst == pod_ip || dst == 0 ||
        hport == NA_OUTBOUND_PORT || hport == NA_INBOUND_PORT || hport == NA_HBONE_PORT) {
        na_count(NA_STAT_OUT_SKIPPED);
        return 1;
    }
    struct bpf_sock *sk = ctx->sk;
    if (sk && (sk->mark & NA_MARK_MASK) == NA_TUNNEL_MARK) {
        na_count(NA_STAT_OUT_SKIPPED);
        return 1;
    }
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct na_orig orig = {.ip = dst, .port = port, .flags = 0, .cookie = cookie};
    na_cookie_dst.update(&cookie, &orig);
    /* To the pod's own IP when known (the tunnel then sees the same peer address as with iptables'
     * REDIRECT: pod IP, app's port), else loopback. */
    ctx->user_ip4 = pod_ip ? pod_ip : NA_BE32(0x7f000001);
    ctx->user_port = NA_BE16(NA_OUTBOUND_PORT);
    na_count(NA_STAT_OUT_REDIRECTED);
    return 1;
}
