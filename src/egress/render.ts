import type { EgressPolicy } from './schema.js';

/**
 * Egress policies -> the proxy's `egressRules` (proxy/egress.js): per source
 * identity ("ns/sa") of this node, per destination port, the rules that may
 * let a connection out. Pure.
 */

export interface ProxyEgressRule {
  /** ns/name of the Egress, for access records. */
  egress: string;
  protocol: 'http' | 'https' | 'tcp';
  /** Empty: any host. */
  hosts: string[];
  /** Empty: any address. */
  cidrs: string[];
}

/** source identity -> port -> rules. */
export type ProxyEgressRules = Record<string, Record<string, ProxyEgressRule[]>>;

export function renderEgressRules(policies: readonly EgressPolicy[] | undefined, localIdentities: readonly string[]): ProxyEgressRules {
  const local = new Set(localIdentities);
  const out: ProxyEgressRules = {};
  for (const e of [...(policies ?? [])].sort((a, b) => `${a.namespace}/${a.name}`.localeCompare(`${b.namespace}/${b.name}`))) {
    for (const s of e.sources) {
      const id = `${s.namespace}/${s.serviceAccount}`;
      if (!local.has(id)) continue;
      for (const p of e.ports) {
        const byPort = (out[id] ??= {});
        (byPort[String(p.number)] ??= []).push({ egress: `${e.namespace}/${e.name}`, protocol: p.protocol, hosts: e.hosts, cidrs: e.ipAddresses });
      }
    }
  }
  return out;
}

/** Does an Egress host pattern ("api.example.com", "*.example.com") cover `host`? (proxy/egress.js does the same.) */
export function egressHostMatches(pattern: string, host: string): boolean {
  if (pattern.startsWith('*.')) return host.length > pattern.length - 1 && host.endsWith(pattern.slice(1));
  return pattern === host;
}
