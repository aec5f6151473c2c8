import type { NodePolicy, Resilience } from '../policy/schema.js';
import { IDEMPOTENT_METHODS, RESILIENCE_DEFAULTS, RETRY_BUDGET, type OutlierSettings } from '../policy/resilience.js';

/**
 * The resilience part of the proxy's config.json (read by proxy/resilience.js):
 * the policy's Retry and UpstreamTrafficSetting objects turned into lookups
 * by the keys the proxy has at hand: the destination service (ns/name) and the
 * source identity (ns/sa). Pure; every default is resolved here, so the proxy
 * never guesses.
 */

export interface ProxyRateLimit {
  /** Tokens per second and bucket size (baseline + burst, at least 1). */
  perSecond: number;
  bucket: number;
}

export interface ProxyServiceResilience {
  /** Request timeout of the service (its setting, else the mesh default); null: none. */
  timeoutMs: number | null;
  connectTimeoutMs: number | null;
  /** Routes with their own timeout or rate limit, first match wins (path regex, anchored). */
  routes: { pathRegex: string; timeoutMs: number | null; rateLimit: (ProxyRateLimit & { status: number; headers: Record<string, string> }) | null }[];
  maxConnections: number | null;
  /** Concurrent requests in flight to the service (FSM maxRequests; pending ones included). */
  maxRequests: number | null;
  maxPendingRequests: number | null;
  maxRequestsPerConnection: number | null;
  /** Concurrent retries to the service. */
  maxRetries: number | null;
  rateLimit: { tcp: ProxyRateLimit | null; http: (ProxyRateLimit & { status: number; headers: Record<string, string> }) | null };
  circuitBreaking: NonNullable<Resilience['upstreams'][number]['circuitBreaking']> | null;
  outlier: OutlierSettings;
}

export interface ProxyRetry {
  /** The Retry object (ns/name), for metrics and status. */
  policy: string;
  /** Status codes retried; `classes` holds "5xx", "gateway-error" (502-504), "retriable-4xx" (409). */
  statuses: number[];
  classes: string[];
  reset: boolean;
  connectFailure: boolean;
  numRetries: number;
  perTryTimeoutMs: number | null;
  backoffBaseMs: number;
}

export interface ProxyResilience {
  /** Applies to a service without an UpstreamTrafficSetting. */
  defaults: ProxyServiceResilience;
  /** ns/name -> its settings. */
  services: Record<string, ProxyServiceResilience>;
  /** Source identity -> destination service -> retry; the first Retry by ns/name wins for a pair. */
  retries: Record<string, Record<string, ProxyRetry>>;
  budget: { percent: number; minRetryConcurrency: number };
  /** Only these methods are retried: repeating them is safe. */
  retryMethods: string[];
}

function rate(r: { amount: number; unitSeconds: number; burst: number } | null): ProxyRateLimit | null {
  return r ? { perSecond: r.amount / r.unitSeconds, bucket: Math.max(1, r.amount + r.burst) } : null;
}
function httpRate(r: { amount: number; unitSeconds: number; burst: number; status: number; headers: Record<string, string> } | null): (ProxyRateLimit & { status: number; headers: Record<string, string> }) | null {
  return r ? { ...rate(r)!, status: r.status, headers: r.headers } : null;
}

/** `imports`: clusterset services (a Retry may name one that has no local Service: it then covers the failover's attempts). */
export function renderResilience(resilience: Resilience | undefined, services: NodePolicy['services'], imports: readonly { namespace: string; name: string }[] = []): ProxyResilience {
  const r = resilience ?? { defaults: RESILIENCE_DEFAULTS, retries: [], upstreams: [] };
  const base: ProxyServiceResilience = {
    timeoutMs: r.defaults.requestTimeoutMs,
    connectTimeoutMs: null,
    routes: [],
    maxConnections: null,
    maxRequests: null,
    maxPendingRequests: null,
    maxRequestsPerConnection: null,
    maxRetries: null,
    rateLimit: { tcp: null, http: null },
    circuitBreaking: null,
    outlier: r.defaults.outlier,
  };
  const known = new Set([...services, ...imports].map((s) => `${s.namespace}/${s.name}`));
  const out: Record<string, ProxyServiceResilience> = {};
  for (const u of r.upstreams) {
    const key = `${u.service.namespace}/${u.service.name}`;
    // Only services this node's pods may reach; the first setting by ns/name wins.
    if (!known.has(key) || out[key]) continue;
    out[key] = {
      timeoutMs: u.requestTimeoutMs ?? base.timeoutMs,
      connectTimeoutMs: u.connectTimeoutMs,
      routes: u.routes.map((x) => ({ pathRegex: x.path, timeoutMs: x.timeoutMs, rateLimit: httpRate(x.rateLimit) })),
      maxConnections: u.maxConnections,
      maxRequests: u.maxRequests,
      maxPendingRequests: u.maxPendingRequests,
      maxRequestsPerConnection: u.maxRequestsPerConnection,
      maxRetries: u.maxRetries,
      rateLimit: { tcp: rate(u.rateLimit.tcp), http: httpRate(u.rateLimit.http) },
      circuitBreaking: u.circuitBreaking,
      outlier: { ...base.outlier, ...(u.outlier ?? {}) },
    };
  }
  const retries: Record<string, Record<string, ProxyRetry>> = {};
  for (const x of r.retries) {
    const src = `${x.source.namespace}/${x.source.serviceAccount}`;
    const statuses = x.retryOn.filter((t) => /^\d{3}$/.test(t)).map(Number);
    const classes = x.retryOn.filter((t) => t === '5xx' || t === 'gateway-error' || t === 'retriable-4xx');
    for (const d of x.destinations) {
      const dst = `${d.namespace}/${d.name}`;
      if (!known.has(dst)) continue;
      const bySrc = (retries[src] ??= {});
      if (bySrc[dst]) continue;
      bySrc[dst] = {
        policy: `${x.namespace}/${x.name}`,
        statuses,
        classes,
        reset: x.retryOn.includes('reset'),
        connectFailure: x.retryOn.includes('connect-failure'),
        numRetries: x.numRetries,
        perTryTimeoutMs: x.perTryTimeoutMs,
        backoffBaseMs: x.backoffBaseMs,
      };
    }
  }
  return { defaults: base, services: out, retries, budget: { ...RETRY_BUDGET }, retryMethods: [...IDEMPOTENT_METHODS] };
}
