import { PolicyCompiler } from '../../src/policy/compiler.js';
import type { Kind } from '../../src/policy/objects.js';

/** Small Kubernetes objects for policy and controller tests. */

export type Obj = { apiVersion: string; kind: string; metadata: Record<string, unknown>; [k: string]: unknown };

export const namespace = (name: string, mesh: string | null = 'fsm'): Obj => ({
  apiVersion: 'v1',
  kind: 'Namespace',
  metadata: { name, labels: mesh ? { 'flomesh.io/monitored-by': mesh } : {} },
});

export const node = (name: string, ip: string, labels: Record<string, string> = {}): Obj => ({
  apiVersion: 'v1',
  kind: 'Node',
  metadata: { name, labels },
  status: { addresses: [{ type: 'InternalIP', address: ip }, { type: 'Hostname', address: name }] },
});

export interface PodOpts {
  ns?: string;
  node?: string;
  ip?: string | null;
  sa?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  uid?: string;
  phase?: string;
  hostNetwork?: boolean;
  qosClass?: string;
}

export const pod = (name: string, o: PodOpts = {}): Obj => ({
  apiVersion: 'v1',
  kind: 'Pod',
  metadata: { name, namespace: o.ns ?? 'app', uid: o.uid ?? `uid-${name}`, labels: o.labels ?? { app: name.replace(/-\d+$/, '') }, annotations: o.annotations ?? {} },
  spec: {
    nodeName: o.node ?? 'node-a',
    serviceAccountName: o.sa ?? 'default',
    hostNetwork: o.hostNetwork ?? false,
    containers: [{ ports: [{ name: 'http', containerPort: 8080 }] }],
  },
  status: { phase: o.phase ?? 'Running', podIP: o.ip === undefined ? '10.0.0.1' : o.ip, qosClass: o.qosClass ?? 'Burstable' },
});

export const service = (name: string, o: { ns?: string; selector?: Record<string, string> | null; clusterIP?: string; ports?: unknown[] } = {}): Obj => ({
  apiVersion: 'v1',
  kind: 'Service',
  metadata: { name, namespace: o.ns ?? 'app' },
  spec: {
    clusterIP: o.clusterIP ?? '172.16.0.10',
    ...(o.selector === null ? {} : { selector: o.selector ?? { app: name } }),
    ports: o.ports ?? [{ name: 'http', port: 80, targetPort: 'http' }],
  },
});

export const slice = (svc: string, endpoints: { ip: string; node?: string; pod?: string; ready?: boolean }[], o: { ns?: string; port?: number; name?: string } = {}): Obj => ({
  apiVersion: 'discovery.k8s.io/v1',
  kind: 'EndpointSlice',
  metadata: { name: o.name ?? `${svc}-xyz`, namespace: o.ns ?? 'app', labels: { 'kubernetes.io/service-name': svc } },
  addressType: 'IPv4',
  ports: [{ name: 'http', port: o.port ?? 8080, protocol: 'TCP' }],
  endpoints: endpoints.map((e) => ({
    addresses: [e.ip],
    conditions: { ready: e.ready ?? true },
    nodeName: e.node ?? 'node-a',
    ...(e.pod ? { targetRef: { kind: 'Pod', name: e.pod, namespace: o.ns ?? 'app' } } : {}),
  })),
});

export const split = (name: string, root: string, backends: { service: string; weight: unknown }[], ns = 'app'): Obj => ({
  apiVersion: 'split.smi-spec.io/v1alpha2',
  kind: 'TrafficSplit',
  metadata: { name, namespace: ns },
  spec: { service: root, backends },
});

/** A v1alpha4 split that applies to requests matching the named HTTPRouteGroups. */
export const matchSplit = (name: string, root: string, backends: { service: string; weight: unknown }[], groups: string[], ns = 'app'): Obj => ({
  apiVersion: 'split.smi-spec.io/v1alpha4',
  kind: 'TrafficSplit',
  metadata: { name, namespace: ns },
  spec: { service: root, matches: groups.map((g) => ({ apiGroup: 'specs.smi-spec.io', kind: 'HTTPRouteGroup', name: g })), backends },
});

export const target = (name: string, dstSa: string, srcSas: string[], rules: unknown[] = [{ kind: 'HTTPRouteGroup', name: 'routes' }], ns = 'app'): Obj => ({
  apiVersion: 'access.smi-spec.io/v1alpha3',
  kind: 'TrafficTarget',
  metadata: { name, namespace: ns },
  spec: {
    destination: { kind: 'ServiceAccount', name: dstSa, namespace: ns },
    sources: srcSas.map((s) => ({ kind: 'ServiceAccount', name: s, namespace: ns })),
    rules,
  },
});

export const routeGroup = (name: string, matches: unknown[] = [{ name: 'api', pathRegex: '/api/.*', methods: ['GET'] }], ns = 'app'): Obj => ({
  apiVersion: 'specs.smi-spec.io/v1alpha4',
  kind: 'HTTPRouteGroup',
  metadata: { name, namespace: ns },
  spec: { matches },
});

export const tcpRoute = (name: string, ports: number[], ns = 'app'): Obj => ({
  apiVersion: 'specs.smi-spec.io/v1alpha4',
  kind: 'TCPRoute',
  metadata: { name, namespace: ns },
  spec: { matches: { ports } },
});

