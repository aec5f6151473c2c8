import { mkdirSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/**
 * Names of kernel objects made by tests. Every run of the kernel tiers owns
 * the prefix `fsmt<pid>`, pid being the jest main process (set as FSMT_RUN by
 * kernel-setup.ts), so helpers running tests at the same time never touch
 * each other's objects, and leftovers of a dead run are recognisable.
 */

export const TEST_PREFIX_ROOT = 'fsmt';
export const RUN_ENV = 'FSMT_RUN';

export function testRunId(): number {
  const fromEnv = Number(process.env[RUN_ENV]);
  return Number.isInteger(fromEnv) && fromEnv > 0 ? fromEnv : process.pid;
}

/** `fsmt<pid>`: everything this jest run creates starts with it. */
export function testPrefix(): string {
  return `${TEST_PREFIX_ROOT}${testRunId()}`;
}

/** Directory where this run's sub-prefixes are claimed (removed by kernel-teardown). */
export function claimDir(runId: number = testRunId()): string {
  return join(tmpdir(), `${TEST_PREFIX_ROOT}${runId}.prefixes`);
}

/**
 * A prefix no other topology of this run uses: `fsmt<pid>x<n>`. n is claimed
 * with an atomic mkdir, so test files in parallel workers (and several
 * topologies in one file) get distinct prefixes.
 */
export function uniqueTestPrefix(): string {
  const dir = claimDir();
  mkdirSync(dir, { recursive: true });
  for (let n = 1; ; n++) {
    try {
      mkdirSync(join(dir, String(n)));
      return `${testPrefix()}x${n}`;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
  }
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Run ids found in names like `fsmt1234x2-n1` or `fsmt1234.prefixes`. */
export function runIdsIn(names: string[]): number[] {
  const ids = new Set<number>();
  for (const name of names) {
    const m = /^fsmt(\d+)/.exec(name);
    if (m?.[1] !== undefined) ids.add(Number(m[1]));
  }
  return [...ids];
}

/** Remove the claim directory of a finished run. */
export function removeClaimDir(runId: number): void {
  rmSync(claimDir(runId), { recursive: true, force: true });
}

export function claimDirRunIds(): number[] {
  return runIdsIn(readdirSync(tmpdir()).filter((n) => n.endsWith('.prefixes')));
}
