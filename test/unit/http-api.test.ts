import { Registry, Gauge } from 'prom-client';
import { buildApi, type AgentView } from '../../src/http/server.js';

function view(reason?: string): AgentView {
  const registry = new Registry();
  new Gauge({ name: 'fsm_node_enrolled_pods', help: 'Pods whose interception is installed.', registers: [registry] }).set(3);
  return { notReadyReason: () => reason, state: () => ({ mode: 'ebpf', pods: 3 }), registry };
}

describe('agent HTTP API', () => {
  test('/healthz answers while the process lives', async () => {
    const res = await buildApi(view('policy not loaded')).inject('/healthz');
    expect(res.statusCode).toBe(200);
  });

  test('/readyz is 503 with the reason until ready', async () => {
    const res = await buildApi(view('proxy not ready: admin port closed')).inject('/readyz');
    expect(res.statusCode).toBe(503);
    expect(res.json()).toEqual({ ready: false, reason: 'proxy not ready: admin port closed' });
    expect((await buildApi(view()).inject('/readyz')).statusCode).toBe(200);
  });

  test('/metrics serves the Prometheus exposition', async () => {
    const res = await buildApi(view()).inject('/metrics');
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-type']).toContain('text/plain');
    expect(res.body).toContain('fsm_node_enrolled_pods 3');
  });

  test('/v1/state: loopback yes, remote without token no, remote with token yes', async () => {
    const app = buildApi(view(), { token: 's3cret' });
    expect((await app.inject({ url: '/v1/state', remoteAddress: '127.0.0.1' })).json()).toEqual({ mode: 'ebpf', pods: 3 });
    expect((await app.inject({ url: '/v1/state', remoteAddress: '10.0.0.9' })).statusCode).toBe(403);
    expect((await app.inject({ url: '/v1/state', remoteAddress: '10.0.0.9', headers: { authorization: 'Bearer wrong' } })).statusCode).toBe(403);
    expect((await app.inject({ url: '/v1/state', remoteAddress: '10.0.0.9', headers: { authorization: 'Bearer s3cret' } })).statusCode).toBe(200);
  });
});
