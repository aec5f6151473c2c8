import { createHash } from 'node:crypto';
import { z } from 'zod';
import { InvalidInputError } from '../errors.js';
import { parseLifetime } from '../identity/lifetime.js';
import { DEFAULT_TRUST_DOMAIN, parseSpiffeId, validateIdentity, validateTrustDomain } from '../identity/spiffe.js';
import {
  ANNOTATION_INBOUND_PORT_EXCLUSION,
  ANNOTATION_LAB_CGROUP,
  ANNOTATION_OUTBOUND_IP_EXCLUSION,
  ANNOTATION_OUTBOUND_IP_INCLUSION,
  ANNOTATION_OUTBOUND_PORT_EXCLUSION,
  ANNOTATION_SIDECAR_INJECTION,
  LABEL_INTERCEPTION_MODE,
  LABEL_MONITORED_BY,
  LABEL_MULTICLUSTER_GATEWAY,
  ListParseError,
  parseCidrList,
  parsePortList,
} from './fsm.js';
import { FieldError } from './fields.js';
import { parseResilienceDefaults, parseRetrySpec, parseUpstreamSpec, RESILIENCE_API_VERSION, type ResilienceDefaults, type RetrySpec, type UpstreamSpec } from './resilience.js';
import { MQTT_ROUTE_GROUP_API_VERSION, parseMqttRouteGroup, type MqttRouteGroupRec } from './mqtt.js';
import { EGRESS_API_VERSION, toEgress, type EgressRec } from '../egress/objects.js';
import {
  GATEWAY_API_VERSION,
  REFERENCE_GRANT_API_VERSION,
  toGateway,
  toGatewayClass,
  toHTTPRoute,
  toReferenceGrant,
  toTlsSecret,
  type GatewayClassRec,
  type GatewayRec,
  type HTTPRouteRec,
  type ReferenceGrantRec,
  type TlsSecretRec,
} from '../gateway/objects.js';
import { parseSplitSpec, SPLIT_API_VERSIONS } from './smi-split.js';
import { formatPath, InterceptionModeSchema, type DesiredInterceptionMode, type Exclusions, type HttpMatch, type Identity, type MeshSettings, type SourceIdentity } from './schema.js';

/**
 * Input side of the compiler: the Kubernetes objects the controller reads,
 * checked field by field and reduced to the records the compiler indexes.
 * Checking here, per object, is what lets one bad object be reported and
 * skipped (its last good record stays) while everything else compiles.
 */

export const KINDS = {
  Namespace: ['v1'],
  Node: ['v1'],
  Pod: ['v1'],
  Service: ['v1'],
  EndpointSlice: ['discovery.k8s.io/v1'],
  ConfigMap: ['v1'],
  /** Every SMI version (src/policy/smi-split.ts); the first is the one the Kubernetes source watches. */
  TrafficSplit: SPLIT_API_VERSIONS,
  TrafficTarget: ['access.smi-spec.io/v1alpha3'],
  HTTPRouteGroup: ['specs.smi-spec.io/v1alpha4'],
  TCPRoute: ['specs.smi-spec.io/v1alpha4'],
  /** This project's own route group for MQTT (src/policy/mqtt.ts). */
  MQTTRouteGroup: [MQTT_ROUTE_GROUP_API_VERSION],
  /** Gateway API (src/gateway/): ingress on the node proxies. */
  GatewayClass: [GATEWAY_API_VERSION],
  Gateway: [GATEWAY_API_VERSION],
  HTTPRoute: [GATEWAY_API_VERSION],
  ReferenceGrant: [REFERENCE_GRANT_API_VERSION],
  /** Only kubernetes.io/tls Secrets, for Gateway listener certificates. */
  Secret: ['v1'],
  /** FSM's egress policy (src/egress/). */
  Egress: [EGRESS_API_VERSION],
  /** FSM's resilience policies (src/policy/resilience.ts). */
  Retry: [RESILIENCE_API_VERSION],
  UpstreamTrafficSetting: [RESILIENCE_API_VERSION],
} as const;
export type Kind = keyof typeof KINDS;
export const CLUSTER_SCOPED: ReadonlySet<Kind> = new Set<Kind>(['Namespace', 'Node', 'GatewayClass']);

