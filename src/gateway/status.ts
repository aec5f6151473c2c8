import { GATEWAY_GROUP } from './objects.js';
import type { Condition, GatewayResolution } from './resolve.js';

/**
 * What the controller writes back into the cluster (the objects' status
 * subresources), from a GatewayResolution. Pure: the objects as the cluster
 * holds them now come in through `current`, so a condition that did not
 * change keeps its lastTransitionTime, an HTTPRoute keeps the parents other
 * controllers wrote, and nothing is written when nothing changed.
 */

export interface StatusPatch {
  kind: 'GatewayClass' | 'Gateway' | 'HTTPRoute';
  group: string;
  version: string;
  plural: string;
  /** '' for the cluster-scoped GatewayClass. */
  namespace: string;
  name: string;
  /** The whole new status (a merge patch of `{status}`: lists are replaced whole). */
  status: Record<string, unknown>;
}

interface K8sCondition {
  type: string;
  status: string;
  reason: string;
  message: string;
  observedGeneration: number;
  lastTransitionTime: string;
}

type CurrentObject = { status?: Record<string, unknown> } | undefined;

const WHERE = {
  GatewayClass: { plural: 'gatewayclasses' },
  Gateway: { plural: 'gateways' },
  HTTPRoute: { plural: 'httproutes' },
} as const;

/** Conditions with observedGeneration; lastTransitionTime kept from `before` while the status stays the same. */
export function toK8sConditions(conds: Condition[], generation: number, before: unknown, now: string): K8sCondition[] {
  const old = Array.isArray(before) ? (before as Partial<K8sCondition>[]) : [];
  return conds.map((c) => {
    const prev = old.find((o) => o.type === c.type);
    const since = prev && prev.status === c.status && typeof prev.lastTransitionTime === 'string' ? prev.lastTransitionTime : now;
    return { type: c.type, status: c.status, reason: c.reason, message: c.message.slice(0, 32_768), observedGeneration: generation, lastTransitionTime: since };
  });
}

/** Equal but for lastTransitionTime (which only moves when a status flips): no write needed. */
function sameStatus(a: unknown, b: unknown): boolean {
  const strip = (v: unknown): unknown => JSON.parse(JSON.stringify(v ?? {}, (k: string, x: unknown) => (k === 'lastTransitionTime' ? undefined : x)));
  return JSON.stringify(strip(a)) === JSON.stringify(strip(b));
}

export function gatewayStatusPatches(
  r: GatewayResolution,
  current: (kind: StatusPatch['kind'], namespace: string, name: string) => CurrentObject,
  now: Date,
  controllerName: string,
): StatusPatch[] {
  const at = now.toISOString();
  const out: StatusPatch[] = [];
  const push = (kind: StatusPatch['kind'], namespace: string, name: string, status: Record<string, unknown>) => {
    if (sameStatus(current(kind, namespace, name)?.status, status)) return;
    out.push({ kind, group: GATEWAY_GROUP, version: 'v1', plural: WHERE[kind].plural, namespace, name, status });
  };

  for (const c of r.classes) {
    const before = current('GatewayClass', '', c.name)?.status;
    push('GatewayClass', '', c.name, { conditions: toK8sConditions(c.conditions, c.generation, before?.conditions, at) });
  }

  for (const g of r.gateways) {
    const before = current('Gateway', g.namespace, g.name)?.status;
    const oldListeners = Array.isArray(before?.listeners) ? (before.listeners as { name?: string; conditions?: unknown }[]) : [];
    push('Gateway', g.namespace, g.name, {
      conditions: toK8sConditions(g.conditions, g.generation, before?.conditions, at),
      listeners: g.listeners.map((l) => ({
        name: l.name,
        attachedRoutes: l.attachedRoutes,
        supportedKinds: l.supportedKinds,
        conditions: toK8sConditions(l.conditions, g.generation, oldListeners.find((o) => o.name === l.name)?.conditions, at),
      })),
    });
  }

  for (const route of r.routes) {
    const before = current('HTTPRoute', route.namespace, route.name)?.status;
    const oldParents = Array.isArray(before?.parents) ? (before.parents as { controllerName?: string; parentRef?: Record<string, unknown>; conditions?: unknown }[]) : [];
    // Parents written by other controllers stay as they are.
    const others = oldParents.filter((p) => p.controllerName !== controllerName);
    // A route that names none of our Gateways (any more) is not ours to write,
    // unless it still carries entries of ours: those go.
    if (route.parents.length === 0 && others.length === oldParents.length) continue;
    const key = (ref: Record<string, unknown> | undefined) => JSON.stringify([ref?.namespace ?? '', ref?.name ?? '', ref?.sectionName ?? null, ref?.port ?? null]);
    const ours = route.parents.map((p) => {
      const parentRef = { group: p.parentRef.group, kind: p.parentRef.kind, namespace: p.parentRef.namespace, name: p.parentRef.name, ...(p.parentRef.sectionName !== null ? { sectionName: p.parentRef.sectionName } : {}), ...(p.parentRef.port !== null ? { port: p.parentRef.port } : {}) };
      const prev = oldParents.find((o) => o.controllerName === controllerName && key(o.parentRef) === key(parentRef));
      return { parentRef, controllerName, conditions: toK8sConditions(p.conditions, route.generation, prev?.conditions, at) };
    });
    push('HTTPRoute', route.namespace, route.name, { parents: [...others, ...ours] });
  }
  return out;
}
