import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Agent } from '../../src/agent/agent.js';
import { probe, type ProbeReport } from '../../src/agent/probe.js';
import type { InterceptionMode } from '../../src/dataplane/types.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import type { NodeModeStatus } from '../../src/policy/schema.js';
import { MemoryPolicyFeed, TestNodeProxy, agentConfig, cleanupBothModes, nodePolicy, testAgent, withFailedCheck } from '../support/agent-harness.js';
import { dataplaneModes, nodeSpec } from '../support/dataplanes.js';
import { eventually, eventuallyEqual } from '../support/eventually.js';
import { uniqueTestPrefix } from '../support/names.js';
import { echo, startEchoServer } from '../support/traffic.js';

/**
 * The real Agent when the probe says a mode cannot run (the report is the
 * real probe's with one check forced to fail, as on a node without that
 * capability): it falls back with the reason, keeps its choice across a
 * restart, and is not ready — with nothing installed — when no mode works.
 *
 *   n1: A, B (enrolled)
 */

const PORT = 8080;
const NO_CONNECT4 = 'injected: program type cgroup_sock_addr not supported by this kernel';
type ModeState = { mode?: { ready: boolean; effective?: string; fallbackReason?: string; reason?: string }; retiring?: string; applied?: { version: string } };

describe('agent mode fallback, restart and readiness', () => {
  const prefix = uniqueTestPrefix();
  const work = mkdtempSync(join(tmpdir(), `${prefix}-`));
  const stateDir = join(work, 'state');
  let topo: Topology;
  let n1: TopoNode;
  let A: TopoPod, B: TopoPod;
  let proxy: TestNodeProxy;
  let real: ProbeReport;
  let agent: Agent | undefined;
  const before: Record<InterceptionMode, string[]> = { ebpf: [], iptables: [] };
  const footprint = (mode: InterceptionMode) => dataplaneModes[mode]!.footprint(nodeSpec(n1));
  const state = () => agent!.state() as ModeState;

  /** What the agent reported to "the controller" (it turns fallbacks into Node Events). */
  const reported: NodeModeStatus[] = [];
  const startAgent = async (feed: MemoryPolicyFeed, report: ProbeReport, dir = stateDir): Promise<Agent> => {
    agent = testAgent(agentConfig(n1, dir), feed, proxy, async () => report, async (s) => void reported.push(s));
    await agent.start();
    return agent;
  };
  const stopAgent = async () => {
    await agent?.stop();
    agent = undefined;
  };
  const settled = (mode: InterceptionMode, version: string) =>
    eventually(
      async () => state(),
      (s) => s.mode?.effective === mode && s.retiring === undefined && s.applied?.version === version,
      30_000,
    );
  const intercepted = async () => {
    const since = proxy.records().length;
    const r = await echo(A, B.ip, PORT);
    const port = Number(r.local?.slice(r.local.lastIndexOf(':') + 1));
    return proxy.records().slice(since).find((x) => x.event === 'open' && x.source === A.ip && x.sourcePort === port)?.originalDst;
  };

  beforeAll(async () => {
    topo = await Topology.create({ prefix, nodes: 1, podsPerNode: 0 });
    n1 = topo.nodes[0]!;
    A = await topo.addPod(n1, 'a');
    B = await topo.addPod(n1, 'b');
    await startEchoServer(B, 'b', PORT);
    proxy = new TestNodeProxy(n1, work);
    await proxy.launch();
    before.ebpf = await footprint('ebpf');
    before.iptables = await footprint('iptables');
    real = await probe({ netns: n1.netns });
  }, 120_000);

  afterAll(async () => {
    await stopAgent();
    if (n1) await cleanupBothModes(n1, stateDir);
    await proxy?.kill();
    await topo?.destroy();
    rmSync(work, { recursive: true, force: true });
  }, 60_000);

  test('the real probe finds both modes usable on this machine (the fallbacks below are injected)', () => {
    expect(real.support).toEqual({});
  });

  test('eBPF missing: falls back to iptables with the reason in status and metrics; a restart with eBPF available keeps iptables; a new desired mode switches', async () => {
    const feed = new MemoryPolicyFeed(nodePolicy(topo, n1, [A, B], { meshDefault: 'ebpf' }));
    await startAgent(feed, withFailedCheck(real, 'ebpf', 'bpf-load:connect4', NO_CONNECT4));
    const first = await settled('iptables', feed.current()!.policy.version);
    expect(first.mode).toMatchObject({ ready: true, desired: 'ebpf', desiredSource: 'mesh-default', effective: 'iptables', fallbackReason: `ebpf unavailable: bpf-load:connect4: ${NO_CONNECT4}` });
    const info = await agent!.metrics.registry.getSingleMetricAsString('fsm_node_mode_info');
    expect(info).toContain(`fsm_node_mode_info{desired="ebpf",effective="iptables",fallback_reason="ebpf unavailable: bpf-load:connect4: ${NO_CONNECT4}"} 1`);
    expect(agent!.notReadyReason()).toBeUndefined();
    expect(await intercepted()).toEqual({ address: B.ip, port: PORT });
    expect(await footprint('ebpf')).toEqual(before.ebpf);
    expect(JSON.parse(readFileSync(join(stateDir, 'mode.json'), 'utf8'))).toEqual({ desired: 'ebpf', effective: 'iptables' });
    expect(reported.splice(0)).toEqual([{ ready: true, desired: 'ebpf', effective: 'iptables', fallbackReason: `ebpf unavailable: bpf-load:connect4: ${NO_CONNECT4}` }]);
    const iptablesInstalled = await footprint('iptables');
    await stopAgent();

    // Same inputs, eBPF now available: the choice does not flip.
    await startAgent(feed, real);
    const again = await settled('iptables', feed.current()!.policy.version);
    expect(again.mode).toMatchObject({ ready: true, desired: 'ebpf', effective: 'iptables' });
    expect(await footprint('ebpf')).toEqual(before.ebpf);
    expect(await footprint('iptables')).toEqual(iptablesInstalled);
    expect(await intercepted()).toEqual({ address: B.ip, port: PORT });

    // A new desired mode (the Node label set to auto) is a new input: eBPF is preferred and used.
    const relabelled = nodePolicy(topo, n1, [A, B], { meshDefault: 'ebpf', label: 'auto' });
    feed.set(relabelled);
    const switched = await settled('ebpf', relabelled.version);
    expect(switched.mode).toMatchObject({ ready: true, desired: 'auto', desiredSource: 'node-label', effective: 'ebpf' });
    expect(switched.mode?.fallbackReason).toBeUndefined();
    expect(await eventuallyEqual(() => footprint('iptables'), before.iptables)).toEqual(before.iptables);
    expect(await intercepted()).toEqual({ address: B.ip, port: PORT });
    expect(JSON.parse(readFileSync(join(stateDir, 'mode.json'), 'utf8'))).toEqual({ desired: 'auto', effective: 'ebpf' });
    await stopAgent();
  }, 120_000);

  test('neither mode works: /readyz is 503 with the reason, nothing is installed, pods go direct rather than half-meshed', async () => {
    await cleanupBothModes(n1, stateDir);
    expect(await eventuallyEqual(() => footprint('ebpf'), before.ebpf)).toEqual(before.ebpf);
    const dir = join(work, 'state-none');
    const broken = withFailedCheck(withFailedCheck(real, 'ebpf', 'bpf-load:connect4', NO_CONNECT4), 'iptables', 'ipset', 'injected: ipset: command not found');
    const feed = new MemoryPolicyFeed(nodePolicy(topo, n1, [A, B], { meshDefault: 'auto' }));
    await startAgent(feed, broken, dir);
    const s = await eventually(async () => state(), (x) => x.mode !== undefined, 30_000);
    expect(s.mode).toMatchObject({ ready: false });
    const res = await fetch(`${agent!.apiUrl()}/readyz`);
    expect(res.status).toBe(503);
    const body = (await res.json()) as { ready: boolean; reason: string };
    expect(body.ready).toBe(false);
    expect(reported.splice(-1)).toEqual([{ ready: false, desired: 'auto', reason: body.reason }]);
    expect(body.reason).toBe(`no interception mode works: ebpf: bpf-load:connect4: ${NO_CONNECT4}; iptables: ipset: injected: ipset: command not found`);
    expect(await agent!.metrics.registry.getSingleMetricAsString('fsm_node_ready')).toMatch(/fsm_node_ready 0/);
    expect(await footprint('ebpf')).toEqual(before.ebpf);
    expect(await footprint('iptables')).toEqual(before.iptables);
    expect(await intercepted()).toBeUndefined();
    await stopAgent();
  }, 60_000);
});
