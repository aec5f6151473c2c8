/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sockops, two entry points:
 *  - fsm_sockops_pod on the pods' parent cgroup: when a redirected pod socket
 *    is established, move its original destination from the cookie record to
 *    a record keyed by the handshake's sequence numbers (fsm_seq_orig);
 *  - fsm_sockops_proxy on the proxy's cgroup: when the proxy's end of that
 *    connection is established, move the record to the proxy socket's own
 *    4-tuple (fsm_tuple_orig), where getsockopt finds it, and drop it when the
 *    socket closes.
 * Both put the same-node pod<->proxy sockets into fsm_sockhash when the fast
 * path is on (fsm_config.flags), so sk_msg can hand bytes from one socket to
 * its peer without crossing the TCP/IP stack.
 *
 * Why two steps: the pod's packets cross the node's netfilter, and a conntrack
 * entry whose reply tuple the new connection would repeat (one of iptables
 * mode's DNATs to the proxy, still open or in TIME_WAIT after a switch to
 * eBPF) makes NAT give the connection another pod port. The proxy then sees a
 * 4-tuple the pod's side never saw; sequence numbers are the same on both.
 * Ordering: the pod's ACTIVE_ESTABLISHED runs before its handshake ACK leaves,
 * and the proxy's PASSIVE_ESTABLISHED runs when that ACK arrives, before the
 * proxy can accept; so the record is in place for getsockopt. (TCP Fast Open
 * to the proxy would reverse the order; nothing here supports it.)
 *
 * Established callbacks often run in softirq context, so the current task
 * says nothing about the socket; everything here is derived from the socket.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "fsm_abi.h"
#include "fsm_maps.h"

static __always_inline struct fsm_config *fsm_config_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&fsm_config, &zero);
}

/*
 * The socket's own IPv4 4-tuple (s = local end), for AF_INET sockets and for
 * dual-stack AF_INET6 sockets talking IPv4 (IPv4-mapped peer). 0 otherwise.
 */
static __always_inline int fsm_tuple_of(const struct bpf_sock_ops *skops, struct fsm_tuple *t)
{
	/* Every field loaded up front, each where it is written (FSM_READ). */
	__u32 family = FSM_READ(skops->family);
	__u32 local4 = FSM_READ(skops->local_ip4), remote4 = FSM_READ(skops->remote_ip4);
	__u32 r0 = FSM_READ(skops->remote_ip6[0]), r1 = FSM_READ(skops->remote_ip6[1]), r2 = FSM_READ(skops->remote_ip6[2]);
	__u32 local6_3 = FSM_READ(skops->local_ip6[3]), remote6_3 = FSM_READ(skops->remote_ip6[3]);

	t->family = FSM_AF_INET;
	if (family == FSM_AF_INET) {
		t->saddr[0] = local4;
		t->daddr[0] = remote4;
	} else if (family == FSM_AF_INET6 && r0 == 0 && r1 == 0 && r2 == FSM_V4_MAPPED_WORD2) {
		t->saddr[0] = local6_3;
		t->daddr[0] = remote6_3;
	} else {
		return 0;
	}
	t->sport = (__u16)skops->local_port;
	/* remote_port holds the network-order port in its upper half on little endian; ntohl covers both. */
	t->dport = (__u16)bpf_ntohl(skops->remote_port);
	return 1;
}

static __always_inline void fsm_fastpath_add(struct bpf_sock_ops *skops, const struct fsm_tuple *t, const struct fsm_config *cfg)
{
	if (cfg->flags & FSM_CFG_FASTPATH)
		bpf_sock_hash_update(skops, &fsm_sockhash, (void *)t, BPF_ANY);
}

static __always_inline int fsm_is_local_pod4(__u32 ip4)
{
	struct fsm_ip key = { .family = FSM_AF_INET, .addr = { ip4 } };

	return bpf_map_lookup_elem(&fsm_pod_ips, &key) != NULL;
}

/* The connection the proxy's socket t has, from the pod's side: the key of fsm_tuple_orig. */
static __always_inline void fsm_from_pod_side(struct fsm_tuple *conn, const struct fsm_tuple *t)
{
	conn->family = t->family;
	__builtin_memcpy(conn->saddr, t->daddr, sizeof(conn->saddr));
	__builtin_memcpy(conn->daddr, t->saddr, sizeof(conn->daddr));
	conn->sport = t->dport;
	conn->dport = t->sport;
}

