import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { EbpfDataplane } from '../../src/dataplane/ebpf/dataplane.js';
import { IptablesDataplane } from '../../src/dataplane/iptables/index.js';
import type { Dataplane, InterceptionMode } from '../../src/dataplane/types.js';
import type { TopoNode } from '../../src/lab/topology.js';
import { run } from '../../src/util/exec.js';
import { bpfObjectShow } from './bpf-objects.js';

/**
 * Every dataplane mode the conformance suite (test/kernel/conformance.test.ts)
 * runs against, and what the suite needs to know about each without knowing
 * its internals. A mode adds one entry here.
 */

/** What a dataplane needs to know about a topology node; plain data, so a child process gets it as JSON. */
export type NodeSpec = Pick<TopoNode, 'name' | 'netns' | 'gateway' | 'underlayIp' | 'podCidr' | 'podsCgroup' | 'proxyCgroup' | 'bpffsDir'>;

export function nodeSpec(n: TopoNode): NodeSpec {
  const { name, netns, gateway, underlayIp, podCidr, podsCgroup, proxyCgroup, bpffsDir } = n;
  return { name, netns, gateway, underlayIp, podCidr, podsCgroup, proxyCgroup, bpffsDir };
}

export interface DataplaneOptions {
  /** eBPF: the sockmap fast path between pod and proxy sockets. Modes without one ignore it. */
  fastPath?: boolean;
}

export interface DataplaneMode {
  create(node: NodeSpec, opts?: DataplaneOptions): Dataplane;
  /**
   * Kernel objects of this mode on the node that exist now, one line each
   * (pins, attachments, rules, and every object seen by an earlier call that
   * still exists): [] before the first apply and after cleanup.
   */
  footprint(node: NodeSpec): Promise<string[]>;
  /** The part of installed().detail that adoption must keep unchanged (ids of kernel objects). */
  identity(detail: Record<string, unknown>): unknown;
  /**
   * Whether the mode recognises pods by their cgroup, and so refuses a pod
   * whose cgroup does not exist. iptables recognises pods by address (and
   * must work on nodes without cgroup v2): a missing cgroup is no error there.
   */
  podsByCgroup: boolean;
}

// ---- eBPF --------------------------------------------------------------------------------

function pinsUnder(dir: string): string[] {
  if (!existsSync(dir)) return [];
  const out: string[] = [];
  for (const e of readdirSync(dir)) {
    const p = join(dir, e);
    out.push(p);
    if (statSync(p).isDirectory()) out.push(...pinsUnder(p));
  }
  return out;
}

async function bpftoolJson<T>(args: string[]): Promise<T[]> {
  const r = await run('bpftool', ['-j', ...args], { allowFail: true });
  if (r.code !== 0 || r.stdout.trim() === '') return [];
  return JSON.parse(r.stdout) as T[];
}

/** Ids of maps, programs and links each node's dataplane ever showed, so a leak without pins is still found. */
const seenIds = new Map<string, { map: Set<number>; prog: Set<number>; link: Set<number> }>();

async function ebpfFootprint(node: NodeSpec): Promise<string[]> {
  const seen = seenIds.get(node.bpffsDir) ?? { map: new Set<number>(), prog: new Set<number>(), link: new Set<number>() };
  seenIds.set(node.bpffsDir, seen);
  const lines = pinsUnder(node.bpffsDir).map((p) => `pin ${p}`);
  const cgroupIds = new Set([node.podsCgroup, node.proxyCgroup].filter(existsSync).map((p) => statSync(p, { bigint: true }).ino));
  for (const cg of [node.podsCgroup, node.proxyCgroup]) {
    if (!existsSync(cg)) continue;
    for (const a of await bpftoolJson<{ id: number; attach_type: string; name: string }>(['cgroup', 'show', cg])) {
      lines.push(`attachment ${cg} ${a.attach_type} prog ${a.id} ${a.name}`);
      seen.prog.add(a.id);
    }
  }
  for (const l of await bpftoolJson<{ id: number; prog_id: number; cgroup_id?: number }>(['link', 'show'])) {
    if (l.cgroup_id !== undefined && cgroupIds.has(BigInt(l.cgroup_id))) seen.link.add(l.id);
  }
  for (const p of pinsUnder(node.bpffsDir)) {
    for (const kind of ['map', 'prog', 'link'] as const) {
      const r = await run('bpftool', ['-j', kind, 'show', 'pinned', p], { allowFail: true });
      if (r.code !== 0) continue;
      seen[kind].add((JSON.parse(r.stdout) as { id: number }).id);
      break;
    }
  }
  // Each id asked for in its own kind, not looked up in a global listing
  // (see bpf-objects.ts); a bpftool failure throws instead of reading as "none".
  const alive = async (kind: 'map' | 'prog' | 'link'): Promise<void> => {
    for (const id of [...seen[kind]].sort((x, y) => x - y)) {
      const o = await bpfObjectShow({ kind, id });
      if (o) lines.push(`${kind} ${o.id} ${o.name ?? ''}`.trim());
    }
  };
  await alive('map');
  await alive('prog');
  await alive('link');
  return lines.sort();
}

const ebpf: DataplaneMode = {
  create: (node, opts = {}) =>
    new EbpfDataplane({ pinDir: node.bpffsDir, podsCgroup: node.podsCgroup, proxyCgroup: node.proxyCgroup, fastPath: opts.fastPath ?? true }),
  footprint: ebpfFootprint,
  identity: (detail) => ({ links: detail.links, programs: detail.programs, maps: detail.maps }),
  podsByCgroup: true,
};

// ---- iptables ----------------------------------------------------------------------------

/** Lines of both iptables backends and the ipsets in the node namespace that carry our prefix. */
async function iptablesFootprint(node: NodeSpec): Promise<string[]> {
  const inNode = (cmd: string, args: string[]) => run('nsenter', [`--net=/run/netns/${node.netns}`, '--', cmd, ...args], { allowFail: true });
  const lines: string[] = [];
  for (const backend of ['legacy', 'nft']) {
    const r = await inNode(`iptables-${backend}-save`, []);
    for (const l of r.stdout.split('\n')) if (!l.startsWith('#') && /fsmn/i.test(l)) lines.push(`${backend} ${l}`);
  }
  const sets = await inNode('ipset', ['list', '-n']);
  for (const l of sets.stdout.split('\n')) if (/^fsmn-/.test(l)) lines.push(`ipset ${l}`);
  return lines.sort();
}

const iptables: DataplaneMode = {
  create: (node) => new IptablesDataplane({ netns: node.netns }),
  footprint: iptablesFootprint,
  // Sets keep their kernel hash seed for life: a re-created set would show a new one.
  identity: (detail) => ({ backend: detail.backend, chains: detail.chains, setIds: detail.setIds }),
  podsByCgroup: false,
};

export const dataplaneModes: Partial<Record<InterceptionMode, DataplaneMode>> = { ebpf, iptables };
