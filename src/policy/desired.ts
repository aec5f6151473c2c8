import { existsSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import type { DesiredState, PodIntercept, ProxyTarget } from '../dataplane/types.js';
import type { NodePolicy, PolicyPod } from './schema.js';

/**
 * From the node's policy to the dataplane's input: the step that lets a
 * policy change be followed from the controller down to a BPF map entry or an
 * ipset member. Pure: the node facts (proxy, addresses, how to find a pod's
 * cgroup) come in as arguments.
 */
export interface NodeFacts {
  proxy: ProxyTarget;
  /** The node's own addresses: never redirected. */
  nodeAddresses: string[];
  /**
   * The pod's cgroup v2 directory, or undefined when it cannot be found. Such a
   * pod is left out of the desired state (the agent logs it and retries on its
   * next sync); kubelet creates the pod cgroup before the pod gets its IP, so
   * this only happens for a pod that is going away or a misdetected layout.
   */
  cgroupPathFor(pod: PolicyPod): string | undefined;
}

export function desiredState(policy: NodePolicy, node: NodeFacts): DesiredState {
  const proxySources = new Set<string>([node.proxy.address, ...node.nodeAddresses]);
  for (const p of policy.proxies) for (const a of p.addresses) proxySources.add(a);
  const pods: PodIntercept[] = [];
  for (const pod of policy.pods) {
    const cgroupPath = node.cgroupPathFor(pod);
    if (cgroupPath === undefined) continue;
    pods.push({
      uid: pod.uid,
      namespace: pod.namespace,
      name: pod.name,
      ip: pod.ip,
      cgroupPath,
      inbound: policy.mesh.inbound,
      exclusions: {
        outboundPorts: [...pod.exclusions.outboundPorts],
        outboundCidrs: [...pod.exclusions.outboundCidrs],
        outboundIncludeCidrs: [...pod.exclusions.outboundIncludeCidrs],
        inboundPorts: [...pod.exclusions.inboundPorts],
      },
    });
  }
  const m = policy.mesh.exclusions;
  return {
    proxy: { ...node.proxy },
    nodeAddresses: [...node.nodeAddresses],
    proxySources: [...proxySources].sort(),
    mesh: {
      outboundPorts: [...m.outboundPorts],
      outboundCidrs: [...m.outboundCidrs],
      outboundIncludeCidrs: [...m.outboundIncludeCidrs],
      inboundPorts: [...m.inboundPorts],
    },
    pods,
  };
}

/**
 * Where kubelet puts a pod's cgroup, relative to the cgroup v2 mount, for
 * both cgroup drivers (most specific first):
 *   systemd:  kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _ for ->.slice
 *             (Guaranteed pods sit directly under kubepods.slice: kubepods-pod<uid_>.slice)
 *   cgroupfs: kubepods/<qos>/pod<uid>   (Guaranteed: kubepods/pod<uid>)
 * When the QoS class is unknown every class is tried.
 */
export function kubepodsCandidates(uid: string, qosClass: PolicyPod['cgroup']['qosClass']): string[] {
  const classes = qosClass ? [qosClass] : (['Burstable', 'BestEffort', 'Guaranteed'] as const);
  const u = uid.replaceAll('-', '_');
  const out: string[] = [];
  for (const q of classes) {
    if (q === 'Guaranteed') out.push(`kubepods.slice/kubepods-pod${u}.slice`, `kubepods/pod${uid}`);
    else {
      const c = q.toLowerCase();
      out.push(`kubepods.slice/kubepods-${c}.slice/kubepods-${c}-pod${u}.slice`, `kubepods/${c}/pod${uid}`);
    }
  }
  return out;
}

/**
 * A cgroupPathFor for NodeFacts: the lab annotation (lab.fsm-node.io/cgroup)
 * wins, absolute or relative to the cgroup v2 mount; otherwise the first
 * kubepods candidate that exists under the mount.
 */
export function cgroupResolver(cgroupRoot: string, exists: (path: string) => boolean = existsSync): (pod: PolicyPod) => string | undefined {
  return (pod) => {
    if (pod.cgroup.path !== null) return isAbsolute(pod.cgroup.path) ? pod.cgroup.path : join(cgroupRoot, pod.cgroup.path);
    for (const rel of kubepodsCandidates(pod.uid, pod.cgroup.qosClass)) {
      const path = join(cgroupRoot, rel);
      if (exists(path)) return path;
    }
    return undefined;
  };
}
