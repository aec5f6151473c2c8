import type { Kind } from '../../src/policy/objects.js';
import { NodePolicySchema } from '../../src/policy/schema.js';
import { parseDuration, parseHost, parseResilienceDefaults, parseRetrySpec, parseUpstreamSpec } from '../../src/policy/resilience.js';
import { renderResilience } from '../../src/proxy/resilience-config.js';
import { baseMesh, compiled, meshConfig, type Obj } from './policy-fixtures.js';

const retry = (name: string, spec: Record<string, unknown>, ns = 'app'): Obj => ({ apiVersion: 'policy.flomesh.io/v1alpha1', kind: 'Retry', metadata: { name, namespace: ns }, spec });
const uts = (name: string, spec: Record<string, unknown>, ns = 'app'): Obj => ({ apiVersion: 'policy.flomesh.io/v1alpha1', kind: 'UpstreamTrafficSetting', metadata: { name, namespace: ns }, spec });
const retrySpec = { source: { kind: 'ServiceAccount', name: 'web' }, destinations: [{ kind: 'Service', name: 'api' }], retryPolicy: { retryOn: '5xx,reset', numRetries: 2, perTryTimeout: '500ms' } };

describe('Retry', () => {
  test('reads FSM fields, defaulting namespaces to the object’s', () => {
    expect(parseRetrySpec(retrySpec, 'app')).toEqual({
      source: { namespace: 'app', serviceAccount: 'web' },
      destinations: [{ namespace: 'app', name: 'api' }],
      retryOn: ['5xx', 'reset'],
      perTryTimeoutMs: 500,
      numRetries: 2,
      backoffBaseMs: 25,
    });
  });
  test.each([
    [{ ...retrySpec, source: { kind: 'Pod', name: 'web' } }, 'spec.source.kind', /not ServiceAccount/],
    [{ ...retrySpec, destinations: [] }, 'spec.destinations', /at least one Service/],
    [{ ...retrySpec, destinations: [{ kind: 'Service', name: 'API' }] }, 'spec.destinations[0].name', /RFC 1123/],
    [{ ...retrySpec, retryPolicy: { retryOn: '5xx,teapot' } }, 'spec.retryPolicy.retryOn', /item 2 "teapot"/],
    [{ ...retrySpec, retryPolicy: { retryOn: '5xx', numRetries: 50 } }, 'spec.retryPolicy.numRetries', /0 to 10/],
    [{ ...retrySpec, retryPolicy: { retryOn: '5xx', perTryTimeout: '2 seconds' } }, 'spec.retryPolicy.perTryTimeout', /not a duration/],
  ])('names the bad field %#', (spec, field, message) => {
    let err: unknown;
    try {
      parseRetrySpec(spec, 'app');
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ field });
    expect((err as Error).message).toMatch(message);
  });
});

