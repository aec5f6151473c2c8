import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { noExclusions } from '../../src/dataplane/types.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { NodePolicySchema, POLICY_API_VERSION, type NodePolicy } from '../../src/policy/schema.js';
import { renderProxyConfig } from '../../src/proxy/config.js';
import { eventually } from '../support/eventually.js';
import { uniqueTestPrefix } from '../support/names.js';
import { PipyNodes } from '../support/pipy-nodes.js';
import { findPipy, metricValue, pipySkipReason } from '../support/pipy.js';
import { waitForOutput } from '../support/traffic.js';

/**
 * Upstream connections of the HTTP path are pooled per target, not per client
 * connection (docs/proxy.md, "Sustained load"). Counted, not timed: after N
 * client connections of one request each, the proxy holds at most as many
 * upstream connections as there were concurrent requests. Keyed per client
 * connection, every client connection left its own upstream connection open
 * for Pipy's 60 s maxIdle: N of them. The servers never close idle
 * connections (as Go's net/http does by default), so only the proxy bounds
 * them. Across nodes each request has a tunnel of its own (proxy/tunnel.js),
 * closed with its request: none may be left open.
 *
 * And no tunnel may carry another identity's request: a tunnel carries the
 * source identity the far node authorises every request on it with, so an
 * intruder's request must never ride a tunnel the client opened.
 *
 *   n1: A (sa client), X (sa intruder), B (sa server)    n2: C (sa server)
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

const NS = 'pool';
const PORT = 8080;
const CONNECTIONS = 200;
const CONCURRENCY = 4;

// Never closes an idle connection (keepAliveTimeout 0).
const SERVER = `
const http = require('node:http');
const name = process.argv[1];
const s = http.createServer((req, res) => { res.writeHead(200, { 'content-type': 'text/plain' }); res.end(name + '\\n'); });
s.keepAliveTimeout = 0;
s.listen(${PORT}, '0.0.0.0', () => console.log('listening'));
`;

// N GETs, `concurrency` at a time, each on its own connection; prints the status counts as JSON.
const LOAD = `
const http = require('node:http');
const [url, n, concurrency] = process.argv.slice(1);
const statuses = {};
let left = Number(n);
const one = () => new Promise((resolve) => {
  const req = http.get(url, { agent: false, headers: { connection: 'close' }, timeout: 5000 }, (res) => {
    res.resume();
    res.on('end', () => { statuses[res.statusCode] = (statuses[res.statusCode] || 0) + 1; resolve(); });
  });
  req.on('timeout', () => req.destroy(new Error('timeout')));
  req.on('error', (e) => { statuses[e.message] = (statuses[e.message] || 0) + 1; resolve(); });
});
const worker = async () => { while (left-- > 0) await one(); };
Promise.all(Array.from({ length: Number(concurrency) }, worker)).then(() => console.log(JSON.stringify(statuses)));
`;

async function load(from: TopoPod, url: string, n: number, concurrency: number): Promise<Record<string, number>> {
  const r = await from.run(process.execPath, ['-e', LOAD, url, String(n), String(concurrency)]);
  return JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as Record<string, number>;
}

/** Established connections in the node's namespace towards ip:port (the proxy's upstream side). */
async function upstreams(node: TopoNode, ip: string): Promise<number> {
  const r = await node.run('ss', ['-Htn', 'state', 'established', `dst ${ip}:${PORT}`]);
  return r.stdout.split('\n').filter((l) => l.trim() !== '').length;
}

