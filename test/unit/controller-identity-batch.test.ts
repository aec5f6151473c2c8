import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer, request, type Server } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Registry } from 'prom-client';
import { IdentityService } from '../../src/controller/identities.js';
import { issueBatch, MAX_BATCH } from '../../src/controller/identity-batch.js';
import { controllerIssuer, IdentityManager } from '../../src/identity/agent-certs.js';
import { BuiltinProvider, meshCaFileStore } from '../../src/identity/providers/builtin.js';
import { createCsr, generateKeyPair, parseCertificate, verifyChain } from '../../src/identity/x509.js';
import { baseMesh, pod } from './policy-fixtures.js';
import { policyServerFixture, type PolicyServerFixture } from './policy-server-fixture.js';

interface Res {
  status: number;
  json: Record<string, unknown>;
}

function post(url: string, ca: string, token: string | undefined, body: unknown): Promise<Res> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method: 'POST', ca, headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode!, json: JSON.parse(Buffer.concat(chunks).toString() || '{}') as Record<string, unknown> }));
    });
    req.on('error', reject);
    req.end(JSON.stringify(body));
  });
}

type Result = Record<string, unknown> & { status: number };

const TD = 'cluster.local';
const BOUND = 20;
let fx: PolicyServerFixture;
let base: string;
let caDir: string;
let provider: BuiltinProvider;
let clock = Date.now();
const registry = new Registry();

const batch = (node: string, body: unknown, token = fx.tokens[node]) => post(`${base}/v1/nodes/${node}/identities/batch`, fx.tls.caCert, token, body);
const csrFor = async (ns: string, sa: string, td = TD) => createCsr(await generateKeyPair(), td, { namespace: ns, serviceAccount: sa });
const entry = async (sa: string, ns = 'app') => ({ namespace: ns, serviceAccount: sa, csr: await csrFor(ns, sa) });
const results = (r: Res) => r.json.results as Result[];
const metric = async (name: string) => Number(new RegExp(`^${name} (\\S+)`, 'm').exec(await registry.metrics())?.[1] ?? NaN);

beforeAll(async () => {
  caDir = mkdtempSync(join(tmpdir(), 'fsmt-idbatch-'));
  provider = await BuiltinProvider.start({ store: meshCaFileStore(caDir) });
  fx = await policyServerFixture('fsmt-idbatchsrv-', {
    identities: (compiler) =>
      new IdentityService({
        provider,
        podsOf: (n) => compiler.get(n)?.policy.pods,
        settings: () => compiler.identitySettings(),
        rate: { perSecond: 2, burst: 5 },
        maxIdentitiesPerNode: BOUND,
        registry,
        now: () => clock,
      }),
  });
  base = await fx.server.listen({ host: '127.0.0.1', port: 0 });
  // node-a runs web, db and s1..s6 (app); node-b runs api.
  fx.publish(...baseMesh(), ...[1, 2, 3, 4, 5, 6].map((i) => pod(`s${i}-1`, { ip: `10.0.0.${50 + i}`, sa: `s${i}` })));
  fx.hub.setReady();
});

afterAll(async () => {
  await fx.close();
  rmSync(caDir, { recursive: true, force: true });
});

beforeEach(() => {
  clock += 60_000; // a full bucket for every test
});

/** An IdentityService of its own: node n1 runs app/a..d, no rate limit to speak of, at most `bound` identities. */
function boundService(bound: number): IdentityService {
  const pods = ['a', 'b', 'c', 'd'].map((sa) => ({ namespace: 'app', serviceAccount: sa }));
  return new IdentityService({ provider, podsOf: (n) => (n === 'n1' ? pods : undefined), settings: () => ({ trustDomain: TD, certificateLifetimeMs: null }), rate: { perSecond: 1000, burst: 1000 }, maxIdentitiesPerNode: bound });
}

