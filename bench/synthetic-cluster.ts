import { LABEL_MONITORED_BY, MESH_CONFIG_NAME } from '../src/policy/fsm.js';
import { intFlag } from './util.js';

/**
 * A synthetic cluster as plain Kubernetes objects, for the compile and
 * propagation benches: namespaces in the mesh, services with one
 * EndpointSlice each, pods spread over nodes, a TrafficSplit per 10 services,
 * a TrafficTarget per 4 services and one HTTPRouteGroup per namespace.
 */
export interface ClusterShape {
  nodes: number;
  pods: number;
  services: number;
  namespaces: number;
  trafficPolicy: 'permissive' | 'smi';
}

export type K8sObject = { apiVersion: string; kind: string; metadata: Record<string, unknown>; [k: string]: unknown };

const ip = (base: number, i: number): string => `${base}.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`;

export function nodeName(i: number): string {
  return `node-${i}`;
}

/** The shape the benches take from --nodes, --pods, --services and --namespaces (defaults: the 10k-pod cluster). */
export function shapeFlags(flags: Record<string, string | boolean>): Omit<ClusterShape, 'trafficPolicy'> {
  return {
    nodes: intFlag(flags, 'nodes', 100),
    pods: intFlag(flags, 'pods', 10_000),
    services: intFlag(flags, 'services', 2000),
    namespaces: intFlag(flags, 'namespaces', 20),
  };
}

/** Namespace of service `svc`: services fill namespaces in blocks. */
function namespaceOf(shape: ClusterShape, svc: number): string {
  return `ns-${Math.floor(svc / Math.ceil(shape.services / shape.namespaces))}`;
}

/**
 * The objects of one change, sample by sample, the same whether a bench feeds
 * them to a compiler or writes them to a manifest directory: a new endpoint
 * port on a service, a new split weight, a pod more (pod `p` backs service
 * p % services and runs on node p % nodes).
 */
export function syntheticChanges(shape: ClusterShape) {
  const nsOf = (svc: number) => namespaceOf(shape, svc);
  const podsOf = (svc: number) => Array.from({ length: Math.ceil(shape.pods / shape.services) }, (_, k) => svc + k * shape.services).filter((p) => p < shape.pods);
  return {
    endpointPort(i: number): { svc: number; slice: K8sObject } {
      const svc = (i * 37) % shape.services;
      return { svc, slice: endpointSlice(svc, nsOf(svc), podsOf(svc), shape.nodes, 9000 + i) };
    },
    splitWeight(i: number): K8sObject {
      const s = ((i * 7) % Math.floor(shape.services / 10)) * 10;
      return {
        apiVersion: 'split.smi-spec.io/v1alpha2',
        kind: 'TrafficSplit',
        metadata: { name: `split-${s}`, namespace: nsOf(s) },
        spec: { service: `svc-${s}`, backends: [{ service: `svc-${s + 1}`, weight: 50 + i }, { service: `svc-${s + 2}`, weight: 50 }] },
      };
    },
    pod(p: number): K8sObject {
      const svc = p % shape.services;
      return pod(p, svc, nsOf(svc), `sa-${svc}`, shape.nodes);
    },
  };
}

