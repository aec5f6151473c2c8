import { run } from '../../src/util/exec.js';
import { eventually } from './eventually.js';

/**
 * "Nothing of ours is left" checks for BPF objects, robust on a busy machine.
 *
 * Links, programs and maps have three separate id counters in the kernel, so
 * a link id can equal the id of some other process's long-lived map or
 * program (a lab's agent, another test run). Matching our ids against one
 * merged global listing of all kinds therefore finds "our" link alive forever
 * whenever such an object exists: the flake of issue 16. Here each recorded
 * object is asked for in its own kind, by id (`bpftool KIND show id N`), and
 * nothing else on the machine is listed. Ids are allocated cyclically, so an
 * id that is gone is not handed out again during a test.
 *
 * The kernel frees a program after an RCU grace period and deferred work, and
 * the maps it used only then, so the check polls (bounded) before it reports
 * what is still alive. A real leak never goes away and still fails.
 */

export type BpfKind = 'prog' | 'map' | 'link';

export interface BpfObjectRef {
  kind: BpfKind;
  id: number;
  /** For the failure message only. */
  name?: string;
}

/**
 * bpftool's JSON of this object, or undefined when no object of this kind has
 * this id. Any other bpftool failure throws: a check that cannot look must
 * not pass.
 */
export async function bpfObjectShow(o: BpfObjectRef): Promise<{ id: number; name?: string } | undefined> {
  const r = await run('bpftool', ['-j', o.kind, 'show', 'id', String(o.id)], { allowFail: true });
  if (r.code === 0) return JSON.parse(r.stdout) as { id: number; name?: string };
  if (/No such file or directory/.test(r.stdout + r.stderr)) return undefined;
  throw new Error(`bpftool ${o.kind} show id ${o.id} failed (exit ${r.code}): ${(r.stdout + r.stderr).trim()}`);
}

/** Whether this object is alive now. */
export const bpfObjectAlive = async (o: BpfObjectRef): Promise<boolean> => (await bpfObjectShow(o)) !== undefined;

export const describeBpfObject = (o: BpfObjectRef): string => `${o.kind} ${o.id}${o.name ? ` (${o.name})` : ''}`;

/**
 * The objects of `objects` still alive after waiting up to `timeoutMs` for
 * the kernel's deferred free, as "map 12 (name)" lines: expect it toEqual([]).
 */
export async function bpfObjectsLeft(objects: readonly BpfObjectRef[], timeoutMs = 5000): Promise<string[]> {
  let pending = [...objects];
  const left = await eventually(
    async () => {
      const alive: BpfObjectRef[] = [];
      for (const o of pending) if (await bpfObjectAlive(o)) alive.push(o);
      pending = alive;
      return alive;
    },
    (alive) => alive.length === 0,
    timeoutMs,
  );
  return left.map(describeBpfObject);
}
