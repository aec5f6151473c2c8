import { InvalidInputError } from '../errors.js';
import { renderEgressRules, type ProxyEgressRules } from '../egress/render.js';
import { gatewayIdentities, renderGateways, type GatewayCertificateFiles, type ProxyGateway } from '../gateway/render.js';
import { multiclusterIdentities } from '../multicluster/identity.js';
import { renderMulticluster, type ProxyMulticluster } from '../multicluster/proxy-config.js';
import { spiffeId } from '../identity/spiffe.js';
import { MQTT_DEFAULTS } from '../policy/objects.js';
import type { Access, HttpMatch, MqttMatch, NodePolicy, PolicyService, Split } from '../policy/schema.js';
import { renderResilience, type ProxyResilience } from './resilience-config.js';

/**
 * NodePolicy -> the configuration of the shared Pipy proxy (proxy/config.json,
 * read by proxy/main.js). Pure: the node facts the policy does not hold come in
 * as arguments. The shape is made for the proxy's lookups on the hot path
 * (one object key per connection or request), not for people: every decision
 * that can be made ahead of time (protocol of a port, which endpoints a split
 * backend has, which node proxy to tunnel to) is made here, where it is unit
 * tested, and the PipyJS program only looks things up.
 */

export const PROXY_CONFIG_FORMAT = 1;
export const DEFAULT_OUTBOUND_PORT = 15001;
export const DEFAULT_INBOUND_PORT = 15003;

export type PortProtocol = 'http' | 'tcp' | 'mqtt';

/** How long a tunnel connection takes new tunnels (proxy/tls.js): reloads reach every pool within it. */
export const DEFAULT_TUNNEL_MAX_AGE_SECONDS = 60;

/** The mesh's trust: what node proxies accept a peer certificate from. */
export interface ProxyTrust {
  trustDomain: string;
  /** PEM certificates of every trusted root (old and new during a rotation). */
  bundle: string[];
}

/** One local identity's certificate as the agent keeps it (an IdentityCert of the IdentityManager's snapshot). */
export interface ProxyIdentityFiles {
  certPath: string;
  keyPath: string;
  /** Absent while no certificate was ever obtained. */
  notAfter?: Date | number | string | undefined;
  /** 'expired' fails closed, 'pending' (nothing yet) too; 'valid' is used (the proxy checks notAfter itself as well). */
  state: string;
}

export interface ProxyNodeFacts {
  outboundPort: number;
  /** The inbound (tunnel) listener; every node proxy of the mesh uses the same port. */
  inboundPort: number;
  /** Trust bundle: with one, tunnels are mutual TLS; without, plaintext (authenticated by node address only). */
  trust?: ProxyTrust | null;
  /** identity ("ns/sa") -> its certificate files; a local identity missing here fails closed. */
  identities?: Record<string, ProxyIdentityFiles>;
  /** Default DEFAULT_TUNNEL_MAX_AGE_SECONDS. */
  tunnelMaxAgeSeconds?: number;
  /** Certificate Secret ("ns/name") of a Gateway listener -> the PEM files the agent wrote (src/gateway/certificates.ts). */
  gatewayCertificates?: Record<string, GatewayCertificateFiles>;
}

/** A local identity in the proxy's config: files, not key material (the proxy reads them at load). */
export interface ProxyIdentity {
  certFile: string;
  keyFile: string;
  /** ISO time; part of the config so a renewal changes config.json and the reload reads the new files. */
  notAfter: string;
  state: 'valid' | 'expired' | 'missing';
}

export interface ProxyTunnelTLS {
  trustDomain: string;
  /** PEM text of every trusted root; empty only with `refuse` set (the proxy refuses to load it otherwise). */
  trustBundle: string;
  /**
   * Set when no tunnel can be authenticated (the policy's trust bundle holds no
   * root): every tunnel, both ways, is refused with this reason. Same-node
   * traffic is unaffected. Failing closed, never falling back to plaintext.
   */
  refuse: string | null;
  maxConnectionAgeSeconds: number;
  /** Every identity of this node's pods, sorted. */
  identities: Record<string, ProxyIdentity>;
}

export interface ProxyBackend {
  /** ns/name of the backend service. */
  service: string;
  weight: number;
  /** "ip:port", sorted. */
  endpoints: string[];
}