export function isKind(kind: unknown): kind is Kind {
  return typeof kind === 'string' && Object.hasOwn(KINDS, kind);
}

/** Identifies one object: kind plus namespace ('' when cluster-scoped) plus name. */
export interface ObjectRef {
  kind: Kind;
  namespace: string;
  name: string;
}


export { FieldError };

// ---- records --------------------------------------------------------------

export interface NamespaceRec {
  name: string;
  monitoredBy: string | null;
  /** For Gateway listeners' allowedRoutes namespace selectors. */
  labels: Record<string, string>;
}
export interface NodeRec {
  name: string;
  addresses: string[];
  modeLabel: DesiredInterceptionMode | null;
  /** Label multicluster.fsm-node.io/gateway=true: its proxy takes tunnels from other clusters (src/multicluster). */
  gateway: boolean;
  /** For Gateways' node selectors (src/gateway/objects.ts ANNOTATION_NODE_SELECTOR). */
  labels: Record<string, string>;
}
export interface PodRec {
  uid: string;
  namespace: string;
  name: string;
  node: string | null;
  ip: string | null;
  serviceAccount: string;
  labels: Record<string, string>;
  hostNetwork: boolean;
  /** Running or Pending with an address; Succeeded/Failed pods hold no connections. */
  active: boolean;
  ready: boolean;
  optOut: boolean;
  qosClass: 'Guaranteed' | 'Burstable' | 'BestEffort' | null;
  cgroupPath: string | null;
  exclusions: Exclusions;
  containerPorts: Record<string, number>;
}
export interface ServicePortRec {
  name: string;
  port: number;
  targetPort: number | string | null;
  protocol: 'TCP' | 'UDP' | 'SCTP';
  appProtocol: string | null;
}
export interface ServiceRec {
  namespace: string;
  name: string;
  selector: Record<string, string> | null;
  clusterIPs: string[];
  ports: ServicePortRec[];
}
export interface SliceRec {
  namespace: string;
  name: string;
  service: string | null;
  ports: { name: string; port: number }[];
  endpoints: { addresses: string[]; ready: boolean; node: string | null; pod: { namespace: string; name: string } | null }[];
}
export interface SplitRec {
  namespace: string;
  name: string;
  service: string;
  backends: { service: string; weight: number }[];
  matchGroups: string[];
}
export interface TargetRec {
  namespace: string;
  name: string;
  destination: Identity & { port: number | null };
  sources: SourceIdentity[];
  rules: { kind: 'HTTPRouteGroup' | 'TCPRoute' | 'MQTTRouteGroup'; name: string; matches: string[] | null }[];
}
export interface RouteGroupRec {
  namespace: string;
  name: string;
  matches: HttpMatch[];
}
export interface TcpRouteRec {
  namespace: string;
  name: string;
  ports: number[];
}

export interface RecordOf {
  Namespace: NamespaceRec;
  Node: NodeRec;
  Pod: PodRec;
  Service: ServiceRec;
  EndpointSlice: SliceRec;
  ConfigMap: MeshConfigRec;
  TrafficSplit: SplitRec;
  TrafficTarget: TargetRec;
  HTTPRouteGroup: RouteGroupRec;
  TCPRoute: TcpRouteRec;
  MQTTRouteGroup: MqttRouteGroupRec;
  GatewayClass: GatewayClassRec;
  Gateway: GatewayRec;
  HTTPRoute: HTTPRouteRec;
  ReferenceGrant: ReferenceGrantRec;
  Secret: TlsSecretRec;
  Egress: EgressRec;
  Retry: RetryRec;
  UpstreamTrafficSetting: UpstreamRec;
}
export type RetryRec = { namespace: string; name: string } & RetrySpec;
export type UpstreamRec = { namespace: string; name: string } & UpstreamSpec;

