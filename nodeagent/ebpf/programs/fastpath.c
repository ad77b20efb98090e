/* fastpath.c - sk_skb verdict on the node's fast-path SOCKHASH: the kernel moves a relayed connection's bytes.
 *
 * For two enrolled pods on one node a relay holds two TCP sockets per connection: the one the app's
 * captured connect reached (:15001) and its own connection to the destination app. After its policy
 * check it puts both in na_fp_socks (keyed by socket cookie) and names each one's peer in na_fp_peer
 * (nodeagent.ebpf.maps.fastpath_splice, which also keeps the bytes in order across the hand-over);
 * from then on every skb arriving on either socket is redirected by this program to the egress of the
 * other (bpf_sk_redirect_hash), without waking the tunnel and without a copy to user space. A socket
 * without a peer entry is passed to its normal receive queue (SK_PASS).
 *
 * Node-wide, not per pod: pinned under NA_FP_DIR (/sys/fs/bpf/nodeagent/fastpath). Compiled as its own
 * unit (it does not include nodeagent.h's per-pod maps). Attached to the map (BPF_SK_SKB_VERDICT).
 */
#include <uapi/linux/bpf.h>

#ifndef NA_FP_MAX
#define NA_FP_MAX 65536
#endif

BPF_SOCKHASH(na_fp_socks, __u64, NA_FP_MAX);
BPF_HASH(na_fp_peer, __u64, __u64, NA_FP_MAX);
BPF_ARRAY(na_fp_stats, __u64, 2); /* 0: skbs redirected, 1: bytes redirected */

int na_fp_verdict(struct __sk_buff *skb)
{
    __u64 self = bpf_get_socket_cookie(skb);
    __u64 *peer = na_fp_peer.lookup(&self);
    if (!peer)
        return SK_PASS;
    __u64 key = *peer;
    int slot = 0;
    __u64 *n = na_fp_stats.lookup(&slot);
    if (n)
        __sync_fetch_and_add(n, 1);
    slot = 1;
    n = na_fp_stats.lookup(&slot);
    if (n)
        __sync_fetch_and_add(n, skb->len);
    return na_fp_socks.sk_redirect_hash(skb, &key, 0);
}
