import { byPod, summarize, TwoSites } from '../../bench/failover.js';
import { uniqueTestPrefix } from '../support/names.js';
import { pipySkipReason } from '../support/pipy.js';

/**
 * Two clusters for real (bench/failover.ts TwoSites): c2 (node n1: client A,
 * web pod L) and c1 (gateways g1, g2: web pods R1, R2), each with its own
 * compiler and clusterset member exchanging exports over mutual TLS, Pipy on
 * every node, iptables interception. A calls web's clusterset IP.
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

maybe('multi-cluster data path (two sites, Pipy)', () => {
  let s: TwoSites;

  beforeAll(async () => {
    s = await TwoSites.create({ prefix: uniqueTestPrefix() });
  }, 120_000);

  afterAll(async () => {
    await s?.destroy();
  }, 60_000);

  test('no policy (MCS default) and ActiveActive spread over both clusters by weight; Locality stays home', async () => {
    expect(s.clustersetIp()).toMatch(/^241\.0\./);
    await s.setPolicy({ mode: 'ActiveActive', weights: { c1: 3, c2: 1 } });
    const aa = await s.load(100, 4);
    expect(summarize(aa, 0).failures).toEqual({});
    const pods = byPod(aa);
    const remote = (pods[s.R1.name] ?? 0) + (pods[s.R2.name] ?? 0);
    expect(Math.abs(remote / aa.records.length - 0.75)).toBeLessThanOrEqual(0.05);
    // Inside c1 the gateway balances over both pods (one per gateway node).
    expect(pods[s.R1.name]).toBeGreaterThan(0);
    expect(pods[s.R2.name]).toBeGreaterThan(0);

    await s.setPolicy({ mode: 'Locality' });
    const loc = await s.load(100, 2);
    expect(byPod(loc)).toEqual({ [s.L.name]: loc.records.length });
  }, 120_000);

  test('FailOver: local first; a dead local endpoint fails over within the request for GETs; removed endpoints too', async () => {
    await s.setPolicy({ mode: 'FailOver', failOver: ['c1'] });
    const home = await s.load(100, 2);
    expect(byPod(home)).toEqual({ [s.L.name]: home.records.length });

    let fault = 0;
    let removal = 0;
    try {
      const run = await s.load(100, 6, async () => {
        await new Promise((r) => setTimeout(r, 2000));
        fault = Date.now();
        await s.killServer(s.L); // still listed in the policy: a fault the data path finds
        await new Promise((r) => setTimeout(r, 1500));
        removal = Date.now();
        await s.setLocalEndpoints(false); // then the controller removes it
      });
      const faultAt = fault - run.t0;
      const sum = summarize(run, faultAt);
      console.log(JSON.stringify({ case: 'local-gone', ...sum }));
      // The failover itself loses nothing: no request that started before the policy change failed.
      expect(run.records.filter((r) => r[0] < removal - run.t0 - 100 && r[2] !== 200)).toEqual([]);
      // Not asserted, a known gap (docs/multicluster.md): the proxy's config reload at the policy
      // change can reset requests in flight to a clusterset IP (the old program's repeat does not
      // retry while it drains); `failures` in the line above shows them.
      const after = run.records.filter((r) => r[0] > faultAt + 100 && r[2] === 200);
      expect(after.length).toBeGreaterThan(200);
      expect(after.every((r) => r[3] === s.R1.name || r[3] === s.R2.name)).toBe(true);
    } finally {
      await s.startServer(s.L);
      await s.setLocalEndpoints(true);
    }
  }, 120_000);

  test('ActiveActive: stopping c1 controller changes nothing; with c1 cut off no GET fails and traffic settles on c2', async () => {
    await s.setPolicy({ mode: 'ActiveActive' });
    // c1's controller dies: c2 keeps c1's exports (lease), the data path does not notice.
    let stop = 0;
    const ctl = await s.load(100, 4, async () => {
      await new Promise((r) => setTimeout(r, 1000));
      stop = Date.now();
      await s.stopC1Controller();
    });
    const cs = summarize(ctl, stop - ctl.t0);
    console.log(JSON.stringify({ case: 'controller', ...cs, pods: byPod(ctl) }));
    expect(cs.failed).toBe(0);
    expect(s.importTiers().flat()).toContain('c1');
    const afterStop = ctl.records.filter((r) => r[0] > stop - ctl.t0 + 200);
    expect(afterStop.some((r) => r[3] === s.R1.name || r[3] === s.R2.name)).toBe(true);

    let cut = 0;
    try {
      const run = await s.load(100, 8, async () => {
        await new Promise((r) => setTimeout(r, 2000));
        cut = Date.now();
        await s.cutC1(true);
      });
      const cutAt = cut - run.t0;
      const sum = summarize(run, cutAt);
      console.log(JSON.stringify({ case: 'link-cut', ...sum }));
      // GETs in flight on the dead tunnel fail over after its 2 s read timeout: slow, not failed.
      // How fast is the benchmark's business (npm run bench -- failover), not a timed assertion.
      expect(sum.failed).toBe(0);
      const late = run.records.filter((r) => r[0] > cutAt + 5000);
      expect(late.length).toBeGreaterThan(50);
      expect(late.every((r) => r[2] === 200 && r[3] === s.L.name)).toBe(true);
    } finally {
      await s.cutC1(false);
    }
  }, 120_000);
});
