import { FsmNodeError } from '../errors.js';
import type { CompiledNode, Keyed, SharedJson, SharedParts } from './compiler.js';
import { POLICY_API_VERSION, type MeshPod, type NodePolicy, type NodePolicyDelta } from './schema.js';

/**
 * Policy deltas (docs/controller.md "Deltas"). Every enrolled pod of the mesh
 * is in every node's policy (meshPods), so one pod added anywhere gives every
 * node a new version; at 10k pods and 2k services a full policy is ~2.5 MB
 * (165 KB gzipped). Over an edge uplink, and for 100 agents at once, that is
 * the cost of a change, not of its size. A delta carries what changed: a few
 * KB for a pod or an endpoint.
 *
 * The controller builds a delta from the compiler's keyed parts by comparing
 * hashes (no JSON diffing); the agent applies it to the policy it holds and
 * checks the result against the counts the delta carries.
 */

/** The instance-manipulation name of NodePolicyDelta in the RFC 3229 A-IM / IM headers. */
export const DELTA_IM = 'fsm-policy-delta';

/** What the controller keeps of a version it served, to build a delta from it later. */
export type DeltaBase = Pick<CompiledNode, 'version' | 'parts'>;

const sharedDeltas = new WeakMap<SharedParts, WeakMap<SharedParts, SharedJson>>();
/**
 * Equal shared pieces of different pairs, as one object: in smi mode every
 * node has shared parts of its own, yet a pod added elsewhere gives 99 of them
 * the same piece (that node's mesh pods), which is then deflated once, not 99
 * times. Emptied when it grows: it only has to span one change.
 */
const interned = new Map<string, SharedJson>();
let internedChars = 0;
const INTERNED_MAX_CHARS = 4_000_000;

/**
 * The delta from `base` to `to`, in the two pieces the hub encodes
 * (`{` + shared.text() + tail): the shared piece (services, splits, mesh
 * pods) is the same for every node moving between the same two shared
 * states, so it is built, and deflated, once for all of them; the tail holds
 * what is the node's own (versions, counts, its node part).
 */
export function deltaPieces(base: DeltaBase, to: CompiledNode): readonly [shared: SharedJson, tail: string] {
  const s = to.parts.shared;
  let tail = `,"apiVersion":"${POLICY_API_VERSION}","base":"${base.version}","version":"${to.version}","counts":{"services":${s.services.length},"splits":${s.splits.length},"meshPods":${s.meshPodCount}}`;
  if (base.parts.global.hash !== to.parts.global.hash) tail += `,${to.parts.global.members}`;
  if (base.parts.node.hash !== to.parts.node.hash) tail += `,${to.parts.node.members}`;
  return [sharedDelta(base.parts.shared, s), `${tail}}`];
}

function sharedDelta(from: SharedParts, to: SharedParts): SharedJson {
  let byTo = sharedDeltas.get(from);
  if (!byTo) sharedDeltas.set(from, (byTo = new WeakMap()));
  let piece = byTo.get(to);
  if (!piece) {
    // Always a first member, so the piece is never empty before the tail's comma.
    let text = '"kind":"NodePolicyDelta"';
    const services = diffKeyed(from.services, to.services);
    if (services) text += `,"services":{"set":[${services.set.map((e) => e.json).join(',')}],"remove":${JSON.stringify(services.remove)}}`;
    const splits = diffKeyed(from.splits, to.splits);
    if (splits) text += `,"splits":{"set":[${splits.set.map((e) => e.json).join(',')}],"remove":${JSON.stringify(splits.remove)}}`;
    const pods = diffKeyed(from.meshPods, to.meshPods);
    if (pods) text += `,"meshPods":{"set":{${pods.set.map((e) => `${JSON.stringify(e.key)}:[${e.json}]`).join(',')}},"remove":${JSON.stringify(pods.remove)}}`;
    piece = interned.get(text);
    if (!piece) {
      if (internedChars > INTERNED_MAX_CHARS) {
        interned.clear();
        internedChars = 0;
      }
      internedChars += text.length;
      const done = text;
      interned.set(text, (piece = { text: () => done }));
    }
    byTo.set(to, piece);
  }
  return piece;
}

