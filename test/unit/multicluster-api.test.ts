import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { InvalidInputError } from '../../src/errors.js';
import { parseClusterSet, parseGlobalTrafficPolicy, parseServiceExport } from '../../src/multicluster/api.js';
import { allocate, inCidr, loadAllocations, parseCidr4, saveAllocations } from '../../src/multicluster/ipam.js';
import { mergeAll, mergeExports, type ClusterExport } from '../../src/multicluster/merge.js';
import { tiersFor } from '../../src/multicluster/tiers.js';

const exp = (cluster: string, exportTime: number, over: Partial<ClusterExport> = {}): ClusterExport => ({
  cluster,
  namespace: 'shop',
  name: 'web',
  type: 'ClusterSetIP',
  ports: [{ name: 'http', protocol: 'TCP', appProtocol: null, port: 80 }],
  sessionAffinity: 'None',
  exportTime,
  readyEndpoints: 2,
  gateways: [],
  generation: 1,
  ...over,
});

function invalid(fn: () => unknown): InvalidInputError {
  try {
    fn();
  } catch (err) {
    if (err instanceof InvalidInputError) return err;
    throw err;
  }
  throw new Error('expected an InvalidInputError');
}

describe('MCS-API objects', () => {
  test('a ServiceExport is read with its creation time', () => {
    const r = parseServiceExport({
      apiVersion: 'multicluster.x-k8s.io/v1alpha1',
      kind: 'ServiceExport',
      metadata: { namespace: 'shop', name: 'web', creationTimestamp: '2026-01-02T03:04:05Z' },
    });
    expect(r).toEqual({ namespace: 'shop', name: 'web', createdMs: Date.parse('2026-01-02T03:04:05Z') });
  });

  test('bad input names the field and the value', () => {
    const e = invalid(() => parseServiceExport({ apiVersion: 'multicluster.x-k8s.io/v1alpha1', kind: 'ServiceExport', metadata: { namespace: 'Shop!', name: 'web' } }));
    expect(e.field).toBe('ServiceExport.metadata.namespace');
    expect(e.value).toBe('Shop!');
    const w = invalid(() => parseServiceExport({ apiVersion: 'multicluster.x-k8s.io/v1beta9', kind: 'ServiceExport', metadata: { namespace: 's', name: 'w' } }));
    expect(w.field).toBe('ServiceExport.apiVersion');
  });

  test('GlobalTrafficPolicy: defaults, duplicate failover entries, all-zero weights', () => {
    const base = { apiVersion: 'multicluster.fsm-node.io/v1alpha1', kind: 'GlobalTrafficPolicy', metadata: { namespace: 'shop', name: 'web' } };
    expect(parseGlobalTrafficPolicy({ ...base, spec: {} }).spec).toEqual({ mode: 'Locality', weights: {}, failOver: [] });
    expect(invalid(() => parseGlobalTrafficPolicy({ ...base, spec: { mode: 'FailOver', failOver: ['c1', 'c1'] } })).field).toBe('GlobalTrafficPolicy.spec.failOver[1]');
    expect(invalid(() => parseGlobalTrafficPolicy({ ...base, spec: { mode: 'ActiveActive', weights: { c1: 0, c2: 0 } } })).field).toBe('GlobalTrafficPolicy.spec.weights');
    expect(invalid(() => parseGlobalTrafficPolicy({ ...base, spec: { mode: 'Nearest' } })).field).toBe('GlobalTrafficPolicy.spec.mode');
  });

  test('ClusterSet: peers must be other clusters over https, lease parsed', () => {
    const spec = { clusterId: 'c1', caFile: '/ca', certFile: '/c', keyFile: '/k', peers: [{ clusterId: 'c2', url: 'https://10.0.0.2:15444' }] };
    const cs = (s: object) => parseClusterSet({ apiVersion: 'multicluster.fsm-node.io/v1alpha1', kind: 'ClusterSet', spec: { ...spec, ...s } });
    expect(cs({}).leaseMs).toBe(24 * 3600_000);
    expect(cs({ lease: '90s' }).leaseMs).toBe(90_000);
    expect(invalid(() => cs({ peers: [{ clusterId: 'c1', url: 'https://x:1' }] })).field).toBe('ClusterSet.spec.peers[0].clusterId');
    expect(invalid(() => cs({ peers: [{ clusterId: 'c2', url: 'http://x:1' }] })).field).toBe('ClusterSet.spec.peers[0].url');
    expect(invalid(() => cs({ lease: 'forever' })).field).toBe('ClusterSet.spec.lease');
    expect(invalid(() => cs({ clustersetCidr: '241.0.0.0/33' })).field).toBe('ClusterSet.spec.clustersetCidr');
  });
});

