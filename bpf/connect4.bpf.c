/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/connect4, attached once to the pods' parent cgroup: a TCP connect
 * from an enrolled pod to a destination that is not excluded goes to the node
 * proxy's outbound listener instead; the original destination is remembered
 * by socket cookie (sockops moves it to fsm_tuple_orig once established).
 * A direct connection that strict inbound would refuse anyway fails here at
 * once with EPERM instead of waiting for SYN retransmits.
 */
#include "fsm_connect.h"

SEC("cgroup/connect4")
int fsm_connect4(struct bpf_sock_addr *ctx)
{
	struct fsm_config *cfg = NULL;

	switch (fsm_connect_ipv4(ctx, ctx->user_ip4, ctx->user_port, &cfg)) {
	case FSM_REDIRECT:
		if (cfg) {
			ctx->user_ip4 = cfg->proxy_ip4;
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
