import { z } from 'zod';
import { FieldError } from '../policy/fields.js';
import { formatPath } from '../policy/schema.js';

/**
 * Gateway API (gateway.networking.k8s.io/v1) objects as the controller reads
 * them: GatewayClass, Gateway, HTTPRoute, ReferenceGrant, and the TLS Secrets
 * listeners name. Each is checked field by field and reduced to a record; a
 * malformed object throws FieldError naming the field (the compiler reports
 * it and keeps its last good record). What the objects *mean* together
 * (attachment, references, precedence) is resolve.ts; this file only reads.
 */

export const GATEWAY_GROUP = 'gateway.networking.k8s.io';
export const GATEWAY_API_VERSION = `${GATEWAY_GROUP}/v1`;
/** ReferenceGrant is served as v1beta1 (it never reached v1 in the standard channel). */
export const REFERENCE_GRANT_API_VERSION = `${GATEWAY_GROUP}/v1beta1`;
/** GatewayClass.spec.controllerName this project answers to. */
export const CONTROLLER_NAME = 'fsm-node.io/gateway-controller';
/**
 * Gateway annotation: a label selector (`k=v,k2=v2`) of the Nodes whose
 * proxies serve the Gateway. Without it every node serves it.
 */
export const ANNOTATION_NODE_SELECTOR = 'gateway.fsm-node.io/node-selector';
/**
 * Gateway annotation: the service account (in the Gateway's namespace) whose
 * identity the gateway's traffic into the mesh carries. Default: the Gateway's name.
 */
export const ANNOTATION_SERVICE_ACCOUNT = 'gateway.fsm-node.io/service-account';

const dns = z.string().min(1).max(253).regex(/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/, 'must be a lowercase RFC 1123 name');
const sectionName = z.string().min(1).max(253).regex(/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/, 'must be a lowercase RFC 1123 label');
const strMap = z.record(z.string()).nullish().transform((m) => m ?? {});
const port = z.number().int().min(1).max(65535);
/** A hostname as Gateway API allows it: RFC 1123, optionally with one leading "*." label, no IP address. */
const hostname = z
  .string()
  .min(1)
  .max(253)
  .regex(/^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/, 'must be a lowercase DNS name, optionally starting with "*."')
  .refine((h) => !/^[0-9.]+$/.test(h), 'must not be an IP address');
const group = z.string().max(253).nullish();
const kind = z.string().min(1).max(63).nullish();

const Metadata = z.object({
  name: dns,
  namespace: dns.optional(),
  generation: z.number().int().min(0).optional(),
  creationTimestamp: z.string().nullish(),
  labels: strMap,
  annotations: strMap,
});

// ---- records ----------------------------------------------------------------

export interface GatewayClassRec {
  name: string;
  controllerName: string;
  generation: number;
}

export interface ObjectKindRef {
  group: string;
  kind: string;
}

export interface SecretRefRec {
  group: string;
  kind: string;
  namespace: string;
  name: string;
}

export interface ListenerRec {
  name: string;
  port: number;
  /** As written: HTTP and HTTPS are served; anything else is reported UnsupportedProtocol. */
  protocol: string;
  hostname: string | null;
  tls: { mode: 'Terminate' | 'Passthrough'; certificateRefs: SecretRefRec[] } | null;
  allowedRoutes: {
    from: 'Same' | 'All' | 'Selector';
    /** matchLabels of `from: Selector`. */
    selector: Record<string, string> | null;
    /** null: the protocol's default (HTTPRoute for HTTP and HTTPS). */
    kinds: ObjectKindRef[] | null;
  };
}

export interface GatewayRec {
  namespace: string;
  name: string;
  generation: number;
  creationTimestamp: string;
  className: string;
  listeners: ListenerRec[];
  /** From ANNOTATION_NODE_SELECTOR; null = every node. */
  nodeSelector: Record<string, string> | null;
  serviceAccount: string;
}

export interface ParentRefRec {
  group: string;
  kind: string;
  namespace: string;
  name: string;
  sectionName: string | null;
  port: number | null;
}

export type PathMatchType = 'Exact' | 'PathPrefix' | 'RegularExpression';
export type ValueMatchType = 'Exact' | 'RegularExpression';

export interface MatchRec {
  path: { type: PathMatchType; value: string };
  /** Names lower-cased; only the first entry of a name counts (spec), later ones are dropped here. */
  headers: { type: ValueMatchType; name: string; value: string }[];
  /** Names as written (query parameter names are case-sensitive); first entry of a name counts. */
  queryParams: { type: ValueMatchType; name: string; value: string }[];
  method: string | null;
}

