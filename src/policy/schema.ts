import { z } from 'zod';
import { EgressPolicySchema } from '../egress/schema.js';
import { IngressSchema } from '../gateway/schema.js';

/**
 * NodePolicy: everything one node needs from the controller, and nothing about
 * other nodes' pods. This file is the one source of truth: the controller
 * validates what it compiles against it, the agent validates what it fetches
 * (and what it reads back from disk), tests build fixtures from its types.
 *
 * One exception to "nothing about other nodes' pods": meshPods lists every
 * enrolled pod of the mesh (address, identity, node), so that a proxy
 * recognises a direct connection to any mesh pod as a mesh destination and
 * applies access control to it, even when no service its node may reach
 * selects that pod (it would otherwise look like egress).
 *
 * The document is made of parts the compiler caches separately (see
 * compiler.ts): mesh + proxies (shared by every node), meshPods (shared by
 * every node), node + pods + access (this node only), services + splits
 * (shared by every node that may reach the same set of services). Each part has its own schema so the controller can check a
 * part once when it is built rather than the whole document on every change.
 */

export const POLICY_API_VERSION = 'policy.fsm-node.io/v1';

export const InterceptionModeSchema = z.enum(['ebpf', 'iptables', 'auto']);
export type DesiredInterceptionMode = z.infer<typeof InterceptionModeSchema>;

const Name = z.string().min(1).max(253);
const Ip = z.string().ip();
const Cidr = z.string().cidr();
const Port = z.number().int().min(1).max(65535);

export const ExclusionsSchema = z
  .object({
    outboundPorts: z.array(Port),
    outboundCidrs: z.array(Cidr),
    outboundIncludeCidrs: z.array(Cidr),
    inboundPorts: z.array(Port),
  })
  .strict();
export type Exclusions = z.infer<typeof ExclusionsSchema>;

export const IdentitySchema = z.object({ namespace: Name, serviceAccount: Name }).strict();
export type Identity = z.infer<typeof IdentitySchema>;
/** A TrafficTarget source: trustDomain set only for a workload of another cluster of the clusterset (docs/multicluster.md). */
export const SourceIdentitySchema = IdentitySchema.extend({ trustDomain: z.string().min(1).max(253).optional() }).strict();
export type SourceIdentity = z.infer<typeof SourceIdentitySchema>;

export const MeshSchema = z
  .object({
    name: Name,
    /** strict: enrolled pods refuse inbound connections that do not come from a node proxy. */
    inbound: z.enum(['strict', 'permissive']),
    /** The mesh default; the Node label (node.interceptionMode) takes precedence. */
    interceptionMode: InterceptionModeSchema,
    /** What the proxy does with destinations outside the mesh. */
    egress: z.enum(['allow', 'deny']),
    /** permissive: any mesh pod may reach any mesh service; smi: only what TrafficTargets allow. */
    trafficPolicy: z.enum(['permissive', 'smi']),
    exclusions: ExclusionsSchema,
    /**
     * MQTT ports (docs/mqtt.md): topic levels kept in metric labels, largest
     * packet the proxy reads. Absent: the proxy's defaults (so policies of
     * controllers older than the field stay valid).
     */
    mqtt: z
      .object({
        topicLevels: z.number().int().min(0).max(16),
        maxPacketBytes: z.number().int().min(16).max(268435455),
      })
      .strict()
      .optional(),
  })
  .strict();
export type MeshSettings = z.infer<typeof MeshSchema>;

/** A node proxy of the mesh (every node runs one): tunnels go to it, strict pods accept it. */
export const ProxyPeerSchema = z.object({ node: Name, addresses: z.array(Ip) }).strict();

/** Where the agent finds the pod's cgroup (see desired.ts cgroupPathFor). */
export const CgroupHintSchema = z
  .object({
    qosClass: z.enum(['Guaranteed', 'Burstable', 'BestEffort']).nullable(),
    /** From the lab annotation lab.fsm-node.io/cgroup: a path given directly. */
    path: z.string().min(1).nullable(),
  })
  .strict();