maybe('Pipy upstream pools under connection churn', () => {
  const pipy = findPipy() ?? '';
  let work = '';
  let topo: Topology;
  let n1: TopoNode, n2: TopoNode;
  let A: TopoPod, X: TopoPod, B: TopoPod, C: TopoPod;
  const sa = new Map<TopoPod, string>();
  const nodes = new PipyNodes(pipy);
  const proxies = nodes.proxies;
  const servers: ChildProcess[] = [];

  function policyFor(node: TopoNode): NodePolicy {
    const all = [A, X, B, C];
    const endpoint = (p: TopoPod) => ({ ip: p.ip, ports: { http: PORT }, node: p.node.name, pod: { namespace: NS, name: p.name }, serviceAccount: sa.get(p)! });
    const body = {
      apiVersion: POLICY_API_VERSION,
      kind: 'NodePolicy',
      mesh: { name: 'fsmt', inbound: 'permissive', interceptionMode: 'iptables', egress: 'allow', trafficPolicy: 'smi', exclusions: noExclusions() },
      proxies: topo.nodes.map((n) => ({ node: n.name, addresses: [n.underlayIp, n.gateway] })),
      node: { name: node.name, addresses: [node.gateway, node.underlayIp], interceptionMode: null },
      meshPods: all.map((p) => ({ ip: p.ip, namespace: NS, serviceAccount: sa.get(p)!, node: p.node.name })),
      pods: all
        .filter((p) => p.node === node)
        .map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, serviceAccount: sa.get(p)!, cgroup: { qosClass: null, path: p.cgroupPath }, exclusions: noExclusions() })),
      access: [
        {
          namespace: NS,
          name: 'to-server',
          destination: { namespace: NS, serviceAccount: 'server', port: null },
          sources: [{ namespace: NS, serviceAccount: 'client' }],
          rules: [{ kind: 'HTTPRouteGroup' as const, name: 'all', matches: [{ name: 'any', pathRegex: '/.*', methods: ['*'], headers: {} }] }],
        },
      ],
      services: [{ namespace: NS, name: 'server', clusterIPs: ['10.96.7.7'], ports: [{ name: 'http', port: PORT, protocol: 'TCP' as const, appProtocol: 'http' }], endpoints: [B, C].map(endpoint) }],
      splits: [],
      version: node === n1 ? '00000000000000a1' : '00000000000000a2',
    };
    return NodePolicySchema.parse(body);
  }

  beforeAll(async () => {
    const prefix = uniqueTestPrefix();
    work = mkdtempSync(join(tmpdir(), `${prefix}-pool-`));
    topo = await Topology.create({ prefix, nodes: 2, podsPerNode: 0 });
    [n1, n2] = topo.nodes as [TopoNode, TopoNode];
    A = await topo.addPod(n1, 'a');
    X = await topo.addPod(n1, 'x');
    B = await topo.addPod(n1, 'b');
    C = await topo.addPod(n2, 'c');
    for (const [p, id] of [[A, 'client'], [X, 'intruder'], [B, 'server'], [C, 'server']] as const) sa.set(p, id);
    for (const p of [B, C]) {
      const s = p.exec(process.execPath, ['-e', SERVER, p.name], { stdio: ['ignore', 'pipe', 'pipe'] });
      servers.push(s);
      await waitForOutput(s, 'listening');
    }
    for (const node of topo.nodes) {
      const cfg = renderProxyConfig(policyFor(node), { outboundPort: 15001, inboundPort: 15003 });
      await nodes.start(node, join(work, node.name), cfg, 'iptables', {
        proxy: { address: node.gateway, outboundPort: 15001, inboundPort: 15003, cgroupPath: node.proxyCgroup },
        nodeAddresses: [node.gateway, node.underlayIp],
        proxySources: topo.nodes.flatMap((n) => [n.gateway, n.underlayIp]),
        mesh: noExclusions(),
        pods: node.pods.map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive' as const, exclusions: noExclusions() })),
      });
    }
  }, 180_000);

  afterAll(async () => {
    await nodes.stop();
    for (const s of servers) s.kill('SIGKILL');
    await topo?.destroy();
    if (work) rmSync(work, { recursive: true, force: true });
  }, 60_000);

  test(`same node: ${CONNECTIONS} client connections leave at most ${CONCURRENCY} upstream connections`, async () => {
    expect(await load(A, `http://${B.ip}:${PORT}/`, CONNECTIONS, CONCURRENCY)).toEqual({ '200': CONNECTIONS });
    expect(await upstreams(n1, B.ip)).toBeLessThanOrEqual(CONCURRENCY);
  }, 60_000);

  test(`cross node: ${CONNECTIONS} client connections: a tunnel per request, none left open, at most ${CONCURRENCY} upstream connections`, async () => {
    const metrics = () => proxies.get(n2)!.metrics();
    const accepted = (m: string) => metricValue(m, 'fsmn_proxy_tunnels_total', { result: 'accepted' });
    const before = accepted(await metrics());
    expect(await load(A, `http://${C.ip}:${PORT}/`, CONNECTIONS, CONCURRENCY)).toEqual({ '200': CONNECTIONS });
    const after = await metrics();
    expect(accepted(after) - before).toBe(CONNECTIONS);
    expect(after).toContain('pipy_http2_stream_count{type="Server"}'); // the gauge below exists: 0 means none open
    // Each tunnel (an HTTP/2 stream the far proxy serves) ends with its request.
    const open = await eventually(() => metrics().then((m) => metricValue(m, 'pipy_http2_stream_count', { type: 'Server' })), (n) => n === 0);
    expect(open).toBe(0);
    expect(await upstreams(n2, C.ip)).toBeLessThanOrEqual(CONCURRENCY);
  }, 60_000);

  test('attack: an intruder never rides a tunnel or upstream connection of the client (403 every time, across nodes and on the same node)', async () => {
    for (const target of [C, B]) {
      const url = `http://${target.ip}:${PORT}/`;
      // The client fills the pool, then client and intruder alternate while its tunnels sit idle in it.
      expect(await load(A, url, 20, CONCURRENCY)).toEqual({ '200': 20 });
      for (let i = 0; i < 3; i++) {
        expect(await load(X, url, 10, CONCURRENCY)).toEqual({ '403': 10 });
        expect(await load(A, url, 10, CONCURRENCY)).toEqual({ '200': 10 });
      }
    }
  }, 120_000);
});
