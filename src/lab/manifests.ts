import { stringify } from 'yaml';
import { manifestUid } from '../policy/objects.js';
import {
  ANNOTATION_LAB_CGROUP,
  DEFAULT_CONTROLLER_NAMESPACE,
  LABEL_MONITORED_BY,
  MESH_CONFIG_NAME,
} from '../policy/fsm.js';
import { mqttLabObjects } from './mqtt-lab.js';

/**
 * The lab's example mesh as Kubernetes manifests, one file per concern (and
 * one per pod, so removing a pod is removing a file). Pure: the lab layout
 * comes in, file name -> YAML text goes out. The controller watches the
 * directory these land in, so editing them changes the mesh live.
 *
 * What the example holds:
 * - mesh ConfigMap (trafficPolicy smi: only TrafficTargets open a path);
 * - namespace `demo`, monitored by the mesh;
 * - one Node per lab node (InternalIP = its underlay address);
 * - one Pod per lab pod: app=echo, version v1/v2 alternating on each node,
 *   service account = pod name, the lab cgroup annotation;
 * - Services echo (all pods), echo-v1, echo-v2 and a TrafficSplit of echo
 *   80/20 over them;
 * - a canary: requests for /canary and below go to echo-v2 only (a v1alpha4
 *   TrafficSplit with HTTPRouteGroup matches; every other request keeps the 80/20);
 * - one TrafficTarget per pod allowing every other pod except one denied pair
 *   (the last pod may not call the first);
 * - MQTT (src/lab/mqtt-lab.ts): the first pod runs a broker; the others may
 *   publish under devices/<their service account>/ and subscribe to devices/#.
 */

export const LAB_NAMESPACE = 'demo';
export const LAB_MESH_NAME = 'fsmlab';
export const ECHO_PORT = 8080;
export const SPLIT_WEIGHTS = { 'echo-v1': 80, 'echo-v2': 20 } as const;
/** Requests whose path is CANARY.path or below it go to CANARY.backend only. */
export const CANARY = { path: '/canary', backend: 'echo-v2' } as const;

export interface ManifestNode {
  name: string;
  /** The node's address as other nodes see it (Node.status.addresses InternalIP). */
  address: string;
}

export interface ManifestPod {
  name: string;
  node: string;
  ip: string;
  cgroupPath: string;
  version: 'v1' | 'v2';
}

export interface ManifestInput {
  mode: 'auto' | 'ebpf' | 'iptables';
  nodes: ManifestNode[];
  pods: ManifestPod[];
}

export interface LabService {
  name: string;
  clusterIP: string;
  selector: Record<string, string>;
}

/** The services of the example; cluster IPs are only meaningful to a proxy that routes services (Pipy). */
export const LAB_SERVICES: readonly LabService[] = [
  { name: 'echo', clusterIP: '10.96.0.10', selector: { app: 'echo' } },
  { name: 'echo-v1', clusterIP: '10.96.0.11', selector: { app: 'echo', version: 'v1' } },
  { name: 'echo-v2', clusterIP: '10.96.0.12', selector: { app: 'echo', version: 'v2' } },
];

/** The pair the example denies: the last pod may not call the first (cross-node when there are several nodes). */
export function deniedPair(pods: readonly { name: string }[]): { from: string; to: string } | undefined {
  if (pods.length < 2) return undefined;
  return { from: pods[pods.length - 1]!.name, to: pods[0]!.name };
}

/** v1 for a node's 1st, 3rd ... pod, v2 for its 2nd, 4th ...: both versions on every node when it has two pods. */
export function podVersion(indexOnNode: number): 'v1' | 'v2' {
  return indexOnNode % 2 === 0 ? 'v1' : 'v2';
}

const docs = (objects: unknown[]): string => objects.map((o) => stringify(o)).join('---\n');

function meshConfig(mode: ManifestInput['mode']): unknown {
  return {
    apiVersion: 'v1',
    kind: 'ConfigMap',
    metadata: { name: MESH_CONFIG_NAME, namespace: DEFAULT_CONTROLLER_NAMESPACE },
    data: { meshName: LAB_MESH_NAME, interceptionMode: mode, trafficPolicy: 'smi', inbound: 'permissive', egress: 'allow' },
  };
}

function nodeObject(n: ManifestNode): unknown {
  return { apiVersion: 'v1', kind: 'Node', metadata: { name: n.name }, status: { addresses: [{ type: 'InternalIP', address: n.address }] } };
}

