import { PolicyCompiler } from '../../src/policy/compiler.js';
import type { Kind } from '../../src/policy/objects.js';
import { NodePolicySchema } from '../../src/policy/schema.js';
import {
  applyStep,
  baseMesh,
  changeSteps,
  compiled,
  matchSplit,
  meshConfig,
  namespace,
  node,
  pod,
  routeGroup,
  service,
  slice,
  split,
  target,
  tcpRoute,
  type Obj,
} from './policy-fixtures.js';

const up = (c: PolicyCompiler, o: Obj) => c.upsert(o.kind as Kind, o);
const podNames = (c: PolicyCompiler, n: string) => c.get(n)!.policy.pods.map((p) => p.name);
const svc = (c: PolicyCompiler, n: string, name: string) => c.get(n)!.policy.services.find((s) => s.name === name);

describe('enrolment and placement', () => {
  test('only pods of monitored namespaces, on their own node, with an IP, not opted out, not host-network', () => {
    const c = compiled([
      ...baseMesh(),
      namespace('othermesh', 'another'),
      pod('foreign', { ns: 'othermesh', ip: '10.0.0.20' }),
      pod('optout', { ip: '10.0.0.3', annotations: { 'flomesh.io/sidecar-injection': 'disabled' } }),
      pod('pending', { ip: null, phase: 'Pending' }),
      pod('done', { ip: '10.0.0.4', phase: 'Succeeded' }),
      pod('hostnet', { ip: '192.168.1.10', hostNetwork: true }),
    ]);
    expect(podNames(c, 'node-a').sort()).toEqual(['db-1', 'web-1']);
    expect(podNames(c, 'node-b')).toEqual(['api-1']);
    expect(c.reporter.active()).toEqual([]);
    // What the CNI plugin decides by at pod creation, before the pod has an address.
    expect(c.get('node-a')!.policy.node.monitoredNamespaces).toEqual(['app']);
    expect(c.get('node-a')!.policy.node.optedOutPods).toEqual(['app/optout']);
    expect(c.get('node-b')!.policy.node.optedOutPods).toEqual([]);
  });

  test('node facts: addresses, the mode label, the mesh default and every proxy', () => {
    const c = compiled([...baseMesh(), meshConfig({ interceptionMode: 'ebpf', inbound: 'strict' })]);
    const a = c.get('node-a')!.policy;
    const b = c.get('node-b')!.policy;
    expect(a.node).toEqual({ name: 'node-a', addresses: ['192.168.1.10'], interceptionMode: null, monitoredNamespaces: ['app'], optedOutPods: [] });
    expect(b.node.interceptionMode).toBe('iptables');
    expect(a.mesh).toMatchObject({ interceptionMode: 'ebpf', inbound: 'strict', name: 'fsm' });
    expect(a.proxies).toEqual([
      { node: 'node-a', addresses: ['192.168.1.10'] },
      { node: 'node-b', addresses: ['192.168.1.11'] },
    ]);
  });

  test('pod exclusions come from the FSM annotations; mesh-wide ones from the mesh config', () => {
    const c = compiled([
      ...baseMesh(),
      meshConfig({ outboundPortExclusionList: '53', outboundIPRangeExclusionList: '169.254.0.0/16' }),
      pod('cache-1', {
        ip: '10.0.0.5',
        annotations: {
          'flomesh.io/outbound-port-exclusion-list': '6379, 6380',
          'flomesh.io/outbound-ip-range-exclusion-list': '10.96.0.1',
          'flomesh.io/outbound-ip-range-inclusion-list': '10.0.0.0/8',
          'flomesh.io/inbound-port-exclusion-list': '9090',
          'lab.fsm-node.io/cgroup': 'fsmt-lab/cache-1',
        },
      }),
    ]);
    const p = c.get('node-a')!.policy.pods.find((x) => x.name === 'cache-1')!;
    expect(p.exclusions).toEqual({ outboundPorts: [6379, 6380], outboundCidrs: ['10.96.0.1/32'], outboundIncludeCidrs: ['10.0.0.0/8'], inboundPorts: [9090] });
    expect(p.cgroup).toEqual({ qosClass: 'Burstable', path: 'fsmt-lab/cache-1' });
    expect(c.get('node-a')!.policy.mesh.exclusions).toEqual({ outboundPorts: [53], outboundCidrs: ['169.254.0.0/16'], outboundIncludeCidrs: [], inboundPorts: [] });
  });

  test('a namespace leaving the mesh takes its pods and services out', () => {
    const c = compiled(baseMesh());
    up(c, namespace('app', null));
    const r = c.compile();
    expect(r.changed.sort()).toEqual(['node-a', 'node-b']);
    expect(c.get('node-a')!.policy.pods).toEqual([]);
    expect(c.get('node-a')!.policy.services).toEqual([]);
  });

  test('a deleted Node keeps its policy while pods run there; without pods it is gone', () => {
    const c = compiled(baseMesh());
    c.remove({ kind: 'Node', namespace: '', name: 'node-b' });
    c.compile();
    expect(c.get('node-b')!.policy.node.addresses).toEqual([]);
    c.remove({ kind: 'Pod', namespace: 'app', name: 'api-1' });
    expect(c.compile().changed).toContain('node-b');
    expect(c.get('node-b')).toBeUndefined();
  });
});

