import type { ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Agent } from '../../src/agent/agent.js';
import { pluginConf } from '../../src/cni/service.js';
import type { InterceptionMode } from '../../src/dataplane/types.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { MemoryPolicyFeed, TestNodeProxy, agentConfig, cleanupBothModes, nodePolicy, testAgent } from '../support/agent-harness.js';
import { firstConnection, pluginStdin, prevResult, runPlugin, startSandbox } from '../support/cni-runtime.js';
import { eventually } from '../support/eventually.js';
import { uniqueTestPrefix } from '../support/names.js';
import { waitForOutput } from '../support/traffic.js';
import { probe } from '../../src/agent/probe.js';

/**
 * Enrolment at pod creation (issue 21), with the real C plugin, the real
 * agent and real kernels: a pod created the way a runtime creates it (sandbox
 * process, CNI ADD through the chain, then the pod's first process) is
 * intercepted on its very first connection, which it opens at once: the echo
 * server's `peer` is the node proxy, never the pod. And with the agent
 * stopped: strict meshes refuse the pod (kubelet retries), permissive ones
 * start it and the agent enrols it when it is back.
 *
 *   n1: srv (echo server, enrolled by the policy), c<i> (created through the plugin)
 */

const PORT = 8080;
const ROUNDS = Number(process.env.FSMN_CNI_ROUNDS ?? 200);
const support = fileURLToPath(new URL('../support/', import.meta.url));
const echoServer = fileURLToPath(new URL('../../src/lab/echo-server.ts', import.meta.url));