export interface ProxyService {
  /** ns/name of the service clients address. */
  service: string;
  protocol: PortProtocol;
  /**
   * Where a connection or a request that no route matches goes: the backends
   * of the service's TrafficSplit without matches, or the service itself
   * (one backend).
   */
  backends: ProxyBackend[];
  /**
   * HTTP ports only, absent when there are none: the TrafficSplits with HTTP
   * matches, in ns/name order. A request goes by the first route with a match
   * that matches it, else by `backends`.
   */
  routes?: ProxySplitRoute[];
}

/** A TrafficSplit with HTTP matches (SMI v1alpha3/v1alpha4 `spec.matches`). */
export interface ProxySplitRoute {
  /** ns/name of the TrafficSplit, for logs and balancing state. */
  split: string;
  /** Every match of every HTTPRouteGroup the split names: a request matching one of them goes by `backends`. */
  matches: ProxyHttpMatch[];
  backends: ProxyBackend[];
}

export interface ProxyEndpoint {
  /** ns/serviceAccount, when the endpoint is a known pod. */
  identity: string | null;
  /** true: a pod of this node (policy applied here); false: tunnel to `tunnel`. */
  local: boolean;
  /** "address:inboundPort" of the node proxy that owns the endpoint; null when local or unknown. */
  tunnel: string | null;
  /** Pod port -> protocol, from the services that select it. */
  ports: Record<string, PortProtocol>;
}

/** A mesh pod no service of the node's policy lists: enough to route it as a mesh destination. */
export interface ProxyMeshPod {
  /** ns/serviceAccount. */
  identity: string;
  /** true: a pod of this node (policy applied here); false: tunnel to `tunnel`. */
  local: boolean;
  /** "address:inboundPort" of the pod's node proxy; null when local or when that node has no address. */
  tunnel: string | null;
}

export interface ProxyHttpMatch {
  /** Anchored in the proxy (the whole path must match); null = any path. */
  pathRegex: string | null;
  /** Upper case; empty or containing '*' = any method. */
  methods: string[];
  /** Header name (lower case) -> value regex (anchored). */
  headers: Record<string, string>;
}

/** An MQTTRouteGroup match as the proxy enforces it (proxy/mqtt.js). */
export interface ProxyMqttMatch {
  /** Anchored in the proxy; null = any client id. */
  clientId: string | null;
  publish: string[];
  subscribe: string[];
}

/** MQTT ports: metric label folding and the largest packet read (proxy/mqtt.js). */
export interface ProxyMqttSettings {
  topicLevels: number;
  /** Distinct topic label values per worker; the rest count as '(other)'. */
  maxTopics: number;
  maxPacketBytes: number;
}

export const DEFAULT_MQTT_MAX_TOPICS = 500;

export interface ProxyAccessRule {
  /** ns/name of the TrafficTarget, for logs and metrics. */
  target: string;
  /** ns/serviceAccount of the sources allowed; spiffe://<trust domain>/ns/<ns>/sa/<sa> for a source of another cluster. */
  sources: string[];
  /** The destination port the target is limited to; null = every port. */
  port: number | null;
  /** TCPRoute: every byte on these ports is allowed; tcpAllPorts when a TCPRoute lists no port. */
  tcpAllPorts: boolean;
  tcpPorts: number[];
  /** HTTPRouteGroup matches: on an HTTP port a request matching any of them is allowed. */
  http: ProxyHttpMatch[];
  /** MQTTRouteGroup matches: on an MQTT port, what each client may connect, publish and subscribe. */
  mqtt: ProxyMqttMatch[];
}