describe('services and endpoints', () => {
  test('endpoints from EndpointSlices: ready only, named ports, pod identity and node', () => {
    const c = compiled([
      ...baseMesh(),
      slice('web', [
        { ip: '10.0.0.1', pod: 'web-1' },
        { ip: '10.0.0.7', ready: false, pod: 'web-2' },
      ]),
    ]);
    expect(svc(c, 'node-b', 'web')).toEqual({
      namespace: 'app',
      name: 'web',
      clusterIPs: ['172.16.0.1'],
      ports: [{ name: 'http', port: 80, protocol: 'TCP', appProtocol: null }],
      endpoints: [{ ip: '10.0.0.1', ports: { http: 8080 }, node: 'node-a', pod: { namespace: 'app', name: 'web-1' }, serviceAccount: 'web' }],
    });
  });

  test('without EndpointSlices (manifest mode) endpoints come from the selector; named targetPort resolves', () => {
    const c = compiled(baseMesh());
    expect(svc(c, 'node-b', 'db')!.endpoints).toEqual([
      { ip: '10.0.0.2', ports: { http: 8080 }, node: 'node-a', pod: { namespace: 'app', name: 'db-1' }, serviceAccount: 'db' },
    ]);
  });

  test('services outside the mesh are not listed', () => {
    const c = compiled([...baseMesh(), service('ext', { ns: 'other' })]);
    expect(svc(c, 'node-a', 'ext')).toBeUndefined();
  });

  test('a pod created after the slice naming it fills in the endpoint identity', () => {
    const c = compiled([...baseMesh(), slice('web', [{ ip: '10.0.0.8', pod: 'web-8' }])]);
    expect(svc(c, 'node-a', 'web')!.endpoints[0]!.serviceAccount).toBeNull();
    up(c, pod('web-8', { ip: '10.0.0.8', sa: 'web' }));
    c.compile();
    expect(svc(c, 'node-a', 'web')!.endpoints[0]!.serviceAccount).toBe('web');
  });
});

