import { z } from 'zod';
import { FieldError } from '../policy/fields.js';
import { formatPath } from '../policy/schema.js';

/**
 * FSM's Egress (policy.flomesh.io/v1alpha1), as the controller reads it:
 * which service accounts (sources) may reach which destinations outside the
 * mesh, by port and protocol, and by HTTP Host / TLS SNI (hosts) or address
 * range (ipAddresses). It matters when the mesh's egress is `deny`: then only
 * what an Egress allows leaves the mesh (proxy/egress.js).
 *
 * FSM's `matches` (HTTPRouteGroup references) and `sources[].mtls` (an
 * egress client certificate) are not supported: an Egress that uses them is
 * refused with the field named, rather than half applied.
 */

export const EGRESS_API_VERSION = 'policy.flomesh.io/v1alpha1';

/** http: Host header per request; https/tls: SNI per connection; tcp: address and port only. */
export type EgressProtocol = 'http' | 'https' | 'tcp';

export interface EgressRec {
  namespace: string;
  name: string;
  sources: { namespace: string; serviceAccount: string }[];
  /** Lower case; "*.example.com" covers its subdomains. */
  hosts: string[];
  /** CIDRs. */
  ipAddresses: string[];
  ports: { number: number; protocol: EgressProtocol }[];
}

const dns = z.string().min(1).max(253).regex(/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/, 'must be a lowercase RFC 1123 name');
const host = z
  .string()
  .min(1)
  .max(253)
  .transform((h) => h.toLowerCase())
  .pipe(z.string().regex(/^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/, 'must be a DNS name, optionally starting with "*."'));

const EgressIn = z.object({
  metadata: z.object({ name: dns, namespace: dns.optional() }),
  spec: z.object({
    sources: z.array(z.object({ kind: z.literal('ServiceAccount'), name: dns, namespace: dns, mtls: z.unknown().optional() })).min(1),
    hosts: z.array(host).nullish(),
    ipAddresses: z.array(z.string().cidr({ version: 'v4' })).nullish(),
    ports: z
      .array(
        z.object({
          number: z.number().int().min(1).max(65535),
          protocol: z.string().transform((p) => p.toLowerCase()).pipe(z.enum(['http', 'https', 'tcp', 'tls'])),
        }),
      )
      .min(1),
    matches: z.array(z.unknown()).nullish(),
  }),
});

export function toEgress(o: unknown): EgressRec {
  const r = EgressIn.safeParse(o);
  if (!r.success) {
    const first = r.error.issues[0]!;
    throw new FieldError(formatPath(first.path), first.message);
  }
  const { metadata: m, spec } = r.data;
  if (spec.matches && spec.matches.length > 0) throw new FieldError('spec.matches', 'HTTPRouteGroup matches are not supported by fsm-node yet; allow by hosts, ipAddresses and ports');
  spec.sources.forEach((s, i) => {
    if (s.mtls !== undefined) throw new FieldError(`spec.sources[${i}].mtls`, 'egress client certificates are not supported by fsm-node yet');
  });
  const seen = new Set<number>();
  spec.ports.forEach((p, i) => {
    if (seen.has(p.number)) throw new FieldError(`spec.ports[${i}].number`, `port ${p.number} is listed twice`);
    seen.add(p.number);
  });
  return {
    namespace: m.namespace ?? 'default',
    name: m.name,
    sources: spec.sources.map((s) => ({ namespace: s.namespace, serviceAccount: s.name })),
    hosts: [...new Set(spec.hosts ?? [])],
    // A bare address is a /32 already by the schema (cidr); keep them as written.
    ipAddresses: [...new Set(spec.ipAddresses ?? [])],
    // "tls" is FSM's other name for a TLS port matched by SNI.
    ports: spec.ports.map((p) => ({ number: p.number, protocol: p.protocol === 'tls' ? 'https' : p.protocol })),
  };
}
