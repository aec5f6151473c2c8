/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/getsockopt, attached to the proxy's cgroup: answers
 * getsockopt(SOL_IP, SO_ORIGINAL_DST) on a connection the proxy accepted from
 * a redirected pod, the same call a stock transparent listener (Pipy, Envoy)
 * makes after an iptables REDIRECT. Any other option, and any socket we did
 * not redirect, keeps the kernel's own answer.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "fsm_abi.h"
#include "fsm_maps.h"

/* <linux/netfilter_ipv4.h>; not included to stay off netfilter headers. */
#define FSM_SOL_IP 0
#define FSM_SO_ORIGINAL_DST 80

SEC("cgroup/getsockopt")
int fsm_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sockaddr_in *sin;
	struct fsm_orig_dst *orig;
	struct fsm_tuple key = { .family = FSM_AF_INET };

	if (ctx->level != FSM_SOL_IP || ctx->optname != FSM_SO_ORIGINAL_DST)
		return 1;
	if (!sk)
		return 1;
	/* Every field loaded up front, each where it is written (FSM_READ). */
	__u32 family = FSM_READ(sk->family);
	__u32 src4 = FSM_READ(sk->src_ip4), dst4 = FSM_READ(sk->dst_ip4);
	__u32 d0 = FSM_READ(sk->dst_ip6[0]), d1 = FSM_READ(sk->dst_ip6[1]), d2 = FSM_READ(sk->dst_ip6[2]);
	__u32 src6_3 = FSM_READ(sk->src_ip6[3]), dst6_3 = FSM_READ(sk->dst_ip6[3]);

	/* The record is keyed from the pod's side: the proxy's peer is the pod. */
	if (family == FSM_AF_INET) {
		key.saddr[0] = dst4;
		key.daddr[0] = src4;
	} else if (family == FSM_AF_INET6 && d0 == 0 && d1 == 0 && d2 == FSM_V4_MAPPED_WORD2) {
		/* A proxy listening on a dual-stack socket sees IPv4 pods as ::ffff:a.b.c.d. */
		key.saddr[0] = dst6_3;
		key.daddr[0] = src6_3;
	} else {
		return 1;
	}
	key.sport = bpf_ntohs(sk->dst_port);
	key.dport = (__u16)sk->src_port;
	orig = bpf_map_lookup_elem(&fsm_tuple_orig, &key);
	if (!orig)
		return 1;

	sin = ctx->optval;
	if ((void *)(sin + 1) > ctx->optval_end || ctx->optlen < (__s32)sizeof(*sin))
		return 1;
	sin->sin_family = FSM_AF_INET;
	sin->sin_port = orig->port;
	sin->sin_addr.s_addr = orig->addr[0];
	__builtin_memset(sin->__pad, 0, sizeof(sin->__pad));
	ctx->optlen = sizeof(*sin);
	/* Keep clang from merging the two 4-byte context stores into one 8-byte store the verifier rejects. */
	asm volatile("" ::: "memory");
	ctx->retval = 0;
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