export function podObject(p: ManifestPod): unknown {
  return {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: {
      name: p.name,
      namespace: LAB_NAMESPACE,
      uid: manifestUid(LAB_NAMESPACE, p.name),
      labels: { app: 'echo', version: p.version },
      annotations: { [ANNOTATION_LAB_CGROUP]: p.cgroupPath },
    },
    spec: {
      nodeName: p.node,
      serviceAccountName: p.name,
      containers: [{ name: 'echo', ports: [{ name: 'http', containerPort: ECHO_PORT }] }],
    },
    status: { phase: 'Running', podIP: p.ip },
  };
}

export function serviceObject(s: LabService): unknown {
  return {
    apiVersion: 'v1',
    kind: 'Service',
    metadata: { name: s.name, namespace: LAB_NAMESPACE },
    spec: { selector: s.selector, clusterIP: s.clusterIP, ports: [{ name: 'http', port: ECHO_PORT, targetPort: ECHO_PORT, appProtocol: 'http' }] },
  };
}

function splitObject(): unknown {
  return {
    apiVersion: 'split.smi-spec.io/v1alpha2',
    kind: 'TrafficSplit',
    metadata: { name: 'echo-split', namespace: LAB_NAMESPACE },
    spec: { service: 'echo', backends: Object.entries(SPLIT_WEIGHTS).map(([service, weight]) => ({ service, weight })) },
  };
}

function canaryObjects(): unknown[] {
  const group = {
    apiVersion: 'specs.smi-spec.io/v1alpha4',
    kind: 'HTTPRouteGroup',
    metadata: { name: 'echo-canary', namespace: LAB_NAMESPACE },
    spec: { matches: [{ name: 'canary-path', pathRegex: `${CANARY.path}(/.*)?` }] },
  };
  const split = {
    apiVersion: 'split.smi-spec.io/v1alpha4',
    kind: 'TrafficSplit',
    metadata: { name: 'echo-canary', namespace: LAB_NAMESPACE },
    spec: {
      service: 'echo',
      matches: [{ apiGroup: 'specs.smi-spec.io', kind: 'HTTPRouteGroup', name: 'echo-canary' }],
      backends: [{ service: CANARY.backend, weight: 100 }],
    },
  };
  return [group, split];
}

function accessObjects(pods: readonly ManifestPod[]): unknown[] {
  const denied = deniedPair(pods);
  const route = { apiVersion: 'specs.smi-spec.io/v1alpha4', kind: 'TCPRoute', metadata: { name: 'echo-tcp', namespace: LAB_NAMESPACE }, spec: { matches: { ports: [ECHO_PORT] } } };
  const targets = pods.flatMap((to) => {
    // Every pod may reach every pod, itself included (a service it calls may pick its own pod), but the denied pair.
    const sources = pods.filter((from) => !(denied?.from === from.name && denied.to === to.name));
    if (sources.length === 0) return [];
    return [
      {
        apiVersion: 'access.smi-spec.io/v1alpha3',
        kind: 'TrafficTarget',
        metadata: { name: `to-${to.name}`, namespace: LAB_NAMESPACE },
        spec: {
          destination: { kind: 'ServiceAccount', name: to.name, namespace: LAB_NAMESPACE },
          sources: sources.map((s) => ({ kind: 'ServiceAccount', name: s.name, namespace: LAB_NAMESPACE })),
          rules: [{ kind: 'TCPRoute', name: 'echo-tcp' }],
        },
      },
    ];
  });
  return [route, ...targets];
}

/** File name (relative to the manifest directory) -> YAML. */
export function renderManifests(input: ManifestInput): Map<string, string> {
  const files = new Map<string, string>();
  files.set('00-mesh-config.yaml', docs([meshConfig(input.mode)]));
  files.set('10-nodes.yaml', docs(input.nodes.map(nodeObject)));
  files.set('20-namespace.yaml', docs([{ apiVersion: 'v1', kind: 'Namespace', metadata: { name: LAB_NAMESPACE, labels: { [LABEL_MONITORED_BY]: LAB_MESH_NAME } } }]));
  for (const p of input.pods) files.set(`pods/${p.name}.yaml`, docs([podObject(p)]));
  files.set('40-services.yaml', docs(LAB_SERVICES.map(serviceObject)));
  files.set('50-split.yaml', docs([splitObject()]));
  files.set('55-canary.yaml', docs(canaryObjects()));
  files.set('60-access.yaml', docs(accessObjects(input.pods)));
  const mqtt = mqttLabObjects(input.pods);
  if (mqtt.length > 0) files.set('70-mqtt.yaml', docs(mqtt));
  return files;
}
