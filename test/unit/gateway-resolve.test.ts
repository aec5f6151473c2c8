import { CONTROLLER_NAME } from '../../src/gateway/objects.js';
import { gatewayProblems, MAX_PROBLEMS } from '../../src/gateway/problems.js';
import { gatewayIdentities, gatewaySummary, renderGateways } from '../../src/gateway/render.js';
import { renderStatus } from '../../src/cli/commands/status.js';
import type { Condition } from '../../src/gateway/resolve.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import type { Kind } from '../../src/policy/objects.js';
import { NodePolicySchema } from '../../src/policy/schema.js';
import { baseMesh, compiled, namespace, node, type Obj } from './policy-fixtures.js';

/**
 * Gateway API objects through the real compiler: attachment, references and
 * status with the spec's reasons (the behaviours of the upstream conformance
 * tests GatewayClassObservedGenerationBump, GatewayInvalidRouteKind,
 * GatewaySecretMissingReferenceGrant / ReferenceGrantSpecific,
 * HTTPRouteCrossNamespace, HTTPRouteInvalidCrossNamespaceBackendRef,
 * HTTPRouteInvalidNonExistentBackendRef, HTTPRouteInvalidCrossNamespaceParentRef,
 * HTTPRouteHostnameIntersection, HTTPRouteListenerHostnameMatching), and the
 * ingress part every node's policy carries.
 */

const G = 'gateway.networking.k8s.io/v1';
const up = (c: PolicyCompiler, o: Obj) => c.upsert(o.kind as Kind, o);
const gatewayClass = (name = 'fsm', controllerName = CONTROLLER_NAME): Obj => ({ apiVersion: G, kind: 'GatewayClass', metadata: { name, generation: 1 }, spec: { controllerName } });
const gateway = (name: string, listeners: unknown[], o: { ns?: string; className?: string; annotations?: Record<string, string> } = {}): Obj => ({
  apiVersion: G,
  kind: 'Gateway',
  metadata: { name, namespace: o.ns ?? 'edge', generation: 2, annotations: o.annotations ?? {} },
  spec: { gatewayClassName: o.className ?? 'fsm', listeners },
});
const route = (name: string, spec: Record<string, unknown>, ns = 'app', created = '2024-01-01T00:00:00Z'): Obj => ({
  apiVersion: G,
  kind: 'HTTPRoute',
  metadata: { name, namespace: ns, generation: 3, creationTimestamp: created },
  spec,
});
const grant = (ns: string, from: { kind: string; namespace: string }, to: { kind: string; group?: string; name?: string }): Obj => ({
  apiVersion: 'gateway.networking.k8s.io/v1beta1',
  kind: 'ReferenceGrant',
  metadata: { name: `allow-${from.namespace}`, namespace: ns },
  spec: { from: [{ group: 'gateway.networking.k8s.io', ...from }], to: [{ group: to.group ?? '', kind: to.kind, ...(to.name ? { name: to.name } : {}) }] },
});
const tlsSecret = (name: string, ns = 'edge', type = 'kubernetes.io/tls'): Obj => ({
  apiVersion: 'v1',
  kind: 'Secret',
  metadata: { name, namespace: ns },
  type,
  data: { 'tls.crt': Buffer.from('-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n').toString('base64'), 'tls.key': Buffer.from('-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n').toString('base64') },
});
const http = (name = 'http', port = 80, extra: Record<string, unknown> = {}) => ({ name, port, protocol: 'HTTP', allowedRoutes: { namespaces: { from: 'All' } }, ...extra });
const toWeb = { backendRefs: [{ name: 'web', port: 80 }] };

const status = (c: PolicyCompiler) => c.gatewayStatus()!;
const conds = (list: Condition[]) => Object.fromEntries(list.map((x) => [x.type, `${x.status}/${x.reason}`]));
const routeParents = (c: PolicyCompiler, name: string) => status(c).routes.find((r) => r.name === name)?.parents.map((p) => conds(p.conditions));
const listener = (c: PolicyCompiler, gw: string, name: string) => {
  const l = status(c).gateways.find((g) => g.name === gw)!.listeners.find((x) => x.name === name)!;
  return { attached: l.attachedRoutes, ...conds(l.conditions) } as Record<string, string | number>;
};