describe('CNI enrolment at pod creation', () => {
  const prefix = uniqueTestPrefix();
  const work = mkdtempSync(join(tmpdir(), `${prefix}-`));
  let topo: Topology;
  let n1: TopoNode;
  let srv: TopoPod;
  let server: ChildProcess;
  let proxy: TestNodeProxy;
  let agent: Agent | undefined;
  let seq = 0;

  const socket = join(work, 'cni.sock');
  const spool = join(work, 'spool');
  const startAgent = async (mode: InterceptionMode, stateDir: string, feed: MemoryPolicyFeed): Promise<Agent> => {
    await stopAgent(); // a failed test before may have left one running
    const report = await probe({ netns: n1.netns });
    agent = testAgent({ ...agentConfig(n1, stateDir, mode), cniSocket: socket, cniSpool: spool }, feed, proxy, async () => report);
    await agent.start();
    await eventually(async () => agent!.state() as { applied?: unknown }, (s) => s.applied !== undefined, 30_000);
    return agent;
  };
  const stopAgent = async () => {
    await agent?.stop();
    agent = undefined;
  };
  const policy = (inbound: 'strict' | 'permissive') => nodePolicy(topo, n1, [srv], { monitoredNamespaces: ['fsmt'], inbound });

  /** A pod as a runtime makes it: netns + address (the primary CNI's job), sandbox process, then our plugin. */
  const createPod = async (failurePolicy: 'fail-closed' | 'fail-open') => {
    const pod = await topo.addPod(n1, `c${++seq}`);
    const containerId = `${prefix}sandbox${seq}`.padEnd(40, '0');
    const sandbox = await startSandbox(pod, containerId);
    const add = await runPlugin('ADD', pod, containerId, pluginStdin(pluginConf({ socket, spool }, failurePolicy), prevResult(pod)));
    return { pod, containerId, sandbox, add };
  };
  const deletePod = async (p: { pod: TopoPod; containerId: string; sandbox: ChildProcess }, failurePolicy: 'fail-closed' | 'fail-open') => {
    const del = await runPlugin('DEL', p.pod, p.containerId, pluginStdin(pluginConf({ socket, spool }, failurePolicy), undefined));
    expect({ code: del.code, stdout: del.stdout }).toEqual({ code: 0, stdout: '' });
    p.sandbox.kill('SIGKILL');
    await topo.removePod(p.pod);
  };

  beforeAll(async () => {
    topo = await Topology.create({ prefix, nodes: 1, podsPerNode: 0 });
    n1 = topo.nodes[0]!;
    srv = await topo.addPod(n1, 'srv');
    server = srv.exec(process.execPath, ['--import', join(support, 'ts-register.mjs'), echoServer, 'serve', '--name', 'srv', '--port', String(PORT)], { stdio: ['ignore', 'pipe', 'pipe'] });
    await waitForOutput(server, 'listening');
    proxy = new TestNodeProxy(n1, work);
    await proxy.launch();
  }, 120_000);

  afterAll(async () => {
    await stopAgent();
    if (n1) for (const d of readdirSync(work).filter((d) => d.startsWith('state'))) await cleanupBothModes(n1, join(work, d));
    await proxy?.kill();
    await topo?.destroy();
    rmSync(work, { recursive: true, force: true });
  }, 120_000);

  describe.each(['ebpf', 'iptables'] as const)('%s', (mode) => {
    const stateDir = join(work, `state-${mode}`);
    afterAll(async () => {
      await stopAgent();
      await cleanupBothModes(n1, stateDir);
    }, 60_000);

    test(`a pod whose first process connects at once is intercepted on its first connection, ${ROUNDS} times in a row`, async () => {
      const feed = new MemoryPolicyFeed(policy('strict'));
      await startAgent(mode, stateDir, feed);
      const peers: Record<string, number> = {};
      const addMs: number[] = [];
      for (let i = 0; i < ROUNDS; i++) {
        const p = await createPod('fail-closed');
        expect({ round: i, code: p.add.code, stdout: p.add.stdout && JSON.parse(p.add.stdout) }).toEqual({ round: i, code: 0, stdout: prevResult(p.pod) });
        addMs.push(p.add.ms);
        const first = await firstConnection(p.pod, srv.ip, PORT);
        // Strict mesh: a pod that went direct would have been refused by srv, and `peer` would be the pod itself.
        expect({ round: i, pod: first.pod, peer: first.peer }).toEqual({ round: i, pod: 'srv', peer: n1.gateway });
        peers[first.peer!] = (peers[first.peer!] ?? 0) + 1;
        await deletePod(p, 'fail-closed');
      }
      expect(peers).toEqual({ [n1.gateway]: ROUNDS });
      // DEL removed every enrolment made at creation.
      const cni = (agent!.state() as { cni: { enrolledEarly: number; requests: { add: number; del: number; refused: number } } }).cni;
      expect(cni).toMatchObject({ enrolledEarly: 0, requests: { add: ROUNDS, del: ROUNDS, refused: 0 } });
      addMs.sort((a, b) => a - b);
      process.stdout.write(`${JSON.stringify({ test: 'cni-first-connection', mode, rounds: ROUNDS, addMsP50: addMs[Math.floor(ROUNDS / 2)], addMsMax: addMs[ROUNDS - 1] })}\n`);
      await stopAgent();
    }, 600_000);

    test('strict mesh, agent stopped: ADD fails with a CNI error (kubelet retries); with the agent back the retry enrols the pod', async () => {
      const feed = new MemoryPolicyFeed(policy('strict'));
      await startAgent(mode, stateDir, feed);
      await stopAgent();
      expect(existsSync(socket)).toBe(false);
      const p = await createPod('fail-closed');
      expect(p.add.code).toBe(1);
      const err = JSON.parse(p.add.stdout) as { code: number; msg: string; details: string };
      expect(err.code).toBe(11);
      expect(err.msg).toMatch(/agent unreachable.*strict mesh.*kubelet retries/);
      expect(err.details).toContain(socket);
      // A strict mesh never spools an ADD: the pod does not start.
      expect(existsSync(join(spool, p.containerId))).toBe(false);

      await startAgent(mode, stateDir, feed);
      const retry = await runPlugin('ADD', p.pod, p.containerId, pluginStdin(pluginConf({ socket, spool }, 'fail-closed'), prevResult(p.pod)));
      expect(retry.code).toBe(0);
      const first = await firstConnection(p.pod, srv.ip, PORT);
      expect({ pod: first.pod, peer: first.peer }).toEqual({ pod: 'srv', peer: n1.gateway });
      await deletePod(p, 'fail-closed');
      await stopAgent();
    }, 120_000);

    test('permissive mesh, agent stopped: the pod starts (direct), and is enrolled when the agent is back', async () => {
      const feed = new MemoryPolicyFeed(policy('permissive'));
      await startAgent(mode, stateDir, feed);
      await stopAgent();
      const p = await createPod('fail-open');
      expect({ code: p.add.code, stdout: JSON.parse(p.add.stdout) as unknown }).toEqual({ code: 0, stdout: prevResult(p.pod) });
      expect(existsSync(join(spool, p.containerId))).toBe(true);
      const before = await firstConnection(p.pod, srv.ip, PORT);
      expect({ pod: before.pod, peer: before.peer }).toEqual({ pod: 'srv', peer: p.pod.ip });

      await startAgent(mode, stateDir, feed);
      await eventually(async () => existsSync(join(spool, p.containerId)), (present) => !present, 10_000);
      const after = await eventually(() => firstConnection(p.pod, srv.ip, PORT), (r) => r.peer === n1.gateway, 10_000);
      expect({ pod: after.pod, peer: after.peer }).toEqual({ pod: 'srv', peer: n1.gateway });
      await deletePod(p, 'fail-open');
      await stopAgent();
    }, 120_000);
  });
});
