import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { noExclusions } from '../src/dataplane/types.js';
import { IptablesDataplane } from '../src/dataplane/iptables/index.js';
import { renderLossCommands, writePodFault, type PodFault } from '../src/lab/faults.js';
import { Topology, type TopoNode, type TopoPod } from '../src/lab/topology.js';
import { parseResilienceDefaults, parseRetrySpec, parseUpstreamSpec } from '../src/policy/resilience.js';
import { NodePolicySchema, POLICY_API_VERSION, type NodePolicy, type Resilience } from '../src/policy/schema.js';
import { renderProxyConfig } from '../src/proxy/config.js';
import type { ProxySupervisor } from '../src/proxy/supervisor.js';
import { run as exec } from '../src/util/exec.js';
import { intFlag, nodeProxy, quantile, round } from './util.js';

/**
 * resilience: what the policies of issue 18 buy under the lab's faults, in
 * one run, side by side. A real two-node mesh (network namespaces, iptables
 * interception, the project's Pipy program on each node, mutual-TLS-less
 * tunnels between the node proxies):
 *
 *   n1: A (client, sa client), B1, B2 (sa echo)      n2: C (sa echo)
 *   service echo = B1, B2, C
 *
 * For each fault, N GETs from A to echo (each on its own connection,
 * `--concurrency` at a time, a client timeout of `--client-timeout` ms),
 * first without any resilience (no Retry, no request timeout, outlier
 * detection off), then with the policies a user would write for it:
 *
 *   Retry client -> echo: retryOn 5xx,reset,connect-failure, numRetries 2,
 *     perTryTimeout 1s, backoff 25 ms;
 *   UpstreamTrafficSetting echo: requestTimeout 2s, outlier detection after
 *     3 consecutive failures for 10 s.
 *
 * Faults: B1 answers 503; B2 hangs; n2's link loses 5 % of its packets each
 * way (with 50 ms delay each way where the kernel has netem; without netem
 * the delay is left out and the row says so: no other qdisc here can hold
 * packets back, and the loss is then made by iptables' statistic match);
 * n2's link is down. One JSON line per (fault, policies): success rate, p50
 * and p99 of all requests (failures counted at the time they took), and the
 * load average (the machine is shared).
 *
 *   npm run bench -- resilience [--requests 2000] [--concurrency 32] [--client-timeout 3000] [--fault NAME]
 * Needs root and Pipy (PIPY_BIN or pipy on PATH).
 */

const NS = 'res';
const PORT = 8080;
const VIP = '10.96.9.9';
const OUT = 15001;
const IN = 15003;
const echoScript = fileURLToPath(new URL('../src/lab/echo-server.js', import.meta.url));

// N GETs, `concurrency` at a time, each on its own connection: one JSON line of [ms, status (0: failed)].
const LOAD = `
const http = require('node:http');
const [url, n, concurrency, timeout] = process.argv.slice(1).map((x, i) => (i ? Number(x) : x));
const out = [];
let left = n;
const one = () => new Promise((resolve) => {
  const start = Date.now();
  const done = (status) => { out.push([Date.now() - start, status]); resolve(); };
  const req = http.request(url, { agent: false, headers: { connection: 'close' }, timeout }, (res) => {
    res.resume();
    res.on('end', () => done(res.statusCode));
    res.on('error', () => done(0));
  });
  req.on('timeout', () => req.destroy(new Error('timeout')));
  req.on('error', () => done(0));
  req.end();
});
const worker = async () => { while (left-- > 0) await one(); };
Promise.all(Array.from({ length: concurrency }, worker)).then(() => console.log(JSON.stringify(out)));
`;

const POLICIES = {
  retries: [{ source: { kind: 'ServiceAccount', name: 'client' }, destinations: [{ kind: 'Service', name: 'echo' }], retryPolicy: { retryOn: '5xx,reset,connect-failure', numRetries: 2, perTryTimeout: '1s', retryBackoffBaseInterval: '25ms' } }],
  upstreams: [{ host: 'echo', connectionSettings: { http: { requestTimeout: '2s' } }, outlierDetection: { consecutiveFailures: 3, baseEjectionTime: '10s' } }],
};

function resilienceOf(withPolicies: boolean): Resilience {
  if (!withPolicies) return { defaults: parseResilienceDefaults({ outlierDetection: 'off', requestTimeout: '0s' }), retries: [], upstreams: [] };
  return {
    defaults: parseResilienceDefaults({}),
    retries: POLICIES.retries.map((r) => ({ namespace: NS, name: 'client-to-echo', ...parseRetrySpec(r, NS) })),
    upstreams: POLICIES.upstreams.map((u) => ({ namespace: NS, name: 'echo', ...parseUpstreamSpec(u, NS) })),
  };
}

class Mesh {
  private constructor(
    readonly topo: Topology,
    readonly work: string,
    readonly A: TopoPod,
    readonly B1: TopoPod,
    readonly B2: TopoPod,
    readonly C: TopoPod,
  ) {}
  readonly proxies = new Map<TopoNode, ProxySupervisor>();
  readonly dps: IptablesDataplane[] = [];
  readonly servers: ChildProcess[] = [];
  private generation = 0;
  private readonly sa = new Map<TopoPod, string>();

