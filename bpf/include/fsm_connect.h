/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The outbound decision of connect4 and connect6 (for IPv4-mapped
 * destinations of dual-stack sockets): leave the connection alone, redirect
 * it to the node proxy (after recording the original destination by socket
 * cookie), or refuse it because strict inbound would drop it anyway.
 */
#ifndef FSM_CONNECT_H
#define FSM_CONNECT_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "fsm_abi.h"
#include "fsm_maps.h"
#include "fsm_policy.h"

/* <sys/socket.h> pulls libc headers that do not build for -target bpf. */
#define FSM_SOCK_STREAM 1

/* Return values of cgroup/connect programs. */
#define FSM_CONNECT_ALLOW 1
#define FSM_CONNECT_REFUSE 0

enum fsm_verdict { FSM_PASS, FSM_REDIRECT, FSM_REFUSE };

/* A direct connection to a strict pod of this node from anything but a proxy. */
static __always_inline int fsm_refused_at_connect(struct bpf_sock_addr *ctx, __u64 src_pod_cg, __u32 dst, __u16 port)
{
	struct fsm_ip key = { .family = FSM_AF_INET, .addr = { dst } };
	__u64 *dst_cg = bpf_map_lookup_elem(&fsm_pod_ips, &key);
	struct fsm_pod *dst_pod;

	if (!dst_cg || *dst_cg == src_pod_cg)
		return 0;
	/*
	 * Host-network pods share the node's addresses, which strict pods accept
	 * as proxy sources; leave their connections to the inbound program.
	 */
	if (bpf_get_netns_cookie(ctx) == bpf_get_netns_cookie(NULL))
		return 0;
	dst_pod = bpf_map_lookup_elem(&fsm_pods, dst_cg);
	if (!dst_pod || !fsm_inbound4_refused(*dst_cg, dst_pod, 0, port))
		return 0;
	fsm_count(*dst_cg, FSM_COUNT_INBOUND_REFUSED);
	return 1;
}

/*
 * Decide for a TCP connect to the IPv4 destination dst:port (port in network
 * order, as in bpf_sock_addr.user_port). On FSM_REDIRECT *cfg_out is the
 * config to rewrite the destination with.
 */
static __always_inline enum fsm_verdict fsm_connect_ipv4(struct bpf_sock_addr *ctx, __u32 dst, __u32 port_be, struct fsm_config **cfg_out)
{
	struct fsm_config *cfg;
	struct fsm_pod *pod;
	__u64 pod_cg = 0;
	__u16 port = bpf_ntohs((__u16)port_be);

	if (ctx->type != FSM_SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return FSM_PASS;
	cfg = fsm_config_get();
	if (!cfg || !cfg->proxy_ip4)
		return FSM_PASS;
	/* The proxy normally lives outside the pods' parent; say it anyway. */
	if (bpf_get_current_cgroup_id() == cfg->proxy_cgroup_id)
		return FSM_PASS;
	if (dst == 0 || fsm_is_loopback4(dst) || dst == cfg->proxy_ip4 || (fsm_addr4_flags(dst) & FSM_ADDR_NODE))
		return FSM_PASS;

	pod = fsm_pod_of_current(&pod_cg);
	if (pod && !fsm_outbound4_excluded(pod_cg, pod, dst, port)) {
		struct fsm_orig_dst orig = {
			.addr = { dst },
			.port = (__be16)port_be,
			.family = FSM_AF_INET,
			.pod_cgroup_id = pod_cg,
		};
		__u64 cookie = bpf_get_socket_cookie(ctx);

		/* Without a record the proxy could not tell where to go: better not to redirect. */
		if (bpf_map_update_elem(&fsm_cookie_orig, &cookie, &orig, BPF_ANY))
			return FSM_PASS;
		fsm_count(pod_cg, FSM_COUNT_REDIRECTED);
		*cfg_out = cfg;
		return FSM_REDIRECT;
	}
	if (pod)
		fsm_count(pod_cg, FSM_COUNT_EXCLUDED);
	if (fsm_refused_at_connect(ctx, pod_cg, dst, port))
		return FSM_REFUSE;
	return FSM_PASS;
}

#endif /* FSM_CONNECT_H */
