// Before @peculiar/x509, which needs the Reflect polyfill (src/identity/x509.ts does the same).
import 'reflect-metadata';
import { webcrypto } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { request } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Registry } from 'prom-client';
import * as x509 from '@peculiar/x509';
import { IdentityService } from '../../src/controller/identities.js';
import { controllerIssuer, IdentityManager } from '../../src/identity/agent-certs.js';
import { BuiltinProvider, meshCaFileStore } from '../../src/identity/providers/builtin.js';
import { createCsr, generateKeyPair, parseCertificate, verifyChain } from '../../src/identity/x509.js';
import { baseMesh, meshConfig, pod } from './policy-fixtures.js';
import { policyServerFixture, type PolicyServerFixture } from './policy-server-fixture.js';

interface Res {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  json: Record<string, unknown>;
}

function post(url: string, ca: string, token: string | undefined, body: unknown): Promise<Res> {
  return new Promise((resolve, reject) => {
    const data = JSON.stringify(body);
    const req = request(url, { method: 'POST', ca, headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, json: JSON.parse(Buffer.concat(chunks).toString() || '{}') as Record<string, unknown> }));
    });
    req.on('error', reject);
    req.end(data);
  });
}

const TD = 'cluster.local';
let fx: PolicyServerFixture;
let base: string;
let caDir: string;
let provider: BuiltinProvider;
let service: IdentityService;
let clock = Date.now();
const registry = new Registry();

const ask = (node: string, body: unknown, token = fx.tokens[node]) => post(`${base}/v1/nodes/${node}/identities`, fx.tls.caCert, token, body);
const csrFor = async (ns: string, sa: string) => createCsr(await generateKeyPair(), TD, { namespace: ns, serviceAccount: sa });

beforeAll(async () => {
  caDir = mkdtempSync(join(tmpdir(), 'fsmt-idapi-'));
  provider = await BuiltinProvider.start({ store: meshCaFileStore(caDir) });
  fx = await policyServerFixture('fsmt-idsrv-', {
    identities: (compiler) =>
      (service = new IdentityService({
        provider,
        podsOf: (n) => compiler.get(n)?.policy.pods,
        settings: () => compiler.identitySettings(),
        rate: { perSecond: 2, burst: 5 },
        maxIdentitiesPerNode: 3,
        registry,
        now: () => clock,
      })),
  });
  base = await fx.server.listen({ host: '127.0.0.1', port: 0 });
  fx.publish(...baseMesh());
  fx.hub.setReady();
});

afterAll(async () => {
  await fx.close();
  rmSync(caDir, { recursive: true, force: true });
});

beforeEach(() => {
  clock += 60_000; // a full bucket for every test
});