describe('Gateway API resolution', () => {
  test('only classes of our controllerName; their Gateways are accepted and programmed on every node', () => {
    const c = compiled([...baseMesh(), gatewayClass(), gatewayClass('other', 'example.com/other'), gateway('gw', [http()]), gateway('foreign', [http('h', 81)], { className: 'other' }), route('r', { parentRefs: [{ name: 'gw', namespace: 'edge' }], rules: [toWeb] })]);
    expect(status(c).classes.map((x) => [x.name, conds(x.conditions).Accepted])).toEqual([['fsm', 'True/Accepted']]);
    expect(status(c).gateways.map((g) => [g.name, conds(g.conditions)])).toEqual([['gw', { Accepted: 'True/Accepted', Programmed: 'True/Programmed' }]]);
    expect(listener(c, 'gw', 'http')).toEqual({ attached: 1, Accepted: 'True/Accepted', Conflicted: 'False/NoConflicts', ResolvedRefs: 'True/ResolvedRefs', Programmed: 'True/Programmed' });
    expect(routeParents(c, 'r')).toEqual([{ Accepted: 'True/Accepted', ResolvedRefs: 'True/ResolvedRefs' }]);
    for (const n of ['node-a', 'node-b']) {
      const p = c.get(n)!.policy;
      expect(NodePolicySchema.safeParse(p).success).toBe(true);
      expect(p.ingress!.gateways.map((g) => `${g.namespace}/${g.name}:${g.ports.map((x) => x.port).join(',')}`)).toEqual(['edge/gw:80']);
    }
    // The web endpoint resolved, with its node and identity: the proxy tunnels to it from node-b.
    const rule = c.get('node-a')!.policy.ingress!.gateways[0]!.ports[0]!.rules[0]!;
    expect(rule.backends).toEqual([{ service: 'app/web', port: 80, weight: 1, problem: null, endpoints: [{ ip: '10.0.0.1', port: 8080, node: 'node-a', identity: 'app/web' }] }]);
  });

  test('without Gateways the policy has no ingress member (versions of existing meshes do not change)', () => {
    const c = compiled(baseMesh());
    expect('ingress' in c.get('node-a')!.policy).toBe(false);
  });

  test('allowedRoutes Same refuses a route of another namespace (NotAllowedByListeners); a missing section is NoMatchingParent', () => {
    const c = compiled([
      ...baseMesh(),
      gatewayClass(),
      gateway('gw', [{ name: 'same', port: 80, protocol: 'HTTP' }]),
      route('r', { parentRefs: [{ name: 'gw', namespace: 'edge' }], rules: [toWeb] }),
      route('s', { parentRefs: [{ name: 'gw', namespace: 'edge', sectionName: 'nope' }], rules: [toWeb] }),
    ]);
    expect(routeParents(c, 'r')).toEqual([{ Accepted: 'False/NotAllowedByListeners', ResolvedRefs: 'True/ResolvedRefs' }]);
    expect(routeParents(c, 's')![0]!.Accepted).toBe('False/NoMatchingParent');
    expect(listener(c, 'gw', 'same').attached).toBe(0);
    // Manifest mode has no status subresource: the refusals are issues (a log line, an Event in a cluster).
    expect(c.reporter.active().map((i) => `${i.ref.kind} ${i.ref.name} ${i.field}`).sort()).toEqual(['HTTPRoute r spec.parentRefs', 'HTTPRoute s spec.parentRefs']);
    c.remove({ kind: 'HTTPRoute', namespace: 'app', name: 'r' });
    c.compile();
    expect(c.reporter.active().map((i) => i.ref.name)).toEqual(['s']);
  });

  test('namespace selectors read the namespace labels', () => {
    const labelled = { ...namespace('app'), metadata: { name: 'app', labels: { 'flomesh.io/monitored-by': 'fsm', expose: 'yes' } } };
    const c = compiled([...baseMesh(), labelled, gatewayClass(), gateway('gw', [{ name: 'sel', port: 80, protocol: 'HTTP', allowedRoutes: { namespaces: { from: 'Selector', selector: { matchLabels: { expose: 'yes' } } } } }]), route('r', { parentRefs: [{ name: 'gw', namespace: 'edge' }], rules: [toWeb] })]);
    expect(routeParents(c, 'r')![0]!.Accepted).toBe('True/Accepted');
    up(c, { ...labelled, metadata: { name: 'app', labels: { 'flomesh.io/monitored-by': 'fsm' } } });
    c.compile();
    expect(routeParents(c, 'r')![0]!.Accepted).toBe('False/NotAllowedByListeners');
  });

  test('hostnames: no intersection is NoMatchingListenerHostname; matches are bucketed per intersected hostname, most specific first', () => {
    const c = compiled([
      ...baseMesh(),
      gatewayClass(),
      gateway('gw', [http('wild', 80, { hostname: '*.example.com' })]),
      route('miss', { parentRefs: [{ name: 'gw', namespace: 'edge' }], hostnames: ['example.net'], rules: [toWeb] }),
      route('hit', { parentRefs: [{ name: 'gw', namespace: 'edge' }], hostnames: ['a.example.com', 'example.net'], rules: [toWeb] }),
      route('any', { parentRefs: [{ name: 'gw', namespace: 'edge' }], rules: [toWeb] }),
    ]);
    expect(routeParents(c, 'miss')![0]!.Accepted).toBe('False/NoMatchingListenerHostname');
    expect(routeParents(c, 'hit')![0]!.Accepted).toBe('True/Accepted');
    expect(c.get('node-a')!.policy.ingress!.gateways[0]!.ports[0]!.hosts.map((h) => h.hostname)).toEqual(['a.example.com', '*.example.com']);
  });

  test('backend references: missing Service, cross-namespace without and with a ReferenceGrant (ResolvedRefs, 500 for that share)', () => {
    const objs = [
      ...baseMesh(),
      gatewayClass(),
      gateway('gw', [http()]),
      route('missing', { parentRefs: [{ name: 'gw', namespace: 'edge' }], rules: [{ backendRefs: [{ name: 'nope', port: 80 }] }] }, 'app'),
      route('cross', { parentRefs: [{ name: 'gw', namespace: 'edge' }], rules: [{ matches: [{ path: { type: 'PathPrefix', value: '/x' } }], backendRefs: [{ name: 'web', namespace: 'app', port: 80 }] }] }, 'edge'),
    ];
    const c = compiled(objs);
    expect(routeParents(c, 'missing')).toEqual([{ Accepted: 'True/Accepted', ResolvedRefs: 'False/BackendNotFound' }]);
    expect(routeParents(c, 'cross')).toEqual([{ Accepted: 'True/Accepted', ResolvedRefs: 'False/RefNotPermitted' }]);
    const rules = c.get('node-a')!.policy.ingress!.gateways[0]!.ports[0]!.rules;
    expect(rules.map((r) => [r.route, r.backends[0]!.problem !== null])).toEqual([
      ['app/missing', true],
      ['edge/cross', true],
    ]);
    up(c, grant('app', { kind: 'HTTPRoute', namespace: 'edge' }, { kind: 'Service', name: 'web' }));
    c.compile();
    expect(routeParents(c, 'cross')).toEqual([{ Accepted: 'True/Accepted', ResolvedRefs: 'True/ResolvedRefs' }]);
  });

  test('HTTPS: certificate Secrets resolve (or say why), cross-namespace only with a grant; no certificate, no listener', () => {
    const https = (refs: unknown[]) => ({ name: 'https', port: 443, protocol: 'HTTPS', hostname: 'a.example.com', tls: { certificateRefs: refs }, allowedRoutes: { namespaces: { from: 'All' } } });
    const c = compiled([...baseMesh(), gatewayClass(), gateway('gw', [http(), https([{ name: 'cert' }])]), route('r', { parentRefs: [{ name: 'gw', namespace: 'edge' }], rules: [toWeb] })]);
    expect(listener(c, 'gw', 'https')).toMatchObject({ Accepted: 'True/Accepted', ResolvedRefs: 'False/InvalidCertificateRef', Programmed: 'False/Invalid' });
    expect(c.get('node-a')!.policy.ingress!.gateways[0]!.ports.map((p) => p.port)).toEqual([80]);
    up(c, tlsSecret('cert'));
    c.compile();
    expect(listener(c, 'gw', 'https')).toMatchObject({ attached: 1, ResolvedRefs: 'True/ResolvedRefs', Programmed: 'True/Programmed' });
    const port = c.get('node-a')!.policy.ingress!.gateways[0]!.ports.find((p) => p.port === 443)!;
    expect(port.certificates.map((x) => [x.hostname, x.secret])).toEqual([['a.example.com', 'edge/cert']]);

    up(c, gateway('gw', [http(), https([{ name: 'cert', namespace: 'certs' }])]));
    up(c, tlsSecret('cert', 'certs'));
    c.compile();
    expect(listener(c, 'gw', 'https').ResolvedRefs).toBe('False/RefNotPermitted');
    up(c, grant('certs', { kind: 'Gateway', namespace: 'edge' }, { kind: 'Secret' }));
    c.compile();
    expect(listener(c, 'gw', 'https').ResolvedRefs).toBe('True/ResolvedRefs');
    up(c, tlsSecret('cert', 'certs', 'Opaque'));
    c.compile();
    expect(status(c).gateways[0]!.listeners[1]!.conditions.find((x) => x.type === 'ResolvedRefs')!.message).toMatch(/Secret certs\/cert: type is "Opaque"/);
  });

  test('conflicts: two protocols on one port; two Gateways on one port on the same nodes (the older keeps it)', () => {
    const c = compiled([
      ...baseMesh(),
      gatewayClass(),
      gateway('gw', [http('a', 80), { name: 'b', port: 80, protocol: 'TCP' }]),
      { ...gateway('old', [http('h', 8080)]), metadata: { name: 'old', namespace: 'edge', creationTimestamp: '2024-01-01T00:00:00Z' } },
      { ...gateway('new', [http('h', 8080)]), metadata: { name: 'new', namespace: 'edge', creationTimestamp: '2024-02-01T00:00:00Z' } },
    ]);
    expect(listener(c, 'gw', 'a').Conflicted).toBe('True/ProtocolConflict');
    expect(listener(c, 'gw', 'b').Accepted).toBe('False/UnsupportedProtocol');
    expect(conds(status(c).gateways.find((g) => g.name === 'gw')!.conditions).Accepted).toBe('False/ListenersNotValid');
    expect(listener(c, 'old', 'h').Accepted).toBe('True/Accepted');
    expect(listener(c, 'new', 'h').Accepted).toBe('False/PortUnavailable');
  });

  test('a node selector narrows where a Gateway is served; its identity certificates are wanted only there', () => {
    const c = compiled([...baseMesh(), node('node-a', '192.168.1.10', { edge: 'yes' }), gatewayClass(), gateway('gw', [http()], { annotations: { 'gateway.fsm-node.io/node-selector': 'edge=yes', 'gateway.fsm-node.io/service-account': 'ingress' } })]);
    expect(c.get('node-a')!.policy.ingress!.gateways[0]!.nodes).toEqual(['node-a']);
    expect(gatewayIdentities(c.get('node-a')!.policy)).toEqual([{ namespace: 'edge', serviceAccount: 'ingress' }]);
    expect(gatewayIdentities(c.get('node-b')!.policy)).toEqual([]);
    expect(renderGateways(c.get('node-b')!.policy, 15003, {})).toEqual([]);
    expect(renderGateways(c.get('node-a')!.policy, 15003, {}).map((g) => [g.gateway, g.identity])).toEqual([['edge/gw', 'edge/ingress']]);
    // fsm-node status on node-a names the Gateway, its ports and identity.
    expect(renderStatus({ node: 'node-a', ready: true, gateways: gatewaySummary(c.get('node-a')!.policy) })).toMatch(/gateway edge\/gw +:80 HTTP \(0 rules; hosts none\) as edge\/ingress/);
  });

  test('a route moved to another backend changes the policy of every node; the rest of the mesh is untouched', () => {
    const c = compiled([...baseMesh(), gatewayClass(), gateway('gw', [http()]), route('r', { parentRefs: [{ name: 'gw', namespace: 'edge' }], rules: [toWeb] })]);
    const before = c.get('node-a')!.policy;
    up(c, route('r', { parentRefs: [{ name: 'gw', namespace: 'edge' }], rules: [{ backendRefs: [{ name: 'db', port: 80 }] }] }));
    expect(c.compile().changed.sort()).toEqual(['node-a', 'node-b']);
    const after = c.get('node-a')!.policy;
    expect(after.ingress!.gateways[0]!.ports[0]!.rules[0]!.backends[0]!.service).toBe('app/db');
    expect(after.services).toEqual(before.services);
  });

  test('a malformed route is reported with its field and its last good version keeps serving', () => {
    const c = compiled([...baseMesh(), gatewayClass(), gateway('gw', [http()]), route('r', { parentRefs: [{ name: 'gw', namespace: 'edge' }], rules: [toWeb] })]);
    expect(up(c, route('r', { parentRefs: [{ name: 'gw', namespace: 'edge' }], rules: [{ matches: [{ path: { type: 'RegularExpression', value: '(' } }] }] }))).toBe(false);
    c.compile();
    expect(c.reporter.active()).toEqual([expect.objectContaining({ field: 'spec.rules[0].matches[0].path.value', keptLastGood: true })]);
    expect(c.get('node-a')!.policy.ingress!.gateways[0]!.ports[0]!.rules[0]!.backends[0]!.service).toBe('app/web');
  });

  test('problems: every unhealthy condition travels in every node\'s policy and fsm-node status shows it; fixed, they are gone', () => {
    const toGw = (section: string) => ({ parentRefs: [{ name: 'gw', namespace: 'edge', sectionName: section }] });
    const c = compiled([
      ...baseMesh(),
      gatewayClass(),
      gateway('gw', [http(), { name: 'tcp', port: 9000, protocol: 'TCP' }]),
      // A Gateway with no valid listener is served nowhere, but still reported.
      gateway('broken', [{ name: 'udp', port: 9001, protocol: 'UDP' }]),
      route('good', { ...toGw('http'), rules: [toWeb] }),
      route('missing', { ...toGw('http'), rules: [{ backendRefs: [{ name: 'nope', port: 80 }] }] }),
      route('lost', { ...toGw('no-such-listener'), rules: [toWeb] }),
    ]);
    const policy = c.get('node-b')!.policy;
    expect(NodePolicySchema.safeParse(policy).success).toBe(true);
    expect(policy.ingress!.gateways.map((g) => g.name)).toEqual(['gw']);
    expect(policy.ingress!.problems!.map((p) => `${p.object}: ${p.type} ${p.status} ${p.reason}`)).toEqual([
      'Gateway edge/broken: Accepted False ListenersNotValid',
      'Gateway edge/broken: Programmed False Invalid',
      'Gateway edge/broken listener udp: Accepted False UnsupportedProtocol',
      'Gateway edge/gw listener tcp: Accepted False UnsupportedProtocol',
      'HTTPRoute app/lost on edge/gw/no-such-listener: Accepted False NoMatchingParent',
      'HTTPRoute app/missing on edge/gw/http: ResolvedRefs False BackendNotFound',
    ]);
    expect(c.get('node-a')!.policy.ingress!.problems).toEqual(policy.ingress!.problems);
    const text = renderStatus({ node: 'node-b', ready: true, gateways: gatewaySummary(policy), gatewayProblems: policy.ingress!.problems });
    expect(text).toMatch(/gateway problem +HTTPRoute app\/missing on edge\/gw\/http: ResolvedRefs False BackendNotFound \(.*app\/nope.*\)/);

    for (const o of [route('missing', { ...toGw('http'), rules: [toWeb] }), route('lost', { ...toGw('http'), rules: [toWeb] }), gateway('gw', [http()])]) up(c, o);
    c.remove({ kind: 'Gateway', namespace: 'edge', name: 'broken' });
    c.compile();
    expect('problems' in c.get('node-b')!.policy.ingress!).toBe(false);
  });

  test('problems beyond the cap are counted in one last entry', () => {
    const routes = Array.from({ length: 60 }, (_, i) => ({
      namespace: 'app',
      name: `r${i}`,
      generation: 1,
      parents: [{ parentRef: { group: G, kind: 'Gateway', namespace: 'edge', name: 'gw', sectionName: null, port: null }, controllerName: CONTROLLER_NAME, conditions: [{ type: 'ResolvedRefs', status: 'False' as const, reason: 'BackendNotFound', message: '' }] }],
    }));
    const out = gatewayProblems([], routes);
    expect(out).toHaveLength(MAX_PROBLEMS);
    expect(out[MAX_PROBLEMS - 1]).toMatchObject({ object: `${60 - (MAX_PROBLEMS - 1)} more`, reason: 'Truncated' });
  });
});
