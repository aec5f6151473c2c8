import { InvalidInputError } from '../../errors.js';
import { cidrText, parseCidr, parseIPv4, type Cidr } from '../iptables/ipv4.js';
import type { DesiredState, Exclusions } from '../types.js';
import { UID_LEN } from './abi.js';

/**
 * Check a whole DesiredState before anything touches the kernel and bring it
 * into canonical form (addresses as numbers, CIDRs with host bits masked,
 * lists sorted and deduplicated). The first fault throws InvalidInputError
 * naming the field path and the value (`pods[3].exclusions.outboundCidrs[0]`).
 * Pure: whether cgroup paths exist is checked when they are resolved.
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
  cgroupPath: string;
  strict: boolean;
  exclusions: NormalExclusions;
}

export interface NormalState {
  proxy: { address: number; outboundPort: number; inboundPort: number; cgroupPath: string };
  nodeAddresses: number[];
  proxySources: Cidr[];
  mesh: NormalExclusions;
  /** Sorted by uid: rendering does not depend on the caller's order. */
  pods: NormalPod[];
}

/** A Kubernetes uid (a UUID) must fit the uid field of struct fsm_pod, NUL padded. */
const UID_PATTERN = new RegExp(`^[A-Za-z0-9][A-Za-z0-9._-]{0,${UID_LEN - 2}}$`);

function address(field: string, value: unknown): number {
  const parsed = typeof value === 'string' ? parseIPv4(value) : undefined;
  if (parsed === undefined) throw new InvalidInputError(field, value, 'not an IPv4 address (the eBPF dataplane has no IPv6 programs yet)');
  return parsed;
}

function cidr(field: string, value: unknown): Cidr {
  const parsed = typeof value === 'string' ? parseCidr(value) : undefined;
  if (parsed === undefined) throw new InvalidInputError(field, value, 'not an IPv4 address or CIDR a.b.c.d/n with n from 0 to 32');
  return parsed;
}

function port(field: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > 65535) {
    throw new InvalidInputError(field, value, 'not a TCP port (an integer from 1 to 65535)');
  }
  return value;
}

/** Absolute, no empty, "." or ".." segment, no trailing slash: what path.normalize leaves alone. */
const CANONICAL_PATH = /^(\/(?!\.\.?(\/|$))[^/\0]+)+$/;

function cgroupPath(field: string, value: unknown): string {
  if (typeof value !== 'string' || !CANONICAL_PATH.test(value)) {
    throw new InvalidInputError(field, value, 'must be the absolute, normalised path of a cgroup v2 directory');
  }
  return value;
}

function list<T>(field: string, value: unknown, item: (field: string, v: unknown) => T): T[] {
  if (!Array.isArray(value)) throw new InvalidInputError(field, value, 'must be a list');
  return value.map((v, i) => item(`${field}[${i}]`, v));
}

function uniquePorts(ports: number[]): number[] {
  if (ports.length < 2) return ports;
  return [...new Set(ports)].sort((a, b) => a - b);
}

function uniqueCidrs(cidrs: Cidr[]): Cidr[] {
  if (cidrs.length < 2) return cidrs;
  const byText = new Map(cidrs.map((c) => [cidrText(c), c]));
  return [...byText.values()].sort((a, b) => a.network - b.network || a.prefix - b.prefix);
}

function exclusions(field: string, value: unknown): NormalExclusions {
  if (typeof value !== 'object' || value === null) throw new InvalidInputError(field, value, 'must be an object');
  const ex = value as Partial<Exclusions>;
  return {
    outboundPorts: uniquePorts(list(`${field}.outboundPorts`, ex.outboundPorts ?? [], port)),
    outboundCidrs: uniqueCidrs(list(`${field}.outboundCidrs`, ex.outboundCidrs ?? [], cidr)),
    outboundIncludeCidrs: uniqueCidrs(list(`${field}.outboundIncludeCidrs`, ex.outboundIncludeCidrs ?? [], cidr)),
    inboundPorts: uniquePorts(list(`${field}.inboundPorts`, ex.inboundPorts ?? [], port)),
  };
}