// ---- input schemas (only the fields we read) --------------------------------

const dns = z.string().min(1).max(253).regex(/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/, 'must be a lowercase RFC 1123 name');
const strMap = z.record(z.string()).nullish().transform((m) => m ?? {});
const port = z.number().int().min(1).max(65535);
const ip = z.string().ip();

const Metadata = z.object({
  name: dns,
  namespace: dns.optional(),
  uid: z.string().min(1).optional(),
  labels: strMap,
  annotations: strMap,
});

const NamespaceIn = z.object({ metadata: Metadata });

const NodeIn = z.object({
  metadata: Metadata,
  status: z
    .object({ addresses: z.array(z.object({ type: z.string(), address: z.string() })).nullish() })
    .nullish(),
});

const PodIn = z.object({
  metadata: Metadata,
  spec: z.object({
    nodeName: dns.nullish(),
    serviceAccountName: dns.nullish(),
    hostNetwork: z.boolean().nullish(),
    containers: z
      .array(z.object({ ports: z.array(z.object({ name: z.string().nullish(), containerPort: port })).nullish() }))
      .nullish(),
  }),
  status: z
    .object({
      podIP: ip.nullish(),
      phase: z.string().nullish(),
      qosClass: z.enum(['Guaranteed', 'Burstable', 'BestEffort']).nullish(),
      conditions: z.array(z.object({ type: z.string(), status: z.string() })).nullish(),
    })
    .nullish(),
});

const ServiceIn = z.object({
  metadata: Metadata,
  spec: z.object({
    selector: z.record(z.string()).nullish(),
    clusterIP: z.string().nullish(),
    clusterIPs: z.array(z.string()).nullish(),
    ports: z
      .array(
        z.object({
          name: z.string().nullish(),
          port,
          targetPort: z.union([port, z.string().min(1)]).nullish(),
          protocol: z.enum(['TCP', 'UDP', 'SCTP']).nullish(),
          appProtocol: z.string().nullish(),
        }),
      )
      .nullish(),
  }),
});

const SliceIn = z.object({
  metadata: Metadata,
  addressType: z.enum(['IPv4', 'IPv6', 'FQDN']),
  ports: z.array(z.object({ name: z.string().nullish(), port: port.nullish() })).nullish(),
  endpoints: z
    .array(
      z.object({
        addresses: z.array(z.string()).min(1),
        conditions: z.object({ ready: z.boolean().nullish() }).nullish(),
        nodeName: z.string().nullish(),
        targetRef: z.object({ kind: z.string().nullish(), name: z.string(), namespace: z.string().nullish() }).nullish(),
      }),
    )
    .nullish(),
});

const ConfigMapIn = z.object({ metadata: Metadata, data: z.record(z.string()).nullish() });

const SplitIn = z.object({ apiVersion: z.unknown(), metadata: Metadata, spec: z.unknown() });

const SaRef = z.object({ kind: z.literal('ServiceAccount'), name: dns, namespace: dns.nullish() });
const TargetIn = z.object({
  metadata: Metadata,
  spec: z.object({
    destination: SaRef.extend({ port: port.nullish() }),
    // A source of another cluster: a ServiceAccount with its trustDomain, or kind SpiffeID naming it whole.
    sources: z.array(z.object({ kind: z.enum(['ServiceAccount', 'SpiffeID']), name: z.string().min(1), namespace: dns.nullish(), trustDomain: z.string().nullish() })).min(1),
    rules: z
      .array(z.object({ kind: z.enum(['HTTPRouteGroup', 'TCPRoute', 'MQTTRouteGroup']), name: dns, matches: z.array(z.string()).nullish() }))
      .nullish(),
  }),
});

