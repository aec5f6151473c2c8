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

/**
 * Requests c1's old gateway instances may still take in the 3 hand-overs of
 * the test below (about 50 GET/s reach each gateway; measured 0-4 with the
 * draining marker, against 30+ without it).
 */
const MAX_LATE = 15;

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

  // c1's gateways (both at once, as a policy change does) hand over to new
  // instances while every GET goes to c1: their old instances mark their
  // answers as draining, so c2's node proxy sends its next requests on new
  // connections (proxy/drain.js, multicluster.js's epochs) instead of the
  // pooled ones, and the old instances end their drain by themselves. Without
  // that, the pooled tunnels kept feeding the old instances until the drain's
  // deadline cut what was in flight.
  test('c1\'s gateways hand over 3 times under load: 0 failed GETs, their old instances drain by themselves', async () => {
    await s.setPolicy({ mode: 'FailOver', failOver: ['c1'] });
    await s.setLocalEndpoints(false);
    try {
      const run = await s.load(100, 5, async () => {
        for (let k = 1; k <= 3; k++) {
          await new Promise((r) => setTimeout(r, 1000));
          await s.handOver(s.c1, k);
        }
      });
      console.log(JSON.stringify({ case: 'gateways-hand-over', ...summarize(run, 1000), pods: byPod(run), drains: [s.drainEnds(s.g1), s.drainEnds(s.g2)] }));
      expect(run.records.filter((r) => r[2] !== 200)).toEqual([]);
      expect(run.records.length).toBe(500);
      await s.drained(s.c1);
      for (const g of [s.g1, s.g2]) {
        const ends = s.drainEnds(g);
        expect(ends.deadline ?? 0).toBe(0);
        expect((ends.drained ?? 0) + (ends.idle ?? 0)).toBeGreaterThanOrEqual(3);
        // What the old instances still took after their first marked answer went out: a few requests already on the way per hand-over and thread.
        expect(ends.startedWhileDraining).toBeLessThanOrEqual(MAX_LATE);
      }
    } finally {
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
      // Once c1's gateways were found unreachable they stay marked (main.js marks them where the
      // connect fails): no GET waits out the 1 s connect timeout again. Unmarked, a batch of GETs
      // did so every second for the whole cut.
      const waited = run.records.filter((r) => r[0] > cutAt + 3000 && r[1] >= 1000);
      expect(waited).toEqual([]);
    } finally {
      await s.cutC1(false);
    }
  }, 120_000);
});
