import type { DesiredState } from '../types.js';
import { validateDesired as validate, type NormalState } from '../validate.js';

export type { NormalExclusions, NormalPod, NormalState } from '../validate.js';

/**
 * iptables recognises pods by address (it is the fallback for nodes without
 * cgroup v2), so cgroup paths are not checked; the uid rides in an ipset
 * comment, so it stays plain and short.
 */
export function validateDesired(desired: DesiredState): NormalState {
  return validate(desired, { uidMaxLength: 128, cgroups: false, noIpv6: 'IPv6 is not supported by the iptables dataplane yet' });
}
