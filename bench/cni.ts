import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { AgentProxy, PolicyFeed } from '../src/agent/agent.js';
import { pluginConf } from '../src/cni/service.js';
import type { DataplaneSite } from '../src/dataplane/index.js';
import { noExclusions, type InterceptionMode } from '../src/dataplane/types.js';
import { pluginStdin, prevResult, runPlugin, startSandbox, type RuntimePod } from '../src/lab/cni-runtime.js';
import { nodeAgentConfig } from '../src/lab/node-agent.js';
import { Topology } from '../src/lab/topology.js';
import { POLICY_API_VERSION, type NodePolicy, type PolicyService } from '../src/policy/schema.js';
import { renderProxyConfig } from '../src/proxy/config.js';
import { cgroup2Root, createCgroup } from '../src/util/cgroup.js';
import { intFlag, quantile, round, syntheticPod } from './util.js';

/**
 * cni: what the chained CNI plugin adds to pod creation, with N pods already
 * enrolled (their cgroups made beforehand), per mode. Each round creates a pod
 * as a runtime does (netns + address, sandbox process: not timed), then times
 * the plugin's ADD from exec to exit (the plugin, the agent enrolling the
 * pod, a sync applied), then its DEL (whose sync the next ADD may meet still
 * running, as on a node where pods come and go).
 *
 * The node is a realistic one: its N pods came through the plugin too (the
 * agent's early-pod store holds --early of them, default all), they back
 * N/10 services (so the proxy configuration is not trivial), and the agent
 * hands the proxy its configuration the way the supervisor does (render,
 * serialise, compare with the file: no Pipy, so no reload).
 *
 * One row per mode:
 *   add_p50_ms, add_p99_ms, add_max_ms   ADD wall time as the runtime sees it
 *   agent_p50_ms, agent_p99_ms          the agent's own part (request in to answer out)
 *   sync_p50_ms, sync_p99_ms            the sync each ADD waited for (SyncOutcome.ms.total)
 *   phase_p50_ms                        that sync's phases (identities, mode, proxy, render, merge, apply)
 *   del_p50_ms                          DEL wall time
 *   exec_p50_ms                         the plugin answering VERSION alone (process cost floor)
 * Target (issue 21): ADD well under 50 ms at p99.
 *
 * --baseline DIST: another build's dist/ (with its package root around it:
 * package.json, build/Release, bpf/build) runs the same scenario with its
 * agent, in child processes alternating with this build's, --rounds times
 * each (default 2); the summary row pools every ADD of a build and gives
 * p50/p99 of both and their ratios (this / baseline), and the medians over
 * rounds of the agent's part. On a loaded machine the ADD's wall time is
 * mostly the plugin's exec and scheduling (exec_p50_ms), which no agent
 * change moves: read the agent part beside it.
 *   npm run bench -- cni [--pods 1000] [--adds 200] [--early N] [--modes ebpf,iptables] [--baseline DIST] [--rounds R]
 */

const here = fileURLToPath(new URL('..', import.meta.url)); // this build's dist/

class FixedFeed implements PolicyFeed {
  constructor(private readonly policy: NodePolicy) {}
  current() {
    return { policy: this.policy, receivedAt: Date.now() };
  }
  onChange(): void {}
  start(): void {}
  async stop(): Promise<void> {}
  fetchErrors(): number {
    return 0;
  }
}

/** The agent's side, from this build or from --agent-dist (the baseline's, in a child process). */
interface AgentModules {
  Agent: typeof import('../src/agent/agent.js').Agent;
  probe: typeof import('../src/agent/probe.js').probe;
  createDataplane: typeof import('../src/dataplane/index.js').createDataplane;
  desiredState: typeof import('../src/policy/desired.js').desiredState;
  cgroupResolver: typeof import('../src/policy/desired.js').cgroupResolver;
}

async function agentModules(dist: string): Promise<AgentModules> {
  const url = (p: string) => pathToFileURL(join(dist, 'src', p)).href;
  const [agent, probe, dataplane, desired] = await Promise.all([
    import(url('agent/agent.js')) as Promise<typeof import('../src/agent/agent.js')>,
    import(url('agent/probe.js')) as Promise<typeof import('../src/agent/probe.js')>,
    import(url('dataplane/index.js')) as Promise<typeof import('../src/dataplane/index.js')>,
    import(url('policy/desired.js')) as Promise<typeof import('../src/policy/desired.js')>,
  ]);
  return { Agent: agent.Agent, probe: probe.probe, createDataplane: dataplane.createDataplane, desiredState: desired.desiredState, cgroupResolver: desired.cgroupResolver };
}

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  if (typeof flags.baseline === 'string') {
    yield* compare(flags, flags.baseline);
    return;
  }
  yield* measure(flags);
}

