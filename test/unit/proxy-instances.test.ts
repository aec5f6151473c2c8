import { DEFAULT_PIPY_INSTANCES, instanceCount, logFileName, parseAdoptionRecord, pickAdminPorts, planAdoption, splitThreads, type ProxyInstance } from '../../src/proxy/instances.js';
import { normalisePipyMetrics } from '../../src/proxy/metrics.js';
import { InstanceMetricsSum } from '../../src/proxy/metrics-sum.js';
import { proxyStatusRows } from '../../src/proxy/status-rows.js';
import { classifyFailures } from '../../bench/proxy-crash.js';

const inst = (pid: number, over: Partial<ProxyInstance> = {}): ProxyInstance => ({
  pid,
  startTime: String(1000 + pid),
  kind: 'pipy',
  bin: '/usr/bin/pipy',
  version: '1.5.18',
  programHash: 'h1',
  codebase: '/s/proxy-codebase/h1',
  adminPort: 6060,
  threads: 1,
  logFile: '/s/proxy.log',
  startedAt: '2026-01-01T00:00:00Z',
  ...over,
});

describe('proxy instances: planning', () => {
  test('instance count: default 2 for Pipy, always 1 for the passthrough proxy; a bad count names the setting', () => {
    expect(instanceCount('pipy', undefined)).toBe(DEFAULT_PIPY_INSTANCES);
    expect(DEFAULT_PIPY_INSTANCES).toBe(2);
    expect(instanceCount('pipy', 3)).toBe(3);
    expect(instanceCount('passthrough', 4)).toBe(1);
    for (const bad of [0, 1.5, 17, NaN]) expect(() => instanceCount('pipy', bad)).toThrow(/invalid pipy.instances .*: must be an integer from 1 to 16/);
  });

  test('threads are split evenly, larger shares first, at least one each', () => {
    expect(splitThreads(2, 2)).toEqual([1, 1]);
    expect(splitThreads(4, 2)).toEqual([2, 2]);
    expect(splitThreads(3, 2)).toEqual([2, 1]);
    expect(splitThreads(5, 3)).toEqual([2, 2, 1]);
    expect(splitThreads(4, 1)).toEqual([4]);
    expect(splitThreads(1, 2)).toEqual([1, 1]);
  });

  test('admin ports: the lowest free from the base; an upgrade set is disjoint from the running one', () => {
    expect(pickAdminPorts(6060, 2, [])).toEqual([6060, 6061]);
    expect(pickAdminPorts(6060, 2, [6060, 6061])).toEqual([6062, 6063]);
    expect(pickAdminPorts(6060, 2, [6061, undefined])).toEqual([6060, 6062]);
    expect(pickAdminPorts(6060, 1, [6060])).toEqual([6061]);
  });

  test('one log per admin port; proxy.log without one (passthrough)', () => {
    expect([logFileName(6060), logFileName(6061), logFileName(undefined)]).toEqual(['proxy-6060.log', 'proxy-6061.log', 'proxy.log']);
  });

  test('adoption record: the previous single-instance object, the current list, and junk', () => {
    const a = inst(10);
    const b = inst(11, { adminPort: 6061 });
    expect(parseAdoptionRecord(JSON.stringify(a))).toEqual({ instances: [a], retiring: [] });
    expect(parseAdoptionRecord(JSON.stringify({ instances: [a, b], retiring: [inst(9)] }))).toEqual({ instances: [a, b], retiring: [inst(9)] });
    expect(parseAdoptionRecord(JSON.stringify({ instances: [a, { pid: -1 }, 'x', null] }))).toEqual({ instances: [a], retiring: [] });
    expect(parseAdoptionRecord('{not json')).toEqual({ instances: [], retiring: [] });
    expect(parseAdoptionRecord('null')).toEqual({ instances: [], retiring: [] });
  });

  test('adoption plan: kept and grown when each adopted instance fits its slot', () => {
    const a = inst(10);
    const plan = planAdoption([a], { n: 2, threads: [1, 1], differs: () => undefined });
    expect(plan).toEqual({ slots: [a, undefined], surplus: [] });
  });

  test('adoption plan: an old single 2-thread instance is replaced by the 2 x 1-thread set (hitless upgrade)', () => {
    const old = inst(10, { threads: 2 });
    expect(planAdoption([old], { n: 2, threads: [1, 1], differs: () => undefined })).toEqual({ slots: [old, undefined], surplus: [], replace: 'threads 2 -> 1' });
  });

  test('adoption plan: another program replaces the set; more instances than wanted are retired', () => {
    const [a, b, c] = [inst(10), inst(11, { adminPort: 6061 }), inst(12, { adminPort: 6062 })];
    expect(planAdoption([a, b], { n: 2, threads: [1, 1], differs: (i) => (i === b ? 'program h1 -> h2' : undefined) }).replace).toBe('program h1 -> h2');
    expect(planAdoption([a, b, c], { n: 2, threads: [1, 1], differs: () => undefined })).toEqual({ slots: [a, b], surplus: [c] });
  });
});

