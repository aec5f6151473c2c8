import { register } from 'node:module';

/**
 * jest globalTeardown: removes whatever this run left (a test that failed
 * before its afterAll, a crashed worker). Only this run's prefix.
 */
export default async function kernelTeardown(): Promise<void> {
  // Jest runs this file outside its module system: see ts-hooks.mjs. Registering twice is harmless.
  register('./ts-hooks.mjs', import.meta.url);
  const { sweep } = await import('../../src/lab/topology.js');
  const { removeClaimDir, testPrefix, testRunId } = await import('./names.js');
  const removed = await sweep(testPrefix());
  if (removed.length > 0) console.log(`kernel-teardown: swept ${removed.length} leftovers of this run: ${removed.join(', ')}`);
  removeClaimDir(testRunId());
}
