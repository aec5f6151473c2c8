import { show } from '../errors.js';
import { FieldError } from './fields.js';

/**
 * Traffic resilience policies (issue 18), read as FSM users write them
 * (policy.flomesh.io/v1alpha1, FSM's pkg/apis/policy/v1alpha1):
 *
 * - Retry: a source ServiceAccount -> destination Services; retryOn (a comma
 *   list), perTryTimeout, numRetries, retryBackoffBaseInterval.
 * - UpstreamTrafficSetting: per destination host (a Service name or its
 *   FQDN): connectionSettings.tcp {maxConnections, connectTimeout},
 *   connectionSettings.http {maxRequests, maxRequestsPerConnection,
 *   maxPendingRequests, maxRetries, circuitBreaking}, rateLimit.local
 *   {tcp {connections, unit, burst}, http {requests, unit, burst,
 *   responseStatusCode, responseHeadersToAdd}}, httpRoutes[] {path, rateLimit}.
 *   fsm-node adds (documented in docs/resilience.md): a request timeout for the
 *   whole service (connectionSettings.http.requestTimeout) and per route
 *   (httpRoutes[].timeout), and an outlierDetection override.
 *
 * Each object is checked on its own, every field named in the error, so a bad
 * one is reported and its last good version stays in force (the compiler's
 * per-object records). Durations are Go's (metav1.Duration): "250ms", "5s",
 * "1m30s".
 */

export const RESILIENCE_API_VERSION = 'policy.flomesh.io/v1alpha1';

/** What retryOn may name: Envoy's vocabulary, which FSM passes through, plus explicit status codes. */
export const RETRY_ON = ['5xx', 'gateway-error', 'reset', 'connect-failure', 'retriable-4xx'] as const;

export interface RetrySpec {
  source: { namespace: string; serviceAccount: string };
  destinations: { namespace: string; name: string }[];
  retryOn: string[];
  perTryTimeoutMs: number | null;
  numRetries: number;
  backoffBaseMs: number;
}

export interface RateLimit {
  /** Tokens added per `unitSeconds`. */
  amount: number;
  unitSeconds: number;
  /** Bucket size above the baseline (FSM: "connections/requests above the baseline rate allowed in a short period"). */
  burst: number;
}
export interface HttpRateLimit extends RateLimit {
  status: number;
  headers: Record<string, string>;
}

export interface CircuitBreaking {
  statTimeWindowMs: number;
  minRequestAmount: number;
  degradedTimeWindowMs: number;
  slowTimeThresholdMs: number | null;
  slowAmountThreshold: number | null;
  slowRatioThreshold: number | null;
  errorAmountThreshold: number | null;
  errorRatioThreshold: number | null;
  degradedStatusCode: number;
  degradedResponseContent: string;
}

export interface OutlierSettings {
  enabled: boolean;
  /** Consecutive connect failures, resets or 5xx answers that eject an endpoint. */
  consecutiveFailures: number;
  /** First ejection; the n-th ejection in a row lasts n times as long (capped at maxEjectionMs). */
  baseEjectionMs: number;
  maxEjectionMs: number;
  /** Never more than this share of a service's endpoints ejected at once (at least one endpoint stays). */
  maxEjectionPercent: number;
}

export interface UpstreamSpec {
  service: { namespace: string; name: string };
  connectTimeoutMs: number | null;
  maxConnections: number | null;
  maxRequests: number | null;
  maxRequestsPerConnection: number | null;
  maxPendingRequests: number | null;
  maxRetries: number | null;
  requestTimeoutMs: number | null;
  circuitBreaking: CircuitBreaking | null;
  rateLimit: { tcp: RateLimit | null; http: HttpRateLimit | null };
  routes: { path: string; timeoutMs: number | null; rateLimit: HttpRateLimit | null }[];
  outlier: Partial<OutlierSettings> | null;
}

/** Conservative defaults (issue 18): on for every service with more than one endpoint. */
export const OUTLIER_DEFAULTS: OutlierSettings = { enabled: true, consecutiveFailures: 5, baseEjectionMs: 30_000, maxEjectionMs: 300_000, maxEjectionPercent: 50 };
/** Mesh-wide request timeout when neither the route nor the service sets one (mesh config requestTimeout; "0s" turns it off). */
export const DEFAULT_REQUEST_TIMEOUT_MS = 15_000;
/** Retries only for methods that are safe to repeat, unless a policy's retryOn names a status explicitly for others (it cannot: see docs). */
export const IDEMPOTENT_METHODS = ['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE'] as const;
/** The retry budget (Envoy's defaults): requests being retried may be at most this share of the requests in flight to a service, or the floor. */
export const RETRY_BUDGET = { percent: 20, minRetryConcurrency: 3 } as const;