const RouteGroupIn = z.object({
  metadata: Metadata,
  spec: z.object({
    matches: z
      .array(
        z.object({
          name: z.string().min(1),
          pathRegex: z.string().nullish(),
          methods: z.array(z.string().min(1)).nullish(),
          headers: z.record(z.string()).nullish(),
        }),
      )
      .min(1),
  }),
});

const TcpRouteIn = z.object({
  metadata: Metadata,
  spec: z.object({ matches: z.object({ ports: z.array(port).nullish() }).nullish() }).nullish(),
});

// ---- conversion -------------------------------------------------------------

type Parsed<S extends z.ZodTypeAny> = z.infer<S>;

function parse<S extends z.ZodTypeAny>(schema: S, obj: unknown): Parsed<S> {
  const r = schema.safeParse(obj);
  if (r.success) return r.data;
  const first = r.error.issues[0]!;
  throw new FieldError(formatPath(first.path), first.message);
}

function annotationList<T>(annotations: Record<string, string>, key: string, parser: (v: string) => T[]): T[] {
  const value = annotations[key];
  if (value === undefined) return [];
  try {
    return parser(value);
  } catch (err) {
    if (err instanceof ListParseError) throw new FieldError(`metadata.annotations["${key}"]`, `item ${err.message}`);
    throw err;
  }
}

