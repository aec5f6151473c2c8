import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CertificatesV1Api, CoreV1Api } from '@kubernetes/client-node';
import { ProviderError } from '../../src/identity/provider.js';
import { BuiltinProvider, meshCaFileStore, meshCaSecretStore } from '../../src/identity/providers/builtin.js';
import { CSR_LABEL, KubernetesCsrProvider, type CsrApi } from '../../src/identity/providers/kubernetes-csr.js';
import { createCsr, createIntermediate, createRoot, generateKeyPair, loadSigner, parseCertificate, parseCsr, signLeaf, verifyChain } from '../../src/identity/x509.js';
import { TestApiServer, type Obj } from '../support/k8s-api-server.js';

const TD = 'cluster.local';
const id = { namespace: 'demo', serviceAccount: 'web' };
const HOUR = 3600_000;
let dir: string;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'fsmt-ca-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

async function request(identity = id) {
  const keys = await generateKeyPair();
  return { keys, csrPem: await createCsr(keys, TD, identity) };
}

describe('built-in CA', () => {
  test('first start generates and stores a root (key 0600); a restart reuses it; issued chains verify against the bundle', async () => {
    const store = meshCaFileStore(dir);
    const p = await BuiltinProvider.start({ store });
    expect(statSync(join(dir, 'ca.key')).mode & 0o777).toBe(0o600);
    const bundle = p.trustBundle();
    expect(bundle).toHaveLength(1);
    expect(parseCertificate(bundle[0]!).isCa).toBe(true);
    const again = await BuiltinProvider.start({ store });
    expect(again.trustBundle()).toEqual(bundle);
    const r = await request();
    const issued = await again.issue({ csrPem: r.csrPem, identity: id, trustDomain: TD, lifetimeMs: HOUR });
    expect(parseCertificate(issued.certChainPem[0]!).identity).toEqual(id);
    expect(await verifyChain(issued.certChainPem, bundle)).toBeUndefined();
    expect(p.describe()).toContain(dir);
  });

  test('generation off and nothing stored: a clear error', async () => {
    await expect(BuiltinProvider.start({ store: meshCaFileStore(dir), generate: false })).rejects.toThrow(/no mesh CA in directory .* and generation is off/);
  });

  test('a user-supplied intermediate signs; the chain carries it; trust.crt holds the root', async () => {
    const root = await createRoot({ commonName: 'corp root', lifetimeMs: 24 * 365 * HOUR });
    const inter = await createIntermediate(await loadSigner(root.certPem, root.keyPem), { commonName: 'mesh intermediate', lifetimeMs: 24 * 30 * HOUR });
    writeFileSync(join(dir, 'ca.crt'), inter.certPem);
    writeFileSync(join(dir, 'ca.key'), inter.keyPem, { mode: 0o600 });
    await expect(BuiltinProvider.start({ store: meshCaFileStore(dir), generate: false })).rejects.toThrow(/is an intermediate: trust.crt must hold the root/);
    writeFileSync(join(dir, 'trust.crt'), root.certPem);
    const p = await BuiltinProvider.start({ store: meshCaFileStore(dir), generate: false });
    expect(p.trustBundle()).toEqual([root.certPem]);
    const issued = await p.issue({ ...(await request()), identity: id, trustDomain: TD, lifetimeMs: HOUR });
    expect(issued.certChainPem).toHaveLength(2);
    expect(await verifyChain(issued.certChainPem, [root.certPem])).toBeUndefined();
  });

  test('a trust.crt the signer does not chain to is refused at start, and on refresh the last good CA is kept', async () => {
    const store = meshCaFileStore(dir);
    const p = await BuiltinProvider.start({ store });
    const bundle = p.trustBundle();
    const stranger = await createRoot({ commonName: 'stranger', lifetimeMs: HOUR });
    writeFileSync(join(dir, 'trust.crt'), stranger.certPem);
    expect(await p.refresh()).toBe(false);
    expect(p.trustBundle()).toEqual(bundle);
    await expect(BuiltinProvider.start({ store })).rejects.toThrow(/does not chain to trust.crt/);
  });

  test('root rotation: the new root signs while old and new are published; old certificates keep verifying; then the old root is retired', async () => {
    const store = meshCaFileStore(dir);
    const p = await BuiltinProvider.start({ store });
    const [oldRoot] = p.trustBundle();
    const before = await p.issue({ ...(await request()), identity: id, trustDomain: TD, lifetimeMs: HOUR });
    await p.rotateRoot();
    const both = p.trustBundle();
    expect(both).toHaveLength(2);
    expect(both[0]).toBe(oldRoot);
    const after = await p.issue({ ...(await request()), identity: id, trustDomain: TD, lifetimeMs: HOUR });
    expect(await verifyChain(before.certChainPem, both)).toBeUndefined();
    expect(await verifyChain(after.certChainPem, both)).toBeUndefined();
    expect(await verifyChain(after.certChainPem, [oldRoot!])).toMatch(/not signed by any root/);
    // Kept across a restart of the controller.
    expect((await BuiltinProvider.start({ store })).trustBundle()).toEqual(both);
    await p.retireOldRoots();
    expect(p.trustBundle()).toEqual([both[1]]);
    expect(await verifyChain(before.certChainPem, p.trustBundle())).toMatch(/not signed by any root/);
    expect(readFileSync(join(dir, 'trust.crt'), 'utf8')).toBe('');
  });

  test('in a cluster the CA is a Secret: replicas racing to create it end up with one root', async () => {
    const api = await TestApiServer.start();
    try {
      const core = api.kubeConfig().makeApiClient(CoreV1Api);
      const [a, b] = await Promise.all([BuiltinProvider.start({ store: meshCaSecretStore(core, 'fsm-system') }), BuiltinProvider.start({ store: meshCaSecretStore(core, 'fsm-system') })]);
      expect(a.trustBundle()).toEqual(b.trustBundle());
      const secret = api.get('Secret', 'fsm-system', 'fsm-node-mesh-ca')!;
      expect(Object.keys(secret.data as object).sort()).toEqual(['ca.crt', 'ca.key', 'chain.crt', 'trust.crt']);
    } finally {
      await api.close();
    }
  });
});

