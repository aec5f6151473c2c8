import { readdirSync } from 'node:fs';
import { register } from 'node:module';

function listOr(path: string): string[] {
  try {
    return readdirSync(path);
  } catch {
    return [];
  }
}

/**
 * jest globalSetup of the kernel, pipy and e2e tiers (runs once, in the jest
 * main process): checks what the tiers need, names this run FSMT_RUN=<pid>,
 * and sweeps leftovers of earlier runs whose jest process is gone. Runs of
 * other processes that are still alive are never touched.
 */
export default async function kernelSetup(): Promise<void> {
  // Jest runs this file outside its module system: see ts-hooks.mjs.
  register('./ts-hooks.mjs', import.meta.url);
  const { ensureBpffs, BPFFS_ROOT } = await import('../../src/lab/bpffs.js');
  const { sweep } = await import('../../src/lab/topology.js');
  const { cgroup2Root } = await import('../../src/util/cgroup.js');
  const { RUN_ENV, claimDirRunIds, pidAlive, removeClaimDir, runIdsIn } = await import('./names.js');
  if (process.getuid?.() !== 0) {
    throw new Error('kernel tests need root (network namespaces, cgroups, bpffs): run them as root');
  }
  const cgRoot = cgroup2Root();
  if (await ensureBpffs()) console.log(`kernel-setup: mounted bpffs at ${BPFFS_ROOT} (it was not mounted)`);
  process.env[RUN_ENV] = String(process.pid);

  const names = [...listOr('/run/netns'), ...listOr(cgRoot), ...listOr(BPFFS_ROOT)];
  for (const runId of runIdsIn(names)) {
    if (runId === process.pid || pidAlive(runId)) continue;
    const removed = await sweep(`fsmt${runId}`);
    if (removed.length > 0) console.log(`kernel-setup: swept ${removed.length} leftovers of dead test run ${runId}`);
  }
  for (const runId of claimDirRunIds()) {
    if (runId !== process.pid && !pidAlive(runId)) removeClaimDir(runId);
  }
}
