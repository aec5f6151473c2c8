import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { clustersetCommand } from '../../src/cli/commands/clusterset.js';
import { InvalidInputError } from '../../src/errors.js';
import { peerClusterOf } from '../../src/multicluster/identity.js';
import { renderMulticluster } from '../../src/multicluster/proxy-config.js';
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
