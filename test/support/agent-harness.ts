import type { ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Agent, type AgentDeps, type AgentProxy, type PolicyFeed } from '../../src/agent/agent.js';
import { nodeAgentConfig } from '../../src/lab/node-agent.js';
import type { AgentConfig } from '../../src/agent/config.js';
import { supportFrom, type ProbeReport } from '../../src/agent/probe.js';
import { createDataplane } from '../../src/dataplane/index.js';
import type { InterceptionMode } from '../../src/dataplane/types.js';
import type { TopoNode, TopoPod, Topology } from '../../src/lab/topology.js';
import { cgroupResolver, desiredState } from '../../src/policy/desired.js';
import { POLICY_API_VERSION, type DesiredInterceptionMode, type NodePolicy } from '../../src/policy/schema.js';
import type { ConnectionRecord } from '../../src/proxy/passthrough.js';
import { cgroup2Root } from '../../src/util/cgroup.js';
import { nodeSpec } from './dataplanes.js';
import { waitForOutput } from './traffic.js';

/**
 * The real Agent on a topology node, for the kernel tests of the agent
 * (mode switch, fallback, readiness): a policy feed the test sets, the
 * passthrough proxy run by the test in the node (the proxy supervisor runs
 * built files only), real dataplanes from createDataplane().
 */

export const PROXY_PORT = 15001;
const support = fileURLToPath(new URL('./', import.meta.url));
const tsRegister = join(support, 'ts-register.mjs');
const passthrough = fileURLToPath(new URL('../../src/proxy/passthrough.ts', import.meta.url));

/** A policy the test sets; every set() is a change the agent hears about. */
export class MemoryPolicyFeed implements PolicyFeed {
  #cur: { policy: NodePolicy; receivedAt: number } | undefined;
  #listeners: Array<() => void> = [];

  constructor(policy?: NodePolicy) {
    if (policy) this.#cur = { policy, receivedAt: Date.now() };
  }

  set(policy: NodePolicy): void {
    this.#cur = { policy, receivedAt: Date.now() };
    for (const fn of this.#listeners) fn();
  }

  current() {
    return this.#cur;
  }
  onChange(fn: () => void): void {
    this.#listeners.push(fn);
  }
  start(): void {}
  async stop(): Promise<void> {}
  fetchErrors(): number {
    return 0;
  }
}

/** The passthrough proxy in the node's namespace and proxy cgroup, as the agent's proxy dependency. */
export class TestNodeProxy implements AgentProxy {
  #child: ChildProcess | undefined;
  #listening = false;
  readonly logFile: string;

  constructor(
    readonly node: TopoNode,
    workDir: string,
  ) {
    this.logFile = join(workDir, `proxy-${node.name}.jsonl`);
  }

  async launch(): Promise<void> {
    writeFileSync(this.logFile, '');
    this.#child = this.node.exec(process.execPath, ['--import', tsRegister, passthrough, '--listen', `${this.node.gateway}:${PROXY_PORT}`, '--log', this.logFile], {
      inProxyCgroup: true,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    await waitForOutput(this.#child, 'listening');
    this.#listening = true;
  }

  async kill(): Promise<void> {
    const c = this.#child;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const exited = once(c, 'exit');
    c.kill('SIGTERM');
    await exited;
  }

  records(): ConnectionRecord[] {
    return readFileSync(this.logFile, 'utf8')
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => JSON.parse(l) as ConnectionRecord);
  }

