import { isIPv4, isIPv6 } from 'node:net';

/** FSM's names for enrolment and exclusions (../shared/design/pipy-notes.md), plus ours. */
export const LABEL_MONITORED_BY = 'flomesh.io/monitored-by';
export const ANNOTATION_SIDECAR_INJECTION = 'flomesh.io/sidecar-injection';
export const ANNOTATION_INBOUND_PORT_EXCLUSION = 'flomesh.io/inbound-port-exclusion-list';
export const ANNOTATION_OUTBOUND_PORT_EXCLUSION = 'flomesh.io/outbound-port-exclusion-list';
export const ANNOTATION_OUTBOUND_IP_EXCLUSION = 'flomesh.io/outbound-ip-range-exclusion-list';
export const ANNOTATION_OUTBOUND_IP_INCLUSION = 'flomesh.io/outbound-ip-range-inclusion-list';
export const LABEL_INTERCEPTION_MODE = 'flomesh.io/interception-mode';
/** Nodes whose proxies take tunnels from other clusters of the clusterset (src/multicluster). */
export const LABEL_MULTICLUSTER_GATEWAY = 'multicluster.fsm-node.io/gateway';
/** Lab only: the pod's cgroup v2 path, given directly because lab pods are not kubelet's. */
export const ANNOTATION_LAB_CGROUP = 'lab.fsm-node.io/cgroup';

export const MESH_CONFIG_NAME = 'fsm-mesh-config';
export const DEFAULT_CONTROLLER_NAMESPACE = 'fsm-system';

/** A list value failed to parse: `item` is the offending element, `why` says what is wrong. */
export class ListParseError extends Error {
  constructor(
    readonly item: string,
    readonly why: string,
  ) {
    super(`${JSON.stringify(item)} ${why}`);
  }
}

function items(value: string): string[] {
  return value
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
}

/** "80, 443" -> [80, 443]; throws ListParseError naming the first bad item. Sorted, deduplicated. */
export function parsePortList(value: string): number[] {
  const ports = new Set<number>();
  for (const item of items(value)) {
    if (!/^\d{1,5}$/.test(item)) throw new ListParseError(item, 'is not a port number');
    const port = Number(item);
    if (port < 1 || port > 65535) throw new ListParseError(item, 'is outside 1-65535');
    ports.add(port);
  }
  return [...ports].sort((a, b) => a - b);
}

/** "10.0.0.0/8, 192.168.1.1" -> CIDRs (a bare address becomes /32 or /128). Sorted, deduplicated. */
export function parseCidrList(value: string): string[] {
  const cidrs = new Set<string>();
  for (const item of items(value)) cidrs.add(parseCidr(item));
  return [...cidrs].sort();
}

function parseCidr(item: string): string {
  const [addr = '', prefix, extra] = item.split('/');
  if (extra !== undefined) throw new ListParseError(item, 'is not a CIDR');
  const max = isIPv4(addr) ? 32 : isIPv6(addr) ? 128 : 0;
  if (max === 0) throw new ListParseError(item, 'does not start with an IP address');
  if (prefix === undefined) return `${addr}/${max}`;
  if (!/^\d{1,3}$/.test(prefix) || Number(prefix) > max) throw new ListParseError(item, `has a prefix length outside 0-${max}`);
  return `${addr}/${Number(prefix)}`;
}
