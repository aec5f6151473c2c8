import { join } from 'node:path';
import { noExclusions, type PodIntercept } from '../src/dataplane/types.js';

/** Small helpers shared by the benchmarks. */

export function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? NaN;
}

export const round = (x: number, digits = 3): number => Math.round(x * 10 ** digits) / 10 ** digits;

export function intFlag(flags: Record<string, string | boolean>, name: string, dflt: number): number {
  const v = flags[name];
  if (v === undefined) return dflt;
  const n = Number(v);
  if (typeof v !== 'string' || !Number.isInteger(n) || n < 0) throw new Error(`--${name} must be a non-negative integer, got ${JSON.stringify(v)}`);
  return n;
}

/**
 * The i-th synthetic pod of a benchmark: a cgroup under podsCgroup (made by the
 * bench beforehand) and a made-up address in 10.200.0.0/16 that only the
 * dataplane's maps and sets ever see.
 */
export function syntheticPod(podsCgroup: string, i: number, extra: Partial<PodIntercept> = {}): PodIntercept {
  return {
    uid: `bench-${i}`,
    namespace: 'bench',
    name: `p${i}`,
    ip: `10.200.${i >> 8}.${i & 255}`,
    cgroupPath: join(podsCgroup, `p${i}`),
    inbound: 'permissive',
    exclusions: noExclusions(),
    ...extra,
  };
}
