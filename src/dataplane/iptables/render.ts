import { cidrSetMember, cidrText, formatIPv4, type Cidr } from '../../util/ipv4.js';
import type { Names, Table } from './names.js';
import type { NormalPod, NormalState } from './validate.js';

/**
 * The pure half of the iptables dataplane: a validated desired state in, the
 * complete set of our chains, jump rules and ipsets out, every line in the
 * exact text iptables-save / ipset save print, so "is the kernel already
 * right?" is a string comparison.
 *
 * Shape (nat, in the node namespace, where pod traffic is routed through):
 *
 *   PREROUTING  -p tcp -m set --match-set fsmn-pods src -j FSMN_OUTBOUND
 *   FSMN_OUTBOUND: loopback, node-local and node addresses RETURN;
 *     mesh-wide excluded ports (multiport) and CIDRs RETURN;
 *     per-pod excluded ports RETURN (set fsmn-out-ports, src,dst);
 *     per-pod excluded / included CIDRs (rules, see below);
 *     everything else DNAT to proxy.address:outboundPort.
 *
 * and (filter) strict inbound:
 *
 *   FORWARD -p tcp -m set --match-set fsmn-strict dst -j FSMN_INBOUND
 *   FSMN_INBOUND: not NEW RETURN; from a node proxy (fsmn-proxy-src) RETURN;
 *     mesh-wide (multiport) and per-pod (fsmn-in-ports, dst,dst) inbound
 *     exclusions RETURN; else REJECT --reject-with tcp-reset.
 *
 * Why this split: everything that changes when a pod comes or goes lives in
 * sets, so enrolling a pod without CIDR annotations is one `add` (plus one
 * per excluded port or strict flag) and the rules stay byte-identical: no
 * iptables-restore at all. Per-pod CIDR lists become `-s pod/32` rules
 * because the set type that would hold (pod, CIDR) pairs, hash:net,net, is
 * missing from many edge kernels (this project's CI kernel included); such
 * annotations are rare, so a rewrite of one chain for those pods is the
 * honest price.
 *
 * The proxy's own connections are never captured: the proxy runs in the node
 * namespace, so they leave through OUTPUT, and we install nothing there.
 */

export type SetType = 'hash:ip' | 'hash:ip,port' | 'hash:net';

export interface SetSpec {
  name: string;
  type: SetType;
  /** Members carry a comment (the pods set: the pod uid). */
  comment: boolean;
  /** member text as ipset save prints it -> comment (undefined when the set has none). */
  members: Map<string, string | undefined>;
}

export interface TableSpec {
  /** nat or filter when rendered; any table name when read back for cleanup. */
  table: string;
  /** Our chains in a stable order -> their rules, each a full `-A CHAIN ...` line. */
  chains: Map<string, string[]>;
  /** Jump rules in built-in chains, each a full `-A BUILTIN ... -j OURCHAIN` line. */
  jumps: string[];
}

export interface Rendered {
  sets: SetSpec[];
  tables: Record<Table, TableSpec>;
  /**
   * How many of our rules name each set. The kernel reports the same number
   * as the set's "References", which makes a cheap tamper check: a deleted
   * jump or a flushed chain drops it.
   */
  references: Map<string, number>;
}

const OUTBOUND_COMMENT = '"fsm-node: mesh pods outbound TCP to the node proxy"';
const INBOUND_COMMENT = '"fsm-node: strict inbound for mesh pods"';
/** multiport takes at most 15 ports per rule. */
const MULTIPORT_MAX = 15;

/** `-d` as iptables-save prints it: omitted for 0.0.0.0/0. */
function dst(c: Cidr): string {
  return c.prefix === 0 ? '' : ` -d ${cidrText(c)}`;
}

function src(ip: number): string {
  return ` -s ${formatIPv4(ip)}/32`;
}

