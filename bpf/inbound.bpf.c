/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup_skb/ingress, attached once to the pods' parent cgroup: strict
 * inbound. A new TCP connection (a SYN without ACK) to a socket of a strict
 * pod is dropped unless it comes from a node proxy or targets an excluded
 * inbound port. Everything else passes untouched; only SYNs cost a lookup.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "fsm_abi.h"
#include "fsm_maps.h"
#include "fsm_policy.h"

#define FSM_SKB_PASS 1
#define FSM_SKB_DROP 0

#define FSM_IP_FRAG_MASK 0x3fff /* MF flag + fragment offset */

SEC("cgroup_skb/ingress")
int fsm_inbound(struct __sk_buff *skb)
{
	struct iphdr ip;
	struct tcphdr tcp;
	struct fsm_pod *pod;
	__u64 pod_cg = 0;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return FSM_SKB_PASS;
	/* skb data starts at the network header in cgroup_skb programs. */
	if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
		return FSM_SKB_PASS;
	if (ip.protocol != IPPROTO_TCP || (ip.frag_off & bpf_htons(FSM_IP_FRAG_MASK)))
		return FSM_SKB_PASS;
	if (bpf_skb_load_bytes(skb, ip.ihl * 4, &tcp, sizeof(tcp)))
		return FSM_SKB_PASS;
	if (!tcp.syn || tcp.ack)
		return FSM_SKB_PASS;
	/* A pod talking to itself never crosses a proxy. */
	if (ip.saddr == ip.daddr)
		return FSM_SKB_PASS;
	pod = fsm_pod_of_skb(skb, &pod_cg);
	if (!pod || !fsm_inbound4_refused(pod_cg, pod, ip.saddr, bpf_ntohs(tcp.dest)))
		return FSM_SKB_PASS;
	fsm_count(pod_cg, FSM_COUNT_INBOUND_REFUSED);
	return FSM_SKB_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
