import { statfsSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { FsmNodeError } from '../errors.js';
import { run } from '../util/exec.js';

/** Where bpffs lives on every distribution we target; the dataplanes pin below it. */
export const BPFFS_ROOT = '/sys/fs/bpf';
const BPF_FS_MAGIC = 0xcafe4a11;

export function isBpffs(path: string = BPFFS_ROOT): boolean {
  try {
    return statfsSync(path).type === BPF_FS_MAGIC;
  } catch {
    return false;
  }
}

export function assertBpffs(path: string = BPFFS_ROOT): void {
  if (!isBpffs(path)) {
    throw new FsmNodeError('FSMN_ERR_NO_BPFFS', `no bpffs mounted at ${path}: run "mount -t bpf bpf ${path}" (systemd does this at boot on most distributions)`, {
      details: { path },
    });
  }
}

/**
 * Mount bpffs at its standard place when nothing is mounted there (what
 * systemd does at boot; minimal containers and VMs sometimes skip it).
 * Returns whether it mounted. Used by the kernel test setup and the lab, not
 * by the topology itself, which only checks.
 */
export async function ensureBpffs(path: string = BPFFS_ROOT): Promise<boolean> {
  if (isBpffs(path)) return false;
  await run('mount', ['-t', 'bpf', 'bpf', path]);
  assertBpffs(path);
  return true;
}

export async function createBpffsDir(path: string): Promise<void> {
  await mkdir(path, { recursive: true });
}

/**
 * Remove a bpffs directory with everything pinned below it. Unlinking a pin
 * drops only the pin's reference: a map or link still held open by a running
 * process lives on until that process closes it.
 */
export async function removeBpffsDir(path: string): Promise<void> {
  await rm(path, { recursive: true, force: true });
}
