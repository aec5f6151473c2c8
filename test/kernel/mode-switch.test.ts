import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Agent } from '../../src/agent/agent.js';
import { probe } from '../../src/agent/probe.js';
import type { InterceptionMode } from '../../src/dataplane/types.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import {
  MemoryPolicyFeed,
  TestNodeProxy,
  agentConfig,
  cleanupBothModes,
  nodePolicy,
  openLongLived,
  testAgent,
  type LongLived,
} from '../support/agent-harness.js';
import { dataplaneModes, nodeSpec } from '../support/dataplanes.js';
import { eventually, eventuallyEqual } from '../support/eventually.js';
import { uniqueTestPrefix } from '../support/names.js';
import { echo, startEchoServer, startLoad, type Load, type LoadSummary } from '../support/traffic.js';

/**
 * Live switch of the interception mode by the real Agent, under load: the
 * node's policy (Node label flomesh.io/interception-mode) goes ebpf ->
 * iptables -> ebpf while pods keep opening short connections, same node and
 * cross node. No new connection may fail; after each switch interception
 * still holds and nothing of the old mode remains; connections opened before
 * a switch keep working after it (docs/ARCHITECTURE.md, "Interception mode
 * per node").
 *
 *   n1: A, B (enrolled; the agent under test runs for n1)   n2: C (echo server)
 */

const PORT = 8080;
/** Outside the ephemeral range: the local port of a connection opened under iptables that a later one reuses. */
const FIXED_LOCAL_PORT = 20_000;
// One echo exchange from a given local port (libuv binds it with SO_REUSEADDR): prints the outcome as JSON.
const FROM_PORT = `
const net = require('node:net');
const [host, port, localPort] = process.argv.slice(1);
const s = net.connect({ host, port: Number(port), localPort: Number(localPort), allowHalfOpen: true });
let got = '';
const done = (r) => { console.log(JSON.stringify(r)); process.exit(0); };
s.setTimeout(5000, () => done({ outcome: 'timeout' }));
s.on('connect', () => s.end('ping'));
s.on('data', (d) => (got += d));
s.on('end', () => done({ outcome: got.endsWith('ping') ? 'ok' : 'bad reply', got }));
s.on('error', (e) => done({ outcome: 'error', code: e.code }));
`;

type SwitchState = { mode?: { effective?: string }; retiring?: string; applied?: { version: string }; lastSwitch?: { at: string; to: string; totalMs: number } };

