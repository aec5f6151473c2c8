import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { NodePolicySchema, type NodePolicy } from '../../src/policy/schema.js';
import { portProtocol, renderProxyConfig, type ProxyNodeFacts } from '../../src/proxy/config.js';
import { baseMesh, compiled, matchSplit, meshConfig, pod, routeGroup, service, slice, split, target, tcpRoute, type Obj } from './policy-fixtures.js';

/**
 * The proxy's configuration rendered from NodePolicies that the real compiler
 * made from Kubernetes objects. Golden files are reviewed like code:
 * FSMN_UPDATE_GOLDEN=1 rewrites them.
 */

const goldenDir = join(dirname(fileURLToPath(import.meta.url)), 'golden');
const facts = { outboundPort: 15001, inboundPort: 15003 };

function golden(name: string, actual: string): void {
  const path = join(goldenDir, name);
  if (process.env.FSMN_UPDATE_GOLDEN === '1') {
    mkdirSync(goldenDir, { recursive: true });
    writeFileSync(path, actual);
  }
  if (!existsSync(path)) throw new Error(`golden file ${name} is missing; generate it with FSMN_UPDATE_GOLDEN=1 and review the diff`);
  expect(actual).toBe(readFileSync(path, 'utf8'));
}

/** smi mesh: api (node-b) split 80/20 over api-v1/api-v2; web may call db over TCP and api on /api/* GETs. */
function smiMesh(): Obj[] {
  return [
    ...baseMesh(),
    meshConfig({ trafficPolicy: 'smi', egress: 'deny' }),
    pod('api-v1-1', { ip: '10.0.1.2', node: 'node-b', sa: 'api', labels: { app: 'api', version: 'v1' } }),
    pod('api-v2-1', { ip: '10.0.0.3', node: 'node-a', sa: 'api', labels: { app: 'api', version: 'v2' } }),
    service('api-v1', { clusterIP: '172.16.0.31', selector: { app: 'api', version: 'v1' } }),
    service('api-v2', { clusterIP: '172.16.0.32', selector: { app: 'api', version: 'v2' } }),
    service('db', { clusterIP: '172.16.0.2', ports: [{ name: 'tcp-pg', port: 5432, targetPort: 5432 }] }),
    split('api-split', 'api', [{ service: 'api-v1', weight: 80 }, { service: 'api-v2', weight: 20 }]),
    routeGroup('routes', [
      { name: 'api', pathRegex: '/api/.*', methods: ['GET'] },
      { name: 'admin', pathRegex: '/admin', methods: ['*'], headers: { 'X-Admin': 'yes|true' } },
    ]),
    tcpRoute('pg', [5432]),
    target('web-to-api', 'api', ['web'], [{ kind: 'HTTPRouteGroup', name: 'routes', matches: ['api'] }]),
    target('web-to-db', 'db', ['web'], [{ kind: 'TCPRoute', name: 'pg' }]),
    target('api-to-web', 'web', ['api'], [{ kind: 'HTTPRouteGroup', name: 'routes' }, { kind: 'TCPRoute', name: 'pg' }]),
  ];
}

function policyOf(objs: Obj[], node: string): NodePolicy {
  const p = compiled(objs).get(node)?.policy;
  if (!p) throw new Error(`no policy for ${node}`);
  return NodePolicySchema.parse(p);
}

describe('proxy config rendering (golden)', () => {
  test('smi mesh, node-a: split backends, tunnels to node-b, access rules of the local pods', () => {
    golden('proxy-config-smi-node-a.json', `${JSON.stringify(renderProxyConfig(policyOf(smiMesh(), 'node-a'), facts), null, 2)}\n`);
  });

  test('smi mesh, node-b: db is in no service it may reach, so it is a mesh pod behind node-a', () => {
    golden('proxy-config-smi-node-b.json', `${JSON.stringify(renderProxyConfig(policyOf(smiMesh(), 'node-b'), facts), null, 2)}\n`);
  });

  test('smi mesh with a canary split on HTTP matches (v1alpha4), node-a: the root service has a route', () => {
    const objs = [...smiMesh(), routeGroup('canary', [{ name: 'tester', headers: { 'X-Canary': 'yes' } }, { name: 'v2', pathRegex: '/v2(/.*)?', methods: ['GET', 'head'] }]), matchSplit('api-canary', 'api', [{ service: 'api-v1', weight: 10 }, { service: 'api-v2', weight: 90 }], ['canary'])];
    golden('proxy-config-smi-routes-node-a.json', `${JSON.stringify(renderProxyConfig(policyOf(objs, 'node-a'), facts), null, 2)}\n`);
  });

  test('permissive mesh, node-b: no access rules, every service, egress allowed', () => {
    golden('proxy-config-permissive-node-b.json', `${JSON.stringify(renderProxyConfig(policyOf(baseMesh(), 'node-b'), facts), null, 2)}\n`);
  });

  test('smi mesh, node-a, mutual TLS tunnels: the trust bundle inline, each local identity by its files', () => {
    golden('proxy-config-smi-node-a-mtls.json', `${JSON.stringify(renderProxyConfig(policyOf(smiMesh(), 'node-a'), mtlsFacts()), null, 2)}\n`);
  });
});

