/* connect6.c - cgroup/connect6 on the pod's cgroup: IPv4 reached through an IPv6 socket goes to :15001 too.
 *
 * An AF_INET6 socket may connect to an IPv4 address written as ::ffff:a.b.c.d (an IPv4-mapped address:
 * Java's and .NET's dual-mode sockets do it for every IPv4 destination). The kernel then runs only this
 * hook, never connect4, and sends plain IPv4 - so without it such a connection would leave the pod
 * around the tunnel: plaintext, no identity, no policy, while the pod counts as captured. For a mapped
 * destination this program makes exactly connect4's decision (na_capture_connect() in nodeagent.h, the
 * same skips, the same cookie-keyed original destination for sockops) and rewrites the destination to
 * the mapped form of the tunnel's listener, ::ffff:<pod IP>:15001; the SYN is IPv4 and reaches the
 * tunnel's IPv4 listener, whose peer address is the app's IPv4 source as with connect4.
 *
 * Left alone: every destination outside ::ffff:0:0/96. Native IPv6 outbound is not captured (the pods
 * have IPv4 addresses; capturing it means an IPv6 listener, map keys and tunnel support, out of scope
 * here), and inbound IPv6 is refused by sk_lookup.c, so nothing reaches the app around the tunnel.
 */
#include "nodeagent.h"

int na_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != NA_BE32(0x0000ffff))
        return 1;
    __u32 to = na_capture_connect(ctx, ctx->user_ip6[3], (__u16)ctx->user_port);
    if (to) {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = NA_BE32(0x0000ffff);
        ctx->user_ip6[3] = to;
        ctx->user_port = NA_BE16(NA_OUTBOUND_PORT);
        na_count(NA_STAT_OUT_MAPPED);
    }
    return 1;
}
