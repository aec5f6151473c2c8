import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { noExclusions, type Dataplane, type DesiredState } from '../../src/dataplane/types.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import { LABEL_MONITORED_BY } from '../../src/policy/fsm.js';
import type { Kind } from '../../src/policy/objects.js';
import { renderProxyConfig, type ProxyConfig } from '../../src/proxy/config.js';
import { dataplaneModes, nodeSpec } from '../support/dataplanes.js';
import { eventually } from '../support/eventually.js';
import { uniqueTestPrefix } from '../support/names.js';
import { findPipy, metricValue, pipySkipReason, startNodeProxy, writeCodebase, writeConfig, type NodeProxy } from '../support/pipy.js';
import { echo, startEchoServer, startLabEchoServer } from '../support/traffic.js';

/**
 * SMI TrafficSplits of every version, from Kubernetes objects through the
 * real compiler and config renderer into the real Pipy program, with real
 * HTTP from an intercepted pod (iptables interception, one node):
 *
 *   A (client)   R (the root service `echo`, track=root)
 *   V1 (echo-v1, track=v1)   V2 (echo-v2, track=v2)
 *
 * Every service has HTTP on 8080 and TCP on 9000. The root service selects
 * only R, so where a request went says which rule sent it: R = the root
 * service, V1/V2 = a split's backends. HTTPRouteGroup `canary` matches the
 * header `x-canary: yes` or the path /v2 and below.
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

const NS = 'mesh';
const HTTP_PORT = 8080;
const TCP_PORT = 9000;
const ROOT_IP = '10.96.0.10';

// N GETs with the given headers, 4 at a time, each on a new connection; prints
// one JSON line: answers per pod, statuses, failures.
const HTTP_LOAD = `
const http = require('node:http');
const [url, n, headers] = process.argv.slice(1);
const out = { pods: {}, statuses: {}, failures: 0, errors: [] };
let left = Number(n);
const one = () => new Promise((resolve) => {
  const req = http.get(url, { agent: false, timeout: 5000, headers: JSON.parse(headers) }, (res) => {
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
Promise.all(Array.from({ length: 4 }, worker)).then(() => console.log(JSON.stringify(out)));
`;

interface LoadResult {
  pods: Record<string, number>;
  statuses: Record<string, number>;
  failures: number;
  errors: string[];
}

type Obj = { apiVersion: string; kind: string; metadata: Record<string, unknown>; spec?: unknown; [k: string]: unknown };

const CANARY_GROUP: Obj = {
  apiVersion: 'specs.smi-spec.io/v1alpha4',
  kind: 'HTTPRouteGroup',
  metadata: { name: 'canary', namespace: NS },
  spec: {
    matches: [
      { name: 'tester', headers: { 'x-canary': 'yes' } },
      { name: 'v2-path', pathRegex: '/v2(/.*)?', methods: ['GET'] },
    ],
  },
};

const trafficSplit = (apiVersion: string, name: string, backends: { service: string; weight: unknown }[], matches?: unknown[]): Obj => ({
  apiVersion: `split.smi-spec.io/${apiVersion}`,
  kind: 'TrafficSplit',
  metadata: { name, namespace: NS },
  spec: { service: 'echo', backends, ...(matches ? { matches } : {}) },
});

const v4Matches = [{ apiGroup: 'specs.smi-spec.io', kind: 'HTTPRouteGroup', name: 'canary' }];

maybe('TrafficSplit versions in the Pipy node proxy (iptables interception)', () => {
  const pipy = findPipy() ?? '';
  let work = '';
  let topo: Topology;
  let node: TopoNode;
  let A: TopoPod, R: TopoPod, V1: TopoPod, V2: TopoPod;
  let proxy: NodeProxy;
  let dp: Dataplane | undefined;
  const servers: ChildProcess[] = [];

  /** The cluster's objects (without splits): namespace, node, pods, services, the route group. */
  function baseObjects(): Obj[] {
    const pod = (p: TopoPod, labels: Record<string, string>): Obj => ({
      apiVersion: 'v1',
      kind: 'Pod',
      metadata: { name: p.name, namespace: NS, uid: `uid-${p.name}`, labels },
      spec: { nodeName: node.name, serviceAccountName: p.name, containers: [{ ports: [{ name: 'http', containerPort: HTTP_PORT }, { name: 'tcp-echo', containerPort: TCP_PORT }] }] },
      status: { phase: 'Running', podIP: p.ip },
    });
    const service = (name: string, ip: string, track: string): Obj => ({
      apiVersion: 'v1',
      kind: 'Service',
      metadata: { name, namespace: NS },
      spec: {
        clusterIP: ip,
        selector: { app: 'echo', track },
        ports: [
          { name: 'http', port: HTTP_PORT, targetPort: 'http', appProtocol: 'http' },
          { name: 'tcp-echo', port: TCP_PORT, targetPort: 'tcp-echo' },
        ],
      },
    });
    return [
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS, labels: { [LABEL_MONITORED_BY]: 'fsm' } } },
      { apiVersion: 'v1', kind: 'Node', metadata: { name: node.name }, status: { addresses: [{ type: 'InternalIP', address: node.underlayIp }] } },
      pod(A, { app: 'client' }),
      pod(R, { app: 'echo', track: 'root' }),
      pod(V1, { app: 'echo', track: 'v1' }),
      pod(V2, { app: 'echo', track: 'v2' }),
      service('echo', ROOT_IP, 'root'),
      service('echo-v1', '10.96.0.11', 'v1'),
      service('echo-v2', '10.96.0.12', 'v2'),
      CANARY_GROUP,
    ];
  }

  /** The node's proxy config, compiled from the base objects plus `splits` by the real compiler. */
  function configWith(splits: Obj[], extra: Obj[] = []): ProxyConfig {
    const c = new PolicyCompiler();
    for (const o of [...baseObjects(), ...extra, ...splits]) {
      if (!c.upsert(o.kind as Kind, o)) throw new Error(`${o.kind} ${String(o.metadata.name)} rejected: ${JSON.stringify(c.reporter.active())}`);
    }
    c.compile();
    if (c.reporter.active().length > 0) throw new Error(`compile issues: ${JSON.stringify(c.reporter.active())}`);
    const policy = c.get(node.name)?.policy;
    if (!policy) throw new Error(`no policy for ${node.name}`);
    expect(policy.splits).toHaveLength(splits.length);
    return renderProxyConfig(policy, { outboundPort: 15001, inboundPort: 15003 });
  }

  /** Load the config of `splits` into the running proxy and wait until it runs it. */
  async function useSplits(splits: Obj[], extra: Obj[] = []): Promise<void> {
    const cfg = configWith(splits, extra);
    writeConfig(work, cfg);
    proxy.reload();
    const seen = await eventually(async () => metricValue(await proxy.metrics(), 'fsmn_proxy_config', { version: cfg.version }), (v) => v === 1, 10_000);
    expect(seen).toBe(1);
  }

  async function send(path: string, n: number, headers: Record<string, string> = {}): Promise<LoadResult> {
    const r = await A.run(process.execPath, ['-e', HTTP_LOAD, `http://${ROOT_IP}:${HTTP_PORT}${path}`, String(n), JSON.stringify(headers)]);
    return JSON.parse(r.stdout.trim().split('\n').pop() ?? '') as LoadResult;
  }

  /** `n` requests that must all be answered 200. */
  async function load(path: string, n: number, headers: Record<string, string> = {}): Promise<LoadResult> {
    const out = await send(path, n, headers);
    expect({ path, headers, failures: out.failures, errors: out.errors, statuses: out.statuses }).toEqual({ path, headers, failures: 0, errors: [], statuses: { '200': n } });
    return out;
  }

  /** Where `n` requests went, by pod name, zeros left out. */
  const where = (r: LoadResult): Record<string, number> => r.pods;

  beforeAll(async () => {
    const prefix = uniqueTestPrefix();
    work = mkdtempSync(join(tmpdir(), `${prefix}-splits-`));
    topo = await Topology.create({ prefix, nodes: 1, podsPerNode: 0 });
    [node] = topo.nodes as [TopoNode];
    A = await topo.addPod(node, 'a');
    R = await topo.addPod(node, 'r');
    V1 = await topo.addPod(node, 'v1');
    V2 = await topo.addPod(node, 'v2');
    for (const p of [R, V1, V2]) {
      servers.push(await startLabEchoServer(p, p.name, HTTP_PORT));
      servers.push((await startEchoServer(p, `${p.name}-tcp`, TCP_PORT)).child);
    }
    const cfg = configWith([]);
    proxy = await startNodeProxy(node, pipy, writeCodebase(work, cfg), cfg);
    dp = dataplaneModes.iptables!.create(nodeSpec(node));
    const desired: DesiredState = {
      proxy: { address: node.gateway, outboundPort: 15001, inboundPort: 15003, cgroupPath: node.proxyCgroup },
      nodeAddresses: [node.gateway, node.underlayIp],
      proxySources: [node.gateway, node.underlayIp],
      mesh: noExclusions(),
      pods: [A, R, V1, V2].map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive' as const, exclusions: noExclusions() })),
    };
    await dp.apply(desired);
  }, 180_000);

  afterAll(async () => {
    await dp?.cleanup().catch(() => undefined);
    await proxy?.stop().catch(() => undefined);
    for (const s of servers) s.kill('SIGTERM');
    await topo?.destroy();
    if (work) rmSync(work, { recursive: true, force: true });
  }, 60_000);

  test('no split: every request goes to the root service', async () => {
    await useSplits([]);
    expect(where(await load('/', 20))).toEqual({ [R.name]: 20 });
  }, 60_000);

  test('v1alpha4 with matches, 100% to v2: matching requests (header or path) go to v2, every other request and TCP to the root service', async () => {
    await useSplits([trafficSplit('v1alpha4', 'canary', [{ service: 'echo-v1', weight: 0 }, { service: 'echo-v2', weight: 100 }], v4Matches)]);
    expect(where(await load('/', 20, { 'x-canary': 'yes' }))).toEqual({ [V2.name]: 20 });
    expect(where(await load('/v2/items?x=1', 20))).toEqual({ [V2.name]: 20 });
    expect(where(await load('/', 20))).toEqual({ [R.name]: 20 });
    // Header values are anchored regexes: "yes!" is not "yes".
    expect(where(await load('/', 10, { 'x-canary': 'yes!' }))).toEqual({ [R.name]: 10 });
    // The path regex is anchored too: /v2x is not /v2 or below.
    expect(where(await load('/v2x', 10))).toEqual({ [R.name]: 10 });
    // TCP carries no request to match: the root service's own endpoint.
    expect(await echo(A, ROOT_IP, TCP_PORT, 10_000)).toMatchObject({ outcome: 'ok', intact: true, banner: `${R.name}-tcp ${node.gateway}` });
  }, 90_000);

  test('v1alpha4 with matches, 80/20: 200 matching requests split within 8 points; others still go to the root service', async () => {
    await useSplits([trafficSplit('v1alpha4', 'canary', [{ service: 'echo-v1', weight: 80 }, { service: 'echo-v2', weight: 20 }], v4Matches)]);
    const r = where(await load('/', 200, { 'x-canary': 'yes' }));
    expect(r[R.name]).toBeUndefined();
    expect(Math.abs((r[V1.name] ?? 0) / 200 - 0.8)).toBeLessThanOrEqual(0.08);
    expect((r[V1.name] ?? 0) + (r[V2.name] ?? 0)).toBe(200);
    expect(where(await load('/', 20))).toEqual({ [R.name]: 20 });
  }, 90_000);

  test('a split without matches next to one with matches: the matching requests take the route, all others the plain split', async () => {
    await useSplits([
      trafficSplit('v1alpha2', 'stable', [{ service: 'echo-v1', weight: 1 }]),
      trafficSplit('v1alpha4', 'canary', [{ service: 'echo-v2', weight: 1 }], v4Matches),
    ]);
    expect(where(await load('/', 20, { 'x-canary': 'yes' }))).toEqual({ [V2.name]: 20 });
    expect(where(await load('/', 20))).toEqual({ [V1.name]: 20 });
  }, 90_000);

  test('v1alpha3 (matches without apiGroup) still routes matching requests by the split', async () => {
    await useSplits([trafficSplit('v1alpha3', 'canary', [{ service: 'echo-v2', weight: 100 }], [{ kind: 'HTTPRouteGroup', name: 'canary' }])]);
    expect(where(await load('/', 20, { 'x-canary': 'yes' }))).toEqual({ [V2.name]: 20 });
    expect(where(await load('/', 20))).toEqual({ [R.name]: 20 });
  }, 90_000);

  test('attack: a header that picks the canary does not get past access control (smi): the canary backend still refuses a client it does not allow', async () => {
    // The client may reach the root and v1 identities, not v2's.
    const target = (to: TopoPod): Obj => ({
      apiVersion: 'access.smi-spec.io/v1alpha3',
      kind: 'TrafficTarget',
      metadata: { name: `to-${to.name}`, namespace: NS },
      spec: { destination: { kind: 'ServiceAccount', name: to.name, namespace: NS }, sources: [{ kind: 'ServiceAccount', name: A.name, namespace: NS }], rules: [{ kind: 'TCPRoute', name: 'all' }] },
    });
    const smi: Obj[] = [
      { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'fsm-mesh-config', namespace: 'fsm-system' }, data: { trafficPolicy: 'smi' } },
      { apiVersion: 'specs.smi-spec.io/v1alpha4', kind: 'TCPRoute', metadata: { name: 'all', namespace: NS }, spec: { matches: { ports: [HTTP_PORT, TCP_PORT] } } },
      target(R),
      target(V1),
    ];
    await useSplits([trafficSplit('v1alpha4', 'canary', [{ service: 'echo-v2', weight: 1 }], v4Matches)], smi);
    const canary = await send('/', 10, { 'x-canary': 'yes' });
    expect({ statuses: canary.statuses, pods: canary.pods }).toEqual({ statuses: { '403': 10 }, pods: {} });
    expect(where(await load('/', 10))).toEqual({ [R.name]: 10 });
    // The same split to a backend the client may reach: routed and answered.
    await useSplits([trafficSplit('v1alpha4', 'canary', [{ service: 'echo-v1', weight: 1 }], v4Matches)], smi);
    expect(where(await load('/', 10, { 'x-canary': 'yes' }))).toEqual({ [V1.name]: 10 });
  }, 90_000);

  test('v1alpha2 (whole weights) and v1alpha1 (quantity weights) split every request, HTTP and TCP', async () => {
    await useSplits([trafficSplit('v1alpha2', 'half', [{ service: 'echo-v1', weight: 50 }, { service: 'echo-v2', weight: 50 }])]);
    const half = where(await load('/', 200));
    expect(half[R.name]).toBeUndefined();
    expect(Math.abs((half[V1.name] ?? 0) / 200 - 0.5)).toBeLessThanOrEqual(0.08);

    await useSplits([trafficSplit('v1alpha1', 'quarter', [{ service: 'echo-v1', weight: '250m' }, { service: 'echo-v2', weight: '750m' }])]);
    const quarter = where(await load('/', 200));
    expect(quarter[R.name]).toBeUndefined();
    expect(Math.abs((quarter[V2.name] ?? 0) / 200 - 0.75)).toBeLessThanOrEqual(0.08);
    // A split without matches applies to TCP too (per connection).
    const banners = new Set<string>();
    for (let i = 0; i < 8; i++) banners.add((await echo(A, ROOT_IP, TCP_PORT, 1000)).banner ?? 'none');
    expect([...banners].sort()).toEqual([`${V1.name}-tcp ${node.gateway}`, `${V2.name}-tcp ${node.gateway}`].sort());
  }, 120_000);
});