/** Stable uid for hand-written manifests (lab) that carry none: derived from namespace/name. */
export function manifestUid(namespace: string, name: string): string {
  const h = createHash('sha256').update(`${namespace}/${name}`).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

const toNamespace = (o: unknown): NamespaceRec => {
  const { metadata: m } = parse(NamespaceIn, o);
  return { name: m.name, monitoredBy: m.labels[LABEL_MONITORED_BY] ?? null, labels: m.labels };
};

const toNode = (o: unknown): NodeRec => {
  const { metadata: m, status } = parse(NodeIn, o);
  const addresses = (status?.addresses ?? []).filter((a) => a.type === 'InternalIP').map((a) => a.address);
  addresses.forEach((a, i) => {
    if (!ip.safeParse(a).success) throw new FieldError(`status.addresses[${i}].address`, `${JSON.stringify(a)} is not an IP address`);
  });
  const label = m.labels[LABEL_INTERCEPTION_MODE];
  let modeLabel: DesiredInterceptionMode | null = null;
  if (label !== undefined) {
    const r = InterceptionModeSchema.safeParse(label);
    if (!r.success) throw new FieldError(`metadata.labels["${LABEL_INTERCEPTION_MODE}"]`, `${JSON.stringify(label)} is not one of ebpf, iptables, auto`);
    modeLabel = r.data;
  }
  return { name: m.name, addresses, modeLabel, gateway: m.labels[LABEL_MULTICLUSTER_GATEWAY] === 'true', labels: m.labels };
};

const toPod = (o: unknown): PodRec => {
  const { metadata: m, spec, status } = parse(PodIn, o);
  const namespace = m.namespace ?? 'default';
  const a = m.annotations;
  const injection = a[ANNOTATION_SIDECAR_INJECTION];
  if (injection !== undefined && injection !== 'enabled' && injection !== 'disabled') {
    throw new FieldError(`metadata.annotations["${ANNOTATION_SIDECAR_INJECTION}"]`, `${JSON.stringify(injection)} is not one of enabled, disabled`);
  }
  const cgroupPath = a[ANNOTATION_LAB_CGROUP] ?? null;
  if (cgroupPath !== null && (cgroupPath === '' || cgroupPath.split('/').includes('..'))) {
    throw new FieldError(`metadata.annotations["${ANNOTATION_LAB_CGROUP}"]`, `${JSON.stringify(cgroupPath)} is not a cgroup path without ".."`);
  }
  const containerPorts: Record<string, number> = {};
  for (const c of spec.containers ?? []) for (const p of c.ports ?? []) if (p.name) containerPorts[p.name] = p.containerPort;
  const phase = status?.phase ?? 'Pending';
  const readyCond = status?.conditions?.find((c) => c.type === 'Ready');
  return {
    uid: m.uid ?? manifestUid(namespace, m.name),
    namespace,
    name: m.name,
    node: spec.nodeName ?? null,
    ip: status?.podIP ?? null,
    serviceAccount: spec.serviceAccountName ?? 'default',
    labels: m.labels,
    hostNetwork: spec.hostNetwork ?? false,
    active: phase === 'Running' || phase === 'Pending',
    // Hand-written (lab) pods carry no conditions: absent means ready.
    ready: readyCond === undefined || readyCond.status === 'True',
    optOut: injection === 'disabled',
    qosClass: status?.qosClass ?? null,
    cgroupPath,
    exclusions: {
      outboundPorts: annotationList(a, ANNOTATION_OUTBOUND_PORT_EXCLUSION, parsePortList),
      outboundCidrs: annotationList(a, ANNOTATION_OUTBOUND_IP_EXCLUSION, parseCidrList),
      outboundIncludeCidrs: annotationList(a, ANNOTATION_OUTBOUND_IP_INCLUSION, parseCidrList),
      inboundPorts: annotationList(a, ANNOTATION_INBOUND_PORT_EXCLUSION, parsePortList),
    },
    containerPorts,
  };
};

const toService = (o: unknown): ServiceRec => {
  const { metadata: m, spec } = parse(ServiceIn, o);
  const ips = spec.clusterIPs ?? (spec.clusterIP ? [spec.clusterIP] : []);
  const clusterIPs = ips.filter((x) => x !== 'None');
  clusterIPs.forEach((x, i) => {
    if (!ip.safeParse(x).success) throw new FieldError(`spec.clusterIPs[${i}]`, `${JSON.stringify(x)} is not an IP address`);
  });
  const ports = (spec.ports ?? []).map((p) => ({
    name: p.name ?? '',
    port: p.port,
    targetPort: p.targetPort ?? null,
    protocol: p.protocol ?? 'TCP',
    appProtocol: p.appProtocol ?? null,
  }));
  const seen = new Set<string>();
  ports.forEach((p, i) => {
    if (seen.has(p.name)) throw new FieldError(`spec.ports[${i}].name`, `duplicate port name ${JSON.stringify(p.name)}`);
    seen.add(p.name);
  });
  return { namespace: m.namespace ?? 'default', name: m.name, selector: spec.selector ?? null, clusterIPs, ports };
};

const toSlice = (o: unknown): SliceRec => {
  const s = parse(SliceIn, o);
  const namespace = s.metadata.namespace ?? 'default';
  const endpoints =
    s.addressType === 'FQDN'
      ? []
      : (s.endpoints ?? []).map((e, i) => {
          e.addresses.forEach((x, j) => {
            if (!ip.safeParse(x).success) throw new FieldError(`endpoints[${i}].addresses[${j}]`, `${JSON.stringify(x)} is not an IP address`);
          });
          const ref = e.targetRef && (e.targetRef.kind ?? 'Pod') === 'Pod' ? { namespace: e.targetRef.namespace ?? namespace, name: e.targetRef.name } : null;
          // The EndpointSlice API: a nil ready condition means ready.
          return { addresses: e.addresses, ready: e.conditions?.ready ?? true, node: e.nodeName ?? null, pod: ref };
        });
  const ports = (s.ports ?? []).flatMap((p) => (p.port == null ? [] : [{ name: p.name ?? '', port: p.port }]));
  return { namespace, name: s.metadata.name, service: s.metadata.labels['kubernetes.io/service-name'] ?? null, ports, endpoints };
};

/** Keys of the mesh ConfigMap (docs/controller.md). Unknown keys are errors: a typo must not pass silently. */
/** MQTT defaults of the proxy (proxy/config.js holds the same numbers for a proxy started without a policy). */
export const MQTT_DEFAULTS = { topicLevels: 2, maxPacketBytes: 1048576 } as const;

function wholeNumber(field: string, value: string, min: number, max: number): number {
  const n = /^[0-9]+$/.test(value.trim()) ? Number(value.trim()) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) throw new FieldError(field, `${JSON.stringify(value)} is not a whole number from ${min} to ${max}`);
  return n;
}

