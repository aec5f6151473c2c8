import { performance } from 'node:perf_hooks';
import { noExclusions, type DesiredState, type PodIntercept } from '../src/dataplane/types.js';
import { Topology } from '../src/lab/topology.js';
import { createCgroup } from '../src/util/cgroup.js';
import { selectModes } from './modes.js';
import { intFlag, quantile, round, syntheticPod } from './util.js';

/**
 * enroll: how fast a dataplane takes pods in and out. On a one-node topology
 * with N pod cgroups made beforehand (no pod namespaces: enrolment does not
 * look at them), per mode:
 *   install      first apply with no pods (programs, maps, links);
 *   enrol-all    one apply with all N pods; remove-all: one apply with none;
 *   enrol-each   N applies adding one pod at a time (per-pod p50/p99);
 *   remove-each  N applies removing one pod at a time.
 * Target (issue 3): 1000 pods in under 0.5 s.
 *   npm run bench -- enroll [--pods 1000] [--mode ebpf]
 */

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const n = intFlag(flags, 'pods', 1000);
  if (n < 1 || n > 65_000) throw new Error(`--pods must be from 1 to 65000, got ${n}`);
  for (const [mode, impl] of selectModes(flags.mode)) {
    const topo = await Topology.create({ prefix: `fsmbench${process.pid}e`, nodes: 1 });
    try {
      const node = topo.nodes[0]!;
      const pods: PodIntercept[] = [];
      for (let i = 0; i < n; i++) {
        const p = syntheticPod(node.podsCgroup, i, { inbound: i % 2 === 0 ? 'strict' : 'permissive', exclusions: { ...noExclusions(), outboundPorts: [9000 + (i % 7)] } });
        await createCgroup(p.cgroupPath);
        pods.push(p);
      }
      const state = (ps: PodIntercept[]): DesiredState => ({
        proxy: { address: node.gateway, outboundPort: 15001, inboundPort: 15003, cgroupPath: node.proxyCgroup },
        nodeAddresses: [node.gateway, node.underlayIp],
        proxySources: [node.gateway],
        mesh: noExclusions(),
        pods: ps,
      });
      const dp = impl.create(node, { pods: n });
      try {
        const base = { bench: 'enroll', mode, pods: n };
        let t = performance.now();
        await dp.apply(state([]));
        yield { ...base, case: 'install', total_ms: round(performance.now() - t) };

        t = performance.now();
        const all = await dp.apply(state(pods));
        const enrolled = (await dp.installed()).pods.length;
        if (enrolled !== n) throw new Error(`${mode}: ${enrolled} pods installed after enrolling ${n}`);
        yield { ...base, case: 'enrol-all', total_ms: round(performance.now() - t), changes: all.changes };

        t = performance.now();
        await dp.apply(state([]));
        yield { ...base, case: 'remove-all', total_ms: round(performance.now() - t) };

        for (const [name, sequence] of [
          ['enrol-each', pods.map((_, i) => pods.slice(0, i + 1))],
          ['remove-each', pods.map((_, i) => pods.slice(i + 1))],
        ] as const) {
          const each: number[] = [];
          const t0 = performance.now();
          for (const ps of sequence) {
            const s = performance.now();
            await dp.apply(state(ps));
            each.push((performance.now() - s) * 1000);
          }
          yield {
            ...base,
            case: name,
            total_ms: round(performance.now() - t0),
            p50_us: round(quantile(each, 0.5), 1),
            p99_us: round(quantile(each, 0.99), 1),
            max_us: round(Math.max(...each), 1),
          };
        }
      } finally {
        await dp.cleanup();
      }
    } finally {
      await topo.destroy();
    }
  }
}