/**
 * A small external signer, as cert-manager or a Vault-backed signer would act
 * on the CSR API: it watches for CSRs of its signerName, applies its policy
 * (here: a callback) and writes the Approved condition and status.certificate
 * through the store the API server serves. Only the policy is fake; the
 * provider talks real HTTP to the API server.
 */
function testSigner(api: TestApiServer, signerName: string, policy: (csr: Obj, identity: string) => Promise<'approve' | 'deny' | 'fail' | 'ignore' | { certificate: string }>) {
  const seen = new Set<string>();
  const timer = setInterval(() => {
    for (const o of api.list('CertificateSigningRequest')) {
      const spec = o.spec as { signerName: string; request: string };
      if (spec.signerName !== signerName || seen.has(o.metadata.name!)) continue;
      seen.add(o.metadata.name!);
      void policy(o, o.metadata.labels?.[CSR_LABEL] ?? '').then((verdict) => {
        if (verdict === 'ignore') return;
        const cond = (type: string, reason: string) => ({ type, status: 'True', reason, message: `test signer: ${reason}` });
        const status =
          verdict === 'approve' ? { conditions: [cond('Approved', 'Ok')] } : verdict === 'deny' ? { conditions: [cond('Denied', 'PolicyRefused')] } : verdict === 'fail' ? { conditions: [cond('Approved', 'Ok'), cond('Failed', 'SignerBroken')] } : { conditions: [cond('Approved', 'Ok')], certificate: Buffer.from(verdict.certificate).toString('base64') };
        try {
          api.update({ ...api.get('CertificateSigningRequest', undefined, o.metadata.name!)!, status });
        } catch {
          /* deleted meanwhile */
        }
      });
    }
  }, 10);
  return { stop: () => clearInterval(timer) };
}

