import { addCommand, delCommand } from './ipset.js';
import type { Names } from './names.js';
import { podMembers, proxySourceMembers, type SetMember } from './render.js';
import type { NormalPod, NormalState } from './validate.js';

/**
 * What the last successful sync put into our sets, per pod. A non-full sync
 * compares each pod's few fields with this and builds set members only for
 * pods that changed, so enrolling one pod on a node with a thousand costs a
 * field comparison per pod, not a re-render and diff of every member.
 */

interface CachedPod {
  ipText: string;
  strict: boolean;
  outPorts: readonly number[];
  inPorts: readonly number[];
  members: SetMember[];
  /** Sync generation that last saw this pod: older ones are gone from the desired state. */
  seen: number;
}

export interface SetChanges {
  /** Deletes first, then adds: a pod replaced by another at the same address. */
  commands: string[];
  /** Comments of deleted members (set -> member -> comment), so an undo re-adds them as they were. */
  deletedComments: Map<string, Map<string, string | undefined>>;
}

function sameNumbers(a: readonly number[], b: readonly number[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function samePod(c: CachedPod, p: NormalPod): boolean {
  return c.ipText === p.ipText && c.strict === p.strict && sameNumbers(c.outPorts, p.exclusions.outboundPorts) && sameNumbers(c.inPorts, p.exclusions.inboundPorts);
}

export class SetCache {
  private readonly pods = new Map<string, CachedPod>();
  private proxySources = new Map<string, undefined>();
  /** Entries each set holds after the last sync: the cheap check compares the kernel's count with it. */
  readonly sizes = new Map<string, number>();
  private generation = 0;

  private constructor(private readonly names: Names) {
    for (const set of Object.values(names.sets)) this.sizes.set(set, 0);
  }

  /** The cache after a full sync made the kernel equal to `state`. */
  static fromState(state: NormalState, names: Names): SetCache {
    const cache = new SetCache(names);
    cache.changes(state);
    return cache;
  }

  private count(set: string, by: number): void {
    this.sizes.set(set, (this.sizes.get(set) ?? 0) + by);
  }

  /**
   * The set commands that take the kernel from the cached state to `state`,
   * and the cache updated to `state`. Callers that fail to apply them must
   * drop the cache (the dataplane does: the next sync is full).
   */
  changes(state: NormalState): SetChanges {
    const dels: string[] = [];
    const adds: string[] = [];
    const deletedComments = new Map<string, Map<string, string | undefined>>();
    const del = (m: SetMember): void => {
      dels.push(delCommand(m.set, m.member));
      const bySet = deletedComments.get(m.set) ?? new Map<string, string | undefined>();
      bySet.set(m.member, m.comment);
      deletedComments.set(m.set, bySet);
      this.count(m.set, -1);
    };
    const add = (m: SetMember): void => {
      adds.push(addCommand(m.set, m.member, m.comment));
      this.count(m.set, 1);
    };
    const gen = ++this.generation;
    for (const pod of state.pods) {
      const cached = this.pods.get(pod.uid);
      if (cached !== undefined && samePod(cached, pod)) {
        cached.seen = gen;
        continue;
      }
      if (cached !== undefined) cached.members.forEach(del);
      const members = podMembers(pod, this.names);
      members.forEach(add);
      this.pods.set(pod.uid, {
        ipText: pod.ipText,
        strict: pod.strict,
        outPorts: pod.exclusions.outboundPorts,
        inPorts: pod.exclusions.inboundPorts,
        members,
        seen: gen,
      });
    }
    for (const [uid, cached] of this.pods) {
      if (cached.seen === gen) continue;
      cached.members.forEach(del);
      this.pods.delete(uid);
    }
    const set = this.names.sets.proxySources;
    const sources = proxySourceMembers(state);
    for (const m of this.proxySources.keys()) if (!sources.has(m)) del({ set, member: m, comment: undefined });
    for (const m of sources.keys()) if (!this.proxySources.has(m)) add({ set, member: m, comment: undefined });
    this.proxySources = sources;
    return { commands: [...dels, ...adds], deletedComments };
  }
}
