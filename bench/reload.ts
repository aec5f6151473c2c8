import { once } from 'node:events';
import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createDataplane } from '../src/dataplane/index.js';
import { noExclusions, type Dataplane } from '../src/dataplane/types.js';
import { Topology, type TopoNode, type TopoPod } from '../src/lab/topology.js';
import { parseResilienceDefaults, parseRetrySpec } from '../src/policy/resilience.js';
import { NodePolicySchema, POLICY_API_VERSION, type NodePolicy } from '../src/policy/schema.js';
import { renderProxyConfig, type ProxyConfig } from '../src/proxy/config.js';
import type { ReloadMode } from '../src/proxy/handover.js';
import { pipyBinary } from '../src/proxy/pipy.js';
import { ProxySupervisor } from '../src/proxy/supervisor.js';
import { RATE_LOAD, type LoadRun } from './failover.js';
import type { BenchFlags } from './run.js';
import { intFlag, quantile, round } from './util.js';

/**
 * reload: policy changes under load through the supervised node proxy (the
 * project's program), the two reload modes side by side in one run (issue
 * 19). One node: pod A sends --rate GETs/s (keep-alive, bench/failover.ts's
 * load generator) to service slow (pod B), which answers after 150 ms and
 * every tenth time with a 503 that a Retry (backoff 50 ms) hides, so
 * requests are in flight, some between two attempts, at every change.
 * Per round and mode: a fresh supervisor, --changes deliveries --gap-ms
 * apart, the failed requests counted. Modes alternate (signal, handover,
 * signal, ...) so both see the same machine. Needs root (namespaces) and Pipy.
 *
 *   npm run bench -- reload [--rounds 2] [--changes 5] [--gap-ms 1000] [--rate 100]
 */

export const RELOAD_NS = 'rel';
export const RELOAD_PORT = 8080;
export const RELOAD_VIP = '10.96.9.9';
const DELAY_MS = 150;

/** The slow, flaky server of pod B (argv[1]: the pod's name). */
export const FLAKY_SLOW_SERVER = `
let n = 0;
require('node:http').createServer((req, res) => setTimeout(() => {
  if (++n % 10 === 0) { res.statusCode = 503; res.end('flaky'); return; }
  res.end(JSON.stringify({ pod: process.argv[1] }));
}, ${DELAY_MS})).listen(${RELOAD_PORT}, () => console.log('listening'));
`;

const RETRY = { source: { kind: 'ServiceAccount', name: 'client' }, destinations: [{ kind: 'Service', name: 'slow' }], retryPolicy: { retryOn: '5xx,reset,connect-failure', numRetries: 3, retryBackoffBaseInterval: '50ms' } };

/** The node's policy in generation `g`: every generation changes a mesh-wide default (and the version). */
export function reloadPolicy(node: TopoNode, A: TopoPod, B: TopoPod, g: number): NodePolicy {
  const sa = new Map([[A, 'client'], [B, 'slow']]);
  return NodePolicySchema.parse({
    apiVersion: POLICY_API_VERSION,
    kind: 'NodePolicy',
    mesh: { name: 'fsmt', inbound: 'permissive', interceptionMode: 'iptables', egress: 'allow', trafficPolicy: 'permissive', exclusions: noExclusions() },
    proxies: [{ node: node.name, addresses: [node.underlayIp, node.gateway] }],
    resilience: { defaults: parseResilienceDefaults({ requestTimeout: `${20 + g}s` }), retries: [{ namespace: RELOAD_NS, name: 'client-to-slow', ...parseRetrySpec(RETRY, RELOAD_NS) }], upstreams: [] },
    node: { name: node.name, addresses: [node.gateway, node.underlayIp], interceptionMode: null },
    meshPods: [A, B].map((p) => ({ ip: p.ip, namespace: RELOAD_NS, serviceAccount: sa.get(p)!, node: node.name })),
    pods: [A, B].map((p) => ({ uid: `uid-${p.name}`, namespace: RELOAD_NS, name: p.name, ip: p.ip, serviceAccount: sa.get(p)!, cgroup: { qosClass: null, path: p.cgroupPath }, exclusions: noExclusions() })),
    access: [],
    services: [
      {
        namespace: RELOAD_NS,
        name: 'slow',
        clusterIPs: [RELOAD_VIP],
        ports: [{ name: 'http', port: RELOAD_PORT, protocol: 'TCP' as const, appProtocol: 'http' }],
        endpoints: [{ ip: B.ip, ports: { http: RELOAD_PORT }, node: node.name, pod: { namespace: RELOAD_NS, name: B.name }, serviceAccount: 'slow' }],
      },
    ],
    splits: [],
    version: (0xb000 + g).toString(16).padStart(16, '0'),
  });
}

export const reloadConfig = (node: TopoNode, A: TopoPod, B: TopoPod, g: number): ProxyConfig => renderProxyConfig(reloadPolicy(node, A, B, g), { outboundPort: 15001, inboundPort: 15003 });

