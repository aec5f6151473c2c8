import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { noExclusions, type Dataplane } from '../../src/dataplane/types.js';
import { writePodFault, type PodFault } from '../../src/lab/faults.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { parseResilienceDefaults, parseRetrySpec, parseUpstreamSpec } from '../../src/policy/resilience.js';
import { NodePolicySchema, POLICY_API_VERSION, type NodePolicy, type Resilience } from '../../src/policy/schema.js';
import { renderProxyConfig } from '../../src/proxy/config.js';
import { dataplaneModes, nodeSpec } from '../support/dataplanes.js';
import { uniqueTestPrefix } from '../support/names.js';
import { findPipy, metricValue, pipySkipReason, startNodeProxy, writeCodebase, writeConfig, type NodeProxy } from '../support/pipy.js';
import { waitForOutput } from '../support/traffic.js';

/**
 * Resilience in the real node proxy under faults the lab injects (issue 18),
 * counted, not timed:
 *
 *   n1: A (sa client), B1, B2 (sa echo)      n2: C (sa echo)
 *   service echo = B1, B2, C (10.96.8.8:8080)
 *
 * The echo servers are the lab's (src/lab/echo-server.ts) with fault files.
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

const NS = 'res';
const PORT = 8080;
const VIP = '10.96.8.8';
const echoScript = fileURLToPath(new URL('../../dist/src/lab/echo-server.js', import.meta.url));

// N GETs (or `method`), `concurrency` at a time, each on its own connection: statuses, answering pods, durations.
const LOAD = `
const http = require('node:http');
const [url, n, concurrency, method, timeout] = process.argv.slice(1);
const out = { statuses: {}, pods: {}, maxMs: 0, minFailMs: 1e9, elapsedMs: 0, headers: {} };
let left = Number(n);
const t0 = Date.now();
const one = () => new Promise((resolve) => {
  const start = Date.now();
  const req = http.request(url, { method, agent: false, headers: { connection: 'close' }, timeout: Number(timeout) }, (res) => {
    let body = '';
    res.setEncoding('utf8').on('data', (d) => (body += d));
    res.on('end', () => {
      const ms = Date.now() - start;
      out.statuses[res.statusCode] = (out.statuses[res.statusCode] || 0) + 1;
      if (res.headers['x-fsmn-circuit']) out.headers.circuit = (out.headers.circuit || 0) + 1;
      try { const p = JSON.parse(body).pod; if (p) out.pods[p] = (out.pods[p] || 0) + 1; } catch {}
      out.maxMs = Math.max(out.maxMs, ms);
      if (res.statusCode >= 500) out.minFailMs = Math.min(out.minFailMs, ms);
      resolve();
    });
  });
  req.on('timeout', () => req.destroy(new Error('client-timeout')));
  req.on('error', (e) => { out.statuses[e.message] = (out.statuses[e.message] || 0) + 1; resolve(); });
  req.end();
});
const worker = async () => { while (left-- > 0) await one(); };
Promise.all(Array.from({ length: Number(concurrency) }, worker)).then(() => { out.elapsedMs = Date.now() - t0; console.log(JSON.stringify(out)); });
`;

interface LoadResult {
  statuses: Record<string, number>;
  pods: Record<string, number>;
  maxMs: number;
  minFailMs: number;
  elapsedMs: number;
  headers: { circuit?: number };
}

async function load(from: TopoPod, n: number, o: { concurrency?: number; method?: string; timeoutMs?: number } = {}): Promise<LoadResult> {
  const r = await from.run(process.execPath, ['-e', LOAD, `http://${VIP}:${PORT}/`, String(n), String(o.concurrency ?? 1), o.method ?? 'GET', String(o.timeoutMs ?? 10_000)]);
  return JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as LoadResult;
}

const retry = (spec: object) => ({ namespace: NS, name: 'client-to-echo', ...parseRetrySpec(spec, NS) });
const upstream = (spec: object) => ({ namespace: NS, name: 'echo', ...parseUpstreamSpec({ host: 'echo', ...spec }, NS) });
const RETRY_5XX = { source: { kind: 'ServiceAccount', name: 'client' }, destinations: [{ kind: 'Service', name: 'echo' }], retryPolicy: { retryOn: '5xx,reset,connect-failure', numRetries: 2, retryBackoffBaseInterval: '5ms' } };

maybe('Pipy node proxy resilience under injected faults', () => {
  const pipy = findPipy() ?? '';
  let work = '';
  let topo: Topology;
  let n1: TopoNode;
  let A: TopoPod, B1: TopoPod, B2: TopoPod, C: TopoPod;
  const sa = new Map<TopoPod, string>();
  const dps: Dataplane[] = [];
  const proxies = new Map<TopoNode, NodeProxy>();
  const servers: ChildProcess[] = [];
  let generation = 0;
  const fault = (p: TopoPod, f: PodFault | undefined) => writePodFault(join(work, 'faults', `${p.name}.json`), f);

  function policyFor(node: TopoNode, resilience: Resilience): NodePolicy {
    const all = [A, B1, B2, C];
    const endpoint = (p: TopoPod) => ({ ip: p.ip, ports: { http: PORT }, node: p.node.name, pod: { namespace: NS, name: p.name }, serviceAccount: sa.get(p)! });
    return NodePolicySchema.parse({
      apiVersion: POLICY_API_VERSION,
      kind: 'NodePolicy',
      mesh: { name: 'fsmt', inbound: 'permissive', interceptionMode: 'iptables', egress: 'allow', trafficPolicy: 'permissive', exclusions: noExclusions() },
      proxies: topo.nodes.map((n) => ({ node: n.name, addresses: [n.underlayIp, n.gateway] })),
      resilience,
      node: { name: node.name, addresses: [node.gateway, node.underlayIp], interceptionMode: null },
      meshPods: all.map((p) => ({ ip: p.ip, namespace: NS, serviceAccount: sa.get(p)!, node: p.node.name })),
      pods: all
        .filter((p) => p.node === node)
        .map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, serviceAccount: sa.get(p)!, cgroup: { qosClass: null, path: p.cgroupPath }, exclusions: noExclusions() })),
      access: [],
      services: [{ namespace: NS, name: 'echo', clusterIPs: [VIP], ports: [{ name: 'http', port: PORT, protocol: 'TCP' as const, appProtocol: 'http' }], endpoints: [B1, B2, C].map(endpoint) }],
      splits: [],
      version: (0xa000 + generation * 2 + (node === n1 ? 0 : 1)).toString(16).padStart(16, '0'),
    });
  }

  /** Render and load a resilience setup on both nodes; wait until both proxies run it. */
  async function configure(r: { defaults?: Record<string, string>; retries?: object[]; upstreams?: object[] }): Promise<void> {
    generation++;
    const resilience: Resilience = { defaults: parseResilienceDefaults(r.defaults ?? {}), retries: (r.retries ?? []).map(retry), upstreams: (r.upstreams ?? []).map(upstream) };
    for (const node of topo.nodes) {
      const policy = policyFor(node, resilience);
      const cfg = renderProxyConfig(policy, { outboundPort: 15001, inboundPort: 15003 });
      const dir = join(work, node.name);
      const proxy = proxies.get(node);
      if (!proxy) {
        proxies.set(node, await startNodeProxy(node, pipy, writeCodebase(dir, cfg), cfg));
      } else {
        writeConfig(dir, cfg);
        proxy.reload();
        const deadline = Date.now() + 15_000;
        while (metricValue(await proxy.metrics(), 'fsmn_proxy_config', { version: policy.version }) !== 1) {
          if (Date.now() > deadline) throw new Error(`proxy of ${node.name} did not load version ${policy.version}`);
          await new Promise((res) => setTimeout(res, 100));
        }
      }
    }
  }

  beforeAll(async () => {
    const prefix = uniqueTestPrefix();
    work = mkdtempSync(join(tmpdir(), `${prefix}-res-`));
    topo = await Topology.create({ prefix, nodes: 2, podsPerNode: 0 });
    const [first, second] = topo.nodes as [TopoNode, TopoNode];
    n1 = first;
    A = await topo.addPod(n1, 'a');
    B1 = await topo.addPod(n1, 'b1');
    B2 = await topo.addPod(n1, 'b2');
    C = await topo.addPod(second, 'c');
    for (const [p, id] of [[A, 'client'], [B1, 'echo'], [B2, 'echo'], [C, 'echo']] as const) sa.set(p, id);
    for (const p of [B1, B2, C]) {
      const s = p.exec(process.execPath, [echoScript, 'serve', '--name', p.name, '--port', String(PORT), '--fault-file', join(work, 'faults', `${p.name}.json`)], { stdio: ['ignore', 'pipe', 'pipe'] });
      servers.push(s);
      await waitForOutput(s, 'listening');
    }
    await configure({});
    for (const node of topo.nodes) {
      const dp = dataplaneModes.iptables!.create(nodeSpec(node));
      dps.push(dp);
      await dp.apply({
        proxy: { address: node.gateway, outboundPort: 15001, inboundPort: 15003, cgroupPath: node.proxyCgroup },
        nodeAddresses: [node.gateway, node.underlayIp],
        proxySources: topo.nodes.flatMap((n) => [n.gateway, n.underlayIp]),
        mesh: noExclusions(),
        pods: node.pods.map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive' as const, exclusions: noExclusions() })),
      });
    }
  }, 180_000);

  afterAll(async () => {
    for (const dp of dps) await dp.cleanup().catch(() => undefined);
    for (const p of proxies.values()) await p.stop().catch(() => undefined);
    for (const s of servers) s.kill('SIGKILL');
    await topo?.destroy();
    if (work) rmSync(work, { recursive: true, force: true });
  }, 60_000);

  afterEach(() => {
    for (const p of [B1, B2, C]) fault(p, undefined);
  });

  test('retry: one endpoint of three answers 503: without a Retry about a third of 300 GETs fail, with one none', async () => {
    fault(B1, { kind: 'status', status: 503 });
    await configure({ defaults: { outlierDetection: 'off' } });
    const without = await load(A, 300);
    expect(without.statuses['503'] ?? 0).toBeGreaterThan(300 * 0.25);
    expect(without.statuses['503'] ?? 0).toBeLessThan(300 * 0.42);
    await configure({ defaults: { outlierDetection: 'off' }, retries: [RETRY_5XX] });
    const m0 = metricValue(await proxies.get(n1)!.metrics(), 'fsmn_proxy_retries_total', { result: 'recovered' });
    const withRetry = await load(A, 300);
    expect(withRetry.statuses).toEqual({ '200': 300 });
    const recovered = metricValue(await proxies.get(n1)!.metrics(), 'fsmn_proxy_retries_total', { result: 'recovered', source: `${NS}/client`, service: `${NS}/echo` }) - m0;
    expect(recovered).toBeGreaterThan(300 * 0.25);
    // Not safe to repeat: a POST is not retried.
    const posts = await load(A, 60, { method: 'POST' });
    expect(posts.statuses['503'] ?? 0).toBeGreaterThan(5);
  }, 120_000);

  test('outlier detection and timeout: a hung endpoint costs at most its timeout, a handful of failures, then no request goes there until it recovers', async () => {
    await configure({ upstreams: [{ connectionSettings: { http: { requestTimeout: '400ms' } }, outlierDetection: { consecutiveFailures: 2, baseEjectionTime: '3s' } }] });
    fault(B2, { kind: 'hang' });
    const m = await load(A, 60);
    const failed = (m.statuses['504'] ?? 0) + (m.statuses['client-timeout'] ?? 0);
    expect(m.statuses['client-timeout']).toBeUndefined();
    expect(failed).toBeGreaterThanOrEqual(2);
    expect(failed).toBeLessThanOrEqual(2);
    // A timed-out request took the timeout, not the client's 10 s (generous bounds: scheduling on a shared machine).
    expect(m.minFailMs).toBeGreaterThanOrEqual(400);
    expect(m.maxMs).toBeLessThan(3000);
    const metrics = await proxies.get(n1)!.metrics();
    expect(metricValue(metrics, 'fsmn_proxy_ejected_endpoints', { endpoint: `${B2.ip}:${PORT}` })).toBe(1);
    expect(metricValue(metrics, 'fsmn_proxy_timeouts_total', { source: `${NS}/client`, service: `${NS}/echo` })).toBeGreaterThanOrEqual(2);
    // Recovered: after the ejection time, real traffic finds it again.
    fault(B2, undefined);
    await new Promise((r) => setTimeout(r, 3200));
    const back = await load(A, 30);
    expect(back.statuses).toEqual({ '200': 30 });
    expect(back.pods.b2 ?? 0).toBeGreaterThan(0);
  }, 120_000);

  test('a node whose link is cut: its endpoint costs a handful of timeouts, a Retry hides them, it is ejected, and back after the link heals', async () => {
    await configure({ retries: [RETRY_5XX], upstreams: [{ connectionSettings: { http: { requestTimeout: '500ms' } }, outlierDetection: { consecutiveFailures: 2, baseEjectionTime: '3s' } }] });
    // Warm the tunnel to n2 first: the cut then hits a live tunnel connection, the hard case.
    expect((await load(A, 6)).statuses).toEqual({ '200': 6 });
    const ul = topo.underlay.netns;
    const timeouts = async () => metricValue(await proxies.get(n1)!.metrics(), 'fsmn_proxy_timeouts_total', { source: `${NS}/client`, service: `${NS}/echo` });
    const timedOutBefore = await timeouts();
    await topo.underlay.run('ip', ['link', 'set', 'u2', 'down']);
    try {
      const m = await load(A, 60);
      expect(m.statuses).toEqual({ '200': 60 });
      expect(m.pods.c ?? 0).toBe(0);
      const metrics = await proxies.get(n1)!.metrics();
      expect(metricValue(metrics, 'fsmn_proxy_ejected_endpoints', { endpoint: `${C.ip}:${PORT}` })).toBe(1);
      // A handful: the consecutive failures that eject it (timeouts, or a reset of the
      // tunnel stream), each hidden by a retry.
      const timedOut = (await timeouts()) - timedOutBefore;
      expect(timedOut).toBeGreaterThanOrEqual(1);
      expect(timedOut).toBeLessThanOrEqual(3);
      expect(ul).toMatch(/-ul$/);
    } finally {
      await topo.underlay.run('ip', ['link', 'set', 'u2', 'up']);
    }
    await new Promise((r) => setTimeout(r, 3500));
    const back = await load(A, 30);
    expect(back.statuses).toEqual({ '200': 30 });
    expect(back.pods.c ?? 0).toBeGreaterThan(0);
  }, 120_000);

  test('outlier detection never ejects more than the maximum share: with every endpoint failing, requests still try', async () => {
    await configure({ defaults: { outlierConsecutiveFailures: '1', outlierMaxEjectionPercent: '50' } });
    for (const p of [B1, B2, C]) fault(p, { kind: 'status', status: 500 });
    const m = await load(A, 30);
    expect(m.statuses).toEqual({ '500': 30 });
    const ejectedNow = (await proxies.get(n1)!.metrics()).split('\n').filter((l) => l.startsWith('fsmn_proxy_ejected_endpoints{') && l.endsWith(' 1'));
    expect(ejectedNow).toHaveLength(1); // floor(3 * 50 %) = 1
  }, 120_000);

  test('circuit breaking: maxRequests 2 with 10 concurrent requests to hung endpoints: 2 reach them, 8 are refused at once', async () => {
    await configure({ defaults: { outlierDetection: 'off' }, upstreams: [{ connectionSettings: { http: { maxRequests: 2, maxPendingRequests: 0, requestTimeout: '1s' } } }] });
    for (const p of [B1, B2, C]) fault(p, { kind: 'hang' });
    const m = await load(A, 10, { concurrency: 10 });
    expect(m.headers.circuit).toBe(8);
    expect(m.statuses['504']).toBe(2);
    expect(metricValue(await proxies.get(n1)!.metrics(), 'fsmn_proxy_resilience_rejected_total', { reason: 'max-requests' })).toBeGreaterThanOrEqual(8);
  }, 120_000);

  test('local rate limit: 30 requests per minute, no burst: of 60 quick GETs, 30 pass (within 10 %) and the rest get 429', async () => {
    await configure({ upstreams: [{ rateLimit: { local: { http: { requests: 30, unit: 'minute' } } } }] });
    const m = await load(A, 60);
    const ok = m.statuses['200'] ?? 0;
    // The bucket holds 30; it refills at 0.5 per second during the run.
    const expected = 30 + (m.elapsedMs / 1000) * 0.5;
    expect(Math.abs(ok - expected)).toBeLessThanOrEqual(Math.ceil(expected * 0.1));
    expect((m.statuses['429'] ?? 0) + ok).toBe(60);
  }, 120_000);
});
