import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { noExclusions, type DesiredState, type PodIntercept } from '../dataplane/types.js';
import { errorMessage } from '../errors.js';
import type { NodePolicy, PolicyPod } from '../policy/schema.js';
import { logger } from '../util/log.js';

/**
 * Pods enrolled at creation by the CNI plugin, before the policy names them
 * ("enrolled early"), and the sandboxes deleted since the policy last named
 * them. The agent adds both to the desired state it renders from the policy
 * (`mergeEnrolled`, pure), so the reconcile pattern stays one: the next sync
 * keeps an early pod enrolled, and the policy's later arrival only adds its
 * identity and exclusions.
 */

export const EnrolledPodSchema = z
  .object({
    containerId: z.string().min(1),
    namespace: z.string().min(1),
    name: z.string().min(1),
    /** Empty when the runtime did not pass K8S_POD_UID. */
    uid: z.string(),
    ip: z.string().ip({ version: 'v4' }),
    cgroupPath: z.string().min(1),
    netns: z.string(),
    at: z.string(),
  })
  .strict();
export type EnrolledPod = z.infer<typeof EnrolledPodSchema>;

/** A sandbox DEL removed while the policy still named the pod at that address. */
export const DeletedSandboxSchema = z.object({ namespace: z.string(), name: z.string(), uid: z.string(), ip: z.string() }).strict();
export type DeletedSandbox = z.infer<typeof DeletedSandboxSchema>;

const samePod = (a: PodRef, b: PodRef): boolean =>
  a.uid !== '' && b.uid !== '' ? a.uid === b.uid : a.namespace === b.namespace && a.name === b.name;

/** The namespaces the CNI plugin enrols pods of: the policy's list, or (older controller) those of the pods it names. */
export function monitoredNamespaces(policy: NodePolicy): Set<string> {
  if (policy.node.monitoredNamespaces) return new Set(policy.node.monitoredNamespaces);
  return new Set([...policy.pods.map((p) => p.namespace), ...policy.meshPods.map((p) => p.namespace)]);
}

/** Should a new pod of `namespace/name` be enrolled at creation? */
export function wantsEnrolment(policy: NodePolicy, namespace: string, name: string): { enrol: boolean; why: string } {
  if (!monitoredNamespaces(policy).has(namespace)) return { enrol: false, why: `namespace ${namespace} is not monitored by mesh ${policy.mesh.name}` };
  if (policy.node.optedOutPods?.includes(`${namespace}/${name}`)) return { enrol: false, why: 'the pod opted out (flomesh.io/sidecar-injection: disabled)' };
  return { enrol: true, why: `namespace ${namespace} is monitored by mesh ${policy.mesh.name}` };
}

/** Namespace/name/uid of a pod: early pods, deletion marks and policy pods are matched by these (samePod). */
type PodRef = { namespace: string; name: string; uid: string };

/**
 * Items by pod, for O(1) samePod lookups: a sync merges every early pod into
 * the desired state of every policy pod, and a node whose pods all came
 * through the plugin has as many early pods as policy pods.
 */
class PodIndex<T extends PodRef> {
  private readonly byUid = new Map<string, T[]>();
  /** By namespace/name and list position: built on the first lookup that needs them (a uid missing somewhere). */
  private named: { byName: Map<string, T[]>; order: Map<T, number> } | undefined;
  /** Some item has no uid (a runtime that passed no K8S_POD_UID): only then can a ref with a uid match by name. */
  private readonly anyWithoutUid: boolean;

  constructor(private readonly items: readonly T[]) {
    let anyWithoutUid = false;
    for (const x of items) {
      if (x.uid !== '') push(this.byUid, x.uid, x);
      else anyWithoutUid = true;
    }
    this.anyWithoutUid = anyWithoutUid;
  }

  /** The items samePod with `ref`, in list order. */
  matches(ref: PodRef): readonly T[] {
    if (ref.uid !== '' && !this.anyWithoutUid) return this.byUid.get(ref.uid) ?? NO_ITEMS;
    const { byName, order } = (this.named ??= this.nameIndex());
    const named = byName.get(`${ref.namespace}/${ref.name}`) ?? [];
    if (ref.uid === '') return named;
    const byUid = this.byUid.get(ref.uid) ?? [];
    const noUid = named.filter((x) => x.uid === '');
    if (noUid.length === 0) return byUid;
    return [...byUid, ...noUid].sort((a, b) => order.get(a)! - order.get(b)!);
  }

  private nameIndex(): { byName: Map<string, T[]>; order: Map<T, number> } {
    const byName = new Map<string, T[]>();
    const order = new Map<T, number>();
    this.items.forEach((x, i) => {
      order.set(x, i);
      push(byName, `${x.namespace}/${x.name}`, x);
    });
    return { byName, order };
  }
}

const NO_ITEMS: readonly never[] = Object.freeze([]);

function push<K, V>(m: Map<K, V[]>, k: K, v: V): void {
  const xs = m.get(k);
  if (xs) xs.push(v);
  else m.set(k, [v]);
}