export function syntheticCluster(shape: ClusterShape): K8sObject[] {
  const out: K8sObject[] = [];
  const nsOf = (svc: number) => namespaceOf(shape, svc);
  const svcName = (svc: number) => `svc-${svc}`;
  const saOf = (svc: number) => `sa-${svc}`;

  out.push({
    apiVersion: 'v1',
    kind: 'ConfigMap',
    metadata: { name: MESH_CONFIG_NAME, namespace: 'fsm-system' },
    data: { meshName: 'fsm', trafficPolicy: shape.trafficPolicy },
  });
  for (let n = 0; n < shape.namespaces; n++) {
    out.push({ apiVersion: 'v1', kind: 'Namespace', metadata: { name: `ns-${n}`, labels: { [LABEL_MONITORED_BY]: 'fsm' } } });
    out.push({
      apiVersion: 'specs.smi-spec.io/v1alpha4',
      kind: 'HTTPRouteGroup',
      metadata: { name: 'routes', namespace: `ns-${n}` },
      spec: { matches: [{ name: 'api', pathRegex: '/api/.*', methods: ['GET', 'POST'] }, { name: 'all', pathRegex: '.*' }] },
    });
  }
  for (let n = 0; n < shape.nodes; n++) {
    out.push({
      apiVersion: 'v1',
      kind: 'Node',
      metadata: { name: nodeName(n), labels: n % 3 === 0 ? { 'flomesh.io/interception-mode': 'ebpf' } : {} },
      status: { addresses: [{ type: 'InternalIP', address: ip(192, n + 1) }] },
    });
  }
  const podsOf = new Map<number, number[]>();
  for (let p = 0; p < shape.pods; p++) {
    const svc = p % shape.services;
    podsOf.set(svc, [...(podsOf.get(svc) ?? []), p]);
    out.push(pod(p, svc, nsOf(svc), saOf(svc), shape.nodes));
  }
  for (let s = 0; s < shape.services; s++) {
    const ns = nsOf(s);
    out.push({
      apiVersion: 'v1',
      kind: 'Service',
      metadata: { name: svcName(s), namespace: ns },
      spec: { clusterIP: ip(172, s + 1), selector: { app: svcName(s) }, ports: [{ name: 'http', port: 80, targetPort: 8080 }] },
    });
    out.push(endpointSlice(s, ns, podsOf.get(s) ?? [], shape.nodes));
    // Splits and targets stay inside one namespace block.
    if (s % 10 === 0 && s + 2 < shape.services && nsOf(s + 2) === ns) {
      out.push({
        apiVersion: 'split.smi-spec.io/v1alpha2',
        kind: 'TrafficSplit',
        metadata: { name: `split-${s}`, namespace: ns },
        spec: { service: svcName(s), backends: [{ service: svcName(s + 1), weight: 90 }, { service: svcName(s + 2), weight: 10 }] },
      });
    }
    if (s % 4 === 0 && s + 3 < shape.services && nsOf(s + 3) === ns) {
      out.push({
        apiVersion: 'access.smi-spec.io/v1alpha3',
        kind: 'TrafficTarget',
        metadata: { name: `target-${s}`, namespace: ns },
        spec: {
          destination: { kind: 'ServiceAccount', name: saOf(s), namespace: ns },
          sources: [1, 2, 3].map((d) => ({ kind: 'ServiceAccount', name: saOf(s + d), namespace: ns })),
          rules: [{ kind: 'HTTPRouteGroup', name: 'routes', matches: ['api'] }],
        },
      });
    }
  }
  return out;
}

export function pod(p: number, svc: number, ns: string, sa: string, nodes: number): K8sObject {
  return {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: {
      name: `pod-${p}`,
      namespace: ns,
      uid: `00000000-0000-4000-8000-${p.toString(16).padStart(12, '0')}`,
      labels: { app: `svc-${svc}` },
      annotations: p % 7 === 0 ? { 'flomesh.io/outbound-port-exclusion-list': '6379' } : {},
    },
    spec: { nodeName: nodeName(p % nodes), serviceAccountName: sa, containers: [{ ports: [{ name: 'http', containerPort: 8080 }] }] },
    status: { phase: 'Running', podIP: ip(10, p + 1), qosClass: 'Burstable' },
  };
}

export function endpointSlice(svc: number, ns: string, pods: number[], nodes: number, port = 8080): K8sObject {
  return {
    apiVersion: 'discovery.k8s.io/v1',
    kind: 'EndpointSlice',
    metadata: { name: `svc-${svc}-abcde`, namespace: ns, labels: { 'kubernetes.io/service-name': `svc-${svc}` } },
    addressType: 'IPv4',
    ports: [{ name: 'http', port, protocol: 'TCP' }],
    endpoints: pods.map((p) => ({
      addresses: [ip(10, p + 1)],
      conditions: { ready: true },
      nodeName: nodeName(p % nodes),
      targetRef: { kind: 'Pod', name: `pod-${p}`, namespace: ns },
    })),
  };
}