const UINT32 = 2 ** 32 - 1;
const DNS = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const UNITS: Record<string, number> = { second: 1, minute: 60, hour: 3600 };

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function obj(field: string, v: unknown, optional = true): Record<string, unknown> | undefined {
  if (v === undefined || v === null) {
    if (optional) return undefined;
    throw new FieldError(field, 'is required');
  }
  if (!isObject(v)) throw new FieldError(field, `${show(v)} is not an object`);
  return v;
}

function name(field: string, v: unknown): string {
  if (typeof v !== 'string' || v.length === 0 || v.length > 63 || !DNS.test(v)) throw new FieldError(field, `${show(v)} is not a lowercase RFC 1123 label`);
  return v;
}

function uint(field: string, v: unknown, min = 0, max = UINT32): number | null {
  if (v === undefined || v === null) return null;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) throw new FieldError(field, `${show(v)} is not a whole number from ${min} to ${max}`);
  return v;
}

function ratio(field: string, v: unknown): number | null {
  if (v === undefined || v === null) return null;
  if (typeof v !== 'number' || !(v >= 0 && v <= 1)) throw new FieldError(field, `${show(v)} is not a ratio from 0 to 1`);
  return v;
}

const DURATION_PART = /(\d+(?:\.\d+)?)(ms|s|m|h)/y;
const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** A Go duration ("250ms", "1m30s") -> milliseconds; null when absent. */
export function parseDuration(field: string, v: unknown, maxMs = 24 * 3_600_000): number | null {
  if (v === undefined || v === null) return null;
  if (typeof v !== 'string' || v.length === 0) throw new FieldError(field, `${show(v)} is not a duration like "250ms", "5s" or "1m30s"`);
  if (v === '0') return 0;
  let ms = 0;
  DURATION_PART.lastIndex = 0;
  let at = 0;
  while (at < v.length) {
    DURATION_PART.lastIndex = at;
    const m = DURATION_PART.exec(v);
    if (!m) throw new FieldError(field, `${show(v)} is not a duration like "250ms", "5s" or "1m30s"`);
    ms += Number(m[1]) * UNIT_MS[m[2]!]!;
    at = DURATION_PART.lastIndex;
  }
  if (ms > maxMs) throw new FieldError(field, `${show(v)} is longer than ${maxMs / 1000} s`);
  return Math.round(ms);
}

function status(field: string, v: unknown, min: number, dflt: number): number {
  if (v === undefined || v === null || v === 0) return dflt;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > 599) throw new FieldError(field, `${show(v)} is not an HTTP status from ${min} to 599`);
  return v;
}

function retryOn(field: string, v: unknown): string[] {
  if (typeof v !== 'string' || v.trim() === '') throw new FieldError(field, `${show(v)} is not a comma-separated list (e.g. "5xx,reset,connect-failure")`);
  const out = v.split(',').map((s) => s.trim());
  for (const [i, t] of out.entries()) {
    if (!(RETRY_ON as readonly string[]).includes(t) && !/^[1-5]\d\d$/.test(t)) {
      throw new FieldError(field, `item ${i + 1} ${show(t)} is not one of ${RETRY_ON.join(', ')} or a status code like 503`);
    }
  }
  return [...new Set(out)];
}