async function* measure(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const n = intFlag(flags, 'pods', 1000);
  const adds = intFlag(flags, 'adds', 200);
  const early = Math.min(n, intFlag(flags, 'early', n));
  const modes = String(flags.modes ?? 'ebpf,iptables').split(',') as InterceptionMode[];
  const dist = typeof flags['agent-dist'] === 'string' ? flags['agent-dist'] : here;
  const m = await agentModules(dist);
  if (n > 1020) throw new Error(`--pods must be at most 1020 (the eBPF pod map holds 1024, and the bench adds one at a time), got ${n}`);
  const topo = await Topology.create({ prefix: `fsmbench${process.pid}c`, nodes: 1 });
  const node = topo.nodes[0]!;
  const work = mkdtempSync(join(tmpdir(), 'fsmbench-cni-'));
  const socket = join(work, 'cni.sock');
  const spool = join(work, 'spool');
  const sandboxes: ChildProcess[] = [];
  let agent: InstanceType<AgentModules['Agent']> | undefined;
  try {
    const pods = Array.from({ length: n }, (_v, i) => syntheticPod(node.podsCgroup, i));
    for (const p of pods) await createCgroup(p.cgroupPath);
    const services: PolicyService[] = [];
    for (let s = 0; s * 10 < n; s++) {
      services.push({
        namespace: 'bench',
        name: `svc${s}`,
        clusterIPs: [`10.96.${s >> 8}.${s & 255}`],
        ports: [{ name: 'http', port: 80, protocol: 'TCP', appProtocol: 'http' }],
        endpoints: pods.slice(s * 10, s * 10 + 10).map((p) => ({ ip: p.ip, ports: { http: 8080 }, node: node.name, pod: { namespace: 'bench', name: p.name }, serviceAccount: 'default' })),
      });
    }
    const body: Omit<NodePolicy, 'version'> = {
      apiVersion: POLICY_API_VERSION,
      kind: 'NodePolicy',
      mesh: { name: 'bench', inbound: 'strict', interceptionMode: 'auto', egress: 'allow', trafficPolicy: 'permissive', exclusions: noExclusions() },
      proxies: [{ node: node.name, addresses: [node.gateway] }],
      node: { name: node.name, addresses: [node.underlayIp], interceptionMode: null, monitoredNamespaces: ['bench'] },
      meshPods: pods.map((p) => ({ ip: p.ip, namespace: 'bench', serviceAccount: 'default', node: node.name })),
      pods: pods.map((p) => ({ uid: p.uid, namespace: 'bench', name: p.name, ip: p.ip, serviceAccount: 'default', cgroup: { qosClass: null, path: p.cgroupPath }, exclusions: noExclusions() })),
      access: [],
      services,
      splits: [],
    };
    const policy = { ...body, version: '00000000000000c1' } as NodePolicy;
    const report = await m.probe({ netns: node.netns });
    const exec: number[] = [];
    for (let i = 0; i < 50; i++) {
      const r = await runPlugin('VERSION', { namespace: 'x', name: 'x', uid: '', netns: node.netns }, 'x', '{}');
      exec.push(r.ms);
    }
    let seq = 0;
    for (const mode of modes) {
      const stateDir = join(work, `state-${mode}`);
      mkdirSync(stateDir, { recursive: true });
      // The node's pods came through the plugin: the store a running agent would have. Written in the
      // single-file form of earlier builds, which a --baseline build reads and this one takes over at start.
      const at = new Date().toISOString();
      const earlyPods = pods.slice(0, early).map((p, i) => ({ containerId: `benchearly${i}`.padEnd(64, '0'), namespace: 'bench', name: p.name, uid: p.uid, ip: p.ip, cgroupPath: p.cgroupPath, netns: `/run/netns/${node.netns}`, at }));
      writeFileSync(join(stateDir, 'cni-enrolled.json'), JSON.stringify({ pods: earlyPods, deleted: [] }) + '\n');
      const site: DataplaneSite = { stateDir, bpffsDir: node.bpffsDir, podsCgroup: node.podsCgroup, proxyCgroup: node.proxyCgroup, netns: node.netns };
      const config = { ...nodeAgentConfig(node, stateDir, { mode }), cniSocket: socket, cniSpool: spool };
      const facts = { proxy: { address: node.gateway, outboundPort: 15001, inboundPort: 15003, cgroupPath: node.proxyCgroup }, nodeAddresses: [node.gateway, node.underlayIp], cgroupPathFor: m.cgroupResolver(cgroup2Root()) };
      // The supervisor's deliver without Pipy: serialise, compare with the file the proxy runs, write when it differs.
      const configFile = join(stateDir, 'proxy-config.json');
      const proxy: AgentProxy = {
        start() {},
        detach() {},
        status: () => ({ kind: 'none (bench)', up: true, listening: true, restarts: 0 }),
        ready: () => true,
        async deliver(cfg: object) {
          const t = performance.now();
          const text = JSON.stringify(cfg, null, 1) + '\n';
          const changed = !existsSync(configFile) || readFileSync(configFile, 'utf8') !== text;
          if (changed) writeFileSync(configFile, text);
          return { changed, applied: changed, ms: performance.now() - t };
        },
      };
      agent = new m.Agent(config, {
        policy: new FixedFeed(policy),
        probe: async () => report,
        dataplane: (md) => m.createDataplane(md, site),
        render: (p) => m.desiredState(p, facts),
        proxy,
        proxyConfig: (p) => renderProxyConfig(p, { outboundPort: 15001, inboundPort: 15003 }),
      });
      await agent.start();
      for (let t = Date.now(); agent.notReadyReason() !== undefined; ) {
        if (Date.now() - t > 60_000) throw new Error(`agent not ready: ${agent.notReadyReason()}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      const conf = pluginConf({ socket, spool }, 'fail-closed');
      const addMs: number[] = [];
      const delMs: number[] = [];
      const syncMs: number[] = [];
      const phases = new Map<string, number[]>();
      for (let i = 0; i < adds; i++) {
        const tp = await topo.addPod(node, `c${++seq}`);
        const pod: RuntimePod = { namespace: 'bench', name: tp.name, uid: `uid-${tp.name}`, netns: tp.netns, cgroupPath: tp.cgroupPath, ip: tp.ip, gateway: node.gateway };
        const id = `benchsandbox${seq}`.padEnd(64, '0');
        const sandbox = await startSandbox(pod, id);
        sandboxes.push(sandbox);
        const add = await runPlugin('ADD', pod, id, pluginStdin(conf, prevResult(pod)));
        if (add.code !== 0) throw new Error(`ADD of ${pod.name} failed (exit ${add.code}): ${add.stdout}${add.stderr}`);
        addMs.push(add.ms);
        // The sync this ADD waited for is the last one: nothing else asked for one since.
        const last = (agent.state() as { sync?: { last?: { ms?: Record<string, number> } } }).sync?.last?.ms;
        if (last) {
          syncMs.push(last.total!);
          for (const [k, v] of Object.entries(last)) if (k !== 'total') phases.set(k, [...(phases.get(k) ?? []), v]);
        }
        const del = await runPlugin('DEL', pod, id, pluginStdin(conf, undefined));
        delMs.push(del.ms);
        sandbox.kill('SIGKILL');
        await topo.removePod(tp);
      }
      const cni = (agent.state() as { cni: { addMs: { p50: number; p99: number } } }).cni;
      yield {
        bench: 'cni',
        mode,
        pods: n,
        early,
        adds,
        add_p50_ms: round(quantile(addMs, 0.5)),
        add_p99_ms: round(quantile(addMs, 0.99)),
        add_max_ms: round(Math.max(...addMs)),
        agent_p50_ms: cni.addMs.p50,
        agent_p99_ms: cni.addMs.p99,
        ...(syncMs.length ? { sync_p50_ms: round(quantile(syncMs, 0.5)), sync_p99_ms: round(quantile(syncMs, 0.99)) } : {}),
        ...(phases.size ? { phase_p50_ms: Object.fromEntries([...phases].map(([k, v]) => [k, round(quantile(v, 0.5))])) } : {}),
        del_p50_ms: round(quantile(delMs, 0.5)),
        exec_p50_ms: round(quantile(exec, 0.5)),
        loadavg_1m: round(loadavg()[0]!, 2),
        ...(flags.samples === true ? { add_ms: addMs.map((x) => round(x, 2)) } : {}),
      };
      await agent.stop();
      agent = undefined;
      const dp = m.createDataplane(mode, site);
      await dp.cleanup();
      await dp.close();
    }
  } finally {
    await agent?.stop();
    for (const s of sandboxes) s.kill('SIGKILL');
    await topo.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}

interface Build {
  name: 'this' | 'baseline';
  dist: string;
}

/** This build and the baseline, each in its own process (one agent build per process), alternating. */
async function* compare(flags: Record<string, string | boolean>, baseline: string): AsyncGenerator<object> {
  const builds: Build[] = [
    { name: 'this', dist: here },
    { name: 'baseline', dist: isAbsolute(baseline) ? baseline : resolve(baseline) },
  ];
  for (const b of builds) if (!existsSync(join(b.dist, 'src/agent/agent.js'))) throw new Error(`${join(b.dist, 'src/agent/agent.js')} is missing: build ${b.name === 'baseline' ? 'the baseline tree' : 'this tree'} first`);
  const rounds = Math.max(1, intFlag(flags, 'rounds', 2));
  const pass = ['pods', 'adds', 'early', 'modes'].flatMap((f) => (typeof flags[f] === 'string' ? [`--${f}`, flags[f] as string] : []));
  const samples = new Map<string, number[]>();
  const agentPart = new Map<string, { p50: number[]; p99: number[] }>();
  for (let r = 0; r < rounds; r++) {
    // Alternate the order so neither build always runs first (warm caches, a neighbour's burst).
    for (const b of r % 2 === 0 ? builds : [...builds].reverse()) {
      for (const row of await child([...pass, '--agent-dist', b.dist, '--samples'])) {
        const { add_ms: ms, ...rest } = row as { add_ms: number[]; mode: string };
        const key = `${b.name}/${rest.mode}`;
        samples.set(key, [...(samples.get(key) ?? []), ...ms]);
        const a = agentPart.get(key) ?? { p50: [], p99: [] };
        a.p50.push((row as { agent_p50_ms: number }).agent_p50_ms);
        a.p99.push((row as { agent_p99_ms: number }).agent_p99_ms);
        agentPart.set(key, a);
        yield { build: b.name, round: r + 1, ...rest };
      }
    }
  }
  for (const mode of new Set([...samples.keys()].map((k) => k.split('/')[1]!))) {
    const out: Record<string, unknown> = { bench: 'cni', kind: 'summary', mode, rounds };
    for (const q of [0.5, 0.99] as const) {
      const key = `add_p${q * 100}_ms`;
      for (const b of builds) out[`${key}_${b.name}`] = round(quantile(samples.get(`${b.name}/${mode}`) ?? [], q), 2);
      out[`${key}_ratio`] = round((out[`${key}_this`] as number) / (out[`${key}_baseline`] as number), 3);
    }
    // The agent's part (request in, answer out) has no pooled samples: the median over rounds of each run's quantile.
    for (const q of ['p50', 'p99'] as const) {
      for (const b of builds) out[`agent_${q}_ms_${b.name}`] = round(quantile(agentPart.get(`${b.name}/${mode}`)?.[q] ?? [], 0.5), 2);
      out[`agent_${q}_ms_ratio`] = round((out[`agent_${q}_ms_this`] as number) / (out[`agent_${q}_ms_baseline`] as number), 3);
    }
    out.adds_each = samples.get(`this/${mode}`)?.length;
    out.loadavg_1m = round(loadavg()[0]!, 2);
    yield out;
  }
}

function child(args: string[]): Promise<object[]> {
  return new Promise((resolvePromise, reject) => {
    const p = spawn(process.execPath, ['--expose-gc', join(here, 'bench', 'run.js'), 'cni', ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    p.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    p.on('error', reject);
    p.on('close', (code) => {
      if (code !== 0) reject(new Error(`bench child (${args.join(' ')}) exited with ${code}`));
      else resolvePromise(out.split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l) as object));
    });
  });
}
