import { execFile } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { LAB_POINTER } from '../../src/lab/state.js';
import { cgroup2Root } from '../../src/util/cgroup.js';
import { pipySkipReason } from './pipy.js';

/** What the e2e tests of a Pipy lab share: the built CLI, the lab's kernel objects, and when to skip. */

export const root = fileURLToPath(new URL('../../', import.meta.url));
export const bin = join(root, 'dist', 'src', 'cli', 'bin.js');
const pexec = promisify(execFile);

/** `fsm-node ARGS...` from the build, as a user runs it; never throws. */
export async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await pexec(process.execPath, [bin, ...args], { cwd: root, env: { ...process.env, FSMN_LOG_LEVEL: 'warn' }, maxBuffer: 16 << 20 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

/** The lab's entries in a directory (netns, cgroup, bpffs), its self-check's excepted. */
export const labNames = (path: string): string[] => {
  try {
    return readdirSync(path).filter((n) => /^fsmlab(-|$)/.test(n) && !n.startsWith('fsmlab-selfcheck'));
  } catch {
    return [];
  }
};

/** Why a lab cannot run here (not root, a lab of the user's: its names are fixed), or undefined. */
export function labSkipReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root';
  if (existsSync(LAB_POINTER)) return `a lab is running (${LAB_POINTER}); run \`fsm-node lab down\` to let this test run`;
  const objs = [...labNames('/run/netns'), ...labNames(cgroup2Root())];
  if (objs.length > 0) return `fsmlab objects exist (${objs.join(', ')}); run \`fsm-node lab down\` to let this test run`;
  return undefined;
}

/** Why a Pipy lab cannot run here: no Pipy, or any reason of labSkipReason. */
export function pipyLabSkipReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root';
  return pipySkipReason() ?? labSkipReason();
}
