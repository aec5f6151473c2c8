import { CONTROLLER_NAME } from '../../src/gateway/objects.js';
import type { GatewayResolution } from '../../src/gateway/resolve.js';
import { gatewayStatusPatches, type StatusPatch } from '../../src/gateway/status.js';
import { GatewayStatusWriter, type StatusApi } from '../../src/gateway/status-writer.js';

const ok = (type: string) => ({ type, status: 'True' as const, reason: type, message: '' });
const resolution = (accepted = true): GatewayResolution => ({
  ingress: { gateways: [] },
  classes: [{ name: 'fsm', generation: 1, conditions: [ok('Accepted')] }],
  gateways: [{ namespace: 'edge', name: 'gw', generation: 4, conditions: [ok('Accepted'), ok('Programmed')], listeners: [{ name: 'http', attachedRoutes: 1, supportedKinds: [{ group: 'gateway.networking.k8s.io', kind: 'HTTPRoute' }], conditions: [ok('Accepted')] }] }],
  routes: [
    {
      namespace: 'app',
      name: 'r',
      generation: 7,
      parents: [
        {
          parentRef: { group: 'gateway.networking.k8s.io', kind: 'Gateway', namespace: 'edge', name: 'gw', sectionName: null, port: null },
          controllerName: CONTROLLER_NAME,
          conditions: [accepted ? ok('Accepted') : { type: 'Accepted', status: 'False', reason: 'NotAllowedByListeners', message: 'no' }, ok('ResolvedRefs')],
        },
      ],
    },
  ],
});

describe('Gateway API status written back (cluster mode)', () => {
  const t0 = new Date('2026-01-01T00:00:00Z');
  const t1 = new Date('2026-01-01T00:01:00Z');

  test('conditions carry observedGeneration; nothing is written when nothing changed; lastTransitionTime moves only on a flip', () => {
    const first = gatewayStatusPatches(resolution(), () => undefined, t0, CONTROLLER_NAME);
    expect(first.map((p) => `${p.kind} ${p.namespace}/${p.name}`)).toEqual(['GatewayClass /fsm', 'Gateway edge/gw', 'HTTPRoute app/r']);
    const held = new Map(first.map((p) => [`${p.kind}/${p.namespace}/${p.name}`, { status: p.status }]));
    const current = (k: string, ns: string, n: string) => held.get(`${k}/${ns}/${n}`);
    expect(gatewayStatusPatches(resolution(), current, t1, CONTROLLER_NAME)).toEqual([]);
    const flipped = gatewayStatusPatches(resolution(false), current, t1, CONTROLLER_NAME);
    expect(flipped.map((p) => p.kind)).toEqual(['HTTPRoute']);
    const conds = (flipped[0]!.status.parents as { conditions: { type: string; lastTransitionTime: string; observedGeneration: number; reason: string }[] }[])[0]!.conditions;
    expect(conds.map((c) => [c.type, c.reason, c.lastTransitionTime, c.observedGeneration])).toEqual([
      ['Accepted', 'NotAllowedByListeners', t1.toISOString(), 7],
      ['ResolvedRefs', 'ResolvedRefs', t0.toISOString(), 7],
    ]);
  });

  test('an HTTPRoute keeps the parents other controllers wrote', () => {
    const other = { parentRef: { name: 'theirs' }, controllerName: 'example.com/other', conditions: [] };
    const [route] = gatewayStatusPatches(resolution(), (k) => (k === 'HTTPRoute' ? { status: { parents: [other] } } : undefined), t0, CONTROLLER_NAME).filter((p) => p.kind === 'HTTPRoute');
    expect((route!.status.parents as unknown[])[0]).toEqual(other);
    expect((route!.status.parents as unknown[]).length).toBe(2);
  });

  test('a route that names none of our Gateways any more loses our entries and keeps the others\'; one never ours is not written', () => {
    const other = { parentRef: { name: 'theirs' }, controllerName: 'example.com/other', conditions: [] };
    const ours = { parentRef: { group: 'gateway.networking.k8s.io', kind: 'Gateway', namespace: 'edge', name: 'gw' }, controllerName: CONTROLLER_NAME, conditions: [] };
    const gone: GatewayResolution = { ...resolution(), routes: [{ namespace: 'app', name: 'r', generation: 8, parents: [] }] };
    const held = (parents: unknown[]) => (k: string) => (k === 'HTTPRoute' ? { status: { parents } } : undefined);
    const routePatches = (parents: unknown[]) => gatewayStatusPatches(gone, held(parents), t0, CONTROLLER_NAME).filter((p) => p.kind === 'HTTPRoute');
    expect(routePatches([other, ours]).map((p) => p.status)).toEqual([{ parents: [other] }]);
    expect(routePatches([other])).toEqual([]);
    expect(gatewayStatusPatches(gone, () => undefined, t0, CONTROLLER_NAME).filter((p) => p.kind === 'HTTPRoute')).toEqual([]);
  });

  test('the writer patches status subresources (cluster-scoped and namespaced), logs failures and goes on', async () => {
    const calls: string[] = [];
    const api: StatusApi = {
      patchClusterCustomObjectStatus: async (p) => void calls.push(`cluster ${p.plural}/${p.name}`),
      patchNamespacedCustomObjectStatus: async (p) => {
        calls.push(`ns ${p.namespace}/${p.plural}/${p.name}`);
        if (p.plural === 'gateways') throw new Error('conflict');
      },
    };
    const w = new GatewayStatusWriter(api, { merge: true }, CONTROLLER_NAME, () => t0);
    w.update(resolution(), () => undefined);
    await w.idle();
    expect(calls).toEqual(['cluster gatewayclasses/fsm', 'ns edge/gateways/gw', 'ns app/httproutes/r']);
  });

  test('patches name the Gateway API group and version', () => {
    const p: StatusPatch = gatewayStatusPatches(resolution(), () => undefined, t0, CONTROLLER_NAME)[1]!;
    expect([p.group, p.version, p.plural]).toEqual(['gateway.networking.k8s.io', 'v1', 'gateways']);
  });
});
