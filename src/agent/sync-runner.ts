/**
 * Merges sync requests into runs of one reconcile function, the way
 * kube-proxy's bounded-frequency runner does: event handlers only call
 * `request()`; runs are at least `minIntervalMs` apart, at most
 * `maxIntervalMs` apart (a periodic full sync that repairs tampering), a
 * failed run is retried with exponential backoff and makes the next run full.
 * Never two runs at once. The clock is injectable for tests.
 */
export interface SyncContext {
  /** Rewrite everything rather than trusting caches (first run, after a failure, periodic repair). */
  full: boolean;
  /** Why this run happens: the reasons of the merged requests. */
  reasons: string[];
  /**
   * Every request merged into this run said it changed only the set of pods
   * (CNI ADD/DEL: early pods); policy, identities and mode are as the last
   * successful run saw them. Never with `full`.
   */
  podsOnly: boolean;
}

export interface RequestOptions {
  full?: boolean;
  /** This request changes only which pods are enrolled (see SyncContext.podsOnly). */
  podsOnly?: boolean;
}

export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

const immediates = new WeakSet<object>();

export const realClock: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => {
    // A run due now (a CNI ADD waits for it) starts in this turn of the event loop, not after a timer's 1 ms minimum.
    if (ms <= 0) {
      const immediate = setImmediate(fn);
      immediate.unref();
      immediates.add(immediate);
      return immediate;
    }
    const t = setTimeout(fn, ms);
    t.unref?.();
    return t;
  },
  clearTimeout: (h) => {
    if (immediates.has(h as object)) clearImmediate(h as NodeJS.Immediate);
    else clearTimeout(h as NodeJS.Timeout);
  },
};

export interface SyncRunnerOptions {
  minIntervalMs: number;
  maxIntervalMs: number;
  retryBaseMs: number;
  clock?: Clock;
  onResult?: (r: { ok: boolean; full: boolean; durationMs: number; error?: unknown }) => void;
}

export class SyncRunner {
  private readonly clock: Clock;
  private pending: string[] = [];
  private pendingFull = true; // the first run is always full
  /** No pending request asked for more than a pods-only run. */
  private pendingPodsOnly = true;
  private running: Promise<void> | undefined;
  private timer: unknown;
  private timerAt = Infinity;
  private lastStart = -Infinity;
  private failures = 0;
  private stopped = false;
  /** Callers of requestAndWait whose run has not started yet. */
  private waiters: Array<{ resolve: () => void; reject: (err: unknown) => void }> = [];

  constructor(
    private readonly fn: (ctx: SyncContext) => Promise<void>,
    private readonly opts: SyncRunnerOptions,
  ) {
    this.clock = opts.clock ?? realClock;
  }

  /** Ask for a sync soon; merged with other requests. */
  request(reason: string, opts: RequestOptions = {}): void {
    if (this.stopped) return;
    this.pending.push(reason);
    if (opts.full) this.pendingFull = true;
    if (!opts.podsOnly) this.pendingPodsOnly = false;
    this.schedule(this.lastStart + this.opts.minIntervalMs);
  }

  /**
   * Ask for a sync and wait for a run that starts after this request (CNI ADD
   * waits so the pod is enrolled before its containers start). Skips the
   * minimum interval: the caller is blocked on it. Rejects when that run failed.
   */
  requestAndWait(reason: string, opts: Omit<RequestOptions, 'full'> = {}): Promise<void> {
    if (this.stopped) return Promise.reject(new Error('the agent is stopping'));
    return new Promise<void>((resolve, reject) => {
      this.waiters.push({ resolve, reject });
      this.pending.push(reason);
      if (!opts.podsOnly) this.pendingPodsOnly = false;
      this.schedule(this.clock.now());
    });
  }

  /** Start the periodic loop with an initial full sync. */
  start(): void {
    this.request('start', { full: true });
  }

  /** Stop scheduling; resolves when a run in progress has finished. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.clearTimer();
    await this.running;
    for (const w of this.waiters.splice(0)) w.reject(new Error('the agent is stopping'));
  }

  /** Consecutive failed runs (0 when the last run succeeded). */
  get consecutiveFailures(): number {
    return this.failures;
  }

  private schedule(at: number): void {
    if (this.stopped) return;
    const when = Math.max(at, this.clock.now());
    if (this.timer !== undefined && this.timerAt <= when) return;
    this.clearTimer();
    this.timerAt = when;
    this.timer = this.clock.setTimeout(() => this.fire(), when - this.clock.now());
  }

  private clearTimer(): void {
    if (this.timer !== undefined) this.clock.clearTimeout(this.timer);
    this.timer = undefined;
    this.timerAt = Infinity;
  }

  private fire(): void {
    this.timer = undefined;
    this.timerAt = Infinity;
    if (this.running) return; // the run in progress reschedules when it ends
    const reasons = this.pending.length ? this.pending : ['periodic'];
    const full = this.pendingFull || this.pending.length === 0;
    const podsOnly = !full && this.pendingPodsOnly;
    this.pending = [];
    this.pendingFull = false;
    this.pendingPodsOnly = true;
    this.lastStart = this.clock.now();
    const waiters = this.waiters.splice(0);
    this.running = this.runOnce({ full, reasons, podsOnly }, waiters).finally(() => {
      this.running = undefined;
      this.afterRun();
    });
  }

  private async runOnce(ctx: SyncContext, waiters: SyncRunner['waiters']): Promise<void> {
    const started = this.clock.now();
    try {
      await this.fn(ctx);
      this.failures = 0;
      this.opts.onResult?.({ ok: true, full: ctx.full, durationMs: this.clock.now() - started });
      for (const w of waiters) w.resolve();
    } catch (error) {
      for (const w of waiters) w.reject(error);
      this.failures += 1;
      this.pendingFull = true;
      this.pending.push(...ctx.reasons.map((r) => `retry: ${r}`));
      this.opts.onResult?.({ ok: false, full: ctx.full, durationMs: this.clock.now() - started, error });
    }
  }

  private afterRun(): void {
    if (this.stopped) return;
    if (this.failures > 0) {
      const backoff = Math.min(this.opts.retryBaseMs * 2 ** (this.failures - 1), this.opts.maxIntervalMs);
      this.schedule(this.clock.now() + backoff);
    } else if (this.waiters.length > 0) {
      this.schedule(this.clock.now());
    } else if (this.pending.length > 0) {
      this.schedule(this.lastStart + this.opts.minIntervalMs);
    } else {
      this.schedule(this.lastStart + this.opts.maxIntervalMs);
    }
  }
}