/** spec of a Retry in `namespace` -> RetrySpec; throws FieldError naming the field. */
export function parseRetrySpec(spec: unknown, namespace: string): RetrySpec {
  const s = obj('spec', spec, false)!;
  const src = obj('spec.source', s.source, false)!;
  if (src.kind !== 'ServiceAccount') throw new FieldError('spec.source.kind', `${show(src.kind)} is not ServiceAccount (a Retry applies to the traffic of one service account)`);
  const source = { namespace: src.namespace === undefined || src.namespace === '' ? namespace : name('spec.source.namespace', src.namespace), serviceAccount: name('spec.source.name', src.name) };
  if (!Array.isArray(s.destinations) || s.destinations.length === 0) throw new FieldError('spec.destinations', `${show(s.destinations)} is not a list of at least one Service`);
  const destinations = s.destinations.map((d, i) => {
    const f = `spec.destinations[${i}]`;
    const o = obj(f, d, false)!;
    if (o.kind !== 'Service') throw new FieldError(`${f}.kind`, `${show(o.kind)} is not Service`);
    return { namespace: o.namespace === undefined || o.namespace === '' ? namespace : name(`${f}.namespace`, o.namespace), name: name(`${f}.name`, o.name) };
  });
  const p = obj('spec.retryPolicy', s.retryPolicy, false)!;
  return {
    source,
    destinations,
    retryOn: retryOn('spec.retryPolicy.retryOn', p.retryOn),
    perTryTimeoutMs: parseDuration('spec.retryPolicy.perTryTimeout', p.perTryTimeout, 3_600_000),
    // FSM's default is 1 retry when unset; more than 10 is a storm, not resilience.
    numRetries: uint('spec.retryPolicy.numRetries', p.numRetries, 0, 10) ?? 1,
    backoffBaseMs: parseDuration('spec.retryPolicy.retryBackoffBaseInterval', p.retryBackoffBaseInterval, 60_000) ?? 25,
  };
}

/** host: "svc", "svc.ns", "svc.ns.svc" or "svc.ns.svc.<cluster domain>" -> the service it names. */
export function parseHost(field: string, v: unknown, namespace: string): { namespace: string; name: string } {
  if (typeof v !== 'string' || v.length === 0) throw new FieldError(field, `${show(v)} is not a service name or FQDN`);
  const parts = v.split('.');
  if (parts.length === 1) return { namespace, name: name(field, parts[0]) };
  if (parts.length === 2 || parts[2] === 'svc') return { namespace: name(field, parts[1]), name: name(field, parts[0]) };
  throw new FieldError(field, `${show(v)} is not a service name, <service>.<namespace> or <service>.<namespace>.svc[.<cluster domain>]`);
}

function rateLimit(field: string, v: unknown, amountKey: 'connections' | 'requests'): RateLimit | null {
  const o = obj(field, v);
  if (!o) return null;
  const amount = uint(`${field}.${amountKey}`, o[amountKey], 1);
  if (amount === null) throw new FieldError(`${field}.${amountKey}`, 'is required');
  if (typeof o.unit !== 'string' || !(o.unit in UNITS)) throw new FieldError(`${field}.unit`, `${show(o.unit)} is not one of second, minute, hour`);
  return { amount, unitSeconds: UNITS[o.unit]!, burst: uint(`${field}.burst`, o.burst) ?? 0 };
}

