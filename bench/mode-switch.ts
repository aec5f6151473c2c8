import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { Agent, type AgentProxy, type PolicyFeed } from '../src/agent/agent.js';
import { probe } from '../src/agent/probe.js';
import { createDataplane, type DataplaneSite } from '../src/dataplane/index.js';
import { noExclusions, type DesiredState, type InterceptionMode, type PodIntercept } from '../src/dataplane/types.js';
import { nodeAgentConfig } from '../src/lab/node-agent.js';
import { Topology, type TopoNode, type TopoPod } from '../src/lab/topology.js';
import { POLICY_API_VERSION, type NodePolicy } from '../src/policy/schema.js';
import { createCgroup } from '../src/util/cgroup.js';
import { intFlag, round, syntheticPod } from './util.js';

/**
 * mode-switch: a live switch of the interception mode by the real Agent, with
 * N pods enrolled (N-2 pod cgroups made beforehand, as in `enroll`, plus two
 * real pods) while pod A keeps opening new connections to pod B through the
 * node proxy (passthrough). One row per switch, ebpf -> iptables then
 * iptables -> ebpf:
 *   switch_ms   new mode applied and verified + old mode drained and removed
 *   apply_ms    until the new mode was in force (make)
 *   request_ms  from the policy change to the old mode gone (sync scheduling included)
 *   connections, failed   new connections opened from just before the switch
 *               until 1 s after it, and how many failed
 * Target (issue 5): switch under 2 s, 0 failed.
 *   npm run bench -- mode-switch [--pods 1000] [--parallel 4]
 */

const PORT = 8080;
const PROXY_PORT = 15001;

// Echo server: replies to every connection with what it received.
const ECHO = `require('node:net').createServer({ allowHalfOpen: true }, (s) => { s.pipe(s); s.on('error', () => {}); }).listen(${PORT}, '0.0.0.0', () => console.log('listening'));`;

// `parallel` loops of short connections; "." per connection; a JSON summary after SIGTERM.
const LOAD = `
const net = require('node:net');
const [host, port, parallel] = process.argv.slice(1);
let ok = 0, failed = 0, stopping = false; const errors = {};
const one = () => new Promise((resolve) => {
  const s = net.connect({ host, port: Number(port), allowHalfOpen: true });
  let got = '';
  s.setTimeout(10000, () => s.destroy(new Error('timeout')));
  s.on('connect', () => s.end('ping'));
  s.on('data', (d) => (got += d));
  s.on('end', () => { if (got === 'ping') ok++; else { failed++; errors['bad reply'] = (errors['bad reply'] || 0) + 1; } resolve(); });
  s.on('error', (e) => { failed++; const k = e.code || e.message; errors[k] = (errors[k] || 0) + 1; resolve(); });
});
const loop = async () => { while (!stopping) { await one(); process.stdout.write('.'); } };
Promise.all(Array.from({ length: Number(parallel) }, loop)).then(() => { process.stdout.write('\\n' + JSON.stringify({ ok, failed, errors }) + '\\n'); process.exit(0); });
process.on('SIGTERM', () => { stopping = true; });
console.error('started');
`;

async function waitFor(child: ChildProcess, marker: string, stream: 'stdout' | 'stderr'): Promise<void> {
  let out = '';
  await new Promise<void>((resolve, reject) => {
    child[stream]!.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      if (out.includes(marker)) resolve();
    });
    child.once('exit', (code) => reject(new Error(`process exited (${code}) before printing ${marker}`)));
  });
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  child.kill('SIGTERM');
  await exited;
}

class Load {
  private done = 0;
  private out = '';
  private constructor(private readonly child: ChildProcess) {
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      this.out += d;
      for (const c of d) if (c === '.') this.done++;
    });
  }
  static async start(from: TopoPod, to: TopoPod, parallel: number): Promise<Load> {
    const child = from.exec(process.execPath, ['-e', LOAD, to.ip, String(PORT), String(parallel)], { stdio: ['ignore', 'pipe', 'pipe'] });
    await waitFor(child, 'started', 'stderr');
    return new Load(child);
  }
  async progress(n: number): Promise<void> {
    const at = this.done + n;
    while (this.done < at) {
      if (this.child.exitCode !== null) throw new Error('load client exited');
      await new Promise((r) => setTimeout(r, 10));
    }
  }
  async stop(): Promise<{ ok: number; failed: number; errors: Record<string, number> }> {
    await stop(this.child);
    return JSON.parse(this.out.trim().split('\n').pop() ?? '{}') as { ok: number; failed: number; errors: Record<string, number> };
  }
}

/** A fixed policy whose only moving part is the Node label; the bench renders the desired state itself. */
class LabelFeed implements PolicyFeed {
  private cur: { policy: NodePolicy; receivedAt: number } | undefined;
  private fns: Array<() => void> = [];
  private n = 0;
  constructor(private readonly node: TopoNode) {}
  set(mode: InterceptionMode): void {
    this.n++;
    const policy: NodePolicy = {
      apiVersion: POLICY_API_VERSION,
      kind: 'NodePolicy',
      version: this.n.toString(16).padStart(16, '0'),
      mesh: { name: 'bench', inbound: 'permissive', interceptionMode: 'auto', egress: 'allow', trafficPolicy: 'permissive', exclusions: noExclusions() },
      proxies: [{ node: this.node.name, addresses: [this.node.gateway] }],
      node: { name: this.node.name, addresses: [this.node.underlayIp], interceptionMode: mode },
      meshPods: [],
      pods: [],
      access: [],
      services: [],
      splits: [],
    };
    this.cur = { policy, receivedAt: Date.now() };
    for (const fn of this.fns) fn();
  }
  current() {
    return this.cur;
  }
  onChange(fn: () => void): void {
    this.fns.push(fn);
  }
  start(): void {}
  async stop(): Promise<void> {}
  fetchErrors(): number {
    return 0;
  }
}