export const MESH_DEFAULTS: MeshSettings = {
  name: 'fsm',
  inbound: 'permissive',
  interceptionMode: 'auto',
  egress: 'allow',
  trafficPolicy: 'permissive',
  exclusions: { outboundPorts: [], outboundCidrs: [], outboundIncludeCidrs: [], inboundPorts: [] },
};

/**
 * The mesh ConfigMap: the settings every node's policy carries, and the
 * workload identity settings the controller keeps to itself (the trust domain
 * goes into the policy's trust part, the lifetime only into certificates).
 */
export interface MeshConfigRec {
  settings: MeshSettings;
  identity: MeshIdentitySettings;
  /** Mesh-wide request timeout and outlier detection defaults (src/policy/resilience.ts). */
  resilience: ResilienceDefaults;
}

export interface MeshIdentitySettings {
  trustDomain: string;
  /** Certificate lifetime from data.certificateLifetime; null: the controller's default (flag or 24 h). */
  certificateLifetimeMs: number | null;
}

export const IDENTITY_DEFAULTS: MeshIdentitySettings = { trustDomain: DEFAULT_TRUST_DOMAIN, certificateLifetimeMs: null };

const MeshData = z
  .object({
    meshName: dns.optional(),
    trustDomain: z.string().optional(),
    certificateLifetime: z.string().optional(),
    requestTimeout: z.string().optional(),
    outlierDetection: z.string().optional(),
    outlierConsecutiveFailures: z.string().optional(),
    outlierBaseEjectionTime: z.string().optional(),
    outlierMaxEjectionPercent: z.string().optional(),
    inbound: z.enum(['strict', 'permissive']).optional(),
    interceptionMode: InterceptionModeSchema.optional(),
    egress: z.enum(['allow', 'deny']).optional(),
    trafficPolicy: z.enum(['permissive', 'smi']).optional(),
    inboundPortExclusionList: z.string().optional(),
    outboundPortExclusionList: z.string().optional(),
    outboundIPRangeExclusionList: z.string().optional(),
    outboundIPRangeInclusionList: z.string().optional(),
    mqttTopicLevels: z.string().optional(),
    mqttMaxPacketBytes: z.string().optional(),
  })
  .strict();

