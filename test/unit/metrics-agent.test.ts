import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { agentMetrics, Cached, readDataplane, type LiveValues } from '../../src/agent/metrics.js';
import type { Dataplane, InstalledState } from '../../src/dataplane/types.js';
import { buildApi } from '../../src/http/server.js';
import { run } from '../../src/util/exec.js';

const sample = readFileSync(fileURLToPath(new URL('../fixtures/pipy-metrics.txt', import.meta.url)), 'utf8');

/** A dataplane that only answers installed() with a fixed read-back, counting the reads. */
function fakeDataplane(state: InstalledState): Dataplane & { reads: number } {
  const dp = {
    mode: state.mode,
    reads: 0,
    apply: () => Promise.reject(new Error('not in this test')),
    installed: async () => {
      dp.reads += 1;
      return state;
    },
    cleanup: async () => ({ removed: [] }),
    close: async () => {},
  };
  return dp;
}

const pods = [
  { uid: 'u1', namespace: 'demo', name: 'echo-0', ip: '10.1.0.2' },
  { uid: 'u2', namespace: 'demo', name: 'echo-1', ip: '10.1.0.3' },
];

const live = (over: Partial<LiveValues> = {}): LiveValues => ({
  ready: () => true,
  proxy: () => ({ listening: true, restarts: 2 }),
  policyReceivedAt: () => Date.now() - 5000,
  policyFetchErrors: () => 3,
  node: () => 'node-a',
  pods: () => pods,
  ...over,
});

