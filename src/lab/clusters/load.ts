import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { errorMessage, InvalidInputError } from '../../errors.js';
import { get, type EchoAnswer } from '../echo-server.js';

/**
 * A batch of GETs from inside a pod, for `lab check`'s cross-cluster cases
 * (one process for the batch instead of one per request):
 *
 *   node load.js URL --count N [--concurrency C] [--timeout-ms T]
 *
 * Each request is a new connection; prints one JSON line (BatchSummary):
 * answers by pod, failures with the first few reasons, the slowest request.
 * Exit 0 when none failed.
 */

export interface BatchSummary {
  ok: number;
  failed: number;
  errors: string[];
  pods: Record<string, number>;
  maxMs: number;
}

export async function batch(url: string, count: number, concurrency: number, timeoutMs: number): Promise<BatchSummary> {
  const sum: BatchSummary = { ok: 0, failed: 0, errors: [], pods: {}, maxMs: 0 };
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < count) {
      next++;
      const t = Date.now();
      const r = await get(url, timeoutMs);
      sum.maxMs = Math.max(sum.maxMs, Date.now() - t);
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
        sum.failed++;
        if (sum.errors.length < 5) sum.errors.push(r.ok ? `HTTP ${r.status}: ${String(r.body).trim().slice(0, 100)}` : (r.error ?? 'failed'));
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, count)) }, worker));
  return sum;
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
