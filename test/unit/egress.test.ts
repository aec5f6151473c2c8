import { toEgress } from '../../src/egress/objects.js';
import { egressHostMatches, renderEgressRules } from '../../src/egress/render.js';
import type { Kind } from '../../src/policy/objects.js';
import { NodePolicySchema } from '../../src/policy/schema.js';
import { renderProxyConfig } from '../../src/proxy/config.js';
import { baseMesh, compiled, type Obj } from './policy-fixtures.js';

const egress = (spec: Record<string, unknown>, name = 'e'): Obj => ({
  apiVersion: 'policy.flomesh.io/v1alpha1',
  kind: 'Egress',
  metadata: { name, namespace: 'app' },
  spec: { sources: [{ kind: 'ServiceAccount', name: 'web', namespace: 'app' }], ports: [{ number: 443, protocol: 'https' }], ...spec },
});

describe('FSM Egress', () => {
  test('read as FSM writes it: hosts lower-cased, "tls" is https, ipAddresses as CIDRs', () => {
    expect(toEgress(egress({ hosts: ['API.example.com'], ipAddresses: ['10.0.0.0/8'], ports: [{ number: 443, protocol: 'TLS' }, { number: 80, protocol: 'http' }] }))).toEqual({
      namespace: 'app',
      name: 'e',
      sources: [{ namespace: 'app', serviceAccount: 'web' }],
      hosts: ['api.example.com'],
      ipAddresses: ['10.0.0.0/8'],
      ports: [
        { number: 443, protocol: 'https' },
        { number: 80, protocol: 'http' },
      ],
    });
  });

  test.each([
    [{ ports: [{ number: 80, protocol: 'udp' }] }, 'spec.ports[0].protocol'],
    [{ ipAddresses: ['10.0.0.300/8'] }, 'spec.ipAddresses[0]'],
    [{ matches: [{ kind: 'HTTPRouteGroup', name: 'x' }] }, 'spec.matches'],
    [{ sources: [{ kind: 'ServiceAccount', name: 'web', namespace: 'app', mtls: { issuer: 'x' } }] }, 'spec.sources[0].mtls'],
    [{ ports: [{ number: 80, protocol: 'http' }, { number: 80, protocol: 'tcp' }] }, 'spec.ports[1].number'],
    [{ hosts: ['bad host'] }, 'spec.hosts[0]'],
  ])('refused with the field named: %j', (spec, field) => {
    expect(() => toEgress(egress(spec))).toThrow(expect.objectContaining({ field }));
  });

  test('host patterns: exact, or "*." covering subdomains only', () => {
    expect(egressHostMatches('*.example.com', 'a.b.example.com')).toBe(true);
    expect(egressHostMatches('*.example.com', 'example.com')).toBe(false);
    expect(egressHostMatches('api.example.com', 'api.example.com')).toBe(true);
  });

  test('compiled into every policy (absent without Egresses) and rendered per local source identity and port', () => {
    const c = compiled([...baseMesh(), egress({ hosts: ['api.example.com'] }), egress({ ipAddresses: ['192.0.2.0/24'], ports: [{ number: 5432, protocol: 'tcp' }] }, 'db')]);
    const p = c.get('node-a')!.policy;
    expect(NodePolicySchema.safeParse(p).success).toBe(true);
    expect(p.egressPolicies!.map((e) => e.name)).toEqual(['db', 'e']);
    // web runs on node-a: its rules are there; node-b has no pod of app/web.
    expect(renderProxyConfig(p, { outboundPort: 15001, inboundPort: 15003 }).egressRules).toEqual({
      'app/web': {
        '443': [{ egress: 'app/e', protocol: 'https', hosts: ['api.example.com'], cidrs: [] }],
        '5432': [{ egress: 'app/db', protocol: 'tcp', hosts: [], cidrs: ['192.0.2.0/24'] }],
      },
    });
    expect(renderProxyConfig(c.get('node-b')!.policy, { outboundPort: 15001, inboundPort: 15003 }).egressRules).toEqual({});
    expect(renderEgressRules(undefined, ['app/web'])).toEqual({});
    c.remove({ kind: 'Egress' as Kind, namespace: 'app', name: 'e' });
    c.remove({ kind: 'Egress' as Kind, namespace: 'app', name: 'db' });
    c.compile();
    expect('egressPolicies' in c.get('node-a')!.policy).toBe(false);
  });
});
