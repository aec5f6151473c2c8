import { InvalidInputError } from '../errors.js';
import { cidrText, parseCidr, parseIPv4, type Cidr } from '../util/ipv4.js';
import type { DesiredState, Exclusions } from './types.js';

/**
 * Check a whole DesiredState before anything touches the kernel and bring it
 * into the canonical form both dataplanes render from: addresses as numbers,
 * CIDRs with host bits masked, lists sorted and deduplicated. The first fault
 * throws InvalidInputError naming the field path and the value, so a bad
 * annotation on one pod is reported as `pods[3].exclusions.outboundCidrs[0]`.
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
  /** The address as given, already canonical (parseIPv4 refuses any other spelling). */
  ipText: string;
  /** Checked only when the dataplane keys pods by cgroup (ValidateOptions.cgroups). */
  cgroupPath: string;
  strict: boolean;
  exclusions: NormalExclusions;
}

export interface NormalState {
  proxy: { address: number; outboundPort: number; inboundPort: number; cgroupPath: string };
  nodeAddresses: number[];
  proxySources: Cidr[];
  mesh: NormalExclusions;
  /** In the caller's order. */
  pods: NormalPod[];
}

export interface ValidateOptions {
  /** Longest pod uid the dataplane can store. */
  uidMaxLength: number;
  /** Whether pods (and the proxy) are recognised by cgroup: then their cgroup paths must be valid and distinct. */
  cgroups: boolean;
  /** Said when an IPv6 address is refused: which dataplane lacks it. */
  noIpv6: string;
}

/** Absolute, no empty, "." or ".." segment, no trailing slash: what path.normalize leaves alone. */
const CANONICAL_PATH = /^(\/(?!\.\.?(\/|$))[^/\0]+)+$/;

/** Paths CANONICAL_PATH accepted before: the same pods' paths come back at every sync (bounded: cleared when full). */
const canonicalPaths = new Set<string>();
const CANONICAL_PATHS_MAX = 1 << 16;

/*
 * Exclusion lists are validated for every pod on every sync, so the common
 * shapes (absent, empty, one entry) avoid the Set/Map/sort machinery.
 */
const NONE = Object.freeze([]) as unknown as never[];

