import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Agent, type AgentProxy } from '../../src/agent/agent.js';
import { nodeAgentConfig } from '../../src/lab/node-agent.js';
import { pipyAdminMetrics } from '../../src/agent/metrics.js';
import { probe } from '../../src/agent/probe.js';
import { createDataplane } from '../../src/dataplane/index.js';
import { noExclusions, type DesiredState } from '../../src/dataplane/types.js';
import { Topology, type TopoNode } from '../../src/lab/topology.js';
import type { NodePolicy } from '../../src/policy/schema.js';
import { run } from '../../src/util/exec.js';
import { eventually } from '../support/eventually.js';
import { uniqueTestPrefix } from '../support/names.js';
import { findPipy } from '../support/pipy.js';

/**
 * A real Prometheus (Debian's prometheus binary, started here on loopback
 * with a generated config) scrapes a real agent: the eBPF dataplane on a
 * one-node topology with three pods, and a real Pipy as its node proxy
 * (admin and listener on 127.0.0.1). Through Prometheus's own query API the
 * enrolled-pod count, the BPF map fill, the per-pod redirect counter and the
 * re-exported Pipy metrics must show the values this test knows; promtool
 * must accept the exposition.
 */

const passthrough = fileURLToPath(new URL('../../src/proxy/passthrough.ts', import.meta.url));
const tsRegister = fileURLToPath(new URL('../support/ts-register.mjs', import.meta.url));

const PODS = 3;
const REQUESTS = 5;
const CONNECTS = 3;

const freePort = async (): Promise<number> => {
  const s = createServer().listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as { port: number }).port;
  s.close();
  return port;
};

const which = async (cmd: string): Promise<boolean> => (await run('sh', ['-c', `command -v ${cmd}`], { allowFail: true })).code === 0;

/** The Pipy program: one HTTP listener answering 200, counting requests the way proxy/metrics.js names its counters. */
const pipyProgram = (port: number) => `
var requests = new stats.Counter('fsmn_proxy_requests_total', ['source', 'destination'])
pipy.listen('127.0.0.1:${port}', $=>$
  .demuxHTTP().to($=>$
    .handleMessageStart(() => requests.withLabels('demo/client', 'demo/echo').increase())
    .replaceMessage(new Message({ status: 200 }, 'ok'))
  )
)
`;

