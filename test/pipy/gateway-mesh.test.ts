import type { ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CONTROLLER_NAME } from '../../src/gateway/objects.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import { LABEL_MONITORED_BY } from '../../src/policy/fsm.js';
import type { Kind } from '../../src/policy/objects.js';
import { renderProxyConfig, type ProxyConfig, type ProxyIdentityFiles } from '../../src/proxy/config.js';
import { eventually } from '../support/eventually.js';
import { issue, testCa, TRUST_DOMAIN, writeIdentity, type TestCa } from '../support/identity-certs.js';
import { uniqueTestPrefix } from '../support/names.js';
import { findPipy, metricValue, pipySkipReason, startNodeProxy, writeCodebase, writeConfig, type NodeProxy } from '../support/pipy.js';
import { waitForOutput } from '../support/traffic.js';

/**
 * From the gateway into the mesh across nodes: the Gateway is served by n1's
 * proxy, its backends run on n2. The request must travel n1 -> n2 in a mutual
 * TLS tunnel presenting the Gateway's own identity (edge/edge-gw), and n2's
 * proxy must judge it by its TrafficTargets (smi): v3 is allowed, v4 is not.
 * The client is outside the mesh (the underlay namespace).
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

const NS = 'mesh';
const EDGE = 'edge';
const G = 'gateway.networking.k8s.io/v1';
const PORT = 18080;
const HOUR = 3_600_000;
const GW_ID = `${EDGE}/edge-gw`;

// A path with "/hang" is never answered.
const ECHO = `
const http = require('node:http');
const [name, port] = process.argv.slice(1);
http.createServer((req, res) => { if (req.url.includes('/hang')) return; res.end(JSON.stringify({ pod: name, peer: req.socket.remoteAddress }) + '\\n'); })
  .listen(Number(port), '0.0.0.0', () => process.stdout.write('listening\\n'));
`;

type Obj = { apiVersion: string; kind: string; metadata: Record<string, unknown>; [k: string]: unknown };

maybe('Gateway into the mesh: the gateway identity over mutual TLS, judged by TrafficTargets', () => {
  const pipy = findPipy() ?? '';
  let work = '';
  let topo: Topology;
  let n1: TopoNode, n2: TopoNode;
  let v3: TopoPod, v4: TopoPod;
  let root: TestCa;
  const proxies = new Map<TopoNode, NodeProxy>();
  const ids = new Map<TopoNode, Record<string, ProxyIdentityFiles>>();
  const servers: ChildProcess[] = [];

  function objects(): Obj[] {
    const pod = (p: TopoPod): Obj => ({
      apiVersion: 'v1',
      kind: 'Pod',
      metadata: { name: p.name, namespace: NS, uid: `uid-${p.name}`, labels: { app: p.name } },
      spec: { nodeName: p.node.name, serviceAccountName: p.name, containers: [{ ports: [{ name: 'http', containerPort: 8080 }] }] },
      status: { phase: 'Running', podIP: p.ip },
    });
    const service = (p: TopoPod, ip: string): Obj => ({ apiVersion: 'v1', kind: 'Service', metadata: { name: p.name, namespace: NS }, spec: { clusterIP: ip, selector: { app: p.name }, ports: [{ name: 'http', port: 80, targetPort: 'http' }] } });
    const node = (n: TopoNode): Obj => ({ apiVersion: 'v1', kind: 'Node', metadata: { name: n.name }, status: { addresses: [{ type: 'InternalIP', address: n.underlayIp }] } });
    return [
      { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'fsm-mesh-config', namespace: 'fsm-system' }, data: { trafficPolicy: 'smi' } },
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS, labels: { [LABEL_MONITORED_BY]: 'fsm' } } },
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: EDGE } },
      node(n1),
      node(n2),
      pod(v3),
      pod(v4),
      service(v3, '10.96.0.13'),
      service(v4, '10.96.0.14'),
      {
        apiVersion: 'access.smi-spec.io/v1alpha3',
        kind: 'TrafficTarget',
        metadata: { name: 'gw-to-v3', namespace: NS },
        spec: { destination: { kind: 'ServiceAccount', name: 'v3', namespace: NS }, sources: [{ kind: 'ServiceAccount', name: 'edge-gw', namespace: EDGE }], rules: [{ kind: 'TCPRoute', name: 'all' }] },
      },
      { apiVersion: 'specs.smi-spec.io/v1alpha4', kind: 'TCPRoute', metadata: { name: 'all', namespace: NS }, spec: {} },
      { apiVersion: G, kind: 'GatewayClass', metadata: { name: 'fsm' }, spec: { controllerName: CONTROLLER_NAME } },
      {
        apiVersion: G,
        kind: 'Gateway',
        metadata: { name: 'edge-gw', namespace: EDGE, annotations: { 'gateway.fsm-node.io/node-selector': 'kubernetes.io/hostname=n1' } },
        spec: { gatewayClassName: 'fsm', listeners: [{ name: 'http', port: PORT, protocol: 'HTTP', allowedRoutes: { namespaces: { from: 'All' } } }] },
      },
      {
        apiVersion: G,
        kind: 'HTTPRoute',
        metadata: { name: 'r', namespace: NS },
        spec: {
          parentRefs: [{ name: 'edge-gw', namespace: EDGE }],
          rules: [
            { matches: [{ path: { type: 'PathPrefix', value: '/v3' } }], backendRefs: [{ name: 'v3', port: 80 }] },
            { matches: [{ path: { type: 'PathPrefix', value: '/bounded' } }], timeouts: { request: '1s' }, backendRefs: [{ name: 'v3', port: 80 }] },
            { matches: [{ path: { type: 'PathPrefix', value: '/v4' } }], backendRefs: [{ name: 'v4', port: 80 }] },
          ],
        },
      },
    ];
  }

  let compiler: PolicyCompiler;
  function compile(): void {
    compiler = new PolicyCompiler();
    for (const o of objects()) {
      // The node selector reads the Node's labels: give n1 its hostname label.
      const obj = o.kind === 'Node' ? { ...o, metadata: { name: o.metadata.name, labels: { 'kubernetes.io/hostname': String(o.metadata.name) } } } : o;
      if (!compiler.upsert(obj.kind as Kind, obj)) throw new Error(`${o.kind} rejected: ${JSON.stringify(compiler.reporter.active())}`);
    }
    compiler.compile();
  }

  const configFor = (node: TopoNode): ProxyConfig => {
    const cfg = renderProxyConfig(compiler.get(node.name)!.policy, { outboundPort: 15001, inboundPort: 15003, trust: { trustDomain: TRUST_DOMAIN, bundle: [root.certPem] }, identities: ids.get(node) ?? {} });
    return { ...cfg, version: createHash('sha256').update(JSON.stringify(cfg)).digest('hex').slice(0, 16) };
  };

  async function deliver(node: TopoNode): Promise<void> {
    const cfg = configFor(node);
    writeConfig(join(work, node.name), cfg);
    proxies.get(node)!.reload();
    expect(await eventually(async () => metricValue(await proxies.get(node)!.metrics(), 'fsmn_proxy_config', { version: cfg.version }), (v) => v === 1, 10_000)).toBe(1);
  }

  async function get(path: string): Promise<{ status: number; body: string }> {
    const r = await topo.underlay.run('curl', ['-sS', '-m', '5', '-o', '-', '-w', '\n%{http_code}', `http://${n1.underlayIp}:${PORT}${path}`]);
    const lines = r.stdout.trimEnd().split('\n');
    return { status: Number(lines.pop()), body: lines.join('\n') };
  }

  beforeAll(async () => {
    const prefix = uniqueTestPrefix();
    work = mkdtempSync(join(tmpdir(), `${prefix}-gwmesh-`));
    topo = await Topology.create({ prefix, nodes: 2, podsPerNode: 0 });
    [n1, n2] = topo.nodes as [TopoNode, TopoNode];
    v3 = await topo.addPod(n2, 'v3');
    v4 = await topo.addPod(n2, 'v4');
    for (const p of [v3, v4]) {
      const s = p.exec(process.execPath, ['-e', ECHO, p.name, '8080'], { stdio: ['ignore', 'pipe', 'pipe'] });
      servers.push(s);
      await waitForOutput(s, 'listening');
    }
    root = await testCa('fsmt-gw-root');
    // What each agent's IdentityManager would hold: n1 the Gateway's identity, n2 its pods'.
    ids.set(n1, { [GW_ID]: writeIdentity(join(work, 'ids-n1'), await issue(root, GW_ID, 24 * HOUR)) });
    ids.set(n2, Object.fromEntries(await Promise.all([v3, v4].map(async (p) => [`${NS}/${p.name}`, writeIdentity(join(work, 'ids-n2'), await issue(root, `${NS}/${p.name}`, 24 * HOUR))] as const))));
    compile();
    for (const node of [n1, n2]) {
      const cfg = configFor(node);
      proxies.set(node, await startNodeProxy(node, pipy, writeCodebase(join(work, node.name), cfg), cfg));
    }
  }, 180_000);

  afterAll(async () => {
    for (const p of proxies.values()) await p.stop().catch(() => undefined);
    for (const s of servers) s.kill('SIGTERM');
    await topo?.destroy();
    if (work) rmSync(work, { recursive: true, force: true });
  }, 60_000);

  test('the policy: n1 serves the Gateway and holds its identity; n2 does not serve it', () => {
    expect(configFor(n1).gateways?.map((g) => [g.gateway, g.identity])).toEqual([[`${EDGE}/edge-gw`, GW_ID]]);
    expect(Object.keys(configFor(n1).tunnelTLS!.identities)).toEqual([GW_ID]);
    expect(configFor(n2).gateways).toBeUndefined();
  });

  test('allowed backend on another node: answered through an mTLS tunnel whose proven source is the Gateway', async () => {
    const accepted = { source: GW_ID, destination: `${NS}/v3`, result: 'accepted', transport: 'mtls' };
    const before = metricValue(await proxies.get(n2)!.metrics(), 'fsmn_proxy_tunnels_total', accepted);
    const r = await get('/v3/hello');
    expect(r.status).toBe(200);
    expect(JSON.parse(r.body)).toMatchObject({ pod: 'v3' });
    expect(metricValue(await proxies.get(n2)!.metrics(), 'fsmn_proxy_tunnels_total', accepted)).toBeGreaterThan(before);
  }, 30_000);

  test('denied backend: n2 refuses the Gateway identity with 403 (no TrafficTarget to v4)', async () => {
    const r = await get('/v4/hello');
    expect(r.status).toBe(403);
    expect(r.body).not.toContain('"pod":"v4"');
  }, 30_000);

  test('timeouts hold over the tunnel: a hung pod on n2 gets the client a 504 from n1, and the tunnel keeps serving', async () => {
    const t0 = Date.now();
    const hung = await get('/bounded/hang');
    expect(hung.status).toBe(504);
    expect(Date.now() - t0).toBeLessThan(4000); // the 1 s bound, not curl's own 5 s
    expect(metricValue(await proxies.get(n1)!.metrics(), 'fsmn_proxy_gateway_timeouts_total', { route: `${NS}/r`, timeout: 'request' })).toBe(1);
    expect((await get('/bounded/ok')).status).toBe(200);
    expect((await get('/v3')).status).toBe(200);
  }, 60_000);

  test('attack: without its certificate the Gateway fails closed (503), never plaintext', async () => {
    const held = ids.get(n1)!;
    ids.set(n1, {});
    try {
      await deliver(n1);
      const r = await get('/v3/hello');
      expect(r.status).toBe(503);
      expect(r.body).toMatch(/identity/);
      expect(metricValue(await proxies.get(n2)!.metrics(), 'fsmn_proxy_tunnels_total', { transport: 'plaintext' })).toBe(0);
    } finally {
      ids.set(n1, held);
      await deliver(n1);
    }
    expect((await get('/v3/hello')).status).toBe(200);
  }, 60_000);
});