describe('versions', () => {
  test('after every kind of change, the incremental compile equals a compile from scratch of the same objects', () => {
    const objs = new Map(baseMesh().map((o) => [`${o.kind}/${String(o.metadata.namespace ?? '')}/${String(o.metadata.name)}`, o]));
    const c = compiled([...objs.values()]);
    let bundle: string[] = [];
    for (const [what, change] of changeSteps) {
      applyStep(c, change);
      c.compile();
      for (const o of change.upsert ?? []) objs.set(`${o.kind}/${String(o.metadata.namespace ?? '')}/${String(o.metadata.name)}`, o);
      for (const o of change.remove ?? []) objs.delete(`${o.kind}/${String(o.metadata.namespace ?? '')}/${String(o.metadata.name)}`);
      bundle = change.trustBundle ?? bundle;
      const scratch = compiled([...objs.values()]);
      scratch.setTrustBundle(bundle);
      scratch.compile();
      const versions = (x: PolicyCompiler) => Object.fromEntries(x.nodes().map((n) => [n, x.get(n)!.json()]));
      expect({ what, policies: versions(c) }).toEqual({ what, policies: versions(scratch) });
    }
  });

  test('a change on one node does not change another node’s version', () => {
    const c = compiled(baseMesh());
    const before = c.get('node-b')!.version;
    // A pod's QoS class (its cgroup) is node-a's own business: only node-a's own part changes.
    up(c, pod('web-1', { ip: '10.0.0.1', sa: 'web', qosClass: 'Guaranteed' }));
    expect(c.compile().changed).toEqual(['node-a']);
    expect(c.get('node-b')!.version).toBe(before);
  });

  test('a new mesh pod reaches every node (mesh pods), a pod outside the mesh none', () => {
    const c = compiled(baseMesh());
    up(c, pod('outsider-2', { ns: 'other', ip: '10.0.0.31' }));
    expect(c.compile().changed).toEqual([]);
    up(c, pod('batch-1', { ip: '10.0.0.30', labels: { app: 'batch' } }));
    expect(c.compile().changed.sort()).toEqual(['node-a', 'node-b']);
    expect(c.get('node-b')!.policy.meshPods).toContainEqual({ ip: '10.0.0.30', namespace: 'app', serviceAccount: 'default', node: 'node-a' });
    c.remove({ kind: 'Pod', namespace: 'app', name: 'batch-1' });
    expect(c.compile().changed.sort()).toEqual(['node-a', 'node-b']);
    expect(c.get('node-b')!.policy.meshPods.map((p) => p.ip)).not.toContain('10.0.0.30');
  });

  test('an endpoint change reaches every node that may reach the service', () => {
    const c = compiled(baseMesh());
    up(c, slice('api', [{ ip: '10.0.1.1', node: 'node-b', pod: 'api-1' }], { port: 9090 }));
    expect(c.compile().changed.sort()).toEqual(['node-a', 'node-b']);
    expect(svc(c, 'node-a', 'api')!.endpoints[0]!.ports).toEqual({ http: 9090 });
  });

  test('recompiling the same state changes nothing; replicas fed in another order agree', () => {
    const objs = baseMesh();
    const c1 = compiled(objs);
    up(c1, objs[4]!);
    expect(c1.compile().changed).toEqual([]);
    const c2 = compiled([...objs].reverse());
    expect(c2.get('node-a')!.version).toBe(c1.get('node-a')!.version);
    expect(c2.get('node-b')!.version).toBe(c1.get('node-b')!.version);
  });

  test('the served JSON is the policy object and passes the schema', () => {
    const c = compiled([...baseMesh(), split('web-split', 'web', [{ service: 'db', weight: 1 }, { service: 'api', weight: 3 }])]);
    const n = c.get('node-a')!;
    const parsed = NodePolicySchema.parse(JSON.parse(n.json()));
    expect(parsed).toEqual(JSON.parse(JSON.stringify(n.policy)));
    expect(parsed.version).toBe(n.version);
  });
});