  start(): void {}
  detach(): void {}
  status() {
    const up = this.#child !== undefined && this.#child.exitCode === null && this.#child.signalCode === null;
    return { kind: 'passthrough (test)', pid: this.#child?.pid, up, listening: up && this.#listening, restarts: 0 };
  }
  ready(): boolean {
    return this.status().listening;
  }
}

export interface PolicyOptions {
  /** node.interceptionMode: the Node label; null when unset. */
  label?: DesiredInterceptionMode | null;
  meshDefault?: DesiredInterceptionMode;
  /** mesh.inbound (default permissive). */
  inbound?: 'strict' | 'permissive';
  /** node.monitoredNamespaces (absent unless given, as from an older controller). */
  monitoredNamespaces?: string[];
}

/** The node's NodePolicy: its pods enrolled (cgroup given as a path, like the lab annotation), every node a proxy peer. */
export function nodePolicy(topo: Topology, node: TopoNode, pods: TopoPod[], o: PolicyOptions = {}): NodePolicy {
  const body: Omit<NodePolicy, 'version'> = {
    apiVersion: POLICY_API_VERSION,
    kind: 'NodePolicy',
    mesh: {
      name: 'fsmt',
      inbound: o.inbound ?? 'permissive',
      interceptionMode: o.meshDefault ?? 'auto',
      egress: 'allow',
      trafficPolicy: 'permissive',
      exclusions: { outboundPorts: [], outboundCidrs: [], outboundIncludeCidrs: [], inboundPorts: [] },
    },
    proxies: topo.nodes.map((n) => ({ node: n.name, addresses: [n.gateway, n.underlayIp] })),
    node: { name: node.name, addresses: [node.underlayIp], interceptionMode: o.label ?? null, ...(o.monitoredNamespaces ? { monitoredNamespaces: o.monitoredNamespaces } : {}) },
    meshPods: pods.map((p) => ({ ip: p.ip, namespace: 'fsmt', serviceAccount: 'default', node: node.name })),
    pods: pods.map((p) => ({
      uid: `uid-${p.name}`,
      namespace: 'fsmt',
      name: p.name,
      ip: p.ip,
      serviceAccount: 'default',
      cgroup: { qosClass: null, path: p.cgroupPath },
      exclusions: { outboundPorts: [], outboundCidrs: [], outboundIncludeCidrs: [], inboundPorts: [] },
    })),
    access: [],
    services: [],
    splits: [],
  };
  const version = createHash('sha256').update(JSON.stringify(body)).digest('hex').slice(0, 16);
  return { ...body, version } as NodePolicy;
}

export function agentConfig(node: TopoNode, stateDir: string, mode: AgentConfig['mode'] = 'auto'): AgentConfig {
  return nodeAgentConfig(node, stateDir, { mode, outboundPort: PROXY_PORT });
}

/** The agent as `fsm-node agent` builds it, with the test's feed, proxy and (optionally) probe. */
export function testAgent(config: AgentConfig, feed: PolicyFeed, proxy: AgentProxy, probe: () => Promise<ProbeReport>, reportMode?: AgentDeps['reportMode']): Agent {
  const site = { stateDir: config.stateDir, bpffsDir: config.bpffsDir, podsCgroup: config.podsCgroup, proxyCgroup: config.proxyCgroup, fastPath: config.fastPath, netns: config.netns! };
  const facts = {
    proxy: { address: config.proxyAddress, outboundPort: config.outboundPort, inboundPort: config.inboundPort, cgroupPath: config.proxyCgroup },
    nodeAddresses: config.nodeAddresses,
    cgroupPathFor: cgroupResolver(cgroup2Root()),
  };
  return new Agent(config, {
    policy: feed,
    probe,
    dataplane: (mode) => createDataplane(mode, site),
    render: (policy) => desiredState(policy, facts),
    proxy,
    ...(reportMode ? { reportMode } : {}),
  });
}

/** Remove both modes' state from a node (test teardown); the agent's own cleanup is what the tests check. */
export async function cleanupBothModes(node: TopoNode, stateDir: string): Promise<void> {
  for (const mode of ['ebpf', 'iptables'] as InterceptionMode[]) {
    const spec = nodeSpec(node);
    const dp = createDataplane(mode, { stateDir, bpffsDir: spec.bpffsDir, podsCgroup: spec.podsCgroup, proxyCgroup: spec.proxyCgroup, netns: spec.netns });
    await dp.cleanup().catch(() => undefined);
    await dp.close().catch(() => undefined);
  }
}

/** A probe report (the real one, taken once) with a check forced to fail: what a node without that capability reports. */
export function withFailedCheck(report: ProbeReport, mode: InterceptionMode, name: string, detail: string): ProbeReport {
  const checks = [{ name, ok: false, detail, neededBy: [mode] }, ...report.checks.filter((c) => c.name !== name)];
  return { ...report, checks, support: supportFrom(checks) };
}

// One connection kept open (from a given local port when asked; libuv binds it with
// SO_REUSEADDR): each stdin line is sent, everything received goes to stdout;
// "connected <local>" once connected, "closed <reason>" when it ends.
const LONG_LIVED_CLIENT = `
const net = require('node:net');
const [host, port, localPort] = process.argv.slice(1);
const s = net.connect({ host, port: Number(port), ...(localPort ? { localPort: Number(localPort) } : {}) });
s.setNoDelay(true);
s.on('connect', () => console.log('connected ' + s.localAddress + ':' + s.localPort));
s.on('data', (d) => process.stdout.write(d));
s.on('error', (e) => console.log('closed ' + (e.code || e.message)));
s.on('close', () => { console.log('closed'); process.exit(0); });
process.stdin.setEncoding('utf8').on('data', (d) => s.write(d));
process.stdin.on('end', () => s.end());
`;

export interface LongLived {
  /** The client's local address:port (to find its proxy record). */
  local: string;
  /** Send `msg` and wait for it to come back; false when the connection ended or nothing came back in waitMs. */
  exchange(msg: string, waitMs?: number): Promise<boolean>;
  close(): Promise<void>;
}

/** A long-lived connection from `pod` (from `localPort` when given) to an echo server. */
export async function openLongLived(pod: TopoPod, host: string, port: number, localPort?: number): Promise<LongLived> {
  const child = pod.exec(process.execPath, ['-e', LONG_LIVED_CLIENT, host, String(port), ...(localPort ? [String(localPort)] : [])], { stdio: ['pipe', 'pipe', 'pipe'] });
  const first = await waitForOutput(child, 'connected ');
  const local = /connected (\S+)/.exec(first)![1]!;
  let out = first;
  child.stdout!.on('data', (d: string) => (out += d));
  return {
    local,
    async exchange(msg, waitMs = 5000) {
      if (child.exitCode !== null) return false;
      const from = out.length;
      child.stdin!.write(`${msg}\n`);
      const deadline = Date.now() + waitMs;
      while (Date.now() < deadline) {
        const got = out.slice(from);
        if (got.includes(msg)) return true;
        if (got.includes('closed')) return false;
        await new Promise((r) => setTimeout(r, 20));
      }
      return false;
    },
    async close() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = once(child, 'exit');
      child.kill('SIGTERM');
      await exited;
    },
  };
}