describe('POST /v1/nodes/:node/identities/batch', () => {
  test('one request, a certificate per identity in order, the trust bundle once; every chain verifies', async () => {
    const r = await batch('node-a', { requests: [await entry('web'), await entry('db')] });
    expect(r.status).toBe(200);
    expect(r.json.trustBundle).toEqual(provider.trustBundle());
    expect(results(r).map((x) => x.status)).toEqual([200, 200]);
    const ids = [];
    for (const x of results(r)) {
      const chain = x.certificateChain as string[];
      expect(await verifyChain(chain, r.json.trustBundle as string[])).toBeUndefined();
      expect(new Date(x.notAfter as string).getTime()).toBe(parseCertificate(chain[0]!).notAfter.getTime());
      ids.push(parseCertificate(chain[0]!).identity);
    }
    expect(ids).toEqual([
      { namespace: 'app', serviceAccount: 'web' },
      { namespace: 'app', serviceAccount: 'db' },
    ]);
  });

  test('attack: a batch mixing an identity the node runs no pod of: that entry 403 with the reason, the others issued', async () => {
    // api runs only on node-b; other/default is outside the mesh.
    const r = await batch('node-a', { requests: [await entry('web'), await entry('api'), await entry('default', 'other'), await entry('db')] });
    expect(r.status).toBe(200);
    const [web, api, outsider, db] = results(r);
    expect(web!.status).toBe(200);
    expect(api).toEqual({ status: 403, error: 'Forbidden', reason: 'not_on_node', message: 'node node-a runs no mesh pod with service account app/api: it may not hold that identity' });
    expect(outsider).toMatchObject({ status: 403, reason: 'not_on_node' });
    expect(db!.status).toBe(200);
    expect(api).not.toHaveProperty('certificateChain');
  });

  test('attack: another node’s token, or none, refuses the whole batch before anything is read', async () => {
    const body = { requests: [await entry('api')] };
    const r = await batch('node-b', body, fx.tokens['node-a']);
    expect(r.status).toBe(403);
    expect(r.json).toEqual({ error: 'Forbidden', message: 'this token belongs to node "node-a"' });
    expect((await batch('node-b', body, 'x'.repeat(40))).status).toBe(401);
    expect((await batch('node-b', body, '')).status).toBe(401);
  });

  test('an oversized, empty or malformed batch is 400 naming the field, and nothing is issued', async () => {
    const issued = await metric('fsm_node_controller_certificates_issued_total');
    const one = await entry('web');
    const over = await batch('node-a', { requests: Array.from({ length: MAX_BATCH + 1 }, () => one) });
    expect(over.status).toBe(400);
    expect(over.json).toEqual({ error: 'BadRequest', reason: 'bad_request', message: `invalid request: requests: at most ${MAX_BATCH} identities per request` });
    clock += 60_000;
    expect((await batch('node-a', { requests: [] })).json.message).toBe('invalid request: requests: must name at least one identity');
    expect((await batch('node-a', {})).json.message).toBe('invalid request: requests: Required');
    expect((await batch('node-a', [one])).json.message).toMatch(/^invalid request: \(root\): Expected object/);
    expect((await batch('node-a', { requests: [one], extra: 1 })).json.message).toMatch(/^invalid request: \(root\): Unrecognized key/);
    expect(await metric('fsm_node_controller_certificates_issued_total')).toBe(issued);
  });

  test('a bad entry is 400 naming requests[i] and its field; the others are issued', async () => {
    // Five entries: the bucket holds five tokens.
    const r = await batch('node-a', {
      requests: [
        { namespace: 'app', serviceAccount: 'web' },
        { namespace: 'App', serviceAccount: 'db', csr: 'x' },
        { namespace: 'app', serviceAccount: 's1', csr: await csrFor('app', 's2') },
        'web',
        await entry('s4'),
      ],
    });
    expect(r.status).toBe(200);
    const rs = results(r);
    expect(rs.map((x) => x.status)).toEqual([400, 400, 400, 400, 200]);
    expect(rs[0]!.message).toBe('invalid request: requests[0].csr: Required');
    expect(rs[1]!.message).toMatch(/^invalid requests\[1\]\.namespace "App"/);
    expect(rs[2]).toMatchObject({ reason: 'csr_mismatch', message: 'invalid requests[2].csr subject CN ["s2.app.sa.cluster.local"]: must be exactly ["s1.app.sa.cluster.local"] for identity app/s1' });
    expect(rs[3]!.message).toBe('invalid request: requests[3]: Expected object, received string');
    clock += 60_000;
    const notPem = results(await batch('node-a', { requests: [{ namespace: 'app', serviceAccount: 's3', csr: 'not a csr' }] }))[0]!;
    expect(notPem.message).toMatch(/^invalid requests\[0\]\.csr .*is not a PEM certificate request/);
  });

  test('the same identity twice in one batch: the second is 400 naming both entries', async () => {
    const r = await batch('node-a', { requests: [await entry('web'), await entry('web')] });
    expect(results(r).map((x) => x.status)).toEqual([200, 400]);
    expect(results(r)[1]!.message).toBe('invalid requests[1]: identity app/web is asked for in requests[0] already');
  });

  test('the rate limit counts identities, not requests: entries past the bucket are 429 with retryAfter, the rest issued', async () => {
    // Burst 5: a batch of 7 gets 5 certificates; the bucket is then empty for a single request too.
    const r = await batch('node-a', { requests: await Promise.all(['web', 'db', 's1', 's2', 's3', 's4', 's5'].map((sa) => entry(sa))) });
    expect(results(r).map((x) => x.status)).toEqual([200, 200, 200, 200, 200, 429, 429]);
    expect(results(r)[5]).toMatchObject({ reason: 'rate_limited', retryAfter: 1 });
    const single = await post(`${base}/v1/nodes/node-a/identities`, fx.tls.caCert, fx.tokens['node-a'], await entry('s5'));
    expect(single.status).toBe(429);
    // Another node's bucket is its own.
    expect(results(await batch('node-b', { requests: [await entry('api')] }))[0]!.status).toBe(200);
  });

  test('the bound on identities per node counts each entry, also while the entries are signed together', async () => {
    // In process (issueBatch without HTTP), with a bound of 3 and a clock of its own.
    const svc = boundService(3);
    const statuses = async (sas: string[]) => ((await issueBatch(svc, 'n1', { requests: await Promise.all(sas.map((sa) => entry(sa))) })).body as { results: Result[] }).results;
    expect((await statuses(['a', 'b', 'c', 'd'])).map((x) => x.status)).toEqual([200, 200, 200, 429]);
    const again = await statuses(['d', 'a']);
    expect(again.map((x) => x.status)).toEqual([429, 200]);
    expect(again[0]).toMatchObject({ reason: 'too_many_identities', message: 'node n1 holds 3 identities already, the most one node may hold (3)', retryAfter: 60 });
  });

  test('a refused entry does not keep its slot: a bad CSR frees the one it reserved', async () => {
    const svc = boundService(3);
    const run = async (requests: unknown[]) => ((await issueBatch(svc, 'n1', { requests })).body as { results: Result[] }).results.map((x) => x.status);
    expect(await run([await entry('a'), await entry('b')])).toEqual([200, 200]);
    // c with a CSR for d holds the third slot while it is checked (d beside it finds the node full), then gives it back.
    expect(await run([{ namespace: 'app', serviceAccount: 'c', csr: await csrFor('app', 'd') }, await entry('d')])).toEqual([400, 429]);
    expect(await run([await entry('d')])).toEqual([200]);
  });

  test('metrics: entries per batch, and refusals and issues counted per identity', async () => {
    const text = await registry.metrics();
    expect(text).toMatch(/fsm_node_controller_certificate_batch_entries_count [1-9]/);
    expect(text).toMatch(/fsm_node_controller_certificate_batch_entries_bucket\{le="100"\} [1-9]/);
    for (const reason of ['not_on_node', 'csr_mismatch', 'rate_limited', 'bad_request']) {
      expect(text).toMatch(new RegExp(`fsm_node_controller_certificate_refusals_total\\{reason="${reason}"\\} [1-9]`));
    }
  });
});