describe('Prometheus scrapes the agent', () => {
  const prefix = uniqueTestPrefix();
  const work = mkdtempSync(join(tmpdir(), `${prefix}-prom-`));
  const pipyBin = findPipy();
  let topo: Topology | undefined;
  let agent: Agent | undefined;
  /** The node proxy: Pipy when there is one, else the passthrough proxy (then the Pipy checks are skipped). */
  let proxyProcess: ChildProcess | undefined;
  let prometheus: ChildProcess | undefined;
  let skip: string | undefined;
  let promUrl = '';
  let agentUrl = '';

  const stopChild = async (c: ChildProcess | undefined) => {
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    c.kill('SIGTERM');
    await once(c, 'exit');
  };

  beforeAll(async () => {
    if (!(await which('prometheus')) || !(await which('promtool'))) skip = 'no prometheus/promtool (Debian package prometheus)';
    if (skip) {
      process.stderr.write(`SKIP prometheus test: ${skip}\n`);
      return;
    }
    if (!pipyBin) process.stderr.write('SKIP the Pipy metrics checks of the prometheus test: no Pipy binary (PIPY_BIN or pipy on PATH); the passthrough proxy stands in\n');
    topo = await Topology.create({ prefix, nodes: 1, podsPerNode: PODS });
    const node: TopoNode = topo.nodes[0]!;

    const [admin, listener, api, promPort] = [await freePort(), await freePort(), await freePort(), await freePort()];
    let pipyMetrics: (() => Promise<string>) | undefined;
    if (pipyBin) {
      writeFileSync(join(work, 'main.js'), pipyProgram(listener));
      proxyProcess = spawn(pipyBin, [`--admin-port=127.0.0.1:${admin}`, join(work, 'main.js')], { stdio: ['ignore', 'ignore', 'ignore'] });
      const read = pipyAdminMetrics(`http://127.0.0.1:${admin}/metrics`);
      pipyMetrics = read;
      await eventually(() => read().then(() => true, () => false), (ok) => ok, 10_000);
      for (let i = 0; i < REQUESTS; i++) expect((await fetch(`http://127.0.0.1:${listener}/`)).status).toBe(200);
    } else {
      proxyProcess = spawn(process.execPath, ['--import', tsRegister, passthrough, '--listen', `127.0.0.1:${listener}`, '--log', join(work, 'proxy.jsonl')], { stdio: ['ignore', 'ignore', 'ignore'] });
    }
    const alive = () => proxyProcess!.exitCode === null && proxyProcess!.signalCode === null;
    const proxy: AgentProxy = {
      start: () => undefined,
      detach: () => undefined,
      status: () => ({ kind: pipyBin ? 'pipy' : 'passthrough', up: alive(), listening: alive(), restarts: 0 }),
      ready: alive,
      ...(pipyMetrics ? { metrics: pipyMetrics } : {}),
    };
    const pods = node.pods.map((p, i) => ({ uid: `uid-${p.name}`, namespace: 'demo', name: `echo-${i}`, ip: p.ip, cgroup: p.cgroupPath }));
    // Only the fields the agent reads: version, node and mesh interception mode, pods.
    const policy = { version: 'v-prom-1', node: { name: node.name, addresses: [node.underlayIp], interceptionMode: 'ebpf' }, mesh: { interceptionMode: 'ebpf' }, pods } as unknown as NodePolicy;
    const render = (): DesiredState => ({
      proxy: { address: node.gateway, outboundPort: 15001, inboundPort: 15003, cgroupPath: node.proxyCgroup },
      nodeAddresses: [node.gateway, node.underlayIp],
      proxySources: [node.gateway, node.underlayIp],
      mesh: noExclusions(),
      pods: pods.map((p) => ({ uid: p.uid, namespace: p.namespace, name: p.name, ip: p.ip, cgroupPath: p.cgroup, inbound: 'permissive', exclusions: noExclusions() })),
    });
    const config = nodeAgentConfig(node, join(work, 'state'), { mode: 'ebpf', controller: 'https://127.0.0.1:1', listen: `127.0.0.1:${api}`, proxy: 'pipy' });
    const site = { stateDir: config.stateDir, bpffsDir: config.bpffsDir, podsCgroup: config.podsCgroup, proxyCgroup: config.proxyCgroup, netns: node.netns };
    agent = new Agent(config, {
      policy: { current: () => ({ policy, receivedAt: Date.now() }), onChange: () => undefined, start: () => undefined, stop: async () => undefined, fetchErrors: () => 0 },
      probe: () => probe({ netns: node.netns }),
      dataplane: (mode) => createDataplane(mode, site),
      render,
      proxy,
    });
    await agent.start();
    agent.requestSync('test start');
    expect(await eventually(() => fetch(`http://127.0.0.1:${api}/readyz`).then((r) => r.status), (s) => s === 200, 20_000)).toBe(200);
    // Pod 0 connects CONNECTS times to pod 1: each connect is redirected (and counted) by connect4;
    // nothing listens on the proxy port in the node, so each ends refused, which is all this test needs.
    const client = `const net = require('net'); let n = 0; const go = () => { const s = net.connect(8080, '${node.pods[1]!.ip}'); s.on('error', () => {}); s.on('close', () => { if (++n < ${CONNECTS}) go(); }); }; go();`;
    const r = await node.pods[0]!.run(process.execPath, ['-e', client]);
    expect(r.code).toBe(0);

    writeFileSync(
      join(work, 'prometheus.yml'),
      ['global:', '  scrape_interval: 1s', 'scrape_configs:', '  - job_name: fsm-node-agent', '    static_configs:', `      - targets: ['127.0.0.1:${api}']`, ''].join('\n'),
    );
    prometheus = spawn('prometheus', [`--config.file=${join(work, 'prometheus.yml')}`, `--storage.tsdb.path=${join(work, 'tsdb')}`, `--web.listen-address=127.0.0.1:${promPort}`], {
      stdio: ['ignore', 'ignore', 'ignore'],
    });
    promUrl = `http://127.0.0.1:${promPort}`;
    agentUrl = `http://127.0.0.1:${api}`;
  }, 90_000);

  afterAll(async () => {
    await stopChild(prometheus);
    await agent?.stop();
    await stopChild(proxyProcess);
    if (topo) {
      // The agent leaves its dataplane in place on stop (by design); the test removes it.
      await createDataplane('ebpf', { stateDir: join(work, 'state'), bpffsDir: topo.nodes[0]!.bpffsDir, podsCgroup: topo.nodes[0]!.podsCgroup, proxyCgroup: topo.nodes[0]!.proxyCgroup }).cleanup();
      await topo.destroy();
    }
    rmSync(work, { recursive: true, force: true });
  }, 60_000);

  /** One instant vector from Prometheus's HTTP API: labels (without job/instance) -> value. */
  const query = async (q: string): Promise<Array<{ metric: Record<string, string>; value: number }>> => {
    const res = await fetch(`${promUrl}/api/v1/query?query=${encodeURIComponent(q)}`).catch(() => undefined); // not up yet
    if (!res?.ok) return [];
    const body = (await res.json()) as { data: { result: Array<{ metric: Record<string, string>; value: [number, string] }> } };
    return body.data.result.map((r) => ({ metric: r.metric, value: Number(r.value[1]) }));
  };
  const scalar = async (q: string) => (await query(q))[0]?.value;

  test('enrolled pods, map fill, proxy health and the re-exported Pipy metrics, read back through PromQL', async () => {
    if (skip) return;
    expect(await eventually(() => scalar('fsm_node_enrolled_pods'), (v) => v !== undefined, 30_000)).toBe(PODS);
    expect(await eventually(() => scalar('fsm_node_bpf_map_entries{map="fsm_pods"}'), (v) => v !== undefined, 10_000)).toBe(PODS);
    expect(await scalar('fsm_node_bpf_map_capacity{map="fsm_pods"}')).toBeGreaterThanOrEqual(PODS);
    expect(await query('fsm_node_redirected_connections_total')).toEqual([
      { metric: { __name__: 'fsm_node_redirected_connections_total', namespace: 'demo', pod: 'echo-0', job: 'fsm-node-agent', instance: expect.any(String) }, value: CONNECTS },
    ]);
    expect(await scalar('fsm_node_ready')).toBe(1);
    expect(await scalar('fsm_node_proxy_up')).toBe(1);
    expect(await scalar('fsm_node_proxy_restarts')).toBe(0);
    expect(await scalar('fsm_node_proxy_metrics_up')).toBe(1);
    if (!pipyBin) return;
    expect(await query('fsm_node_proxy_requests_total')).toEqual([
      { metric: { __name__: 'fsm_node_proxy_requests_total', source: 'demo/client', destination: 'demo/echo', node: 'n1', job: 'fsm-node-agent', instance: expect.any(String) }, value: REQUESTS },
    ]);
    // Pipy's inbound byte counter: one series per listener, no unlabelled total beside it.
    const inbound = await query('fsm_node_proxy_inbound_received_bytes_total');
    expect(inbound.length).toBeGreaterThan(0);
    expect(inbound.every((s) => s.metric.listen !== undefined && s.value > 0)).toBe(true);
  }, 60_000);

  test('promtool check metrics accepts the agent exposition', async () => {
    if (skip) return;
    const text = await (await fetch(`${agentUrl}/metrics`)).text();
    if (pipyBin) expect(text).toContain('fsm_node_proxy_requests_total{');
    const checked = await run('promtool', ['check', 'metrics'], { input: text, allowFail: true });
    expect(checked.stdout + checked.stderr).toBe('');
    expect(checked.code).toBe(0);
  });
});