const toMeshConfig = (o: unknown): MeshConfigRec => {
  const { data } = parse(ConfigMapIn, o);
  let d: z.infer<typeof MeshData>;
  try {
    d = parse(MeshData, data ?? {});
  } catch (err) {
    if (err instanceof FieldError) throw new FieldError(`data.${err.field === '(root)' ? '' : err.field}`.replace(/\.$/, ''), err.message);
    throw err;
  }
  const list = <T>(key: keyof typeof d, parser: (v: string) => T[]): T[] => {
    const v = d[key];
    if (v === undefined) return [];
    try {
      return parser(v);
    } catch (err) {
      if (err instanceof ListParseError) throw new FieldError(`data.${key}`, `item ${err.message}`);
      throw err;
    }
  };
  const checked = <T>(key: string, fn: () => T): T => {
    try {
      return fn();
    } catch (err) {
      if (err instanceof InvalidInputError) throw new FieldError(`data.${key}`, err.message);
      throw err;
    }
  };
  const identity: MeshIdentitySettings = {
    trustDomain: d.trustDomain === undefined ? IDENTITY_DEFAULTS.trustDomain : checked('trustDomain', () => validateTrustDomain(d.trustDomain!, 'trustDomain')),
    certificateLifetimeMs: d.certificateLifetime === undefined ? null : checked('certificateLifetime', () => parseLifetime(d.certificateLifetime!, 'certificateLifetime')),
  };
  const settings: MeshSettings = {
    name: d.meshName ?? MESH_DEFAULTS.name,
    inbound: d.inbound ?? MESH_DEFAULTS.inbound,
    interceptionMode: d.interceptionMode ?? MESH_DEFAULTS.interceptionMode,
    egress: d.egress ?? MESH_DEFAULTS.egress,
    trafficPolicy: d.trafficPolicy ?? MESH_DEFAULTS.trafficPolicy,
    exclusions: {
      outboundPorts: list('outboundPortExclusionList', parsePortList),
      outboundCidrs: list('outboundIPRangeExclusionList', parseCidrList),
      outboundIncludeCidrs: list('outboundIPRangeInclusionList', parseCidrList),
      inboundPorts: list('inboundPortExclusionList', parsePortList),
    },
  };
  // Only when set: a mesh that never mentions MQTT keeps the policy (and its version) it had.
  if (d.mqttTopicLevels !== undefined || d.mqttMaxPacketBytes !== undefined) {
    settings.mqtt = {
      topicLevels: d.mqttTopicLevels === undefined ? MQTT_DEFAULTS.topicLevels : wholeNumber('data.mqttTopicLevels', d.mqttTopicLevels, 0, 16),
      maxPacketBytes: d.mqttMaxPacketBytes === undefined ? MQTT_DEFAULTS.maxPacketBytes : wholeNumber('data.mqttMaxPacketBytes', d.mqttMaxPacketBytes, 16, 268435455),
    };
  }
  return { settings, identity, resilience: parseResilienceDefaults(d) };
};

const PolicyIn = z.object({ metadata: Metadata, spec: z.unknown() });

const toRetry = (o: unknown): RetryRec => {
  const { metadata: m, spec } = parse(PolicyIn, o);
  const namespace = m.namespace ?? 'default';
  return { namespace, name: m.name, ...parseRetrySpec(spec, namespace) };
};

const toUpstream = (o: unknown): UpstreamRec => {
  const { metadata: m, spec } = parse(PolicyIn, o);
  const namespace = m.namespace ?? 'default';
  return { namespace, name: m.name, ...parseUpstreamSpec(spec, namespace) };
};

const toSplit = (o: unknown): SplitRec => {
  const { apiVersion, metadata: m, spec } = parse(SplitIn, o);
  // The Kubernetes source's objects carry the version it watches; a hand-written one without apiVersion is refused by the directory source.
  return { namespace: m.namespace ?? 'default', name: m.name, ...parseSplitSpec(apiVersion ?? SPLIT_API_VERSIONS[0], spec) };
};

/**
 * A TrafficTarget source: a ServiceAccount of this cluster (no trustDomain),
 * or a workload of another cluster of the clusterset, named by its trust
 * domain ("c2.cluster.local", docs/multicluster.md) or its whole SPIFFE ID.
 * A trustDomain equal to this mesh's own is made local by the compiler.
 */
function targetSource(s: { kind: 'ServiceAccount' | 'SpiffeID'; name: string; namespace?: string | null | undefined; trustDomain?: string | null | undefined }, namespace: string, field: string): SourceIdentity {
  const fieldError = (sub: string, err: unknown): never => {
    if (err instanceof InvalidInputError) throw new FieldError(`${field}.${sub}`, err.message);
    throw err;
  };
  if (s.kind === 'SpiffeID') {
    if (s.namespace != null || s.trustDomain != null) throw new FieldError(`${field}.kind`, 'a SpiffeID source names its namespace and trust domain in name; set neither namespace nor trustDomain');
    try {
      const { trustDomain, identity } = parseSpiffeId(s.name, undefined, 'name');
      validateIdentity(identity, 'name');
      return { ...identity, trustDomain };
    } catch (err) {
      return fieldError('name', err);
    }
  }
  try {
    const identity = validateIdentity({ namespace: s.namespace ?? namespace, serviceAccount: s.name }, 'x');
    if (s.trustDomain == null) return identity;
    return { ...identity, trustDomain: validateTrustDomain(s.trustDomain, 'trustDomain') };
  } catch (err) {
    if (err instanceof InvalidInputError && err.field === 'x.serviceAccount') throw new FieldError(`${field}.name`, `${JSON.stringify(s.name)} must be a Kubernetes service account name (a DNS subdomain)`);
    if (err instanceof InvalidInputError && err.field === 'x.namespace') throw new FieldError(`${field}.namespace`, `${JSON.stringify(s.namespace)} must be a namespace name`);
    return fieldError('trustDomain', err);
  }
}

