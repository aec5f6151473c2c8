import { show } from '../errors.js';
import { FieldError } from './fields.js';

/**
 * SMI TrafficSplit, every version FSM users have in their clusters, read
 * into one shape (SplitSpec). What the versions say (smi-spec
 * apis/traffic-split/<version>/traffic-split.md, smi-sdk-go's Go types):
 *
 * | version  | backends[].weight                           | matches                                  |
 * |----------|---------------------------------------------|------------------------------------------|
 * | v1alpha1 | a Kubernetes quantity: 1, "500m", "1k"      | -                                        |
 * | v1alpha2 | a whole number                              | -                                        |
 * | v1alpha3 | a whole number                              | [{kind: HTTPRouteGroup, name, apiGroup?}] |
 * | v1alpha4 | a whole number                              | the same (a TypedLocalObjectReference)   |
 *
 * A match names a whole HTTPRouteGroup (the reference has no field for one
 * match of the group): every match of every group named is merged into one
 * set, as the spec says.
 *
 * Weights are relative. A quantity weight is converted to exact milli-units
 * and the split's weights are then divided by their greatest common divisor
 * ("500m"/"500m" is 1/1, "900m"/"100m" 9/1): the same ratios in small whole
 * numbers.
 *
 * One compatibility rule: a weight written as a string is read as a quantity
 * in every version (and then so are all the weights of that split). A cluster's
 * SMI CRDs convert nothing between versions (conversion strategy None, in
 * SMI's CRDs, FSM's and ours), so a v1alpha1 split with weight "500m" is
 * served unchanged under v1alpha4, the version the controller watches. A
 * string is unambiguous: it can only be a quantity.
 */

export const SPLIT_GROUP = 'split.smi-spec.io';
/** Newest first: the first is the version the Kubernetes source watches. */
export const SPLIT_VERSIONS = ['v1alpha4', 'v1alpha3', 'v1alpha2', 'v1alpha1'] as const;
export type SplitVersion = (typeof SPLIT_VERSIONS)[number];
export const SPLIT_API_VERSIONS = [
  'split.smi-spec.io/v1alpha4',
  'split.smi-spec.io/v1alpha3',
  'split.smi-spec.io/v1alpha2',
  'split.smi-spec.io/v1alpha1',
] as const;

/** The group a matches entry may name (absent means the same: FSM's and SMI's CRDs prune apiGroup). */
export const ROUTE_GROUP_API_GROUP = 'specs.smi-spec.io';

/** Largest weight: what a Go int holds on the 32-bit ARM boards FSM runs on. */
export const MAX_WEIGHT = 2 ** 31 - 1;

export interface SplitSpec {
  service: string;
  backends: { service: string; weight: number }[];
  /** Names of HTTPRouteGroups in the split's namespace; empty: the split applies to all traffic. */
  matchGroups: string[];
}

const DNS = /^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function dnsName(field: string, v: unknown): string {
  if (typeof v !== 'string' || v.length === 0 || v.length > 253 || !DNS.test(v)) {
    throw new FieldError(field, `${show(v)} is not a lowercase RFC 1123 name (a Service or HTTPRouteGroup in the split's namespace)`);
  }
  return v;
}

/** `spec` of a TrafficSplit of `apiVersion` -> SplitSpec; throws FieldError naming the field and the value. */
export function parseSplitSpec(apiVersion: unknown, spec: unknown): SplitSpec {
  const version = SPLIT_VERSIONS.find((v) => apiVersion === `${SPLIT_GROUP}/${v}`);
  if (version === undefined) throw new FieldError('apiVersion', `${show(apiVersion)} is not a TrafficSplit version (use one of ${SPLIT_API_VERSIONS.join(', ')})`);
  if (!isObject(spec)) throw new FieldError('spec', `${show(spec)} is not an object`);
  const service = dnsName('spec.service', spec.service);

  const rawBackends = spec.backends;
  if (!Array.isArray(rawBackends) || rawBackends.length === 0) throw new FieldError('spec.backends', `${show(rawBackends)} is not a list of at least one backend`);
  const seen = new Set<string>();
  const names = rawBackends.map((b, i) => {
    if (!isObject(b)) throw new FieldError(`spec.backends[${i}]`, `${show(b)} is not an object`);
    const name = dnsName(`spec.backends[${i}].service`, b.service);
    if (seen.has(name)) throw new FieldError(`spec.backends[${i}].service`, `duplicate backend ${show(name)}`);
    seen.add(name);
    return name;
  });
  const raw = rawBackends.map((b) => (b as Record<string, unknown>).weight);
  const asQuantities = version === 'v1alpha1' || raw.some((w) => typeof w === 'string');
  const weights = asQuantities ? quantityWeights(raw) : raw.map((w, i) => wholeWeight(`spec.backends[${i}].weight`, w, version));
  if (weights.every((w) => w === 0)) throw new FieldError('spec.backends', 'all weights are 0: the split would send traffic nowhere');

  const matchGroups = parseMatches(version, spec.matches);
  return { service, backends: names.map((s, i) => ({ service: s, weight: weights[i]! })), matchGroups };
}

