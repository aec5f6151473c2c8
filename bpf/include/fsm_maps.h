/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every map of the data path, defined once. Each object includes this header;
 * the maps are pinned by name (LIBBPF_PIN_BY_NAME) under the agent's pin
 * directory, so all programs share one instance of each map and the maps
 * outlive the agent. The sizes here are defaults: the agent sets the real
 * ones with setMaxEntries before load (src/dataplane/ebpf/objects.ts), the
 * same for every object, or libbpf refuses to reuse the pinned map.
 *
 * Who writes what:
 *   agent (src/dataplane/ebpf/dataplane.ts, from render.ts):
 *     fsm_config, fsm_pods, fsm_pod_ips, fsm_addrs, fsm_ports,
 *     fsm_cidr_excl, fsm_cidr_incl, fsm_meta; it deletes fsm_stats entries
 *     of pods it removes.
 *   programs: fsm_cookie_orig (connect4), fsm_seq_orig, fsm_tuple_orig and
 *     fsm_sockhash (sockops), fsm_sk_state and fsm_fastpath_stats (sk_msg),
 *     fsm_stats (all).
 */
#ifndef FSM_MAPS_H
#define FSM_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "fsm_abi.h"

#define FSM_DEFAULT_PODS 8192
#define FSM_DEFAULT_RULES 65536
#define FSM_DEFAULT_CONNS 65536

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fsm_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_config SEC(".maps");

/* Enrolment: a pod is intercepted while its cgroup id is a key here. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FSM_DEFAULT_PODS);
	__type(key, __u64);
	__type(value, struct fsm_pod);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_pods SEC(".maps");

/* Address of each enrolled pod of this node -> its cgroup id (strict inbound at connect, fast path). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FSM_DEFAULT_PODS);
	__type(key, struct fsm_ip);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_pod_ips SEC(".maps");

/* Node addresses and node proxy sources (CIDRs) -> FSM_ADDR_* flags. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__type(key, struct fsm_addr_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_addrs SEC(".maps");

/* Excluded ports, mesh-wide (scope 0) and per pod, outbound and inbound. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FSM_DEFAULT_RULES);
	__type(key, struct fsm_port_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_ports SEC(".maps");

/* Outbound CIDRs never redirected, mesh-wide and per pod. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, FSM_DEFAULT_RULES);
	__type(key, struct fsm_cidr_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_cidr_excl SEC(".maps");

/* Outbound inclusion lists: with FSM_POD_HAS_INCLUDE only these destinations are redirected. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, FSM_DEFAULT_RULES);
	__type(key, struct fsm_cidr_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_cidr_incl SEC(".maps");

/* connect4 -> sockops: the original destination of a redirected socket, by socket cookie. LRU: a connect that never completes must not leak. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FSM_DEFAULT_CONNS);
	__type(key, __u64);
	__type(value, struct fsm_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_cookie_orig SEC(".maps");

/* sockops (pod side) -> sockops (proxy side): the original destination by sequence numbers, between the two ends' establishment. LRU: a handshake the proxy never completes must not leak. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FSM_DEFAULT_CONNS);
	__type(key, struct fsm_seq_key);
	__type(value, struct fsm_pending);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_seq_orig SEC(".maps");

/* sockops (proxy side) -> getsockopt: the original destination by the 4-tuple the proxy's socket has. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, FSM_DEFAULT_CONNS);
	__type(key, struct fsm_tuple);
	__type(value, struct fsm_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_tuple_orig SEC(".maps");

/* Fast path: pod and proxy sockets on this node by their own 4-tuple (local = s). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, FSM_DEFAULT_CONNS);
	__type(key, struct fsm_tuple);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_sockhash SEC(".maps");

/* Fast path decision per socket (FSM_SK_*), made once at the socket's first send. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_sk_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, FSM_DEFAULT_PODS);
	__type(key, __u64);
	__type(value, struct fsm_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fsm_fastpath_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_fastpath_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fsm_meta);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fsm_meta SEC(".maps");

#endif /* FSM_MAPS_H */