/** Entries of `to` that are new or changed, and keys of `from` that are gone; both lists sorted by key. Undefined when equal. */
export function diffKeyed(from: readonly Keyed[], to: readonly Keyed[]): { set: Keyed[]; remove: string[] } | undefined {
  if (from === to) return undefined;
  const set: Keyed[] = [];
  const remove: string[] = [];
  let i = 0;
  let j = 0;
  while (i < from.length || j < to.length) {
    const a = from[i];
    const b = to[j];
    if (b === undefined || (a !== undefined && a.key < b.key)) {
      remove.push(a!.key);
      i++;
    } else if (a === undefined || b.key < a.key) {
      set.push(b);
      j++;
    } else {
      if (a.hash !== b.hash) set.push(b);
      i++;
      j++;
    }
  }
  return set.length > 0 || remove.length > 0 ? { set, remove } : undefined;
}

/** A delta that does not fit the policy held: the client drops it and asks for the full policy. */
export class DeltaError extends FsmNodeError {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super('FSMN_ERR_POLICY_DELTA', `${field}: ${message}`);
  }
}

/**
 * The policy `delta` turns `held` into (a new object; `held` is not changed,
 * unchanged parts are shared with it). The delta must have passed
 * NodePolicyDeltaSchema: every piece it carries is then valid, and so is the
 * result. Orders are the compiler's (services and splits by ns/name, mesh
 * pods by node), so the result equals the full policy of that version.
 */
export function applyDelta(held: NodePolicy, delta: NodePolicyDelta): NodePolicy {
  if (delta.base !== held.version) throw new DeltaError('base', `the delta applies to version ${delta.base}, the policy held is ${held.version}`);
  const { multicluster: _heldMulticluster, resilience: _heldResilience, ...rest } = held;
  const policy: NodePolicy = {
    ...rest,
    version: delta.version,
    mesh: delta.mesh ?? held.mesh,
    proxies: delta.proxies ?? held.proxies,
    trust: delta.trust ?? held.trust,
    // Travels with the global part too: with it, an absent resilience part means the defaults again.
    ...((delta.mesh ? delta.resilience : held.resilience) ? { resilience: delta.mesh ? delta.resilience : held.resilience } : {}),
    // The global part travels whole (mesh, proxies, trust, multicluster): with it, an absent multicluster means gone.
    ...((delta.mesh ? delta.multicluster : held.multicluster) ? { multicluster: delta.mesh ? delta.multicluster : held.multicluster } : {}),
    ingress: delta.ingress ?? held.ingress,
    egressPolicies: delta.egressPolicies ?? held.egressPolicies,
    node: delta.node ?? held.node,
    pods: delta.pods ?? held.pods,
    access: delta.access ?? held.access,
    services: delta.services ? applyKeyed('services', held.services, delta.services) : held.services,
    splits: delta.splits ? applyKeyed('splits', held.splits, delta.splits) : held.splits,
    meshPods: delta.meshPods ? applySlices(held.meshPods, delta.meshPods) : held.meshPods,
  };
  for (const what of ['services', 'splits', 'meshPods'] as const) {
    if (policy[what].length !== delta.counts[what]) {
      throw new DeltaError(`counts.${what}`, `the result has ${policy[what].length}, the controller has ${delta.counts[what]}: the policy held has drifted`);
    }
  }
  return policy;
}

const nsName = (x: { namespace: string; name: string }): string => `${x.namespace}/${x.name}`;

function applyKeyed<T extends { namespace: string; name: string }>(what: string, held: readonly T[], changes: { set: T[]; remove: string[] }): T[] {
  const byKey = new Map(held.map((x) => [nsName(x), x]));
  for (const key of changes.remove) if (!byKey.delete(key)) throw new DeltaError(`${what}.remove`, `${JSON.stringify(key)} is not in the policy held`);
  for (const x of changes.set) byKey.set(nsName(x), x);
  return [...byKey.keys()].sort().map((k) => byKey.get(k)!);
}

function applySlices(held: readonly MeshPod[], changes: { set: Record<string, MeshPod[]>; remove: string[] }): MeshPod[] {
  const byNode = new Map<string, MeshPod[]>();
  for (const p of held) {
    const slice = byNode.get(p.node);
    if (slice) slice.push(p);
    else byNode.set(p.node, [p]);
  }
  for (const node of changes.remove) if (!byNode.delete(node)) throw new DeltaError('meshPods.remove', `node ${JSON.stringify(node)} has no mesh pods in the policy held`);
  for (const [node, pods] of Object.entries(changes.set)) {
    const stray = pods.find((p) => p.node !== node);
    if (stray) throw new DeltaError(`meshPods.set.${node}`, `pod ${stray.ip} is on node ${JSON.stringify(stray.node)}`);
    byNode.set(node, pods);
  }
  return [...byNode.keys()].sort().flatMap((n) => byNode.get(n)!);
}
