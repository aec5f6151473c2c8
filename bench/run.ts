import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { errorMessage } from '../src/errors.js';
import { BPFFS_ROOT, ensureBpffs } from '../src/lab/bpffs.js';

/**
 * `node dist/bench/run.js NAME [--flag value | --flag]...` (npm run bench -- NAME ...):
 * runs bench/NAME.ts, whose `run(flags)` returns (or yields) one object per
 * measured case, and prints each as one JSON line. Units are in the field
 * names (total_ms, p50_us, rps). Benchmarks clean up after themselves.
 */

export type BenchFlags = Record<string, string | boolean>;
export type BenchResult = AsyncIterable<object> | Iterable<object> | Promise<object[]>;
export type Bench = (flags: BenchFlags) => BenchResult;

/** --a 1 --b --c=x -> { a: '1', b: true, c: 'x' }; anything else is an error naming it. */
export function parseFlags(args: string[]): BenchFlags {
  const flags: BenchFlags = {};
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    const m = /^--([a-z][a-z0-9-]*)(?:=(.*))?$/.exec(arg);
    if (!m) throw new Error(`unexpected argument ${JSON.stringify(arg)}: flags look like --name value, --name=value or --name`);
    const next = args[i + 1];
    if (m[2] !== undefined) flags[m[1]!] = m[2];
    else if (next !== undefined && !next.startsWith('--')) {
      flags[m[1]!] = next;
      i++;
    } else flags[m[1]!] = true;
  }
  return flags;
}

async function main(argv: string[]): Promise<void> {
  const [name, ...rest] = argv;
  if (name === undefined || !/^[a-z][a-z0-9-]*$/.test(name) || name === 'run') {
    throw new Error('usage: npm run bench -- NAME [--flag value]... (NAME is a file in bench/, e.g. enroll, datapath, identity-issue)');
  }
  const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
  const url = new URL(`./${name}${ext}`, import.meta.url);
  if (!existsSync(fileURLToPath(url))) throw new Error(`no benchmark ${JSON.stringify(name)} (${fileURLToPath(url)} does not exist)`);
  // stdout carries the result rows: logs of the code under test go to stderr, info and below not at all.
  process.env.FSMN_LOG_LEVEL ??= 'warn';
  process.env.FSMN_LOG_DEST ??= 'stderr';
  // The kernel benches pin below the bpffs, as the lab and the kernel tests
  // do: mount it where a minimal machine booted without one (root only; the
  // benches that need it say so themselves otherwise).
  if (process.getuid?.() === 0 && (await ensureBpffs())) process.stderr.write(`bench: mounted bpffs at ${BPFFS_ROOT} (it was not mounted)\n`);
  const mod = (await import(url.href)) as { run?: Bench };
  if (typeof mod.run !== 'function') throw new Error(`bench/${name} is not a benchmark: it exports no run(flags)`);
  const results = await mod.run(parseFlags(rest));
  for await (const row of results as AsyncIterable<object>) process.stdout.write(`${JSON.stringify(row)}\n`);
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    process.stderr.write(`bench: ${errorMessage(err)}\n`);
    process.exitCode = 1;
  });
}
