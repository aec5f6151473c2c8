import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { errorMessage, InvalidInputError } from '../../errors.js';
import { packageRoot } from '../../util/paths.js';
import { get, type EchoAnswer } from '../echo-server.js';
import { runInside } from '../processes.js';
import type { LabPod } from '../state.js';

/**
 * A batch of GETs from inside a pod, for `lab check`'s cross-cluster cases
 * (one process for the batch instead of one per request):
 *
 *   node load.js URL --count N [--concurrency C] [--timeout-ms T]
 *
 * Each request is a new connection; prints one JSON line (BatchSummary):
 * answers by pod, failures with the first few reasons, the slowest request;
 * also every outcome by status (or "error"), how long the failed requests
 * took and the batch's wall time (the resilience cases of `lab check`,
 * src/lab/check-resilience.ts, judge timeouts and rate limits by them).
 * Exit 0 when none failed.
 */

export interface BatchSummary {
  ok: number;
  failed: number;
  errors: string[];
  pods: Record<string, number>;
  maxMs: number;
  /** Outcomes by HTTP status ("200", "503" ...), or "error" when no answer came. */
  statuses: Record<string, number>;
  /** Fastest and slowest failed request, in ms (0 when none failed). */
  minFailMs: number;
  maxFailMs: number;
  /** From the first request's start to the last one's end. */
  elapsedMs: number;
}

export async function batch(url: string, count: number, concurrency: number, timeoutMs: number): Promise<BatchSummary> {
  const sum: BatchSummary = { ok: 0, failed: 0, errors: [], pods: {}, maxMs: 0, statuses: {}, minFailMs: 0, maxFailMs: 0, elapsedMs: 0 };
  const t0 = Date.now();
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < count) {
      next++;
      const t = Date.now();
      const r = await get(url, timeoutMs);
      const ms = Date.now() - t;
      sum.maxMs = Math.max(sum.maxMs, ms);
      const outcome = r.ok ? String(r.status) : 'error';
      sum.statuses[outcome] = (sum.statuses[outcome] ?? 0) + 1;
      let answer: EchoAnswer | undefined;
      try {
        answer = JSON.parse(r.body ?? '') as EchoAnswer;
      } catch {
        answer = undefined;
      }
      if (r.ok && r.status === 200 && answer?.pod) {
        sum.ok++;
        sum.pods[answer.pod] = (sum.pods[answer.pod] ?? 0) + 1;
      } else {
        sum.minFailMs = sum.failed === 0 ? ms : Math.min(sum.minFailMs, ms);
        sum.maxFailMs = Math.max(sum.maxFailMs, ms);
        sum.failed++;
        if (sum.errors.length < 5) sum.errors.push(r.ok ? `HTTP ${r.status}: ${String(r.body).trim().slice(0, 100)}` : (r.error ?? 'failed'));
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, count)) }, worker));
  sum.elapsedMs = Date.now() - t0;
  return sum;
}

const loadScript = (): string => join(packageRoot(), 'dist', 'src', 'lab', 'clusters', 'load.js');

/** `count` GETs from a pod (this file run inside it), `concurrency` at a time, each with its own timeout. */
export async function podBatch(from: LabPod, url: string, count: number, opts: { concurrency?: number; timeoutMs?: number } = {}): Promise<BatchSummary> {
  const timeoutMs = opts.timeoutMs ?? 5000;
  const argv = [process.execPath, loadScript(), url, '--count', String(count), '--concurrency', String(opts.concurrency ?? 2), '--timeout-ms', String(timeoutMs)];
  const res = await runInside(from.cgroupPath, from.netns, argv, 30_000 + count * timeoutMs);
  try {
    return JSON.parse(res.stdout.trim().split('\n').pop() ?? '') as BatchSummary;
  } catch {
    const error = `load client exited ${res.code}: ${(res.stderr || res.stdout).trim().slice(0, 200)}`;
    return { ok: 0, failed: count, errors: [error], pods: {}, maxMs: 0, statuses: { error: count }, minFailMs: 0, maxFailMs: 0, elapsedMs: 0 };
  }
}

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args: argv, options: { count: { type: 'string' }, concurrency: { type: 'string' }, 'timeout-ms': { type: 'string' } }, allowPositionals: true, strict: true });
  const url = positionals[0];
  if (!url || positionals.length !== 1) throw new InvalidInputError('URL', positionals.join(' '), 'usage: load.js URL --count N [--concurrency C] [--timeout-ms T]');
  const int = (flag: string, v: string | undefined, dflt: number, max: number): number => {
    const n = Number(v ?? dflt);
    if (!Number.isInteger(n) || n < 1 || n > max) throw new InvalidInputError(`--${flag}`, v, `must be an integer from 1 to ${max}`);
    return n;
  };
  const s = await batch(url, int('count', values.count, 20, 100_000), int('concurrency', values.concurrency, 1, 64), int('timeout-ms', values['timeout-ms'], 5000, 60_000));
  process.stdout.write(`${JSON.stringify(s)}\n`);
  return s.failed === 0 ? 0 : 1;
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`load: ${errorMessage(err)}\n`);
      process.exit(2);
    },
  );
}
