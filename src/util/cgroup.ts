import { readFileSync, statSync } from 'node:fs';
import { mkdir, readdir, readFile, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FsmNodeError } from '../errors.js';

/**
 * cgroup v2 helpers. The eBPF dataplane attaches to cgroup v2 directories and
 * enrols pods by cgroup id, so tests and the lab build their own cgroup trees
 * under the cgroup2 mount. Nothing here touches the root cgroup itself.
 */

export class CgroupError extends FsmNodeError {
  constructor(message: string, options?: { cause?: unknown; details?: Record<string, unknown> }) {
    super('FSMN_ERR_CGROUP', message, options);
  }
}

/** /proc/mounts escapes blanks and backslashes in paths as octal (\040). */
function unescapeMountPath(p: string): string {
  return p.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Mount points of a file system type, in /proc/mounts order (a pure helper for tests). */
export function mountPointsOf(procMounts: string, fsType: string): string[] {
  const out: string[] = [];
  for (const line of procMounts.split('\n')) {
    const fields = line.split(' ');
    if (fields[2] === fsType && fields[1] !== undefined) out.push(unescapeMountPath(fields[1]));
  }
  return out;
}

/**
 * Where cgroup v2 is mounted: /sys/fs/cgroup on a pure v2 host,
 * /sys/fs/cgroup/unified on a hybrid one. Read from /proc/mounts, never guessed.
 */
export function cgroup2Root(): string {
  const mounts = mountPointsOf(readFileSync('/proc/mounts', 'utf8'), 'cgroup2');
  const root = mounts[0];
  if (root === undefined) {
    throw new CgroupError('no cgroup2 file system in /proc/mounts: fsm-node needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup/unified, or boot with systemd.unified_cgroup_hierarchy=1)');
  }
  return root;
}

/** On cgroup2 the kernel's cgroup id is the directory's inode number. */
export function cgroupId(path: string): bigint {
  try {
    return statSync(path, { bigint: true }).ino;
  } catch (err) {
    throw new CgroupError(`cannot stat cgroup ${path}`, { cause: err });
  }
}

export async function createCgroup(path: string): Promise<void> {
  try {
    await mkdir(path, { recursive: true });
  } catch (err) {
    throw new CgroupError(`cannot create cgroup ${path}`, { cause: err });
  }
}

function isErrno(err: unknown, code: string): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === code;
}

async function populated(path: string): Promise<boolean> {
  try {
    return /^populated 1$/m.test(await readFile(join(path, 'cgroup.events'), 'utf8'));
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return false;
    throw err;
  }
}

/** Pids directly in one cgroup (not its children). */
export async function cgroupPids(path: string): Promise<number[]> {
  try {
    const text = await readFile(join(path, 'cgroup.procs'), 'utf8');
    return text.split('\n').filter((l) => l !== '').map(Number);
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return [];
    throw err;
  }
}

async function childDirs(path: string): Promise<string[]> {
  try {
    const entries = await readdir(path, { withFileTypes: true });
    return entries.filter((e) => e.isDirectory()).map((e) => join(path, e.name));
  } catch (err) {
    if (isErrno(err, 'ENOENT')) return [];
    throw err;
  }
}

/**
 * SIGKILL every process in a cgroup subtree and wait until it is empty. Only
 * call it on cgroups whose processes are ours by construction (a topology's
 * pods, proxy and node cgroups). cgroup.kill (5.14+) kills the whole subtree
 * atomically, also processes forking meanwhile; older kernels get a per-pid loop.
 */
export async function killCgroupTree(path: string, timeoutMs = 10_000): Promise<void> {
  if (!(await populated(path))) return;
  try {
    await writeFile(join(path, 'cgroup.kill'), '1');
  } catch (err) {
    if (isErrno(err, 'ENOENT') && !(await populated(path))) return;
    await killPidsRecursively(path);
  }
  const deadline = Date.now() + timeoutMs;
  while (await populated(path)) {
    if (Date.now() > deadline) {
      throw new CgroupError(`processes in cgroup ${path} did not exit within ${timeoutMs} ms`, { details: { path } });
    }
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function killPidsRecursively(path: string): Promise<void> {
  for (const child of await childDirs(path)) await killPidsRecursively(child);
  for (const pid of await cgroupPids(path)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch (err) {
      if (!isErrno(err, 'ESRCH')) throw err;
    }
  }
}

/**
 * Kill what runs in a cgroup subtree, then rmdir it depth-first. Missing
 * directories are fine (idempotent). BPF programs attached to these cgroups
 * do not block rmdir: the kernel detaches them when the cgroup is released.
 * Checked on 6.18 with a bpf_link and a legacy attachment on one cgroup: rmdir
 * succeeds, the link then reports cgroup_id 0 (detached) but stays pinned
 * until its owner unpins it, so dataplanes still unpin their own links.
 */
export async function removeCgroupTree(path: string): Promise<void> {
  await killCgroupTree(path);
  await rmdirDepthFirst(path);
}

async function rmdirDepthFirst(path: string): Promise<void> {
  for (const child of await childDirs(path)) await rmdirDepthFirst(child);
  // A cgroup whose last task just exited can report EBUSY for a moment.
  for (let attempt = 0; ; attempt++) {
    try {
      await rmdir(path);
      return;
    } catch (err) {
      if (isErrno(err, 'ENOENT')) return;
      if (isErrno(err, 'EBUSY') && attempt < 200) {
        await new Promise((r) => setTimeout(r, 10));
        continue;
      }
      throw new CgroupError(`cannot remove cgroup ${path}`, { cause: err, details: { path } });
    }
  }
}

