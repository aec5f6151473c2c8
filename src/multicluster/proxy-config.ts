import type { MulticlusterPart, PolicyService } from '../policy/schema.js';
import { identityKey } from '../identity/spiffe.js';
import { portProtocol, type PortProtocol } from '../proxy/config.js';
import { clusterTrustDomain } from './api.js';
import { GATEWAY_IDENTITY } from './identity.js';

/**
 * The node proxy's view of the clusterset (proxy/multicluster.js), rendered
 * from the policy's `multicluster` part. Pure.
 *
 * - imports: "clustersetIP:port" -> the tiers to try in order; a local member
 *   names the local Service's "clusterIP:port" (the proxy balances over its
 *   ready endpoints as for any service), a remote member its cluster's
 *   gateway proxies;
 * - exports: what a tunnel from another cluster may name, "name.ns:port"
 *   (never a pod), -> the local Service's "clusterIP:port".
 */
export interface ProxyImportMember {
  cluster: string;
  weight: number;
  /** The local Service's "clusterIP:port" for this cluster's own member; null for a remote cluster. */
  local: string | null;
  /** Remote: its gateway node proxies "address:port". */
  gateways: string[];
  /** Ready endpoints that cluster reported: 0 makes a remote member unusable. */
  ready: number;
}

export interface ProxyImport {
  service: string;
  protocol: PortProtocol;
  /** What the remote gateway is asked for: "name.ns:port". */
  target: string;
  tiers: ProxyImportMember[][];
}

/**
 * Gateway tunnels' mutual TLS (proxy/clusterset.js): the clusterset CA both
 * ends verify against, the trust domain of this cluster and of each peer, and
 * the gateway identity ("ns/sa") each side presents. `refuse` set: every
 * gateway tunnel, both ways, is refused with that reason (never plaintext).
 */
export interface ProxyClustersetTLS {
  bundle: string;
  trustDomain: string;
  /** cluster id -> its trust domain, this cluster and every peer. */
  trustDomains: Record<string, string>;
  gatewayIdentity: string;
  refuse: string | null;
}

export interface ProxyMulticluster {
  cluster: string;
  gatewayPort: number;
  tls: ProxyClustersetTLS;
  imports: Record<string, ProxyImport>;
  /** "name.ns:port" -> the local Service's "clusterIP:port" and its protocol (HTTP is balanced per request at the gateway). */
  exports: Record<string, { local: string; protocol: PortProtocol }>;
}

const key = (ns: string, name: string) => `${ns}/${name}`;

/**
 * Fails closed: no clusterset CA in the policy (an older controller), or a
 * mesh whose trust domain is not the cluster's own ("<id>.cluster.local": the
 * name other clusters verify this cluster's workloads and gateways by).
 */
export function renderClustersetTLS(part: MulticlusterPart, meshTrustDomain: string | null): ProxyClustersetTLS {
  const trustDomain = clusterTrustDomain(part.cluster);
  const trustDomains: Record<string, string> = { [part.cluster]: trustDomain };
  for (const p of part.peers ?? []) trustDomains[p] = clusterTrustDomain(p);
  const bundle = (part.clustersetBundle ?? []).map((p) => p.trim()).filter((p) => p.includes('-----BEGIN CERTIFICATE-----'));
  const refuse = bundle.length === 0 ? 'no-clusterset-trust' : meshTrustDomain === null ? 'no-mesh-tls' : meshTrustDomain !== trustDomain ? 'trust-domain-mismatch' : null;
  return { bundle: bundle.length > 0 ? `${bundle.join('\n')}\n` : '', trustDomain, trustDomains, gatewayIdentity: identityKey(GATEWAY_IDENTITY), refuse };
}

/** `meshTrustDomain`: the trust domain this node's tunnel certificates are in (null: no mTLS, so no gateway tunnels). */
export function renderMulticluster(part: MulticlusterPart, services: readonly PolicyService[], meshTrustDomain: string | null = null): ProxyMulticluster {
  const local = new Map(services.map((s) => [key(s.namespace, s.name), s]));
  const imports: Record<string, ProxyImport> = {};
  const exports: ProxyMulticluster['exports'] = {};
  for (const imp of part.imports) {
    const svc = local.get(key(imp.namespace, imp.name));
    const localIp = svc?.clusterIPs.find((ip) => ip.includes('.'));
    for (const p of imp.ports) {
      if (p.protocol !== 'TCP') continue;
      const target = `${imp.name}.${imp.namespace}:${p.port}`;
      // The local Service must serve the same port number for the local tier (KEP: ports merge by name and number).
      const localAddr = localIp && svc!.ports.some((sp) => sp.port === p.port) ? `${localIp}:${p.port}` : null;
      if (localAddr && imp.tiers.some((t) => t.some((m) => m.local))) exports[target] = { local: localAddr, protocol: portProtocol(p) };
      const tiers = imp.tiers
        .map((t) =>
          t
            .map((m): ProxyImportMember => ({ cluster: m.cluster, weight: m.weight, local: m.local ? localAddr : null, gateways: m.local ? [] : m.gateways, ready: m.readyEndpoints }))
            // A local member without a local Service port, or a remote one without gateways, can carry nothing.
            .filter((m) => (m.local !== null || m.gateways.length > 0) && m.weight > 0),
        )
        .filter((t) => t.length > 0);
      for (const ip of imp.ips) imports[`${ip}:${p.port}`] = { service: key(imp.namespace, imp.name), protocol: portProtocol(p), target, tiers };
    }
  }
  return { cluster: part.cluster, gatewayPort: part.gatewayPort, tls: renderClustersetTLS(part, meshTrustDomain), imports, exports };
}