describe('POST /v1/nodes/:node/identities', () => {
  test('a node gets a certificate for a service account it runs, with the trust bundle; the chain verifies', async () => {
    const r = await ask('node-a', { namespace: 'app', serviceAccount: 'web', csr: await csrFor('app', 'web') });
    expect(r.status).toBe(200);
    expect(r.headers['cache-control']).toBe('no-store');
    const chain = r.json.certificateChain as string[];
    expect(r.json.trustBundle).toEqual(provider.trustBundle());
    const info = parseCertificate(chain[0]!);
    expect(info.identity).toEqual({ namespace: 'app', serviceAccount: 'web' });
    expect(info.uris).toEqual(['spiffe://cluster.local/ns/app/sa/web']);
    expect(info.dnsNames).toEqual(['web.app.sa.cluster.local']);
    expect(new Date(r.json.notAfter as string).getTime() - Date.now()).toBeGreaterThan(23.9 * 3600_000);
    expect(await verifyChain(chain, r.json.trustBundle as string[])).toBeUndefined();
  });

  test('attack: a node asking for an identity it runs no pod of gets 403 with the reason', async () => {
    // api runs only on node-b.
    const r = await ask('node-a', { namespace: 'app', serviceAccount: 'api', csr: await csrFor('app', 'api') });
    expect(r.status).toBe(403);
    expect(r.json).toMatchObject({ reason: 'not_on_node', message: 'node node-a runs no mesh pod with service account app/api: it may not hold that identity' });
    // A service account of a pod outside the mesh is no better.
    const outsider = await ask('node-a', { namespace: 'other', serviceAccount: 'default', csr: await csrFor('other', 'default') });
    expect(outsider.status).toBe(403);
  });

  test('attack: another node’s token, or none, is refused before anything else', async () => {
    const r = await ask('node-b', { namespace: 'app', serviceAccount: 'api', csr: await csrFor('app', 'api') }, fx.tokens['node-a']);
    expect(r.status).toBe(403);
    expect(r.json.message).toBe('this token belongs to node "node-a"');
    expect((await ask('node-b', {}, 'x'.repeat(40))).status).toBe(401);
    expect((await ask('node-b', {}, '')).status).toBe(401);
  });

  test('attack: a CSR for another identity than the one asked for is 400 naming the field', async () => {
    const r = await ask('node-a', { namespace: 'app', serviceAccount: 'web', csr: await csrFor('app', 'db') });
    expect(r.status).toBe(400);
    expect(r.json).toMatchObject({ reason: 'csr_mismatch' });
    expect(r.json.message).toBe('invalid csr subject CN ["db.app.sa.cluster.local"]: must be exactly ["web.app.sa.cluster.local"] for identity app/web');
  });

  test('attack: extra SANs (another SPIFFE ID, an IP) in the CSR are refused', async () => {
    const keys = await generateKeyPair();
    const extra = await x509.Pkcs10CertificateRequestGenerator.create({
      name: [{ CN: ['web.app.sa.cluster.local'] }],
      keys,
      signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
      extensions: [
        new x509.SubjectAlternativeNameExtension([
          { type: 'dns', value: 'web.app.sa.cluster.local' },
          { type: 'url', value: 'spiffe://cluster.local/ns/app/sa/web' },
          { type: 'url', value: 'spiffe://cluster.local/ns/app/sa/api' },
        ]),
      ],
    });
    const r = await ask('node-a', { namespace: 'app', serviceAccount: 'web', csr: extra.toString('pem') });
    expect(r.status).toBe(400);
    expect(r.json.message).toMatch(/^invalid csr URI SANs \[.*\]: must be exactly \["spiffe:\/\/cluster.local\/ns\/app\/sa\/web"\]/);
  });

  test('attack: a key other than ECDSA P-256 is 400 naming the key algorithm', async () => {
    for (const [alg, keyParams, sign] of [
      ['ECDSA P-384', { name: 'ECDSA', namedCurve: 'P-384' }, { name: 'ECDSA', hash: 'SHA-384' }],
      ['RSA 2048', { name: 'RSASSA-PKCS1-v1_5', modulusLength: 2048, publicExponent: new Uint8Array([1, 0, 1]), hash: 'SHA-256' }, { name: 'RSASSA-PKCS1-v1_5' }],
    ] as const) {
      const keys = (await webcrypto.subtle.generateKey(keyParams, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
      const csr = await x509.Pkcs10CertificateRequestGenerator.create({
        name: [{ CN: ['web.app.sa.cluster.local'] }],
        keys: keys as never,
        signingAlgorithm: sign,
        extensions: [new x509.SubjectAlternativeNameExtension([{ type: 'dns', value: 'web.app.sa.cluster.local' }, { type: 'url', value: 'spiffe://cluster.local/ns/app/sa/web' }])],
      });
      const r = await ask('node-a', { namespace: 'app', serviceAccount: 'web', csr: csr.toString('pem') });
      expect(r.status).toBe(400);
      expect(r.json).toMatchObject({ reason: 'key_algorithm', message: `invalid csr public key "${alg}": must be ECDSA P-256` });
    }
  });

  test('malformed bodies are 400 naming the field', async () => {
    expect((await ask('node-a', { namespace: 'app', serviceAccount: 'web' })).json.message).toBe('invalid request: csr: Required');
    expect((await ask('node-a', { namespace: 'App', serviceAccount: 'web', csr: 'x' })).json.message).toMatch(/^invalid body.namespace "App"/);
    expect((await ask('node-a', { namespace: 'app', serviceAccount: 'web', csr: 'not a csr' })).json.message).toMatch(/^invalid csr .*is not a PEM certificate request/);
    expect((await ask('node-a', { namespace: 'app', serviceAccount: 'web', csr: 'x', extra: 1 })).status).toBe(400);
  });

  test('each node is rate limited with a token bucket: 429 with Retry-After, then it refills', async () => {
    const body = { namespace: 'app', serviceAccount: 'web', csr: await csrFor('app', 'web') };
    const statuses: number[] = [];
    for (let i = 0; i < 7; i++) statuses.push((await ask('node-a', body)).status);
    expect(statuses).toEqual([200, 200, 200, 200, 200, 429, 429]);
    const limited = await ask('node-a', body);
    expect(limited.headers['retry-after']).toBe('1');
    expect(limited.json.reason).toBe('rate_limited');
    // Another node's bucket is its own.
    expect((await ask('node-b', { namespace: 'app', serviceAccount: 'api', csr: await csrFor('app', 'api') })).status).toBe(200);
    clock += 1000; // two tokens back
    expect((await ask('node-a', body)).status).toBe(200);
  });

  test('a node holds at most N distinct identities at once (429); renewals of held ones still pass; expiry frees a slot', async () => {
    fx.publish(pod('s1-1', { ip: '10.0.0.51', sa: 's1' }), pod('s2-1', { ip: '10.0.0.52', sa: 's2' }), pod('s3-1', { ip: '10.0.0.53', sa: 's3' }));
    // node-a holds web already (earlier tests); the bound is 3.
    const got = [];
    for (const sa of ['db', 's1', 's2']) got.push((await ask('node-a', { namespace: 'app', serviceAccount: sa, csr: await csrFor('app', sa) })).status);
    expect(got).toEqual([200, 200, 429]);
    clock += 60_000;
    const r = await ask('node-a', { namespace: 'app', serviceAccount: 's2', csr: await csrFor('app', 's2') });
    expect(r.json).toMatchObject({ reason: 'too_many_identities', message: 'node node-a holds 3 identities already, the most one node may hold (3)' });
    expect((await ask('node-a', { namespace: 'app', serviceAccount: 'web', csr: await csrFor('app', 'web') })).status).toBe(200);
    clock += 25 * 3600_000; // every certificate issued so far has expired
    expect((await ask('node-a', { namespace: 'app', serviceAccount: 's2', csr: await csrFor('app', 's2') })).status).toBe(200);
  });

  test('the mesh config sets the trust domain and the lifetime of what is issued', async () => {
    fx.publish(meshConfig({ trustDomain: 'edge.example.org', certificateLifetime: '7d' }));
    try {
      const csr = await createCsr(await generateKeyPair(), 'edge.example.org', { namespace: 'app', serviceAccount: 'db' });
      const r = await ask('node-a', { namespace: 'app', serviceAccount: 'db', csr });
      expect(r.status).toBe(200);
      const info = parseCertificate((r.json.certificateChain as string[])[0]!);
      expect(info.uris).toEqual(['spiffe://edge.example.org/ns/app/sa/db']);
      expect(info.notAfter.getTime() - Date.now()).toBeGreaterThan(6.9 * 24 * 3600_000);
      // A CSR in the old trust domain no longer matches.
      expect((await ask('node-a', { namespace: 'app', serviceAccount: 'db', csr: await csrFor('app', 'db') })).status).toBe(400);
    } finally {
      fx.publish(meshConfig({}));
    }
  });

  test('an agent’s IdentityManager gets its identities from the real server, with the node’s token; a foreign token gets nothing', async () => {
    clock += 25 * 3600_000; // earlier tests' certificates no longer count against the bound
    fx.compiler.setTrustBundle(provider.trustBundle());
    fx.publish();
    const policy = fx.compiler.get('node-b')!.policy;
    expect(policy.trust!.bundle).toEqual(provider.trustBundle());
    const stateDir = mkdtempSync(join(tmpdir(), 'fsmt-idagent-'));
    const issuer = (token: string) => controllerIssuer({ url: base, node: 'node-b', ca: fx.tls.caCert, token: () => token });
    const good = new IdentityManager({ stateDir, issuer: issuer(fx.tokens['node-b']!) });
    const bad = new IdentityManager({ stateDir: join(stateDir, 'other'), issuer: issuer(fx.tokens['node-a']!), backoff: { initialMs: 10_000, maxMs: 10_000 } });
    try {
      good.update(policy);
      bad.update(policy);
      await good.settled();
      await bad.settled();
      const ok = await new Promise<ReturnType<IdentityManager['snapshot']>>((resolve) => {
        const poll = () => (good.snapshot().get('app/api')?.state === 'valid' ? resolve(good.snapshot()) : setTimeout(poll, 20));
        poll();
      });
      expect(parseCertificate(ok.get('app/api')!.certChainPem[0]!).identity).toEqual({ namespace: 'app', serviceAccount: 'api' });
      const refused = await new Promise<ReturnType<IdentityManager['status']>>((resolve) => {
        const poll = () => (bad.status()[0]?.lastError ? resolve(bad.status()) : setTimeout(poll, 20));
        poll();
      });
      expect(refused).toEqual([expect.objectContaining({ identity: 'app/api', state: 'pending', lastError: 'controller answered 403: this token belongs to node "node-a"' })]);
    } finally {
      await good.stop();
      await bad.stop();
      rmSync(stateDir, { recursive: true, force: true });
    }
  });

  test('the agent’s issuer keeps its TLS connection across certificates, and opens a new one when the controller closed it', async () => {
    clock += 25 * 3600_000;
    const connections: unknown[] = [];
    const count = (socket: unknown) => connections.push(socket);
    fx.server.server.on('secureConnection', count);
    try {
      const issuer = controllerIssuer({ url: base, node: 'node-b', ca: fx.tls.caCert, token: () => fx.tokens['node-b']! });
      const api = { namespace: 'app', serviceAccount: 'api' };
      for (let i = 0; i < 3; i++) expect(parseCertificate((await issuer.issue(api, await csrFor('app', 'api'))).certificateChain[0]!).identity).toEqual(api);
      expect(connections).toHaveLength(1);
      // The controller drops idle connections (its keep-alive timeout, a restart): the next certificate still comes.
      (fx.server.server as unknown as { closeIdleConnections(): void }).closeIdleConnections();
      expect(parseCertificate((await issuer.issue(api, await csrFor('app', 'api'))).certificateChain[0]!).identity).toEqual(api);
      expect(connections).toHaveLength(2);
    } finally {
      fx.server.server.off('secureConnection', count);
    }
  });

  test('metrics count issued and refused by reason, and observe latency', async () => {
    const text = await registry.metrics();
    expect(text).toMatch(/fsm_node_controller_certificates_issued_total [1-9]/);
    for (const reason of ['not_on_node', 'csr_mismatch', 'key_algorithm', 'rate_limited', 'too_many_identities', 'bad_request']) {
      expect(text).toMatch(new RegExp(`fsm_node_controller_certificate_refusals_total\\{reason="${reason}"\\} [1-9]`));
    }
    expect(text).toMatch(/fsm_node_controller_certificate_issue_seconds_count [1-9]/);
    expect(service.provider).toBe(provider);
  });
});