export const PolicyPodSchema = z
  .object({
    uid: z.string().min(1),
    namespace: Name,
    name: Name,
    ip: Ip,
    serviceAccount: Name,
    cgroup: CgroupHintSchema,
    exclusions: ExclusionsSchema,
  })
  .strict();
export type PolicyPod = z.infer<typeof PolicyPodSchema>;

export const HttpMatchSchema = z
  .object({
    name: z.string(),
    pathRegex: z.string().nullable(),
    methods: z.array(z.string().min(1)),
    headers: z.record(z.string()),
  })
  .strict();
export type HttpMatch = z.infer<typeof HttpMatchSchema>;

/** A match of an MQTTRouteGroup (src/policy/mqtt.ts): filters are checked there, the proxy enforces them. */
export const MqttMatchSchema = z
  .object({
    name: z.string(),
    clientId: z.string().nullable(),
    publish: z.array(z.string().min(1)),
    subscribe: z.array(z.string().min(1)),
  })
  .strict();
export type MqttMatch = z.infer<typeof MqttMatchSchema>;

export const AccessRuleSchema = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('HTTPRouteGroup'), name: Name, matches: z.array(HttpMatchSchema) }).strict(),
  z.object({ kind: z.literal('MQTTRouteGroup'), name: Name, matches: z.array(MqttMatchSchema) }).strict(),
  z.object({ kind: z.literal('TCPRoute'), name: Name, ports: z.array(Port) }).strict(),
]);

/** A TrafficTarget whose destination is the identity of at least one of the node's pods. */
export const AccessSchema = z
  .object({
    namespace: Name,
    name: Name,
    destination: IdentitySchema.extend({ port: Port.nullable() }).strict(),
    sources: z.array(SourceIdentitySchema),
    rules: z.array(AccessRuleSchema),
  })
  .strict();
export type Access = z.infer<typeof AccessSchema>;

export const EndpointSchema = z
  .object({
    ip: Ip,
    /** Service port name -> port on this endpoint ('' for an unnamed port). */
    ports: z.record(Port),
    /** The node the endpoint runs on: the proxy tunnels to that node's proxy. */
    node: Name.nullable(),
    pod: z.object({ namespace: Name, name: Name }).strict().nullable(),
    serviceAccount: Name.nullable(),
  })
  .strict();
export type Endpoint = z.infer<typeof EndpointSchema>;

export const PolicyServiceSchema = z
  .object({
    namespace: Name,
    name: Name,
    clusterIPs: z.array(Ip),
    ports: z.array(
      z
        .object({
          name: z.string(),
          port: Port,
          protocol: z.enum(['TCP', 'UDP', 'SCTP']),
          appProtocol: z.string().nullable(),
        })
        .strict(),
    ),
    /** Ready endpoints only. */
    endpoints: z.array(EndpointSchema),
  })
  .strict();
export type PolicyService = z.infer<typeof PolicyServiceSchema>;

export const SplitSchema = z
  .object({
    namespace: Name,
    name: Name,
    /** The root service clients address. */
    service: Name,
    backends: z.array(z.object({ service: Name, weight: z.number().int().min(0) }).strict()).min(1),
    /** Empty: the split applies to all traffic to the root service. */
    matches: z.array(HttpMatchSchema),
  })
  .strict();
export type Split = z.infer<typeof SplitSchema>;

/** An enrolled pod of the mesh, on any node: what a proxy needs to treat its address as a mesh destination. */
export const MeshPodSchema = z.object({ ip: Ip, namespace: Name, serviceAccount: Name, node: Name }).strict();
export type MeshPod = z.infer<typeof MeshPodSchema>;

/**
 * Every enrolled pod of the mesh, ordered by node name, then address. Absent
 * in documents of controllers older than the field: read as none known (the
 * proxy then treats unlisted pods as before), so agents and controllers can
 * be upgraded in either order and a stored last good policy stays usable.
 */
export const MeshPodsPartSchema = z.object({ meshPods: z.array(MeshPodSchema).default([]) }).strict();
export type MeshPodsPart = z.infer<typeof MeshPodsPartSchema>;

