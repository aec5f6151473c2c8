import type { Condition, GatewayStatus, RouteStatus } from './resolve.js';
import type { IngressProblem } from './schema.js';

/**
 * The conditions of the mesh's Gateway API objects that are not as they
 * should be, as one short list every node's policy carries (Ingress
 * `problems`): `fsm-node status` shows it on any node, in manifest mode too,
 * where no status subresource is written. Pure.
 */

/** At most this many problems travel in the policy; the last entry then says how many more there are. */
export const MAX_PROBLEMS = 50;

/** A condition in its unhealthy polarity: Accepted, Programmed or ResolvedRefs False, Conflicted True. */
function unhealthy(c: Condition): boolean {
  return c.type === 'Conflicted' ? c.status === 'True' : c.status !== 'True';
}

const problem = (object: string, c: Condition): IngressProblem => ({ object, type: c.type, status: c.status, reason: c.reason, message: c.message });

export function gatewayProblems(gateways: readonly GatewayStatus[], routes: readonly RouteStatus[]): IngressProblem[] {
  const out: IngressProblem[] = [];
  for (const g of gateways) {
    const name = `Gateway ${g.namespace}/${g.name}`;
    for (const c of g.conditions) if (unhealthy(c)) out.push(problem(name, c));
    for (const l of g.listeners) for (const c of l.conditions) if (unhealthy(c) && c.type !== 'Programmed') out.push(problem(`${name} listener ${l.name}`, c));
  }
  for (const r of routes) {
    for (const p of r.parents) {
      const parent = `${p.parentRef.namespace}/${p.parentRef.name}${p.parentRef.sectionName !== null ? `/${p.parentRef.sectionName}` : ''}`;
      for (const c of p.conditions) if (unhealthy(c)) out.push(problem(`HTTPRoute ${r.namespace}/${r.name} on ${parent}`, c));
    }
  }
  if (out.length <= MAX_PROBLEMS) return out;
  const more = out.length - (MAX_PROBLEMS - 1);
  return [...out.slice(0, MAX_PROBLEMS - 1), { object: `${more} more`, type: '', status: '', reason: 'Truncated', message: 'see the objects\' status (cluster mode) or the controller\'s log' }];
}
