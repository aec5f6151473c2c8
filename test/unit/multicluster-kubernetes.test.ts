import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MulticlusterController } from '../../src/multicluster/controller.js';
import { createClustersetCa, issueClusterIdentity } from '../../src/multicluster/identity.js';
import { MulticlusterKubernetes } from '../../src/multicluster/kubernetes.js';
import { eventually } from '../support/eventually.js';
import { TestApiServer, type Obj } from '../support/k8s-api-server.js';
import { compiled, namespace, node, pod, service, slice } from './policy-fixtures.js';

/**
 * Kubernetes mode of the clusterset member against the project's test API
 * server: the real client-node informers read ServiceExports and
 * GlobalTrafficPolicies; ServiceImports and ServiceExport conditions are
 * written back through the API.
 */

let api: TestApiServer;
let dir: string;
let mc: MulticlusterController | undefined;
let k8s: MulticlusterKubernetes | undefined;

beforeEach(async () => {
  api = await TestApiServer.start();
  dir = mkdtempSync(join(tmpdir(), 'fsmt-mc-k8s-'));
});
afterEach(async () => {
  await k8s?.stop();
  await mc?.stop();
  k8s = undefined;
  mc = undefined;
  await api.close();
  rmSync(dir, { recursive: true, force: true });
});

const exportObj = (name: string, ns = 'shop'): Obj => ({ apiVersion: 'multicluster.x-k8s.io/v1alpha1', kind: 'ServiceExport', metadata: { name, namespace: ns } }) as Obj;

async function start(): Promise<void> {
  const compiler = compiled([namespace('shop'), node('n1', '10.0.0.1', { 'multicluster.fsm-node.io/gateway': 'true' }), pod('web-1', { ns: 'shop', node: 'n1', ip: '10.1.0.5' }), service('web', { ns: 'shop' }), slice('web', [{ ip: '10.1.0.5', node: 'n1', pod: 'web-1' }], { ns: 'shop' })]);
  const ca = await createClustersetCa();
  const id = await issueClusterIdentity(ca, 'c1');
  const config = { clusterId: 'c1', listen: '127.0.0.1:0', peers: [], caFile: '-', certFile: '-', keyFile: '-', clustersetCidr: '241.0.0.0/16', lease: '24h', leaseMs: 24 * 3600_000, gatewayPort: 15005 };
  k8s = new MulticlusterKubernetes(api.kubeConfig(), () => mc, { initialMs: 50, maxMs: 200 });
  const recompile = () => {
    compiler.compile();
    if (mc?.refresh()) compiler.compile();
  };
  mc = await MulticlusterController.start(
    { config, compiler, stateDir: join(dir, 'state'), tls: { ca: ca.certPem, cert: id.certPem, key: id.keyPem }, pollMs: 50, onStatus: (s) => k8s!.onStatus(s) },
    recompile,
  );
  await k8s.start();
  recompile();
}

const conditions = (name: string) => ((api.get('ServiceExport', 'shop', name) as { status?: { conditions?: { type: string; status: string; reason: string }[] } } | undefined)?.status?.conditions ?? []).map((c) => `${c.type}=${c.status}/${c.reason}`);
const imports = () => api.list('ServiceImport').map((o) => `${o.metadata.namespace}/${o.metadata.name}`);

test('a ServiceExport makes a ServiceImport with its clusterset IP, and gets its Valid condition; a missing Service is Valid=False', async () => {
  api.create(exportObj('web'));
  api.create(exportObj('ghost'));
  await start();
  expect(await eventually(async () => imports(), (v) => v.length === 1)).toEqual(['shop/web']);
  const si = api.get('ServiceImport', 'shop', 'web') as unknown as { spec: { type: string; ips: string[]; ports: { port: number }[] }; status: { clusters: { cluster: string }[] }; metadata: { labels: Record<string, string> } };
  expect(si.spec.type).toBe('ClusterSetIP');
  expect(si.spec.ips[0]).toMatch(/^241\.0\./);
  expect(si.status.clusters).toEqual([{ cluster: 'c1' }]);
  expect(si.metadata.labels['app.kubernetes.io/managed-by']).toBe('fsm-node');
  expect(await eventually(async () => conditions('web'), (v) => v.length > 1)).toEqual(['Valid=True/FewGateways', 'Conflict=False/NoConflicts']);
  expect(await eventually(async () => conditions('ghost'), (v) => v.length > 0)).toEqual(['Valid=False/ServiceNotFound']);
});

test('the watch follows: a new export adds its import, a deleted one removes it; ServiceImports not ours are left alone', async () => {
  api.create({ apiVersion: 'multicluster.x-k8s.io/v1alpha1', kind: 'ServiceImport', metadata: { name: 'theirs', namespace: 'shop' }, spec: { type: 'ClusterSetIP' } } as Obj);
  await start();
  expect(imports()).toEqual(['shop/theirs']);
  api.create(exportObj('web'));
  expect(await eventually(async () => imports().sort(), (v) => v.length === 2)).toEqual(['shop/theirs', 'shop/web']);
  api.remove('ServiceExport', 'shop', 'web');
  expect(await eventually(async () => imports(), (v) => v.length === 1)).toEqual(['shop/theirs']);
});

test('a bad GlobalTrafficPolicy is left out with the rest applied; a good one changes nothing the export writes', async () => {
  api.create(exportObj('web'));
  api.create({ apiVersion: 'multicluster.fsm-node.io/v1alpha1', kind: 'GlobalTrafficPolicy', metadata: { name: 'web', namespace: 'shop' }, spec: { mode: 'Sideways' } } as Obj);
  await start();
  expect(await eventually(async () => imports(), (v) => v.length === 1)).toEqual(['shop/web']);
  api.update({ apiVersion: 'multicluster.fsm-node.io/v1alpha1', kind: 'GlobalTrafficPolicy', metadata: { name: 'web', namespace: 'shop' }, spec: { mode: 'Locality' } } as Obj);
  const tiers = await eventually(async () => mc!.status().imports[0]?.tiers ?? [], (v) => v.length === 1);
  expect(tiers).toEqual([['c1:1']]);
});
