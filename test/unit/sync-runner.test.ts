import { SyncRunner, type SyncContext } from '../../src/agent/sync-runner.js';
import { FakeClock } from '../support/fake-clock.js';

function setup(fail: (n: number) => boolean = () => false) {
  const clock = new FakeClock();
  const runs: Array<SyncContext & { at: number }> = [];
  const runner = new SyncRunner(
    async (ctx) => {
      runs.push({ ...ctx, at: clock.now() });
      if (fail(runs.length)) throw new Error(`run ${runs.length} failed`);
    },
    { minIntervalMs: 100, maxIntervalMs: 10_000, retryBaseMs: 50, clock },
  );
  return { clock, runs, runner };
}

describe('SyncRunner', () => {
  test('first run is full; later requests are merged and at least minInterval apart', async () => {
    const { clock, runs, runner } = setup();
    runner.start();
    await clock.advance(0);
    expect(runs).toEqual([{ full: true, reasons: ['start'], podsOnly: false, at: 0 }]);
    runner.request('pod added');
    runner.request('pod removed');
    await clock.advance(99);
    expect(runs).toHaveLength(1);
    await clock.advance(1);
    expect(runs[1]).toEqual({ full: false, reasons: ['pod added', 'pod removed'], podsOnly: false, at: 100 });
  });

  test('requestAndWait (CNI ADD) skips the minimum interval and resolves after a run that started after it; a failed run rejects it', async () => {
    const { clock, runs, runner } = setup((n) => n === 3);
    runner.start();
    await clock.advance(0);
    let done = false;
    const waited = runner.requestAndWait('cni add a').then(() => (done = true));
    await clock.advance(0);
    expect(runs[1]).toEqual({ full: false, reasons: ['cni add a'], podsOnly: false, at: 0 });
    await waited;
    expect(done).toBe(true);
    const failed = runner.requestAndWait('cni add b');
    const outcome = failed.then(() => 'resolved', (e: Error) => e.message);
    await clock.advance(0);
    expect(await outcome).toBe('run 3 failed');
  });

  test('podsOnly only when every merged request said so, never with full; a failed run makes the retry full', async () => {
    const { clock, runs, runner } = setup((n) => n === 4);
    runner.start();
    await clock.advance(0);
    expect(runs[0]!.podsOnly).toBe(false); // the first run is full
    await Promise.all([runner.requestAndWait('cni add a', { podsOnly: true }), runner.requestAndWait('cni add b', { podsOnly: true }), clock.advance(0)]);
    expect(runs[1]).toMatchObject({ full: false, reasons: ['cni add a', 'cni add b'], podsOnly: true });
    // A policy change merged into the same run: the run does everything.
    runner.request('policy changed');
    const mixed = runner.requestAndWait('cni add c', { podsOnly: true });
    await clock.advance(100);
    await mixed;
    expect(runs[2]).toMatchObject({ full: false, reasons: ['policy changed', 'cni add c'], podsOnly: false });
    const failing = runner.requestAndWait('cni add d', { podsOnly: true }).catch((e: Error) => e.message);
    await clock.advance(0);
    expect(await failing).toBe('run 4 failed');
    expect(runs[3]).toMatchObject({ podsOnly: true });
    await clock.advance(50);
    expect(runs[4]).toMatchObject({ full: true, reasons: ['retry: cni add d'], podsOnly: false });
    runner.request('cni del e', { podsOnly: true, full: true });
    await clock.advance(10_000);
    expect(runs[5]).toMatchObject({ full: true, podsOnly: false });
  });

  test('with no requests a full periodic sync runs every maxInterval', async () => {
    const { clock, runs, runner } = setup();
    runner.start();
    await clock.advance(25_000);
    expect(runs.map((r) => [r.at, r.full, r.reasons[0]])).toEqual([
      [0, true, 'start'],
      [10_000, true, 'periodic'],
      [20_000, true, 'periodic'],
    ]);
  });

  test('a failed run is retried with exponential backoff and the retry is full', async () => {
    const { clock, runs, runner } = setup((n) => n >= 2 && n <= 4);
    runner.start();
    await clock.advance(0);
    runner.request('policy changed');
    await clock.advance(100); // run 2 fails
    await clock.advance(50); // run 3 (retry after 50) fails
    await clock.advance(100); // run 4 (retry after 100) fails
    expect(runner.consecutiveFailures).toBe(3);
    await clock.advance(200); // run 5 succeeds
    expect(runs.map((r) => r.at)).toEqual([0, 100, 150, 250, 450]);
    expect(runs.slice(2).every((r) => r.full)).toBe(true);
    expect(runs[4]!.reasons[0]).toMatch(/^retry: /);
    expect(runner.consecutiveFailures).toBe(0);
  });

  test('requests during a run are not lost and never overlap the run', async () => {
    const clock = new FakeClock();
    let active = 0;
    let maxActive = 0;
    const seen: string[][] = [];
    let release: () => void = () => {};
    const runner = new SyncRunner(
      async (ctx) => {
        active++;
        maxActive = Math.max(maxActive, active);
        seen.push(ctx.reasons);
        await new Promise<void>((r) => (release = r));
        active--;
      },
      { minIntervalMs: 10, maxIntervalMs: 10_000, retryBaseMs: 10, clock },
    );
    runner.start();
    await clock.advance(0);
    runner.request('during');
    await clock.advance(50);
    expect(seen).toHaveLength(1);
    release();
    await clock.advance(10);
    expect(seen).toEqual([['start'], ['during']]);
    expect(maxActive).toBe(1);
    release();
    await runner.stop();
  });

  test('stop prevents further runs', async () => {
    const { clock, runs, runner } = setup();
    runner.start();
    await clock.advance(0);
    await runner.stop();
    runner.request('late');
    await clock.advance(20_000);
    expect(runs).toHaveLength(1);
  });
});
