/* nodeagent.h - what every nodeagent eBPF program shares: configuration, structs, maps.
 *
 * Compiled by bcc (nodeagent/ebpf/loader.py) ONCE per agent process: this header plus one .c file per
 * attach point, with node-wide -D flags only (ports and mark; `nodeagent ebpf source` prints them).
 * Each enrolled pod then gets its own copy of the programs, loaded against its own maps: the loader
 * creates the maps declared below for the pod, pins them under /sys/fs/bpf/nodeagent/<pod uid>/map_*
 * (na_<x> is pinned as map_<x>) and points the compiled instructions at them. What differs between pods
 * (the pod's IP) is in the pod's na_config map, not in the code. The structs below are mirrored in
 * nodeagent/ebpf/structs.py and a privileged test compares the two through the kernel's BTF.
 *
 * A reload of a pod's programs (repair after drift, agent upgrade) re-opens the pod's pinned maps
 * instead of creating new ones, so the tunnel's listener in na_listener and in-flight original
 * destinations survive it.
 */
#ifndef NODEAGENT_H
#define NODEAGENT_H

#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>

/* ---- configuration (-D flags, the same for every pod of a node) --------------------------------- */
#ifndef NA_OUTBOUND_PORT
#define NA_OUTBOUND_PORT 15001
#endif
#ifndef NA_INBOUND_PORT
#define NA_INBOUND_PORT 15006
#endif
#ifndef NA_HBONE_PORT
#define NA_HBONE_PORT 15008
#endif
#ifndef NA_TUNNEL_MARK
#define NA_TUNNEL_MARK 0x539
#endif
#ifndef NA_MARK_MASK
#define NA_MARK_MASK 0xfff
#endif
#ifndef NA_PROBE_SRC4
#define NA_PROBE_SRC4 0xa9fe077fU /* 169.254.7.127: kubelet probes, SNATed on the node */
#endif
#ifndef NA_MAX_FLOWS
#define NA_MAX_FLOWS 65536
#endif
#ifndef NA_SOCK_STREAM
#define NA_SOCK_STREAM 1 /* SOCK_STREAM (linux/net.h; not in the uapi headers bcc sees) */
#endif

/* ---- byte order of constants (x86-64 and arm64 are little-endian; refuse anything else) ---------- */
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "nodeagent's programs assume a little-endian target"
#endif
#define NA_BE32(x) ((__u32)__builtin_bswap32((__u32)(x)))
#define NA_BE16(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define NA_LOOPBACK_NET(ip_be) ((NA_BE32(ip_be) >> 24) == 127)

/* ---- shared structs (mirrored in nodeagent/ebpf/structs.py) ------------------------------------- */

/* An IPv4 socket address as the kernel stores it: address and port in network byte order. */
struct na_addr4 {
    __u32 ip;
    __u16 port;
    __u16 pad;
};

/* Where a captured outbound connection was going, and which socket it was (for logs and cleanup). */
struct na_orig {
    __u32 ip;      /* original destination, network byte order */
    __u16 port;    /* network byte order */
    __u16 flags;   /* NA_ORIG_* */
    __u64 cookie;  /* socket cookie of the app's socket */
};
#define NA_ORIG_CONNECTED 1 /* the sockops program saw the connect and keyed it by the source address */

/* Counters in map_stats (an array of __u64, one slot per index). */
enum na_stat {
    NA_STAT_OUT_REDIRECTED = 0, /* connect4: TCP connect rewritten to the tunnel's :15001 */
    NA_STAT_OUT_SKIPPED = 1,    /* connect4: loopback, own IP, tunnel port or tunnel mark */
    NA_STAT_OUT_KEYED = 2,      /* sockops: original destination keyed by the source address */
    NA_STAT_IN_STEERED = 3,     /* sk_lookup: SYN handed to the tunnel's :15006 listener */
    NA_STAT_IN_REFUSED = 4,     /* sk_lookup: no tunnel listener, refused (fail closed) */
    NA_STAT_IN_BYPASSED = 5,    /* sk_lookup: the tunnel's own connection to the app (client's IP) */
    NA_STAT_IN6_REFUSED = 6,    /* sk_lookup: IPv6 TCP from elsewhere, refused (nothing captures IPv6) */
    NA_STAT_OUT_MAPPED = 7,     /* connect6: of the redirected, an IPv6 socket's connect to ::ffff:a.b.c.d */
    NA_STAT_MAX = 8,
};