describe('UpstreamTrafficSetting', () => {
  test('host forms and durations', () => {
    expect(parseHost('spec.host', 'api', 'app')).toEqual({ namespace: 'app', name: 'api' });
    expect(parseHost('spec.host', 'api.other', 'app')).toEqual({ namespace: 'other', name: 'api' });
    expect(parseHost('spec.host', 'api.other.svc.cluster.local', 'app')).toEqual({ namespace: 'other', name: 'api' });
    expect(() => parseHost('spec.host', 'api.other.example.com', 'app')).toThrow(/not a service name/);
    expect(parseDuration('f', '1m30s')).toBe(90_000);
    expect(parseDuration('f', '250ms')).toBe(250);
    expect(() => parseDuration('f', '5')).toThrow(/not a duration/);
  });
  test('reads limits, rate limits, routes and the fsm-node extensions', () => {
    const u = parseUpstreamSpec(
      {
        host: 'api',
        connectionSettings: { tcp: { maxConnections: 10, connectTimeout: '1s' }, http: { maxPendingRequests: 5, maxRequestsPerConnection: 3, requestTimeout: '2s' } },
        rateLimit: { local: { tcp: { connections: 60, unit: 'minute', burst: 5 }, http: { requests: 100, unit: 'second', burst: 20, responseStatusCode: 503, responseHeadersToAdd: [{ name: 'X-Limited', value: 'yes' }] } } },
        httpRoutes: [{ path: '/slow/.*', timeout: '20s' }],
        outlierDetection: { consecutiveFailures: 2, baseEjectionTime: '5s' },
      },
      'app',
    );
    expect(u).toMatchObject({ maxConnections: 10, connectTimeoutMs: 1000, maxPendingRequests: 5, maxRequestsPerConnection: 3, requestTimeoutMs: 2000, outlier: { consecutiveFailures: 2, baseEjectionMs: 5000 } });
    expect(u.rateLimit).toEqual({ tcp: { amount: 60, unitSeconds: 60, burst: 5 }, http: { amount: 100, unitSeconds: 1, burst: 20, status: 503, headers: { 'x-limited': 'yes' } } });
    expect(u.routes).toEqual([{ path: '/slow/.*', timeoutMs: 20_000, rateLimit: null }]);
  });
  test.each([
    [{ host: 'api', connectionSettings: { tcp: { maxConnections: 0 } } }, 'spec.connectionSettings.tcp.maxConnections'],
    [{ host: 'api', rateLimit: { local: { http: { requests: 10, unit: 'day' } } } }, 'spec.rateLimit.local.http.unit'],
    [{ host: 'api', rateLimit: { local: { http: { requests: 10, unit: 'second', responseStatusCode: 200 } } } }, 'spec.rateLimit.local.http.responseStatusCode'],
    [{ host: 'api', httpRoutes: [{ path: '/(' }] }, 'spec.httpRoutes[0].path'],
    [{ host: 'api', connectionSettings: { http: { circuitBreaking: { statTimeWindow: '10s' } } } }, 'spec.connectionSettings.http.circuitBreaking'],
    [{ host: 'api', outlierDetection: { maxEjectionPercent: 150 } }, 'spec.outlierDetection.maxEjectionPercent'],
  ])('names the bad field %#', (spec, field) => {
    expect(() => parseUpstreamSpec(spec, 'app')).toThrow(expect.objectContaining({ field }) as Error);
  });
  test('mesh config defaults: requestTimeout "0s" turns the default timeout off; bad keys are named', () => {
    expect(parseResilienceDefaults({}).requestTimeoutMs).toBe(15_000);
    expect(parseResilienceDefaults({ requestTimeout: '0s' }).requestTimeoutMs).toBeNull();
    expect(parseResilienceDefaults({ outlierDetection: 'off' }).outlier.enabled).toBe(false);
    expect(() => parseResilienceDefaults({ outlierMaxEjectionPercent: '101' })).toThrow(expect.objectContaining({ field: 'data.outlierMaxEjectionPercent' }) as Error);
  });
});