/**
 * Workload identity trust (docs/security.md): the trust domain of the mesh's
 * SPIFFE IDs and the PEM roots a proxy verifies peers against (during a root
 * rotation, old and new together). Absent in documents of controllers older
 * than the field (optional, so fixtures and stored policies without it stay
 * valid): read it as DEFAULT_TRUST, an empty bundle, which a proxy must treat
 * as "no mTLS possible", never as "trust anyone". The compiler always sets it.
 */
export const TrustSchema = z
  .object({
    trustDomain: z.string().min(1).max(253),
    bundle: z.array(z.string().min(1)),
  })
  .strict();
export type Trust = z.infer<typeof TrustSchema>;
export const DEFAULT_TRUST: Trust = { trustDomain: 'cluster.local', bundle: [] };

const Ms = z.number().int().min(0);
const RateLimitSchema = z.object({ amount: z.number().int().min(1), unitSeconds: z.number().int().min(1), burst: z.number().int().min(0) }).strict();
const HttpRateLimitSchema = RateLimitSchema.extend({ status: z.number().int().min(400).max(599), headers: z.record(z.string()) }).strict();
export const OutlierSchema = z
  .object({ enabled: z.boolean(), consecutiveFailures: z.number().int().min(1), baseEjectionMs: Ms, maxEjectionMs: Ms, maxEjectionPercent: z.number().int().min(0).max(100) })
  .strict();
const ServiceRef = z.object({ namespace: Name, name: Name }).strict();

/** Retry and UpstreamTrafficSetting objects and the mesh-wide defaults (src/policy/resilience.ts), mesh-wide like the trust. */
export const ResilienceSchema = z
  .object({
    defaults: z.object({ requestTimeoutMs: Ms.nullable(), outlier: OutlierSchema }).strict(),
    retries: z.array(
      z
        .object({
          namespace: Name,
          name: Name,
          source: IdentitySchema,
          destinations: z.array(ServiceRef).min(1),
          retryOn: z.array(z.string().min(1)).min(1),
          perTryTimeoutMs: Ms.nullable(),
          numRetries: z.number().int().min(0).max(10),
          backoffBaseMs: Ms,
        })
        .strict(),
    ),
    upstreams: z.array(
      z
        .object({
          namespace: Name,
          name: Name,
          service: ServiceRef,
          connectTimeoutMs: Ms.nullable(),
          maxConnections: z.number().int().min(1).nullable(),
          maxRequests: z.number().int().min(1).nullable(),
          maxRequestsPerConnection: z.number().int().min(1).nullable(),
          maxPendingRequests: z.number().int().min(0).nullable(),
          maxRetries: z.number().int().min(0).nullable(),
          requestTimeoutMs: Ms.nullable(),
          circuitBreaking: z
            .object({
              statTimeWindowMs: z.number().int().min(1),
              minRequestAmount: z.number().int().min(0),
              degradedTimeWindowMs: Ms,
              slowTimeThresholdMs: Ms.nullable(),
              slowAmountThreshold: z.number().int().min(1).nullable(),
              slowRatioThreshold: z.number().min(0).max(1).nullable(),
              errorAmountThreshold: z.number().int().min(1).nullable(),
              errorRatioThreshold: z.number().min(0).max(1).nullable(),
              degradedStatusCode: z.number().int().min(400).max(599),
              degradedResponseContent: z.string(),
            })
            .strict()
            .nullable(),
          rateLimit: z.object({ tcp: RateLimitSchema.nullable(), http: HttpRateLimitSchema.nullable() }).strict(),
          routes: z.array(z.object({ path: z.string().min(1), timeoutMs: Ms.nullable(), rateLimit: HttpRateLimitSchema.nullable() }).strict()),
          outlier: OutlierSchema.partial().nullable(),
        })
        .strict(),
    ),
  })
  .strict();
export type Resilience = z.infer<typeof ResilienceSchema>;


