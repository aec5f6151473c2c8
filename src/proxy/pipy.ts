import { spawn } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';
import { FsmNodeError, InvalidInputError } from '../errors.js';

/**
 * Everything the supervisor knows about the Pipy binary: where it is, what
 * version it says it is, and the command line for the node's shared proxy.
 * The Pipy program itself (proxy/main.js) is opaque here: the supervisor only
 * hands Pipy a codebase directory holding the program and a config.json.
 */

export class PipyNotFoundError extends FsmNodeError {
  constructor(pipyBin: string | undefined) {
    super(
      'FSMN_ERR_PIPY_NOT_FOUND',
      pipyBin
        ? `PIPY_BIN=${pipyBin} is not an executable file; set PIPY_BIN to the Pipy binary or put pipy on PATH`
        : 'no Pipy binary: PIPY_BIN is not set and no executable "pipy" is on PATH (production images copy it from the upstream Pipy image)',
      { details: { PIPY_BIN: pipyBin } },
    );
  }
}

function executable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** PIPY_BIN when set (and then only it: a wrong PIPY_BIN is an error, not a fallback), else `pipy` on PATH. */
export function findPipy(env: NodeJS.ProcessEnv = process.env): string {
  if (env.PIPY_BIN) {
    if (executable(env.PIPY_BIN)) return env.PIPY_BIN;
    throw new PipyNotFoundError(env.PIPY_BIN);
  }
  for (const dir of (env.PATH ?? '').split(delimiter)) {
    if (dir && executable(join(dir, 'pipy'))) return join(dir, 'pipy');
  }
  throw new PipyNotFoundError(undefined);
}

/** findPipy for callers that fall back (the lab's passthrough proxy, skipped tests and bench rows): undefined when there is none. */
export function pipyBinary(env: NodeJS.ProcessEnv = process.env): string | undefined {
  try {
    return findPipy(env);
  } catch (err) {
    if (err instanceof PipyNotFoundError) return undefined;
    throw err;
  }
}

export const UNKNOWN_LOCAL_BUILD = 'unknown (local build)';

/** The "Version : x" line of `pipy --version`; a build without version metadata leaves it empty. */
export function parsePipyVersion(output: string): string {
  const m = /^Version\s*:[ \t]*(.*)$/m.exec(output);
  const v = m?.[1]?.trim();
  return v ? v : UNKNOWN_LOCAL_BUILD;
}

/**
 * Runs `<bin> --version` and answers as soon as the Version line is out:
 * Pipy 1.5 sometimes lingers for seconds after printing it (measured: 1 run
 * in 3 took 5 s here), so the process is killed once the line is read.
 */
export function pipyVersion(bin: string, timeoutMs = 5000): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ['--version'], { stdio: ['ignore', 'pipe', 'ignore'] });
    let out = '';
    const finish = (err?: Error): void => {
      clearTimeout(timer);
      child.kill('SIGKILL');
      if (err) reject(err);
      else resolve(parsePipyVersion(out));
    };
    const timer = setTimeout(() => finish(out ? undefined : new FsmNodeError('FSMN_ERR_PIPY_VERSION', `${bin} --version printed nothing within ${timeoutMs} ms`)), timeoutMs);
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      if (/^Version\s*:.*\n/m.test(out)) finish();
    });
    child.on('error', (err) => finish(new FsmNodeError('FSMN_ERR_PIPY_VERSION', `${bin} --version failed: ${err.message}`, { cause: err })));
    child.on('exit', () => {
      if (out) finish();
    });
  });
}

/** Worker threads: one per CPU, at most `cap` (small boards keep memory low), at least 1. */
export function threadsFor(cpus: number, cap: number): number {
  if (!Number.isInteger(cap) || cap < 1) throw new InvalidInputError('proxy thread cap', cap, 'must be an integer >= 1');
  return Math.max(1, Math.min(Number.isFinite(cpus) ? Math.floor(cpus) : 1, cap));
}

/** Logical CPUs the node has (systeminformation, as the probe reports them). */
export async function nodeCpus(): Promise<number> {
  const { default: si } = await import('systeminformation'); // on use: sizing happens once per start
  const cpu = await si.cpu();
  return cpu.cores || 1;
}

export interface PipyArgsOptions {
  /** The entry script inside the codebase directory (Pipy serves its directory as the codebase). */
  entry: string;
  threads: number;
  adminPort: number;
  logLevel?: 'debug' | 'info' | 'warn' | 'error';
}

/**
 * The command line of one shared-proxy instance. --reuse-port always: a second
 * instance (upgrade) binds the same listeners beside the first. Admin on
 * loopback only (it can rewrite the codebase). Info logging is required: the
 * supervisor reads "[restart] Codebase reloaded" lines as the reload ack.
 */
export function pipyArgs(o: PipyArgsOptions): string[] {
  if (!o.entry.startsWith('/')) throw new InvalidInputError('pipy entry', o.entry, 'must be an absolute path to the entry script');
  return [o.entry, '--reuse-port', `--threads=${o.threads}`, `--admin-port=127.0.0.1:${o.adminPort}`, `--log-level=${o.logLevel ?? 'info'}`, '--log-local=stdout'];
}