const scrape = (o: { conns: number; bytes: number; reqs?: number; open: number; bucket1?: number }): string =>
  [
    '# TYPE pipy_inbound_in counter',
    `pipy_inbound_in ${o.bytes}`,
    `pipy_inbound_in{listen="[0.0.0.0]:15001/TCP"} ${o.bytes}`,
    '# TYPE pipy_inbound_count gauge',
    `pipy_inbound_count{listen="[0.0.0.0]:15001/TCP"} ${o.open}`,
    '# TYPE fsmn_proxy_requests counter',
    `fsmn_proxy_requests{code="200"} ${o.reqs ?? o.conns}`,
    '# TYPE pipy_outbound_conn_time histogram',
    `pipy_outbound_conn_time_bucket{le="1"} ${o.bucket1 ?? o.conns}`,
    'pipy_outbound_conn_time_bucket{le="Inf"} 0',
    `pipy_outbound_conn_time_count ${o.bucket1 ?? o.conns}`,
    `pipy_outbound_conn_time_sum ${(o.bucket1 ?? o.conns) * 0.5}`,
    '',
  ].join('\n');

const value = (text: string, series: string): number => Number(text.split('\n').find((l) => l.startsWith(`${series} `))?.split(' ')[1] ?? NaN);

describe('proxy instances: metrics summed across instances', () => {
  test('counters and histograms add up, gauges of live instances add up, Pipy shape kept', () => {
    const sum = new InstanceMetricsSum();
    sum.observe(0, 'p1', scrape({ conns: 10, bytes: 1000, open: 2 }));
    sum.observe(1, 'p2', scrape({ conns: 5, bytes: 400, open: 3 }));
    const out = sum.render(new Map([[0, 'p1'], [1, 'p2']]));
    expect(value(out, 'pipy_inbound_in{listen="[0.0.0.0]:15001/TCP"}')).toBe(1400);
    expect(value(out, 'pipy_inbound_in')).toBe(1400);
    expect(value(out, 'pipy_inbound_count{listen="[0.0.0.0]:15001/TCP"}')).toBe(5);
    expect(value(out, 'fsmn_proxy_requests{code="200"}')).toBe(15);
    expect(value(out, 'pipy_outbound_conn_time_bucket{le="1"}')).toBe(15);
    expect(value(out, 'pipy_outbound_conn_time_sum')).toBe(7.5);
    expect(out.split('\n').filter((l) => l.startsWith('# TYPE')).length).toBe(4);
    // The sum goes through the normaliser like one instance's text.
    const norm = normalisePipyMetrics(out);
    expect(norm.rejected).toEqual([]);
    expect(norm.text).toMatch(/^fsm_node_proxy_inbound_received_bytes_total\{listen="\[0\.0\.0\.0\]:15001\/TCP"\} 1400$/m);
    expect(norm.text).toMatch(/^fsm_node_proxy_outbound_connect_duration_seconds_bucket\{le="\+Inf"\} 15$/m);
  });

  test('a reload that re-creates counters (they drop) is a reset of that instance: the sum keeps counting', () => {
    const sum = new InstanceMetricsSum();
    const alive = new Map([[0, 'p1'], [1, 'p2']]);
    sum.observe(0, 'p1', scrape({ conns: 10, bytes: 1000, open: 1 }));
    sum.observe(1, 'p2', scrape({ conns: 5, bytes: 500, open: 1 }));
    // p1 reloaded: its program counter restarted from 0 and counted 3 since; Pipy's built-in one did not drop.
    sum.observe(0, 'p1', scrape({ conns: 12, reqs: 3, bytes: 1200, open: 1 }));
    sum.observe(1, 'p2', scrape({ conns: 6, bytes: 600, open: 1 }));
    const out = sum.render(alive);
    expect(value(out, 'fsmn_proxy_requests{code="200"}')).toBe(10 + 3 + 6);
    expect(value(out, 'pipy_inbound_in')).toBe(1800);
  });

  test('a restarted instance (new process in the slot) adds to the old totals even if it already counted more', () => {
    const sum = new InstanceMetricsSum();
    sum.observe(0, 'p1', scrape({ conns: 10, bytes: 1000, open: 4 }));
    sum.observe(1, 'p2', scrape({ conns: 5, bytes: 500, open: 4 }));
    // p2 was killed: until its successor is scraped its counters stay, its gauges go.
    let out = sum.render(new Map([[0, 'p1']]));
    expect(value(out, 'pipy_inbound_in')).toBe(1500);
    expect(value(out, 'pipy_inbound_count{listen="[0.0.0.0]:15001/TCP"}')).toBe(4);
    // Its successor p3 counted 7 connections before the first scrape: 7 > 5, still no drop to see.
    sum.observe(1, 'p3', scrape({ conns: 7, bytes: 700, open: 1 }));
    out = sum.render(new Map([[0, 'p1'], [1, 'p3']]));
    expect(value(out, 'fsmn_proxy_requests{code="200"}')).toBe(10 + 5 + 7);
    expect(value(out, 'pipy_inbound_in')).toBe(2200);
    expect(value(out, 'pipy_inbound_count{listen="[0.0.0.0]:15001/TCP"}')).toBe(5);
  });

  test('never decreasing over a series of restarts and reloads', () => {
    const sum = new InstanceMetricsSum();
    let last = 0;
    let id = 0;
    const pids = ['a', 'b'];
    for (let round = 0; round < 30; round++) {
      const slot = round % 2;
      if (round % 7 === 3) pids[slot] = `r${++id}`;
      const v = (round * 37) % 11; // goes up and down: drops are resets
      sum.observe(slot, pids[slot]!, scrape({ conns: v, bytes: v * 10, open: 1 }));
      const total = value(sum.render(new Map([[0, pids[0]!], [1, pids[1]!]])), 'fsmn_proxy_requests{code="200"}');
      expect(total).toBeGreaterThanOrEqual(last);
      last = total;
    }
  });

  test('nothing observed: empty', () => {
    expect(new InstanceMetricsSum().render(new Map())).toBe('');
  });
});

