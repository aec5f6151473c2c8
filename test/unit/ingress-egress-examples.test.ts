import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parseAllDocuments } from 'yaml';
import { renderManifests } from '../../src/lab/manifests.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import { isKind, type Kind } from '../../src/policy/objects.js';

/**
 * docs/ingress-egress.md's manifests (docs/examples/ingress-egress/) stay
 * valid: with the lab's own manifests they compile without an issue, the
 * Gateway is accepted with both listeners, the route attaches to both, and
 * the Egresses are carried.
 */

const dir = fileURLToPath(new URL('../../docs/examples/ingress-egress/', import.meta.url));
const load = (text: string) => parseAllDocuments(text).map((d) => d.toJS() as { kind: string; metadata: { name: string } });

test('the docs example Gateway, HTTPRoute, access rules and Egresses compile against the lab', () => {
  const lab = renderManifests({
    mode: 'auto',
    nodes: [{ name: 'n1', address: '10.78.0.1' }, { name: 'n2', address: '10.78.0.2' }],
    pods: ['p1', 'p2', 'p3', 'p4'].map((name, i) => ({ name, node: i < 2 ? 'n1' : 'n2', ip: `10.77.${i < 2 ? 1 : 2}.${(i % 2) + 2}`, cgroupPath: `/x/${name}`, version: i % 2 ? ('v2' as const) : ('v1' as const) })),
  });
  const secret = { apiVersion: 'v1', kind: 'Secret', metadata: { name: 'shop-cert', namespace: 'edge' }, type: 'kubernetes.io/tls', data: { 'tls.crt': Buffer.from('-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n').toString('base64'), 'tls.key': Buffer.from('-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n').toString('base64') } };
  const objects = [...[...lab.values()].flatMap(load), ...['gateway.yaml', 'access.yaml', 'egress.yaml'].flatMap((f) => load(readFileSync(`${dir}${f}`, 'utf8'))), secret];
  const c = new PolicyCompiler();
  for (const o of objects) {
    expect(isKind(o.kind)).toBe(true);
    expect({ object: `${o.kind} ${o.metadata.name}`, accepted: c.upsert(o.kind as Kind, o) }).toEqual({ object: `${o.kind} ${o.metadata.name}`, accepted: true });
  }
  c.compile();
  expect(c.reporter.active()).toEqual([]);
  const s = c.gatewayStatus()!;
  const listeners = Object.fromEntries(s.gateways.flatMap((g) => g.listeners.map((l) => [`${g.name}/${l.name}`, `${l.attachedRoutes} routes, Programmed=${l.conditions.find((x) => x.type === 'Programmed')!.status}`])));
  expect(listeners).toEqual({ 'edge-gw/http': '1 routes, Programmed=True', 'edge-gw/shop': '1 routes, Programmed=True' });
  expect(s.routes.map((r) => r.parents.map((p) => p.conditions.map((x) => `${x.type}=${x.status}`).join(',')))).toEqual([['Accepted=True,ResolvedRefs=True']]);
  const policy = c.get('n1')!.policy;
  expect(policy.egressPolicies!.map((e) => e.name)).toEqual(['p1-to-outside', 'p2-to-outside-tcp']);
  expect(policy.access.filter((a) => a.sources.some((x) => x.namespace === 'edge')).length).toBe(2);
});
