import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { generateTokens, writeTokensFile } from '../../src/controller/auth.js';
import { parseListen, runController, type RunningController } from '../../src/controller/main.js';
import { InvalidInputError } from '../../src/errors.js';
import { PolicyClient, type PolicyEvent } from '../../src/policy/client.js';
import { TestApiServer, type Obj as ApiObj } from '../support/k8s-api-server.js';
import { baseMesh, pod } from './policy-fixtures.js';

let dir: string;
let ctrl: RunningController | undefined;
let client: PolicyClient | undefined;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'fsmt-ctrl-main-'));
});

afterEach(async () => {
  await client?.stop();
  await ctrl?.close();
  client = ctrl = undefined;
  rmSync(dir, { recursive: true, force: true });
});

const next = (c: PolicyClient, pred: (e: PolicyEvent) => boolean): Promise<PolicyEvent> =>
  new Promise((resolve) => {
    const on = (e: PolicyEvent) => {
      if (!pred(e)) return;
      c.off('policy', on);
      resolve(e);
    };
    c.on('policy', on);
  });

describe('runController', () => {
  test('manifest mode: serves each node its policy over HTTPS and follows edits', async () => {
    const manifests = join(dir, 'manifests');
    mkdirSync(manifests);
    writeFileSync(join(manifests, 'mesh.yaml'), baseMesh().map((o) => stringify(o)).join('---\n'));
    const tokens = generateTokens(['node-a', 'node-b']);
    await writeTokensFile(join(dir, 'tokens.json'), tokens);
    ctrl = await runController({ manifests, tokens: join(dir, 'tokens.json'), listen: '127.0.0.1:0', stateDir: join(dir, 'state') });
    expect(readFileSync(join(dir, 'state', 'ca.crt'), 'utf8')).toBe(ctrl.caCert);

    client = new PolicyClient({ url: ctrl.url, node: 'node-a', ca: ctrl.caCert, token: tokens['node-a'], stateDir: dir, backoff: { initialMs: 20, maxMs: 100 } });
    const first = next(client, () => true);
    client.start();
    expect((await first).policy.pods.map((p) => p.name).sort()).toEqual(['db-1', 'web-1']);

    const second = next(client, (e) => e.policy.pods.length === 3);
    writeFileSync(join(manifests, 'more.yaml'), stringify(pod('web-2', { ip: '10.0.0.12' })));
    expect((await second).policy.pods.map((p) => p.name).sort()).toEqual(['db-1', 'web-1', 'web-2']);
    // The edit came as a delta; the controller counts what it sent by kind.
    expect(client.stats().updates).toEqual({ full: 1, delta: 1 });
    const metrics = await ctrl.server.inject({ method: 'GET', url: '/metrics' });
    expect(metrics.body).toContain('fsm_node_controller_policy_responses_total{kind="full"} 1');
    expect(metrics.body).toContain('fsm_node_controller_policy_responses_total{kind="delta"} 1');
    expect(metrics.body).toMatch(/^fsm_node_controller_policy_response_bytes_total\{kind="delta"\} [1-9]\d*$/m);
  });

  test('a restart keeps the CA agents already trust', async () => {
    const manifests = join(dir, 'manifests');
    mkdirSync(manifests);
    await writeTokensFile(join(dir, 'tokens.json'), generateTokens(['node-a']));
    const opts = { manifests, tokens: join(dir, 'tokens.json'), listen: '127.0.0.1:0', stateDir: join(dir, 'state') };
    ctrl = await runController(opts);
    const ca = ctrl.caCert;
    await ctrl.close();
    ctrl = await runController(opts);
    expect(ctrl.caCert).toBe(ca);
  });

  test('kubeconfig mode: informers, TokenReview, the CA published for agents', async () => {
    const api = await TestApiServer.start();
    try {
      for (const o of baseMesh()) api.create(o as ApiObj);
      api.create(pod('agent-b', { ns: 'fsm-system', node: 'node-b', uid: 'agent-b-uid' }) as ApiObj);
      api.tokens.set('sa-token-b', {
        username: 'system:serviceaccount:fsm-system:fsm-node-agent',
        extra: { 'authentication.kubernetes.io/pod-name': ['agent-b'], 'authentication.kubernetes.io/pod-uid': ['agent-b-uid'] },
      });
      const kubeconfig = join(dir, 'kubeconfig');
      writeFileSync(kubeconfig, api.kubeConfig().exportConfig());
      ctrl = await runController({ kubeconfig, listen: '127.0.0.1:0' });
      expect(api.get('ConfigMap', 'fsm-system', 'fsm-node-controller-ca')!.data).toEqual({ 'ca.crt': ctrl.caCert });

      const tokenFile = join(dir, 'token');
      writeFileSync(tokenFile, 'sa-token-b\n');
      client = new PolicyClient({ url: ctrl.url, node: 'node-b', ca: ctrl.caCert, tokenFile, stateDir: dir, backoff: { initialMs: 20, maxMs: 100 } });
      const first = next(client, () => true);
      client.start();
      expect((await first).policy.pods.map((p) => p.name)).toEqual(['api-1']);
      const second = next(client, (e) => e.policy.pods.length === 2);
      api.create(pod('api-2', { node: 'node-b', ip: '10.0.1.2' }) as ApiObj);
      expect((await second).policy.pods.map((p) => p.name).sort()).toEqual(['api-1', 'api-2']);

      // An identity failing closed on the node becomes a Warning Event on its Node, through the API server.
      const reason = 'certificate expired at 2026-12-04T08:00:00.000Z without renewal: controller answered 503';
      await client.reportStatus({ ready: true, desired: 'auto', effective: 'ebpf', expiredIdentities: [{ namespace: 'app', serviceAccount: 'api', reason }] });
      const event = await new Promise<ApiObj>((resolve) => {
        const poll = () => {
          const e = api.list('Event').find((o) => (o as { reason?: string }).reason === 'IdentityExpired');
          if (e) resolve(e);
          else setTimeout(poll, 20);
        };
        poll();
      });
      expect(event).toMatchObject({ metadata: { namespace: 'default' }, involvedObject: { kind: 'Node', name: 'node-b' }, type: 'Warning', source: { component: 'fsm-node-controller' } });
      expect((event as { message?: string }).message).toContain(`app/api (${reason})`);
      await client.stop();
      client = undefined;
    } finally {
      await ctrl?.close();
      ctrl = undefined;
      await api.close();
    }
  });

  test('flags are checked before anything starts', async () => {
    await expect(runController({ manifests: dir })).rejects.toThrow(/--tokens/);
    await expect(runController({ manifests: dir, kubeconfig: 'x', tokens: 't' })).rejects.toThrow(/exactly one of/);
    expect(() => parseListen('15443')).toThrow(InvalidInputError);
    expect(parseListen('[::1]:15443')).toEqual({ host: '::1', port: 15443 });
  });
});
