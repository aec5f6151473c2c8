/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The ABI between the kernel programs and the agent: constants and the byte
 * layout of every map key and value. Mirrored field by field in
 * src/dataplane/ebpf/abi.ts; test/unit/ebpf-abi.test.ts compares the sizes
 * below with the BTF of the built objects. Change both together and bump
 * FSM_ABI_VERSION when a layout changes (pinned maps of an older ABI cannot
 * be adopted).
 *
 * Conventions: addresses are stored in network byte order in 16-byte fields
 * (IPv4 in word 0, the rest zero) next to an address family, so IPv6
 * (connect6) needs no new layout. Ports in keys are in host byte order;
 * ports that end up in a sockaddr are kept in network byte order (_be).
 */
#ifndef FSM_ABI_H
#define FSM_ABI_H

#include <linux/types.h>

#define FSM_ABI_VERSION 2

/* "FSMNODE1": the first word of fsm_meta, how the agent recognises its own pin directory. */
#define FSM_META_MAGIC 0x3145444f4e4d5346ULL

#define FSM_AF_INET 2
#define FSM_AF_INET6 10

/*
 * Load a context field exactly where it is written. Without it clang may sink
 * loads into branches and merge them into one load through a computed
 * pointer, which the verifier rejects for context and socket pointers.
 */
#define FSM_READ(field) (*(volatile typeof(field) *)&(field))

/* Word 2 of an IPv4-mapped IPv6 address (::ffff:a.b.c.d), in network order on any host. */
#define FSM_V4_MAPPED_WORD2 __builtin_bswap32(0x0000ffff)

/* fsm_config.flags */
#define FSM_CFG_FASTPATH (1U << 0) /* put pod<->proxy sockets into fsm_sockhash */

/* fsm_pod.flags */
#define FSM_POD_STRICT (1U << 0)      /* refuse inbound connections that do not come from a node proxy */
#define FSM_POD_HAS_INCLUDE (1U << 1) /* an outbound inclusion list applies (pod's or mesh-wide) */

/* fsm_addrs values. The agent ORs the flags of every covering prefix into each entry, so the longest match carries them all. */
#define FSM_ADDR_NODE (1U << 0)      /* an address of this node: never redirected */
#define FSM_ADDR_PROXY_SRC (1U << 1) /* a node proxy: may reach strict pods */

/* fsm_port_key.dir */
#define FSM_DIR_OUT 1
#define FSM_DIR_IN 2

/* fsm_port_key.scope and fsm_cidr_key.scope: 0 = mesh-wide, otherwise a pod's cgroup id. */
#define FSM_SCOPE_MESH 0

/* fsm_sk_state values (per socket, fast path). */
#define FSM_SK_UNDECIDED 0
#define FSM_SK_REDIRECT 1
#define FSM_SK_TCP 2

/* Bits of the key in front of the address in an fsm_cidr_key (family + scope) and an fsm_addr_key (family). */
#define FSM_CIDR_KEY_PREFIX_BITS 96
#define FSM_ADDR_KEY_PREFIX_BITS 32

/* Longest Kubernetes pod uid we keep (a UUID is 36). */
#define FSM_UID_LEN 48

#define FSM_META_JSON_LEN 4080

/* fsm_config[0]: the node-wide settings that may change while programs run. */
struct fsm_config {
	__u32 proxy_ip4;        /* network order; 0 = no proxy: nothing is redirected */
	__be16 outbound_port;   /* network order */
	__be16 inbound_port;    /* network order */
	__u32 proxy_ip6[4];     /* reserved for connect6 */
	__u64 proxy_cgroup_id;  /* the proxy's sockets are never redirected */
	__u32 flags;            /* FSM_CFG_* */
	__u32 reserved;
};

/* fsm_pods: pod cgroup id -> pod. */
struct fsm_pod {
	__u32 flags;            /* FSM_POD_* */
	__u32 reserved;
	char uid[FSM_UID_LEN];  /* Kubernetes uid, NUL padded: lets a restarted agent read back what is enrolled */
};

/* Key of fsm_pod_ips. */
struct fsm_ip {
	__u32 family;
	__u32 addr[4];
};

/* Key of the LPM trie fsm_addrs. prefixlen counts the family too. */
struct fsm_addr_key {
	__u32 prefixlen;        /* FSM_ADDR_KEY_PREFIX_BITS + CIDR prefix length */
	__u32 family;
	__u32 addr[4];
};

/* Key of fsm_ports. */
struct fsm_port_key {
	__u64 scope;
	__u16 port;             /* host order */
	__u8 dir;               /* FSM_DIR_* */
	__u8 pad[5];
};

/* Key of the LPM tries fsm_cidr_excl / fsm_cidr_incl. prefixlen counts family and scope too. */
struct fsm_cidr_key {
	__u32 prefixlen;        /* FSM_CIDR_KEY_PREFIX_BITS + CIDR prefix length */
	__u32 family;
	__u64 scope;
	__u32 addr[4];
};

/*
 * A connection with the pod as s and where it connected to (the proxy) as d.
 * In fsm_tuple_orig the pod's port is the one the proxy sees (NAT may have
 * changed it); in fsm_sockhash every socket is keyed by its own view.
 */
struct fsm_tuple {
	__u32 family;
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;            /* host order */
	__u16 dport;            /* host order */
};

/*
 * Key of fsm_seq_orig: a redirected connection by what NAT leaves alone. The
 * node's conntrack may give the connection another pod port on its way to the
 * proxy (see sockops.bpf.c), never other sequence numbers, so the pod's and
 * the proxy's sides of one connection compute the same key.
 */
struct fsm_seq_key {
	__u32 family;
	__u32 pod_addr[4];
	__u32 proxy_addr[4];
	__u16 proxy_port;       /* host order */
	__u16 pad;
	__u32 pod_seq;          /* the pod's ISN + 1: pod snd_nxt = proxy rcv_nxt at establishment */
	__u32 proxy_seq;        /* the proxy's ISN + 1: proxy snd_nxt = pod rcv_nxt at establishment */
};

/* Where a redirected connection was going. */
struct fsm_orig_dst {
	__u32 addr[4];
	__be16 port;            /* network order, ready for a sockaddr */
	__u16 family;
	__u32 reserved;
	__u64 pod_cgroup_id;    /* who connected */
};

/* Value of fsm_seq_orig: what the pod's side knows, until the proxy's side takes it over. */
struct fsm_pending {
	struct fsm_orig_dst orig;
	__u16 pod_port;         /* host order: the pod socket's own port, to tell whether NAT changed it */
	__u16 pad[3];
};

/* fsm_stats (per CPU): pod cgroup id -> counters. */
struct fsm_stats {
	__u64 redirected;       /* outbound connections sent to the proxy */
	__u64 excluded;         /* outbound connections left alone by an exclusion */
	__u64 inbound_refused;  /* direct connections refused by strict inbound */
};

/* fsm_fastpath_stats[0] (per CPU): what the sk_msg fast path carried. */
struct fsm_fastpath_stats {
	__u64 redirected_msgs;
	__u64 redirected_bytes;
	__u64 tcp_sockets;      /* sockets that found no peer at their first send and stayed on TCP */
};

/* fsm_meta[0]: marks a pin directory as ours and carries the agent's manifest (JSON). */
struct fsm_meta {
	__u64 magic;            /* FSM_META_MAGIC */
	__u32 abi;              /* FSM_ABI_VERSION */
	__u32 json_len;
	char json[FSM_META_JSON_LEN];
};

#endif /* FSM_ABI_H */
