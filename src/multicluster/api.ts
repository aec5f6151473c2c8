import { z } from 'zod';
import { InvalidInputError } from '../errors.js';
import { formatPath } from '../policy/schema.js';

/**
 * The multi-cluster API (docs/multicluster.md):
 *
 * - the Kubernetes MCS-API (KEP-1645), group multicluster.x-k8s.io/v1alpha1:
 *   a ServiceExport next to a Service marks it for the clusterset; the
 *   implementation (us) writes a ServiceImport into every cluster that has
 *   the namespace. Only the fields the KEP defines are read or written.
 * - this project's GlobalTrafficPolicy (multicluster.fsm-node.io/v1alpha1),
 *   one per imported service (same namespace and name as the ServiceImport):
 *   Locality (local endpoints only, the default), ActiveActive (weighted
 *   across clusters) or FailOver (local first, then other clusters in a
 *   stated order). The semantics follow FSM's policy of the same name.
 * - ClusterSet: how this cluster finds and trusts its peers (its own id, the
 *   peers' controller addresses, the clusterset CA). No kubeconfigs, no hub.
 *
 * Every parser here throws InvalidInputError naming the field and the value.
 */

export const MCS_GROUP = 'multicluster.x-k8s.io';
export const MCS_API_VERSION = `${MCS_GROUP}/v1alpha1`;
export const FSMN_MC_API_VERSION = 'multicluster.fsm-node.io/v1alpha1';

export { LABEL_MULTICLUSTER_GATEWAY as GATEWAY_LABEL } from '../policy/fsm.js';

/** A cluster id: an RFC 1123 DNS label (KEP-2149 ClusterProperty id.k8s.io is at most 128; MCS status.clusters wants a label). */
const CLUSTER_ID = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;
const DNS_LABEL = CLUSTER_ID;
const Name = z.string().regex(/^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/, 'must be a DNS subdomain (lower case a-z, 0-9, "-", ".")');
const Namespace = z.string().regex(DNS_LABEL, 'must be a DNS label');
const ClusterId = z.string().regex(CLUSTER_ID, 'must be a DNS label (lower case a-z, 0-9, "-", at most 63 characters)');
const Port = z.number().int().min(1).max(65535);

export const ImportTypeSchema = z.enum(['ClusterSetIP', 'Headless']);
export type ImportType = z.infer<typeof ImportTypeSchema>;

export const ImportPortSchema = z
  .object({
    name: z.string().default(''),
    protocol: z.enum(['TCP', 'UDP', 'SCTP']).default('TCP'),
    appProtocol: z.string().nullable().default(null),
    port: Port,
  })
  .strict();
export type ImportPort = z.infer<typeof ImportPortSchema>;

const Meta = z.object({ namespace: Namespace, name: Name, creationTimestamp: z.string().datetime({ offset: true }).optional() }).passthrough();

/** ServiceExport: spec carries nothing we act on (exportedLabels/Annotations are optional for implementations). */
export const ServiceExportSchema = z
  .object({
    apiVersion: z.literal(MCS_API_VERSION),
    kind: z.literal('ServiceExport'),
    metadata: Meta,
    spec: z.object({ exportedLabels: z.record(z.string()).optional(), exportedAnnotations: z.record(z.string()).optional() }).passthrough().optional(),
  })
  .passthrough();
export type ServiceExportObject = z.infer<typeof ServiceExportSchema>;

export const TrafficModeSchema = z.enum(['Locality', 'ActiveActive', 'FailOver']);
export type TrafficMode = z.infer<typeof TrafficModeSchema>;

export const GlobalTrafficPolicySpecSchema = z
  .object({
    mode: TrafficModeSchema.default('Locality'),
    /**
     * ActiveActive: the weight of each cluster (this one included) by id;
     * clusters not listed weigh 1, weight 0 takes a cluster out. FailOver:
     * ignored.
     */
    weights: z.record(ClusterId, z.number().int().min(0).max(10_000)).default({}),
    /**
     * FailOver: the other clusters in the order they are tried after the
     * local one. Clusters that export the service but are not listed come
     * last, by id, so a new site is never silently unreachable.
     */
    failOver: z.array(ClusterId).default([]),
  })
  .strict();
export type GlobalTrafficPolicySpec = z.infer<typeof GlobalTrafficPolicySpecSchema>;

export const GlobalTrafficPolicySchema = z
  .object({
    apiVersion: z.literal(FSMN_MC_API_VERSION),
    kind: z.literal('GlobalTrafficPolicy'),
    metadata: Meta,
    spec: GlobalTrafficPolicySpecSchema,
  })
  .passthrough();

export const DEFAULT_TRAFFIC_POLICY: GlobalTrafficPolicySpec = { mode: 'Locality', weights: {}, failOver: [] };

/** Default lease: edge uplinks fail for hours; a site's imports stay until it has been silent this long. */
export const DEFAULT_LEASE_MS = 24 * 3600_000;
export const DEFAULT_CLUSTERSET_CIDR = '241.0.0.0/16';

