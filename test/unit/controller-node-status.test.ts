import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { CoreV1Event } from '@kubernetes/client-node';
import type { FastifyInstance } from 'fastify';
import { generateTokens, TokenFileAuthenticator, writeTokensFile } from '../../src/controller/auth.js';
import { generateTls } from '../../src/controller/certs.js';
import { PolicyHub } from '../../src/controller/hub.js';
import { nodeIdentityEvent, nodeModeEvent, NodeStatusEvents } from '../../src/controller/node-status.js';
import { buildPolicyServer } from '../../src/controller/server.js';
import { PolicyClient } from '../../src/policy/client.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import type { NodeModeStatus } from '../../src/policy/schema.js';

const NOW = new Date('2026-01-01T00:00:00Z');
const fallback: NodeModeStatus = { ready: true, desired: 'ebpf', effective: 'iptables', fallbackReason: 'ebpf unavailable: bpf-load:connect4: not supported' };
const none: NodeModeStatus = { ready: false, desired: 'auto', reason: 'no interception mode works: ebpf: cgroup2: absent; iptables: ipset: not found' };
const fine: NodeModeStatus = { ready: true, desired: 'auto', effective: 'ebpf' };

describe('nodeModeEvent', () => {
  test('a fallback is a Warning on the Node naming both modes and the missing capability', () => {
    expect(nodeModeEvent('node-a', fallback, NOW)).toMatchObject({
      involvedObject: { kind: 'Node', name: 'node-a', apiVersion: 'v1' },
      metadata: { namespace: 'default', generateName: 'node-a.' },
      type: 'Warning',
      reason: 'InterceptionModeFallback',
      message: 'interception mode ebpf wanted, iptables in use: ebpf unavailable: bpf-load:connect4: not supported',
    });
  });

  test('no working mode is a Warning that the pods are not served, with the reason', () => {
    expect(nodeModeEvent('node-a', none, NOW)).toMatchObject({ reason: 'InterceptionUnavailable', message: expect.stringContaining('ipset: not found') });
  });

  test('the desired mode in force is no Event', () => {
    expect(nodeModeEvent('node-a', fine, NOW)).toBeUndefined();
  });
});

describe('nodeIdentityEvent', () => {
  test('identities failing closed are one Warning naming them and why; none is no Event', () => {
    const expired = { ...fine, expiredIdentities: [{ namespace: 'demo', serviceAccount: 'web', reason: 'certificate expired at 2026-01-01T00:00:00.000Z without renewal: controller unreachable' }] };
    expect(nodeIdentityEvent('node-a', expired, NOW)).toMatchObject({
      involvedObject: { kind: 'Node', name: 'node-a' },
      type: 'Warning',
      reason: 'IdentityExpired',
      message: 'fsm-node fails closed for 1 identity on this node whose certificate expired without renewal: demo/web (certificate expired at 2026-01-01T00:00:00.000Z without renewal: controller unreachable)',
    });
    expect(nodeIdentityEvent('node-a', fine, NOW)).toBeUndefined();
  });

  test('mode and identity problems post separately, each once', async () => {
    const posted: CoreV1Event[] = [];
    const events = new NodeStatusEvents(async (e) => void posted.push(e));
    const both = { ...fallback, expiredIdentities: [{ namespace: 'demo', serviceAccount: 'web', reason: 'expired' }] };
    await events.report('node-a', both, NOW);
    await events.report('node-a', both, NOW);
    expect(posted.map((e) => e.reason)).toEqual(['InterceptionModeFallback', 'IdentityExpired']);
    await events.report('node-a', fallback, NOW); // renewed
    await events.report('node-a', both, NOW); // expired again: a new Event
    expect(posted.map((e) => e.reason)).toEqual(['InterceptionModeFallback', 'IdentityExpired', 'IdentityExpired']);
  });
});

describe('NodeStatusEvents', () => {
  test('one Event per node and distinct problem; again after recovery; a failed post is retried', async () => {
    const posted: CoreV1Event[] = [];
    let fail = false;
    const events = new NodeStatusEvents(async (e) => {
      if (fail) throw new Error('apiserver down');
      posted.push(e);
    });
    await events.report('node-a', fallback, NOW);
    await events.report('node-a', fallback, NOW);
    await events.report('node-b', fallback, NOW);
    expect(posted.map((e) => e.involvedObject.name)).toEqual(['node-a', 'node-b']);
    await events.report('node-a', fine, NOW);
    await events.report('node-a', fallback, NOW);
    expect(posted).toHaveLength(3);
    fail = true;
    await events.report('node-a', none, NOW);
    fail = false;
    await events.report('node-a', none, NOW);
    expect(posted.map((e) => e.reason)).toEqual(['InterceptionModeFallback', 'InterceptionModeFallback', 'InterceptionModeFallback', 'InterceptionUnavailable']);
  });
});

describe('POST /v1/nodes/:node/status', () => {
  let dir: string;
  let tokens: Record<string, string>;
  let server: FastifyInstance;
  let ca: string;
  const got: Array<[string, NodeModeStatus]> = [];

  beforeAll(async () => {
    const tls = await generateTls(['localhost', '127.0.0.1']);
    ca = tls.caCert;
    dir = mkdtempSync(join(tmpdir(), 'fsmn-status-'));
    tokens = generateTokens(['node-a', 'node-b']);
    await writeTokensFile(join(dir, 'tokens.json'), tokens);
    const compiler = new PolicyCompiler();
    server = buildPolicyServer({ hub: new PolicyHub((n) => compiler.get(n)), auth: new TokenFileAuthenticator(join(dir, 'tokens.json')), tls, onNodeStatus: (n, s) => void got.push([n, s]) });
  });
  afterAll(async () => {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const post = (node: string, body: unknown, token?: string) =>
    server.inject({ method: 'POST', url: `/v1/nodes/${node}/status`, payload: body as object, headers: token ? { authorization: `Bearer ${token}` } : {} });

  test("the node's own token: 204 and the report reaches the controller", async () => {
    const r = await post('node-a', fallback, tokens['node-a']);
    expect(r.statusCode).toBe(204);
    expect(got).toEqual([['node-a', fallback]]);
  });

  test('no token, an unknown token, another node’s token: refused, nothing reported', async () => {
    got.length = 0;
    expect((await post('node-a', fallback)).statusCode).toBe(401);
    expect((await post('node-a', fallback, 'nope')).statusCode).toBe(401);
    const other = await post('node-a', fallback, tokens['node-b']);
    expect(other.statusCode).toBe(403);
    expect(other.json()).toMatchObject({ message: 'this token belongs to node "node-b"' });
    expect(got).toEqual([]);
  });

  test("the agent's PolicyClient reports over HTTPS with its token; a refusal is an error", async () => {
    got.length = 0;
    const base = await server.listen({ host: '127.0.0.1', port: 0 });
    const client = (node: string, token: string) => new PolicyClient({ url: base, node, ca, token, stateDir: dir });
    await client('node-a', tokens['node-a']!).reportStatus(none);
    expect(got).toEqual([['node-a', none]]);
    await expect(client('node-a', tokens['node-b']!).reportStatus(none)).rejects.toThrow(/403/);
  });

  test('a malformed report: 400 naming the field and value', async () => {
    got.length = 0;
    const r = await post('node-a', { ...fallback, effective: 'nft' }, tokens['node-a']);
    expect(r.statusCode).toBe(400);
    expect(r.json().message).toMatch(/effective: .*'nft'/);
    expect(got).toEqual([]);
  });
});
