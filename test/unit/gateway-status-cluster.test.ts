import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { clusterAccess } from '../../src/controller/cluster.js';
import type { KubernetesSource } from '../../src/controller/sources/kubernetes.js';
import { CONTROLLER_NAME } from '../../src/gateway/objects.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import { TestApiServer, type Obj as ApiObj } from '../support/k8s-api-server.js';
import { baseMesh, namespace } from './policy-fixtures.js';

/**
 * Gateway API status in cluster mode, end to end on the controller side: the
 * production wiring (clusterAccess().startSource: the real client-node
 * informers, the compiler, GatewayStatusWriter with client-node's
 * CustomObjectsApi) against the test API server, which applies JSON merge
 * patches to status subresources as a real API server does. Each bad route
 * or reference is reported in its own object's status while the rest is
 * compiled and served.
 */

const G = 'gateway.networking.k8s.io/v1';
const STATUS_PATH = /^\/apis\/gateway\.networking\.k8s\.io\/v1\/.*\/status$/;

interface Cond {
  type: string;
  status: string;
  reason: string;
  message: string;
  observedGeneration: number;
  lastTransitionTime: string;
}
interface ListenerStatus {
  name: string;
  attachedRoutes: number;
  conditions: Cond[];
}
interface ParentStatus {
  parentRef: Record<string, unknown>;
  controllerName: string;
  conditions: Cond[];
}

let api: TestApiServer;
let compiler: PolicyCompiler;
let source: KubernetesSource | undefined;
let dir = '';

async function until<T>(what: string, get: () => T, ok: (v: T) => boolean, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = get();
    if (ok(v)) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}; last: ${JSON.stringify(v)}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const status = (kind: string, ns: string | undefined, name: string) => api.get(kind, ns, name)?.status as Record<string, unknown> | undefined;
const conds = (list: Cond[] | undefined) => Object.fromEntries((list ?? []).map((c) => [c.type, `${c.status} ${c.reason}`]));
const listeners = () => (status('Gateway', 'edge', 'gw')?.listeners ?? []) as ListenerStatus[];
const listener = (name: string) => listeners().find((l) => l.name === name);
const parents = (ns: string, name: string) => (status('HTTPRoute', ns, name)?.parents ?? []) as ParentStatus[];
const routeConds = (ns: string, name: string) => conds(parents(ns, name)[0]?.conditions);
const patches = () => api.requests.filter((r) => r.method === 'PATCH');

/** The number of status writes once none came for 300 ms. */
async function quiet(): Promise<number> {
  let n = -1;
  while (n !== patches().length) {
    n = patches().length;
    await new Promise((r) => setTimeout(r, 300));
  }
  return n;
}

const route = (ns: string, name: string, backend: Record<string, unknown>, section = 'http', rule: Record<string, unknown> = {}): ApiObj => ({
  apiVersion: G,
  kind: 'HTTPRoute',
  metadata: { name, namespace: ns },
  spec: { parentRefs: [{ name: 'gw', namespace: 'edge', sectionName: section }], rules: [{ ...rule, backendRefs: [{ port: 80, ...backend }] }] },
});

function gatewayObjects(): ApiObj[] {
  return [
    namespace('edge', null) as ApiObj,
    { apiVersion: G, kind: 'GatewayClass', metadata: { name: 'fsm' }, spec: { controllerName: CONTROLLER_NAME } },
    { apiVersion: G, kind: 'GatewayClass', metadata: { name: 'theirs' }, spec: { controllerName: 'example.com/another-controller' } },
    {
      apiVersion: G,
      kind: 'Gateway',
      metadata: { name: 'gw', namespace: 'edge' },
      spec: {
        gatewayClassName: 'fsm',
        listeners: [
          { name: 'http', port: 8080, protocol: 'HTTP', allowedRoutes: { namespaces: { from: 'All' } } },
          { name: 'same', port: 8081, protocol: 'HTTP' },
          { name: 'https', port: 8443, protocol: 'HTTPS', hostname: 'shop.example', tls: { certificateRefs: [{ name: 'no-such-cert' }] }, allowedRoutes: { namespaces: { from: 'All' } } },
          { name: 'tcp', port: 9000, protocol: 'TCP' },
        ],
      },
    },
    { apiVersion: G, kind: 'Gateway', metadata: { name: 'other-gw', namespace: 'edge' }, spec: { gatewayClassName: 'theirs', listeners: [{ name: 'http', port: 80, protocol: 'HTTP' }] } },
    route('app', 'good', { name: 'web' }),
    route('app', 'missing-backend', { name: 'no-such-service' }),
    route('other', 'cross', { name: 'web', namespace: 'app' }),
    route('app', 'not-allowed', { name: 'web' }, 'same'),
  ];
}