function wholeWeight(field: string, w: unknown, version: SplitVersion): number {
  if (typeof w !== 'number' || !Number.isInteger(w) || w < 0 || w > MAX_WEIGHT) {
    throw new FieldError(field, `${show(w)} is not a whole number from 0 to ${MAX_WEIGHT} (${SPLIT_GROUP}/${version} weights are whole numbers)`);
  }
  return w;
}

/** v1alpha1: quantities -> exact milli-units -> divided by their gcd. */
function quantityWeights(raw: unknown[]): number[] {
  const milli = raw.map((w, i) => {
    const field = `spec.backends[${i}].weight`;
    let m: bigint;
    try {
      m = quantityMilli(w);
    } catch (err) {
      throw new FieldError(field, `${show(w)} is not a weight: ${(err as Error).message}`);
    }
    return m;
  });
  const g = milli.reduce((a, b) => gcd(a, b), 0n);
  const out = milli.map((m) => (g === 0n ? 0n : m / g));
  out.forEach((w, i) => {
    if (w > BigInt(MAX_WEIGHT)) throw new FieldError(`spec.backends[${i}].weight`, `${show(raw[i])} is too large next to the other weights (ratio above ${MAX_WEIGHT})`);
  });
  return out.map(Number);
}

function gcd(a: bigint, b: bigint): bigint {
  while (b !== 0n) [a, b] = [b, a % b];
  return a;
}

const BINARY: Record<string, number> = { Ki: 1, Mi: 2, Gi: 3, Ti: 4, Pi: 5, Ei: 6 };
const DECIMAL: Record<string, number> = { n: -9, u: -6, m: -3, '': 0, k: 3, M: 6, G: 9, T: 12, P: 15, E: 18 };
// Kubernetes quantity syntax: sign, digits with an optional fraction, then a
// binary suffix, a decimal exponent (e3, E-2) or a decimal SI suffix.
const QUANTITY = /^([+-]?)(\d+(?:\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+|[numkMGTPE]?)$/;

/**
 * A Kubernetes quantity (string, or a JSON number as the API also accepts)
 * in exact milli-units. Negative values and values finer than 1m are errors.
 */
export function quantityMilli(q: unknown): bigint {
  let text: string;
  if (typeof q === 'number') {
    if (!Number.isFinite(q)) throw new Error('not a finite number');
    text = String(q);
  } else if (typeof q === 'string') text = q.trim();
  else throw new Error('a weight is a number or a quantity string such as "500m"');
  const m = QUANTITY.exec(text);
  if (!m) throw new Error('not a Kubernetes quantity (e.g. 1, 500m, 2k)');
  const [, sign, number, suffix = ''] = m as unknown as [string, string, string, string | undefined];
  const [int = '', frac = ''] = number.split('.');
  let digits = BigInt((int + frac) || '0');
  let exp10 = 3 - frac.length; // milli-units
  if (suffix in BINARY) digits *= 1024n ** BigInt(BINARY[suffix]!);
  else if (/^[eE]/.test(suffix)) exp10 += Number(suffix.slice(1));
  else exp10 += DECIMAL[suffix]!;
  if (sign === '-' && digits !== 0n) throw new Error('negative');
  if (exp10 > 40) throw new Error('too large');
  if (exp10 >= 0) return digits * 10n ** BigInt(exp10);
  const div = 10n ** BigInt(-exp10);
  if (digits % div !== 0n) throw new Error('finer than 1m (a thousandth)');
  return digits / div;
}

function parseMatches(version: SplitVersion, matches: unknown): string[] {
  if (matches === undefined || matches === null) return [];
  if (version === 'v1alpha1' || version === 'v1alpha2') {
    throw new FieldError('spec.matches', `is not a field of ${SPLIT_GROUP}/${version} (matches came with v1alpha3; use ${SPLIT_GROUP}/v1alpha4)`);
  }
  if (!Array.isArray(matches)) throw new FieldError('spec.matches', `${show(matches)} is not a list`);
  const seen = new Set<string>();
  return matches.map((x, i) => {
    const at = `spec.matches[${i}]`;
    if (!isObject(x)) throw new FieldError(at, `${show(x)} is not an object`);
    if (x.kind !== 'HTTPRouteGroup') throw new FieldError(`${at}.kind`, `${show(x.kind)} is not a kind a split can match (only HTTPRouteGroup)`);
    if (x.apiGroup !== undefined && x.apiGroup !== null && x.apiGroup !== ROUTE_GROUP_API_GROUP) {
      throw new FieldError(`${at}.apiGroup`, `${show(x.apiGroup)} is not the group of HTTPRouteGroup (${ROUTE_GROUP_API_GROUP})`);
    }
    const name = dnsName(`${at}.name`, x.name);
    if (seen.has(name)) throw new FieldError(`${at}.name`, `HTTPRouteGroup ${show(name)} is named twice`);
    seen.add(name);
    return name;
  });
}
