import { existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { generateTls, type TlsMaterial } from '../../src/controller/certs.js';
import { PolicyHub } from '../../src/controller/hub.js';
import { backoffDelay, PolicyClient, type PolicyEvent } from '../../src/policy/client.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import { NodePolicySchema } from '../../src/policy/schema.js';
import { lastGoodPath, readLastGood, writeLastGood } from '../../src/policy/store.js';
import { baseMesh, pod, type Obj } from './policy-fixtures.js';
import { policyServerFixture, type PolicyServerFixture } from './policy-server-fixture.js';

let fx: PolicyServerFixture;
let tls: TlsMaterial;
let dir: string;
let tokens: Record<string, string>;
let compiler: PolicyCompiler;
let hub: PolicyHub;
let server: FastifyInstance;
let url: string;
const clients: PolicyClient[] = [];

const publish = (...objs: Obj[]) => fx.publish(...objs);

function client(o: { stateDir: string; url?: string; ca?: string; node?: string; token?: string }): PolicyClient {
  const c = new PolicyClient({
    url: o.url ?? url,
    node: o.node ?? 'node-a',
    ca: o.ca ?? tls.caCert,
    token: o.token ?? tokens['node-a'],
    stateDir: o.stateDir,
    waitSeconds: 30,
    backoff: { initialMs: 20, maxMs: 100 },
  });
  clients.push(c);
  return c;
}

const next = <T>(c: PolicyClient, event: string): Promise<T> => new Promise((resolve) => c.once(event, resolve));
const stateDir = () => mkdtempSync(join(dir, 'state-'));

beforeAll(async () => {
  fx = await policyServerFixture('fsmt-client-');
  ({ tls, dir, tokens, compiler, hub, server } = fx);
  publish(...baseMesh());
  hub.setReady();
  url = (await server.listen({ host: '127.0.0.1', port: 0 })).replace('127.0.0.1', 'localhost');
});

afterEach(async () => {
  await Promise.all(clients.splice(0).map((c) => c.stop()));
});

afterAll(() => fx.close());

describe('PolicyClient against the real server', () => {
  test('fetches, validates and stores the policy; then follows changes by long-poll', async () => {
    const sd = stateDir();
    const c = client({ stateDir: sd });
    const first = next<PolicyEvent>(c, 'policy');
    c.start();
    const e1 = await first;
    expect(e1.source).toBe('controller');
    expect(e1.policy.version).toBe(compiler.get('node-a')!.version);
    await c.persisted();
    const stored = readLastGood(sd);
    expect(stored.ok && stored.value.policy).toEqual(e1.policy);

    await until(() => hub.waiting() === 1);
    const second = next<PolicyEvent>(c, 'policy');
    publish(pod('web-3', { ip: '10.0.0.13', sa: 'web' }));
    const e2 = await second;
    expect(e2.policy.pods.map((p) => p.name)).toContain('web-3');
    expect(c.stats()).toMatchObject({ version: e2.policy.version, errors: { network: 0, status: 0, invalid: 0, persist: 0, token: 0 } });
    expect(c.current()!.policy.version).toBe(e2.policy.version);
    // The change came as a delta, and gives the same policy as the full document.
    expect(c.stats().updates).toEqual({ full: 1, delta: 1 });
    expect(e2.policy).toEqual(NodePolicySchema.parse(JSON.parse(compiler.get('node-a')!.json())));
    await c.persisted();
    const stored2 = readLastGood(sd);
    expect(stored2.ok && stored2.value.policy).toEqual(e2.policy);
    // Written atomically: no temporary file left next to it.
    expect(readdirSync(sd)).toEqual(['policy.json']);
  });

  test('a delta that does not fit the policy held is dropped and the full policy fetched', async () => {
    // A stored copy with the current version but one service lost (a drifted copy): the
    // controller confirms the version (304), so the next change comes as a delta from it.
    const sd = stateDir();
    const good = compiler.get('node-a')!.policy;
    await writeLastGood(sd, { ...good, services: good.services.filter((s) => s.name !== 'db') }, 1);
    const c = client({ stateDir: sd });
    const events: PolicyEvent[] = [];
    c.onChange((e) => events.push(e));
    const refused = next<Error>(c, 'fetchError');
    c.start();
    await until(() => c.stats().notModified === 1 && hub.waiting() === 1);
    publish(pod('web-5', { ip: '10.0.0.15', sa: 'web' }));
    expect((await refused).message).toMatch(/policy delta does not apply: counts.services/);
    await until(() => c.current()!.policy.version === compiler.get('node-a')!.version);
    expect(c.current()!.policy).toEqual(NodePolicySchema.parse(JSON.parse(compiler.get('node-a')!.json())));
    expect(c.stats()).toMatchObject({ updates: { full: 1, delta: 0 }, errors: { invalid: 1 } });
    expect(events.map((e) => e.source)).toEqual(['disk', 'controller']);
  });

  test('starts from the last good copy when the controller is unreachable, and counts the failures', async () => {
    const sd = stateDir();
    const good = compiler.get('node-a')!.policy;
    await writeLastGood(sd, good, 1_700_000_000_000);
    const c = client({ stateDir: sd, url: 'https://127.0.0.1:1' });
    const events: PolicyEvent[] = [];
    c.onChange((e) => events.push(e));
    const failed = next(c, 'fetchError');
    c.start();
    expect(events).toEqual([{ policy: good, receivedAt: 1_700_000_000_000, source: 'disk' }]);
    await failed;
    expect(c.stats().errors.network).toBeGreaterThan(0);
    expect(c.current()!.policy).toEqual(good);
  });

  test('onReconnect fires when the controller answers again after failures, not on a first success', async () => {
    const tokenFile = join(dir, `token-${Date.now()}`);
    writeFileSync(tokenFile, tokens['node-b']!); // refused (403) until the right token is in place
    const c = new PolicyClient({ url, node: 'node-a', ca: tls.caCert, tokenFile, stateDir: stateDir(), waitSeconds: 30, backoff: { initialMs: 20, maxMs: 100 } });
    clients.push(c);
    const reconnects: number[] = [];
    c.onReconnect((n) => reconnects.push(n));
    const failed = next(c, 'fetchError');
    c.start();
    await failed;
    expect(reconnects).toEqual([]);
    writeFileSync(tokenFile, tokens['node-a']!);
    await until(() => reconnects.length === 1);
    expect(reconnects[0]).toBeGreaterThanOrEqual(1);
    expect(c.current()?.policy.node.name).toBe('node-a');

    const fine = client({ stateDir: stateDir() });
    let fired = false;
    fine.onReconnect(() => (fired = true));
    fine.start();
    await until(() => fine.current() !== undefined);
    expect(fired).toBe(false);
  });

  test('a controller whose certificate is not signed by the trusted CA is refused', async () => {
    const other = await generateTls(['localhost']);
    const c = client({ stateDir: stateDir(), ca: other.caCert });
    const failed = next<Error>(c, 'fetchError');
    c.start();
    expect((await failed).message).toMatch(/certificate/);
    expect(c.current()).toBeUndefined();
  });

  test('a token of another node gets nothing (403 counted as a status error)', async () => {
    const c = client({ stateDir: stateDir(), token: tokens['node-b'] });
    const failed = next<Error>(c, 'fetchError');
    c.start();
    expect((await failed).message).toContain('403');
    expect(c.stats().errors.status).toBeGreaterThan(0);
    expect(c.current()).toBeUndefined();
  });

  test('a stored copy for another node or failing the schema is not used', async () => {
    const sd = stateDir();
    await writeLastGood(sd, { ...compiler.get('node-b')!.policy }, 1);
    const c = client({ stateDir: sd, url: 'https://127.0.0.1:1' });
    c.start();
    expect(c.current()).toBeUndefined();
    writeFileSync(lastGoodPath(sd), JSON.stringify({ receivedAt: 1, policy: { kind: 'NodePolicy' } }));
    const r = readLastGood(sd);
    expect(r.ok).toBe(false);
    expect(!r.ok && r.why).toContain('fails the NodePolicy schema');
  });
});

describe('last good store', () => {
  test('a crash before the rename leaves the previous copy readable', async () => {
    const sd = stateDir();
    const good = compiler.get('node-a')!.policy;
    await writeLastGood(sd, good, 5);
    // What a crash mid-write leaves behind: a partial temporary file next to the good one.
    writeFileSync(`${lastGoodPath(sd)}.12345.tmp`, '{"receivedAt": 6, "pol');
    const r = readLastGood(sd);
    expect(r.ok && r.value).toEqual({ receivedAt: 5, policy: good });
    expect(JSON.parse(readFileSync(lastGoodPath(sd), 'utf8')).receivedAt).toBe(5);
  });

  test('missing file is reported as such', () => {
    const r = readLastGood(join(dir, 'nowhere'));
    expect(!r.ok && r.why).toContain('does not exist');
    expect(existsSync(join(dir, 'nowhere'))).toBe(false);
  });
});

describe('backoff', () => {
  test('doubles up to the cap, with up to half of it random', () => {
    const b = { initialMs: 100, maxMs: 1000 };
    expect(backoffDelay(1, b, () => 0)).toBe(50);
    expect(backoffDelay(1, b, () => 1)).toBe(100);
    expect(backoffDelay(3, b, () => 1)).toBe(400);
    expect(backoffDelay(10, b, () => 0)).toBe(500);
    expect(backoffDelay(10, b, () => 1)).toBe(1000);
  });
});

async function until(cond: () => boolean): Promise<void> {
  while (!cond()) await new Promise((r) => setTimeout(r, 5));
}