describe('KEP-1645 merge rules', () => {
  test('ports are merged as a union, sorted by port', () => {
    const m = mergeExports([
      exp('c2', 20, { ports: [{ name: 'grpc', protocol: 'TCP', appProtocol: null, port: 9090 }] }),
      exp('c1', 10),
    ]);
    expect(m.ports.map((p) => `${p.name}:${p.port}`)).toEqual(['http:80', 'grpc:9090']);
    expect(m.conflict.status).toBe('False');
    expect(m.clusters).toEqual(['c1', 'c2']);
  });

  test('a conflicting port definition goes to the oldest export, and says so', () => {
    const m = mergeExports([exp('c1', 30, { ports: [{ name: 'http', protocol: 'TCP', appProtocol: null, port: 8080 }] }), exp('c2', 10)]);
    expect(m.ports).toEqual([{ name: 'http', protocol: 'TCP', appProtocol: null, port: 80 }]);
    expect(m.conflict).toMatchObject({ status: 'True', reason: 'PortConflict' });
    expect(m.conflict.message).toContain('cluster c2 has the oldest export and wins');
    // Two names for one port number: the older name stays.
    const n = mergeExports([exp('c1', 10), exp('c2', 20, { ports: [{ name: 'web', protocol: 'TCP', appProtocol: null, port: 80 }] })]);
    expect(n.ports.map((p) => p.name)).toEqual(['http']);
    expect(n.conflict.reason).toBe('PortConflict');
  });

  test('type and session affinity: oldest wins; ties by cluster id; order of input irrelevant', () => {
    const a = exp('c1', 10, { type: 'Headless' });
    const b = exp('c2', 10, { sessionAffinity: 'ClientIP' });
    const m1 = mergeExports([a, b]);
    const m2 = mergeExports([b, a]);
    expect(m1).toEqual(m2);
    expect(m1.type).toBe('Headless');
    expect(m1.sessionAffinity).toBe('None');
    expect(m1.conflict.reason).toBe('MultipleConflicts');
  });

  test('mergeAll groups by service', () => {
    const all = mergeAll([exp('c1', 1), exp('c2', 2), exp('c1', 1, { name: 'api' })]);
    expect(all.map((m) => `${m.namespace}/${m.name}:${m.clusters.join(',')}`)).toEqual(['shop/api:c1', 'shop/web:c1,c2']);
  });
});