describe('compiled into every NodePolicy and rendered for the proxy', () => {
  test('a valid Retry and setting reach both nodes; a bad update is reported and the last good stays', () => {
    const c = compiled([...baseMesh(), meshConfig({ requestTimeout: '3s' }), retry('web-to-api', retrySpec), uts('api', { host: 'api', connectionSettings: { http: { requestTimeout: '1s' } } })]);
    for (const n of ['node-a', 'node-b']) {
      const p = c.get(n)!.policy;
      expect(NodePolicySchema.safeParse(p).success).toBe(true);
      expect(p.resilience!.retries.map((r) => r.name)).toEqual(['web-to-api']);
      expect(p.resilience!.upstreams.map((u) => u.requestTimeoutMs)).toEqual([1000]);
      expect(p.resilience!.defaults.requestTimeoutMs).toBe(3000);
    }
    const before = c.get('node-a')!.version;
    expect(c.upsert('Retry' as Kind, retry('web-to-api', { ...retrySpec, retryPolicy: { retryOn: 'sometimes' } }))).toBe(false);
    c.compile();
    expect(c.get('node-a')!.version).toBe(before);
    expect(c.get('node-a')!.policy.resilience!.retries[0]!.retryOn).toEqual(['5xx', 'reset']);
    expect(c.reporter.active()).toEqual([expect.objectContaining({ ref: { kind: 'Retry', namespace: 'app', name: 'web-to-api' }, stage: 'input', field: 'spec.retryPolicy.retryOn', keptLastGood: true })]);

    const proxy = renderResilience(c.get('node-a')!.policy.resilience, c.get('node-a')!.policy.services);
    expect(proxy.retries['app/web']!['app/api']).toEqual({ policy: 'app/web-to-api', statuses: [], classes: ['5xx'], reset: true, connectFailure: false, numRetries: 2, perTryTimeoutMs: 500, backoffBaseMs: 25 });
    expect(proxy.services['app/api']!.timeoutMs).toBe(1000);
    expect(proxy.defaults.timeoutMs).toBe(3000);
    expect(proxy.defaults.outlier).toEqual({ enabled: true, consecutiveFailures: 5, baseEjectionMs: 30_000, maxEjectionMs: 300_000, maxEjectionPercent: 50 });
    expect(proxy.retryMethods).not.toContain('POST');
  });
  test('a mesh with no Retry, no setting and default mesh settings carries no resilience part (read as the defaults); removing the last object removes it through a delta too', async () => {
    const { applyDelta, deltaPieces } = await import('../../src/policy/delta.js');
    const { NodePolicyDeltaSchema } = await import('../../src/policy/schema.js');
    const plain = compiled(baseMesh()).get('node-a')!.policy;
    expect(plain.resilience).toBeUndefined();
    expect(renderResilience(plain.resilience, plain.services).defaults.timeoutMs).toBe(15_000);
    const c = compiled([...baseMesh(), retry('web-to-api', retrySpec)]);
    const held = c.get('node-a')!;
    expect(held.policy.resilience!.retries).toHaveLength(1);
    c.remove({ kind: 'Retry' as Kind, namespace: 'app', name: 'web-to-api' });
    c.compile();
    const now = c.get('node-a')!;
    expect(now.policy.resilience).toBeUndefined();
    const [shared, tail] = deltaPieces({ version: held.version, parts: held.parts }, now);
    const applied = applyDelta(held.policy, NodePolicyDeltaSchema.parse(JSON.parse(`{${shared.text()}${tail}`)));
    expect(applied.resilience).toBeUndefined();
    expect(applied).toEqual(now.policy);
  });
  test('a setting for a service the node does not know is left out of its proxy config', () => {
    const c = compiled([...baseMesh(), uts('ghost', { host: 'ghost' })]);
    const p = c.get('node-a')!.policy;
    expect(renderResilience(p.resilience, p.services).services).toEqual({});
  });
});

describe('fsm-node status: ejected endpoints and open circuits from the agent metrics', () => {
  test('reads the re-exported proxy gauges (only those at 1 or more)', async () => {
    const { resilienceView, resilienceStatusRows } = await import('../../src/proxy/resilience-status.js');
    const text = [
      '# TYPE fsm_node_proxy_ejected_endpoints gauge',
      'fsm_node_proxy_ejected_endpoints{service="app/api",endpoint="10.0.1.1:8080",node="n1"} 1',
      'fsm_node_proxy_ejected_endpoints{service="app/api",endpoint="10.0.1.2:8080",node="n1"} 0',
      // Summed over two proxy instances that both ejected it (each keeps its own state).
      'fsm_node_proxy_ejected_endpoints{service="app/web",endpoint="10.0.1.3:8080",node="n1"} 2',
      '# TYPE fsm_node_proxy_circuit_open gauge',
      'fsm_node_proxy_circuit_open{service="app/db",node="n1"} 1',
      '# TYPE fsm_node_proxy_peer_down gauge',
      'fsm_node_proxy_peer_down{peer="10.78.0.2:15003",node="n1"} 1',
    ].join('\n');
    const v = resilienceView(text);
    expect(v).toEqual({ ejected: [{ service: 'app/api', endpoint: '10.0.1.1:8080' }, { service: 'app/web', endpoint: '10.0.1.3:8080' }], peersDown: ['10.78.0.2:15003'], openCircuits: ['app/db'] });
    expect(resilienceStatusRows(v)).toEqual([
      ['ejected', 'app/api: 10.0.1.1:8080; app/web: 10.0.1.3:8080'],
      ['peers down', '10.78.0.2:15003'],
      ['open circuits', 'app/db'],
    ]);
    expect(resilienceStatusRows(resilienceView(''))).toEqual([['ejected', 'none'], ['open circuits', 'none']]);
  });
});
