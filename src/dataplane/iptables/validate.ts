import { InvalidInputError } from '../../errors.js';
import type { DesiredState, Exclusions } from '../types.js';
import { cidrText, parseCidr, parseIPv4, type Cidr } from './ipv4.js';

/**
 * Check a whole DesiredState before anything touches the kernel and turn it
 * into the canonical form the renderer needs: addresses as numbers, CIDRs
 * with host bits masked, lists sorted and deduplicated. The first fault
 * throws an InvalidInputError naming the field path and the value, so a bad
 * annotation on one pod is reported as `pods[3].exclusions.outboundCidrs[0]`.
 */

export interface NormalExclusions {
  outboundPorts: number[];
  outboundCidrs: Cidr[];
  outboundIncludeCidrs: Cidr[];
  inboundPorts: number[];
}

export interface NormalPod {
  uid: string;
  ip: number;
  /** The address as given, already canonical (parseIPv4 refuses any other spelling). */
  ipText: string;
  strict: boolean;
  exclusions: NormalExclusions;
}

export interface NormalState {
  proxy: { address: number; outboundPort: number; inboundPort: number };
  nodeAddresses: number[];
  proxySources: Cidr[];
  mesh: NormalExclusions;
  /** In the caller's order; the renderer sorts where order shows in a rule. */
  pods: NormalPod[];
}

/** Kubernetes uids are UUIDs; the uid rides in an ipset comment, so keep it plain. */
const UID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

const NO_IPV6 = 'IPv6 is not supported by the iptables dataplane yet';

function address(field: string, value: unknown): number {
  const parsed = typeof value === 'string' ? parseIPv4(value) : undefined;
  if (parsed === undefined) throw new InvalidInputError(field, value, `not an IPv4 address${typeof value === 'string' && value.includes(':') ? ` (${NO_IPV6})` : ''}`);
  return parsed;
}

function cidr(field: string, value: unknown): Cidr {
  const parsed = typeof value === 'string' ? parseCidr(value) : undefined;
  if (parsed === undefined) {
    const why = typeof value === 'string' && value.includes(':') ? NO_IPV6 : 'not an IPv4 address or CIDR a.b.c.d/n with n from 0 to 32';
    throw new InvalidInputError(field, value, why);
  }
  return parsed;
}

function port(field: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > 65535) {
    throw new InvalidInputError(field, value, 'not a TCP port (an integer from 1 to 65535)');
  }
  return value;
}

function list<T>(field: string, value: unknown, item: (field: string, v: unknown) => T): T[] {
  if (!Array.isArray(value)) throw new InvalidInputError(field, value, 'must be a list');
  return value.map((v, i) => item(`${field}[${i}]`, v));
}

/*
 * Exclusion lists are validated for every pod on every sync, so the common
 * shapes (absent, empty, one entry) avoid the Set/Map/sort machinery; field
 * names are built only when something is wrong.
 */
const NONE = Object.freeze([]) as unknown as never[];

function ports(field: string, value: unknown): number[] {
  if (value === undefined || (Array.isArray(value) && value.length === 0)) return NONE;
  if (!Array.isArray(value)) throw new InvalidInputError(field, value, 'must be a list');
  for (let i = 0; i < value.length; i++) {
    const v: unknown = value[i];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > 65535) port(`${field}[${i}]`, v);
  }
  // Always a copy: the set cache keeps these and must not see the caller mutate them.
  return value.length === 1 ? [value[0] as number] : [...new Set(value as number[])].sort((a, b) => a - b);
}

function cidrs(field: string, value: unknown): Cidr[] {
  if (value === undefined || (Array.isArray(value) && value.length === 0)) return NONE;
  const parsed = list(field, value, cidr);
  if (parsed.length === 1) return parsed;
  const byText = new Map(parsed.map((c) => [cidrText(c), c]));
  return [...byText.values()].sort((a, b) => a.network - b.network || a.prefix - b.prefix);
}

function exclusions(field: string, value: unknown): NormalExclusions {
  if (typeof value !== 'object' || value === null) throw new InvalidInputError(field, value, 'must be an object');
  const ex = value as Partial<Exclusions>;
  return {
    outboundPorts: ports(`${field}.outboundPorts`, ex.outboundPorts),
    outboundCidrs: cidrs(`${field}.outboundCidrs`, ex.outboundCidrs),
    outboundIncludeCidrs: cidrs(`${field}.outboundIncludeCidrs`, ex.outboundIncludeCidrs),
    inboundPorts: ports(`${field}.inboundPorts`, ex.inboundPorts),
  };
}

export function validateDesired(desired: DesiredState): NormalState {
  if (typeof desired !== 'object' || desired === null) throw new InvalidInputError('desired state', desired, 'must be an object');
  const proxy = desired.proxy;
  if (typeof proxy !== 'object' || proxy === null) throw new InvalidInputError('proxy', proxy, 'must be an object');
  const proxyAddress = address('proxy.address', proxy.address);
  if (proxyAddress >>> 24 === 127 || proxyAddress === 0) {
    // A DNAT from a pod's veth to loopback is dropped by the kernel (route_localnet is off).
    throw new InvalidInputError('proxy.address', proxy.address, 'must be a node address that pods can reach, not loopback or 0.0.0.0');
  }
  const normal: NormalState = {
    proxy: { address: proxyAddress, outboundPort: port('proxy.outboundPort', proxy.outboundPort), inboundPort: port('proxy.inboundPort', proxy.inboundPort) },
    nodeAddresses: [...new Set(list('nodeAddresses', desired.nodeAddresses, address))].sort((a, b) => a - b),
    proxySources: cidrs('proxySources', list('proxySources', desired.proxySources, (_f, v) => v)),
    mesh: exclusions('mesh', desired.mesh),
    pods: [],
  };
  const byUid = new Map<string, number>();
  const byIp = new Map<number, string>();
  if (!Array.isArray(desired.pods)) throw new InvalidInputError('pods', desired.pods, 'must be a list');
  for (let i = 0; i < desired.pods.length; i++) {
    const pod = desired.pods[i] as DesiredState['pods'][number];
    if (typeof pod !== 'object' || pod === null) throw new InvalidInputError(`pods[${i}]`, pod, 'must be an object');
    const field = `pods[${i}]`;
    if (typeof pod.uid !== 'string' || !UID_PATTERN.test(pod.uid)) {
      throw new InvalidInputError(`${field}.uid`, pod.uid, 'must be 1-128 characters of letters, digits, ".", "_" and "-" (a Kubernetes uid)');
    }
    if (byUid.has(pod.uid)) throw new InvalidInputError(`${field}.uid`, pod.uid, `duplicate: also pods[${byUid.get(pod.uid)}]`);
    const ip = address(`${field}.ip`, pod.ip);
    const other = byIp.get(ip);
    if (other !== undefined) throw new InvalidInputError(`${field}.ip`, pod.ip, `also the address of pod ${other}`);
    if (pod.inbound !== 'strict' && pod.inbound !== 'permissive') {
      throw new InvalidInputError(`${field}.inbound`, pod.inbound, 'must be "strict" or "permissive"');
    }
    byUid.set(pod.uid, i);
    byIp.set(ip, pod.uid);
    normal.pods.push({ uid: pod.uid, ip, ipText: pod.ip, strict: pod.inbound === 'strict', exclusions: exclusions(`${field}.exclusions`, pod.exclusions) });
  }
  return normal;
}

