import { request } from 'node:https';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import type { FastifyInstance } from 'fastify';
import { writeTokensFile } from '../../src/controller/auth.js';
import { generateTls, type TlsMaterial } from '../../src/controller/certs.js';
import { PolicyHub } from '../../src/controller/hub.js';
import { acceptsDelta, parseIfNoneMatch, parseWait } from '../../src/controller/server.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import { applyDelta } from '../../src/policy/delta.js';
import { NodePolicyDeltaSchema, NodePolicySchema } from '../../src/policy/schema.js';
import { baseMesh, pod, type Obj } from './policy-fixtures.js';
import { policyServerFixture, type PolicyServerFixture } from './policy-server-fixture.js';

interface Res {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

function get(url: string, o: { ca?: string; headers?: Record<string, string> } = {}): Promise<Res> {
  return new Promise((resolve, reject) => {
    const req = request(url, { ca: o.ca, headers: o.headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks) }));
    });
    req.on('error', reject);
    req.end();
  });
}

let fx: PolicyServerFixture;
let tls: TlsMaterial;
let dir: string;
let tokens: Record<string, string>;
let compiler: PolicyCompiler;
let hub: PolicyHub;
let server: FastifyInstance;
let base: string;

const publish = (...objs: Obj[]) => fx.publish(...objs);
const auth = (node: string) => ({ authorization: `Bearer ${tokens[node]}` });
const policyUrl = (node: string, q = '') => `${base}/v1/nodes/${node}/policy${q}`;

beforeAll(async () => {
  fx = await policyServerFixture('fsmt-ctrl-');
  ({ tls, dir, tokens, compiler, hub, server } = fx);
  base = await server.listen({ host: '127.0.0.1', port: 0 });
});

afterAll(() => fx.close());