export interface ProxyConfig {
  format: number;
  /** The NodePolicy version this was rendered from. */
  version: string;
  node: string;
  listen: { outbound: number; inbound: number };
  trafficPolicy: 'permissive' | 'smi';
  egress: 'allow' | 'deny';
  /**
   * Addresses whose tunnel requests the inbound listener accepts when tunnels
   * are plaintext (tunnelTLS null): the node proxies of the mesh. Then this
   * address check is the only thing that authenticates the source identity a
   * tunnel claims; under mTLS it is not used (the certificate is the proof).
   */
  tunnelPeers: string[];
  /** Mutual TLS for node-to-node tunnels (proxy/tls.js); null: plaintext tunnels (no trust bundle). */
  tunnelTLS: ProxyTunnelTLS | null;
  /** This node's pods by address: the source identity of an outbound connection. */
  pods: Record<string, { identity: string; name: string }>;
  /** "clusterIP:port" -> service. */
  services: Record<string, ProxyService>;
  /** Pod address -> what the proxy knows about it. */
  endpoints: Record<string, ProxyEndpoint>;
  /**
   * Every other mesh pod (not in `endpoints`) by address. In smi mode the
   * policy leaves out the services this node's pods may not reach; without
   * this map a direct connection to such a pod would be egress and skip access control.
   */
  meshPods: Record<string, ProxyMeshPod>;
  /** Destination identity (ns/serviceAccount of a pod on this node) -> its TrafficTargets. */
  access: Record<string, ProxyAccessRule[]>;
  /** Timeouts, retries, limits and outlier detection (src/proxy/resilience-config.ts, proxy/resilience.js). */
  resilience: ProxyResilience;
  /** Clusterset imports and exports (src/multicluster/proxy-config.ts); absent without a clusterset. */
  multicluster?: ProxyMulticluster;
  mqtt: ProxyMqttSettings;
  /** The Gateways this node serves (proxy/gateway.js); absent when none. */
  gateways?: ProxyGateway[];
  /** Egress policies of this node's identities (proxy/egress.js); absent when the mesh has none. */
  egressRules?: ProxyEgressRules;
}

const id = (namespace: string, name: string): string => `${namespace}/${name}`;

/**
 * The protocol of a service port, as FSM decides it: appProtocol first, then
 * the port name's prefix (`http`, `http-web`, `tcp-db`), HTTP when neither
 * says anything. Anything that is not plain HTTP/1 (grpc, http2, tls, ...) is
 * carried as TCP: the proxy must never parse bytes it does not understand.
 */
export function portProtocol(port: { name: string; appProtocol: string | null }): PortProtocol {
  const hint = (port.appProtocol ?? port.name.split('-')[0] ?? '').toLowerCase();
  if (hint === '' || hint === 'http') return 'http';
  // MQTT in the clear (`mqtt`, `mqtt-broker`); `mqtts` is TLS the proxy cannot read: TCP.
  if (hint === 'mqtt') return 'mqtt';
  return 'tcp';
}

function renderMatch(m: HttpMatch): ProxyHttpMatch {
  return {
    pathRegex: m.pathRegex,
    methods: m.methods.map((x) => x.toUpperCase()),
    headers: Object.fromEntries(Object.entries(m.headers).map(([k, v]) => [k.toLowerCase(), v])),
  };
}

function renderMqttMatch(m: MqttMatch): ProxyMqttMatch {
  return { clientId: m.clientId, publish: m.publish, subscribe: m.subscribe };
}

function renderAccess(a: Access): ProxyAccessRule {
  const tcp = a.rules.filter((r) => r.kind === 'TCPRoute');
  const http = a.rules.flatMap((r) => (r.kind === 'HTTPRouteGroup' ? r.matches.map(renderMatch) : []));
  const mqtt = a.rules.flatMap((r) => (r.kind === 'MQTTRouteGroup' ? r.matches.map(renderMqttMatch) : []));
  return {
    target: id(a.namespace, a.name),
    // The proxy's identity strings: "ns/sa" in this cluster, the SPIFFE ID for another cluster's (proxy/clusterset.js).
    sources: a.sources.map((s) => (s.trustDomain === undefined ? id(s.namespace, s.serviceAccount) : spiffeId(s.trustDomain, s))).sort(),
    port: a.destination.port,
    tcpAllPorts: tcp.some((r) => r.ports.length === 0),
    tcpPorts: [...new Set(tcp.flatMap((r) => r.ports))].sort((x, y) => x - y),
    http,
    mqtt,
  };
}

/** Endpoints of `svc` for the service port named `portName` (or numbered `port`), as "ip:port". */
function endpointsFor(svc: PolicyService, portName: string, port: number): string[] {
  const sp = svc.ports.find((p) => p.name === portName) ?? svc.ports.find((p) => p.port === port);
  if (!sp) return [];
  const out: string[] = [];
  for (const e of svc.endpoints) {
    const target = e.ports[sp.name];
    if (target !== undefined) out.push(`${e.ip}:${target}`);
  }
  return out.sort();
}

