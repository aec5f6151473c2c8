import { InvalidInputError } from '../../src/errors.js';
import {
  identityDnsName,
  identityKey,
  parseIdentityDnsName,
  parseSpiffeId,
  spiffeId,
  validateIdentity,
  validateTrustDomain,
} from '../../src/identity/spiffe.js';

const id = { namespace: 'demo', serviceAccount: 'web' };

describe('SPIFFE identity names', () => {
  test('an identity round-trips through its SPIFFE ID and its DNS form', () => {
    expect(spiffeId('cluster.local', id)).toBe('spiffe://cluster.local/ns/demo/sa/web');
    expect(parseSpiffeId('spiffe://cluster.local/ns/demo/sa/web')).toEqual({ trustDomain: 'cluster.local', identity: id });
    expect(identityDnsName('cluster.local', id)).toBe('web.demo.sa.cluster.local');
    expect(parseIdentityDnsName('web.demo.sa.cluster.local', 'cluster.local')).toEqual(id);
    expect(identityKey(id)).toBe('demo/web');
  });

  test('a service account with dots parses back: the namespace is one label', () => {
    const dotted = { namespace: 'ns1', serviceAccount: 'a.b.sa.c' };
    const dns = identityDnsName('example.org', dotted);
    expect(dns).toBe('a.b.sa.c.ns1.sa.example.org');
    expect(parseIdentityDnsName(dns, 'example.org')).toEqual(dotted);
  });

  test('strict parsing names the field and the value', () => {
    const bad = [
      'spiffe://cluster.local/ns/demo/sa/web/extra',
      'spiffe://cluster.local/ns/demo',
      'http://cluster.local/ns/demo/sa/web',
      'spiffe://Cluster.local/ns/demo/sa/web',
      'spiffe://cluster.local/ns/Demo/sa/web',
      'spiffe://cluster.local/ns/demo/sa/',
      'spiffe://td_x/ns/demo/sa/web',
    ];
    for (const u of bad) expect(() => parseSpiffeId(u)).toThrow(InvalidInputError);
    expect(() => parseSpiffeId('spiffe://other.td/ns/demo/sa/web', 'cluster.local')).toThrow(/belongs to trust domain other.td, not cluster.local/);
    expect(() => parseIdentityDnsName('web.demo.sa.other', 'cluster.local')).toThrow(/invalid dnsName "web.demo.sa.other": does not end in .sa.cluster.local/);
    expect(() => parseIdentityDnsName('demo.sa.cluster.local', 'cluster.local')).toThrow(InvalidInputError);
    expect(() => parseIdentityDnsName('.demo.sa.cluster.local', 'cluster.local')).toThrow(InvalidInputError);
  });

  test('trust domains and identities are validated', () => {
    expect(validateTrustDomain('cluster.local')).toBe('cluster.local');
    for (const td of ['', 'UPPER.case', 'under_score', 'a..b', '-a.b', 'a'.repeat(64)]) {
      expect(() => validateTrustDomain(td)).toThrow(/invalid trustDomain/);
    }
    expect(() => validateIdentity({ namespace: 'a.b', serviceAccount: 'x' })).toThrow(/invalid identity.namespace "a.b"/);
    expect(() => validateIdentity({ namespace: 'a', serviceAccount: 'X' })).toThrow(/invalid identity.serviceAccount "X"/);
    const long = { namespace: 'n'.repeat(63), serviceAccount: 's'.repeat(63) + '.' + 's'.repeat(63) + '.' + 's'.repeat(63) };
    expect(() => identityDnsName('cluster.local', long)).toThrow(/longer than 253/);
  });
});
