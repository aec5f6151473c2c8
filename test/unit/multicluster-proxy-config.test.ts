import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { clustersetCommand } from '../../src/cli/commands/clusterset.js';
import { InvalidInputError } from '../../src/errors.js';
import { peerClusterOf } from '../../src/multicluster/identity.js';
import { renderClustersetTLS, renderMulticluster } from '../../src/multicluster/proxy-config.js';
import type { MulticlusterPart, PolicyService } from '../../src/policy/schema.js';
import { X509Certificate } from 'node:crypto';

const web: PolicyService = {
  namespace: 'shop',
  name: 'web',
  clusterIPs: ['172.16.0.20'],
  ports: [
    { name: 'http', port: 80, protocol: 'TCP', appProtocol: null },
    { name: 'tcp-db', port: 5432, protocol: 'TCP', appProtocol: null },
  ],
  endpoints: [],
};

const part = (tiers: MulticlusterPart['imports'][0]['tiers']): MulticlusterPart => ({
  cluster: 'c2',
  gatewayPort: 15005,
  imports: [{ namespace: 'shop', name: 'web', type: 'ClusterSetIP', ips: ['241.0.0.9'], ports: web.ports, tiers }],
});

describe('the proxy view of the clusterset', () => {
  test('imports by clusterset IP and port; local members name the local Service; exports by service name', () => {
    const r = renderMulticluster(
      part([
        [{ cluster: 'c2', weight: 1, local: true, gateways: [], readyEndpoints: 1 }],
        [{ cluster: 'c1', weight: 2, local: false, gateways: ['10.0.1.1:15005', '10.0.1.2:15005'], readyEndpoints: 3 }],
      ]),
      [web],
    );
    expect(Object.keys(r.imports).sort()).toEqual(['241.0.0.9:5432', '241.0.0.9:80']);
    expect(r.imports['241.0.0.9:80']).toEqual({
      service: 'shop/web',
      protocol: 'http',
      target: 'web.shop:80',
      tiers: [
        [{ cluster: 'c2', weight: 1, local: '172.16.0.20:80', gateways: [], ready: 1 }],
        [{ cluster: 'c1', weight: 2, local: null, gateways: ['10.0.1.1:15005', '10.0.1.2:15005'], ready: 3 }],
      ],
    });
    expect(r.imports['241.0.0.9:5432']!.protocol).toBe('tcp');
    expect(r.exports).toEqual({ 'web.shop:80': { local: '172.16.0.20:80', protocol: 'http' }, 'web.shop:5432': { local: '172.16.0.20:5432', protocol: 'tcp' } });
  });

  test('members that can carry nothing are left out: a local member without a local Service, a remote one without gateways, weight 0', () => {
    const r = renderMulticluster(
      part([
        [
          { cluster: 'c2', weight: 1, local: true, gateways: [], readyEndpoints: 0 },
          { cluster: 'c3', weight: 0, local: false, gateways: ['10.0.3.1:15005'], readyEndpoints: 1 },
        ],
        [{ cluster: 'c1', weight: 1, local: false, gateways: [], readyEndpoints: 1 }],
      ]),
      [],
    );
    expect(r.imports['241.0.0.9:80']!.tiers).toEqual([]);
    expect(r.exports).toEqual({});
  });
});

describe('gateway mutual TLS settings (renderClustersetTLS)', () => {
  const base = { cluster: 'c1', gatewayPort: 15005, imports: [], peers: ['c2'] };
  const PEM = '-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----';
  test('trust domains of this cluster and its peers; fails closed without the clusterset CA, mesh mTLS or the cluster trust domain', () => {
    const ok = renderClustersetTLS({ ...base, clustersetBundle: [PEM] }, 'c1.cluster.local');
    expect(ok).toMatchObject({ trustDomain: 'c1.cluster.local', trustDomains: { c1: 'c1.cluster.local', c2: 'c2.cluster.local' }, gatewayIdentity: 'fsm-system/fsm-node-gateway', refuse: null });
    expect(renderClustersetTLS(base, 'c1.cluster.local').refuse).toBe('no-clusterset-trust');
    expect(renderClustersetTLS({ ...base, clustersetBundle: [PEM] }, 'cluster.local').refuse).toBe('trust-domain-mismatch');
    expect(renderClustersetTLS({ ...base, clustersetBundle: [PEM] }, null).refuse).toBe('no-mesh-tls');
  });
});