function httpRateLimit(field: string, v: unknown): HttpRateLimit | null {
  const base = rateLimit(field, v, 'requests');
  if (!base) return null;
  const o = v as Record<string, unknown>;
  const headers: Record<string, string> = {};
  if (o.responseHeadersToAdd !== undefined && o.responseHeadersToAdd !== null) {
    if (!Array.isArray(o.responseHeadersToAdd)) throw new FieldError(`${field}.responseHeadersToAdd`, `${show(o.responseHeadersToAdd)} is not a list of {name, value}`);
    o.responseHeadersToAdd.forEach((h, i) => {
      const f = `${field}.responseHeadersToAdd[${i}]`;
      const hh = obj(f, h, false)!;
      if (typeof hh.name !== 'string' || !/^[A-Za-z0-9!#$%&'*+.^_`|~-]+$/.test(hh.name)) throw new FieldError(`${f}.name`, `${show(hh.name)} is not an HTTP header name`);
      if (typeof hh.value !== 'string' || /[\r\n]/.test(hh.value)) throw new FieldError(`${f}.value`, `${show(hh.value)} is not a one-line header value`);
      headers[hh.name.toLowerCase()] = hh.value;
    });
  }
  return { ...base, status: status(`${field}.responseStatusCode`, o.responseStatusCode, 400, 429), headers };
}

function circuitBreaking(field: string, v: unknown): CircuitBreaking | null {
  const o = obj(field, v);
  if (!o) return null;
  const cb: CircuitBreaking = {
    statTimeWindowMs: parseDuration(`${field}.statTimeWindow`, o.statTimeWindow) ?? 10_000,
    minRequestAmount: uint(`${field}.minRequestAmount`, o.minRequestAmount) ?? 0,
    degradedTimeWindowMs: parseDuration(`${field}.degradedTimeWindow`, o.degradedTimeWindow) ?? 10_000,
    slowTimeThresholdMs: parseDuration(`${field}.slowTimeThreshold`, o.slowTimeThreshold),
    slowAmountThreshold: uint(`${field}.slowAmountThreshold`, o.slowAmountThreshold, 1),
    slowRatioThreshold: ratio(`${field}.slowRatioThreshold`, o.slowRatioThreshold),
    errorAmountThreshold: uint(`${field}.errorAmountThreshold`, o.errorAmountThreshold, 1),
    errorRatioThreshold: ratio(`${field}.errorRatioThreshold`, o.errorRatioThreshold),
    degradedStatusCode: status(`${field}.degradedStatusCode`, o.degradedStatusCode, 400, 503),
    degradedResponseContent: typeof o.degradedResponseContent === 'string' ? o.degradedResponseContent : 'circuit open\n',
  };
  if (cb.statTimeWindowMs === 0) throw new FieldError(`${field}.statTimeWindow`, 'must be longer than 0');
  if (cb.errorAmountThreshold === null && cb.errorRatioThreshold === null && cb.slowAmountThreshold === null && cb.slowRatioThreshold === null) {
    throw new FieldError(field, 'names no threshold: give errorAmountThreshold, errorRatioThreshold, slowAmountThreshold or slowRatioThreshold');
  }
  if ((cb.slowAmountThreshold !== null || cb.slowRatioThreshold !== null) && cb.slowTimeThresholdMs === null) throw new FieldError(`${field}.slowTimeThreshold`, 'is required with a slow threshold');
  return cb;
}

function outlier(field: string, v: unknown): Partial<OutlierSettings> | null {
  const o = obj(field, v);
  if (!o) return null;
  const out: Partial<OutlierSettings> = {};
  if (o.enabled !== undefined) {
    if (typeof o.enabled !== 'boolean') throw new FieldError(`${field}.enabled`, `${show(o.enabled)} is not true or false`);
    out.enabled = o.enabled;
  }
  const n = uint(`${field}.consecutiveFailures`, o.consecutiveFailures, 1, 1000);
  if (n !== null) out.consecutiveFailures = n;
  const base = parseDuration(`${field}.baseEjectionTime`, o.baseEjectionTime, 3_600_000);
  if (base !== null) out.baseEjectionMs = base;
  const max = parseDuration(`${field}.maxEjectionTime`, o.maxEjectionTime, 24 * 3_600_000);
  if (max !== null) out.maxEjectionMs = max;
  const pct = uint(`${field}.maxEjectionPercent`, o.maxEjectionPercent, 0, 100);
  if (pct !== null) out.maxEjectionPercent = pct;
  return out;
}

/** spec of an UpstreamTrafficSetting in `namespace` -> UpstreamSpec; throws FieldError naming the field. */
export function parseUpstreamSpec(spec: unknown, namespace: string): UpstreamSpec {
  const s = obj('spec', spec, false)!;
  const service = parseHost('spec.host', s.host, namespace);
  const cs = obj('spec.connectionSettings', s.connectionSettings);
  const tcp = obj('spec.connectionSettings.tcp', cs?.tcp);
  const http = obj('spec.connectionSettings.http', cs?.http);
  const rl = obj('spec.rateLimit', s.rateLimit);
  const local = obj('spec.rateLimit.local', rl?.local);
  const routes = s.httpRoutes ?? [];
  if (!Array.isArray(routes)) throw new FieldError('spec.httpRoutes', `${show(routes)} is not a list`);
  return {
    service,
    connectTimeoutMs: parseDuration('spec.connectionSettings.tcp.connectTimeout', tcp?.connectTimeout, 600_000),
    maxConnections: uint('spec.connectionSettings.tcp.maxConnections', tcp?.maxConnections, 1),
    maxRequests: uint('spec.connectionSettings.http.maxRequests', http?.maxRequests, 1),
    maxRequestsPerConnection: uint('spec.connectionSettings.http.maxRequestsPerConnection', http?.maxRequestsPerConnection, 1),
    maxPendingRequests: uint('spec.connectionSettings.http.maxPendingRequests', http?.maxPendingRequests, 0),
    maxRetries: uint('spec.connectionSettings.http.maxRetries', http?.maxRetries, 0),
    requestTimeoutMs: parseDuration('spec.connectionSettings.http.requestTimeout', http?.requestTimeout, 3_600_000),
    circuitBreaking: circuitBreaking('spec.connectionSettings.http.circuitBreaking', http?.circuitBreaking),
    rateLimit: { tcp: rateLimit('spec.rateLimit.local.tcp', local?.tcp, 'connections'), http: httpRateLimit('spec.rateLimit.local.http', local?.http) },
    routes: routes.map((r, i) => {
      const f = `spec.httpRoutes[${i}]`;
      const o = obj(f, r, false)!;
      if (typeof o.path !== 'string' || o.path === '') throw new FieldError(`${f}.path`, `${show(o.path)} is not a path regular expression`);
      try {
        new RegExp(o.path);
      } catch (err) {
        throw new FieldError(`${f}.path`, `${show(o.path)} is not a regular expression: ${(err as Error).message}`);
      }
      const rr = obj(`${f}.rateLimit`, o.rateLimit);
      return { path: o.path, timeoutMs: parseDuration(`${f}.timeout`, o.timeout, 3_600_000), rateLimit: httpRateLimit(`${f}.rateLimit.local`, rr?.local) };
    }),
    outlier: outlier('spec.outlierDetection', s.outlierDetection),
  };
}

/** Mesh config keys (fsm-mesh-config) for the mesh-wide defaults. */
export interface ResilienceDefaults {
  requestTimeoutMs: number | null;
  outlier: OutlierSettings;
}
export const RESILIENCE_DEFAULTS: ResilienceDefaults = { requestTimeoutMs: DEFAULT_REQUEST_TIMEOUT_MS, outlier: OUTLIER_DEFAULTS };

/** The mesh config's resilience keys (strings, as a ConfigMap holds them) -> defaults; FieldError names data.<key>. */
export function parseResilienceDefaults(data: { requestTimeout?: string | undefined; outlierDetection?: string | undefined; outlierConsecutiveFailures?: string | undefined; outlierBaseEjectionTime?: string | undefined; outlierMaxEjectionPercent?: string | undefined }): ResilienceDefaults {
  const int = (key: string, v: string | undefined, min: number, max: number): number | null => {
    if (v === undefined) return null;
    if (!/^\d+$/.test(v) || Number(v) < min || Number(v) > max) throw new FieldError(`data.${key}`, `${show(v)} is not a whole number from ${min} to ${max}`);
    return Number(v);
  };
  if (data.outlierDetection !== undefined && data.outlierDetection !== 'on' && data.outlierDetection !== 'off') throw new FieldError('data.outlierDetection', `${show(data.outlierDetection)} is not on or off`);
  const timeout = parseDuration('data.requestTimeout', data.requestTimeout, 3_600_000);
  return {
    requestTimeoutMs: timeout === null ? DEFAULT_REQUEST_TIMEOUT_MS : timeout === 0 ? null : timeout,
    outlier: {
      enabled: data.outlierDetection !== 'off',
      consecutiveFailures: int('outlierConsecutiveFailures', data.outlierConsecutiveFailures, 1, 1000) ?? OUTLIER_DEFAULTS.consecutiveFailures,
      baseEjectionMs: parseDuration('data.outlierBaseEjectionTime', data.outlierBaseEjectionTime, 3_600_000) ?? OUTLIER_DEFAULTS.baseEjectionMs,
      maxEjectionMs: OUTLIER_DEFAULTS.maxEjectionMs,
      maxEjectionPercent: int('outlierMaxEjectionPercent', data.outlierMaxEjectionPercent, 0, 100) ?? OUTLIER_DEFAULTS.maxEjectionPercent,
    },
  };
}

/**
 * The compiled, mesh-wide resilience part of every NodePolicy: the defaults
 * and every valid object, in ns/name order (the caller's). Two settings for
 * one service: the first by ns/name applies (the lab and docs say so), the
 * other is still listed so status can show it.
 */
/**
 * The `resilience` part of the global policy, or undefined when it says
 * nothing beyond the defaults (no Retry, no UpstreamTrafficSetting, default
 * mesh settings): every node's policy then stays as small as before, and an
 * absent part is read as the defaults (src/proxy/resilience-config.ts).
 */
export function compileResilience(
  defaults: ResilienceDefaults,
  retries: readonly ({ namespace: string; name: string } & RetrySpec)[],
  upstreams: readonly ({ namespace: string; name: string } & UpstreamSpec)[],
): { defaults: ResilienceDefaults; retries: ({ namespace: string; name: string } & RetrySpec)[]; upstreams: ({ namespace: string; name: string } & UpstreamSpec)[] } | undefined {
  if (retries.length === 0 && upstreams.length === 0 && JSON.stringify(defaults) === JSON.stringify(RESILIENCE_DEFAULTS)) return undefined;
  return { defaults, retries: [...retries], upstreams: [...upstreams] };
}
