/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The interception decisions shared by connect4 and the inbound program:
 * which pod a socket belongs to, exclusions, strict inbound. Only helpers
 * that exist for cgroup sock_addr and cgroup_skb programs are used here.
 */
#ifndef FSM_POLICY_H
#define FSM_POLICY_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "fsm_abi.h"
#include "fsm_maps.h"

/*
 * Set by the agent before load (src/dataplane/ebpf/objects.ts): fixed for as
 * long as the programs stay attached to the same parent cgroup.
 * fsm_pods_parent_level: cgroup level of the pods' parent (root = 0).
 * fsm_pod_max_depth: how far below the parent a pod's processes may live
 * (kubelet: parent/<qos>/pod<uid>/<container> = 3).
 */
const volatile __u32 fsm_pods_parent_level = 0;
const volatile __u32 fsm_pod_max_depth = 3;

/* Upper bound of the ancestor walk, so the verifier sees a constant loop. */
#define FSM_POD_DEPTH_LIMIT 6

static __always_inline struct fsm_config *fsm_config_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&fsm_config, &zero);
}

/*
 * The enrolled pod a task belongs to: its own cgroup, or an ancestor between
 * the pods' parent and the task's cgroup (containers live below the pod's cgroup).
 */
static __always_inline struct fsm_pod *fsm_pod_of_current(__u64 *pod_cg)
{
	__u64 cg = bpf_get_current_cgroup_id();
	struct fsm_pod *pod = bpf_map_lookup_elem(&fsm_pods, &cg);

	if (pod) {
		*pod_cg = cg;
		return pod;
	}
	for (__u32 i = 1; i <= FSM_POD_DEPTH_LIMIT; i++) {
		if (i > fsm_pod_max_depth)
			break;
		cg = bpf_get_current_ancestor_cgroup_id(fsm_pods_parent_level + i);
		if (!cg)
			break;
		pod = bpf_map_lookup_elem(&fsm_pods, &cg);
		if (pod) {
			*pod_cg = cg;
			return pod;
		}
	}
	return NULL;
}

/* Same as fsm_pod_of_current for the socket that receives a packet. */
static __always_inline struct fsm_pod *fsm_pod_of_skb(struct __sk_buff *skb, __u64 *pod_cg)
{
	__u64 cg = bpf_skb_cgroup_id(skb);
	struct fsm_pod *pod = bpf_map_lookup_elem(&fsm_pods, &cg);

	if (pod) {
		*pod_cg = cg;
		return pod;
	}
	for (__u32 i = 1; i <= FSM_POD_DEPTH_LIMIT; i++) {
		if (i > fsm_pod_max_depth)
			break;
		cg = bpf_skb_ancestor_cgroup_id(skb, fsm_pods_parent_level + i);
		if (!cg)
			break;
		pod = bpf_map_lookup_elem(&fsm_pods, &cg);
		if (pod) {
			*pod_cg = cg;
			return pod;
		}
	}
	return NULL;
}

static __always_inline __u32 fsm_addr4_flags(__u32 ip4)
{
	struct fsm_addr_key key = { .prefixlen = FSM_ADDR_KEY_PREFIX_BITS + 32, .family = FSM_AF_INET, .addr = { ip4 } };
	__u32 *flags = bpf_map_lookup_elem(&fsm_addrs, &key);

	return flags ? *flags : 0;
}

static __always_inline int fsm_port_excluded(__u64 pod_cg, __u16 port, __u8 dir)
{
	struct fsm_port_key key = { .scope = pod_cg, .port = port, .dir = dir };

	if (bpf_map_lookup_elem(&fsm_ports, &key))
		return 1;
	key.scope = FSM_SCOPE_MESH;
	return bpf_map_lookup_elem(&fsm_ports, &key) != NULL;
}

/* Whether ip4 lies in a CIDR of the pod's list or the mesh-wide list of an LPM map. */
static __always_inline int fsm_cidr4_match(void *lpm, __u64 pod_cg, __u32 ip4)
{
	struct fsm_cidr_key key = {
		.prefixlen = FSM_CIDR_KEY_PREFIX_BITS + 32,
		.family = FSM_AF_INET,
		.scope = pod_cg,
		.addr = { ip4 },
	};

	if (bpf_map_lookup_elem(lpm, &key))
		return 1;
	key.scope = FSM_SCOPE_MESH;
	return bpf_map_lookup_elem(lpm, &key) != NULL;
}

/*
 * FSM annotation semantics: excluded ports and CIDRs are never redirected;
 * with an inclusion list only its CIDRs are; exclusions win over inclusions.
 */
static __always_inline int fsm_outbound4_excluded(__u64 pod_cg, const struct fsm_pod *pod, __u32 ip4, __u16 port)
{
	if (fsm_port_excluded(pod_cg, port, FSM_DIR_OUT))
		return 1;
	if (fsm_cidr4_match(&fsm_cidr_excl, pod_cg, ip4))
		return 1;
	if ((pod->flags & FSM_POD_HAS_INCLUDE) && !fsm_cidr4_match(&fsm_cidr_incl, pod_cg, ip4))
		return 1;
	return 0;
}

/* Strict inbound: a new connection to a strict pod must come from a node proxy or target an excluded inbound port. */
static __always_inline int fsm_inbound4_refused(__u64 pod_cg, const struct fsm_pod *pod, __u32 src_ip4, __u16 dport)
{
	if (!(pod->flags & FSM_POD_STRICT))
		return 0;
	if (fsm_addr4_flags(src_ip4) & FSM_ADDR_PROXY_SRC)
		return 0;
	return !fsm_port_excluded(pod_cg, dport, FSM_DIR_IN);
}

static __always_inline int fsm_is_loopback4(__u32 ip4)
{
	return (bpf_ntohl(ip4) >> 24) == 127;
}

enum fsm_counter { FSM_COUNT_REDIRECTED, FSM_COUNT_EXCLUDED, FSM_COUNT_INBOUND_REFUSED };

static __always_inline void fsm_count(__u64 pod_cg, enum fsm_counter which)
{
	struct fsm_stats *st = bpf_map_lookup_elem(&fsm_stats, &pod_cg);

	if (!st) {
		struct fsm_stats zero = {};

		bpf_map_update_elem(&fsm_stats, &pod_cg, &zero, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&fsm_stats, &pod_cg);
		if (!st)
			return;
	}
	/* Per-CPU values: plain increments are safe. */
	switch (which) {
	case FSM_COUNT_REDIRECTED:
		st->redirected++;
		break;
	case FSM_COUNT_EXCLUDED:
		st->excluded++;
		break;
	case FSM_COUNT_INBOUND_REFUSED:
		st->inbound_refused++;
		break;
	}
}

#endif /* FSM_POLICY_H */
