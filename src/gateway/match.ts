import type { MatchRec, PathModifierRec } from './objects.js';

/**
 * The Gateway API's matching and precedence rules as small pure functions.
 * The resolver (resolve.ts) uses them to order what it compiles; proxy/gateway.js
 * implements the per-request half (pathMatches, hostMatches, rewritePath,
 * redirectLocation) the same way, and the unit and Pipy tests check both
 * against the behaviours of the upstream conformance tests.
 */

// ---- hostnames ----------------------------------------------------------------

/** Does `pattern` ("a.example.com", "*.example.com" or "*") cover the concrete host `host`? */
export function hostMatches(pattern: string, host: string): boolean {
  if (pattern === '*') return true;
  if (pattern.startsWith('*.')) return host.length > pattern.length - 1 && host.endsWith(pattern.slice(1));
  return pattern === host;
}

/**
 * The hostnames a route serves on a listener (the spec's intersection):
 * listener without hostname -> the route's; route without hostnames -> the
 * listener's; both -> each route hostname the listener covers, or, for a
 * wildcard route hostname covering the listener's, the listener's. ['*'] means
 * any host; [] means no intersection (the route is not accepted there).
 */
export function intersectHostnames(listener: string | null, route: readonly string[]): string[] {
  if (route.length === 0) return [listener ?? '*'];
  if (listener === null) return [...new Set(route)];
  const out = new Set<string>();
  const wild = (h: string) => h.startsWith('*.');
  for (const h of route) {
    if (!wild(listener) && !wild(h)) {
      if (h === listener) out.add(h);
    } else if (wild(listener) && !wild(h)) {
      if (hostMatches(listener, h)) out.add(h);
    } else if (!wild(listener) && wild(h)) {
      if (hostMatches(h, listener)) out.add(listener);
    } else if (h.endsWith(listener.slice(1))) {
      out.add(h); // "*.a.example.com" inside "*.example.com" (or equal)
    } else if (listener.endsWith(h.slice(1))) {
      out.add(listener);
    }
  }
  return [...out];
}

/** Order of hostname buckets: exact names, then wildcards (longer = more specific), then "*". */
export function compareHostnames(a: string, b: string): number {
  const rank = (h: string) => (h === '*' ? 2 : h.startsWith('*.') ? 1 : 0);
  return rank(a) - rank(b) || b.length - a.length || (a < b ? -1 : a > b ? 1 : 0);
}

/** The host of a Host header: lower case, without port. */
export function requestHost(hostHeader: string | undefined): string {
  const h = (hostHeader ?? '').toLowerCase();
  if (h.startsWith('[')) return h.slice(0, h.indexOf(']') + 1);
  const colon = h.lastIndexOf(':');
  return colon >= 0 ? h.slice(0, colon) : h;
}

// ---- paths ----------------------------------------------------------------------

/** A PathPrefix value without its trailing slash ("/" -> ""): "/abc/" and "/abc" are the same prefix. */
export function prefixBase(value: string): string {
  return value.endsWith('/') ? value.slice(0, -1) : value;
}

/**
 * Path matching (query string already removed). PathPrefix matches whole path
 * elements: "/abc" matches "/abc", "/abc/" and "/abc/def", never "/abcdef".
 * RegularExpression is anchored (the whole path must match).
 */
export function pathMatches(m: MatchRec['path'], path: string): boolean {
  switch (m.type) {
    case 'Exact':
      return path === m.value;
    case 'PathPrefix': {
      const base = prefixBase(m.value);
      return base === '' || path === base || path.startsWith(`${base}/`);
    }
    case 'RegularExpression':
      return new RegExp(`^(?:${m.value})$`).test(path);
  }
}

/** A request as the matcher sees it. */
export interface RequestHead {
  method: string;
  /** Path with query string. */
  path: string;
  /** Lower-case names. */
  headers: Record<string, string>;
}

/** Split "/p?a=1&b=2" into the path and the first value of each query parameter name. */
export function splitQuery(target: string): { path: string; query: Record<string, string> } {
  const q = target.indexOf('?');
  if (q < 0) return { path: target, query: {} };
  const query: Record<string, string> = {};
  for (const pair of target.slice(q + 1).split('&')) {
    if (pair === '') continue;
    const eq = pair.indexOf('=');
    const dec = (s: string) => {
      try {
        return decodeURIComponent(s.replace(/\+/g, ' '));
      } catch {
        return s;
      }
    };
    const name = dec(eq < 0 ? pair : pair.slice(0, eq));
    if (!(name in query)) query[name] = dec(eq < 0 ? '' : pair.slice(eq + 1));
  }
  return { path: target.slice(0, q), query };
}

const valueMatches = (m: { type: 'Exact' | 'RegularExpression'; value: string }, v: string | undefined): boolean =>
  v !== undefined && (m.type === 'Exact' ? v === m.value : new RegExp(`^(?:${m.value})$`).test(v));

/** One match (all of its conditions) against a request. */
export function requestMatches(m: MatchRec, req: RequestHead): boolean {
  const { path, query } = splitQuery(req.path);
  return (
    pathMatches(m.path, path) &&
    (m.method === null || m.method === req.method.toUpperCase()) &&
    m.headers.every((h) => valueMatches(h, req.headers[h.name])) &&
    m.queryParams.every((q) => valueMatches(q, query[q.name]))
  );
}