/** The iptables dataplane intercepting A and B for the proxy in the node's proxy cgroup. */
export async function reloadDataplane(node: TopoNode, pods: TopoPod[], stateDir: string): Promise<Dataplane> {
  const dp = createDataplane('iptables', { stateDir, bpffsDir: node.bpffsDir, podsCgroup: node.podsCgroup, proxyCgroup: node.proxyCgroup, netns: node.netns });
  await dp.apply({
    proxy: { address: node.gateway, outboundPort: 15001, inboundPort: 15003, cgroupPath: node.proxyCgroup },
    nodeAddresses: [node.gateway, node.underlayIp],
    proxySources: [node.gateway, node.underlayIp],
    mesh: noExclusions(),
    pods: pods.map((p) => ({ uid: `uid-${p.name}`, namespace: RELOAD_NS, name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive' as const, exclusions: noExclusions() })),
  });
  return dp;
}

/** GETs at `rate`/s for `seconds` from `from` to the service; `during` runs alongside. */
export async function reloadLoad(from: TopoPod, rate: number, seconds: number, during: () => Promise<void>): Promise<LoadRun> {
  const child = from.exec(process.execPath, ['-e', RATE_LOAD, `http://${RELOAD_VIP}:${RELOAD_PORT}/`, String(rate), String(seconds)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout?.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exited = once(child, 'exit');
  await during();
  await exited;
  return JSON.parse(out.trim().split('\n').pop() ?? '') as LoadRun;
}

/** Failed requests by status and error ("0 ECONNRESET", "503 flaky"). */
export function reloadFailures(run: LoadRun): Record<string, number> {
  const out: Record<string, number> = {};
  for (const r of run.records) if (r[2] !== 200) out[`${r[2]} ${r[3]}`] = (out[`${r[2]} ${r[3]}`] ?? 0) + 1;
  return out;
}

export async function* run(flags: BenchFlags): AsyncIterable<object> {
  const rounds = intFlag(flags, 'rounds', 2);
  const changes = intFlag(flags, 'changes', 5);
  const gapMs = intFlag(flags, 'gap-ms', 1000);
  const rate = intFlag(flags, 'rate', 100);
  const pipy = pipyBinary();
  if (!pipy) throw new Error('no Pipy binary: set PIPY_BIN or put pipy on PATH');
  const work = mkdtempSync(join(tmpdir(), 'fsmbench-reload-'));
  const topo = await Topology.create({ prefix: `fsmbench${process.pid % 100000}r`, nodes: 1, podsPerNode: 0 });
  let server: ChildProcess | undefined;
  let dp: Dataplane | undefined;
  try {
    const node = topo.nodes[0]!;
    const A = await topo.addPod(node, 'a');
    const B = await topo.addPod(node, 'b');
    server = B.exec(process.execPath, ['-e', FLAKY_SLOW_SERVER, B.name], { stdio: ['ignore', 'pipe', 'pipe'] });
    await new Promise<void>((resolve, reject) => {
      server!.stdout!.on('data', (d: Buffer) => d.toString().includes('listening') && resolve());
      server!.once('exit', (code) => reject(new Error(`server exited ${code}`)));
    });
    dp = await reloadDataplane(node, [A, B], join(work, 'dataplane'));
    let n = 0;
    for (let k = 0; k < rounds; k++) {
      for (const mode of ['signal', 'handover'] as ReloadMode[]) {
        const sup = new ProxySupervisor({
          kind: 'pipy', stateDir: join(work, `state-${n++}`), cgroup: node.proxyCgroup, netns: node.netns, address: node.gateway,
          outboundPort: 15001, inboundPort: 15003, checkIntervalMs: 100, pipy: { bin: pipy, threadCap: 2, reload: mode },
          initialConfig: reloadConfig(node, A, B, 0), drainMs: 5000,
        });
        try {
          await sup.start();
          await sup.waitReady(15_000, { all: true });
          const ms: number[] = [];
          const r = await reloadLoad(A, rate, Math.ceil((changes * gapMs) / 1000) + 3, async () => {
            await new Promise((res) => setTimeout(res, 1500));
            for (let g = 1; g <= changes; g++) {
              ms.push((await sup.deliver(reloadConfig(node, A, B, g))).ms);
              await new Promise((res) => setTimeout(res, gapMs));
            }
          });
          const failed = r.records.filter((x) => x[2] !== 200).length;
          ms.sort((a, b) => a - b);
          yield {
            bench: 'reload', round: k, mode, changes, gap_ms: gapMs, rate, requests: r.records.length, failed, failures: reloadFailures(r),
            deliver_p50_ms: round(quantile(ms, 0.5), 1), deliver_max_ms: round(ms[ms.length - 1] ?? 0, 1), loadavg: loadavg().map((x) => round(x, 2)),
          };
        } finally {
          await sup.stop(2000);
        }
      }
    }
  } finally {
    await dp?.cleanup().catch(() => undefined);
    server?.kill('SIGKILL');
    await topo.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}