/*
 * The merged entries of the last merges, by their inputs: a sync whose inputs
 * did not change for a pod hands the dataplane the very same object, so the
 * dataplanes' per-pod caches see an unchanged pod at the cost of a lookup.
 * Inputs are never mutated (DesiredState is treated as immutable throughout).
 */
const overlaid = new WeakMap<PodIntercept, { early: EnrolledPod; out: PodIntercept }>();
const earlyOnly = new WeakMap<EnrolledPod, { inbound: PodIntercept['inbound']; out: PodIntercept }>();

/**
 * The desired state with the early pods merged in (pure). For a pod the
 * policy names too, the policy's entry keeps its identity and exclusions but
 * takes the early entry's address and cgroup (the live sandbox: newer than
 * the policy when a sandbox was recreated). A policy entry whose sandbox was
 * deleted at that very address is left out until the policy drops or moves it.
 * So is a policy entry at an address an early pod of another pod holds: the
 * primary CNI gave that address to a live sandbox, so the policy is behind.
 * Early pods of namespaces no longer monitored, or opted out, are left out.
 * Linear in pods + early pods.
 */
export function mergeEnrolled(desired: DesiredState, policy: NodePolicy, pods: readonly EnrolledPod[], deleted: readonly DeletedSandbox[]): DesiredState {
  const out: PodIntercept[] = [];
  const byPolicyPod = new Map<string, PolicyPod>(policy.pods.map((p) => [p.uid, p]));
  const earlyIndex = new PodIndex(pods);
  const deletedIndex = new PodIndex(deleted);
  const used = new Set<EnrolledPod>();
  const earlyIps = new Set(pods.map((e) => e.ip));
  for (const d of desired.pods) {
    const pp = byPolicyPod.get(d.uid);
    const ref = pp ? { namespace: pp.namespace, name: pp.name, uid: pp.uid } : { namespace: d.namespace, name: d.name, uid: d.uid };
    const early = earlyIndex.matches(ref)[0];
    if (early) {
      used.add(early);
      const known = overlaid.get(d);
      if (known?.early === early) out.push(known.out);
      else {
        const merged = { ...d, ip: early.ip, cgroupPath: early.cgroupPath };
        overlaid.set(d, { early, out: merged });
        out.push(merged);
      }
      continue;
    }
    if (deletedIndex.matches(ref).some((x) => x.ip === d.ip)) continue;
    // The address is another pod's live sandbox now: this entry of the policy is stale (the pod is gone).
    if (earlyIps.has(d.ip)) continue;
    out.push(d);
  }
  const monitored = monitoredNamespaces(policy);
  const optedOut = new Set(policy.node.optedOutPods ?? []);
  for (const e of pods) {
    if (used.has(e) || !monitored.has(e.namespace) || optedOut.has(`${e.namespace}/${e.name}`)) continue;
    const known = earlyOnly.get(e);
    if (known?.inbound === policy.mesh.inbound) {
      out.push(known.out);
      continue;
    }
    const entry: PodIntercept = {
      uid: e.uid || `cni-${e.containerId}`,
      namespace: e.namespace,
      name: e.name,
      ip: e.ip,
      cgroupPath: e.cgroupPath,
      inbound: policy.mesh.inbound,
      exclusions: noExclusions(),
    };
    earlyOnly.set(e, { inbound: policy.mesh.inbound, out: entry });
    out.push(entry);
  }
  return { ...desired, pods: out };
}

/** Deleted-sandbox marks still needed: the policy still names that pod at that address. */
export function liveDeletions(policy: NodePolicy, deleted: readonly DeletedSandbox[]): DeletedSandbox[] {
  if (deleted.length === 0) return [];
  const index = new PodIndex(policy.pods.map((p) => ({ namespace: p.namespace, name: p.name, uid: p.uid, ip: p.ip })));
  return deleted.filter((x) => index.matches(x).some((p) => p.ip === x.ip));
}

const log = logger('cni.enrolled');

/**
 * The store, persisted in the agent's state directory so a restarted agent
 * keeps its early pods: one small file per sandbox (`pods/<containerId>.json`)
 * and one for the deletion marks, so an ADD or DEL writes a few hundred bytes,
 * not the whole store (a node with a thousand pods rewrote 250 kB per pod
 * creation; on an edge node's flash that is wear as well as time). The single
 * file of earlier versions (`legacyFile`) is taken over once.
 */
export class EnrolledStore {
  private readonly pods = new Map<string, EnrolledPod>();
  private deleted: DeletedSandbox[] = [];
  private listed: readonly EnrolledPod[] | undefined;
  private readonly podsDir: string;
  private readonly deletedFile: string;