describe('live interception mode switch by the agent, under load', () => {
  const prefix = uniqueTestPrefix();
  const work = mkdtempSync(join(tmpdir(), `${prefix}-`));
  const stateDir = join(work, 'state');
  let topo: Topology;
  let n1: TopoNode;
  let A: TopoPod, B: TopoPod, C: TopoPod;
  let proxy: TestNodeProxy;
  let feed: MemoryPolicyFeed;
  let agent: Agent | undefined;
  const loads: Load[] = [];
  const longLived: LongLived[] = [];
  const before: Record<InterceptionMode, string[]> = { ebpf: [], iptables: [] };

  const footprint = (mode: InterceptionMode) => dataplaneModes[mode]!.footprint(nodeSpec(n1));
  const state = () => agent!.state() as SwitchState;

  /**
   * The proxy's records of connections A opened since `since`. Called only while no
   * load runs, so they are the connections the test just made. Matching by source port
   * would not do: netfilter remaps the source port of a connection whose tuple clashes
   * with a conntrack entry of the other mode's era (the proxy sees another port).
   */
  const opensSince = (since: number) => proxy.records().slice(since).filter((x) => x.event === 'open' && x.source === A.ip);

  /** One echo exchange from A while no load runs; where the proxy says it was going. */
  const viaProxy = async (from: TopoPod, host: string) => {
    expect(loads).toEqual([]);
    const since = proxy.records().length;
    const r = await echo(from, host, PORT);
    // The echo server names the peer it saw: the node proxy, or the pod itself if the connection went direct.
    return { outcome: r.outcome, peer: r.banner?.split(' ')[1], originalDst: opensSince(since).map((x) => x.originalDst) };
  };

  /** A long-lived connection from A, opened while no load runs, that the proxy recorded with its original destination. */
  const openIntercepted = async (host: string, localPort?: number): Promise<LongLived> => {
    expect(loads).toEqual([]);
    const since = proxy.records().length;
    const l = await openLongLived(A, host, PORT, localPort);
    longLived.push(l);
    const recorded = await eventually(
      async () => opensSince(since).map((x) => x.originalDst),
      (v) => v.length > 0,
    );
    expect(recorded).toEqual([{ address: host, port: PORT }]);
    return l;
  };

  /** Set the Node label and wait until the agent has switched and removed the old mode. */
  const switchTo = async (mode: InterceptionMode) => {
    const previousSwitch = state().lastSwitch?.at;
    const policy = nodePolicy(topo, n1, [A, B], { label: mode });
    feed.set(policy);
    return eventually(
      async () => state(),
      (s) => s.mode?.effective === mode && s.retiring === undefined && s.applied?.version === policy.version && s.lastSwitch !== undefined && s.lastSwitch.at !== previousSwitch,
      30_000,
    );
  };

  beforeAll(async () => {
    topo = await Topology.create({ prefix, nodes: 2, podsPerNode: 0 });
    n1 = topo.nodes[0]!;
    A = await topo.addPod(n1, 'a');
    B = await topo.addPod(n1, 'b');
    C = await topo.addPod(topo.nodes[1]!, 'c');
    for (const pod of [B, C]) await startEchoServer(pod, pod.name, PORT);
    // A real node always has other rules that use conntrack (kube-proxy, the CNI), so conntrack
    // stays on in its namespace when ours go. Without this, removing the iptables mode would
    // turn conntrack off in the lab node and so drop the translation of connections it DNATed.
    const kube = await n1.run('nft', ['-f', '-'], { input: 'table ip fsmt_kube {\n chain input {\n  type filter hook input priority 0;\n  ct state established,related counter accept\n }\n}\n' });
    if (kube.code !== 0) throw new Error(`nft: ${kube.stderr}`);
    proxy = new TestNodeProxy(n1, work);
    await proxy.launch();
    before.ebpf = await footprint('ebpf');
    before.iptables = await footprint('iptables');
    feed = new MemoryPolicyFeed(nodePolicy(topo, n1, [A, B], { label: 'ebpf' }));
    agent = testAgent(agentConfig(n1, stateDir), feed, proxy, () => probe({ netns: n1.netns }));
    await agent.start();
    await eventually(async () => agent!.notReadyReason(), (r) => r === undefined, 30_000);
  }, 180_000);

  afterAll(async () => {
    for (const l of loads) await l.stop().catch(() => undefined);
    for (const l of longLived) await l.close().catch(() => undefined);
    await agent?.stop();
    if (n1) await cleanupBothModes(n1, stateDir);
    await proxy?.kill();
    await topo?.destroy();
    rmSync(work, { recursive: true, force: true });
  }, 60_000);

  test('the agent starts in the mode the Node label asks for, and intercepts', async () => {
    expect(agent!.notReadyReason()).toBeUndefined();
    expect(state().mode).toMatchObject({ ready: true, desired: 'ebpf', desiredSource: 'node-label', effective: 'ebpf' });
    expect(await viaProxy(A, B.ip)).toEqual({ outcome: 'ok', peer: n1.gateway, originalDst: [{ address: B.ip, port: PORT }] });
    expect(await footprint('ebpf')).not.toEqual([]);
    expect(await footprint('iptables')).toEqual(before.iptables);
  });

  /** Loads from A, same node (A -> B) and cross node (A -> C), until stopLoads(). */
  const startLoads = async () => {
    loads.push(await startLoad(A, B.ip, PORT), await startLoad(A, C.ip, PORT));
    await Promise.all(loads.map((l) => l.progress(10)));
  };
  const stopLoads = async (): Promise<LoadSummary[]> => {
    const out: LoadSummary[] = [];
    for (const l of loads.splice(0)) out.push(await l.stop());
    return out;
  };
  const opened: Partial<Record<'ebpfSameNode' | 'ebpfCrossNode' | 'iptablesSameNode' | 'iptablesCrossNode', LongLived>> = {};
  let secondSwitchLoads: LoadSummary[] = [];

  test('ebpf -> iptables under load: no new connection fails, interception holds, nothing of eBPF remains, connections opened under eBPF keep working', async () => {
    // Opened under eBPF: connected to the proxy itself by the connect4 rewrite.
    opened.ebpfSameNode = await openIntercepted(B.ip);
    opened.ebpfCrossNode = await openIntercepted(C.ip);
    await startLoads();

    const s = await switchTo('iptables');
    expect(s).toMatchObject({ mode: { effective: 'iptables' }, lastSwitch: { to: 'iptables' } });
    await Promise.all(loads.map((l) => l.progress(50)));
    const summaries = await stopLoads();

    expect(await viaProxy(A, B.ip)).toEqual({ outcome: 'ok', peer: n1.gateway, originalDst: [{ address: B.ip, port: PORT }] });
    expect(await viaProxy(A, C.ip)).toEqual({ outcome: 'ok', peer: n1.underlayIp, originalDst: [{ address: C.ip, port: PORT }] });
    expect(await eventuallyEqual(() => footprint('ebpf'), before.ebpf)).toEqual(before.ebpf);
    expect(await footprint('iptables')).not.toEqual([]);
    expect({ same: await opened.ebpfSameNode.exchange('after-switch-1'), cross: await opened.ebpfCrossNode.exchange('after-switch-1') }).toEqual({ same: true, cross: true });
    for (const sum of summaries) {
      expect(sum).toMatchObject({ failed: 0, errors: [] });
      expect(sum.ok).toBeGreaterThan(50);
    }
    expect(await agent!.metrics.registry.getSingleMetricAsString('fsm_node_mode_switches_total')).toMatch(/from="ebpf",to="iptables"} 1/);
  }, 120_000);

  let clash: { outcome: string; code?: string } | undefined;

  test('iptables -> ebpf under load: interception holds, nothing of iptables remains, connections opened under either mode keep working', async () => {
    // Opened under iptables: DNATed by nat PREROUTING, the translation held by its conntrack entry.
    opened.iptablesSameNode = await openIntercepted(B.ip, FIXED_LOCAL_PORT);
    opened.iptablesCrossNode = await openIntercepted(C.ip);
    await startLoads();

    const s = await switchTo('ebpf');
    expect(s).toMatchObject({ mode: { effective: 'ebpf' }, lastSwitch: { to: 'ebpf' } });
    await Promise.all(loads.map((l) => l.progress(50)));
    secondSwitchLoads = await stopLoads();

    expect(await viaProxy(A, B.ip)).toEqual({ outcome: 'ok', peer: n1.gateway, originalDst: [{ address: B.ip, port: PORT }] });
    expect(await viaProxy(A, C.ip)).toEqual({ outcome: 'ok', peer: n1.underlayIp, originalDst: [{ address: C.ip, port: PORT }] });
    expect(await eventuallyEqual(() => footprint('iptables'), before.iptables)).toEqual(before.iptables);
    expect(await footprint('ebpf')).not.toEqual([]);
    const survived = {
      ebpfSameNode: await opened.ebpfSameNode!.exchange('after-switch-2'),
      ebpfCrossNode: await opened.ebpfCrossNode!.exchange('after-switch-2'),
      iptablesSameNode: await opened.iptablesSameNode.exchange('after-switch-2'),
      iptablesCrossNode: await opened.iptablesCrossNode.exchange('after-switch-2'),
    };
    expect(survived).toEqual({ ebpfSameNode: true, ebpfCrossNode: true, iptablesSameNode: true, iptablesCrossNode: true });
    // Some of these connections reuse pod ports of connections of the iptables era (see the test below).
    for (const sum of secondSwitchLoads) {
      expect(sum).toMatchObject({ failed: 0, errors: [] });
      expect(sum.ok).toBeGreaterThan(50);
    }
    // A new connection from the local port of a live connection of the iptables era (to C: another 4-tuple in the pod).
    clash = JSON.parse((await A.run(process.execPath, ['-e', FROM_PORT, C.ip, String(PORT), String(FIXED_LOCAL_PORT)])).stdout.trim()) as { outcome: string };
    expect(await agent!.metrics.registry.getSingleMetricAsString('fsm_node_mode_switches_total')).toMatch(/from="iptables",to="ebpf"} 1/);
    expect(agent!.notReadyReason()).toBeUndefined();
  }, 120_000);

  /*
   * The node's conntrack still holds the DNAT entries of the iptables era (TIME_WAIT for
   * 120 s, established ones for their life), whose reply tuple is proxy:15001 -> pod:port.
   * A new eBPF-rewritten connection from the same pod port to proxy:15001 clashes with one,
   * and netfilter gives it another source port on its way to the proxy. The eBPF record of
   * its original destination must still reach the proxy's getsockopt (docs/ARCHITECTURE.md,
   * "Interception mode per node").
   */
  test('after iptables -> ebpf, a new connection from a pod port a connection of the iptables era still uses goes through', () => {
    expect(clash).toMatchObject({ outcome: 'ok' });
    process.stdout.write(`${JSON.stringify({ switch: 'iptables->ebpf', loads: secondSwitchLoads.map((l) => ({ ok: l.ok, failed: l.failed })), clash })}\n`);
  });
});