/**
 * Multi-cluster imports (src/multicluster, docs/multicluster.md): the
 * services of the clusterset this cluster imports, with their clusterset IPs
 * and the tiers the proxy tries in order. A member of a tier is this cluster
 * (`local`: the local Service of the same namespace and name, its ready
 * endpoints) or another cluster, reached through its gateway node proxies.
 * No pod address of another cluster appears here. Absent when the controller
 * runs without a clusterset, and in documents of older controllers.
 */
export const ImportTierMemberSchema = z
  .object({
    cluster: Name,
    weight: z.number().int().min(0),
    local: z.boolean(),
    /** "address:port" of the cluster's gateway node proxies (empty for local). */
    gateways: z.array(z.string().min(1)),
    /** Ready endpoints the cluster last reported (for local: the controller's own count). */
    readyEndpoints: z.number().int().min(0),
  })
  .strict();
export type ImportTierMember = z.infer<typeof ImportTierMemberSchema>;

export const PolicyImportSchema = z
  .object({
    namespace: Name,
    name: Name,
    type: z.enum(['ClusterSetIP', 'Headless']),
    /** The clusterset IP (none for Headless, or when the CIDR is full). */
    ips: z.array(Ip),
    ports: PolicyServiceSchema.shape.ports,
    tiers: z.array(z.array(ImportTierMemberSchema)),
  })
  .strict();
export type PolicyImport = z.infer<typeof PolicyImportSchema>;

export const MulticlusterSchema = z
  .object({
    cluster: Name,
    /** The port every node proxy takes tunnels from other clusters on (only gateway nodes are advertised). */
    gatewayPort: Port,
    imports: z.array(PolicyImportSchema),
    /**
     * The clusterset CA (PEM roots) gateway tunnels are verified against, both
     * ways, and the peer clusters whose workloads may come in through a
     * gateway (each proves its own trust domain, "<id>.cluster.local").
     * Absent in documents of older controllers: the proxy then refuses every
     * tunnel to and from other clusters (never plaintext).
     */
    clustersetBundle: z.array(z.string().min(1)).optional(),
    peers: z.array(Name).optional(),
  })
  .strict();
export type MulticlusterPart = z.infer<typeof MulticlusterSchema>;

/**
 * `ingress`: the mesh's Gateways (src/gateway/schema.ts), the same for every
 * node (each serves those whose `nodes` names it or is null). Optional like
 * `trust`: absent in documents of older controllers, read as no Gateways.
 * `egressPolicies`: the mesh's Egress objects (src/egress/), absent when none.
 */
export const GlobalPartSchema = z.object({ mesh: MeshSchema, proxies: z.array(ProxyPeerSchema), trust: TrustSchema.optional(), ingress: IngressSchema.optional(), egressPolicies: z.array(EgressPolicySchema).optional(), multicluster: MulticlusterSchema.optional(), resilience: ResilienceSchema.optional() }).strict();
export type GlobalPart = z.infer<typeof GlobalPartSchema>;

export const NodePartSchema = z
  .object({
    node: z
      .object({
        name: Name,
        addresses: z.array(Ip),
        /** Value of the Node label flomesh.io/interception-mode; null when unset. */
        interceptionMode: InterceptionModeSchema.nullable(),
        /**
         * Namespaces the mesh monitors: the CNI plugin enrols a new pod of these at
         * creation, before the policy names it (src/cni/). Absent from older
         * controllers: the agent then goes by the namespaces of the pods it knows.
         */
        monitoredNamespaces: z.array(Name).optional(),
        /** "namespace/name" of this node's pods in monitored namespaces that opted out (never enrolled at creation). */
        optedOutPods: z.array(z.string().min(3)).optional(),
      })
      .strict(),
    pods: z.array(PolicyPodSchema),
    access: z.array(AccessSchema),
  })
  .strict();
export type NodePart = z.infer<typeof NodePartSchema>;

export const ServicesPartSchema = z.object({ services: z.array(PolicyServiceSchema), splits: z.array(SplitSchema) }).strict();
export type ServicesPart = z.infer<typeof ServicesPartSchema>;

