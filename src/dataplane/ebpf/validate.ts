import type { DesiredState } from '../types.js';
import { validateDesired as validate, type NormalPod, type NormalState } from '../validate.js';
import type { Cidr } from '../../util/ipv4.js';
import { UID_LEN } from './abi.js';

export type { NormalExclusions, NormalPod, NormalState } from '../validate.js';

/**
 * The eBPF dataplane keys pods by cgroup, so cgroup paths must be valid and
 * distinct (and never the proxy's); the uid must fit struct fsm_pod's uid
 * field, NUL padded. Pods are sorted by uid so rendering does not depend on
 * the caller's order.
 */
export function validateDesired(desired: DesiredState): NormalState {
  const normal = validate(desired, { uidMaxLength: UID_LEN - 1, cgroups: true, noIpv6: 'the eBPF dataplane has no IPv6 programs yet' });
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