  constructor(dir: string, opts: { legacyFile?: string } = {}) {
    this.podsDir = join(dir, 'pods');
    this.deletedFile = join(dir, 'deleted.json');
    mkdirSync(this.podsDir, { recursive: true });
    for (const name of readdirSync(this.podsDir).filter((n) => n.endsWith('.json')).sort()) {
      const pod = readJson(join(this.podsDir, name), EnrolledPodSchema);
      if (pod) this.pods.set(pod.containerId, pod);
    }
    this.deleted = readJson(this.deletedFile, z.array(DeletedSandboxSchema)) ?? [];
    const legacy = opts.legacyFile && existsSync(opts.legacyFile) ? readJson(opts.legacyFile, LegacyFileSchema) : undefined;
    if (opts.legacyFile && legacy) {
      for (const p of legacy.pods) if (!this.pods.has(p.containerId)) this.writePod(p);
      if (this.deleted.length === 0 && legacy.deleted.length > 0) this.writeDeleted(legacy.deleted);
      rmSync(opts.legacyFile, { force: true });
      log.info({ from: opts.legacyFile, to: dir, pods: legacy.pods.length }, 'early pods moved to one file per sandbox');
    }
  }

  /** In order of arrival (a restarted agent: of container id). */
  list(): readonly EnrolledPod[] {
    return (this.listed ??= [...this.pods.values()]);
  }

  deletions(): readonly DeletedSandbox[] {
    return this.deleted;
  }

  /**
   * A new sandbox of a pod replaces the pod's earlier one (a recreated
   * sandbox), and any other early pod at the same address: the primary CNI
   * gave the address to this sandbox, so its former holder is gone (a DEL the
   * agent never heard, not yet pruned).
   */
  add(pod: EnrolledPod): void {
    for (const p of [...this.pods.values()]) if (p.containerId === pod.containerId || samePod(p, pod) || p.ip === pod.ip) this.dropPod(p.containerId);
    this.writePod(pod);
    if (this.deleted.some((d) => samePod(d, pod))) this.writeDeleted(this.deleted.filter((d) => !samePod(d, pod)));
  }

  /** DEL of a sandbox: only that sandbox's entry goes (a newer sandbox of the pod stays); its address is remembered. */
  remove(containerId: string, ref: PodRef | undefined, policyIp: string | undefined): EnrolledPod | undefined {
    const gone = this.pods.get(containerId);
    if (gone) this.dropPod(containerId);
    const who = gone ?? ref;
    const ip = gone?.ip ?? policyIp;
    if (who && ip && ![...this.pods.values()].some((p) => samePod(p, who))) {
      this.writeDeleted([...this.deleted.filter((d) => !samePod(d, who)), { namespace: who.namespace, name: who.name, uid: who.uid, ip }]);
    }
    return gone;
  }

  has(containerId: string): boolean {
    return this.pods.has(containerId);
  }

  /** Drop what the policy made unnecessary and early pods whose sandbox is gone (a DEL the agent never heard). */
  prune(policy: NodePolicy | undefined, sandboxAlive: (p: EnrolledPod) => boolean): void {
    for (const p of [...this.pods.values()]) if (!sandboxAlive(p)) this.dropPod(p.containerId);
    const deleted = policy ? liveDeletions(policy, this.deleted) : this.deleted;
    if (deleted.length !== this.deleted.length) this.writeDeleted(deleted);
  }

  private podFile(containerId: string): string {
    const name = encodeURIComponent(containerId);
    // CNI container ids are short; a long one gets a name of bounded length.
    return join(this.podsDir, `${name.length > 200 ? createHash('sha256').update(containerId).digest('hex') : name}.json`);
  }

  private writePod(pod: EnrolledPod): void {
    writeAtomic(this.podFile(pod.containerId), JSON.stringify(pod) + '\n');
    this.pods.delete(pod.containerId); // re-added last: order of arrival
    this.pods.set(pod.containerId, pod);
    this.listed = undefined;
  }

  private dropPod(containerId: string): void {
    rmSync(this.podFile(containerId), { force: true });
    this.pods.delete(containerId);
    this.listed = undefined;
  }

  private writeDeleted(deleted: DeletedSandbox[]): void {
    writeAtomic(this.deletedFile, JSON.stringify(deleted) + '\n');
    this.deleted = deleted;
  }
}

const LegacyFileSchema = z.object({ pods: z.array(EnrolledPodSchema), deleted: z.array(DeletedSandboxSchema) }).strict();

function readJson<T>(file: string, schema: z.ZodType<T>): T | undefined {
  if (!existsSync(file)) return undefined;
  try {
    const parsed = schema.safeParse(JSON.parse(readFileSync(file, 'utf8')));
    if (parsed.success) return parsed.data;
    log.warn({ file, err: parsed.error.issues[0]?.message }, 'ignored an unreadable early-pod record');
  } catch (err) {
    log.warn({ file, err: errorMessage(err) }, 'ignored an unreadable early-pod record');
  }
  return undefined;
}

function writeAtomic(file: string, text: string): void {
  const tmp = `${file}.tmp`;
  writeFileSync(tmp, text);
  renameSync(tmp, file);
}