async function start(): Promise<void> {
  writeFileSync(join(dir, 'kubeconfig'), api.kubeConfig().exportConfig());
  const cluster = clusterAccess({ kubeconfig: join(dir, 'kubeconfig'), namespace: 'fsm-system' });
  source = await cluster.startSource(compiler, () => void compiler.compile());
}

/** The compiled ingress of node-a: which routes port 8080 serves, and where "web" goes. */
function served(): string[] {
  const gw = compiler.get('node-a')?.policy.ingress?.gateways.find((g) => g.name === 'gw');
  const port = gw?.ports.find((p) => p.port === 8080);
  return (port?.rules ?? []).map((r) => `${r.route} -> ${r.backends.map((b) => `${b.service}${b.problem ? ' (500)' : ` ${b.endpoints.map((e) => e.ip).join(',')}`}`).join(' ')}`).sort();
}

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'fsmn-gw-status-'));
  api = await TestApiServer.start();
  for (const o of baseMesh()) api.create(o as ApiObj);
  for (const o of gatewayObjects()) api.create(o);
  compiler = new PolicyCompiler();
});

afterEach(async () => {
  await source?.stop();
  source = undefined;
  await api.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('Gateway API status written to an API server (cluster mode)', () => {
  test('per class, Gateway, listener and route parent, with the spec\'s reasons; the bad ones do not stop the rest from being served', async () => {
    await start();
    await until('every route status', () => ['good', 'missing-backend', 'not-allowed'].every((n) => parents('app', n).length > 0) && parents('other', 'cross').length > 0, (x) => x);

    expect(conds(status('GatewayClass', undefined, 'fsm')?.conditions as Cond[])).toMatchObject({ Accepted: 'True Accepted' });
    // Another controller's class and Gateway are not ours to write.
    expect(status('GatewayClass', undefined, 'theirs')).toBeUndefined();
    expect(status('Gateway', 'edge', 'other-gw')).toBeUndefined();

    expect(conds(status('Gateway', 'edge', 'gw')?.conditions as Cond[])).toEqual({ Accepted: 'True Accepted', Programmed: 'True Programmed' });
    expect(conds(listener('http')?.conditions)).toEqual({ Accepted: 'True Accepted', Conflicted: 'False NoConflicts', ResolvedRefs: 'True ResolvedRefs', Programmed: 'True Programmed' });
    expect(conds(listener('https')?.conditions)).toMatchObject({ ResolvedRefs: 'False InvalidCertificateRef', Programmed: 'False Invalid' });
    expect(listener('https')!.conditions.find((c) => c.type === 'ResolvedRefs')!.message).toMatch(/no-such-cert/);
    expect(conds(listener('tcp')?.conditions)).toMatchObject({ Accepted: 'False UnsupportedProtocol', Programmed: 'False Invalid' });
    // Attached: the three routes the http listener accepted (unresolved backends still attach); none on the others.
    expect(Object.fromEntries(listeners().map((l) => [l.name, l.attachedRoutes]))).toEqual({ http: 3, same: 0, https: 0, tcp: 0 });

    expect(routeConds('app', 'good')).toEqual({ Accepted: 'True Accepted', ResolvedRefs: 'True ResolvedRefs' });
    expect(routeConds('app', 'missing-backend')).toEqual({ Accepted: 'True Accepted', ResolvedRefs: 'False BackendNotFound' });
    expect(routeConds('other', 'cross')).toEqual({ Accepted: 'True Accepted', ResolvedRefs: 'False RefNotPermitted' });
    expect(routeConds('app', 'not-allowed')).toEqual({ Accepted: 'False NotAllowedByListeners', ResolvedRefs: 'True ResolvedRefs' });
    const good = parents('app', 'good')[0]!;
    expect(good.controllerName).toBe(CONTROLLER_NAME);
    expect(good.parentRef).toEqual({ group: 'gateway.networking.k8s.io', kind: 'Gateway', namespace: 'edge', name: 'gw', sectionName: 'http' });
    expect(good.conditions.every((c) => c.observedGeneration === 1)).toBe(true);

    // Served meanwhile: the good route to web's pod; the unresolved backends answer 500.
    expect(served()).toEqual(['app/good -> app/web 10.0.0.1', 'app/missing-backend -> app/no-such-service (500)', 'other/cross -> app/web (500)']);

    // Every write was a merge patch of a status subresource, done by client-node.
    expect(patches().length).toBeGreaterThan(0);
    for (const p of patches()) {
      expect(p.path).toMatch(STATUS_PATH);
      expect(p.contentType).toMatch(/^application\/merge-patch\+json/);
    }
    // Writing status changes the objects (the informers see them again): that settles, it does not
    // loop. (A compile that runs before the informer has seen an earlier write may write that
    // object once more: at most one extra write per object.)
    const settled = await quiet();
    expect(settled).toBeLessThanOrEqual(2 * 6);
    await new Promise((r) => setTimeout(r, 500));
    expect(patches().length).toBe(settled);
    // The spec is untouched: status writes do not move the generation.
    expect(api.get('HTTPRoute', 'app', 'good')!.metadata.generation).toBe(1);
  }, 30_000);

  test('a fix applied live flips only the object it concerns; a malformed update keeps the last good version serving', async () => {
    await start();
    await until('cross route status', () => routeConds('other', 'cross').ResolvedRefs, (x) => x === 'False RefNotPermitted');
    const goodBefore = parents('app', 'good')[0]!.conditions;
    const crossBefore = parents('other', 'cross')[0]!.conditions.find((c) => c.type === 'ResolvedRefs')!;
    await new Promise((r) => setTimeout(r, 20)); // a later lastTransitionTime than the first write

    api.create({
      apiVersion: 'gateway.networking.k8s.io/v1beta1',
      kind: 'ReferenceGrant',
      metadata: { name: 'routes-from-other', namespace: 'app' },
      spec: { from: [{ group: 'gateway.networking.k8s.io', kind: 'HTTPRoute', namespace: 'other' }], to: [{ group: '', kind: 'Service' }] },
    });
    await until('cross resolved', () => routeConds('other', 'cross').ResolvedRefs, (x) => x === 'True ResolvedRefs');
    const crossAfter = parents('other', 'cross')[0]!.conditions.find((c) => c.type === 'ResolvedRefs')!;
    expect(crossAfter.lastTransitionTime > crossBefore.lastTransitionTime).toBe(true);
    expect(parents('app', 'good')[0]!.conditions).toEqual(goodBefore);
    expect(served()).toContain('other/cross -> app/web 10.0.0.1');

    // A route moved off our Gateway: the entry we wrote goes, nothing else is written for it.
    api.patch('HTTPRoute', 'app', 'not-allowed', { spec: { parentRefs: [{ name: 'elsewhere', namespace: 'edge' }] } });
    await until('our entry removed', () => parents('app', 'not-allowed').length, (n) => n === 0);

    // A regular expression that does not compile: refused with the field named (an Event on the
    // route), the last good version keeps serving and its status keeps the generation it describes.
    const bad = route('app', 'good', { name: 'web' }, 'http', { matches: [{ path: { type: 'RegularExpression', value: '/(' } }] });
    api.patch('HTTPRoute', 'app', 'good', { spec: bad.spec }); // as kubectl apply: the status subresource stays
    expect(api.get('HTTPRoute', 'app', 'good')!.metadata.generation).toBe(2);
    const event = await until(
      'an Event on the route',
      () => api.list('Event').find((e) => (e.involvedObject as { name?: string } | undefined)?.name === 'good'),
      (e) => e !== undefined,
    );
    expect(String(event!.message)).toMatch(/spec\.rules\[0\]\.matches\[0\]\.path\.value.*last good version kept/);
    expect(served()).toContain('app/good -> app/web 10.0.0.1');
    expect(parents('app', 'good')[0]!.conditions.map((c) => [c.type, c.status, c.observedGeneration])).toEqual([
      ['Accepted', 'True', 1],
      ['ResolvedRefs', 'True', 1],
    ]);
  }, 30_000);

  test('a status write the API server refuses fails alone, does not loop, and is written at a later change', async () => {
    const failing = '/apis/gateway.networking.k8s.io/v1/namespaces/app/httproutes/missing-backend/status';
    api.failNext('PATCH', failing, 500, 1000);
    await start();
    await until('the other routes', () => parents('app', 'good').length > 0 && parents('other', 'cross').length > 0 && parents('app', 'not-allowed').length > 0, (x) => x);
    await until('a refused write', () => patches().filter((p) => p.path === failing).length, (n) => n > 0);
    await new Promise((r) => setTimeout(r, 500));
    // Each write of another object makes one more compile and so one more try: a handful, not a loop.
    const tries = patches().filter((p) => p.path === failing).length;
    await new Promise((r) => setTimeout(r, 500));
    expect(patches().filter((p) => p.path === failing).length).toBe(tries);
    expect(tries).toBeLessThan(10);
    expect(parents('app', 'missing-backend')).toEqual([]);
    expect(served()).toContain('app/good -> app/web 10.0.0.1');
    // The API server takes writes again: the next change brings the missing status.
    api.clearFailures();
    api.create(route('app', 'later', { name: 'web' }));
    await until('missing-backend status', () => routeConds('app', 'missing-backend').ResolvedRefs, (x) => x === 'False BackendNotFound');
    await until('the new route\'s status', () => routeConds('app', 'later').ResolvedRefs, (x) => x === 'True ResolvedRefs');
  }, 30_000);
});