export function validateDesired(desired: DesiredState, opts: ValidateOptions): NormalState {
  const address = (field: string, value: unknown): number => {
    const parsed = typeof value === 'string' ? parseIPv4(value) : undefined;
    if (parsed === undefined) throw new InvalidInputError(field, value, `not an IPv4 address${typeof value === 'string' && value.includes(':') ? ` (${opts.noIpv6})` : ''}`);
    return parsed;
  };
  const cidr = (field: string, value: unknown): Cidr => {
    const parsed = typeof value === 'string' ? parseCidr(value) : undefined;
    if (parsed === undefined) {
      throw new InvalidInputError(field, value, typeof value === 'string' && value.includes(':') ? opts.noIpv6 : 'not an IPv4 address or CIDR a.b.c.d/n with n from 0 to 32');
    }
    return parsed;
  };
  const cgroupPath = (field: string, value: unknown): string => {
    if (!opts.cgroups) return typeof value === 'string' ? value : '';
    if (typeof value === 'string' && canonicalPaths.has(value)) return value;
    if (typeof value !== 'string' || !CANONICAL_PATH.test(value)) {
      throw new InvalidInputError(field, value, 'must be the absolute, normalised path of a cgroup v2 directory');
    }
    if (canonicalPaths.size >= CANONICAL_PATHS_MAX) canonicalPaths.clear();
    canonicalPaths.add(value);
    return value;
  };
  const uidPattern = new RegExp(`^[A-Za-z0-9][A-Za-z0-9._-]{0,${opts.uidMaxLength - 1}}$`);

  if (typeof desired !== 'object' || desired === null) throw new InvalidInputError('desired state', desired, 'must be an object');
  const proxy = desired.proxy as Partial<DesiredState['proxy']> | undefined;
  if (typeof proxy !== 'object' || proxy === null) throw new InvalidInputError('proxy', proxy, 'must be an object');
  const proxyAddress = address('proxy.address', proxy.address);
  if (proxyAddress >>> 24 === 127 || proxyAddress === 0) {
    // A DNAT or connect rewrite from a pod to loopback goes nowhere: the proxy must be on a node address.
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
    mesh: exclusions('mesh', desired.mesh, cidr),
    pods: [],
  };

  if (!Array.isArray(desired.pods)) throw new InvalidInputError('pods', desired.pods, 'must be a list');
  // One map per field, keyed by the value itself: this runs for every pod on every sync (a CNI ADD's too).
  const firstUse = { uid: new Map<string, number>(), ip: new Map<number, number>(), cgroupPath: new Map<string, number>() };
  const unique = <F extends keyof typeof firstUse>(i: number, field: F, key: Parameters<(typeof firstUse)[F]['get']>[0], shown: unknown): void => {
    const seen = firstUse[field] as Map<typeof key, number>;
    const other = seen.get(key);
    if (other !== undefined) {
      const what = field === 'uid' ? 'duplicate: also' : 'also used by';
      throw new InvalidInputError(`pods[${i}].${field}`, shown, `${what} pods[${other}] (uid ${normal.pods[other]!.uid})`);
    }
    seen.set(key, i);
  };
  for (let i = 0; i < desired.pods.length; i++) {
    const pod = desired.pods[i] as Partial<DesiredState['pods'][number]> | null;
    const field = `pods[${i}]`;
    if (typeof pod !== 'object' || pod === null) throw new InvalidInputError(field, pod, 'must be an object');
    if (typeof pod.uid !== 'string' || !uidPattern.test(pod.uid)) {
      throw new InvalidInputError(`${field}.uid`, pod.uid, `must be 1-${opts.uidMaxLength} characters of letters, digits, ".", "_" and "-" (a Kubernetes uid)`);
    }
    if (pod.inbound !== 'strict' && pod.inbound !== 'permissive') throw new InvalidInputError(`${field}.inbound`, pod.inbound, 'must be "strict" or "permissive"');
    const ip = address(`${field}.ip`, pod.ip);
    const path = cgroupPath(`${field}.cgroupPath`, pod.cgroupPath);
    unique(i, 'uid', pod.uid, pod.uid);
    unique(i, 'ip', ip, pod.ip);
    if (opts.cgroups) {
      unique(i, 'cgroupPath', path, path);
      if (path === normal.proxy.cgroupPath) throw new InvalidInputError(`${field}.cgroupPath`, path, "is the proxy's cgroup: the proxy's sockets must never be intercepted");
    }
    normal.pods.push({ uid: pod.uid, ip, ipText: pod.ip as string, cgroupPath: path, strict: pod.inbound === 'strict', exclusions: exclusions(`${field}.exclusions`, pod.exclusions, cidr) });
  }
  return normal;
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

function ports(field: string, value: unknown): number[] {
  if (value === undefined || (Array.isArray(value) && value.length === 0)) return NONE;
  if (!Array.isArray(value)) throw new InvalidInputError(field, value, 'must be a list');
  for (let i = 0; i < value.length; i++) port(`${field}[${i}]`, value[i]);
  // Always a copy: caches keep these and must not see the caller mutate them.
  return value.length === 1 ? [value[0] as number] : [...new Set(value as number[])].sort((a, b) => a - b);
}

function uniqueCidrs(cidrs: Cidr[]): Cidr[] {
  if (cidrs.length < 2) return cidrs;
  const byText = new Map(cidrs.map((c) => [cidrText(c), c]));
  return [...byText.values()].sort((a, b) => a.network - b.network || a.prefix - b.prefix);
}

function cidrs(field: string, value: unknown, cidr: (field: string, v: unknown) => Cidr): Cidr[] {
  if (value === undefined || (Array.isArray(value) && value.length === 0)) return NONE;
  return uniqueCidrs(list(field, value, cidr));
}

function exclusions(field: string, value: unknown, cidr: (field: string, v: unknown) => Cidr): NormalExclusions {
  if (typeof value !== 'object' || value === null) throw new InvalidInputError(field, value, 'must be an object');
  const ex = value as Partial<Exclusions>;
  return {
    outboundPorts: ports(`${field}.outboundPorts`, ex.outboundPorts),
    outboundCidrs: cidrs(`${field}.outboundCidrs`, ex.outboundCidrs, cidr),
    outboundIncludeCidrs: cidrs(`${field}.outboundIncludeCidrs`, ex.outboundIncludeCidrs, cidr),
    inboundPorts: ports(`${field}.inboundPorts`, ex.inboundPorts),
  };
}