/* What the loader writes for each pod into slot 0 of its na_config. */
struct na_config {
    __u32 pod_ip4; /* the pod's IPv4 address, network byte order; 0 while unknown */
    __u32 pad;
};

/* ---- maps (one set per pod, pinned as map_<name without na_>; names <= 15 bytes) ----------------- */

/* connect4/connect6 -> sockops: socket cookie -> original destination (the source port is not known yet). */
BPF_TABLE("lru_hash", __u64, struct na_orig, na_cookie_dst, NA_MAX_FLOWS);
/* sockops -> tunnel: the app's source address (the tunnel's accepted peer) -> original destination. */
BPF_TABLE("lru_hash", struct na_addr4, struct na_orig, na_orig_dst, NA_MAX_FLOWS);
/* tunnel -> sk_lookup: slot 0 holds the tunnel's :15006 listener, put there by the tunnel. */
BPF_TABLE("sockmap", int, int, na_listener, 1);
/* tunnel -> sk_lookup: source addresses of the tunnel's own connections to the app that carry the
 * client's IP (IP_TRANSPARENT): their SYN must reach the app, not :15006. Deleted by sockops when the
 * app's socket is established. */
BPF_TABLE("lru_hash", struct na_addr4, __u32, na_bypass, NA_MAX_FLOWS);
BPF_TABLE("array", int, __u64, na_stats, NA_STAT_MAX);
/* loader -> every program: this pod's settings (slot 0). */
BPF_TABLE("array", int, struct na_config, na_config, 1);

/* The pod's IPv4 address in network byte order, 0 while the loader has not written one. */
static __always_inline __u32 na_pod_ip4(void)
{
    int zero = 0;
    struct na_config *config = na_config.lookup(&zero);
    return config ? config->pod_ip4 : 0;
}

static __always_inline void na_count(int what)
{
    __u64 *n = na_stats.lookup(&what);
    if (n)
        __sync_fetch_and_add(n, 1);
}

/* The outbound capture decision, one for both connect hooks (connect4.c, and connect6.c for IPv4-mapped
 * destinations): the app's TCP connect to dst:port (network byte order) is captured unless it goes to
 * 127.0.0.0/8, the pod's own IP, 0.0.0.0 or a tunnel port (loop prevention), or the socket carries the
 * tunnel's mark. A captured connect has its original destination recorded by socket cookie (sockops
 * re-keys it by source address) and is counted; the IPv4 address it must go to instead, on
 * NA_OUTBOUND_PORT, is returned. 0: leave the connect alone. */
static __always_inline __u32 na_capture_connect(struct bpf_sock_addr *ctx, __u32 dst, __u16 port)
{
    if (ctx->type != NA_SOCK_STREAM || (ctx->protocol != IPPROTO_TCP && ctx->protocol != 0))
        return 0;
    __u16 hport = NA_BE16(port);
    __u32 pod_ip = na_pod_ip4();
    if (NA_LOOPBACK_NET(dst) || dst == pod_ip || dst == 0 ||
        hport == NA_OUTBOUND_PORT || hport == NA_INBOUND_PORT || hport == NA_HBONE_PORT) {
        na_count(NA_STAT_OUT_SKIPPED);
        return 0;
    }
    struct bpf_sock *sk = ctx->sk;
    if (sk && (sk->mark & NA_MARK_MASK) == NA_TUNNEL_MARK) {
        na_count(NA_STAT_OUT_SKIPPED);
        return 0;
    }
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct na_orig orig = {.ip = dst, .port = port, .flags = 0, .cookie = cookie};
    na_cookie_dst.update(&cookie, &orig);
    na_count(NA_STAT_OUT_REDIRECTED);
    /* To the pod's own IP when known (the tunnel then sees the same peer address as with iptables'
     * REDIRECT: pod IP, app's port), else loopback. */
    return pod_ip ? pod_ip : NA_BE32(0x7f000001);
}

#endif /* NODEAGENT_H */