  static async create(prefix: string): Promise<Mesh> {
    const work = mkdtempSync(join(tmpdir(), `${prefix}-res-`));
    const topo = await Topology.create({ prefix, nodes: 2, podsPerNode: 0 });
    const [n1, n2] = topo.nodes as [TopoNode, TopoNode];
    const m = new Mesh(topo, work, await topo.addPod(n1, 'a'), await topo.addPod(n1, 'b1'), await topo.addPod(n1, 'b2'), await topo.addPod(n2, 'c'));
    try {
      for (const [p, id] of [[m.A, 'client'], [m.B1, 'echo'], [m.B2, 'echo'], [m.C, 'echo']] as const) m.sa.set(p, id);
      for (const p of [m.B1, m.B2, m.C]) {
        const s = p.exec(process.execPath, [echoScript, 'serve', '--name', p.name, '--port', String(PORT), '--fault-file', m.faultFile(p)], { stdio: ['ignore', 'pipe', 'pipe'] });
        m.servers.push(s);
        let out = '';
        s.stdout!.setEncoding('utf8');
        while (!out.includes('listening')) out += String((await once(s.stdout!, 'data'))[0]);
      }
      for (const node of topo.nodes) {
        const sup = nodeProxy(node, m.policyFor(node, resilienceOf(false)), join(work, `proxy-${node.name}`), { outboundPort: OUT, inboundPort: IN });
        await sup.start();
        await sup.waitReady();
        m.proxies.set(node, sup);
        const dp = new IptablesDataplane({ netns: node.netns });
        m.dps.push(dp);
        await dp.apply({
          proxy: { address: node.gateway, outboundPort: OUT, inboundPort: IN, cgroupPath: node.proxyCgroup },
          nodeAddresses: [node.gateway, node.underlayIp],
          proxySources: topo.nodes.flatMap((n) => [n.gateway, n.underlayIp]),
          mesh: noExclusions(),
          pods: node.pods.map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive' as const, exclusions: noExclusions() })),
        });
      }
    } catch (err) {
      await m.destroy();
      throw err;
    }
    return m;
  }

  faultFile(p: TopoPod): string {
    return join(this.work, 'faults', `${p.name}.json`);
  }

  fault(p: TopoPod, f: PodFault | undefined): void {
    writePodFault(this.faultFile(p), f);
  }

  policyFor(node: TopoNode, resilience: Resilience): NodePolicy {
    const all = [this.A, this.B1, this.B2, this.C];
    const endpoint = (p: TopoPod) => ({ ip: p.ip, ports: { http: PORT }, node: p.node.name, pod: { namespace: NS, name: p.name }, serviceAccount: this.sa.get(p)! });
    return NodePolicySchema.parse({
      apiVersion: POLICY_API_VERSION,
      kind: 'NodePolicy',
      mesh: { name: 'fsmb', inbound: 'permissive', interceptionMode: 'iptables', egress: 'allow', trafficPolicy: 'permissive', exclusions: noExclusions() },
      proxies: this.topo.nodes.map((n) => ({ node: n.name, addresses: [n.underlayIp, n.gateway] })),
      resilience,
      node: { name: node.name, addresses: [node.gateway, node.underlayIp], interceptionMode: null },
      meshPods: all.map((p) => ({ ip: p.ip, namespace: NS, serviceAccount: this.sa.get(p)!, node: p.node.name })),
      pods: all
        .filter((p) => p.node === node)
        .map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, serviceAccount: this.sa.get(p)!, cgroup: { qosClass: null, path: p.cgroupPath }, exclusions: noExclusions() })),
      access: [],
      services: [{ namespace: NS, name: 'echo', clusterIPs: [VIP], ports: [{ name: 'http', port: PORT, protocol: 'TCP' as const, appProtocol: 'http' }], endpoints: [this.B1, this.B2, this.C].map(endpoint) }],
      splits: [],
      version: (0xb000 + this.generation * 2 + (node === this.topo.nodes[0] ? 0 : 1)).toString(16).padStart(16, '0'),
    });
  }

  /** Both proxies run `resilience`, from a fresh start of their state (a reload resets outlier state). */
  async configure(withPolicies: boolean): Promise<void> {
    this.generation++;
    for (const node of this.topo.nodes) {
      const r = await this.proxies.get(node)!.deliver(renderProxyConfig(this.policyFor(node, resilienceOf(withPolicies)), { outboundPort: OUT, inboundPort: IN }));
      if (r.changed && !r.applied) throw new Error(`the proxy of ${node.name} did not take its config`);
    }
  }

  async load(n: number, concurrency: number, clientTimeoutMs: number): Promise<[number, number][]> {
    const r = await this.A.run(process.execPath, ['-e', LOAD, `http://${VIP}:${PORT}/`, String(n), String(concurrency), String(clientTimeoutMs)]);
    return JSON.parse(r.stdout.trim().split('\n').pop() ?? '[]') as [number, number][];
  }

  get n2(): TopoNode {
    return this.topo.nodes[1]!;
  }

  async linkDown(down: boolean): Promise<void> {
    await this.topo.underlay.run('ip', ['link', 'set', `u${this.n2.index}`, down ? 'down' : 'up']);
  }

  /** 5 % loss each way on n2's link, with `delayMs` each way where netem exists. Returns how. */
  async lossy(on: boolean, delayMs: number): Promise<string> {
    const ends = [
      { ns: this.n2.netns, dev: 'ul0' },
      { ns: this.topo.underlay.netns, dev: `u${this.n2.index}` },
    ];
    if (!on) {
      for (const e of ends) await exec('tc', ['-n', e.ns, 'qdisc', 'del', 'dev', e.dev, 'root'], { allowFail: true });
      for (const c of renderLossCommands(this.n2, 0)) await exec(c.cmd, c.args, { allowFail: true });
      return '';
    }
    const netem = await exec('tc', ['-n', ends[0]!.ns, 'qdisc', 'replace', 'dev', ends[0]!.dev, 'root', 'netem', 'delay', `${delayMs}ms`, 'loss', '5%'], { allowFail: true });
    if (netem.code === 0) {
      await exec('tc', ['-n', ends[1]!.ns, 'qdisc', 'replace', 'dev', ends[1]!.dev, 'root', 'netem', 'delay', `${delayMs}ms`, 'loss', '5%']);
      return `tc netem: ${delayMs} ms delay and 5 % loss each way`;
    }
    for (const c of renderLossCommands(this.n2, 5)) await exec(c.cmd, c.args, { allowFail: c.allowFail ?? false });
    return `no netem in this kernel (${netem.stderr.trim().split('\n')[0]}): 5 % loss each way by iptables statistic match, NO delay`;
  }

  async destroy(): Promise<void> {
    await this.linkDown(false).catch(() => undefined);
    await this.lossy(false, 0).catch(() => undefined);
    for (const dp of this.dps) await dp.cleanup().catch(() => undefined);
    for (const p of this.proxies.values()) await p.stop().catch(() => undefined);
    for (const s of this.servers) s.kill('SIGKILL');
    await this.topo.destroy();
    rmSync(this.work, { recursive: true, force: true });
  }
}

