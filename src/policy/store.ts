import { readFileSync } from 'node:fs';
import { open, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { formatIssues, NodePolicySchema, type NodePolicy } from './schema.js';

/**
 * The agent's last good policy on disk: what an edge node runs on through an
 * uplink outage and its own reboot. Written atomically (temporary file,
 * fsync, rename, fsync of the directory) so a crash mid-write leaves either
 * the old copy or the new one, never half of one; read back through the same
 * schema as a fetched policy.
 */

export const LAST_GOOD_FILE = 'policy.json';

const LastGoodSchema = z.object({ receivedAt: z.number(), policy: NodePolicySchema }).strict();
export type LastGood = z.infer<typeof LastGoodSchema>;

export function lastGoodPath(stateDir: string): string {
  return join(stateDir, LAST_GOOD_FILE);
}

/**
 * `policyJson` may be given when the caller holds the policy's JSON text
 * already (as received). Off the event loop: an SD card's fsync can take long,
 * and the agent keeps serving while it runs.
 */
export function writeLastGood(stateDir: string, policy: NodePolicy, receivedAt: number, policyJson = JSON.stringify(policy)): Promise<void> {
  return writeFileAtomic(lastGoodPath(stateDir), `{"receivedAt":${receivedAt},"policy":${policyJson}}`);
}

/** The stored policy, or why there is none usable (missing, unreadable, fails the schema). */
export function readLastGood(stateDir: string): { ok: true; value: LastGood } | { ok: false; why: string } {
  const path = lastGoodPath(stateDir);
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    return { ok: false, why: (err as NodeJS.ErrnoException).code === 'ENOENT' ? `${path} does not exist` : `${path}: ${(err as Error).message}` };
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    return { ok: false, why: `${path} is not JSON: ${(err as Error).message}` };
  }
  const r = LastGoodSchema.safeParse(json);
  return r.success ? { ok: true, value: r.data } : { ok: false, why: `${path} fails the NodePolicy schema: ${formatIssues(r.error)}` };
}

export async function writeFileAtomic(path: string, data: string, mode = 0o600, owner?: { uid: number; gid: number }): Promise<void> {
  const tmp = `${path}.${process.pid}.tmp`;
  const file = await open(tmp, 'w', mode);
  try {
    // Owned before it is renamed into place: a reader running as `owner` never meets the file in between.
    if (owner) await file.chown(owner.uid, owner.gid);
    await file.writeFile(data);
    await file.sync();
  } finally {
    await file.close();
  }
  await rename(tmp, path);
  // The rename itself must reach the disk too.
  const dir = await open(join(path, '..'), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}