type SwitchInfo = { mode?: { effective?: string }; retiring?: string; lastSwitch?: { at: string; to: string; applyMs: number; totalMs: number } };

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const n = intFlag(flags, 'pods', 1000);
  const parallel = intFlag(flags, 'parallel', 4);
  if (n < 2 || n > 1020) throw new Error(`--pods must be from 2 to 1020 (the eBPF pod map holds 1024), got ${n}`);
  if (parallel < 1 || parallel > 64) throw new Error(`--parallel must be from 1 to 64, got ${parallel}`);
  const work = mkdtempSync(join(tmpdir(), 'fsmbench-switch-'));
  const topo = await Topology.create({ prefix: `fsmbench${process.pid}s`, nodes: 1 });
  const node = topo.nodes[0]!;
  const children: ChildProcess[] = [];
  let agent: Agent | undefined;
  const stateDir = join(work, 'state');
  const site: DataplaneSite = { stateDir, bpffsDir: node.bpffsDir, podsCgroup: node.podsCgroup, proxyCgroup: node.proxyCgroup, netns: node.netns };
  try {
    // A real node always has other rules that use conntrack (kube-proxy, the CNI), so conntrack stays on
    // in its namespace when ours go. Without this, removing the iptables mode turns conntrack off in the
    // bare lab node and resets the connections it DNATed that are still open (docs/ARCHITECTURE.md).
    const kube = await node.run('nft', ['-f', '-'], { input: 'table ip fsmbench_kube {\n chain input {\n  type filter hook input priority 0;\n  ct state established,related counter accept\n }\n}\n' });
    if (kube.code !== 0) throw new Error(`nft: ${kube.stderr}`);
    const A = await topo.addPod(node, 'a');
    const B = await topo.addPod(node, 'b');
    const pods: PodIntercept[] = [A, B].map((p) => ({ uid: `uid-${p.name}`, namespace: 'bench', name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive', exclusions: noExclusions() }));
    for (let i = 0; i < n - 2; i++) {
      const p = syntheticPod(node.podsCgroup, i);
      await createCgroup(p.cgroupPath);
      pods.push(p);
    }
    const desired: DesiredState = {
      proxy: { address: node.gateway, outboundPort: PROXY_PORT, inboundPort: 15003, cgroupPath: node.proxyCgroup },
      nodeAddresses: [node.gateway, node.underlayIp],
      proxySources: [node.gateway, node.underlayIp],
      mesh: noExclusions(),
      pods,
    };

    const echo = B.exec(process.execPath, ['-e', ECHO], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(echo);
    await waitFor(echo, 'listening', 'stdout');
    const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
    const script = fileURLToPath(new URL(`../src/proxy/passthrough${ext}`, import.meta.url));
    const proxyChild = node.exec(process.execPath, [...process.execArgv, script, '--listen', `${node.gateway}:${PROXY_PORT}`], { inProxyCgroup: true, stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(proxyChild);
    await waitFor(proxyChild, 'listening', 'stdout');
    const proxy: AgentProxy = {
      start() {},
      detach() {},
      status: () => ({ kind: 'passthrough (bench)', up: proxyChild.exitCode === null, listening: proxyChild.exitCode === null, restarts: 0 }),
      ready: () => proxyChild.exitCode === null,
    };

    const config = nodeAgentConfig(node, stateDir, { outboundPort: PROXY_PORT });
    const feed = new LabelFeed(node);
    const report = await probe({ netns: node.netns });
    agent = new Agent(config, { policy: feed, probe: async () => report, dataplane: (m) => createDataplane(m, site), render: () => desired, proxy });
    feed.set('ebpf');
    await agent.start();
    const settle = async (mode: InterceptionMode, previous: string | undefined): Promise<SwitchInfo> => {
      for (const deadline = Date.now() + 60_000; ; ) {
        if (Date.now() > deadline) throw new Error(`the agent did not settle in ${mode} mode within 60 s: ${JSON.stringify(agent!.state())}`);
        const s = agent!.state() as SwitchInfo;
        const switched = previous === 'none' ? agent!.notReadyReason() === undefined : s.lastSwitch !== undefined && s.lastSwitch.at !== previous;
        if (s.mode?.effective === mode && s.retiring === undefined && switched) return s;
        await new Promise((r) => setTimeout(r, 5));
      }
    };
    await settle('ebpf', 'none');

    for (const [from, to] of [
      ['ebpf', 'iptables'],
      ['iptables', 'ebpf'],
    ] as Array<[InterceptionMode, InterceptionMode]>) {
      const load = await Load.start(A, B, parallel);
      await load.progress(50);
      const previous = (agent.state() as SwitchInfo).lastSwitch?.at;
      const t0 = performance.now();
      feed.set(to);
      const s = await settle(to, previous);
      const requestMs = performance.now() - t0;
      await new Promise((r) => setTimeout(r, 1000));
      const summary = await load.stop();
      yield {
        bench: 'mode-switch',
        from,
        to,
        pods: n,
        switch_ms: round(s.lastSwitch!.totalMs),
        apply_ms: round(s.lastSwitch!.applyMs),
        request_ms: round(requestMs),
        connections: summary.ok + summary.failed,
        failed: summary.failed,
        ...(summary.failed > 0 ? { errors: summary.errors } : {}),
      };
    }
  } finally {
    await agent?.stop();
    for (const mode of ['ebpf', 'iptables'] as InterceptionMode[]) {
      const dp = createDataplane(mode, site);
      await dp.cleanup().catch(() => undefined);
      await dp.close().catch(() => undefined);
    }
    for (const c of children) await stop(c);
    await topo.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}
