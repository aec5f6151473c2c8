import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { normalisePipyMetrics, parseExposition, type Family } from '../../src/proxy/metrics.js';
import { run } from '../../src/util/exec.js';

/** A real capture of Pipy's admin /metrics; test/fixtures/pipy-metrics.md says how it was made. */
const sample = readFileSync(fileURLToPath(new URL('../fixtures/pipy-metrics.txt', import.meta.url)), 'utf8');

const opts = { constLabels: { node: 'node-a' }, podByIp: (ip: string) => (ip === '127.0.0.1' ? { namespace: 'demo', name: 'echo-0' } : undefined) };
const out = () => normalisePipyMetrics(sample, opts);
const family = (name: string): Family => {
  const f = parseExposition(out().text).families.find((x) => x.name === name);
  if (!f) throw new Error(`no family ${name} in the output`);
  return f;
};
const value = (f: Family, sample: string, labels: Record<string, string>) =>
  f.samples.find((s) => s.name === sample && Object.entries(labels).every(([k, v]) => s.labels.some(([n, x]) => n === k && x === v)))?.value;

async function promtool(text: string): Promise<{ code: number | null; output: string } | undefined> {
  try {
    const r = await run('promtool', ['check', 'metrics'], { input: text, allowFail: true });
    return { code: r.code, output: r.stdout + r.stderr };
  } catch {
    return undefined; // no promtool on this machine
  }
}

describe('Pipy metrics normalisation (captured sample)', () => {
  test('the sample has the quirks the normaliser exists for', () => {
    const raw = parseExposition(sample);
    expect(raw.rejected).toEqual([]);
    expect(sample).toContain('pipy_inbound_in 920\n'); // unlabelled total of two listeners
    expect(sample).toContain('le="Inf"');
    const lat = raw.families.find((f) => f.name === 'demo_latency_ms')!;
    expect(value(lat, 'demo_latency_ms_bucket', { route: '/a', le: '10' })).toBe(0); // per bucket: 3 below 1, 3 in (1,5], none above
  });

  test('every line is read; histogram buckets become cumulative, ms become seconds, last bucket +Inf equals the count', () => {
    expect(out().rejected).toEqual([]);
    const lat = family('fsm_node_proxy_script_demo_latency_seconds');
    expect(lat.type).toBe('histogram');
    const b = lat.samples.filter((s) => s.name.endsWith('_bucket') && s.labels.some(([k, v]) => k === 'route' && v === '/b'));
    expect(b.map((s) => [s.labels.find(([k]) => k === 'le')![1], s.value])).toEqual([
      ['0.001', 0],
      ['0.005', 0],
      ['0.01', 2],
      ['0.05', 2],
      ['+Inf', 4],
    ]);
    expect(value(lat, 'fsm_node_proxy_script_demo_latency_seconds_count', { route: '/b' })).toBe(4);
    expect(value(lat, 'fsm_node_proxy_script_demo_latency_seconds_sum', { route: '/b' })).toBeCloseTo(0.154, 9);
    const conn = family('fsm_node_proxy_outbound_connect_duration_seconds');
    for (const s of conn.samples.filter((x) => x.name.endsWith('_bucket'))) expect(s.value).toBe(5); // 5 connects, all under 1 ms
  });

  test('unlabelled totals are dropped where labelled lines exist, kept where they are all there is', () => {
    const inbound = family('fsm_node_proxy_inbound_received_bytes_total');
    expect(inbound.samples.map((s) => s.labels.find(([k]) => k === 'listen')?.[1])).toEqual(['[127.0.0.1]:38481/TCP', '[127.0.0.1]:38480/TCP']);
    expect(inbound.samples.reduce((n, s) => n + s.value, 0)).toBe(920); // the sum Pipy printed, counted once
    expect(family('fsm_node_proxy_script_demo_plain_total').samples.map((s) => s.value)).toEqual([5]);
    expect(family('fsm_node_proxy_outbound_connections').samples.map((s) => s.value)).toEqual([0]); // no open connection: only Pipy's total line
    // The connect-time histogram had an unlabelled copy too: only the per-peer series remains.
    expect(new Set(family('fsm_node_proxy_outbound_connect_duration_seconds').samples.map((s) => s.labels.find(([k]) => k === 'peer')?.[1]))).toEqual(new Set(['[127.0.0.1]:38481']));
  });

  test('node label on every line; peers that are known pods get their namespace and name', () => {
    for (const f of parseExposition(out().text).families) for (const s of f.samples) expect(s.labels).toContainEqual(['node', 'node-a']);
    const sent = family('fsm_node_proxy_outbound_sent_bytes_total');
    expect(sent.samples[0]!.labels).toEqual([
      ['protocol', 'TCP'],
      ['peer', '[127.0.0.1]:38481'],
      ['peer_namespace', 'demo'],
      ['peer_pod', 'echo-0'],
      ['node', 'node-a'],
    ]);
    expect(value(sent, 'fsm_node_proxy_outbound_sent_bytes_total', {})).toBe(520);
  });

  test('names follow Prometheus conventions: built-ins by table, counters end in _total, HELP on every family', () => {
    const names = parseExposition(out().text).families.map((f) => f.name);
    expect(names.every((n) => n.startsWith('fsm_node_proxy_'))).toBe(true);
    expect(names).toEqual(expect.arrayContaining(['fsm_node_proxy_inbound_connections', 'fsm_node_proxy_pool_allocated_bytes', 'fsm_node_proxy_script_demo_requests_total', 'fsm_node_proxy_script_demo_inflight']));
    expect(out().text.match(/^# HELP /gm)!.length).toBe(names.length);
  });

  test('a line a reader cannot parse is reported, not passed on; labels are escaped on the way out', () => {
    const r = normalisePipyMetrics('# TYPE x counter\nx{a="q\\"uote"} 1\nx{broken 2\nfsmn_proxy_config{version="v1"} 1\n');
    expect(r.rejected).toEqual(['x{broken 2']);
    expect(r.text).toContain('fsm_node_proxy_script_x_total{a="q\\"uote"} 1\n');
    expect(r.text).toContain('fsm_node_proxy_config{version="v1"} 1\n');
  });

  test('promtool check metrics accepts the output (and rejects Pipy raw text)', async () => {
    const checked = await promtool(out().text);
    if (!checked) {
      process.stderr.write('SKIP promtool check: promtool not installed (Debian package prometheus)\n');
      return;
    }
    expect(checked).toEqual({ code: 0, output: '' });
    expect((await promtool(sample))!.code).not.toBe(0);
  });
});