const toTarget = (o: unknown): TargetRec => {
  const { metadata: m, spec } = parse(TargetIn, o);
  const namespace = m.namespace ?? 'default';
  const d = spec.destination;
  return {
    namespace,
    name: m.name,
    destination: { namespace: d.namespace ?? namespace, serviceAccount: d.name, port: d.port ?? null },
    sources: spec.sources.map((s, i) => targetSource(s, namespace, `spec.sources[${i}]`)),
    rules: (spec.rules ?? []).map((r) => ({ kind: r.kind, name: r.name, matches: r.matches ?? null })),
  };
};

const toRouteGroup = (o: unknown): RouteGroupRec => {
  const { metadata: m, spec } = parse(RouteGroupIn, o);
  const names = new Set<string>();
  const matches = spec.matches.map((x, i) => {
    if (names.has(x.name)) throw new FieldError(`spec.matches[${i}].name`, `duplicate match name ${JSON.stringify(x.name)}`);
    names.add(x.name);
    if (x.pathRegex != null) {
      try {
        new RegExp(x.pathRegex);
      } catch (err) {
        throw new FieldError(`spec.matches[${i}].pathRegex`, `${JSON.stringify(x.pathRegex)} is not a regular expression: ${(err as Error).message}`);
      }
    }
    return { name: x.name, pathRegex: x.pathRegex ?? null, methods: x.methods ?? [], headers: x.headers ?? {} };
  });
  return { namespace: m.namespace ?? 'default', name: m.name, matches };
};

const toTcpRoute = (o: unknown): TcpRouteRec => {
  const { metadata: m, spec } = parse(TcpRouteIn, o);
  return { namespace: m.namespace ?? 'default', name: m.name, ports: [...new Set(spec?.matches?.ports ?? [])].sort((a, b) => a - b) };
};

const converters: { [K in Kind]: (o: unknown) => RecordOf[K] } = {
  Namespace: toNamespace,
  Node: toNode,
  Pod: toPod,
  Service: toService,
  EndpointSlice: toSlice,
  ConfigMap: toMeshConfig,
  TrafficSplit: toSplit,
  TrafficTarget: toTarget,
  HTTPRouteGroup: toRouteGroup,
  TCPRoute: toTcpRoute,
  MQTTRouteGroup: parseMqttRouteGroup,
  GatewayClass: toGatewayClass,
  Gateway: toGateway,
  HTTPRoute: toHTTPRoute,
  ReferenceGrant: toReferenceGrant,
  Secret: toTlsSecret,
  Egress: toEgress,
  Retry: toRetry,
  UpstreamTrafficSetting: toUpstream,
};

/** Check one object of `kind` and reduce it to its record; throws FieldError naming the field. */
export function toRecord<K extends Kind>(kind: K, obj: unknown): RecordOf[K] {
  return converters[kind](obj);
}

/** The ref of an object as far as it can be read without full validation (for reports). */
export function refOf(kind: Kind, obj: unknown): ObjectRef {
  const m = (obj as { metadata?: { name?: unknown; namespace?: unknown } } | null)?.metadata;
  const name = typeof m?.name === 'string' ? m.name : '';
  const namespace = CLUSTER_SCOPED.has(kind) ? '' : typeof m?.namespace === 'string' ? m.namespace : 'default';
  return { kind, namespace, name };
}
