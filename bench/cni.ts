import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { Agent, type AgentProxy, type PolicyFeed } from '../src/agent/agent.js';
import { probe } from '../src/agent/probe.js';
import { pluginConf } from '../src/cni/service.js';
import { createDataplane, type DataplaneSite } from '../src/dataplane/index.js';
import { noExclusions, type InterceptionMode } from '../src/dataplane/types.js';
import { pluginStdin, prevResult, runPlugin, startSandbox, type RuntimePod } from '../src/lab/cni-runtime.js';
import { nodeAgentConfig } from '../src/lab/node-agent.js';
import { Topology } from '../src/lab/topology.js';
import { cgroupResolver, desiredState } from '../src/policy/desired.js';
import { POLICY_API_VERSION, type NodePolicy } from '../src/policy/schema.js';
import { cgroup2Root, createCgroup } from '../src/util/cgroup.js';
import { intFlag, quantile, round, syntheticPod } from './util.js';

/**
 * cni: what the chained CNI plugin adds to pod creation, with N pods already
 * enrolled by the policy (their cgroups made beforehand), per mode. Each
 * round creates a pod as a runtime does (netns + address, sandbox process:
 * not timed), then times the plugin's ADD from exec to exit (the plugin, the
 * agent enrolling the pod, a sync applied), then its DEL. One row per mode:
 *   add_p50_ms, add_p99_ms, add_max_ms   ADD wall time as the runtime sees it
 *   agent_p50_ms, agent_p99_ms          the agent's own part (request in to answer out)
 *   del_p50_ms                          DEL wall time
 *   exec_p50_ms                         the plugin answering VERSION alone (process cost floor)
 * Target (issue 21): ADD well under 50 ms at p99.
 *   npm run bench -- cni [--pods 1000] [--adds 200] [--modes ebpf,iptables]
 */

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

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const n = intFlag(flags, 'pods', 1000);
  const adds = intFlag(flags, 'adds', 200);
  const modes = String(flags.modes ?? 'ebpf,iptables').split(',') as InterceptionMode[];
  if (n > 1020) throw new Error(`--pods must be at most 1020 (the eBPF pod map holds 1024, and the bench adds one at a time), got ${n}`);
  const topo = await Topology.create({ prefix: `fsmbench${process.pid}c`, nodes: 1 });
  const node = topo.nodes[0]!;
  const work = mkdtempSync(join(tmpdir(), 'fsmbench-cni-'));
  const socket = join(work, 'cni.sock');
  const spool = join(work, 'spool');
  const sandboxes: ChildProcess[] = [];
  let agent: Agent | undefined;
  try {
    const pods = Array.from({ length: n }, (_v, i) => syntheticPod(node.podsCgroup, i));
    for (const p of pods) await createCgroup(p.cgroupPath);
    const body: Omit<NodePolicy, 'version'> = {
      apiVersion: POLICY_API_VERSION,
      kind: 'NodePolicy',
      mesh: { name: 'bench', inbound: 'strict', interceptionMode: 'auto', egress: 'allow', trafficPolicy: 'permissive', exclusions: noExclusions() },
      proxies: [{ node: node.name, addresses: [node.gateway] }],
      node: { name: node.name, addresses: [node.underlayIp], interceptionMode: null, monitoredNamespaces: ['bench'] },
      meshPods: pods.map((p) => ({ ip: p.ip, namespace: 'bench', serviceAccount: 'default', node: node.name })),
      pods: pods.map((p) => ({ uid: p.uid, namespace: 'bench', name: p.name, ip: p.ip, serviceAccount: 'default', cgroup: { qosClass: null, path: p.cgroupPath }, exclusions: noExclusions() })),
      access: [],
      services: [],
      splits: [],
    };
    const policy = { ...body, version: '00000000000000c1' } as NodePolicy;
    const proxy: AgentProxy = { start() {}, detach() {}, status: () => ({ kind: 'none (bench)', up: true, listening: true, restarts: 0 }), ready: () => true };
    const report = await probe({ netns: node.netns });
    const exec: number[] = [];
    for (let i = 0; i < 50; i++) {
      const r = await runPlugin('VERSION', { namespace: 'x', name: 'x', uid: '', netns: node.netns }, 'x', '{}');
      exec.push(r.ms);
    }
    let seq = 0;
    for (const mode of modes) {
      const stateDir = join(work, `state-${mode}`);
      const site: DataplaneSite = { stateDir, bpffsDir: node.bpffsDir, podsCgroup: node.podsCgroup, proxyCgroup: node.proxyCgroup, netns: node.netns };
      const config = { ...nodeAgentConfig(node, stateDir, { mode }), cniSocket: socket, cniSpool: spool };
      const facts = { proxy: { address: node.gateway, outboundPort: 15001, inboundPort: 15003, cgroupPath: node.proxyCgroup }, nodeAddresses: [node.gateway, node.underlayIp], cgroupPathFor: cgroupResolver(cgroup2Root()) };
      agent = new Agent(config, { policy: new FixedFeed(policy), probe: async () => report, dataplane: (m) => createDataplane(m, site), render: (p) => desiredState(p, facts), proxy });
      await agent.start();
      for (let t = Date.now(); agent.notReadyReason() !== undefined; ) {
        if (Date.now() - t > 60_000) throw new Error(`agent not ready: ${agent.notReadyReason()}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      const conf = pluginConf({ socket, spool }, 'fail-closed');
      const addMs: number[] = [];
      const delMs: number[] = [];
      for (let i = 0; i < adds; i++) {
        const tp = await topo.addPod(node, `c${++seq}`);
        const pod: RuntimePod = { namespace: 'bench', name: tp.name, uid: `uid-${tp.name}`, netns: tp.netns, cgroupPath: tp.cgroupPath, ip: tp.ip, gateway: node.gateway };
        const id = `benchsandbox${seq}`.padEnd(64, '0');
        const sandbox = await startSandbox(pod, id);
        sandboxes.push(sandbox);
        const add = await runPlugin('ADD', pod, id, pluginStdin(conf, prevResult(pod)));
        if (add.code !== 0) throw new Error(`ADD of ${pod.name} failed (exit ${add.code}): ${add.stdout}${add.stderr}`);
        addMs.push(add.ms);
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
        adds,
        add_p50_ms: round(quantile(addMs, 0.5)),
        add_p99_ms: round(quantile(addMs, 0.99)),
        add_max_ms: round(Math.max(...addMs)),
        agent_p50_ms: cni.addMs.p50,
        agent_p99_ms: cni.addMs.p99,
        del_p50_ms: round(quantile(delMs, 0.5)),
        exec_p50_ms: round(quantile(exec, 0.5)),
        loadavg_1m: round(loadavg()[0]!, 2),
      };
      await agent.stop();
      agent = undefined;
      const dp = createDataplane(mode, site);
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
