import type { Identity, NodePolicy } from '../policy/schema.js';
import type { Ingress, IngressBackend, IngressGateway, IngressHost, IngressRule } from './schema.js';

/**
 * The node's share of the mesh's Ingress -> the `gateways` section of the
 * proxy's config.json (read by proxy/gateway.js). Pure. Endpoints become
 * targets the proxy connects to directly (a pod of this node) or through the
 * owning node's proxy (a tunnel, mutual TLS with the gateway's identity);
 * certificates become file paths (the agent writes the PEM files, 0600: private keys
 * never enter config.json, as for the tunnel identities).
 */

export interface ProxyGatewayTarget {
  /** "ip:port" of the pod. */
  target: string;
  /** ns/serviceAccount of the pod (access control, the tunnel's expected peer). */
  identity: string | null;
  /** "address:inboundPort" of the owning node's proxy; null for a pod of this node or an unknown node. */
  tunnel: string | null;
  local: boolean;
}

export interface ProxyGatewayBackend {
  service: string;
  weight: number;
  problem: string | null;
  targets: ProxyGatewayTarget[];
}

export interface ProxyGatewayRule extends Omit<IngressRule, 'backends' | 'mirrors'> {
  backends: ProxyGatewayBackend[];
  mirrors: ProxyGatewayBackend[];
}

export interface ProxyGatewayPort {
  port: number;
  protocol: 'HTTP' | 'HTTPS';
  certificates: { hostname: string | null; certFile: string; keyFile: string }[];
  hosts: IngressHost[];
  rules: ProxyGatewayRule[];
}

export interface ProxyGateway {
  /** ns/name of the Gateway. */
  gateway: string;
  /** ns/serviceAccount the gateway's traffic into the mesh carries. */
  identity: string;
  ports: ProxyGatewayPort[];
}

/** Where the agent keeps the PEM files of one certificate Secret ("ns/name"). */
export interface GatewayCertificateFiles {
  certFile: string;
  keyFile: string;
}

/** The Gateways a node serves: nodes null (every node) or naming it. */
export function gatewaysOnNode(ingress: Ingress | undefined, node: string): IngressGateway[] {
  return (ingress?.gateways ?? []).filter((g) => g.nodes === null || g.nodes.includes(node));
}

/** The identities of the Gateways served on the policy's node: the agent holds their certificates as it does its pods'. */
export function gatewayIdentities(policy: Pick<NodePolicy, 'node'> & { ingress?: Ingress | undefined }): Identity[] {
  const seen = new Map<string, Identity>();
  if (!policy.ingress) return [];
  for (const g of gatewaysOnNode(policy.ingress, policy.node.name)) seen.set(`${g.identity.namespace}/${g.identity.serviceAccount}`, g.identity);
  return [...seen.values()];
}

export function renderGateways(
  policy: Pick<NodePolicy, 'node' | 'proxies'> & { ingress?: Ingress | undefined },
  inboundPort: number,
  certificateFiles: Readonly<Record<string, GatewayCertificateFiles>>,
): ProxyGateway[] {
  const tunnelOf = new Map<string, string>();
  for (const p of policy.proxies) if (p.addresses[0] !== undefined) tunnelOf.set(p.node, `${p.addresses[0]}:${inboundPort}`);
  const self = policy.node.name;
  const backend = (b: IngressBackend): ProxyGatewayBackend => ({
    service: b.service,
    weight: b.weight,
    problem: b.problem,
    targets: b.endpoints.map((e) => ({
      target: `${e.ip}:${e.port}`,
      identity: e.identity,
      local: e.node === self,
      tunnel: e.node !== null && e.node !== self ? (tunnelOf.get(e.node) ?? null) : null,
    })),
  });
  return gatewaysOnNode(policy.ingress, self).map((g) => ({
    gateway: `${g.namespace}/${g.name}`,
    identity: `${g.identity.namespace}/${g.identity.serviceAccount}`,
    ports: g.ports.map((p) => ({
      port: p.port,
      protocol: p.protocol,
      certificates: p.certificates.flatMap((c) => {
        const f = certificateFiles[c.secret];
        return f ? [{ hostname: c.hostname, certFile: f.certFile, keyFile: f.keyFile }] : [];
      }),
      hosts: p.hosts,
      rules: p.rules.map((r) => ({ ...r, backends: r.backends.map(backend), mirrors: r.mirrors.map(backend) })),
    })),
  }));
}

/** Every certificate Secret ("ns/name") the node's Gateways use, with its PEM: what the agent writes to files. */
export function gatewayCertificates(policy: Pick<NodePolicy, 'node'> & { ingress?: Ingress | undefined }): Map<string, { certPem: string; keyPem: string }> {
  const out = new Map<string, { certPem: string; keyPem: string }>();
  for (const g of gatewaysOnNode(policy.ingress, policy.node.name)) for (const p of g.ports) for (const c of p.certificates) out.set(c.secret, { certPem: c.certPem, keyPem: c.keyPem });
  return out;
}

/** What `fsm-node status` shows of the Gateways this node serves: listeners and how much routing each carries. */
export interface GatewaySummary {
  gateway: string;
  identity: string;
  ports: { port: number; protocol: string; listeners: string[]; hostnames: string[]; rules: number; certificates: number }[];
}

export function gatewaySummary(policy: Pick<NodePolicy, 'node'> & { ingress?: Ingress | undefined }): GatewaySummary[] {
  return gatewaysOnNode(policy.ingress, policy.node.name).map((g) => ({
    gateway: `${g.namespace}/${g.name}`,
    identity: `${g.identity.namespace}/${g.identity.serviceAccount}`,
    ports: g.ports.map((p) => ({ port: p.port, protocol: p.protocol, listeners: p.listeners, hostnames: p.hosts.map((h) => h.hostname), rules: p.rules.length, certificates: p.certificates.length })),
  }));
}