describe('ClusterSetIP allocation', () => {
  const cidr = parseCidr4('241.0.0.0/29'); // 6 usable addresses

  test('addresses stay inside the CIDR, skip network and broadcast, are unique and independent of input order', () => {
    const keys = ['a/1', 'a/2', 'a/3', 'a/4', 'a/5', 'a/6'];
    const one = allocate(keys, cidr, {});
    const two = allocate([...keys].reverse(), cidr, {});
    expect(one).toEqual(two);
    const ips = Object.values(one.ips);
    expect(new Set(ips).size).toBe(6);
    for (const ip of ips) expect(inCidr(ip, cidr)).toBe(true);
    expect(ips).not.toContain('241.0.0.0');
    expect(ips).not.toContain('241.0.0.7');
  });

  test('a kept address survives new neighbours; the CIDR full is reported, not wrapped over', () => {
    const first = allocate(['a/1'], cidr, {});
    const later = allocate(['a/0', 'a/1', 'a/2'], cidr, first.ips);
    expect(later.ips['a/1']).toBe(first.ips['a/1']);
    const full = allocate(['1', '2', '3', '4', '5', '6', '7'], cidr, {});
    expect(full.exhausted).toHaveLength(1);
    // An address outside a changed CIDR is replaced.
    expect(inCidr(allocate(['a/1'], parseCidr4('242.0.0.0/24'), first.ips).ips['a/1']!, parseCidr4('242.0.0.0/24'))).toBe(true);
  });

  test('stable across restarts: the table is saved and read back', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsmn-ipam-'));
    try {
      const path = join(dir, 'clusterset-ips.json');
      expect(await loadAllocations(path)).toEqual({});
      const big = parseCidr4('241.0.0.0/16');
      const a = allocate(['shop/web', 'shop/api'], big, {});
      await saveAllocations(path, a.ips);
      // After a restart, with a new import that might hash onto the same address, old ones are kept.
      const b = allocate(['shop/web', 'shop/api', 'x/y'], big, await loadAllocations(path));
      expect(b.ips['shop/web']).toBe(a.ips['shop/web']);
      expect(b.ips['shop/api']).toBe(a.ips['shop/api']);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('bad CIDRs name the field', () => {
    expect(invalid(() => parseCidr4('241.0.0.0/31')).field).toBe('clustersetCidr');
    expect(invalid(() => parseCidr4('300.0.0.0/16')).value).toBe('300.0.0.0/16');
  });
});

describe('traffic tiers', () => {
  test('no policy: every exporter, one tier', () => {
    expect(tiersFor(undefined, 'c2', ['c2', 'c1'])).toEqual([[{ cluster: 'c1', weight: 1 }, { cluster: 'c2', weight: 1 }]]);
  });
  test('Locality: local only, nothing when the local cluster does not export', () => {
    const spec = { mode: 'Locality' as const, weights: {}, failOver: [] };
    expect(tiersFor(spec, 'c2', ['c1', 'c2'])).toEqual([[{ cluster: 'c2', weight: 1 }]]);
    expect(tiersFor(spec, 'c3', ['c1', 'c2'])).toEqual([]);
  });
  test('ActiveActive: weights, 0 leaves a cluster out', () => {
    const spec = { mode: 'ActiveActive' as const, weights: { c1: 3, c3: 0 }, failOver: [] };
    expect(tiersFor(spec, 'c2', ['c1', 'c2', 'c3'])).toEqual([[{ cluster: 'c1', weight: 3 }, { cluster: 'c2', weight: 1 }]]);
  });
  test('FailOver: local, then the stated order, then the rest by id', () => {
    const spec = { mode: 'FailOver' as const, weights: {}, failOver: ['c4', 'c9'] };
    expect(tiersFor(spec, 'c2', ['c1', 'c2', 'c3', 'c4']).map((t) => t[0]!.cluster)).toEqual(['c2', 'c4', 'c1', 'c3']);
  });
});

describe('exports protocol', () => {
  test('a delta carries what changed and applies to the whole next document; a drifted base is refused', async () => {
    const { exportsDocument, exportsDelta, applyExportsDelta } = await import('../../src/multicluster/protocol.js');
    const a = exportsDocument('c1', [exp('c1', 1), exp('c1', 1, { name: 'api' })]);
    const b = exportsDocument('c1', [exp('c1', 1, { readyEndpoints: 0, generation: 2 }), exp('c1', 1, { name: 'db' })]);
    const d = exportsDelta(a, b);
    expect(d.set.map((e) => e.name)).toEqual(['db', 'web']);
    expect(d.remove).toEqual(['shop/api']);
    expect(applyExportsDelta(a, d)).toEqual(b);
    expect(applyExportsDelta(b, d)).toBeUndefined();
    expect(applyExportsDelta(a, { ...d, count: 5 })).toBeUndefined();
  });
});