function chunks<T>(items: T[], size: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

function multiportReturns(chain: string, ports: number[]): string[] {
  return chunks(ports, MULTIPORT_MAX).map((c) => `-A ${chain} -p tcp -m multiport --dports ${c.join(',')} -j RETURN`);
}

function renderOutbound(state: NormalState, names: Names): string[] {
  const chain = names.chains.outbound;
  const redirect = `-p tcp -j DNAT --to-destination ${formatIPv4(state.proxy.address)}:${state.proxy.outboundPort}`;
  const rules = [`-A ${chain} -d 127.0.0.0/8 -j RETURN`, `-A ${chain} -m addrtype --dst-type LOCAL -j RETURN`];
  for (const addr of state.nodeAddresses) rules.push(`-A ${chain} -d ${formatIPv4(addr)}/32 -j RETURN`);
  rules.push(...multiportReturns(chain, state.mesh.outboundPorts));
  rules.push(`-A ${chain} -m set --match-set ${names.sets.outPorts} src,dst -j RETURN`);
  for (const c of state.mesh.outboundCidrs) rules.push(`-A ${chain}${dst(c)} -j RETURN`);
  // Per-pod rules in address order, whatever order the pods came in.
  const byAddress = (pods: NormalPod[]): NormalPod[] => pods.sort((a, b) => a.ip - b.ip);
  for (const pod of byAddress(state.pods.filter((p) => p.exclusions.outboundCidrs.length > 0))) {
    for (const c of pod.exclusions.outboundCidrs) rules.push(`-A ${chain}${src(pod.ip)}${dst(c)} -j RETURN`);
  }
  // Inclusion lists (FSM semantics): a pod's effective list is the mesh-wide
  // one plus its own; when that is non-empty only destinations inside it are
  // redirected. Exclusions above still win.
  const ownIncludes = byAddress(state.pods.filter((p) => p.exclusions.outboundIncludeCidrs.length > 0));
  for (const pod of ownIncludes) {
    for (const c of pod.exclusions.outboundIncludeCidrs) rules.push(`-A ${chain}${src(pod.ip)}${dst(c)} ${redirect}`);
  }
  for (const c of state.mesh.outboundIncludeCidrs) rules.push(`-A ${chain}${dst(c)} ${redirect}`);
  if (state.mesh.outboundIncludeCidrs.length === 0) {
    for (const pod of ownIncludes) rules.push(`-A ${chain}${src(pod.ip)} -j RETURN`);
    rules.push(`-A ${chain} ${redirect}`);
  }
  return rules;
}

function renderInbound(state: NormalState, names: Names): string[] {
  const chain = names.chains.inbound;
  return [
    `-A ${chain} -m conntrack ! --ctstate NEW -j RETURN`,
    `-A ${chain} -m set --match-set ${names.sets.proxySources} src -j RETURN`,
    ...multiportReturns(chain, state.mesh.inboundPorts),
    `-A ${chain} -m set --match-set ${names.sets.inPorts} dst,dst -j RETURN`,
    `-A ${chain} -p tcp -j REJECT --reject-with tcp-reset`,
  ];
}

/** One member of one of our sets, as ipset save prints it. */
export interface SetMember {
  set: string;
  member: string;
  comment: string | undefined;
}

/**
 * The set members one pod contributes. Every pod member is keyed by the
 * pod's address (unique on a node), so pods never share a member and a
 * pod's entries can be added and removed on their own.
 */
export function podMembers(pod: NormalPod, names: Names): SetMember[] {
  const out: SetMember[] = [{ set: names.sets.pods, member: pod.ipText, comment: pod.uid }];
  for (const p of pod.exclusions.outboundPorts) out.push({ set: names.sets.outPorts, member: `${pod.ipText},tcp:${p}`, comment: undefined });
  if (pod.strict) {
    out.push({ set: names.sets.strict, member: pod.ipText, comment: undefined });
    for (const p of pod.exclusions.inboundPorts) out.push({ set: names.sets.inPorts, member: `${pod.ipText},tcp:${p}`, comment: undefined });
  }
  return out;
}

export function proxySourceMembers(state: NormalState): Map<string, undefined> {
  return new Map(state.proxySources.map((c) => [cidrSetMember(c), undefined]));
}

export function renderSets(state: NormalState, names: Names): SetSpec[] {
  const specs: SetSpec[] = [
    { name: names.sets.pods, type: 'hash:ip', comment: true, members: new Map() },
    { name: names.sets.strict, type: 'hash:ip', comment: false, members: new Map() },
    { name: names.sets.outPorts, type: 'hash:ip,port', comment: false, members: new Map() },
    { name: names.sets.inPorts, type: 'hash:ip,port', comment: false, members: new Map() },
    { name: names.sets.proxySources, type: 'hash:net', comment: false, members: proxySourceMembers(state) },
  ];
  const byName = new Map(specs.map((s) => [s.name, s.members]));
  for (const pod of state.pods) {
    for (const m of podMembers(pod, names)) byName.get(m.set)?.set(m.member, m.comment);
  }
  return specs;
}

/** Rules only (no sets): what changes when mesh-wide config or per-pod CIDR lists change. */
export function renderTables(state: NormalState, names: Names): Record<Table, TableSpec> {
  const { outbound, inbound } = names.chains;
  return {
    nat: {
      table: 'nat',
      chains: new Map([[outbound, renderOutbound(state, names)]]),
      jumps: [`-A PREROUTING -p tcp -m set --match-set ${names.sets.pods} src -m comment --comment ${OUTBOUND_COMMENT} -j ${outbound}`],
    },
    filter: {
      table: 'filter',
      chains: new Map([[inbound, renderInbound(state, names)]]),
      jumps: [`-A FORWARD -p tcp -m set --match-set ${names.sets.strict} dst -m comment --comment ${INBOUND_COMMENT} -j ${inbound}`],
    },
  };
}

export function countReferences(tables: Record<Table, TableSpec>, names: Names): Map<string, number> {
  const refs = new Map(Object.values(names.sets).map((s) => [s, 0]));
  for (const spec of Object.values(tables)) {
    const lines = [...spec.jumps, ...[...spec.chains.values()].flat()];
    for (const line of lines) {
      for (const m of line.matchAll(/--match-set (\S+) /g)) {
        const name = m[1] as string;
        if (refs.has(name)) refs.set(name, (refs.get(name) ?? 0) + 1);
      }
    }
  }
  return refs;
}

export function render(state: NormalState, names: Names): Rendered {
  const sets = renderSets(state, names);
  const tables = renderTables(state, names);
  return { sets, tables, references: countReferences(tables, names) };
}
