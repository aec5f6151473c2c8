import type { MulticlusterPart, PolicyService } from '../policy/schema.js';
import { portProtocol, type PortProtocol } from '../proxy/config.js';

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

export interface ProxyMulticluster {
  cluster: string;
  gatewayPort: number;
  imports: Record<string, ProxyImport>;
  /** "name.ns:port" -> the local Service's "clusterIP:port" and its protocol (HTTP is balanced per request at the gateway). */
  exports: Record<string, { local: string; protocol: PortProtocol }>;
}

const key = (ns: string, name: string) => `${ns}/${name}`;

export function renderMulticluster(part: MulticlusterPart, services: readonly PolicyService[]): ProxyMulticluster {
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
  return { cluster: part.cluster, gatewayPort: part.gatewayPort, imports, exports };
}