export interface HeaderModifierRec {
  set: { name: string; value: string }[];
  add: { name: string; value: string }[];
  remove: string[];
}

export type PathModifierRec = { type: 'ReplaceFullPath'; value: string } | { type: 'ReplacePrefixMatch'; value: string };

export interface BackendRefRec {
  group: string;
  kind: string;
  namespace: string;
  name: string;
  port: number | null;
  weight: number;
}

export type FilterRec =
  | { type: 'RequestHeaderModifier'; modifier: HeaderModifierRec }
  | { type: 'ResponseHeaderModifier'; modifier: HeaderModifierRec }
  | {
      type: 'RequestRedirect';
      scheme: 'http' | 'https' | null;
      hostname: string | null;
      path: PathModifierRec | null;
      port: number | null;
      statusCode: number;
    }
  | { type: 'URLRewrite'; hostname: string | null; path: PathModifierRec | null }
  | { type: 'RequestMirror'; backend: BackendRefRec };

export interface RuleRec {
  matches: MatchRec[];
  filters: FilterRec[];
  backendRefs: BackendRefRec[];
  /** Milliseconds; null = none. */
  timeouts: { requestMs: number | null; backendRequestMs: number | null };
}

export interface HTTPRouteRec {
  namespace: string;
  name: string;
  generation: number;
  creationTimestamp: string;
  parentRefs: ParentRefRec[];
  hostnames: string[];
  rules: RuleRec[];
}

export interface ReferenceGrantRec {
  namespace: string;
  name: string;
  from: { group: string; kind: string; namespace: string }[];
  to: { group: string; kind: string; name: string | null }[];
}

export interface TlsSecretRec {
  namespace: string;
  name: string;
  /** PEM; empty when the Secret is not a usable TLS Secret (then `problem` says why). */
  certPem: string;
  keyPem: string;
  problem: string | null;
}

// ---- input schemas ------------------------------------------------------------

const GatewayClassIn = z.object({ metadata: Metadata, spec: z.object({ controllerName: z.string().min(1).max(253) }) });

const SecretRefIn = z.object({ group: group, kind: kind, name: dns, namespace: dns.nullish() });

const ListenerIn = z.object({
  name: sectionName,
  hostname: hostname.nullish(),
  port,
  protocol: z.string().min(1).max(255),
  tls: z
    .object({
      mode: z.enum(['Terminate', 'Passthrough']).nullish(),
      certificateRefs: z.array(SecretRefIn).max(64).nullish(),
    })
    .nullish(),
  allowedRoutes: z
    .object({
      namespaces: z
        .object({
          from: z.enum(['Same', 'All', 'Selector']).nullish(),
          selector: z.object({ matchLabels: z.record(z.string()).nullish(), matchExpressions: z.array(z.unknown()).nullish() }).nullish(),
        })
        .nullish(),
      kinds: z.array(z.object({ group: group, kind: z.string().min(1) })).max(8).nullish(),
    })
    .nullish(),
});

const GatewayIn = z.object({
  metadata: Metadata,
  spec: z.object({ gatewayClassName: dns, listeners: z.array(ListenerIn).min(1).max(64) }),
});

const ParentRefIn = z.object({ group: group, kind: kind, namespace: dns.nullish(), name: dns, sectionName: sectionName.nullish(), port: port.nullish() });

const ValueMatchIn = z.object({ type: z.enum(['Exact', 'RegularExpression']).nullish(), name: z.string().min(1).max(256), value: z.string().max(4096) });