// ---- precedence -------------------------------------------------------------------

/** A match with what the spec's tie-breaks need. */
export interface RankedMatch {
  match: MatchRec;
  /** Creation time of the route (ISO; '' sorts as oldest-unknown last). */
  created: string;
  /** "ns/name" of the route. */
  route: string;
  rule: number;
  index: number;
}

const PATH_RANK = { Exact: 0, RegularExpression: 1, PathPrefix: 2 } as const;

/**
 * The spec's precedence between matches of one hostname: Exact path, then
 * (implementation-specific, documented) regular expressions, longer first,
 * then the longest PathPrefix; then a method match; then more header
 * matches; then more query parameter matches; then the oldest route; then
 * the route's "ns/name"; then rule order, then match order.
 */
export function compareMatches(a: RankedMatch, b: RankedMatch): number {
  const pa = a.match.path;
  const pb = b.match.path;
  const len = (p: MatchRec['path']) => (p.type === 'PathPrefix' ? prefixBase(p.value).length : p.value.length);
  return (
    PATH_RANK[pa.type] - PATH_RANK[pb.type] ||
    len(pb) - len(pa) ||
    Number(b.match.method !== null) - Number(a.match.method !== null) ||
    b.match.headers.length - a.match.headers.length ||
    b.match.queryParams.length - a.match.queryParams.length ||
    compareCreated(a.created, b.created) ||
    (a.route < b.route ? -1 : a.route > b.route ? 1 : 0) ||
    a.rule - b.rule ||
    a.index - b.index
  );
}

function compareCreated(a: string, b: string): number {
  if (a === b) return 0;
  if (a === '') return 1;
  if (b === '') return -1;
  return Date.parse(a) - Date.parse(b);
}

// ---- filters ------------------------------------------------------------------------

/**
 * The path after a path modifier. ReplacePrefixMatch replaces the matched
 * prefix (whole elements), keeping the rest: prefix "/prefix/one" -> "/one"
 * turns "/prefix/one/two" into "/one/two"; -> "/" turns it into "/two".
 */
export function rewritePath(mod: PathModifierRec, path: string, matchedPrefix: string | null): string {
  if (mod.type === 'ReplaceFullPath') return mod.value;
  const base = prefixBase(matchedPrefix ?? '');
  const rest = path.slice(base.length);
  const out = prefixBase(mod.value) + rest;
  return out === '' ? '/' : out.startsWith('/') ? out : `/${out}`;
}

export interface RedirectInput {
  scheme: 'http' | 'https';
  host: string;
  /** The listener's port (where the request came in). */
  listenerPort: number;
  /** Path with query. */
  path: string;
  matchedPrefix: string | null;
}

/**
 * The Location of a RequestRedirect. Port: the filter's, else the well-known
 * port of a scheme the filter sets, else the listener's port; a port that is
 * the scheme's default (80 for http, 443 for https) is left out.
 */
export function redirectLocation(
  r: { scheme: 'http' | 'https' | null; hostname: string | null; path: PathModifierRec | null; port: number | null },
  req: RedirectInput,
): string {
  const scheme = r.scheme ?? req.scheme;
  const port = r.port ?? (r.scheme !== null ? (r.scheme === 'https' ? 443 : 80) : req.listenerPort);
  const host = r.hostname ?? req.host;
  const { path } = splitQuery(req.path);
  const query = req.path.includes('?') ? req.path.slice(req.path.indexOf('?')) : '';
  const newPath = r.path ? rewritePath(r.path, path, req.matchedPrefix) : path;
  const defaultPort = (scheme === 'http' && port === 80) || (scheme === 'https' && port === 443);
  return `${scheme}://${host}${defaultPort ? '' : `:${port}`}${newPath}${query}`;
}

/** Apply a header modifier to lower-case headers: set replaces, add appends with ",", remove deletes. */
export function modifyHeaders(
  headers: Record<string, string>,
  mod: { set: { name: string; value: string }[]; add: { name: string; value: string }[]; remove: string[] },
): Record<string, string> {
  const out = { ...headers };
  for (const h of mod.set) out[h.name] = h.value;
  for (const h of mod.add) out[h.name] = h.name in out ? `${out[h.name]},${h.value}` : h.value;
  for (const n of mod.remove) delete out[n];
  return out;
}

/** Smooth weighted round robin over weights (the proxy does the same): exact ratios over every sum(weights) picks. */
export function weightedPicks(weights: readonly number[], n: number): number[] {
  const state = weights.map(() => 0);
  const total = weights.reduce((s, w) => s + w, 0);
  const out: number[] = [];
  if (total === 0) return out;
  for (let k = 0; k < n; k++) {
    let best = -1;
    for (let i = 0; i < weights.length; i++) {
      if (weights[i] === 0) continue;
      state[i]! += weights[i]!;
      if (best < 0 || state[i]! > state[best]!) best = i;
    }
    state[best]! -= total;
    out.push(best);
  }
  return out;
}