interface Fault {
  name: string;
  on(m: Mesh): Promise<string>;
  off(m: Mesh): Promise<void>;
}

const FAULTS: Fault[] = [
  { name: '503-endpoint', on: async (m) => (m.fault(m.B1, { kind: 'status', status: 503 }), 'b1 answers 503'), off: async (m) => m.fault(m.B1, undefined) },
  { name: 'hung-endpoint', on: async (m) => (m.fault(m.B2, { kind: 'hang' }), 'b2 accepts and never answers'), off: async (m) => m.fault(m.B2, undefined) },
  { name: 'lossy-link', on: (m) => m.lossy(true, 50), off: async (m) => void (await m.lossy(false, 0)) },
  { name: 'link-down', on: async (m) => (await m.linkDown(true), "n2's underlay link down (c unreachable)"), off: (m) => m.linkDown(false) },
];

/** npm run bench -- resilience [--requests 2000] [--concurrency 32] [--client-timeout 3000] [--fault 503-endpoint|hung-endpoint|lossy-link|link-down] */
export async function* run(flags: Record<string, string | boolean>): AsyncIterable<object> {
  const requests = intFlag(flags, 'requests', 2000);
  const concurrency = intFlag(flags, 'concurrency', 32);
  const clientTimeoutMs = intFlag(flags, 'client-timeout', 3000);
  const only = flags.fault;
  if (only !== undefined && !FAULTS.some((f) => f.name === only)) throw new Error(`--fault must be one of ${FAULTS.map((f) => f.name).join(', ')}, got ${JSON.stringify(only)}`);
  const m = await Mesh.create(`fsmr${process.pid}`);
  try {
    for (const f of FAULTS.filter((x) => only === undefined || x.name === only)) {
      for (const withPolicies of [false, true]) {
        await m.configure(withPolicies);
        const how = await f.on(m);
        let rows: [number, number][];
        try {
          rows = await m.load(requests, concurrency, clientTimeoutMs);
        } finally {
          await f.off(m);
        }
        const ok = rows.filter((r) => r[1] >= 200 && r[1] < 400).length;
        const ms = rows.map((r) => r[0]);
        yield {
          bench: 'resilience',
          fault: f.name,
          policies: withPolicies ? 'retry+timeout+outlier' : 'none',
          how,
          requests: rows.length,
          ok,
          successRate: round(ok / Math.max(1, rows.length), 4),
          p50Ms: quantile(ms, 0.5),
          p99Ms: quantile(ms, 0.99),
          concurrency,
          clientTimeoutMs,
          loadavg: loadavg().map((x) => round(x, 2)),
        };
      }
    }
  } finally {
    await m.destroy();
  }
}
