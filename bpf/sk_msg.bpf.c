/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sk_msg on fsm_sockhash: the same-node fast path. Data a pod socket sends
 * goes straight into the receive queue of its peer socket (the proxy's, and
 * back), skipping TCP/IP.
 *
 * Ordering: bytes that went through TCP may still be queued at the receiver
 * when redirected bytes arrive, and a sockmap receiver reads redirected bytes
 * first. So each socket decides once, at its first send: if its peer is in
 * the sockhash then, every later send is redirected; if not (the peer was not
 * accepted yet), the socket stays on TCP for its whole life.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "fsm_abi.h"
#include "fsm_maps.h"

static __always_inline struct fsm_fastpath_stats *fsm_fastpath_stats_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&fsm_fastpath_stats, &zero);
}

SEC("sk_msg")
int fsm_sk_msg(struct sk_msg_md *msg)
{
	struct fsm_tuple peer = { .family = FSM_AF_INET };
	struct fsm_fastpath_stats *st;
	__u32 *state;

	/* Every field loaded up front, each where it is written (FSM_READ). */
	__u32 family = FSM_READ(msg->family);
	__u32 local4 = FSM_READ(msg->local_ip4), remote4 = FSM_READ(msg->remote_ip4);
	__u32 r0 = FSM_READ(msg->remote_ip6[0]), r1 = FSM_READ(msg->remote_ip6[1]), r2 = FSM_READ(msg->remote_ip6[2]);
	__u32 local6_3 = FSM_READ(msg->local_ip6[3]), remote6_3 = FSM_READ(msg->remote_ip6[3]);

	/* The peer's key is our tuple seen from the other end (IPv4, also over a dual-stack socket). */
	if (family == FSM_AF_INET) {
		peer.saddr[0] = remote4;
		peer.daddr[0] = local4;
	} else if (family == FSM_AF_INET6 && r0 == 0 && r1 == 0 && r2 == FSM_V4_MAPPED_WORD2) {
		peer.saddr[0] = remote6_3;
		peer.daddr[0] = local6_3;
	} else {
		return SK_PASS;
	}
	state = bpf_sk_storage_get(&fsm_sk_state, msg->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state || *state == FSM_SK_TCP)
		return SK_PASS;
	peer.sport = (__u16)bpf_ntohl(msg->remote_port);
	peer.dport = (__u16)msg->local_port;
	st = fsm_fastpath_stats_get();
	if (bpf_msg_redirect_hash(msg, &fsm_sockhash, &peer, BPF_F_INGRESS) == SK_PASS) {
		*state = FSM_SK_REDIRECT;
		if (st) {
			st->redirected_msgs++;
			st->redirected_bytes += msg->size;
		}
		return SK_PASS;
	}
	if (*state == FSM_SK_UNDECIDED) {
		*state = FSM_SK_TCP;
		if (st)
			st->tcp_sockets++;
	}
	/* A redirecting socket whose peer is gone falls back to TCP, which ends the connection normally. */
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
