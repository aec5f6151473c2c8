import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { meshView } from '../../src/lab/check.js';
import { CHECK_FILE, foreignResilienceObjects, planResilience, renderCheckPolicy, sampleSum, type ResiliencePlan } from '../../src/lab/check-resilience.js';
import { renderManifests } from '../../src/lab/manifests.js';
import type { LabPod } from '../../src/lab/state.js';
import { compileFiles, labInput } from './lab-fixtures.js';

/** The pure parts of `lab check`'s resilience cases (src/lab/check-resilience.ts); the cases themselves run in the e2e tier. */

const input = labInput;
const pods: LabPod[] = input.pods.map((p) => ({ name: p.name, node: p.node, ip: p.ip, netns: `fsmlab-${p.node}-${p.name}`, cgroupPath: p.cgroupPath, version: p.version }));

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'fsmlab-unit-res-'));
  for (const [name, text] of renderManifests(input)) {
    mkdirSync(dirname(join(dir, name)), { recursive: true });
    writeFileSync(join(dir, name), text);
  }
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const compile = compileFiles;

describe('lab check resilience: the plan', () => {
  test('a backend service with two endpoints, a client outside it that may call both, the endpoint on its node faulted', () => {
    const plan = planResilience(pods, meshView(dir)) as ResiliencePlan;
    expect([plan.service.name, plan.client.name, plan.faulty.name, plan.healthy.map((p) => p.name)]).toEqual(['echo-v1', 'p2', 'p1', ['p3']]);
  });

  test('never the denied source, nor a client the manifests leave out of the mesh', () => {
    // p2 out of the mesh: p4 is denied p1, so echo-v1 has no client; echo-v2 (p2 gone, p4 alone) has one endpoint.
    rmSync(join(dir, 'pods', 'p2.yaml'));
    expect(planResilience(pods, meshView(dir))).toMatch(/^needs a backend service .* two enrolled endpoints/);
  });

  test('a lab too small for it says so', () => {
    expect(planResilience(pods.slice(0, 2), meshView(dir))).toMatch(/2 nodes x 2 pods/);
  });
});

describe('lab check resilience: the policies it writes', () => {
  test('compile without an issue into every node policy, as the controller reads them', () => {
    const plan = planResilience(pods, meshView(dir)) as ResiliencePlan;
    const files = renderManifests(input);
    files.set(
      CHECK_FILE,
      renderCheckPolicy(plan, { connectionSettings: { http: { requestTimeout: '1000ms' } }, outlierDetection: { consecutiveFailures: 2, baseEjectionTime: '20s' }, rateLimit: { local: { http: { requests: 4, unit: 'second', burst: 16 } } } }, true),
    );
    const compiler = compile(files);
    expect(compiler.reporter.active()).toEqual([]);
    for (const node of ['n1', 'n2']) {
      const r = compiler.get(node)!.policy.resilience!;
      expect(r.retries).toEqual([expect.objectContaining({ source: expect.objectContaining({ serviceAccount: 'p2' }), destinations: [{ namespace: 'demo', name: 'echo-v1' }], retryOn: ['5xx'], numRetries: 2, backoffBaseMs: 10 })]);
      expect(r.upstreams).toEqual([
        expect.objectContaining({
          service: { namespace: 'demo', name: 'echo-v1' },
          requestTimeoutMs: 1000,
          outlier: { consecutiveFailures: 2, baseEjectionMs: 20_000 },
          rateLimit: { tcp: null, http: expect.objectContaining({ amount: 4, unitSeconds: 1, burst: 16, status: 429 }) },
        }),
      ]);
    }
  });

  test('a Retry or UpstreamTrafficSetting of the user is found (the cases then skip), the check file is not', () => {
    const plan = planResilience(pods, meshView(dir)) as ResiliencePlan;
    writeFileSync(join(dir, CHECK_FILE), renderCheckPolicy(plan, {}, true));
    expect(foreignResilienceObjects(dir)).toEqual([]);
    mkdirSync(join(dir, 'policies'));
    writeFileSync(join(dir, 'policies', 'mine.yaml'), renderCheckPolicy(plan, {}).replace('lab-check-echo-v1', 'mine'));
    expect(foreignResilienceObjects(dir)).toEqual(['UpstreamTrafficSetting demo/mine']);
  });
});

test('sampleSum adds the samples whose labels match (the agent already sums the proxy instances)', () => {
  const text = [
    '# TYPE fsm_node_proxy_ejected_endpoints gauge',
    'fsm_node_proxy_ejected_endpoints{service="demo/echo-v1",endpoint="10.77.1.2:8080",node="n1"} 2',
    'fsm_node_proxy_ejected_endpoints{service="demo/echo-v1",endpoint="10.77.2.2:8080",node="n1"} 0',
    '# TYPE fsm_node_proxy_retries_total counter',
    'fsm_node_proxy_retries_total{source="demo/p2",service="demo/echo-v1",result="recovered",node="n1"} 7',
    'fsm_node_proxy_retries_total{source="demo/p2",service="demo/echo-v1",result="attempted",node="n1"} 9',
  ].join('\n');
  expect(sampleSum(text, 'fsm_node_proxy_ejected_endpoints', { endpoint: '10.77.1.2:8080' })).toBe(2);
  expect(sampleSum(text, 'fsm_node_proxy_retries_total', { result: 'recovered' })).toBe(7);
  expect(sampleSum(text, 'fsm_node_proxy_retries_total')).toBe(16);
  expect(sampleSum(text, 'fsm_node_proxy_retries_total', { result: 'exhausted' })).toBe(0);
});
