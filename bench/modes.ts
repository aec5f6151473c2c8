import { EbpfDataplane } from '../src/dataplane/ebpf/index.js';
import { IptablesDataplane } from '../src/dataplane/iptables/index.js';
import type { Dataplane, InterceptionMode } from '../src/dataplane/types.js';
import type { TopoNode } from '../src/lab/topology.js';

/**
 * How each interception mode builds its dataplane for a topology node in the
 * benchmarks (enroll, datapath). A mode adds one entry; benches take
 * `--mode NAME` and run every mode listed here by default.
 */

export interface BenchDataplaneOptions {
  /** eBPF: sockmap fast path between pod and proxy sockets (modes without one ignore it). */
  fastPath?: boolean;
  /** Pods the dataplane must hold (map sizes, set sizes). */
  pods?: number;
}

export interface BenchMode {
  create(node: TopoNode, opts: BenchDataplaneOptions): Dataplane;
  /** The datapath variants worth measuring (label -> options); one entry for modes without knobs. */
  variants: Record<string, BenchDataplaneOptions>;
}

export const benchModes: Partial<Record<InterceptionMode, BenchMode>> = {
  ebpf: {
    create: (node, opts) =>
      new EbpfDataplane({
        pinDir: node.bpffsDir,
        podsCgroup: node.podsCgroup,
        proxyCgroup: node.proxyCgroup,
        fastPath: opts.fastPath ?? true,
        ...(opts.pods === undefined ? {} : { capacity: { pods: Math.max(opts.pods, 1024) } }),
      }),
    variants: { fastpath: { fastPath: true }, 'no-fastpath': { fastPath: false } },
  },
  // nat PREROUTING DNAT to the proxy in the node namespace; sets grow as needed, no knobs.
  iptables: {
    create: (node) => new IptablesDataplane({ netns: node.netns }),
    variants: { nat: {} },
  },
};

/** The modes a bench runs: --mode NAME, or all of them. */
export function selectModes(flag: string | boolean | undefined): Array<[InterceptionMode, BenchMode]> {
  const all = Object.entries(benchModes) as Array<[InterceptionMode, BenchMode]>;
  if (flag === undefined || flag === true) return all;
  const found = all.filter(([m]) => m === flag);
  if (found.length === 0) throw new Error(`unknown --mode ${JSON.stringify(flag)} (have: ${all.map(([m]) => m).join(', ')})`);
  return found;
}
