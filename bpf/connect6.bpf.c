/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/connect6, attached once to the pods' parent cgroup, for IPv4 over
 * dual-stack sockets: a JVM (and anything else that opens AF_INET6 sockets by
 * default) connects to ::ffff:a.b.c.d, which the kernel carries as IPv4 but
 * reports to connect6, not connect4. Such a destination gets exactly the
 * connect4 treatment, rewritten to ::ffff:<proxy>. Native IPv6 destinations
 * pass untouched until the IPv6 programs exist.
 */
#include "fsm_connect.h"

static __always_inline int fsm_is_v4_mapped(const struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == bpf_htonl(0x0000ffff);
}

SEC("cgroup/connect6")
int fsm_connect6(struct bpf_sock_addr *ctx)
{
	struct fsm_config *cfg = NULL;

	if (!fsm_is_v4_mapped(ctx))
		return FSM_CONNECT_ALLOW;
	switch (fsm_connect_ipv4(ctx, ctx->user_ip6[3], ctx->user_port, &cfg)) {
	case FSM_REDIRECT:
		if (cfg) {
			ctx->user_ip6[3] = cfg->proxy_ip4;
			ctx->user_port = cfg->outbound_port;
		}
		return FSM_CONNECT_ALLOW;
	case FSM_REFUSE:
		return FSM_CONNECT_REFUSE;
	default:
		return FSM_CONNECT_ALLOW;
	}
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