/* Both sides of a redirected connection compute this key; s of the tuple is the pod (its own view or the proxy's). */
static __always_inline void fsm_seq_key_of(struct fsm_seq_key *k, const struct fsm_tuple *t, __u32 pod_seq, __u32 proxy_seq)
{
	k->family = t->family;
	__builtin_memcpy(k->pod_addr, t->saddr, sizeof(k->pod_addr));
	__builtin_memcpy(k->proxy_addr, t->daddr, sizeof(k->proxy_addr));
	k->proxy_port = t->dport;
	k->pod_seq = pod_seq;
	k->proxy_seq = proxy_seq;
}

static __always_inline void fsm_pod_established(struct bpf_sock_ops *skops, const struct fsm_tuple *t, const struct fsm_config *cfg)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct fsm_orig_dst *orig = bpf_map_lookup_elem(&fsm_cookie_orig, &cookie);
	struct fsm_seq_key k = {};
	struct fsm_pending p = {};

	if (!orig)
		return;
	/* At establishment snd_nxt is the pod's ISN + 1 and rcv_nxt the proxy's. */
	fsm_seq_key_of(&k, t, skops->snd_nxt, skops->rcv_nxt);
	p.orig = *orig;
	p.pod_port = t->sport;
	if (bpf_map_update_elem(&fsm_seq_orig, &k, &p, BPF_ANY))
		return;
	bpf_map_delete_elem(&fsm_cookie_orig, &cookie);
	fsm_fastpath_add(skops, t, cfg);
}

/*
 * The proxy accepted a connection on its outbound port (t: its own view). If
 * a pod's side left a record for it, key the record by this socket's 4-tuple
 * for getsockopt. Without one the connection was not redirected by us (an
 * iptables-mode DNAT during a switch): conntrack answers, so no stale record
 * may shadow it.
 */
static __always_inline void fsm_proxy_accepted(struct bpf_sock_ops *skops, const struct fsm_tuple *t, const struct fsm_config *cfg)
{
	struct fsm_tuple conn = {};
	struct fsm_seq_key k = {};
	struct fsm_pending *p;
	__u16 pod_port;

	fsm_from_pod_side(&conn, t);
	fsm_seq_key_of(&k, &conn, skops->rcv_nxt, skops->snd_nxt);
	p = bpf_map_lookup_elem(&fsm_seq_orig, &k);
	if (!p) {
		bpf_map_delete_elem(&fsm_tuple_orig, &conn);
		return;
	}
	pod_port = p->pod_port;
	if (bpf_map_update_elem(&fsm_tuple_orig, &conn, &p->orig, BPF_ANY))
		return;
	bpf_map_delete_elem(&fsm_seq_orig, &k);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	/*
	 * sk_msg finds a socket's peer by reversing its own 4-tuple, which only
	 * holds when NAT kept the pod's port. Otherwise this socket stays out of
	 * the sockhash and the pod's socket leaves it: the connection runs on TCP,
	 * and neither socket can take the other one's place for a third.
	 */
	if (pod_port == conn.sport) {
		fsm_fastpath_add(skops, t, cfg);
	} else {
		conn.sport = pod_port;
		bpf_map_delete_elem(&fsm_sockhash, &conn);
	}
}

SEC("sockops")
int fsm_sockops_pod(struct bpf_sock_ops *skops)
{
	struct fsm_tuple t = {};
	struct fsm_config *cfg;

	if (!fsm_tuple_of(skops, &t))
		return 1;
	cfg = fsm_config_get();
	if (!cfg)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		fsm_pod_established(skops, &t, cfg);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		/* The proxy->pod hop: the proxy connecting to an enrolled pod of this node. */
		if (fsm_is_local_pod4(t.saddr[0]) && t.daddr[0] == cfg->proxy_ip4)
			fsm_fastpath_add(skops, &t, cfg);
		break;
	}
	return 1;
}

SEC("sockops")
int fsm_sockops_proxy(struct bpf_sock_ops *skops)
{
	struct fsm_tuple t = {};
	struct fsm_config *cfg;

	if (!fsm_tuple_of(skops, &t))
		return 1;
	cfg = fsm_config_get();
	if (!cfg)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (t.sport == bpf_ntohs(cfg->outbound_port))
			fsm_proxy_accepted(skops, &t, cfg);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (fsm_is_local_pod4(t.daddr[0]))
			fsm_fastpath_add(skops, &t, cfg);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* Set only on accepted sockets that took over a record (fsm_proxy_accepted). */
		if (skops->args[1] == BPF_TCP_CLOSE) {
			struct fsm_tuple conn = {};

			fsm_from_pod_side(&conn, &t);
			bpf_map_delete_elem(&fsm_tuple_orig, &conn);
		}
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