describe('splits', () => {
  test('weights are compiled for nodes that may reach the root service', () => {
    const c = compiled([...baseMesh(), split('web-split', 'web', [{ service: 'db', weight: 1 }, { service: 'api', weight: 3 }])]);
    expect(c.get('node-b')!.policy.splits).toEqual([
      { namespace: 'app', name: 'web-split', service: 'web', backends: [{ service: 'db', weight: 1 }, { service: 'api', weight: 3 }], matches: [] },
    ]);
  });

  test('a weight that is not a number is reported by field; the last good split stays in force', () => {
    const c = compiled([...baseMesh(), split('s', 'web', [{ service: 'db', weight: 50 }, { service: 'api', weight: 50 }])]);
    const before = c.get('node-a')!.version;
    expect(up(c, split('s', 'web', [{ service: 'db', weight: 'ten' }, { service: 'api', weight: 50 }]))).toBe(false);
    up(c, pod('web-2', { ip: '10.0.0.12', sa: 'web' })); // an unrelated good change still compiles
    c.compile();
    expect(c.get('node-a')!.policy.splits[0]!.backends[0]!.weight).toBe(50);
    expect(podNames(c, 'node-a')).toContain('web-2');
    expect(c.get('node-a')!.version).not.toBe(before);
    expect(c.reporter.active()).toEqual([
      expect.objectContaining({ ref: { kind: 'TrafficSplit', namespace: 'app', name: 's' }, stage: 'input', field: 'spec.backends[0].weight', keptLastGood: true }),
    ]);
    expect(c.reporter.reported.get('TrafficSplit')).toBe(1);
  });

  test('a split to a missing service is reported and left out; the rest compiles', () => {
    const c = compiled([...baseMesh(), split('s', 'web', [{ service: 'nope', weight: 1 }])]);
    expect(c.get('node-a')!.policy.splits).toEqual([]);
    expect(c.get('node-a')!.policy.services.map((s) => s.name)).toEqual(['api', 'db', 'web']);
    expect(c.reporter.active()).toEqual([
      expect.objectContaining({ stage: 'reference', field: 'spec.backends[0].service', message: 'service app/nope not found in the mesh', keptLastGood: false }),
    ]);
  });

  test('an edit that points a good split at a missing service keeps the last good version; fixing it clears the report', () => {
    const c = compiled([...baseMesh(), split('s', 'web', [{ service: 'db', weight: 1 }])]);
    up(c, split('s', 'web', [{ service: 'dbb', weight: 1 }]));
    c.compile();
    expect(c.get('node-a')!.policy.splits[0]!.backends).toEqual([{ service: 'db', weight: 1 }]);
    expect(c.reporter.active()).toEqual([expect.objectContaining({ stage: 'reference', keptLastGood: true })]);
    up(c, service('dbb', { clusterIP: '172.16.0.9' }));
    c.compile();
    expect(c.get('node-a')!.policy.splits[0]!.backends).toEqual([{ service: 'dbb', weight: 1 }]);
    expect(c.reporter.active()).toEqual([]);
  });
});