describe('fsm-node clusterset', () => {
  test('init-ca then issue: a cluster identity peers recognise; an existing CA is never overwritten; bad ids are named', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsmn-cs-'));
    const write = process.stdout.write.bind(process.stdout);
    process.stdout.write = (() => true) as typeof process.stdout.write;
    try {
      expect(await clustersetCommand.run({ dir: join(dir, 'ca') }, ['init-ca'])).toBe(0);
      expect(statSync(join(dir, 'ca', 'ca.key')).mode & 0o777).toBe(0o600);
      await expect(clustersetCommand.run({ dir: join(dir, 'ca') }, ['init-ca'])).rejects.toThrow(/refusing to overwrite/);
      expect(await clustersetCommand.run({ cluster: 'c7', 'ca-dir': join(dir, 'ca'), out: join(dir, 'c7') }, ['issue'])).toBe(0);
      const der = new X509Certificate(readFileSync(join(dir, 'c7', 'cluster.crt'))).raw;
      expect(peerClusterOf(der, ['c1', 'c7'])).toBe('c7');
      expect(peerClusterOf(der, ['c1'])).toBeUndefined();
      await expect(clustersetCommand.run({ cluster: 'C_7', 'ca-dir': join(dir, 'ca'), out: dir }, ['issue'])).rejects.toBeInstanceOf(InvalidInputError);
      // The cluster's mesh CA: under the clusterset CA, a CA, name constrained (critical) to c7.cluster.local.
      const meshCa = new X509Certificate(readFileSync(join(dir, 'c7', 'mesh-ca', 'ca.crt')));
      expect(meshCa.ca).toBe(true);
      expect(meshCa.checkIssued(new X509Certificate(readFileSync(join(dir, 'ca', 'ca.crt'))))).toBe(true);
      expect(statSync(join(dir, 'c7', 'mesh-ca', 'ca.key')).mode & 0o777).toBe(0o600);
      expect(readFileSync(join(dir, 'c7', 'mesh-ca', 'trust.crt'), 'utf8')).toBe(readFileSync(join(dir, 'ca', 'ca.crt'), 'utf8'));
      const { X509Certificate: PeculiarCert } = await import('@peculiar/x509');
      const nc = new PeculiarCert(readFileSync(join(dir, 'c7', 'mesh-ca', 'ca.crt'), 'utf8')).getExtension('2.5.29.30');
      expect(nc?.critical).toBe(true);
      expect(Buffer.from(nc!.value).toString('latin1')).toContain('c7.cluster.local');
    } finally {
      process.stdout.write = write;
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('policy deltas carry the multicluster part with the global part', () => {
  test('set, changed and removed between versions', async () => {
    const { applyDelta, deltaPieces } = await import('../../src/policy/delta.js');
    const { NodePolicyDeltaSchema } = await import('../../src/policy/schema.js');
    const { compiled, baseMesh } = await import('./policy-fixtures.js');
    const c = compiled(baseMesh());
    const v0 = c.get('node-a')!;
    const mc = part([[{ cluster: 'c2', weight: 1, local: true, gateways: [], readyEndpoints: 1 }]]);
    const step = (from: typeof v0) => {
      c.compile();
      const to = c.get('node-a')!;
      const [shared, tail] = deltaPieces({ version: from.version, parts: from.parts }, to);
      const delta = NodePolicyDeltaSchema.parse(JSON.parse(`{${shared.text()}${tail}`));
      expect(applyDelta(from.policy, delta)).toEqual(to.policy);
      return to;
    };
    c.setMulticluster(mc);
    const v1 = step(v0);
    expect(v1.policy.multicluster).toEqual(mc);
    c.setMulticluster({ ...mc, gatewayPort: 15006 });
    const v2 = step(v1);
    c.setMulticluster(undefined);
    const v3 = step(v2);
    expect(v3.policy.multicluster).toBeUndefined();
  });
});