describe('policy server over HTTPS', () => {
  test('503 with Retry-After until the sources have synced', async () => {
    const r = await get(policyUrl('node-a'), { ca: tls.caCert, headers: auth('node-a') });
    expect(r.status).toBe(503);
    expect(r.headers['retry-after']).toBe('1');
    publish(...baseMesh());
    hub.setReady();
  });

  test('200 with the node policy and its version as ETag', async () => {
    const r = await get(policyUrl('node-a'), { ca: tls.caCert, headers: auth('node-a') });
    expect(r.status).toBe(200);
    const policy = NodePolicySchema.parse(JSON.parse(r.body.toString()));
    expect(policy.node.name).toBe('node-a');
    expect(r.headers.etag).toBe(`"${policy.version}"`);
  });

  test('401 without or with an unknown token, 403 with another node’s token', async () => {
    expect((await get(policyUrl('node-a'), { ca: tls.caCert })).status).toBe(401);
    expect((await get(policyUrl('node-a'), { ca: tls.caCert, headers: { authorization: 'Bearer nope' } })).status).toBe(401);
    const r = await get(policyUrl('node-a'), { ca: tls.caCert, headers: auth('node-b') });
    expect(r.status).toBe(403);
    expect(r.body.toString()).not.toContain(tokens['node-b']);
  });

  test('400 for a malformed wait, 404 for a node with no policy', async () => {
    expect((await get(policyUrl('node-a', '?wait=soon'), { ca: tls.caCert, headers: auth('node-a') })).status).toBe(400);
    tokens['node-z'] = 'z'.repeat(40);
    await writeTokensFile(join(dir, 'tokens.json'), tokens);
    expect((await get(policyUrl('node-z'), { ca: tls.caCert, headers: auth('node-z') })).status).toBe(404);
  });

  test('304 when the wait ends without a change', async () => {
    const version = compiler.get('node-a')!.version;
    const r = await get(policyUrl('node-a', '?wait=200ms'), { ca: tls.caCert, headers: { ...auth('node-a'), 'if-none-match': `"${version}"` } });
    expect(r.status).toBe(304);
    expect(r.body.length).toBe(0);
  });

  test('a long-poll answers as soon as its node changes', async () => {
    const version = compiler.get('node-a')!.version;
    const pending = get(policyUrl('node-a', '?wait=60s'), { ca: tls.caCert, headers: { ...auth('node-a'), 'if-none-match': `"${version}"` } });
    await until(() => hub.waiting() === 1);
    publish(pod('web-2', { ip: '10.0.0.12', sa: 'web' }));
    const r = await pending;
    expect(r.status).toBe(200);
    expect(r.headers.etag).toBe(`"${compiler.get('node-a')!.version}"`);
    expect(JSON.parse(r.body.toString()).pods.map((p: { name: string }) => p.name)).toContain('web-2');
  });

  test('a change that does not affect a node does not wake it', async () => {
    const vb = compiler.get('node-b')!.version;
    const pending = get(policyUrl('node-b', '?wait=300ms'), { ca: tls.caCert, headers: { ...auth('node-b'), 'if-none-match': `W/"${vb}"` } });
    await until(() => hub.waiting() === 1);
    publish(pod('web-1', { ip: '10.0.0.1', sa: 'web', qosClass: 'Guaranteed' })); // node-a only (its cgroup)
    expect((await pending).status).toBe(304);
  });

  test('gzip when asked; the body inflates to the plain one', async () => {
    const plain = await get(policyUrl('node-a'), { ca: tls.caCert, headers: auth('node-a') });
    const gz = await get(policyUrl('node-a'), { ca: tls.caCert, headers: { ...auth('node-a'), 'accept-encoding': 'br, gzip' } });
    expect(gz.headers['content-encoding']).toBe('gzip');
    expect(gz.body.length).toBeLessThan(plain.body.length);
    expect(gunzipSync(gz.body).equals(plain.body)).toBe(true);
    // One gzip member for the whole body (decoders that stop after the first member still see it all).
    expect(gz.body.readUInt32LE(gz.body.length - 4)).toBe(plain.body.length);
  });

  test('226 with a NodePolicyDelta when asked (A-IM) from a version the node was served; 200 otherwise', async () => {
    const held = await get(policyUrl('node-a'), { ca: tls.caCert, headers: auth('node-a') });
    const heldVersion = compiler.get('node-a')!.version;
    publish(pod('web-4', { ip: '10.0.0.14', sa: 'web' }));
    const now = compiler.get('node-a')!;
    const ask = (version: string, extra: Record<string, string> = {}) =>
      get(policyUrl('node-a'), { ca: tls.caCert, headers: { ...auth('node-a'), 'if-none-match': `"${version}"`, ...extra } });

    const d = await ask(heldVersion, { 'a-im': 'vcdiff, fsm-policy-delta' });
    expect(d.status).toBe(226);
    expect(d.headers).toMatchObject({ im: 'fsm-policy-delta', 'delta-base': `"${heldVersion}"`, etag: `"${now.version}"` });
    const delta = NodePolicyDeltaSchema.parse(JSON.parse(d.body.toString()));
    expect(applyDelta(NodePolicySchema.parse(JSON.parse(held.body.toString())), delta)).toEqual(NodePolicySchema.parse(JSON.parse(now.json())));
    // Only what the pod changed: node-a's pods and mesh pods slice, the web service's endpoints.
    expect(delta.services?.set.map((x) => x.name)).toEqual(['web']);
    expect(Object.keys(delta.meshPods?.set ?? {})).toEqual(['node-a']);
    expect(delta.mesh).toBeUndefined();

    const gz = await ask(heldVersion, { 'a-im': 'fsm-policy-delta', 'accept-encoding': 'gzip' });
    expect(gz.status).toBe(226);
    expect(gunzipSync(gz.body).equals(d.body)).toBe(true);

    // Without A-IM, or from a version never served to this node: the full policy.
    expect((await ask(heldVersion)).status).toBe(200);
    expect((await ask('0123456789abcdef', { 'a-im': 'fsm-policy-delta' })).status).toBe(200);
    expect((await ask(compiler.get('node-b')!.version, { 'a-im': 'fsm-policy-delta' })).status).toBe(200);
  });

  test('A-IM lists', () => {
    expect(acceptsDelta('fsm-policy-delta')).toBe(true);
    expect(acceptsDelta('vcdiff, FSM-Policy-Delta;q=1')).toBe(true);
    expect(acceptsDelta(['gzip', 'fsm-policy-delta'])).toBe(true);
    expect(acceptsDelta('vcdiff')).toBe(false);
    expect(acceptsDelta(undefined)).toBe(false);
  });

  test('a client that does not trust the CA cannot talk to the controller', async () => {
    const other = await generateTls(['localhost']);
    await expect(get(policyUrl('node-a'), { ca: other.caCert, headers: auth('node-a') })).rejects.toThrow(/certificate/);
  });

  test('health and readiness need no token', async () => {
    expect((await get(`${base}/healthz`, { ca: tls.caCert })).status).toBe(200);
    expect((await get(`${base}/readyz`, { ca: tls.caCert })).status).toBe(200);
  });
});

describe('protocol parsing', () => {
  test('wait durations', () => {
    expect(parseWait('30s')).toBe(30_000);
    expect(parseWait('250ms')).toBe(250);
    expect(parseWait('2m')).toBe(120_000);
    expect(parseWait('5')).toBe(5000);
    expect(parseWait('-1s')).toBeUndefined();
  });

  test('If-None-Match forms', () => {
    expect(parseIfNoneMatch('"abc"')).toBe('abc');
    expect(parseIfNoneMatch('W/"abc", "def"')).toBe('abc');
    expect(parseIfNoneMatch('*')).toBeUndefined();
    expect(parseIfNoneMatch(undefined)).toBeUndefined();
  });
});

async function until(cond: () => boolean): Promise<void> {
  while (!cond()) await new Promise((r) => setTimeout(r, 5));
}
