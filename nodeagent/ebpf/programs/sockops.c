/* sockops.c - sock_ops on the pod's cgroup: key each captured connect by its source address.
 *
 * TCP_CONNECT_CB runs in connect(2) after the source port is chosen and before the SYN leaves, so the
 * entry exists before the tunnel can accept: na_orig_dst[(src ip, src port)] = original destination,
 * which the tunnel looks up with the accepted socket's peer address. The entry is deleted when the
 * app's socket closes (STATE_CB, TCP_CLOSE); the LRU bounds it otherwise.
 *
 * PASSIVE_ESTABLISHED_CB (the app accepted a connection): a na_bypass entry for the peer is used up
 * (the tunnel's connection from the client's IP has reached the app), so it is deleted at once - a later
 * SYN from the same address and port is captured again.
 *
 * IPv4 only, which includes AF_INET6 sockets talking IPv4 (IPv4-mapped peer, ::ffff:0:0/96): an app's
 * dual-stack socket captured by connect6, or accepted on a [::] listener. The kernel keeps their IPv4
 * addresses where local_ip4/remote_ip4 read them, as for AF_INET sockets.
 */
#include "nodeagent.h"

static __always_inline int na_ipv4(struct bpf_sock_ops *skops)
{
    if (skops->family == AF_INET)
        return 1;
    return skops->family == AF_INET6 && skops->remote_ip6[0] == 0 && skops->remote_ip6[1] == 0 &&
           skops->remote_ip6[2] == NA_BE32(0x0000ffff);
}

int na_sockops(struct bpf_sock_ops *skops)
{
    if (!na_ipv4(skops))
        return 1;
    switch (skops->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB: {
        __u64 cookie = bpf_get_socket_cookie(skops);
        struct na_orig *orig = na_cookie_dst.lookup(&cookie);
        if (!orig)
            break;
        struct na_orig keyed = *orig;
        keyed.flags |= NA_ORIG_CONNECTED;
        struct na_addr4 src = {.ip = skops->local_ip4, .port = NA_BE16(skops->local_port), .pad = 0};
        na_orig_dst.update(&src, &keyed);
        na_cookie_dst.delete(&cookie);
        bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
        na_count(NA_STAT_OUT_KEYED);
        break;
    }
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: {
        /* sock_ops gives remote_port as the network-order port shifted into the upper 16 bits */
        struct na_addr4 peer = {.ip = skops->remote_ip4, .port = (__u16)(skops->remote_port >> 16), .pad = 0};
        na_bypass.delete(&peer);
        break;
    }
    case BPF_SOCK_OPS_STATE_CB:
        if (skops->args[1] == BPF_TCP_CLOSE) {
            struct na_addr4 src = {.ip = skops->local_ip4, .port = NA_BE16(skops->local_port), .pad = 0};
            na_orig_dst.delete(&src);
        }
        break;
    }
    return 1;
}