function isoTime(t: Date | number | string, field: string): string {
  const d = t instanceof Date ? t : new Date(t);
  if (Number.isNaN(d.getTime())) throw new InvalidInputError(field, t, 'is not a time');
  return d.toISOString();
}

/**
 * The tunnel's TLS part: the trust bundle inline (it is public), each local
 * identity by file paths (private keys never enter config.json). An identity
 * of a local pod without files is rendered 'missing': its tunnels fail closed.
 * A bundle without any root makes every tunnel refused (`refuse`).
 */
export function renderTunnelTLS(trust: ProxyTrust, localIdentities: string[], files: Record<string, ProxyIdentityFiles>, maxAgeSeconds = DEFAULT_TUNNEL_MAX_AGE_SECONDS): ProxyTunnelTLS {
  const bundle = trust.bundle.map((p) => p.trim()).filter((p) => p.includes('-----BEGIN CERTIFICATE-----'));
  if (!Number.isInteger(maxAgeSeconds) || maxAgeSeconds < 1) throw new InvalidInputError('tunnelMaxAgeSeconds', maxAgeSeconds, 'must be a whole number of seconds, at least 1');
  const identities: Record<string, ProxyIdentity> = {};
  for (const id of [...new Set(localIdentities)].sort()) {
    const f = files[id];
    identities[id] =
      f && f.notAfter !== undefined && f.state !== 'pending'
        ? { certFile: f.certPath, keyFile: f.keyPath, notAfter: isoTime(f.notAfter, `identities[${id}].notAfter`), state: f.state === 'expired' ? 'expired' : 'valid' }
        : { certFile: '', keyFile: '', notAfter: new Date(0).toISOString(), state: 'missing' };
  }
  // No root: nothing could be verified, and a TLS listener with an empty trust list accepts anyone.
  if (bundle.length === 0) return { trustDomain: trust.trustDomain, trustBundle: '', refuse: 'no-trust-bundle', maxConnectionAgeSeconds: maxAgeSeconds, identities };
  return { trustDomain: trust.trustDomain, trustBundle: `${bundle.join('\n')}\n`, refuse: null, maxConnectionAgeSeconds: maxAgeSeconds, identities };
}

/** The backends of `split` for the root service port `sp`: weight 0 and unknown services left out. */
function splitBackends(split: Split, byName: Map<string, PolicyService>, sp: { name: string; port: number }): ProxyBackend[] {
  return split.backends.flatMap((b) => {
    const backend = byName.get(id(split.namespace, b.service));
    if (!backend || b.weight === 0) return [];
    return [{ service: id(backend.namespace, backend.name), weight: b.weight, endpoints: endpointsFor(backend, sp.name, sp.port) }];
  });
}