describe('proxy instances: status lines', () => {
  test('one instance: the single summary line as before', () => {
    expect(proxyStatusRows({ kind: 'pipy', pid: 7, up: true, listening: true, restarts: 1, adopted: false, instances: [{ slot: 0, pid: 7, up: true, listening: true, restarts: 1 }] })).toEqual([
      ['proxy', 'pipy pid 7, listening, 1 restarts'],
    ]);
  });

  test('old instances draining after a hand-over are counted on the summary line', () => {
    const rows = proxyStatusRows({ kind: 'pipy', pid: 7, up: true, listening: true, restarts: 0, adopted: false, draining: 2, instances: [{ slot: 0, pid: 7, up: true, listening: true, restarts: 0 }, { slot: 1, pid: 8, up: true, listening: true, restarts: 0 }] });
    expect(rows[0]).toEqual(['proxy', 'pipy, 2 of 2 instances listening, 0 restarts, 2 old draining']);
  });

  test('two instances, one down: ready on the other, the dead one shown with its last exit', () => {
    const rows = proxyStatusRows({
      kind: 'pipy',
      pid: 7,
      up: true,
      listening: true,
      restarts: 3,
      adopted: true,
      instances: [
        { slot: 0, pid: 7, up: true, listening: true, restarts: 0, adminPort: 6060, threads: 1 },
        { slot: 1, pid: 9, up: false, listening: false, restarts: 3, crashLoop: true, adminPort: 6061, threads: 1, lastExit: 'proxy instance 1 (pid 9) exited' },
      ],
    });
    expect(rows).toEqual([
      ['proxy', 'pipy, 1 of 2 instances listening, 3 restarts, adopted'],
      ['  instance 0', 'pid 7, listening, admin 6060, 1 thread, 0 restarts'],
      ['  instance 1', 'pid 9, DOWN (restarting), admin 6061, 1 thread, 3 restarts, CRASH LOOP, last exit: proxy instance 1 (pid 9) exited'],
    ]);
  });
});

describe('proxy-crash bench: failures classified against the kills', () => {
  test('open at a kill: in flight; started after it (or unrelated): a failed new connection', () => {
    const kills = [1000, 5000];
    const r = classifyFailures(
      [
        [900, 1100, 'response', 'ECONNRESET'], // open across kill 1
        [1001, 1002, 'connect', 'ECONNREFUSED'], // started after kill 1
        [4000, 5000, 'response', 'closed early'], // ended exactly at kill 2
        [6000, 6001, 'response', 'timeout'], // nothing to do with a kill: still counts as new
      ],
      kills,
    );
    expect(r).toEqual({
      failedNew: 2,
      brokenInFlight: 2,
      kinds: { 'in-flight response ECONNRESET': 1, 'new connect ECONNREFUSED': 1, 'in-flight response closed early': 1, 'new response timeout': 1 },
      // Microseconds in, milliseconds out: 1 us and 2 us after kill 1, 1 ms after kill 2.
      newAfterKillMs: [[0, 0], [1, 1]],
    });
  });
});
