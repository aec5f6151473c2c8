/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sockops, two entry points:
 *  - fsm_sockops_pod on the pods' parent cgroup: when a redirected pod socket
 *    is established, move its original destination from the cookie record to
 *    a 4-tuple record the proxy's getsockopt can find, and drop it when the
 *    socket closes;
 *  - fsm_sockops_proxy on the proxy's cgroup.
 * Both put the same-node pod<->proxy sockets into fsm_sockhash when the fast
 * path is on (fsm_config.flags), so sk_msg can hand bytes from one socket to
 * its peer without crossing the TCP/IP stack.
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

static __always_inline void fsm_pod_established(struct bpf_sock_ops *skops, const struct fsm_tuple *t, const struct fsm_config *cfg)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct fsm_orig_dst *orig = bpf_map_lookup_elem(&fsm_cookie_orig, &cookie);

	if (!orig)
		return;
	/* The pod's ACK that completes the handshake leaves after this callback, so the record exists before the proxy can accept. */
	if (bpf_map_update_elem(&fsm_tuple_orig, t, orig, BPF_ANY))
		return;
	bpf_map_delete_elem(&fsm_cookie_orig, &cookie);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	fsm_fastpath_add(skops, t, cfg);
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
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			bpf_map_delete_elem(&fsm_tuple_orig, &t);
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
		/* Only this node's redirected pods reach the outbound listener. */
		if (t.sport == bpf_ntohs(cfg->outbound_port))
			fsm_fastpath_add(skops, &t, cfg);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (fsm_is_local_pod4(t.daddr[0]))
			fsm_fastpath_add(skops, &t, cfg);
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
