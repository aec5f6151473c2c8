import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { generateTokens, writeTokensFile } from '../../src/controller/auth.js';
import { runController, type RunningController } from '../../src/controller/main.js';
import { InvalidInputError } from '../../src/errors.js';
import { createClustersetCa, issueClusterIdentity } from '../../src/multicluster/identity.js';
import { PolicyClient, type PolicyEvent } from '../../src/policy/client.js';
import { namespace, node, pod, service } from './policy-fixtures.js';

/**
 * `fsm-node controller --clusterset FILE`, two of them: the ClusterSet file
 * and the PEM files it names (relative to it), ServiceExports in the default
 * multicluster directory beside the manifests, and an agent's policy client
 * receiving the imports in its node's policy.
 */

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

let dir: string;
const running: RunningController[] = [];
let client: PolicyClient | undefined;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'fsmt-mc-ctrl-'));
});
afterEach(async () => {
  await client?.stop();
  client = undefined;
  for (const c of running.splice(0)) await c.close();
  rmSync(dir, { recursive: true, force: true });
});

async function cluster(id: string, port: number, peer: { id: string; port: number }, ca: { certPem: string; keyPem: string }, prefix: string): Promise<{ ctrl: RunningController; tokens: Record<string, string> }> {
  const root = join(dir, id);
  mkdirSync(join(root, 'manifests'), { recursive: true });
  mkdirSync(join(root, 'multicluster'));
  writeFileSync(
    join(root, 'manifests', 'mesh.yaml'),
    [namespace('shop'), node('n1', `${prefix}.1`, { 'multicluster.fsm-node.io/gateway': 'true' }), pod('web-1', { ns: 'shop', node: 'n1', ip: `10.${prefix.split('.')[2]}.0.5` }), service('web', { ns: 'shop' })]
      .map((o) => stringify(o))
      .join('---\n'),
  );
  writeFileSync(join(root, 'multicluster', 'web.yaml'), 'apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: web, namespace: shop}\n');
  const idPem = await issueClusterIdentity(ca, id);
  writeFileSync(join(root, 'ca.crt'), ca.certPem);
  writeFileSync(join(root, 'cluster.crt'), idPem.certPem);
  writeFileSync(join(root, 'cluster.key'), idPem.keyPem);
  writeFileSync(
    join(root, 'clusterset.yaml'),
    stringify({
      apiVersion: 'multicluster.fsm-node.io/v1alpha1',
      kind: 'ClusterSet',
      spec: { clusterId: id, listen: `127.0.0.1:${port}`, peers: [{ clusterId: peer.id, url: `https://127.0.0.1:${peer.port}` }], caFile: 'ca.crt', certFile: 'cluster.crt', keyFile: 'cluster.key' },
    }),
  );
  const tokens = generateTokens(['n1']);
  await writeTokensFile(join(root, 'tokens.json'), tokens);
  const ctrl = await runController({ manifests: join(root, 'manifests'), tokens: join(root, 'tokens.json'), listen: '127.0.0.1:0', stateDir: join(root, 'state'), clusterset: join(root, 'clusterset.yaml') });
  running.push(ctrl);
  return { ctrl, tokens };
}

describe('controller --clusterset', () => {
  test("an agent of c2 receives web's import with c1's gateway in its node policy", async () => {
    const ca = await createClustersetCa();
    const [p1, p2] = [await freePort(), await freePort()];
    await cluster('c1', p1, { id: 'c2', port: p2 }, ca, '192.168.1');
    const c2 = await cluster('c2', p2, { id: 'c1', port: p1 }, ca, '192.168.2');
    client = new PolicyClient({ url: c2.ctrl.url, node: 'n1', ca: c2.ctrl.caCert, token: c2.tokens.n1!, stateDir: join(dir, 'agent'), backoff: { initialMs: 20, maxMs: 100 } });
    const imported = new Promise<PolicyEvent>((resolve) => {
      client!.on('policy', (e: PolicyEvent) => {
        if (e.policy.multicluster?.imports[0]?.tiers.flat().some((m) => m.cluster === 'c1')) resolve(e);
      });
    });
    mkdirSync(join(dir, 'agent'));
    client.start();
    const e = await imported;
    const imp = e.policy.multicluster!.imports[0]!;
    expect(imp).toMatchObject({ namespace: 'shop', name: 'web', type: 'ClusterSetIP' });
    expect(imp.ips[0]).toMatch(/^241\.0\./);
    expect(imp.tiers.flat().find((m) => m.cluster === 'c1')).toMatchObject({ local: false, gateways: ['192.168.1.1:15005'], readyEndpoints: 1 });
    expect(e.policy.multicluster!.gatewayPort).toBe(15005);
  });

  test('a bad ClusterSet file is refused naming the file and the field', async () => {
    mkdirSync(join(dir, 'm'));
    writeFileSync(join(dir, 'cs.yaml'), 'apiVersion: multicluster.fsm-node.io/v1alpha1\nkind: ClusterSet\nspec: {clusterId: C1, caFile: a, certFile: b, keyFile: c}\n');
    const tokens = generateTokens(['n1']);
    await writeTokensFile(join(dir, 'tokens.json'), tokens);
    const err = await runController({ manifests: join(dir, 'm'), tokens: join(dir, 'tokens.json'), listen: '127.0.0.1:0', stateDir: join(dir, 'state'), clusterset: join(dir, 'cs.yaml') }).catch((x: unknown) => x);
    expect(err).toBeInstanceOf(InvalidInputError);
    expect((err as InvalidInputError).field).toBe(`--clusterset ${join(dir, 'cs.yaml')}: ClusterSet.spec.clusterId`);
  });
});
