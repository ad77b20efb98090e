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
 * braces, like the iptables mode's mark rule). The decision is na_capture_connect() in nodeagent.h,
 * which connect6.c applies to IPv6 sockets connecting to IPv4-mapped addresses (they never run this
 * hook).
 */
#include "nodeagent.h"

int na_connect4(struct bpf_sock_addr *ctx)
{
    __u32 to = na_capture_connect(ctx, ctx->user_ip4, (__u16)ctx->user_port);
    if (to) {
        ctx->user_ip4 = to;
        ctx->user_port = NA_BE16(NA_OUTBOUND_PORT);
    }
    return 1;
}
