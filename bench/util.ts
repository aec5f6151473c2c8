import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { noExclusions, type PodIntercept } from '../src/dataplane/types.js';
import type { TopoNode } from '../src/lab/topology.js';
import type { NodePolicy } from '../src/policy/schema.js';
import { renderProxyConfig, type ProxyNodeFacts } from '../src/proxy/config.js';
import { ProxySupervisor, type ProxySupervisorOptions } from '../src/proxy/supervisor.js';

/** Small helpers shared by the benchmarks. */

export function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? NaN;
}

export const round = (x: number, digits = 3): number => Math.round(x * 10 ** digits) / 10 ** digits;

/** CPU time (µs) a cgroup's processes have used: cgroup v2 cpu.stat usage_usec. */
export function cgroupCpuUs(cgroup: string): number {
  const m = /^usage_usec (\d+)$/m.exec(readFileSync(join(cgroup, 'cpu.stat'), 'utf8'));
  if (!m) throw new Error(`no usage_usec in ${cgroup}/cpu.stat`);
  return Number(m[1]);
}

export function intFlag(flags: Record<string, string | boolean>, name: string, dflt: number): number {
  const v = flags[name];
  if (v === undefined) return dflt;
  const n = Number(v);
  if (typeof v !== 'string' || !Number.isInteger(n) || n < 0) throw new Error(`--${name} must be a non-negative integer, got ${JSON.stringify(v)}`);
  return n;
}

/**
 * The i-th synthetic pod of a benchmark: a cgroup under podsCgroup (made by the
 * bench beforehand) and a made-up address in 10.200.0.0/16 that only the
 * dataplane's maps and sets ever see.
 */
export function syntheticPod(podsCgroup: string, i: number, extra: Partial<PodIntercept> = {}): PodIntercept {
  return {
    uid: `bench-${i}`,
    namespace: 'bench',
    name: `p${i}`,
    ip: `10.200.${i >> 8}.${i & 255}`,
    cgroupPath: join(podsCgroup, `p${i}`),
    inbound: 'permissive',
    exclusions: noExclusions(),
    ...extra,
  };
}

/**
 * A topology node's proxy as the agent runs it: the supervisor in the node's
 * proxy cgroup and namespace, on the node's gateway address, started from the
 * config rendered for `policy` and the node's `facts` (ports; with a trust
 * bundle and identity files, mutual TLS tunnels); `extra` sets what a
 * benchmark varies.
 */
export function nodeProxy(node: TopoNode, policy: NodePolicy, stateDir: string, facts: ProxyNodeFacts, extra: Partial<ProxySupervisorOptions> = {}): ProxySupervisor {
  return new ProxySupervisor({
    kind: 'pipy',
    stateDir,
    cgroup: node.proxyCgroup,
    netns: node.netns,
    address: node.gateway,
    outboundPort: facts.outboundPort,
    inboundPort: facts.inboundPort,
    initialConfig: renderProxyConfig(policy, facts),
    ...extra,
  });
}

/**
 * How the drains of a supervisor's retired instances ended: proxy/drain.js's
 * lines ("drained", "idle", "deadline") in the instance logs of its state
 * directory, and `startedWhileDraining`: the requests and tunnels those
 * instances took after their drain began, summed.
 */
export function drainEnds(stateDir: string): Record<string, number> {
  const out: Record<string, number> = { startedWhileDraining: 0 };
  for (const f of readdirSync(stateDir).filter((n) => /^proxy-\d+\.log(\.1)?$/.test(n))) {
    for (const m of readFileSync(join(stateDir, f), 'utf8').matchAll(/fsmn-proxy drain (\w+) .*started while draining (\d+)/g)) {
      out[m[1]!] = (out[m[1]!] ?? 0) + 1;
      out.startedWhileDraining! += Number(m[2]);
    }
  }
  return out;
}
