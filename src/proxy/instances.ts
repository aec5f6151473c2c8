import { InvalidInputError } from '../errors.js';

/**
 * Planning the node proxy's instances (pure). The supervisor runs N Pipy
 * processes that all listen on the same ports with SO_REUSEPORT: when one
 * dies, the kernel drops its listening sockets from the reuseport group and
 * new connections go to the survivors at once, while the supervisor restarts
 * the dead one (docs/proxy.md, "Several instances").
 */

/**
 * Default instance count: two, so a crash of one leaves a listener. Measured
 * on a 2-core board (bench/proxy-crash): two 1-thread instances carry the
 * same connection-per-request rate as one 2-thread instance and cost one
 * more Pipy's idle memory (docs/proxy.md, "Several instances").
 */
export const DEFAULT_PIPY_INSTANCES = 2;
export const MAX_INSTANCES = 16;

/** What runs, as recorded in proxy.json (the adoption record). */
export interface ProxyInstance {
  pid: number;
  /** /proc/<pid>/stat start time: pid reuse cannot pass for our proxy. */
  startTime: string;
  kind: 'passthrough' | 'pipy';
  bin: string;
  version: string;
  programHash?: string;
  codebase?: string;
  adminPort?: number;
  threads: number;
  logFile: string;
  startedAt: string;
}

/** proxy.json: the instances in slot order, and the ones an interrupted upgrade was retiring. */
export interface AdoptionRecord {
  instances: ProxyInstance[];
  retiring: ProxyInstance[];
}

/** The instance count for a proxy kind: the passthrough proxy (Node.js, no SO_REUSEPORT) is always one. */
export function instanceCount(kind: 'passthrough' | 'pipy', requested: number | undefined): number {
  if (kind === 'passthrough') return 1;
  const n = requested ?? DEFAULT_PIPY_INSTANCES;
  if (!Number.isInteger(n) || n < 1 || n > MAX_INSTANCES) throw new InvalidInputError('pipy.instances', requested, `must be an integer from 1 to ${MAX_INSTANCES}`);
  return n;
}

/**
 * Worker threads per instance: `total` split as evenly as possible, the
 * larger shares first, at least one each (so more instances than threads
 * run one thread each: availability before strict thread economy).
 */
export function splitThreads(total: number, n: number): number[] {
  const t = Math.max(total, n);
  return Array.from({ length: n }, (_, i) => Math.floor(t / n) + (i < t % n ? 1 : 0));
}

/** Admin ports for `count` new instances: the lowest from `base` up that no running instance holds (an upgrade's set is disjoint from the old one). */
export function pickAdminPorts(base: number, count: number, used: Iterable<number | undefined>): number[] {
  const taken = new Set(used);
  const out: number[] = [];
  for (let p = base; out.length < count; p++) if (!taken.has(p)) out.push(p);
  return out;
}

/**
 * An instance's log: one per admin port (proxy-6060.log ...), since no two
 * running instances share one, rotating it at a start never renames the log
 * of a live instance; proxy.log for the passthrough proxy (no admin port).
 */
export function logFileName(adminPort: number | undefined): string {
  return adminPort === undefined ? 'proxy.log' : `proxy-${adminPort}.log`;
}

function isInstance(x: unknown): x is ProxyInstance {
  const r = x as Partial<ProxyInstance> | null;
  return typeof r === 'object' && r !== null && Number.isInteger(r.pid) && (r.pid ?? 0) > 0 && typeof r.startTime === 'string';
}

/**
 * proxy.json as written by this version ({instances, retiring}) or by the
 * previous one (a single instance object); anything unreadable is no record.
 */
export function parseAdoptionRecord(text: string): AdoptionRecord {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    return { instances: [], retiring: [] };
  }
  if (isInstance(doc)) return { instances: [doc], retiring: [] };
  const d = doc as { instances?: unknown; retiring?: unknown } | null;
  const list = (v: unknown): ProxyInstance[] => (Array.isArray(v) ? v.filter(isInstance) : []);
  return { instances: list(d?.instances), retiring: list(d?.retiring) };
}

export interface AdoptionPlan {
  /** Per slot: the adopted instance, or undefined when the slot must be started. */
  slots: Array<ProxyInstance | undefined>;
  /** Adopted instances beyond the wanted count (the count was lowered): retired. */
  surplus: ProxyInstance[];
  /** Why the adopted set must be replaced as a whole (upgrade), or undefined when it is kept and grown. */
  replace?: string;
}

/**
 * What to do with the live instances found in proxy.json. Kept when each is
 * what this agent would start in its slot (same kind, binary, version,
 * program and thread share): missing slots are started beside them, extra
 * ones retired. Otherwise the whole set is replaced hitlessly (upgrade), and
 * until then the adopted instances stay in their slots and keep serving.
 */
export function planAdoption(
  alive: readonly ProxyInstance[],
  want: { n: number; threads: readonly number[]; differs: (inst: ProxyInstance) => string | undefined },
): AdoptionPlan {
  const slots: Array<ProxyInstance | undefined> = Array.from({ length: want.n }, (_, i) => alive[i]);
  const surplus = alive.slice(want.n);
  for (const [i, inst] of alive.entries()) {
    const why = want.differs(inst) ?? (i < want.n && inst.threads !== want.threads[i] ? `threads ${inst.threads} -> ${want.threads[i]}` : undefined);
    if (why) return { slots, surplus, replace: why };
  }
  return { slots, surplus };
}
