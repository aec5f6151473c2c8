import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CommandError, FsmNodeError, errorMessage } from '../../errors.js';
import type { Names } from './names.js';
import type { NodeExec } from './netns.js';

/**
 * Which iptables the node uses: iptables-legacy (x_tables) or iptables-nft
 * (nf_tables with the xt compatibility layer). Both can hold rules at the
 * same time and neither sees the other's, so a dataplane that writes to the
 * wrong one is silently bypassed or fights kube-proxy.
 *
 * Detection, in order (the first that answers wins):
 *  1. our state file: once chosen, never flip (restarts, upgrades);
 *  2. our own chains: if exactly one backend holds FSMN_* chains we were
 *     there before (state directory lost, or no state directory given);
 *  3. rule count, as kube-proxy's iptables-wrapper and istio-cni do: the
 *     backend holding more rules is the one the node's other components
 *     (kube-proxy, the CNI) write to;
 *  4. both empty: nft. Every current distribution's `iptables` is nft, the
 *     legacy tables are frozen upstream, and an empty node has nobody to agree with.
 * The choice is written to the state file (when a state directory is given)
 * so later runs skip 2-4.
 */

export type Backend = 'legacy' | 'nft';
export const BACKENDS: readonly Backend[] = ['legacy', 'nft'];

export type BackendSource = 'state-file' | 'installed-chains' | 'rule-count' | 'default';

export interface BackendObservation {
  /** Rules (`-A` lines) in that backend's iptables-save; undefined when the tool is missing. */
  rules: number | undefined;
  /** Whether it holds chains with our prefix. */
  ours: boolean;
}

export interface BackendChoice {
  backend: Backend;
  source: BackendSource;
  observed?: Record<Backend, BackendObservation>;
  /** Where the choice is persisted; undefined without a state directory. */
  stateFile?: string;
}

export const STATE_FILE = 'iptables-backend.json';

export function saveCommand(b: Backend): string {
  return `iptables-${b}-save`;
}

export function restoreCommand(b: Backend): string {
  return `iptables-${b}-restore`;
}

export function countRules(saveText: string): number {
  let n = 0;
  for (const line of saveText.split('\n')) if (line.startsWith('-A ')) n++;
  return n;
}

export function holdsOurChains(saveText: string, names: Names): boolean {
  return saveText.split('\n').some((l) => l.startsWith(`:${names.chainPrefix}`));
}

/** Steps 2-4 above; pure. */
export function chooseBackend(observed: Record<Backend, BackendObservation>): { backend: Backend; source: BackendSource } {
  const usable = BACKENDS.filter((b) => observed[b].rules !== undefined);
  if (usable.length === 0) {
    throw new FsmNodeError('FSMN_ERR_IPTABLES_UNAVAILABLE', 'neither iptables-legacy-save nor iptables-nft-save can run on this node: install iptables (1.8 or later)');
  }
  if (usable.length === 1) return { backend: usable[0] as Backend, source: 'rule-count' };
  const withOurs = usable.filter((b) => observed[b].ours);
  if (withOurs.length === 1) return { backend: withOurs[0] as Backend, source: 'installed-chains' };
  const legacy = observed.legacy.rules ?? 0;
  const nft = observed.nft.rules ?? 0;
  if (legacy === 0 && nft === 0) return { backend: 'nft', source: 'default' };
  return { backend: legacy > nft ? 'legacy' : 'nft', source: 'rule-count' };
}

export async function observeBackend(exec: NodeExec, backend: Backend, names: Names): Promise<BackendObservation> {
  try {
    const { stdout } = await exec.run(saveCommand(backend), []);
    return { rules: countRules(stdout), ours: holdsOurChains(stdout, names) };
  } catch (err) {
    // Missing tool (spawn failed) or a kernel without that backend: not usable here.
    if (err instanceof CommandError) return { rules: undefined, ours: false };
    throw err;
  }
}

async function readStateFile(path: string): Promise<Backend | undefined> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new FsmNodeError('FSMN_ERR_STATE', `cannot read ${path}: ${errorMessage(err)}`, { cause: err });
  }
  let backend: unknown;
  try {
    backend = (JSON.parse(text) as { backend?: unknown }).backend;
  } catch {
    backend = undefined;
  }
  if (backend !== 'legacy' && backend !== 'nft') {
    // Re-detecting could flip the backend under running rules: refuse and say how to recover.
    throw new FsmNodeError('FSMN_ERR_STATE', `${path} does not name an iptables backend ("legacy" or "nft"); fix or delete it to detect again`, { details: { path } });
  }
  return backend;
}

async function writeStateFile(path: string, choice: BackendChoice): Promise<void> {
  const tmp = `${path}.tmp`;
  const body = { backend: choice.backend, source: choice.source, observed: choice.observed, decidedAt: new Date().toISOString() };
  await writeFile(tmp, `${JSON.stringify(body, null, 2)}\n`, { mode: 0o644 });
  await rename(tmp, path);
}

/** `persist` false: a read-only caller (installed()) must not write the state file. */
export async function resolveBackend(exec: NodeExec, names: Names, stateDir: string | undefined, persist: boolean): Promise<BackendChoice> {
  const stateFile = stateDir === undefined ? undefined : join(stateDir, STATE_FILE);
  if (stateFile) {
    const persisted = await readStateFile(stateFile);
    if (persisted) return { backend: persisted, source: 'state-file', stateFile };
  }
  const observed = { legacy: await observeBackend(exec, 'legacy', names), nft: await observeBackend(exec, 'nft', names) };
  const choice: BackendChoice = { ...chooseBackend(observed), observed, ...(stateFile ? { stateFile } : {}) };
  if (persist && stateDir && stateFile) {
    await mkdir(stateDir, { recursive: true });
    await writeStateFile(stateFile, choice);
  }
  return choice;
}

/** cleanup: forget the choice along with everything else we installed. */
export async function removeStateFile(stateDir: string | undefined): Promise<string | undefined> {
  if (stateDir === undefined) return undefined;
  const path = join(stateDir, STATE_FILE);
  try {
    await rm(path);
    return path;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}