// Two roots (a rotation in progress); the renderer never parses them, the proxy does.
const ROOT_OLD = '-----BEGIN CERTIFICATE-----\nb2xkIHJvb3Q=\n-----END CERTIFICATE-----\n';
const ROOT_NEW = '-----BEGIN CERTIFICATE-----\nbmV3IHJvb3Q=\n-----END CERTIFICATE-----';

function mtlsFacts(over: Partial<ProxyNodeFacts> = {}): ProxyNodeFacts {
  const files = (id: string, state = 'valid') => ({
    certPath: `/var/lib/fsm-node/identities/${id}/cert.pem`,
    keyPath: `/var/lib/fsm-node/identities/${id}/key.pem`,
    notAfter: new Date(Date.UTC(2026, 11, 5, 7, 0, 0)),
    state,
  });
  return { ...facts, trust: { trustDomain: 'cluster.local', bundle: [ROOT_OLD, ROOT_NEW] }, identities: { 'app/web': files('app/web'), 'app/api': files('app/api') }, ...over };
}

describe('proxy config rendering: mutual TLS tunnels', () => {
  const p = policyOf(smiMesh(), 'node-a');
  const localIds = [...new Set(p.pods.map((x) => `${x.namespace}/${x.serviceAccount}`))].sort();

  test('no trust bundle in the facts: plaintext tunnels (tunnelTLS null)', () => {
    expect(renderProxyConfig(p, facts).tunnelTLS).toBeNull();
  });

  test('every local identity is listed; one the agent has no certificate for is missing (fails closed in the proxy)', () => {
    const t = renderProxyConfig(p, mtlsFacts({ identities: { 'app/web': mtlsFacts().identities!['app/web']! } })).tunnelTLS!;
    expect(Object.keys(t.identities)).toEqual(localIds);
    expect(t.identities['app/api']).toEqual({ certFile: '', keyFile: '', notAfter: '1970-01-01T00:00:00.000Z', state: 'missing' });
    expect(t.identities['app/web']).toMatchObject({ state: 'valid', notAfter: '2026-12-05T07:00:00.000Z' });
  });

  test('an expired identity stays expired, a pending one (no certificate yet) is missing; a valid one is used', () => {
    const f = mtlsFacts();
    const web = f.identities!['app/web']!;
    const t = renderProxyConfig(p, { ...f, identities: { ...f.identities, 'app/web': { ...web, state: 'expired' }, 'app/api': { certPath: web.certPath, keyPath: web.keyPath, state: 'pending' } } }).tunnelTLS!;
    expect(t.identities['app/web']?.state).toBe('expired');
    expect(t.identities['app/api']?.state).toBe('missing');
    expect(renderProxyConfig(p, f).tunnelTLS!.identities['app/api']?.state).toBe('valid');
  });

  test('the bundle keeps every root, one PEM after the other', () => {
    const t = renderProxyConfig(p, mtlsFacts()).tunnelTLS!;
    expect(t.trustBundle.match(/BEGIN CERTIFICATE/g)).toHaveLength(2);
    expect(t.trustBundle.endsWith('-----END CERTIFICATE-----\n')).toBe(true);
  });

  test('no private key and no certificate of an identity ever enters the config: files only', () => {
    const text = JSON.stringify(renderProxyConfig(p, mtlsFacts()));
    expect(text).not.toMatch(/PRIVATE KEY/);
    expect(text.match(/BEGIN CERTIFICATE/g)).toHaveLength(2); // the two roots
  });

  test('a renewal (new notAfter) changes the config, so the agent reloads the proxy', () => {
    const f = mtlsFacts();
    const renewed = { ...f, identities: { ...f.identities, 'app/web': { ...f.identities!['app/web']!, notAfter: Date.UTC(2026, 11, 6) } } };
    expect(JSON.stringify(renderProxyConfig(p, renewed))).not.toBe(JSON.stringify(renderProxyConfig(p, f)));
  });

  test('a trust bundle without a root fails closed: every tunnel refused, never plaintext (a TLS listener with no trust accepts anyone)', () => {
    for (const bundle of [[], ['not a certificate']]) {
      const t = renderProxyConfig(p, mtlsFacts({ trust: { trustDomain: 'cluster.local', bundle } })).tunnelTLS;
      expect(t).toMatchObject({ trustBundle: '', refuse: 'no-trust-bundle' });
    }
    expect(renderProxyConfig(p, mtlsFacts()).tunnelTLS?.refuse).toBeNull();
  });

  test('a bad notAfter or connection age is refused with the field named', () => {
    const f = mtlsFacts();
    expect(() => renderProxyConfig(p, { ...f, identities: { 'app/web': { ...f.identities!['app/web']!, notAfter: 'soon' } } })).toThrow(/identities\[app\/web\]\.notAfter/);
    expect(() => renderProxyConfig(p, mtlsFacts({ tunnelMaxAgeSeconds: 0 }))).toThrow(/tunnelMaxAgeSeconds/);
  });
});