function pod(field: string, value: unknown): NormalPod {
  if (typeof value !== 'object' || value === null) throw new InvalidInputError(field, value, 'must be an object');
  const p = value as Partial<DesiredState['pods'][number]>;
  if (typeof p.uid !== 'string' || !UID_PATTERN.test(p.uid)) {
    throw new InvalidInputError(`${field}.uid`, p.uid, `must be 1-${UID_LEN - 1} characters of letters, digits, ".", "_" and "-" (a Kubernetes uid)`);
  }
  if (p.inbound !== 'strict' && p.inbound !== 'permissive') throw new InvalidInputError(`${field}.inbound`, p.inbound, 'must be "strict" or "permissive"');
  return {
    uid: p.uid,
    ip: address(`${field}.ip`, p.ip),
    cgroupPath: cgroupPath(`${field}.cgroupPath`, p.cgroupPath),
    strict: p.inbound === 'strict',
    exclusions: exclusions(`${field}.exclusions`, p.exclusions),
  };
}

export function validateDesired(desired: DesiredState): NormalState {
  if (typeof desired !== 'object' || desired === null) throw new InvalidInputError('desired state', desired, 'must be an object');
  const proxy = desired.proxy as Partial<DesiredState['proxy']> | undefined;
  if (typeof proxy !== 'object' || proxy === null) throw new InvalidInputError('proxy', proxy, 'must be an object');
  const proxyAddress = address('proxy.address', proxy.address);
  if (proxyAddress >>> 24 === 127 || proxyAddress === 0) {
    throw new InvalidInputError('proxy.address', proxy.address, 'must be a node address that pods can reach, not loopback or 0.0.0.0');
  }
  const normal: NormalState = {
    proxy: {
      address: proxyAddress,
      outboundPort: port('proxy.outboundPort', proxy.outboundPort),
      inboundPort: port('proxy.inboundPort', proxy.inboundPort),
      cgroupPath: cgroupPath('proxy.cgroupPath', proxy.cgroupPath),
    },
    nodeAddresses: [...new Set(list('nodeAddresses', desired.nodeAddresses, address))].sort((a, b) => a - b),
    proxySources: uniqueCidrs(list('proxySources', desired.proxySources, cidr)),
    mesh: exclusions('mesh', desired.mesh),
    pods: list('pods', desired.pods, pod),
  };
  const firstUse = new Map<string, number>();
  const unique = (i: number, field: 'uid' | 'ip' | 'cgroupPath', key: string, shown: unknown): void => {
    const other = firstUse.get(`${field}:${key}`);
    if (other !== undefined) throw new InvalidInputError(`pods[${i}].${field}`, shown, `also used by pods[${other}]`);
    firstUse.set(`${field}:${key}`, i);
  };
  normal.pods.forEach((p, i) => {
    unique(i, 'uid', p.uid, p.uid);
    unique(i, 'ip', String(p.ip), desired.pods[i]?.ip);
    unique(i, 'cgroupPath', p.cgroupPath, p.cgroupPath);
    if (p.cgroupPath === normal.proxy.cgroupPath) {
      throw new InvalidInputError(`pods[${i}].cgroupPath`, p.cgroupPath, "is the proxy's cgroup: the proxy's sockets must never be intercepted");
    }
  });
  normal.pods.sort((a, b) => (a.uid < b.uid ? -1 : a.uid > b.uid ? 1 : 0));
  return normal;
}

function sameList<T>(a: readonly T[], b: readonly T[], eq: (x: T, y: T) => boolean): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (!eq(a[i]!, b[i]!)) return false;
  return true;
}

const sameNumber = (x: number, y: number): boolean => x === y;
const sameCidr = (x: Cidr, y: Cidr): boolean => x.network === y.network && x.prefix === y.prefix;

/** Field by field (both canonical): whether a pod's map entries would render the same. */
export function samePod(a: NormalPod, b: NormalPod): boolean {
  return (
    a.uid === b.uid &&
    a.ip === b.ip &&
    a.cgroupPath === b.cgroupPath &&
    a.strict === b.strict &&
    sameList(a.exclusions.outboundPorts, b.exclusions.outboundPorts, sameNumber) &&
    sameList(a.exclusions.inboundPorts, b.exclusions.inboundPorts, sameNumber) &&
    sameList(a.exclusions.outboundCidrs, b.exclusions.outboundCidrs, sameCidr) &&
    sameList(a.exclusions.outboundIncludeCidrs, b.exclusions.outboundIncludeCidrs, sameCidr)
  );
}