export const NodePolicySchema = z
  .object({
    apiVersion: z.literal(POLICY_API_VERSION),
    kind: z.literal('NodePolicy'),
    /** Content hash of everything else: equal content, equal version, on every replica. */
    version: z.string().regex(/^[0-9a-f]{16,64}$/),
  })
  .merge(GlobalPartSchema)
  .merge(MeshPodsPartSchema)
  .merge(NodePartSchema)
  .merge(ServicesPartSchema)
  .strict();
export type NodePolicy = z.infer<typeof NodePolicySchema>;

/**
 * A NodePolicyDelta turns the policy of version `base` into version `version`
 * (docs/controller.md "Deltas"). Parts that did not change are absent; a
 * changed singleton part comes whole; services and splits come as the ones
 * set (added or changed, whole) and the keys (ns/name) removed; mesh pods as
 * whole per-node slices. `counts` are the sizes after applying: a client whose
 * result differs drops the delta and asks for the full policy.
 */
const KeyedChanges = <T extends z.ZodTypeAny>(item: T) => z.object({ set: z.array(item), remove: z.array(z.string().min(1)) }).strict();
const Version = NodePolicySchema.shape.version;

export const NodePolicyDeltaSchema = z
  .object({
    apiVersion: z.literal(POLICY_API_VERSION),
    kind: z.literal('NodePolicyDelta'),
    base: Version,
    version: Version,
    counts: z.object({ services: z.number().int().min(0), splits: z.number().int().min(0), meshPods: z.number().int().min(0) }).strict(),
    mesh: MeshSchema.optional(),
    proxies: GlobalPartSchema.shape.proxies.optional(),
    trust: TrustSchema.optional(),
    resilience: ResilienceSchema.optional(),
    multicluster: MulticlusterSchema.optional(),
    ingress: IngressSchema.optional(),
    egressPolicies: z.array(EgressPolicySchema).optional(),
    node: NodePartSchema.shape.node.optional(),
    pods: NodePartSchema.shape.pods.optional(),
    access: NodePartSchema.shape.access.optional(),
    services: KeyedChanges(PolicyServiceSchema).optional(),
    splits: KeyedChanges(SplitSchema).optional(),
    /** Node name -> that node's mesh pods, replacing its slice (an absent node keeps its slice). */
    meshPods: z.object({ set: z.record(Name, z.array(MeshPodSchema)), remove: z.array(Name) }).strict().optional(),
  })
  .strict();
export type NodePolicyDelta = z.infer<typeof NodePolicyDeltaSchema>;

/** zod issues as "path: message" lines, the path in the dotted/indexed form of kubectl explain. */
export function formatIssues(error: z.ZodError, max = 3): string {
  const lines = error.issues.slice(0, max).map((i) => `${formatPath(i.path)}: ${i.message}`);
  if (error.issues.length > max) lines.push(`(${error.issues.length - max} more)`);
  return lines.join('; ');
}

export function formatPath(path: (string | number)[]): string {
  let out = '';
  for (const p of path) out += typeof p === 'number' ? `[${p}]` : out === '' ? p : `.${p}`;
  return out || '(root)';
}

/**
 * What an agent reports about its interception mode (POST /v1/nodes/:node/status):
 * the controller turns a fallback or a node without a working mode into an Event
 * on the Node. Reasons are the agent's own text (src/agent/mode.ts).
 */
export const NodeModeStatusSchema = z
  .object({
    ready: z.boolean(),
    desired: InterceptionModeSchema,
    /** Undefined when no mode works. */
    effective: z.enum(['ebpf', 'iptables']).optional(),
    /** Why effective differs from desired. */
    fallbackReason: z.string().max(1024).optional(),
    /** Why no mode works (ready false). */
    reason: z.string().max(1024).optional(),
    /**
     * Local identities failing closed: their certificate expired without
     * renewal (src/identity/agent-certs.ts). Sent only when non-empty, so a
     * controller older than the field still accepts the usual reports.
     */
    expiredIdentities: z.array(IdentitySchema.extend({ reason: z.string().max(1024) }).strict()).max(256).optional(),
  })
  .strict();
export type NodeModeStatus = z.infer<typeof NodeModeStatusSchema>;