describe('splits with HTTP matches (v1alpha3/v1alpha4)', () => {
  const canary = () => routeGroup('canary', [{ name: 'tester', headers: { 'x-canary': 'yes' } }, { name: 'v2-path', pathRegex: '/v2/.*' }]);

  test('every match of every group named is in the split, in the order named', () => {
    const c = compiled([...baseMesh(), canary(), routeGroup('firefox', [{ name: 'ff', headers: { 'user-agent': '.*Firefox.*' } }]), matchSplit('s', 'web', [{ service: 'api', weight: 100 }], ['firefox', 'canary'])]);
    expect(c.get('node-a')!.policy.splits).toEqual([
      {
        namespace: 'app',
        name: 's',
        service: 'web',
        backends: [{ service: 'api', weight: 100 }],
        matches: [
          { name: 'ff', pathRegex: null, methods: [], headers: { 'user-agent': '.*Firefox.*' } },
          { name: 'tester', pathRegex: null, methods: [], headers: { 'x-canary': 'yes' } },
          { name: 'v2-path', pathRegex: '/v2/.*', methods: [], headers: {} },
        ],
      },
    ]);
    expect(c.reporter.active()).toEqual([]);
  });

  test('a v1alpha3 split and a v1alpha1 split compile to the same shape as v1alpha4 and v1alpha2', () => {
    const v3 = { ...matchSplit('s', 'web', [{ service: 'api', weight: 1 }], ['canary']), apiVersion: 'split.smi-spec.io/v1alpha3' };
    const v1 = { ...split('w', 'db', [{ service: 'api', weight: '500m' }, { service: 'web', weight: '1500m' }]), apiVersion: 'split.smi-spec.io/v1alpha1' };
    const c = compiled([...baseMesh(), canary(), v3, v1]);
    const splits = c.get('node-a')!.policy.splits;
    expect(splits.map((x) => [x.name, x.backends, x.matches.length])).toEqual([
      ['s', [{ service: 'api', weight: 1 }], 2],
      ['w', [{ service: 'api', weight: 1 }, { service: 'web', weight: 3 }], 0],
    ]);
  });

  test('a missing route group is reported by field and the split left out; creating the group brings it in', () => {
    const c = compiled([...baseMesh(), matchSplit('s', 'web', [{ service: 'api', weight: 1 }], ['canary'])]);
    expect(c.get('node-a')!.policy.splits).toEqual([]);
    expect(c.reporter.active()).toEqual([
      expect.objectContaining({ ref: { kind: 'TrafficSplit', namespace: 'app', name: 's' }, stage: 'reference', field: 'spec.matches[0].name', message: 'HTTPRouteGroup app/canary not found', keptLastGood: false }),
    ]);
    up(c, canary());
    c.compile();
    expect(c.get('node-a')!.policy.splits.map((x) => x.matches.length)).toEqual([2]);
    expect(c.reporter.active()).toEqual([]);
  });

  test('a changed route group changes the split in every policy that has it', () => {
    const c = compiled([...baseMesh(), canary(), matchSplit('s', 'web', [{ service: 'api', weight: 1 }], ['canary'])]);
    const before = c.get('node-b')!.version;
    up(c, routeGroup('canary', [{ name: 'tester', headers: { 'x-canary': 'always' } }]));
    expect(c.compile().changed.sort()).toEqual(['node-a', 'node-b']);
    expect(c.get('node-b')!.version).not.toBe(before);
    expect(c.get('node-b')!.policy.splits[0]!.matches).toEqual([{ name: 'tester', pathRegex: null, methods: [], headers: { 'x-canary': 'always' } }]);
  });

  test('an unknown kind in matches is reported at input naming the value; the last good split stays', () => {
    const good = matchSplit('s', 'web', [{ service: 'api', weight: 1 }], ['canary']);
    const c = compiled([...baseMesh(), canary(), good]);
    const bad = { ...good, spec: { ...(good.spec as object), matches: [{ kind: 'TCPRoute', name: 'canary' }] } };
    expect(up(c, bad)).toBe(false);
    c.compile();
    expect(c.get('node-a')!.policy.splits).toHaveLength(1);
    const [issue] = c.reporter.active();
    expect(issue).toMatchObject({ stage: 'input', field: 'spec.matches[0].kind', keptLastGood: true });
    expect(issue!.message).toContain('"TCPRoute"');
  });
});

describe('bad objects are isolated', () => {
  test('a bad CIDR in a pod annotation: reported by field; the pod keeps its last good version', () => {
    const c = compiled(baseMesh());
    const bad = pod('web-1', { ip: '10.0.0.1', sa: 'web', annotations: { 'flomesh.io/outbound-ip-range-exclusion-list': '10.0.0.0/40' } });
    expect(up(c, bad)).toBe(false);
    c.compile();
    expect(podNames(c, 'node-a')).toContain('web-1');
    const [issue] = c.reporter.active();
    expect(issue).toMatchObject({ field: 'metadata.annotations["flomesh.io/outbound-ip-range-exclusion-list"]', keptLastGood: true });
    expect(issue!.message).toContain('"10.0.0.0/40"');
  });

  test('a new pod with a bad annotation is skipped; the node still compiles', () => {
    const c = compiled([...baseMesh(), pod('bad-1', { ip: '10.0.0.40', annotations: { 'flomesh.io/inbound-port-exclusion-list': 'http' } })]);
    expect(podNames(c, 'node-a').sort()).toEqual(['db-1', 'web-1']);
    expect(c.reporter.active()).toEqual([expect.objectContaining({ ref: { kind: 'Pod', namespace: 'app', name: 'bad-1' }, keptLastGood: false })]);
  });

  test('a bad Node label is reported; an unknown mesh config key is reported and defaults apply', () => {
    const c = compiled([...baseMesh(), node('node-c', '192.168.1.12', { 'flomesh.io/interception-mode': 'xdp' }), meshConfig({ inbound: 'strict', egres: 'deny' })]);
    expect(c.get('node-c')).toBeUndefined();
    expect(c.get('node-a')!.policy.mesh.inbound).toBe('permissive');
    expect(c.reporter.active().map((i) => `${i.ref.kind}:${i.field}`).sort()).toEqual(['ConfigMap:data', 'Node:metadata.labels["flomesh.io/interception-mode"]']);
  });

  test('the mesh config sets the trust domain (into every policy) and the certificate lifetime (controller only); bad values name the key', () => {
    const c = compiled([...baseMesh(), meshConfig({ trustDomain: 'edge.example.org', certificateLifetime: '7d' })]);
    expect(c.get('node-a')!.policy.trust).toEqual({ trustDomain: 'edge.example.org', bundle: [] });
    expect(c.identitySettings()).toEqual({ trustDomain: 'edge.example.org', certificateLifetimeMs: 7 * 24 * 3600_000 });
    for (const [key, value, why] of [
      ['trustDomain', 'Edge_Site', /invalid trustDomain "Edge_Site"/],
      ['certificateLifetime', '30s', /invalid certificateLifetime "30s": must be between 1m and 366d/],
      ['certificateLifetime', 'forever', /expected a duration/],
    ] as const) {
      const bad = compiled([...baseMesh(), meshConfig({ [key]: value })]);
      const issue = bad.reporter.active().find((i) => i.ref.kind === 'ConfigMap');
      expect(issue).toMatchObject({ field: `data.${key}` });
      expect(issue!.message).toMatch(why);
      expect(bad.identitySettings()).toEqual({ trustDomain: 'cluster.local', certificateLifetimeMs: null });
    }
  });

  test('deleting a bad object clears its report', () => {
    const c = compiled([...baseMesh(), split('s', 'web', [{ service: 'db', weight: 'x' }])]);
    expect(c.reporter.active()).toHaveLength(1);
    c.remove({ kind: 'TrafficSplit', namespace: 'app', name: 's' });
    expect(c.reporter.active()).toEqual([]);
  });
});