export const ClusterSetSchema = z
  .object({
    apiVersion: z.literal(FSMN_MC_API_VERSION),
    kind: z.literal('ClusterSet'),
    spec: z
      .object({
        /** This cluster's id, unique in the clusterset. */
        clusterId: ClusterId,
        /** The SPIFFE trust domain of this cluster's workloads; default `<clusterId>.cluster.local`. */
        trustDomain: z.string().min(1).max(253).optional(),
        /** host:port this controller serves its exports on (mutual TLS, peers only). */
        listen: z.string().default('0.0.0.0:15444'),
        /** The other clusters: id, and the https URL of their exports service. */
        peers: z.array(z.object({ clusterId: ClusterId, url: z.string().url() }).strict()).default([]),
        /** PEM files: the clusterset CA (trusted for peers) and this cluster's identity signed by it. */
        caFile: z.string().min(1),
        certFile: z.string().min(1),
        keyFile: z.string().min(1),
        /** Where ClusterSetIPs are allocated from (this cluster's own choice; IPv4). */
        clustersetCidr: z.string().default(DEFAULT_CLUSTERSET_CIDR),
        /** How long a silent peer's imports are kept, e.g. "24h". */
        lease: z.string().default('24h'),
        /** Port of the node proxies' listener for tunnels from other clusters (proxy/multicluster.js). */
        gatewayPort: Port.default(15005),
      })
      .strict(),
  })
  .strict();
export type ClusterSetConfig = z.infer<typeof ClusterSetSchema>['spec'];

/** Default trust domain of a cluster's workloads: distinct per cluster, so TrafficTargets can name other clusters' identities. */
export function clusterTrustDomain(clusterId: string): string {
  return `${clusterId}.cluster.local`;
}

function parse<T extends z.ZodTypeAny>(schema: T, obj: unknown, what: string): z.infer<T> {
  const r = schema.safeParse(obj);
  if (r.success) return r.data as z.infer<T>;
  const issue = r.error.issues[0]!;
  let value: unknown = obj;
  for (const p of issue.path) value = value !== null && typeof value === 'object' ? (value as Record<string | number, unknown>)[p] : undefined;
  throw new InvalidInputError(`${what}.${formatPath(issue.path)}`, value, issue.message);
}

export interface ServiceExportRec {
  namespace: string;
  name: string;
  /** When the export was created (the KEP's conflict tie-breaker); epoch ms. */
  createdMs: number;
}

export function parseServiceExport(obj: unknown): ServiceExportRec {
  const o = parse(ServiceExportSchema, obj, 'ServiceExport');
  const createdMs = o.metadata.creationTimestamp === undefined ? 0 : Date.parse(o.metadata.creationTimestamp);
  return { namespace: o.metadata.namespace, name: o.metadata.name, createdMs };
}

export interface TrafficPolicyRec {
  namespace: string;
  name: string;
  spec: GlobalTrafficPolicySpec;
}

export function parseGlobalTrafficPolicy(obj: unknown): TrafficPolicyRec {
  const o = parse(GlobalTrafficPolicySchema, obj, 'GlobalTrafficPolicy');
  const spec = o.spec;
  const seen = new Set<string>();
  spec.failOver.forEach((c, i) => {
    if (seen.has(c)) throw new InvalidInputError(`GlobalTrafficPolicy.spec.failOver[${i}]`, c, 'is listed twice');
    seen.add(c);
  });
  if (spec.mode === 'ActiveActive' && Object.keys(spec.weights).length > 0 && Object.values(spec.weights).every((w) => w === 0)) {
    throw new InvalidInputError('GlobalTrafficPolicy.spec.weights', spec.weights, 'every cluster has weight 0: nothing could be reached');
  }
  return { namespace: o.metadata.namespace, name: o.metadata.name, spec };
}

/** Duration "90s", "30m", "24h", "7d" -> ms. */
export function parseDuration(v: string, field: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/.exec(v.trim());
  if (!m) throw new InvalidInputError(field, v, 'expected a duration such as 90s, 30m, 24h or 7d');
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2] as 'ms' | 's' | 'm' | 'h' | 'd'];
  const ms = Number(m[1]) * unit;
  if (ms < 1000) throw new InvalidInputError(field, v, 'must be at least 1s');
  return ms;
}

export function parseClusterSet(obj: unknown): ClusterSetConfig & { leaseMs: number } {
  const spec = parse(ClusterSetSchema, obj, 'ClusterSet').spec;
  const ids = new Set<string>([spec.clusterId]);
  spec.peers.forEach((p, i) => {
    if (ids.has(p.clusterId)) {
      throw new InvalidInputError(`ClusterSet.spec.peers[${i}].clusterId`, p.clusterId, p.clusterId === spec.clusterId ? 'is this cluster' : 'is listed twice');
    }
    ids.add(p.clusterId);
    if (!p.url.startsWith('https://')) throw new InvalidInputError(`ClusterSet.spec.peers[${i}].url`, p.url, 'must be https:// (peers speak mutual TLS only)');
  });
  const cidr = z.string().cidr({ version: 'v4' }).safeParse(spec.clustersetCidr);
  if (!cidr.success) throw new InvalidInputError('ClusterSet.spec.clustersetCidr', spec.clustersetCidr, 'must be an IPv4 CIDR such as 241.0.0.0/16');
  return { ...spec, leaseMs: parseDuration(spec.lease, 'ClusterSet.spec.lease') };
}
