import { request as httpsRequest } from 'node:https';
import { metricValue } from '../support/pipy.js';
import { ProcessMesh, processMeshSkipReason, slowly } from '../support/process-mesh.js';

/**
 * The identity metrics issue 17 asks for, read where an operator reads them
 * (the agent's and the controller's /metrics, real processes,
 * test/support/process-mesh.ts): certificate expiry per identity, issuance
 * failures, TLS handshake failures by reason, and the peer identity the
 * client certificate proved on the per-identity series. Renewal failures
 * are checked in identity-expiry.test.ts, where the controller is down.
 */

const skip = processMeshSkipReason();
if (skip) console.log(`${skip} (identity metrics test)`);
const maybe = skip ? describe.skip : describe;

maybe('identity metrics on the agents and the controller (real processes, Pipy)', () => {
  let mesh: ProcessMesh;

  beforeAll(async () => {
    mesh = await ProcessMesh.start();
    const ids = await slowly(async () => Promise.all([mesh.identity(mesh.n1, 'demo/p1'), mesh.identity(mesh.n2, 'demo/p2')]), (x) => x.every((i) => i?.state === 'valid'), 60_000);
    if (!ids.every((i) => i?.state === 'valid')) throw new Error(`identities not valid: ${JSON.stringify(ids)}`);
  }, 180_000);

  afterAll(async () => {
    await mesh?.destroy();
  }, 60_000);

  test('fsm_node_identity_certificate_expiry_timestamp_seconds{identity} is each certificate\'s notAfter', async () => {
    for (const [n, id] of [[mesh.n1, 'demo/p1'], [mesh.n2, 'demo/p2']] as const) {
      const i = await mesh.identity(n, id);
      expect(metricValue(await mesh.metrics(n), 'fsm_node_identity_certificate_expiry_timestamp_seconds', { identity: id })).toBe(Date.parse(i!.notAfter!) / 1000);
    }
  });

  test('a refused issuance is counted by reason: n1 asking for p2, which has no pod on n1, is 403 not_on_node', async () => {
    const ask = () =>
      new Promise<{ status: number; body: string }>((resolve, reject) => {
        const req = httpsRequest(`${mesh.controllerUrl}/v1/nodes/n1/identities`, { method: 'POST', ca: mesh.controllerCa(), headers: { authorization: `Bearer ${mesh.token(mesh.n1)}`, 'content-type': 'application/json' } }, (res) => {
          let body = '';
          res.on('data', (c: Buffer) => (body += c.toString()));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
        });
        req.on('error', reject);
        req.end(JSON.stringify({ namespace: 'demo', serviceAccount: 'p2', csr: 'x' }));
      });
    const controllerMetrics = () =>
      new Promise<string>((resolve, reject) => {
        const req = httpsRequest(`${mesh.controllerUrl}/metrics`, { ca: mesh.controllerCa() }, (res) => {
          let body = '';
          res.on('data', (c: Buffer) => (body += c.toString()));
          res.on('end', () => resolve(body));
        });
        req.on('error', reject);
        req.end();
      });
    const before = metricValue(await controllerMetrics(), 'fsm_node_controller_certificate_refusals_total', { reason: 'not_on_node' });
    const r = await ask();
    expect(r.status).toBe(403);
    expect(JSON.parse(r.body)).toMatchObject({ reason: 'not_on_node' });
    expect(metricValue(await controllerMetrics(), 'fsm_node_controller_certificate_refusals_total', { reason: 'not_on_node' })).toBe(before + 1);
    // One certificate per identity so far (p1 on n1, p2 on n2), and none for the refused request.
    expect(Number(/^fsm_node_controller_certificates_issued_total (\S+)$/m.exec(await controllerMetrics())?.[1])).toBe(2);
  });

  test('handshake failures by reason: the issue 17 exploit (plaintext CONNECT claiming an identity) from another node\'s host network', async () => {
    const m = () => mesh.metrics(mesh.n1).then((t) => metricValue(t, 'fsm_node_proxy_tls_handshake_failures_total', { side: 'server', reason: 'plaintext' }));
    const before = await m();
    const r = await mesh.n2.run('curl', ['-sS', '-m', '5', '-o', '-', '-w', '\n%{http_code}', '-p', '-x', `http://${mesh.n1.underlayIp}:15003`, '--proxy-header', 'fsmn-source-identity: demo/p2', `http://${mesh.p1.ip}:8080/`]);
    expect(r.stdout.trimEnd().split('\n').pop()).not.toBe('200');
    expect(r.stdout).not.toContain('"pod":"p1"');
    const after = await slowly(m, (v) => v > before, 10_000);
    expect(after).toBe(before + 1);
  });

  test('the tunnel\'s far side counts it under the identity the client certificate proved', async () => {
    const tunnels = () => mesh.metrics(mesh.n1).then((t) => metricValue(t, 'fsm_node_proxy_tunnels_total', { source: 'demo/p2', destination: 'demo/p1', transport: 'mtls' }));
    const before = await tunnels();
    expect(await slowly(() => mesh.get(mesh.p2), (x) => x.status === 200, 30_000)).toMatchObject({ status: 200, pod: 'p1' });
    expect(await slowly(tunnels, (v) => v > before, 10_000)).toBeGreaterThan(before);
    // The source node counts the request under the same pair.
    expect(metricValue(await mesh.metrics(mesh.n2), 'fsm_node_proxy_requests_total', { source: 'demo/p2', destination: 'demo/p1' })).toBeGreaterThan(0);
  });
});
