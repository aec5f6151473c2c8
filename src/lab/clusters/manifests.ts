import { stringify } from 'yaml';
import { clusterTrustDomain, FSMN_MC_API_VERSION, MCS_API_VERSION } from '../../multicluster/api.js';
import { tiersFor } from '../../multicluster/tiers.js';
import { DEFAULT_CONTROLLER_NAMESPACE, LABEL_MONITORED_BY, LABEL_MULTICLUSTER_GATEWAY, MESH_CONFIG_NAME } from '../../policy/fsm.js';
import { ECHO_PORT, LAB_MESH_NAME, LAB_NAMESPACE, LAB_SERVICES, podObject, serviceObject, type ManifestNode, type ManifestPod } from '../manifests.js';

/**
 * The example of a cluster lab, per cluster, pure (layout in, file name ->
 * YAML out), in two directories the cluster's controller watches:
 *
 * manifests/ (the mesh):
 * - mesh ConfigMap with the cluster's trust domain ("<cluster>.cluster.local")
 *   and trafficPolicy **permissive** (under smi, TrafficTargets would have to
 *   name the other clusters' sources by SPIFFE ID, docs/multicluster.md);
 * - namespace `demo`, monitored; one Node per lab node, the first two labelled
 *   as clusterset gateways (`multicluster.fsm-node.io/gateway=true`); one Pod
 *   per lab pod (app=echo); Service `echo` (10.96.0.10:8080) over the
 *   cluster's pods.
 *
 * multicluster/ (the clusterset objects):
 * - `exports.yaml`: ServiceExport demo/echo (c1's the oldest, so it wins
 *   conflicts, as the KEP says);
 * - `policy.yaml`: GlobalTrafficPolicy demo/echo, FailOver: this cluster
 *   first, then the others in order, so a failover is visible when the
 *   local pods go (lab check changes it and puts it back).
 */

export const CLUSTER_SERVICE = LAB_SERVICES[0]!;
export const EXPORTS_FILE = 'exports.yaml';
export const POLICY_FILE = 'policy.yaml';
/** How many nodes per cluster are labelled as gateways (the multicluster code wants at least two). */
export const GATEWAYS_PER_CLUSTER = 2;

export interface ClusterManifestInput {
  cluster: string;
  /** Every cluster id of the lab, in order (this one included). */
  clusters: string[];
  mode: 'auto' | 'ebpf' | 'iptables';
  nodes: ManifestNode[];
  pods: ManifestPod[];
}

export interface TrafficPolicySpec {
  mode: 'Locality' | 'ActiveActive' | 'FailOver';
  weights?: Record<string, number>;
  failOver?: string[];
}

const docs = (objects: unknown[]): string => objects.map((o) => stringify(o)).join('---\n');

/** The nodes labelled as gateways: the first GATEWAYS_PER_CLUSTER of the cluster (all when it has fewer). */
export function gatewayNodes(nodes: readonly { name: string }[]): string[] {
  return nodes.slice(0, GATEWAYS_PER_CLUSTER).map((n) => n.name);
}

export function renderClusterManifests(input: ClusterManifestInput): Map<string, string> {
  const gateways = new Set(gatewayNodes(input.nodes));
  const files = new Map<string, string>();
  files.set(
    '00-mesh-config.yaml',
    docs([
      {
        apiVersion: 'v1',
        kind: 'ConfigMap',
        metadata: { name: MESH_CONFIG_NAME, namespace: DEFAULT_CONTROLLER_NAMESPACE },
        // The cluster's own trust domain: other clusters' gateways verify its workloads by it (docs/multicluster.md).
        data: { meshName: LAB_MESH_NAME, interceptionMode: input.mode, trafficPolicy: 'permissive', inbound: 'permissive', egress: 'allow', trustDomain: clusterTrustDomain(input.cluster) },
      },
    ]),
  );
  files.set(
    '10-nodes.yaml',
    docs(
      input.nodes.map((n) => ({
        apiVersion: 'v1',
        kind: 'Node',
        metadata: { name: n.name, ...(gateways.has(n.name) ? { labels: { [LABEL_MULTICLUSTER_GATEWAY]: 'true' } } : {}) },
        status: { addresses: [{ type: 'InternalIP', address: n.address }] },
      })),
    ),
  );
  files.set('20-namespace.yaml', docs([{ apiVersion: 'v1', kind: 'Namespace', metadata: { name: LAB_NAMESPACE, labels: { [LABEL_MONITORED_BY]: LAB_MESH_NAME } } }]));
  for (const p of input.pods) files.set(`pods/${p.name}.yaml`, docs([podObject(p)]));
  files.set('40-services.yaml', docs([serviceObject(CLUSTER_SERVICE)]));
  return files;
}

/** The default policy of the demo: FailOver, this cluster first, then the others in lab order. */
export function defaultTrafficPolicy(cluster: string, clusters: readonly string[]): TrafficPolicySpec {
  return { mode: 'FailOver', failOver: clusters.filter((c) => c !== cluster) };
}

export function renderTrafficPolicy(spec: TrafficPolicySpec): string {
  return docs([{ apiVersion: FSMN_MC_API_VERSION, kind: 'GlobalTrafficPolicy', metadata: { name: CLUSTER_SERVICE.name, namespace: LAB_NAMESPACE }, spec }]);
}

/** multicluster/ of one cluster: the export of echo and its traffic policy. */
export function renderClusterMulticluster(input: Pick<ClusterManifestInput, 'cluster' | 'clusters'>): Map<string, string> {
  const k = input.clusters.indexOf(input.cluster);
  const exportDoc = {
    apiVersion: MCS_API_VERSION,
    kind: 'ServiceExport',
    // Export times in cluster order: the oldest export (c1's) decides conflicts.
    metadata: { name: CLUSTER_SERVICE.name, namespace: LAB_NAMESPACE, creationTimestamp: new Date(Date.UTC(2026, 0, 1, 0, 0, Math.max(0, k))).toISOString() },
  };
  return new Map([
    [EXPORTS_FILE, docs([exportDoc])],
    [POLICY_FILE, renderTrafficPolicy(defaultTrafficPolicy(input.cluster, input.clusters))],
  ]);
}

/** Expected tiers (cluster ids per tier) at `cluster` for a policy when every cluster exports: the controller's own rule (tiers.ts). */
export function expectedTiers(spec: TrafficPolicySpec, cluster: string, clusters: readonly string[]): string[][] {
  return tiersFor({ mode: spec.mode, weights: spec.weights ?? {}, failOver: spec.failOver ?? [] }, cluster, clusters).map((t) => t.map((m) => m.cluster));
}

export const CLUSTER_ECHO_PORT = ECHO_PORT;