const MatchIn = z.object({
  path: z.object({ type: z.enum(['Exact', 'PathPrefix', 'RegularExpression']).nullish(), value: z.string().max(1024).nullish() }).nullish(),
  headers: z.array(ValueMatchIn).max(16).nullish(),
  queryParams: z.array(ValueMatchIn).max(16).nullish(),
  method: z.enum(['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'CONNECT', 'OPTIONS', 'TRACE', 'PATCH']).nullish(),
});

const HeaderIn = z.object({ name: z.string().min(1).max(256), value: z.string().max(4096) });
const HeaderModifierIn = z.object({
  set: z.array(HeaderIn).max(16).nullish(),
  add: z.array(HeaderIn).max(16).nullish(),
  remove: z.array(z.string().min(1).max(256)).max(16).nullish(),
});

const PathModifierIn = z.object({
  type: z.enum(['ReplaceFullPath', 'ReplacePrefixMatch']),
  replaceFullPath: z.string().max(1024).nullish(),
  replacePrefixMatch: z.string().max(1024).nullish(),
});

const BackendRefIn = z.object({
  group: group,
  kind: kind,
  name: dns,
  namespace: dns.nullish(),
  port: port.nullish(),
  weight: z.number().int().min(0).max(1_000_000).nullish(),
  filters: z.array(z.unknown()).nullish(),
});

const FilterIn = z.object({
  type: z.string().min(1),
  requestHeaderModifier: HeaderModifierIn.nullish(),
  responseHeaderModifier: HeaderModifierIn.nullish(),
  requestRedirect: z
    .object({
      scheme: z.enum(['http', 'https']).nullish(),
      hostname: hostname.nullish(),
      path: PathModifierIn.nullish(),
      port: port.nullish(),
      statusCode: z.union([z.literal(301), z.literal(302), z.literal(303), z.literal(307), z.literal(308)]).nullish(),
    })
    .nullish(),
  urlRewrite: z.object({ hostname: hostname.nullish(), path: PathModifierIn.nullish() }).nullish(),
  requestMirror: z.object({ backendRef: BackendRefIn }).nullish(),
});

const RuleIn = z.object({
  matches: z.array(MatchIn).max(64).nullish(),
  filters: z.array(FilterIn).max(16).nullish(),
  backendRefs: z.array(BackendRefIn).max(16).nullish(),
  timeouts: z.object({ request: z.string().nullish(), backendRequest: z.string().nullish() }).nullish(),
});

const HTTPRouteIn = z.object({
  metadata: Metadata,
  spec: z.object({
    parentRefs: z.array(ParentRefIn).max(32).nullish(),
    hostnames: z.array(hostname).max(16).nullish(),
    rules: z.array(RuleIn).max(16).nullish(),
  }),
});

const ReferenceGrantIn = z.object({
  metadata: Metadata,
  spec: z.object({
    from: z.array(z.object({ group: z.string().max(253), kind: z.string().min(1), namespace: dns })).min(1).max(16),
    to: z.array(z.object({ group: z.string().max(253), kind: z.string().min(1), name: dns.nullish() })).min(1).max(16),
  }),
});

const SecretIn = z.object({ metadata: Metadata, type: z.string().nullish(), data: z.record(z.string()).nullish() });

// ---- helpers --------------------------------------------------------------------

function parse<S extends z.ZodTypeAny>(schema: S, obj: unknown): z.infer<S> {
  const r = schema.safeParse(obj);
  if (r.success) return r.data;
  const first = r.error.issues[0]!;
  const at = first.path.reduce<unknown>((o, k) => (o && typeof o === 'object' ? (o as Record<string | number, unknown>)[k] : undefined), obj);
  throw new FieldError(formatPath(first.path), at === undefined ? first.message : `${first.message} (got ${JSON.stringify(at)})`);
}

/**
 * A Gateway API Duration (GEP-2257): one to four `<number><unit>` pairs,
 * units h, m, s, ms, e.g. "10s", "1m30s", "500ms". Milliseconds.
 */
export function parseGatewayDuration(value: string, field: string): number {
  if (!/^([0-9]{1,5}(h|m|s|ms)){1,4}$/.test(value)) throw new FieldError(field, `${JSON.stringify(value)} is not a duration like "10s", "1m30s" or "500ms"`);
  const unit: Record<string, number> = { h: 3_600_000, m: 60_000, s: 1000, ms: 1 };
  let ms = 0;
  for (const m of value.matchAll(/([0-9]+)(ms|h|m|s)/g)) ms += Number(m[1]) * unit[m[2]!]!;
  return ms;
}

/** `k=v,k2=v2` -> matchLabels; throws FieldError on anything else. */
export function parseLabelSelector(value: string, field: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of value.split(',').map((s) => s.trim())) {
    const m = /^([A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?)=([-A-Za-z0-9_.]*)$/.exec(part);
    if (!m) throw new FieldError(field, `${JSON.stringify(value)} is not a label selector like "key=value,key2=value2" (item ${JSON.stringify(part)})`);
    out[m[1]!] = m[3]!;
  }
  return out;
}

function checkRegex(value: string, field: string): void {
  try {
    new RegExp(value);
  } catch (err) {
    throw new FieldError(field, `${JSON.stringify(value)} is not a regular expression: ${(err as Error).message}`);
  }
}

const HEADER_NAME = /^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$/;
function checkHeaderName(name: string, field: string): void {
  if (!HEADER_NAME.test(name)) throw new FieldError(field, `${JSON.stringify(name)} is not an HTTP header name`);
}

function toModifier(m: z.infer<typeof HeaderModifierIn>, at: string): HeaderModifierRec {
  const seen = new Set<string>();
  const pairs = (list: { name: string; value: string }[] | null | undefined, key: string) =>
    (list ?? []).map((h, i) => {
      checkHeaderName(h.name, `${at}.${key}[${i}].name`);
      const lower = h.name.toLowerCase();
      // The spec: a header name may appear once across set, add and remove.
      if (seen.has(lower)) throw new FieldError(`${at}.${key}[${i}].name`, `header ${JSON.stringify(h.name)} is modified more than once`);
      seen.add(lower);
      return { name: lower, value: h.value };
    });
  const set = pairs(m.set, 'set');
  const add = pairs(m.add, 'add');
  const remove = (m.remove ?? []).map((n, i) => {
    checkHeaderName(n, `${at}.remove[${i}]`);
    const lower = n.toLowerCase();
    if (seen.has(lower)) throw new FieldError(`${at}.remove[${i}]`, `header ${JSON.stringify(n)} is modified more than once`);
    seen.add(lower);
    return lower;
  });
  return { set, add, remove };
}

function toPathModifier(p: z.infer<typeof PathModifierIn>, at: string): PathModifierRec {
  const value = p.type === 'ReplaceFullPath' ? p.replaceFullPath : p.replacePrefixMatch;
  const key = p.type === 'ReplaceFullPath' ? 'replaceFullPath' : 'replacePrefixMatch';
  if (value == null) throw new FieldError(`${at}.${key}`, `is required when type is ${p.type}`);
  if (!value.startsWith('/')) throw new FieldError(`${at}.${key}`, `${JSON.stringify(value)} must start with "/"`);
  return { type: p.type, value };
}

function toBackendRef(b: z.infer<typeof BackendRefIn>, routeNs: string): BackendRefRec {
  return { group: b.group ?? '', kind: b.kind ?? 'Service', namespace: b.namespace ?? routeNs, name: b.name, port: b.port ?? null, weight: b.weight ?? 1 };
}

function firstOfEachName<T extends { name: string }>(list: T[], key: (n: string) => string): T[] {
  const seen = new Set<string>();
  return list.filter((x) => {
    const k = key(x.name);
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}

function toMatch(m: z.infer<typeof MatchIn>, at: string): MatchRec {
  const type = m.path?.type ?? 'PathPrefix';
  const value = m.path?.value ?? '/';
  if (type !== 'RegularExpression' && !value.startsWith('/')) throw new FieldError(`${at}.path.value`, `${JSON.stringify(value)} must start with "/"`);
  if (type !== 'RegularExpression' && /\/\/|\/\.\.?(\/|$)|[#?]/.test(value)) throw new FieldError(`${at}.path.value`, `${JSON.stringify(value)} must not contain "//", "/./", "/../", "#" or "?"`);
  if (type === 'RegularExpression') checkRegex(value, `${at}.path.value`);
  const values = (list: z.infer<typeof ValueMatchIn>[] | null | undefined, key: string, lower: boolean) =>
    firstOfEachName(
      (list ?? []).map((h, i) => {
        const t = h.type ?? 'Exact';
        if (key === 'headers') checkHeaderName(h.name, `${at}.${key}[${i}].name`);
        if (t === 'RegularExpression') checkRegex(h.value, `${at}.${key}[${i}].value`);
        return { type: t, name: lower ? h.name.toLowerCase() : h.name, value: h.value };
      }),
      (n) => n,
    );
  return { path: { type, value }, headers: values(m.headers, 'headers', true), queryParams: values(m.queryParams, 'queryParams', false), method: m.method ?? null };
}

function toFilter(f: z.infer<typeof FilterIn>, at: string, routeNs: string): FilterRec {
  const need = <T>(v: T | null | undefined, key: string): T => {
    if (v == null) throw new FieldError(`${at}.${key}`, `is required when type is ${f.type}`);
    return v;
  };
  switch (f.type) {
    case 'RequestHeaderModifier':
      return { type: f.type, modifier: toModifier(need(f.requestHeaderModifier, 'requestHeaderModifier'), `${at}.requestHeaderModifier`) };
    case 'ResponseHeaderModifier':
      return { type: f.type, modifier: toModifier(need(f.responseHeaderModifier, 'responseHeaderModifier'), `${at}.responseHeaderModifier`) };
    case 'RequestRedirect': {
      const r = need(f.requestRedirect, 'requestRedirect');
      return {
        type: f.type,
        scheme: r.scheme ?? null,
        hostname: r.hostname ?? null,
        path: r.path ? toPathModifier(r.path, `${at}.requestRedirect.path`) : null,
        port: r.port ?? null,
        statusCode: r.statusCode ?? 302,
      };
    }
    case 'URLRewrite': {
      const r = need(f.urlRewrite, 'urlRewrite');
      return { type: f.type, hostname: r.hostname ?? null, path: r.path ? toPathModifier(r.path, `${at}.urlRewrite.path`) : null };
    }
    case 'RequestMirror':
      return { type: f.type, backend: toBackendRef(need(f.requestMirror, 'requestMirror').backendRef, routeNs) };
    default:
      throw new FieldError(`${at}.type`, `${JSON.stringify(f.type)} is not supported (supported: RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror)`);
  }
}

function toRule(r: z.infer<typeof RuleIn>, at: string, routeNs: string): RuleRec {
  const matches = (r.matches && r.matches.length > 0 ? r.matches : [{}]).map((m, i) => toMatch(m, `${at}.matches[${i}]`));
  const filters = (r.filters ?? []).map((f, i) => toFilter(f, `${at}.filters[${i}]`, routeNs));
  const count = (t: string) => filters.filter((f) => f.type === t).length;
  for (const t of ['RequestHeaderModifier', 'ResponseHeaderModifier', 'RequestRedirect', 'URLRewrite']) {
    if (count(t) > 1) throw new FieldError(`${at}.filters`, `${t} may appear only once per rule`);
  }
  if (count('RequestRedirect') > 0 && count('URLRewrite') > 0) throw new FieldError(`${at}.filters`, 'RequestRedirect and URLRewrite cannot be used together');
  const backendRefs = (r.backendRefs ?? []).map((b) => toBackendRef(b, routeNs));
  if (count('RequestRedirect') > 0 && backendRefs.length > 0) throw new FieldError(`${at}.backendRefs`, 'must be empty when the rule has a RequestRedirect filter');
  // ReplacePrefixMatch replaces "the prefix matched": only meaningful when every match is a PathPrefix.
  for (const f of filters) {
    const path = f.type === 'RequestRedirect' || f.type === 'URLRewrite' ? f.path : null;
    if (path?.type === 'ReplacePrefixMatch' && matches.some((m) => m.path.type !== 'PathPrefix')) {
      throw new FieldError(`${at}.filters`, `${f.type} with ReplacePrefixMatch needs every match of the rule to be a PathPrefix path match`);
    }
  }
  const requestMs = r.timeouts?.request ? parseGatewayDuration(r.timeouts.request, `${at}.timeouts.request`) : null;
  const backendRequestMs = r.timeouts?.backendRequest ? parseGatewayDuration(r.timeouts.backendRequest, `${at}.timeouts.backendRequest`) : null;
  if (requestMs !== null && backendRequestMs !== null && requestMs > 0 && backendRequestMs > requestMs) {
    throw new FieldError(`${at}.timeouts.backendRequest`, `${r.timeouts!.backendRequest} must not be longer than timeouts.request ${r.timeouts!.request}`);
  }
  return { matches, filters, backendRefs, timeouts: { requestMs: requestMs || null, backendRequestMs: backendRequestMs || null } };
}

// ---- conversion -----------------------------------------------------------------

export function toGatewayClass(o: unknown): GatewayClassRec {
  const { metadata: m, spec } = parse(GatewayClassIn, o);
  return { name: m.name, controllerName: spec.controllerName, generation: m.generation ?? 0 };
}

export function toGateway(o: unknown): GatewayRec {
  const { metadata: m, spec } = parse(GatewayIn, o);
  const namespace = m.namespace ?? 'default';
  const names = new Set<string>();
  const listeners = spec.listeners.map((l, i): ListenerRec => {
    const at = `spec.listeners[${i}]`;
    if (names.has(l.name)) throw new FieldError(`${at}.name`, `duplicate listener name ${JSON.stringify(l.name)}`);
    names.add(l.name);
    const ns = l.allowedRoutes?.namespaces;
    if (ns?.from === 'Selector' && !ns.selector) throw new FieldError(`${at}.allowedRoutes.namespaces.selector`, 'is required when from is Selector');
    if (ns?.selector?.matchExpressions?.length) throw new FieldError(`${at}.allowedRoutes.namespaces.selector.matchExpressions`, 'is not supported; use matchLabels');
    if (l.protocol === 'HTTPS' && !l.tls) throw new FieldError(`${at}.tls`, 'is required for protocol HTTPS');
    return {
      name: l.name,
      port: l.port,
      protocol: l.protocol,
      hostname: l.hostname ?? null,
      tls: l.tls
        ? {
            mode: l.tls.mode ?? 'Terminate',
            certificateRefs: (l.tls.certificateRefs ?? []).map((r) => ({ group: r.group ?? '', kind: r.kind ?? 'Secret', namespace: r.namespace ?? namespace, name: r.name })),
          }
        : null,
      allowedRoutes: {
        from: ns?.from ?? 'Same',
        selector: ns?.from === 'Selector' ? (ns.selector?.matchLabels ?? {}) : null,
        kinds: l.allowedRoutes?.kinds ? l.allowedRoutes.kinds.map((k) => ({ group: k.group ?? GATEWAY_GROUP, kind: k.kind })) : null,
      },
    };
  });
  const selector = m.annotations[ANNOTATION_NODE_SELECTOR];
  const sa = m.annotations[ANNOTATION_SERVICE_ACCOUNT] ?? m.name;
  if (!dns.safeParse(sa).success) throw new FieldError(`metadata.annotations["${ANNOTATION_SERVICE_ACCOUNT}"]`, `${JSON.stringify(sa)} is not a service account name`);
  return {
    namespace,
    name: m.name,
    generation: m.generation ?? 0,
    creationTimestamp: m.creationTimestamp ?? '',
    className: spec.gatewayClassName,
    listeners,
    nodeSelector: selector === undefined ? null : parseLabelSelector(selector, `metadata.annotations["${ANNOTATION_NODE_SELECTOR}"]`),
    serviceAccount: sa,
  };
}

export function toHTTPRoute(o: unknown): HTTPRouteRec {
  const { metadata: m, spec } = parse(HTTPRouteIn, o);
  const namespace = m.namespace ?? 'default';
  return {
    namespace,
    name: m.name,
    generation: m.generation ?? 0,
    creationTimestamp: m.creationTimestamp ?? '',
    parentRefs: (spec.parentRefs ?? []).map((p) => ({
      group: p.group ?? GATEWAY_GROUP,
      kind: p.kind ?? 'Gateway',
      namespace: p.namespace ?? namespace,
      name: p.name,
      sectionName: p.sectionName ?? null,
      port: p.port ?? null,
    })),
    hostnames: spec.hostnames ?? [],
    rules: (spec.rules && spec.rules.length > 0 ? spec.rules : [{}]).map((r, i) => toRule(r, `spec.rules[${i}]`, namespace)),
  };
}

export function toReferenceGrant(o: unknown): ReferenceGrantRec {
  const { metadata: m, spec } = parse(ReferenceGrantIn, o);
  return { namespace: m.namespace ?? 'default', name: m.name, from: spec.from, to: spec.to.map((t) => ({ group: t.group, kind: t.kind, name: t.name ?? null })) };
}

/** A Secret as a listener certificate: kubernetes.io/tls with PEM tls.crt and tls.key. Never throws for content: a listener reports it. */
export function toTlsSecret(o: unknown): TlsSecretRec {
  const { metadata: m, type, data } = parse(SecretIn, o);
  const base = { namespace: m.namespace ?? 'default', name: m.name };
  const decode = (k: string) => (data?.[k] === undefined ? '' : Buffer.from(data[k]!, 'base64').toString('utf8'));
  const certPem = decode('tls.crt');
  const keyPem = decode('tls.key');
  let problem: string | null = null;
  if ((type ?? 'Opaque') !== 'kubernetes.io/tls') problem = `type is ${JSON.stringify(type ?? 'Opaque')}, not kubernetes.io/tls`;
  else if (!certPem.includes('-----BEGIN CERTIFICATE-----')) problem = 'data["tls.crt"] holds no PEM certificate';
  else if (!/-----BEGIN [A-Z ]*PRIVATE KEY-----/.test(keyPem)) problem = 'data["tls.key"] holds no PEM private key';
  return problem ? { ...base, certPem: '', keyPem: '', problem } : { ...base, certPem, keyPem, problem };
}