export const meshConfig = (data: Record<string, string>, ns = 'fsm-system'): Obj => ({
  apiVersion: 'v1',
  kind: 'ConfigMap',
  metadata: { name: 'fsm-mesh-config', namespace: ns },
  data,
});

/** A compiler fed with `objs` and compiled once. */
export function compiled(objs: Obj[]): PolicyCompiler {
  const c = new PolicyCompiler();
  for (const o of objs) c.upsert(o.kind as Kind, o);
  c.compile();
  return c;
}

/** The two-node mesh most tests start from: app namespace in the mesh, web and db pods on node-a, api on node-b. */
export function baseMesh(): Obj[] {
  return [
    namespace('app'),
    namespace('other', null),
    node('node-a', '192.168.1.10'),
    node('node-b', '192.168.1.11', { 'flomesh.io/interception-mode': 'iptables' }),
    pod('web-1', { ip: '10.0.0.1', sa: 'web' }),
    pod('db-1', { ip: '10.0.0.2', sa: 'db' }),
    pod('api-1', { ip: '10.0.1.1', node: 'node-b', sa: 'api' }),
    pod('outsider', { ns: 'other', ip: '10.0.0.9' }),
    service('web', { clusterIP: '172.16.0.1' }),
    service('db', { clusterIP: '172.16.0.2' }),
    service('api', { clusterIP: '172.16.0.3' }),
    slice('api', [{ ip: '10.0.1.1', node: 'node-b', pod: 'api-1' }]),
  ];
}

/** trustBundle: the roots the certificate provider publishes from this step on. */
export type ChangeStep = [what: string, change: { upsert?: Obj[]; remove?: Obj[]; trustBundle?: string[] }];

/** A run of every kind of change, from baseMesh(): deltas and incremental compiles are checked against it step by step. */
export const changeSteps: ChangeStep[] = [
  ['a pod added on node-b', { upsert: [pod('api-2', { ip: '10.0.1.2', node: 'node-b', sa: 'api' })] }],
  ['an endpoint port changed', { upsert: [slice('api', [{ ip: '10.0.1.1', node: 'node-b', pod: 'api-1' }], { port: 9090 })] }],
  ['a service added', { upsert: [service('cache', { clusterIP: '172.16.0.9' }), pod('cache-1', { ip: '10.0.0.7', sa: 'cache' })] }],
  ['a split added', { upsert: [split('web-split', 'web', [{ service: 'db', weight: 1 }, { service: 'api', weight: 3 }])] }],
  ['a split weight changed', { upsert: [split('web-split', 'web', [{ service: 'db', weight: 2 }, { service: 'api', weight: 3 }])] }],
  ['a service removed', { remove: [service('cache')] }],
  ['the split removed', { remove: [split('web-split', 'web', [])] }],
  ['every pod of node-b removed (its mesh pods slice goes)', { remove: [pod('api-1', { node: 'node-b' }), pod('api-2', { node: 'node-b' })] }],
  ['a pod back on node-b', { upsert: [pod('api-1', { ip: '10.0.1.1', node: 'node-b', sa: 'api' })] }],
  ['a pod on a new node whose name sorts first', { upsert: [pod('web-0', { ip: '10.0.2.1', node: 'node-0', sa: 'web' })] }],
  ['mesh settings changed', { upsert: [meshConfig({ inbound: 'strict' })] }],
  ['smi mode with targets', { upsert: [meshConfig({ inbound: 'strict', trafficPolicy: 'smi' }), routeGroup('routes'), target('web-to-api', 'api', ['web'])] }],
  ['a target changed', { upsert: [target('web-to-api', 'api', ['web', 'db'])] }],
  ['a split added in smi mode', { upsert: [split('api-split', 'api', [{ service: 'db', weight: 1 }, { service: 'web', weight: 1 }])] }],
  ['its weight changed in smi mode', { upsert: [split('api-split', 'api', [{ service: 'db', weight: 5 }, { service: 'web', weight: 1 }])] }],
  ['a split with HTTP matches added', { upsert: [matchSplit('api-canary', 'api', [{ service: 'web', weight: 1 }], ['routes'])] }],
  ['the route group it matches changed', { upsert: [routeGroup('routes', [{ name: 'api', pathRegex: '/v2/.*', methods: ['GET'] }])] }],
  ['the split with matches removed', { remove: [matchSplit('api-canary', 'api', [], [])] }],
  ['back to permissive', { upsert: [meshConfig({ inbound: 'strict', trafficPolicy: 'permissive' })] }],
  ['a trust bundle published', { trustBundle: ['root-1 PEM'] }],
  ['a root rotation publishes old and new roots', { trustBundle: ['root-1 PEM', 'root-2 PEM'] }],
  ['the old root withdrawn', { trustBundle: ['root-2 PEM'] }],
  ['the trust domain changed', { upsert: [meshConfig({ inbound: 'strict', trustDomain: 'edge.example.org' })] }],
];

/** Feed one step's objects to the compiler (every upsert must be accepted). */
export function applyStep(c: PolicyCompiler, change: ChangeStep[1]): void {
  for (const o of change.upsert ?? []) {
    if (!c.upsert(o.kind as Kind, o)) throw new Error(`${o.kind} ${String(o.metadata.name)} was rejected: ${JSON.stringify(c.reporter.active())}`);
  }
  for (const o of change.remove ?? []) c.remove({ kind: o.kind as Kind, namespace: String(o.metadata.namespace ?? ''), name: String(o.metadata.name) });
  if (change.trustBundle) c.setTrustBundle(change.trustBundle);
}
