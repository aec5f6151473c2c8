import type { ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { noExclusions, type DesiredState } from '../../src/dataplane/types.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { NodePolicySchema, POLICY_API_VERSION, type NodePolicy } from '../../src/policy/schema.js';
import { renderProxyConfig, type ProxyConfig } from '../../src/proxy/config.js';
import { eventually } from '../support/eventually.js';
import { uniqueTestPrefix } from '../support/names.js';
import { PipyNodes } from '../support/pipy-nodes.js';
import { findPipy, metricValue, pipySkipReason, writeConfig } from '../support/pipy.js';
import { echo, startEchoServer, startLabEchoServer, startLoad } from '../support/traffic.js';

/**
 * The Pipy program on a real 2-node topology, the pods intercepted by each
 * dataplane mode in turn (iptables; eBPF when its objects are built), real
 * HTTP and TCP:
 *
 *   n1: A (sa client)  B (sa server-v1)  X (sa intruder)  F (sa safe)
 *   n2: C (sa server-v1)  D (sa server-v2)  E (sa vault)
 *
 * Services: echo (B, C, D) split 80/20 over echo-v1 (B, C) and echo-v2 (D),
 * HTTP on 8080; tcp-echo (C) on 9000; safe (F) and vault (E), HTTP on 8080
 * and TCP on 9000. smi access: client may GET /split and /allowed/... of both
 * server identities and use TCP 9000; server-v2 may do the same to safe and
 * vault; intruder may do nothing.
 *
 * Each node's policy has the compiler's shape: the services its pods may
 * reach or that select its own pods, the access rules of its own identities,
 * and every mesh pod. n1 may reach no vault: E is known there only as a mesh pod.
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

const NS = 'mesh';
const HTTP_PORT = 8080;
const TCP_PORT = 9000;
const ECHO_IP = '10.96.0.10';
const TCP_ECHO_IP = '10.96.0.20';
const VAULT_IP = '10.96.0.30';
const SAFE_IP = '10.96.0.31';
const support = fileURLToPath(new URL('../support/', import.meta.url));
const tsRegister = join(support, 'ts-register.mjs');
const echoServer = fileURLToPath(new URL('../../src/lab/echo-server.ts', import.meta.url));

// N GETs, `concurrency` at a time, each on a new connection; prints one JSON
// line: answers per pod, statuses, failures.
const HTTP_LOAD = `
const http = require('node:http');
const [url, n, concurrency] = process.argv.slice(1);
const out = { pods: {}, statuses: {}, failures: 0, errors: [] };
let left = Number(n);
const one = () => new Promise((resolve) => {
  const req = http.get(url, { agent: false, timeout: 5000 }, (res) => {
    let body = '';
    res.setEncoding('utf8').on('data', (d) => (body += d));
    res.on('end', () => {
      out.statuses[res.statusCode] = (out.statuses[res.statusCode] || 0) + 1;
      try { const pod = JSON.parse(body).pod; out.pods[pod] = (out.pods[pod] || 0) + 1; } catch {}
      resolve();
    });
  });
  req.on('timeout', () => req.destroy(new Error('timeout')));
  req.on('error', (e) => { out.failures++; if (out.errors.length < 5) out.errors.push(e.message); resolve(); });
});
const worker = async () => { while (left-- > 0) await one(); };
Promise.all(Array.from({ length: Number(concurrency) }, worker)).then(() => console.log(JSON.stringify(out)));
`;

// Connects, sends nothing, prints the first line the server sends.
const SERVER_FIRST = `
const s = require('node:net').connect(Number(process.argv[2]), process.argv[1]);
let got = '';
s.setTimeout(5000, () => { console.log('timeout'); process.exit(0); });
s.on('data', (d) => { got += d; if (got.includes('\\n')) { console.log(got.split('\\n')[0]); process.exit(0); } });
s.on('error', (e) => { console.log('error ' + e.code); process.exit(0); });
`;

interface LoadResult {
  pods: Record<string, number>;
  statuses: Record<string, number>;
  failures: number;
  errors: string[];
}

async function httpLoad(from: TopoPod, url: string, n: number, concurrency = 8): Promise<LoadResult> {
  const r = await from.run(process.execPath, ['-e', HTTP_LOAD, url, String(n), String(concurrency)]);
  return JSON.parse(r.stdout.trim().split('\n').pop() ?? '') as LoadResult;
}

interface Answer {
  status: number;
  pod?: string;
  peer?: string;
  body: string;
}

async function get(from: TopoPod, url: string): Promise<Answer> {
  const r = await from.run(process.execPath, ['--import', tsRegister, echoServer, 'get', url]);
  const res = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as { ok: boolean; status?: number; body?: string; error?: string };
  if (!res.ok) return { status: 0, body: res.error ?? '' };
  let parsed: { pod?: string; peer?: string } = {};
  try {
    parsed = JSON.parse(res.body ?? '') as { pod?: string; peer?: string };
  } catch {
    // a proxy's own answer (403, 503) is plain text
  }
  return { status: res.status ?? 0, pod: parsed.pod, peer: parsed.peer, body: res.body ?? '' };
}

/** Tunnels n2's inbound side accepted (its own counter, see proxy/metrics.js). */
const tunnels = (metrics: string): number => metricValue(metrics, 'fsmn_proxy_tunnels_total', { result: 'accepted' });

/** Both interception modes; eBPF only where its objects are built (the kernel tier needs them too). */
const bpfBuilt = existsSync(fileURLToPath(new URL('../../bpf/build/getsockopt.o', import.meta.url)));
if (!skip && !bpfBuilt) console.log('SKIP pipy tier, eBPF interception: BPF objects not built (npm run build:bpf)');
const modes = (['iptables', 'ebpf'] as const).filter((m) => m === 'iptables' || bpfBuilt);

maybe.each(modes)('Pipy node proxy on the topology (%s interception)', (mode) => {
  const pipy = findPipy() ?? '';
  let work = '';
  let topo: Topology;
  let n1: TopoNode, n2: TopoNode;
  let A: TopoPod, B: TopoPod, X: TopoPod, C: TopoPod, D: TopoPod, E: TopoPod, F: TopoPod;
  const sa = new Map<TopoPod, string>();
  const nodes = new PipyNodes(pipy);
  const proxies = nodes.proxies;
  const servers: ChildProcess[] = [];

  const podOf = (p: TopoPod) => ({
    uid: `uid-${p.name}`,
    namespace: NS,
    name: p.name,
    ip: p.ip,
    serviceAccount: sa.get(p)!,
    cgroup: { qosClass: null, path: p.cgroupPath },
    exclusions: noExclusions(),
  });
  const endpoint = (p: TopoPod, portName: string, port: number) => ({
    ip: p.ip,
    ports: { [portName]: port },
    node: p.node.name,
    pod: { namespace: NS, name: p.name },
    serviceAccount: sa.get(p)!,
  });
  const httpService = (name: string, ip: string, pods: TopoPod[]) => ({
    namespace: NS,
    name,
    clusterIPs: [ip],
    ports: [{ name: 'http', port: HTTP_PORT, protocol: 'TCP' as const, appProtocol: 'http' }],
    endpoints: pods.map((p) => endpoint(p, 'http', HTTP_PORT)),
  });

  /** HTTP on 8080 and TCP on 9000, one pod. */
  const bothService = (name: string, ip: string, p: TopoPod) => ({
    namespace: NS,
    name,
    clusterIPs: [ip],
    ports: [
      { name: 'http', port: HTTP_PORT, protocol: 'TCP' as const, appProtocol: 'http' },
      { name: 'tcp-echo', port: TCP_PORT, protocol: 'TCP' as const, appProtocol: null },
    ],
    endpoints: [{ ...endpoint(p, 'http', HTTP_PORT), ports: { http: HTTP_PORT, 'tcp-echo': TCP_PORT } }],
  });

  function policyFor(node: TopoNode, weights: { v1: number; v2: number }): NodePolicy {
    const all = [A, B, X, C, D, E, F];
    const local = all.filter((p) => p.node === node);
    const localIds = new Set(local.map((p) => sa.get(p)!));
    const rules = [
      { kind: 'HTTPRouteGroup' as const, name: 'routes', matches: [{ name: 'ok', pathRegex: '/(split|allowed)(/.*)?', methods: ['GET'], headers: {} }] },
      { kind: 'TCPRoute' as const, name: 'tcp', ports: [TCP_PORT] },
    ];
    const targets = [
      { to: 'server-v1', from: 'client' },
      { to: 'server-v2', from: 'client' },
      { to: 'vault', from: 'server-v2' },
      { to: 'safe', from: 'server-v2' },
    ].map((t) => ({
      namespace: NS,
      name: `to-${t.to}`,
      destination: { namespace: NS, serviceAccount: t.to, port: null },
      sources: [{ namespace: NS, serviceAccount: t.from }],
      rules,
    }));
    // As the compiler does: the services of identities this node's pods may reach, or of its own pods.
    const wanted = new Set([...localIds, ...targets.filter((t) => t.sources.some((s) => localIds.has(s.serviceAccount))).map((t) => t.destination.serviceAccount)]);
    const services = [
      httpService('echo', ECHO_IP, [B, C, D]),
      httpService('echo-v1', '10.96.0.11', [B, C]),
      httpService('echo-v2', '10.96.0.12', [D]),
      {
        namespace: NS,
        name: 'tcp-echo',
        clusterIPs: [TCP_ECHO_IP],
        ports: [{ name: 'tcp-echo', port: TCP_PORT, protocol: 'TCP' as const, appProtocol: null }],
        endpoints: [endpoint(C, 'tcp-echo', TCP_PORT)],
      },
      bothService('vault', VAULT_IP, E),
      bothService('safe', SAFE_IP, F),
    ].filter((s) => s.endpoints.some((e) => wanted.has(e.serviceAccount)));
    const body = {
      apiVersion: POLICY_API_VERSION,
      kind: 'NodePolicy',
      mesh: { name: 'fsmt', inbound: 'permissive', interceptionMode: mode, egress: 'allow', trafficPolicy: 'smi', exclusions: noExclusions() },
      proxies: topo.nodes.map((n) => ({ node: n.name, addresses: [n.underlayIp, n.gateway] })),
      node: { name: node.name, addresses: [node.gateway, node.underlayIp], interceptionMode: null },
      meshPods: all.map((p) => ({ ip: p.ip, namespace: NS, serviceAccount: sa.get(p)!, node: p.node.name })),
      pods: local.map(podOf),
      access: targets.filter((t) => localIds.has(t.destination.serviceAccount)),
      services,
      splits: services.some((s) => s.name === 'echo')
        ? [{ namespace: NS, name: 'echo-split', service: 'echo', backends: [{ service: 'echo-v1', weight: weights.v1 }, { service: 'echo-v2', weight: weights.v2 }], matches: [] }]
        : [],
    };
    const version = createHash('sha256').update(JSON.stringify(body)).digest('hex').slice(0, 16);
    return NodePolicySchema.parse({ ...body, version });
  }

  const configFor = (node: TopoNode, weights: { v1: number; v2: number }): ProxyConfig =>
    renderProxyConfig(policyFor(node, weights), { outboundPort: 15001, inboundPort: 15003 });

  const desired = (node: TopoNode): DesiredState => ({
    proxy: { address: node.gateway, outboundPort: 15001, inboundPort: 15003, cgroupPath: node.proxyCgroup },
    nodeAddresses: [node.gateway, node.underlayIp],
    proxySources: topo.nodes.flatMap((n) => [n.gateway, n.underlayIp]),
    mesh: noExclusions(),
    pods: node.pods.map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive' as const, exclusions: noExclusions() })),
  });

  /** Reload `node`'s proxy with new weights and wait until it reports the new config version. */
  async function setWeights(weights: { v1: number; v2: number }): Promise<void> {
    for (const node of topo.nodes) {
      const cfg = configFor(node, weights);
      writeConfig(join(work, node.name), cfg);
      proxies.get(node)!.reload();
      const seen = await eventually(
        async () => metricValue(await proxies.get(node)!.metrics(), 'fsmn_proxy_config', { version: cfg.version }),
        (v) => v === 1,
        10_000,
      );
      expect(seen).toBe(1);
    }
  }

  beforeAll(async () => {
    const prefix = uniqueTestPrefix();
    work = mkdtempSync(join(tmpdir(), `${prefix}-pipy-`));
    topo = await Topology.create({ prefix, nodes: 2, podsPerNode: 0 });
    [n1, n2] = topo.nodes as [TopoNode, TopoNode];
    A = await topo.addPod(n1, 'a');
    B = await topo.addPod(n1, 'b');
    X = await topo.addPod(n1, 'x');
    C = await topo.addPod(n2, 'c');
    D = await topo.addPod(n2, 'd');
    E = await topo.addPod(n2, 'e');
    F = await topo.addPod(n1, 'f');
    for (const [p, id] of [[A, 'client'], [B, 'server-v1'], [X, 'intruder'], [C, 'server-v1'], [D, 'server-v2'], [E, 'vault'], [F, 'safe']] as const) sa.set(p, id);
    for (const p of [B, C, D, E, F]) {
      servers.push(await startLabEchoServer(p, p.name, HTTP_PORT));
      await startEchoServer(p, `${p.name}-tcp`, TCP_PORT);
    }
    for (const node of topo.nodes) {
      const cfg = configFor(node, { v1: 80, v2: 20 });
      await nodes.start(node, join(work, node.name), cfg, mode, desired(node));
    }
  }, 180_000);

  afterAll(async () => {
    await nodes.stop();
    await topo?.destroy();
    if (work) rmSync(work, { recursive: true, force: true });
  }, 60_000);

  test('a service split 80/20 shows up within 5 points over 1000 requests; new weights change the ratio live', async () => {
    const before = await httpLoad(A, `http://${ECHO_IP}:${HTTP_PORT}/split`, 1000);
    expect(before).toMatchObject({ failures: 0, statuses: { '200': 1000 } });
    const v1 = (before.pods[B.name] ?? 0) + (before.pods[C.name] ?? 0);
    expect(Math.abs(v1 / 1000 - 0.8)).toBeLessThanOrEqual(0.05);
    // Round robin inside the v1 backend: both of its pods, one per node.
    expect(before.pods[B.name]).toBeGreaterThan(300);
    expect(before.pods[C.name]).toBeGreaterThan(300);

    await setWeights({ v1: 20, v2: 80 });
    const after = await httpLoad(A, `http://${ECHO_IP}:${HTTP_PORT}/split`, 1000);
    expect(after).toMatchObject({ failures: 0, statuses: { '200': 1000 } });
    const v2 = after.pods[D.name] ?? 0;
    expect(Math.abs(v2 / 1000 - 0.8)).toBeLessThanOrEqual(0.05);
    await setWeights({ v1: 80, v2: 20 });
  }, 120_000);

  test('cross-node: A -> C goes through both node proxies (tunnel to n2:15003) and arrives intact', async () => {
    const m1 = await proxies.get(n1)!.metrics();
    const tunnelsBefore = tunnels(await proxies.get(n2)!.metrics());
    const r = await echo(A, C.ip, TCP_PORT, 1_000_000);
    // C saw n2's gateway: the proxy of n2 delivered it, not the routed path from A.
    expect(r).toMatchObject({ outcome: 'ok', intact: true, received: 1_000_000, banner: `${C.name}-tcp ${n2.gateway}` });
    const viaService = await echo(A, TCP_ECHO_IP, TCP_PORT, 100_000);
    expect(viaService).toMatchObject({ outcome: 'ok', intact: true, banner: `${C.name}-tcp ${n2.gateway}` });
    const http = await get(A, `http://${C.ip}:${HTTP_PORT}/allowed/x`);
    expect(http).toMatchObject({ status: 200, pod: C.name, peer: n2.gateway });

    const after1 = await proxies.get(n1)!.metrics();
    const ids = { source: `${NS}/client`, destination: `${NS}/server-v1` };
    expect(metricValue(after1, 'fsmn_proxy_connections_total', ids)).toBeGreaterThanOrEqual(metricValue(m1, 'fsmn_proxy_connections_total', ids) + 2);
    expect(metricValue(after1, 'fsmn_proxy_bytes_total', { ...ids, direction: 'sent' }) - metricValue(m1, 'fsmn_proxy_bytes_total', { ...ids, direction: 'sent' })).toBeGreaterThanOrEqual(1_100_000);
    expect(tunnels(await proxies.get(n2)!.metrics())).toBeGreaterThanOrEqual(tunnelsBefore + 3);
  }, 60_000);

  test('same node: A -> B stays on n1 (no tunnel opened on n2) and arrives intact', async () => {
    const tunnelsBefore = tunnels(await proxies.get(n2)!.metrics());
    const r = await echo(A, B.ip, TCP_PORT, 1_000_000);
    expect(r).toMatchObject({ outcome: 'ok', intact: true, received: 1_000_000, banner: `${B.name}-tcp ${n1.gateway}` });
    const http = await get(A, `http://${B.ip}:${HTTP_PORT}/allowed/y`);
    expect(http).toMatchObject({ status: 200, pod: B.name, peer: n1.gateway });
    expect(tunnels(await proxies.get(n2)!.metrics())).toBe(tunnelsBefore);
  }, 60_000);

  test('a server-first protocol works: the upstream connection opens before the client sends a byte, across nodes too', async () => {
    for (const [p, via] of [[B, n1.gateway], [C, n2.gateway]] as const) {
      const r = await A.run(process.execPath, ['-e', SERVER_FIRST, p.ip, String(TCP_PORT)]);
      expect(r.stdout.trim()).toBe(`${p.name}-tcp ${via}`);
    }
  }, 30_000);

  test('strict (smi): an allowed pair passes, a denied pair gets 403 on HTTP and a closed connection on TCP, same node and across', async () => {
    expect(await get(A, `http://${B.ip}:${HTTP_PORT}/allowed/1`)).toMatchObject({ status: 200, pod: B.name });
    expect(await get(X, `http://${B.ip}:${HTTP_PORT}/allowed/1`)).toMatchObject({ status: 403 });
    expect(await get(X, `http://${C.ip}:${HTTP_PORT}/allowed/1`)).toMatchObject({ status: 403 });
    for (const target of [B.ip, C.ip]) {
      const r = await echo(X, target, TCP_PORT, 1000, 5000);
      expect(r.outcome === 'ok' && r.intact === true).toBe(false);
      expect(r.banner ?? '').toBe('');
    }
    const denied = await proxies.get(n1)!.metrics();
    expect(metricValue(denied, 'fsmn_proxy_denied_total', { source: `${NS}/intruder`, destination: `${NS}/server-v1`, reason: 'access' })).toBeGreaterThanOrEqual(2);
  }, 60_000);

  test('strict (smi): dialing a pod IP that no service of the node lists is still access controlled (egress allow), same node and across', async () => {
    // The shape that used to leak: n1 may reach no vault, so E is in none of n1's services, only a mesh pod.
    const c1 = configFor(n1, { v1: 80, v2: 20 });
    expect(c1.endpoints[E.ip]).toBeUndefined();
    expect(c1.meshPods[E.ip]).toEqual({ identity: `${NS}/vault`, local: false, tunnel: `${n2.underlayIp}:15003` });
    expect(c1.egress).toBe('allow');

    // Denied: the intruder and the client (allowed elsewhere, not to vault or safe), across nodes and on the same node.
    for (const [from, to] of [[X, E], [A, E], [X, F], [A, F]] as const) {
      expect(await get(from, `http://${to.ip}:${HTTP_PORT}/allowed/1`)).toMatchObject({ status: 403 });
      const r = await echo(from, to.ip, TCP_PORT, 1000, 5000);
      expect(r.outcome === 'ok' && r.intact === true).toBe(false);
      expect(r.banner ?? '').toBe('');
    }
    // Allowed: server-v2 (D on n2) to both, same node and across, HTTP and TCP.
    for (const [to, via] of [[E, n2.gateway], [F, n1.gateway]] as const) {
      expect(await get(D, `http://${to.ip}:${HTTP_PORT}/allowed/1`)).toMatchObject({ status: 200, pod: to.name, peer: via });
      expect(await echo(D, to.ip, TCP_PORT, 100_000)).toMatchObject({ outcome: 'ok', intact: true, banner: `${to.name}-tcp ${via}` });
    }
  }, 90_000);

  test('an HTTP route match allows one path and denies another, on this node and behind the tunnel', async () => {
    for (const p of [B, C]) {
      expect(await get(A, `http://${p.ip}:${HTTP_PORT}/allowed/ok`)).toMatchObject({ status: 200, pod: p.name });
      expect(await get(A, `http://${p.ip}:${HTTP_PORT}/secret`)).toMatchObject({ status: 403 });
    }
  }, 60_000);

  test('config reloads under load drop no connection, same node or across', async () => {
    const loads = [await startLoad(A, B.ip, TCP_PORT), await startLoad(A, C.ip, TCP_PORT)];
    try {
      for (const l of loads) await l.progress(10);
      await setWeights({ v1: 50, v2: 50 });
      await setWeights({ v1: 80, v2: 20 });
      for (const l of loads) await l.progress(10);
    } finally {
      for (const l of loads) {
        const summary = await l.stop();
        expect(summary).toMatchObject({ failed: 0 });
        expect(summary.ok).toBeGreaterThanOrEqual(20);
      }
    }
  }, 60_000);

  test('metrics per source and destination identity: requests, responses by class, bytes, latency histogram', async () => {
    // Counters start from zero at every (re)load of the program: reload (to a
    // new version, so the wait is for this very reload), then count this test's own traffic.
    await setWeights({ v1: 81, v2: 19 });
    for (const path of ['/allowed/m1', '/allowed/m2', '/secret']) await get(A, `http://${B.ip}:${HTTP_PORT}${path}`);
    await get(A, `http://${C.ip}:${HTTP_PORT}/allowed/m3`);
    const m = await proxies.get(n1)!.metrics();
    const ids = { source: `${NS}/client`, destination: `${NS}/server-v1` };
    expect(metricValue(m, 'fsmn_proxy_requests_total', ids)).toBe(4);
    expect(metricValue(m, 'fsmn_proxy_responses_total', { ...ids, class: '2xx' })).toBe(3);
    expect(metricValue(m, 'fsmn_proxy_responses_total', { ...ids, class: '4xx' })).toBe(1);
    expect(metricValue(m, 'fsmn_proxy_denied_total', { ...ids, reason: 'access' })).toBe(1);
    expect(metricValue(m, 'fsmn_proxy_request_duration_ms_count', ids)).toBe(4);
    expect(metricValue(m, 'fsmn_proxy_bytes_total', { ...ids, direction: 'received' })).toBeGreaterThan(0);
  }, 30_000);
});