describe('proxy config rendering (rules)', () => {
  const cfg = renderProxyConfig(policyOf(smiMesh(), 'node-a'), facts);

  test('a split root service gets the weighted backends with their own endpoints on the same port', () => {
    expect(cfg.services['172.16.0.3:80']).toEqual({
      service: 'app/api',
      protocol: 'http',
      backends: [
        { service: 'app/api-v1', weight: 80, endpoints: ['10.0.1.2:8080'] },
        { service: 'app/api-v2', weight: 20, endpoints: ['10.0.0.3:8080'] },
      ],
    });
  });

  test('endpoints: local pods are served here, remote ones tunnel to their node proxy', () => {
    expect(cfg.endpoints['10.0.0.3']).toMatchObject({ identity: 'app/api', local: true, tunnel: null, ports: { '8080': 'http' } });
    expect(cfg.endpoints['10.0.1.2']).toMatchObject({ identity: 'app/api', local: false, tunnel: '192.168.1.11:15003' });
  });

  test('access: TCPRoute ports and HTTPRouteGroup matches per TrafficTarget, keyed by destination identity', () => {
    expect(cfg.access['app/api']).toEqual([
      { target: 'app/web-to-api', sources: ['app/web'], port: null, tcpAllPorts: false, tcpPorts: [], http: [{ pathRegex: '/api/.*', methods: ['GET'], headers: {} }], mqtt: [] },
    ]);
    expect(cfg.access['app/db']?.[0]).toMatchObject({ tcpPorts: [5432], http: [] });
    expect(cfg.access['app/web']?.[0]?.http[1]).toEqual({ pathRegex: '/admin', methods: ['*'], headers: { 'x-admin': 'yes|true' } });
  });

  test('mesh pods no service of the policy lists: known by address, remote ones behind their node proxy', () => {
    // No pod of node-b may reach db: its service is not in node-b's policy, its pod still is a mesh pod.
    const b = renderProxyConfig(policyOf(smiMesh(), 'node-b'), facts);
    expect(Object.values(b.services).map((s) => s.service)).not.toContain('app/db');
    expect(b.endpoints['10.0.0.2']).toBeUndefined();
    expect(b.meshPods['10.0.0.2']).toEqual({ identity: 'app/db', local: false, tunnel: '192.168.1.10:15003' });
    // Pods already known as endpoints (every local pod, every listed endpoint) are not repeated.
    for (const ip of Object.keys(b.meshPods)) expect(b.endpoints[ip]).toBeUndefined();
    expect(Object.keys(cfg.meshPods)).toEqual([]);
  });

  test('only node proxies and this node may open tunnels', () => {
    expect(cfg.tunnelPeers).toEqual(['192.168.1.10', '192.168.1.11']);
  });

  test('a split with HTTP matches is a route of the root service: its matches and its own backends; other traffic keeps the split without matches', () => {
    const objs = [...smiMesh(), routeGroup('canary', [{ name: 'tester', headers: { 'X-Canary': 'yes' } }]), matchSplit('api-canary', 'api', [{ service: 'api-v1', weight: 0 }, { service: 'api-v2', weight: 100 }], ['canary'])];
    const svc = renderProxyConfig(policyOf(objs, 'node-a'), facts).services['172.16.0.3:80'];
    expect(svc).toEqual({
      service: 'app/api',
      protocol: 'http',
      backends: [
        { service: 'app/api-v1', weight: 80, endpoints: ['10.0.1.2:8080'] },
        { service: 'app/api-v2', weight: 20, endpoints: ['10.0.0.3:8080'] },
      ],
      routes: [{ split: 'app/api-canary', matches: [{ pathRegex: null, methods: [], headers: { 'x-canary': 'yes' } }], backends: [{ service: 'app/api-v2', weight: 100, endpoints: ['10.0.0.3:8080'] }] }],
    });
  });

  test('without a split without matches, requests no route matches go to the root service itself', () => {
    const objs = [...smiMesh().filter((o) => o.kind !== 'TrafficSplit'), matchSplit('api-canary', 'api', [{ service: 'api-v2', weight: 1 }], ['routes'])];
    const svc = renderProxyConfig(policyOf(objs, 'node-a'), facts).services['172.16.0.3:80'];
    expect(svc?.backends.map((b) => b.service)).toEqual(['app/api']);
    expect(svc?.routes?.map((r) => [r.split, r.matches.length, r.backends.map((b) => b.service)])).toEqual([['app/api-canary', 2, ['app/api-v2']]]);
  });

  test('routes are rendered on HTTP ports only: a TCP port of the root service has none', () => {
    const objs = [
      ...smiMesh().filter((o) => !(o.kind === 'Service' && ['api', 'api-v2'].includes(String(o.metadata.name)))),
      service('api', { clusterIP: '172.16.0.3', ports: [{ name: 'http', port: 80, targetPort: 'http' }, { name: 'tcp-raw', port: 9000, targetPort: 9000 }] }),
      service('api-v2', { clusterIP: '172.16.0.32', selector: { app: 'api', version: 'v2' }, ports: [{ name: 'http', port: 80, targetPort: 'http' }, { name: 'tcp-raw', port: 9000, targetPort: 9000 }] }),
      matchSplit('api-canary', 'api', [{ service: 'api-v2', weight: 1 }], ['routes']),
    ];
    const cfg2 = renderProxyConfig(policyOf(objs, 'node-a'), facts);
    expect(cfg2.services['172.16.0.3:80']?.routes).toHaveLength(1);
    expect(cfg2.services['172.16.0.3:9000']).toMatchObject({ protocol: 'tcp' });
    expect(cfg2.services['172.16.0.3:9000']?.routes).toBeUndefined();
  });

  test('a backend with weight 0 or a missing service is left out', () => {
    const objs = smiMesh().map((o) => (o.kind === 'TrafficSplit' ? split('api-split', 'api', [{ service: 'api-v1', weight: 0 }, { service: 'api-v2', weight: 20 }]) : o));
    expect(renderProxyConfig(policyOf(objs, 'node-a'), facts).services['172.16.0.3:80']?.backends.map((b) => b.service)).toEqual(['app/api-v2']);
  });

  test('the rendering is deterministic and does not mutate the policy', () => {
    const p = policyOf(smiMesh(), 'node-a');
    const before = JSON.stringify(p);
    expect(JSON.stringify(renderProxyConfig(p, facts))).toBe(JSON.stringify(renderProxyConfig(p, facts)));
    expect(JSON.stringify(p)).toBe(before);
  });
});

describe('port protocol (FSM rules)', () => {
  test.each([
    [{ name: 'web', appProtocol: 'http' }, 'http'],
    [{ name: 'http-web', appProtocol: null }, 'http'],
    [{ name: 'http', appProtocol: null }, 'http'],
    [{ name: '', appProtocol: null }, 'http'],
    [{ name: 'tcp-db', appProtocol: null }, 'tcp'],
    [{ name: 'http', appProtocol: 'tcp' }, 'tcp'],
    [{ name: 'grpc', appProtocol: null }, 'tcp'],
    [{ name: 'x', appProtocol: 'HTTP' }, 'http'],
  ] as const)('%j -> %s', (port, want) => {
    expect(portProtocol(port)).toBe(want);
  });
});

// The same slice helper the compiler tests use, kept referenced for endpoint-slice based services.
void slice;