describe('access (smi traffic policy)', () => {
  const smiMesh = () => [
    ...baseMesh(),
    meshConfig({ trafficPolicy: 'smi' }),
    slice('web', [{ ip: '10.0.0.1', pod: 'web-1' }]),
    slice('db', [{ ip: '10.0.0.2', pod: 'db-1' }]),
    routeGroup('routes'),
    tcpRoute('pg', [5432]),
    target('api-to-web', 'web', ['api']),
    target('web-to-db', 'db', ['web'], [{ kind: 'TCPRoute', name: 'pg' }]),
  ];

  test('a node gets the rules whose destination runs there, with routes resolved', () => {
    const c = compiled(smiMesh());
    const a = c.get('node-a')!.policy;
    expect(a.access.map((x) => x.name)).toEqual(['web-to-db', 'api-to-web']);
    expect(a.access.find((x) => x.name === 'api-to-web')!.rules).toEqual([
      { kind: 'HTTPRouteGroup', name: 'routes', matches: [{ name: 'api', pathRegex: '/api/.*', methods: ['GET'], headers: {} }] },
    ]);
    expect(a.access.find((x) => x.name === 'web-to-db')!.rules).toEqual([{ kind: 'TCPRoute', name: 'pg', ports: [5432] }]);
    expect(c.get('node-b')!.policy.access).toEqual([]);
  });

  test('a node only gets the services its pods may reach, and those of its own pods (their port protocols)', () => {
    const c = compiled(smiMesh());
    // api (node-b) may reach web; web (node-a) may reach db.
    expect(c.get('node-b')!.policy.services.map((s) => s.name)).toEqual(['api', 'web']);
    expect(c.get('node-a')!.policy.services.map((s) => s.name)).toEqual(['db', 'web']);
  });

  test('a node lists every mesh pod, also those of other nodes whose services it may not reach', () => {
    const c = compiled(smiMesh());
    // No pod of node-a may reach api: no service of api in node-a's policy, yet api-1 is a mesh pod there.
    const a = c.get('node-a')!.policy;
    expect(a.services.map((s) => s.name)).not.toContain('api');
    expect(a.meshPods).toEqual([
      { ip: '10.0.0.1', namespace: 'app', serviceAccount: 'web', node: 'node-a' },
      { ip: '10.0.0.2', namespace: 'app', serviceAccount: 'db', node: 'node-a' },
      { ip: '10.0.1.1', namespace: 'app', serviceAccount: 'api', node: 'node-b' },
    ]);
    // The same list on every node (one shared part), in the served JSON too.
    expect(c.get('node-b')!.policy.meshPods).toEqual(a.meshPods);
    expect((JSON.parse(c.get('node-b')!.json()) as { meshPods: unknown }).meshPods).toEqual(a.meshPods);
  });

  test('a target naming a missing route group is reported and left out', () => {
    const c = compiled([...smiMesh(), target('broken', 'web', ['db'], [{ kind: 'HTTPRouteGroup', name: 'missing' }])]);
    expect(c.get('node-a')!.policy.access.map((x) => x.name)).not.toContain('broken');
    expect(c.reporter.active()).toEqual([expect.objectContaining({ ref: { kind: 'TrafficTarget', namespace: 'app', name: 'broken' }, field: 'spec.rules[0].name' })]);
  });

  test('sources of other clusters: by SPIFFE ID or ServiceAccount with trustDomain; the own trust domain is local; rendered for the proxy', async () => {
    const { renderProxyConfig } = await import('../../src/proxy/config.js');
    const t = target('from-c2', 'web', ['db'], [{ kind: 'HTTPRouteGroup', name: 'routes' }]) as unknown as { spec: { sources: unknown[] } };
    t.spec.sources = [
      { kind: 'SpiffeID', name: 'spiffe://c2.cluster.local/ns/shop/sa/client' },
      { kind: 'ServiceAccount', name: 'web', namespace: 'shop', trustDomain: 'c2.cluster.local' },
      { kind: 'ServiceAccount', name: 'api', trustDomain: 'cluster.local' },
    ];
    const c = compiled([...smiMesh(), t as never]);
    expect(c.reporter.active()).toEqual([]);
    const policy = c.get('node-a')!.policy;
    expect(policy.access.find((a) => a.name === 'from-c2')!.sources).toEqual([
      { namespace: 'shop', serviceAccount: 'client', trustDomain: 'c2.cluster.local' },
      { namespace: 'shop', serviceAccount: 'web', trustDomain: 'c2.cluster.local' },
      { namespace: 'app', serviceAccount: 'api' },
    ]);
    const cfg = renderProxyConfig(policy, { outboundPort: 15001, inboundPort: 15003 });
    expect(cfg.access['app/web']!.find((r) => r.target === 'app/from-c2')!.sources).toEqual(['app/api', 'spiffe://c2.cluster.local/ns/shop/sa/client', 'spiffe://c2.cluster.local/ns/shop/sa/web']);
  });

  test.each([
    [{ kind: 'SpiffeID', name: 'spiffe://c2.cluster.local/ns/shop' }, 'spec.sources[0].name'],
    [{ kind: 'SpiffeID', name: 'spiffe://c2.cluster.local/ns/shop/sa/x', namespace: 'shop' }, 'spec.sources[0].kind'],
    [{ kind: 'ServiceAccount', name: 'web', trustDomain: 'C2_cluster' }, 'spec.sources[0].trustDomain'],
    [{ kind: 'ServiceAccount', name: 'Web!' }, 'spec.sources[0].name'],
  ])('a bad source %j is reported with its field %s and the target left out', (source, field) => {
    const t = target('bad-src', 'web', ['db'], [{ kind: 'HTTPRouteGroup', name: 'routes' }]) as unknown as { spec: { sources: unknown[] } };
    t.spec.sources = [source];
    const c = compiled([...smiMesh(), t as never]);
    expect(c.get('node-a')!.policy.access.map((x) => x.name)).not.toContain('bad-src');
    expect(c.reporter.active()).toEqual([expect.objectContaining({ ref: { kind: 'TrafficTarget', namespace: 'app', name: 'bad-src' }, field })]);
  });

  test('permissive mode ignores targets and lists every mesh service', () => {
    const c = compiled(smiMesh().filter((o) => o.kind !== 'ConfigMap'));
    expect(c.get('node-a')!.policy.access).toEqual([]);
    expect(c.get('node-a')!.policy.services.map((s) => s.name)).toEqual(['api', 'db', 'web']);
  });
});