describe('the agent batches', () => {
  const managerFor = (issuer: ReturnType<typeof controllerIssuer>, stateDir: string) => new IdentityManager({ stateDir, issuer, backoff: { initialMs: 60_000, maxMs: 60_000 } });
  const allValid = (m: IdentityManager) =>
    new Promise<void>((resolve) => {
      const poll = () => (m.status().every((s) => s.state === 'valid' || s.lastError) ? resolve() : setTimeout(poll, 10));
      poll();
    });

  test('identities due together go in one batch request; a refused one fails alone, per identity', async () => {
    fx.compiler.setTrustBundle(provider.trustBundle());
    fx.publish();
    const policy = fx.compiler.get('node-a')!.policy;
    const want = IdentityManager.identitiesOf(policy).length;
    expect(want).toBeGreaterThanOrEqual(5);
    const stateDir = mkdtempSync(join(tmpdir(), 'fsmt-idbatchagent-'));
    const count = await metric('fsm_node_controller_certificate_batch_entries_count');
    const sum = await metric('fsm_node_controller_certificate_batch_entries_sum');
    const m = managerFor(controllerIssuer({ url: base, node: 'node-a', ca: fx.tls.caCert, token: () => fx.tokens['node-a']!, coalesceMs: 50, coalesceMaxMs: 1000 }), stateDir);
    try {
      await m.update(policy);
      await allValid(m);
      // The bucket has 5 tokens: 5 identities issued, the rest refused one by one (429), all in one request.
      expect(await metric('fsm_node_controller_certificate_batch_entries_count')).toBe(count + 1);
      expect(await metric('fsm_node_controller_certificate_batch_entries_sum')).toBe(sum + want);
      const st = m.status();
      expect(st.filter((s) => s.state === 'valid')).toHaveLength(5);
      for (const s of st.filter((x) => x.state !== 'valid')) expect(s).toMatchObject({ state: 'pending', lastError: expect.stringMatching(/^controller answered 429: node node-a exceeds 2 certificate requests per second/) });
      const web = m.snapshot().get('app/web')!;
      if (web.state === 'valid') expect(parseCertificate(readFileSync(web.certPath, 'utf8')).identity).toEqual({ namespace: 'app', serviceAccount: 'web' });
    } finally {
      await m.stop();
      rmSync(stateDir, { recursive: true, force: true });
    }
  });

  test('against an older controller (no batch route: 404) the agent falls back to one request per identity', async () => {
    // An older controller: the single route only, served by the same IdentityService.
    const old = new IdentityService({ provider, podsOf: (n) => fx.compiler.get(n)?.policy.pods, settings: () => fx.compiler.identitySettings() });
    const seen: string[] = [];
    const server: Server = createServer({ cert: fx.tls.cert, key: fx.tls.key }, (req, res) => {
      seen.push(req.url!);
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        if (req.url !== '/v1/nodes/node-b/identities') return res.writeHead(404, { 'content-type': 'application/json' }).end(JSON.stringify({ message: `Route POST:${req.url} not found`, error: 'Not Found', statusCode: 404 }));
        void old.issue('node-b', JSON.parse(Buffer.concat(chunks).toString())).then((a) => res.writeHead(a.status, { 'content-type': 'application/json' }).end(JSON.stringify(a.body)));
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const url = `https://127.0.0.1:${(server.address() as { port: number }).port}`;
    try {
      const issuer = controllerIssuer({ url, node: 'node-b', ca: fx.tls.caCert, token: () => fx.tokens['node-b']!, coalesceMs: 50, coalesceMaxMs: 1000 });
      const api = { namespace: 'app', serviceAccount: 'api' };
      const answers = await Promise.all([issuer.issue(api, await csrFor('app', 'api')), issuer.issue(api, await csrFor('app', 'api'))]);
      for (const a of answers) expect(parseCertificate(a.certificateChain[0]!).identity).toEqual(api);
      expect(seen).toEqual(['/v1/nodes/node-b/identities/batch', '/v1/nodes/node-b/identities', '/v1/nodes/node-b/identities']);
      // Remembered: the next burst goes to the single route at once.
      await Promise.all([issuer.issue(api, await csrFor('app', 'api')), issuer.issue(api, await csrFor('app', 'api'))]);
      expect(seen.slice(3)).toEqual(['/v1/nodes/node-b/identities', '/v1/nodes/node-b/identities']);
    } finally {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
    }
  });

  test('a full batch goes at once, without waiting for the gap; the rest in the next request', async () => {
    const issuer = controllerIssuer({ url: base, node: 'node-a', ca: fx.tls.caCert, token: () => fx.tokens['node-a']!, coalesceMs: 3000, coalesceMaxMs: 3000, maxBatch: 2 });
    const count = await metric('fsm_node_controller_certificate_batch_entries_count');
    const issued = await metric('fsm_node_controller_certificates_issued_total');
    const csrs = await Promise.all(['web', 'db', 's1'].map((sa) => csrFor('app', sa)));
    const full = Promise.all(['web', 'db'].map((sa, i) => issuer.issue({ namespace: 'app', serviceAccount: sa }, csrs[i]!)));
    let thirdDone = false;
    const third = issuer.issue({ namespace: 'app', serviceAccount: 's1' }, csrs[2]!).finally(() => (thirdDone = true));
    expect((await full).map((a) => parseCertificate(a.certificateChain[0]!).identity?.serviceAccount)).toEqual(['web', 'db']);
    // The third waits for its gap (3 s), alone: then it goes to the single route.
    expect(thirdDone).toBe(false);
    expect(await metric('fsm_node_controller_certificates_issued_total')).toBe(issued + 2);
    expect(parseCertificate((await third).certificateChain[0]!).identity?.serviceAccount).toBe('s1');
    expect(await metric('fsm_node_controller_certificate_batch_entries_count')).toBe(count + 1);
    expect(await metric('fsm_node_controller_certificates_issued_total')).toBe(issued + 3);
  });

  test('a lone identity goes to the single route; a whole-batch refusal reaches every identity of it', async () => {
    const issuer = controllerIssuer({ url: base, node: 'node-b', ca: fx.tls.caCert, token: () => fx.tokens['node-a']!, coalesceMs: 50, coalesceMaxMs: 1000 });
    const api = { namespace: 'app', serviceAccount: 'api' };
    await expect(issuer.issue(api, await csrFor('app', 'api'))).rejects.toThrow('controller answered 403: this token belongs to node "node-a"');
    const both = await Promise.allSettled([issuer.issue(api, await csrFor('app', 'api')), issuer.issue({ namespace: 'app', serviceAccount: 'web' }, await csrFor('app', 'web'))]);
    expect(both.map((b) => (b.status === 'rejected' ? (b.reason as Error).message : 'issued'))).toEqual(['controller answered 403: this token belongs to node "node-a"', 'controller answered 403: this token belongs to node "node-a"']);
  });
});
