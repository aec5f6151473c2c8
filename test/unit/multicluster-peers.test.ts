import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { Agent, request } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MulticlusterController } from '../../src/multicluster/controller.js';
import { createClustersetCa, issueClusterIdentity } from '../../src/multicluster/identity.js';
import type { PolicyCompiler } from '../../src/policy/compiler.js';
import { compiled, namespace, node, pod, service, slice, type Obj } from './policy-fixtures.js';
import { policyServerFixture } from './policy-server-fixture.js';

/**
 * The control path between two clusters' controllers, for real: mutual TLS
 * with certificates of one clusterset CA, the long-poll, the merge into the
 * compiler's imports, the lease; and the attacks a peer or a stranger can try.
 */

type Pem = { certPem: string; keyPem: string };

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

function get(url: string, id: Pem | undefined, ca: string, headers: Record<string, string> = {}): Promise<{ status: number; body: string }> {
  const agent = new Agent({ ...(id ? { cert: id.certPem, key: id.keyPem } : {}), ca, checkServerIdentity: () => undefined, keepAlive: false });
  return new Promise((resolve, reject) => {
    const req = request(url, { agent, headers }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

async function until<T>(what: string, fn: () => T | undefined | false, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const svcExport = (name: string, ns = 'shop', created = '2026-01-01T00:00:00Z') =>
  `apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata:\n  name: ${name}\n  namespace: ${ns}\n  creationTimestamp: "${created}"\n`;

function clusterObjects(prefix: string, ready: number): Obj[] {
  return [
    namespace('shop'),
    node('n1', `${prefix}.1`, { 'multicluster.fsm-node.io/gateway': 'true' }),
    node('n2', `${prefix}.2`, { 'multicluster.fsm-node.io/gateway': 'true' }),
    ...Array.from({ length: ready }, (_, i) => pod(`web-${i + 1}`, { ns: 'shop', node: 'n1', ip: `10.${prefix.split('.')[2]}.0.${i + 2}`, sa: 'web' })),
    service('web', { ns: 'shop', clusterIP: '172.16.0.20' }),
  ];
}

interface Cluster {
  id: string;
  compiler: PolicyCompiler;
  mc: MulticlusterController;
  dir: string;
  recompiles: number;
}

describe('multicluster control path (mutual TLS between controllers)', () => {
  let ca: Pem;
  const ids: Record<string, Pem> = {};
  let foreign: Pem;
  const made: Cluster[] = [];
  const dirs: string[] = [];

  beforeAll(async () => {
    ca = await createClustersetCa();
    for (const c of ['c1', 'c2', 'c3']) ids[c] = await issueClusterIdentity(ca, c);
    foreign = await issueClusterIdentity(await createClustersetCa('another clusterset'), 'c2');
  });

  afterEach(async () => {
    for (const c of made.splice(0)) await c.mc.stop();
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });

  async function cluster(id: string, port: number, peers: { id: string; port: number }[], objs: Obj[], o: { lease?: string; now?: () => number; dir?: string; exportsYaml?: string } = {}): Promise<Cluster> {
    const dir = o.dir ?? mkdtempSync(join(tmpdir(), `fsmn-mc-${id}-`));
    if (!o.dir) dirs.push(dir);
    writeFileSync(join(dir, 'exports.yaml'), o.exportsYaml ?? svcExport('web'));
    const compiler = compiled(objs);
    const c: Cluster = { id, compiler, dir, recompiles: 0, mc: undefined as unknown as MulticlusterController };
    const config = {
      clusterId: id,
      listen: `127.0.0.1:${port}`,
      peers: peers.map((p) => ({ clusterId: p.id, url: `https://127.0.0.1:${p.port}` })),
      caFile: '-',
      certFile: '-',
      keyFile: '-',
      clustersetCidr: '241.0.0.0/16',
      lease: o.lease ?? '24h',
      leaseMs: o.lease === '2s' ? 2000 : 24 * 3600_000,
      gatewayPort: 15005,
    };
    c.mc = await MulticlusterController.start(
      { config, compiler, stateDir: join(dir, 'state'), objectsDir: dir, tls: { ca: ca.certPem, cert: ids[id]!.certPem, key: ids[id]!.keyPem }, pollMs: 50, peerWaitMs: 1000, now: o.now },
      () => {
        c.recompiles++;
        compiler.compile();
        if (c.mc.refresh()) compiler.compile();
      },
    );
    if (c.mc.refresh()) compiler.compile();
    made.push(c);
    return c;
  }

  const importsOf = (c: Cluster) => c.compiler.get('n1')?.policy.multicluster?.imports ?? [];

  test('each imports the other: merged ports, a ClusterSetIP, tiers with the remote gateways; no pod address crosses', async () => {
    const [p1, p2] = [await freePort(), await freePort()];
    const c1 = await cluster('c1', p1, [{ id: 'c2', port: p2 }], clusterObjects('192.168.1', 2));
    const c2 = await cluster('c2', p2, [{ id: 'c1', port: p1 }], clusterObjects('192.168.2', 1));
    const imp = await until('c2 to import web from c1', () => importsOf(c2).find((i) => i.tiers.flat().some((m) => m.cluster === 'c1')));
    expect(imp).toMatchObject({ namespace: 'shop', name: 'web', type: 'ClusterSetIP', ports: [{ name: 'http', port: 80, protocol: 'TCP' }] });
    expect(imp.ips).toHaveLength(1);
    expect(imp.ips[0]).toMatch(/^241\.0\./);
    // No policy: the MCS default, both clusters in one tier.
    expect(imp.tiers).toEqual([
      [
        { cluster: 'c1', weight: 1, local: false, gateways: ['192.168.1.1:15005', '192.168.1.2:15005'], readyEndpoints: 2 },
        { cluster: 'c2', weight: 1, local: true, gateways: [], readyEndpoints: 1 },
      ],
    ]);
    await until('c1 to import from c2', () => importsOf(c1).find((i) => i.tiers.flat().some((m) => m.cluster === 'c2')));
    // What crossed: the exports document as c2 holds it. No pod address in it.
    const doc = JSON.stringify(c2.mc.peers[0]!.state.doc);
    expect(doc).not.toMatch(/10\.1\.0\./);
    expect(c2.mc.status().peers[0]).toMatchObject({ cluster: 'c1', exports: 1, error: null, leaseExpired: false });
  });

  test('a GlobalTrafficPolicy and a change of ready endpoints reach the other cluster by long-poll', async () => {
    const [p1, p2] = [await freePort(), await freePort()];
    const c1 = await cluster('c1', p1, [{ id: 'c2', port: p2 }], clusterObjects('192.168.1', 2));
    const c2 = await cluster('c2', p2, [{ id: 'c1', port: p1 }], clusterObjects('192.168.2', 1));
    writeFileSync(join(c2.dir, 'policy.yaml'), 'apiVersion: multicluster.fsm-node.io/v1alpha1\nkind: GlobalTrafficPolicy\nmetadata: {name: web, namespace: shop}\nspec: {mode: FailOver, failOver: [c1]}\n');
    await until('FailOver tiers', () => importsOf(c2)[0]?.tiers.length === 2 && importsOf(c2)[0]!.tiers[1]![0]!.cluster === 'c1');
    expect(importsOf(c2)[0]!.tiers.map((t) => t.map((m) => m.cluster))).toEqual([['c2'], ['c1']]);
    // c1 loses a pod: c2 learns the new count within a long-poll.
    c1.compiler.remove({ kind: 'Pod', namespace: 'shop', name: 'web-2' });
    c1.compiler.compile();
    c1.mc.refresh();
    await until('ready count 1 at c2', () => importsOf(c2)[0]?.tiers[1]?.[0]?.readyEndpoints === 1);
    // A bad document in the objects directory keeps the last good set.
    writeFileSync(join(c2.dir, 'policy.yaml'), 'apiVersion: multicluster.fsm-node.io/v1alpha1\nkind: GlobalTrafficPolicy\nmetadata: {name: web, namespace: shop}\nspec: {mode: Nearest}\n');
    await new Promise((r) => setTimeout(r, 300));
    expect(importsOf(c2)[0]!.tiers).toHaveLength(2);
  });

  test('a silent peer keeps its imports for the lease, then they go; it comes back at once when it answers', async () => {
    let now = Date.now();
    const [p1, p2] = [await freePort(), await freePort()];
    const c1dir = mkdtempSync(join(tmpdir(), 'fsmn-mc-c1-'));
    dirs.push(c1dir);
    let c1 = await cluster('c1', p1, [{ id: 'c2', port: p2 }], clusterObjects('192.168.1', 2), { dir: c1dir });
    const c2 = await cluster('c2', p2, [{ id: 'c1', port: p1 }], clusterObjects('192.168.2', 1), { lease: '2s', now: () => now });
    await until('c2 imports from c1', () => importsOf(c2)[0]?.tiers.flat().some((m) => m.cluster === 'c1'));
    const ip = importsOf(c2)[0]!.ips[0];
    await c1.mc.stop(); // c1's controller dies
    made.splice(made.indexOf(c1), 1);
    now += 1500; // within the lease
    await new Promise((r) => setTimeout(r, 400));
    expect(importsOf(c2)[0]!.tiers.flat().map((m) => m.cluster)).toContain('c1');
    expect(c2.mc.status().peers[0]!.error).not.toBeNull();
    now += 2500; // past it, even counted from the 304 c1 sent while closing
    await until('c1 gone from c2', () => !importsOf(c2)[0]?.tiers.flat().some((m) => m.cluster === 'c1'));
    expect(importsOf(c2)[0]!.ips[0]).toBe(ip); // c2 still exports web itself: same address
    c1 = await cluster('c1', p1, [{ id: 'c2', port: p2 }], clusterObjects('192.168.1', 2), { dir: c1dir });
    await until('c1 back', () => importsOf(c2)[0]?.tiers.flat().some((m) => m.cluster === 'c1'), 15_000);
  });

  test('attacks: a foreign CA fails the handshake; a non-peer member gets 403; a peer reads exports and nothing else', async () => {
    const [p1, p2] = [await freePort(), await freePort()];
    await cluster('c1', p1, [{ id: 'c2', port: p2 }], clusterObjects('192.168.1', 2));
    const url = `https://127.0.0.1:${p1}`;
    // Foreign CA (claims to be c2): TLS refuses it before any HTTP.
    await expect(get(`${url}/v1/clusterset/exports`, foreign, ca.certPem)).rejects.toThrow();
    // No client certificate at all.
    await expect(get(`${url}/v1/clusterset/exports`, undefined, ca.certPem)).rejects.toThrow();
    // A member of the clusterset that is not c1's peer.
    expect((await get(`${url}/v1/clusterset/exports`, ids.c3, ca.certPem)).status).toBe(403);
    // The peer: exports yes, and the document holds nothing but exports.
    const ok = await get(`${url}/v1/clusterset/exports`, ids.c2, ca.certPem);
    expect(ok.status).toBe(200);
    expect(Object.keys(JSON.parse(ok.body) as object).sort()).toEqual(['apiVersion', 'cluster', 'exports', 'kind', 'version']);
    // The peer asking for a node's policy, its identities, or to post status: not served here.
    for (const path of ['/v1/nodes/n1/policy', '/v1/nodes/n1/identities', '/v1/nodes/n1/identities/batch', '/metrics', '/v1/clusterset/exports/../../v1/nodes/n1/policy']) {
      expect((await get(`${url}${path}`, ids.c2, ca.certPem)).status).toBe(404);
    }
  });

  test('attack: a peer certificate at the node policy API is no credential', async () => {
    const f = await policyServerFixture('fsmn-mc-policy-');
    try {
      f.publish(namespace('shop'), node('node-a', '192.168.1.1'), pod('web-1', { ns: 'shop' }), service('web', { ns: 'shop' }), slice('web', [{ ip: '10.0.0.1' }], { ns: 'shop' }));
      f.hub.setReady();
      const addr = await f.server.listen({ host: '127.0.0.1', port: 0 });
      const r = await get(`${addr}/v1/nodes/node-a/policy`, ids.c2, f.tls.caCert);
      expect(r.status).toBe(401);
    } finally {
      await f.close();
    }
  });

  test('the peer client refuses a server that is not the cluster it meant to reach', async () => {
    // c2 thinks c1 is at p1, but c3 listens there (a member of the clusterset, the wrong one).
    const [p1, p2] = [await freePort(), await freePort()];
    await cluster('c3', p1, [{ id: 'c2', port: p2 }], clusterObjects('192.168.3', 1));
    const c2 = await cluster('c2', p2, [{ id: 'c1', port: p1 }], clusterObjects('192.168.2', 1));
    await until('an error', () => c2.mc.peers[0]!.state.error);
    expect(c2.mc.peers[0]!.state.error).toMatch(/does not name cluster c1/);
    expect(importsOf(c2)[0]!.tiers.flat().map((m) => m.cluster)).toEqual(['c2']);
  });

  test('ClusterSetIPs are the same after a controller restart', async () => {
    const p = await freePort();
    const dir = mkdtempSync(join(tmpdir(), 'fsmn-mc-r-'));
    dirs.push(dir);
    const objs = [...clusterObjects('192.168.1', 1), service('api', { ns: 'shop', clusterIP: '172.16.0.21' })];
    const a = await cluster('c1', p, [], objs, { dir, exportsYaml: svcExport('web') + '---\n' + svcExport('api') });
    await until('two imports', () => importsOf(a).length === 2);
    const before = importsOf(a).map((i) => i.ips[0]);
    await a.mc.stop();
    made.splice(made.indexOf(a), 1);
    await new Promise((r) => setTimeout(r, 100));
    // Restarted with the exports listed the other way round and a third import first.
    const b = await cluster('c1', p, [], [...objs, service('aaa', { ns: 'shop', clusterIP: '172.16.0.22' })], { dir, exportsYaml: svcExport('aaa') + '---\n' + svcExport('api') + '---\n' + svcExport('web') });
    await until('three imports', () => importsOf(b).length === 3);
    expect(importsOf(b).filter((i) => i.name !== 'aaa').map((i) => i.ips[0])).toEqual(before);
  });
});