export function renderProxyConfig(policy: NodePolicy, facts: ProxyNodeFacts): ProxyConfig {
  const byName = new Map(policy.services.map((s) => [id(s.namespace, s.name), s]));
  // Per root service: the first split without matches (by ns/name) takes all
  // traffic the routes do not; every split with matches becomes a route,
  // which only HTTP requests can take (TCP has no request to match).
  const splitOf = new Map<string, Split>();
  const routedBy = new Map<string, Split[]>();
  for (const sp of [...policy.splits].sort((a, b) => id(a.namespace, a.name).localeCompare(id(b.namespace, b.name)))) {
    const root = id(sp.namespace, sp.service);
    if (sp.matches.length > 0) routedBy.set(root, [...(routedBy.get(root) ?? []), sp]);
    else if (!splitOf.has(root)) splitOf.set(root, sp);
  }

  const tunnelOf = new Map<string, string>();
  const tunnelPeers = new Set<string>();
  for (const p of policy.proxies) {
    const first = p.addresses[0];
    if (first !== undefined) tunnelOf.set(p.node, `${first}:${facts.inboundPort}`);
    for (const a of p.addresses) tunnelPeers.add(a);
  }
  for (const a of policy.node.addresses) tunnelPeers.add(a);

  const tunnelTLS = facts.trust
    ? renderTunnelTLS(
        facts.trust,
        // A Gateway served here is a local identity too: its tunnels into the mesh present its own certificate.
        // So is the clusterset gateway identity of a cluster in a clusterset (src/multicluster/identity.ts).
        [...policy.pods.map((p) => id(p.namespace, p.serviceAccount)), ...gatewayIdentities(policy).map((g) => id(g.namespace, g.serviceAccount)), ...multiclusterIdentities(policy).map((g) => id(g.namespace, g.serviceAccount))],
        facts.identities ?? {},
        facts.tunnelMaxAgeSeconds,
      )
    : null;

  const pods: ProxyConfig['pods'] = {};
  const endpoints: Record<string, ProxyEndpoint> = {};
  for (const p of policy.pods) {
    pods[p.ip] = { identity: id(p.namespace, p.serviceAccount), name: p.name };
    endpoints[p.ip] = { identity: id(p.namespace, p.serviceAccount), local: true, tunnel: null, ports: {} };
  }

  const services: Record<string, ProxyService> = {};
  for (const svc of [...policy.services].sort((a, b) => id(a.namespace, a.name).localeCompare(id(b.namespace, b.name)))) {
    for (const sp of svc.ports) {
      if (sp.protocol !== 'TCP') continue;
      const protocol = portProtocol(sp);
      for (const e of svc.endpoints) {
        const target = e.ports[sp.name];
        const ep = (endpoints[e.ip] ??= {
          identity: e.pod && e.serviceAccount ? id(e.pod.namespace, e.serviceAccount) : null,
          local: e.node === policy.node.name,
          tunnel: e.node !== null && e.node !== policy.node.name ? (tunnelOf.get(e.node) ?? null) : null,
          ports: {},
        });
        if (target === undefined) continue;
        const known = ep.ports[String(target)];
        // Two services disagreeing about a pod port: TCP, the protocol that never breaks the bytes.
        ep.ports[String(target)] = known === undefined || known === protocol ? protocol : 'tcp';
      }
      const root = id(svc.namespace, svc.name);
      const split = splitOf.get(root);
      const backends: ProxyBackend[] = split ? splitBackends(split, byName, sp) : [{ service: root, weight: 1, endpoints: endpointsFor(svc, sp.name, sp.port) }];
      const routes = protocol === 'http' ? (routedBy.get(root) ?? []).map((r) => ({ split: id(r.namespace, r.name), matches: r.matches.map(renderMatch), backends: splitBackends(r, byName, sp) })) : [];
      const entry: ProxyService = routes.length > 0 ? { service: root, protocol, backends, routes } : { service: root, protocol, backends };
      for (const ip of svc.clusterIPs) services[`${ip}:${sp.port}`] = entry;
    }
  }

  const meshPods: Record<string, ProxyMeshPod> = {};
  for (const p of policy.meshPods) {
    if (endpoints[p.ip] !== undefined) continue;
    const local = p.node === policy.node.name;
    meshPods[p.ip] = { identity: id(p.namespace, p.serviceAccount), local, tunnel: local ? null : (tunnelOf.get(p.node) ?? null) };
  }

  const access: Record<string, ProxyAccessRule[]> = {};
  for (const a of policy.access) (access[id(a.destination.namespace, a.destination.serviceAccount)] ??= []).push(renderAccess(a));

  const gateways = renderGateways(policy, facts.inboundPort, facts.gatewayCertificates ?? {});
  const egressRules = policy.egressPolicies ? renderEgressRules(policy.egressPolicies, Object.values(pods).map((p) => p.identity)) : undefined;
  return {
    format: PROXY_CONFIG_FORMAT,
    version: policy.version,
    node: policy.node.name,
    listen: { outbound: facts.outboundPort, inbound: facts.inboundPort },
    trafficPolicy: policy.mesh.trafficPolicy,
    egress: policy.mesh.egress,
    tunnelPeers: [...tunnelPeers].sort(),
    tunnelTLS,
    pods,
    services,
    endpoints,
    meshPods,
    access,
    resilience: renderResilience(policy.resilience, policy.services, policy.multicluster?.imports),
    ...(policy.multicluster ? { multicluster: renderMulticluster(policy.multicluster, policy.services, tunnelTLS && !tunnelTLS.refuse ? tunnelTLS.trustDomain : null) } : {}),
    mqtt: { ...MQTT_DEFAULTS, maxTopics: DEFAULT_MQTT_MAX_TOPICS, ...policy.mesh.mqtt },
    ...(gateways.length > 0 ? { gateways } : {}),
    ...(egressRules ? { egressRules } : {}),
  };
}