describe('agent metrics', () => {
  test('iptables read-back: sync counters and set fill; no eBPF series', async () => {
    const dp = fakeDataplane({ mode: 'iptables', pods: ['u1'], detail: { sets: { 'fsmn-pods': 2, 'fsmn-strict': 0 }, stats: { syncs: 7, fullSyncs: 2, failures: 1, tamperRepairs: 1, lastChanges: 0 } } });
    const text = await agentMetrics(live({ dataplane: () => dp })).exposition();
    expect(text).toContain('fsm_node_iptables_syncs_total{full="true"} 2');
    expect(text).toContain('fsm_node_iptables_syncs_total{full="false"} 5');
    expect(text).toContain('fsm_node_iptables_tamper_repairs_total 1');
    expect(text).toContain('fsm_node_ipset_members{set="fsmn-pods"} 2');
    expect(text).not.toMatch(/^fsm_node_redirected_connections_total\{/m);
    expect(text).not.toMatch(/^fsm_node_bpf_map_entries\{/m);
  });

  test('eBPF per-pod counters carry namespace and pod; uids the policy no longer names are left out', async () => {
    const dp = fakeDataplane({
      mode: 'ebpf',
      pods: ['u1', 'u2'],
      // installed: false: no pins to count, so the test needs no bpffs
      detail: { installed: false, stats: { u1: { redirected: 4, excluded: 1, inboundRefused: 0 }, u2: { redirected: 9, excluded: 0, inboundRefused: 2 }, gone: { redirected: 1, excluded: 0, inboundRefused: 0 } } },
    });
    const text = await agentMetrics(live({ dataplane: () => dp })).exposition();
    expect(text).toContain('fsm_node_redirected_connections_total{namespace="demo",pod="echo-0"} 4');
    expect(text).toContain('fsm_node_redirected_connections_total{namespace="demo",pod="echo-1"} 9');
    expect(text).toContain('fsm_node_inbound_refused_connections_total{namespace="demo",pod="echo-1"} 2');
    expect(text).toContain('fsm_node_excluded_connections_total{namespace="demo",pod="echo-0"} 1');
    expect(text.match(/^fsm_node_redirected_connections_total\{/gm)).toHaveLength(2);
    // One read-back serves every collector of a scrape.
    expect(dp.reads).toBe(1);
  });

  test('readDataplane: an eBPF dataplane without pins has no map fill', async () => {
    const r = await readDataplane(fakeDataplane({ mode: 'ebpf', pods: [], detail: { pinDir: '/nonexistent', installed: false } }));
    expect(r).toEqual({ mode: 'ebpf', maps: [], pods: {} });
  });

  test('Cached: one computation per ttl, concurrent callers share it', async () => {
    let t = 0;
    let n = 0;
    const c = new Cached(async () => ++n, 1000, () => t);
    expect(await Promise.all([c.get(), c.get(), c.get()])).toEqual([1, 1, 1]);
    t = 999;
    expect(await c.get()).toBe(1);
    t = 1000;
    expect(await c.get()).toBe(2);
  });

  test('proxy instances: wanted and listening, a dead one shows while the proxy is up', async () => {
    const m = agentMetrics(live({ proxy: () => ({ listening: true, restarts: 1, instanceCount: 2, instances: [{ listening: true }, { listening: false }], draining: 2 }) }));
    const text = await m.exposition();
    expect(text).toMatch(/^fsm_node_proxy_instances 2$/m);
    expect(text).toMatch(/^fsm_node_proxy_instances_draining 2$/m);
    expect(text).toMatch(/^fsm_node_proxy_instances_listening 1$/m);
    expect(text).toMatch(/^fsm_node_proxy_up 1$/m);
  });

  test('the proxy metrics are appended normalised, with the node label and pod identity', async () => {
    const m = agentMetrics(live({ proxyMetrics: async () => sample, pods: () => [{ uid: 'u9', namespace: 'demo', name: 'upstream', ip: '127.0.0.1' }] }));
    const text = await m.exposition();
    expect(text).toContain('fsm_node_proxy_up 1');
    expect(text).toContain('fsm_node_proxy_restarts 2');
    // Without instance details (the passthrough proxy): one, listening.
    expect(text).toContain('fsm_node_proxy_instances 1');
    expect(text).toContain('fsm_node_proxy_instances_listening 1');
    expect(text).toContain('fsm_node_proxy_metrics_up 1');
    expect(text).toContain('fsm_node_proxy_outbound_sent_bytes_total{protocol="TCP",peer="[127.0.0.1]:38481",peer_namespace="demo",peer_pod="upstream",node="node-a"} 520');
    expect(text).not.toMatch(/^pipy_/m);
  });

  test('a proxy that does not answer: metrics_up 0, the agent metrics still served', async () => {
    const text = await agentMetrics(live({ proxyMetrics: () => Promise.reject(new Error('ECONNREFUSED')) })).exposition();
    expect(text).toContain('fsm_node_proxy_metrics_up 0');
    expect(text).toContain('fsm_node_policy_fetch_errors_total 3');
    expect(text).not.toContain('fsm_node_proxy_inbound');
  });

  test('policy transfer: versions taken in by kind, bytes received', async () => {
    const transfer = { updates: { full: 1, delta: 41 }, receivedBytes: 52_000 };
    const text = await agentMetrics(live({ policyTransfer: () => transfer })).exposition();
    expect(text).toContain('fsm_node_policy_updates_total{kind="full"} 1');
    expect(text).toContain('fsm_node_policy_updates_total{kind="delta"} 41');
    expect(text).toContain('fsm_node_policy_received_bytes_total 52000');
  });

  test('the reload histogram is there for the supervisor to observe', async () => {
    const m = agentMetrics(live());
    m.proxyReload.observe({ result: 'ok' }, 0.2);
    expect(await m.exposition()).toContain('fsm_node_proxy_reload_seconds_bucket{le="0.25",result="ok"} 1');
  });

  test('/metrics serves the whole exposition, and promtool accepts it', async () => {
    const m = agentMetrics(live({ proxyMetrics: async () => sample, dataplane: () => fakeDataplane({ mode: 'ebpf', pods: ['u1'], detail: { installed: false, stats: { u1: { redirected: 1, excluded: 0, inboundRefused: 0 } } } }) }));
    m.enrolledPods.set(2);
    const res = await buildApi({ notReadyReason: () => undefined, state: () => ({}), registry: m.registry, exposition: () => m.exposition() }).inject('/metrics');
    expect(res.statusCode).toBe(200);
    expect(res.body).toContain('fsm_node_enrolled_pods 2');
    expect(res.body).toContain('fsm_node_proxy_inbound_received_bytes_total{listen="[127.0.0.1]:38480/TCP",node="node-a"} 400');
    const checked = await run('promtool', ['check', 'metrics'], { input: res.body, allowFail: true }).catch(() => undefined);
    if (!checked) {
      process.stderr.write('SKIP promtool check: promtool not installed (Debian package prometheus)\n');
      return;
    }
    expect(checked.stdout + checked.stderr).toBe('');
    expect(checked.code).toBe(0);
  });
});