describe('Kubernetes CSR provider', () => {
  let api: TestApiServer;
  let csrApi: CsrApi;
  const SIGNER = 'example.com/mesh-ca';

  beforeEach(async () => {
    api = await TestApiServer.start();
    csrApi = api.kubeConfig().makeApiClient(CertificatesV1Api) as unknown as CsrApi;
  });
  afterEach(async () => api.close());

  async function ca() {
    const root = await createRoot({ commonName: 'external root', lifetimeMs: 24 * 365 * HOUR });
    return { root, signer: await loadSigner(root.certPem, root.keyPem) };
  }

  test('the external signer approves and signs: the chain comes back checked, the CSR object is deleted', async () => {
    const { root, signer } = await ca();
    let asked: Obj | undefined;
    const s = testSigner(api, SIGNER, async (o) => {
      asked = o;
      const spec = o.spec as { request: string; expirationSeconds: number };
      const pem = Buffer.from(spec.request, 'base64').toString('utf8');
      const names = await parseCsr(pem);
      const [, ns, sa] = /spiffe:\/\/[^/]+\/ns\/([^/]+)\/sa\/(.+)/.exec(names.uris[0]!)!;
      const leaf = await signLeaf(pem, signer, { trustDomain: TD, identity: { namespace: ns!, serviceAccount: sa! }, lifetimeMs: spec.expirationSeconds * 1000 });
      return { certificate: leaf.chainPem.join('') };
    });
    try {
      const p = new KubernetesCsrProvider({ api: csrApi, signerName: SIGNER, trustBundle: () => [root.certPem], pollMs: 20 });
      const r = await request();
      const issued = await p.issue({ csrPem: r.csrPem, identity: id, trustDomain: TD, lifetimeMs: 2 * 60_000 });
      expect(parseCertificate(issued.certChainPem[0]!).identity).toEqual(id);
      expect(asked!.spec).toMatchObject({ signerName: SIGNER, usages: ['digital signature', 'server auth', 'client auth'], expirationSeconds: 600 });
      expect(asked!.metadata.labels).toEqual({ [CSR_LABEL]: 'demo.web' });
      expect(api.list('CertificateSigningRequest')).toEqual([]);
      expect(p.trustBundle()).toEqual([root.certPem]);
      expect(p.describe()).toBe('Kubernetes CSR API, signer example.com/mesh-ca');
    } finally {
      s.stop();
    }
  });

  test('denied, failed and never answered: clear errors with a reason, the CSR object is deleted each time', async () => {
    const { root } = await ca();
    for (const [verdict, reason, msg] of [
      ['deny', 'denied', /was denied: PolicyRefused test signer: PolicyRefused/],
      ['fail', 'failed', /was failed: SignerBroken/],
      ['ignore', 'timeout', /was not approved within 200 ms: is the signer running\?/],
    ] as const) {
      const s = testSigner(api, SIGNER, async () => verdict);
      try {
        const p = new KubernetesCsrProvider({ api: csrApi, signerName: SIGNER, trustBundle: () => [root.certPem], pollMs: 20, timeoutMs: 200 });
        const err = await p.issue({ ...(await request()), identity: id, trustDomain: TD, lifetimeMs: HOUR }).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(ProviderError);
        expect((err as ProviderError).reason).toBe(reason);
        expect((err as Error).message).toMatch(msg);
        expect(api.list('CertificateSigningRequest')).toEqual([]);
      } finally {
        s.stop();
      }
    }
  });

  test('a signer answering with another identity, another key, or a foreign CA is not believed', async () => {
    const { root, signer } = await ca();
    const foreign = await ca();
    const other = await request({ namespace: 'demo', serviceAccount: 'admin' });
    const cases: [string, (pem: string) => Promise<string>, RegExp][] = [
      ['another identity', async () => (await signLeaf(other.csrPem, signer, { trustDomain: TD, identity: { namespace: 'demo', serviceAccount: 'admin' }, lifetimeMs: HOUR })).certPem, /returned a certificate for spiffe:\/\/cluster.local\/ns\/demo\/sa\/admin/],
      ['another key', async () => (await signLeaf(other.csrPem, signer, { trustDomain: TD, identity: id, lifetimeMs: HOUR })).certPem, /with another public key/],
      ['a foreign CA', async (pem) => (await signLeaf(pem, foreign.signer, { trustDomain: TD, identity: id, lifetimeMs: HOUR })).certPem, /does not verify against the configured trust bundle/],
    ];
    for (const [what, answer, msg] of cases) {
      const s = testSigner(api, SIGNER, async (o) => ({ certificate: await answer(Buffer.from((o.spec as { request: string }).request, 'base64').toString('utf8')) }));
      try {
        const p = new KubernetesCsrProvider({ api: csrApi, signerName: SIGNER, trustBundle: () => [root.certPem], pollMs: 20 });
        const err = await p.issue({ ...(await request()), identity: id, trustDomain: TD, lifetimeMs: HOUR }).catch((e: unknown) => e);
        expect({ what, message: (err as Error).message }).toEqual({ what, message: expect.stringMatching(msg) });
        expect((err as ProviderError).reason).toBe('failed');
      } finally {
        s.stop();
      }
    }
  });

  test('a signerName without a domain is refused', () => {
    expect(() => new KubernetesCsrProvider({ api: csrApi, signerName: 'mesh-ca', trustBundle: () => [] })).toThrow(/must be <domain>\/<name>/);
  });
});
