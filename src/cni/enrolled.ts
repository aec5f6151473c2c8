import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { z } from 'zod';
import { noExclusions, type DesiredState, type PodIntercept } from '../dataplane/types.js';
import type { NodePolicy, PolicyPod } from '../policy/schema.js';

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

const FileSchema = z.object({ pods: z.array(EnrolledPodSchema), deleted: z.array(DeletedSandboxSchema) }).strict();

const samePod = (a: { namespace: string; name: string; uid: string }, b: { namespace: string; name: string; uid: string }): boolean =>
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

/**
 * The desired state with the early pods merged in (pure). For a pod the
 * policy names too, the policy's entry keeps its identity and exclusions but
 * takes the early entry's address and cgroup (the live sandbox: newer than
 * the policy when a sandbox was recreated). A policy entry whose sandbox was
 * deleted at that very address is left out until the policy drops or moves it.
 * Early pods of namespaces no longer monitored, or opted out, are left out.
 */
export function mergeEnrolled(desired: DesiredState, policy: NodePolicy, pods: readonly EnrolledPod[], deleted: readonly DeletedSandbox[]): DesiredState {
  const out: PodIntercept[] = [];
  const byPolicyPod = new Map<string, PolicyPod>(policy.pods.map((p) => [p.uid, p]));
  const used = new Set<EnrolledPod>();
  for (const d of desired.pods) {
    const pp = byPolicyPod.get(d.uid);
    const ref = pp ? { namespace: pp.namespace, name: pp.name, uid: pp.uid } : { namespace: d.namespace, name: d.name, uid: d.uid };
    const early = pods.find((e) => samePod(e, ref));
    if (early) {
      used.add(early);
      out.push({ ...d, ip: early.ip, cgroupPath: early.cgroupPath });
      continue;
    }
    if (deleted.some((x) => samePod(x, ref) && x.ip === d.ip)) continue;
    out.push(d);
  }
  for (const e of pods) {
    if (used.has(e) || !wantsEnrolment(policy, e.namespace, e.name).enrol) continue;
    out.push({
      uid: e.uid || `cni-${e.containerId}`,
      namespace: e.namespace,
      name: e.name,
      ip: e.ip,
      cgroupPath: e.cgroupPath,
      inbound: policy.mesh.inbound,
      exclusions: noExclusions(),
    });
  }
  return { ...desired, pods: out };
}

/** Deleted-sandbox marks still needed: the policy still names that pod at that address. */
export function liveDeletions(policy: NodePolicy, deleted: readonly DeletedSandbox[]): DeletedSandbox[] {
  return deleted.filter((x) => policy.pods.some((p) => samePod(x, p) && p.ip === x.ip));
}

/** The store, persisted in the agent's state directory so a restarted agent keeps its early pods. */
export class EnrolledStore {
  private pods: EnrolledPod[] = [];
  private deleted: DeletedSandbox[] = [];

  constructor(private readonly file: string) {
    if (!existsSync(file)) return;
    const parsed = FileSchema.safeParse(JSON.parse(readFileSync(file, 'utf8')));
    if (parsed.success) ({ pods: this.pods, deleted: this.deleted } = parsed.data);
  }

  list(): readonly EnrolledPod[] {
    return this.pods;
  }

  deletions(): readonly DeletedSandbox[] {
    return this.deleted;
  }

  /** A new sandbox of a pod replaces the pod's earlier one (a recreated sandbox). */
  add(pod: EnrolledPod): void {
    this.pods = [...this.pods.filter((p) => p.containerId !== pod.containerId && !samePod(p, pod)), pod];
    this.deleted = this.deleted.filter((d) => !samePod(d, pod));
    this.save();
  }

  /** DEL of a sandbox: only that sandbox's entry goes (a newer sandbox of the pod stays); its address is remembered. */
  remove(containerId: string, ref: { namespace: string; name: string; uid: string } | undefined, policyIp: string | undefined): EnrolledPod | undefined {
    const gone = this.pods.find((p) => p.containerId === containerId);
    this.pods = this.pods.filter((p) => p !== gone);
    const who = gone ?? ref;
    const ip = gone?.ip ?? policyIp;
    if (who && ip && !this.pods.some((p) => samePod(p, who))) this.deleted = [...this.deleted.filter((d) => !samePod(d, who)), { namespace: who.namespace, name: who.name, uid: who.uid, ip }];
    this.save();
    return gone;
  }

  has(containerId: string): boolean {
    return this.pods.some((p) => p.containerId === containerId);
  }

  /** Drop what the policy made unnecessary and early pods whose sandbox is gone (a DEL the agent never heard). */
  prune(policy: NodePolicy | undefined, sandboxAlive: (p: EnrolledPod) => boolean): void {
    const pods = this.pods.filter(sandboxAlive);
    const deleted = policy ? liveDeletions(policy, this.deleted) : this.deleted;
    if (pods.length === this.pods.length && deleted.length === this.deleted.length) return;
    this.pods = pods;
    this.deleted = deleted;
    this.save();
  }

  private save(): void {
    mkdirSync(dirname(this.file), { recursive: true });
    const tmp = `${this.file}.tmp`;
    writeFileSync(tmp, JSON.stringify({ pods: this.pods, deleted: this.deleted }) + '\n');
    renameSync(tmp, this.file);
  }
}
