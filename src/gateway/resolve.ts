import type { PolicyService } from '../policy/schema.js';
import { compareHostnames, compareMatches, intersectHostnames, type RankedMatch } from './match.js';
import { gatewayProblems } from './problems.js';
import {
  CONTROLLER_NAME,
  GATEWAY_GROUP,
  type BackendRefRec,
  type GatewayClassRec,
  type GatewayRec,
  type HTTPRouteRec,
  type ListenerRec,
  type ParentRefRec,
  type ReferenceGrantRec,
  type RuleRec,
  type TlsSecretRec,
} from './objects.js';
import type { Ingress, IngressBackend, IngressCertificate, IngressGateway, IngressHost, IngressPort, IngressRule } from './schema.js';

/**
 * Gateway API objects -> the compiled Ingress (schema.ts) and the status the
 * spec asks for (GatewayClass, Gateway and per-listener, HTTPRoute per parent
 * conditions with the spec's reasons). Pure: the controller's state comes in
 * through GatewayInputs. A bad listener, route or reference is reported in
 * its own status and left out; everything else keeps serving.
 */

export interface GatewayInputs {
  classes: readonly GatewayClassRec[];
  gateways: readonly GatewayRec[];
  routes: readonly HTTPRouteRec[];
  grants: readonly ReferenceGrantRec[];
  secret(namespace: string, name: string): TlsSecretRec | undefined;
  /** A mesh service with its ready endpoints (the compiler's), undefined when there is none. */
  service(namespace: string, name: string): PolicyService | undefined;
  /** Labels of a namespace (allowedRoutes Selector); undefined when unknown. */
  namespaceLabels(namespace: string): Record<string, string> | undefined;
  nodes: readonly { name: string; labels: Record<string, string> }[];
  controllerName?: string;
}

export interface Condition {
  type: string;
  status: 'True' | 'False' | 'Unknown';
  reason: string;
  message: string;
}

export interface ListenerStatus {
  name: string;
  attachedRoutes: number;
  supportedKinds: { group: string; kind: string }[];
  conditions: Condition[];
}

export interface GatewayStatus {
  namespace: string;
  name: string;
  generation: number;
  conditions: Condition[];
  listeners: ListenerStatus[];
}

export interface RouteParentStatus {
  parentRef: ParentRefRec;
  controllerName: string;
  conditions: Condition[];
}

export interface RouteStatus {
  namespace: string;
  name: string;
  generation: number;
  parents: RouteParentStatus[];
}

export interface ClassStatus {
  name: string;
  generation: number;
  conditions: Condition[];
}

export interface GatewayResolution {
  ingress: Ingress;
  classes: ClassStatus[];
  gateways: GatewayStatus[];
  routes: RouteStatus[];
}

const cond = (type: string, ok: boolean, reason: string, message = ''): Condition => ({ type, status: ok ? 'True' : 'False', reason, message });
const key = (namespace: string, name: string): string => `${namespace}/${name}`;
const labelsMatch = (selector: Record<string, string>, labels: Record<string, string>): boolean => Object.entries(selector).every(([k, v]) => labels[k] === v);
const byCreation = <T extends { creationTimestamp: string; namespace: string; name: string }>(a: T, b: T): number =>
  (a.creationTimestamp === b.creationTimestamp ? 0 : a.creationTimestamp === '' ? 1 : b.creationTimestamp === '' ? -1 : Date.parse(a.creationTimestamp) - Date.parse(b.creationTimestamp)) ||
  key(a.namespace, a.name).localeCompare(key(b.namespace, b.name));

/** Does a ReferenceGrant in `toNamespace` allow `from` (kind in namespace) to refer to `to` (kind/name)? */
export function referenceAllowed(
  grants: readonly ReferenceGrantRec[],
  from: { group: string; kind: string; namespace: string },
  to: { group: string; kind: string; namespace: string; name: string },
): boolean {
  if (from.namespace === to.namespace) return true;
  return grants.some(
    (g) =>
      g.namespace === to.namespace &&
      g.from.some((f) => f.group === from.group && f.kind === from.kind && f.namespace === from.namespace) &&
      g.to.some((t) => t.group === to.group && t.kind === to.kind && (t.name === null || t.name === to.name)),
  );
}

interface ListenerState {
  rec: ListenerRec;
  status: ListenerStatus;
  /** Accepted and programmed: routes may attach. */
  usable: boolean;
  certificate: IngressCertificate | null;
}

interface GatewayState {
  rec: GatewayRec;
  status: GatewayStatus;
  listeners: ListenerState[];
  nodes: string[] | null;
  /** port -> routes attached there, with the hostnames they serve on that port. */
  attached: Map<number, { route: HTTPRouteRec; hostnames: string[] }[]>;
}

const ROUTE_KIND = { group: GATEWAY_GROUP, kind: 'HTTPRoute' };

function checkListeners(gw: GatewayRec, inputs: GatewayInputs, claimed: Map<number, { gateway: string; nodes: string[] | null }>, nodes: string[] | null): ListenerState[] {
  const states = gw.listeners.map((l): ListenerState => ({ rec: l, status: { name: l.name, attachedRoutes: 0, supportedKinds: [], conditions: [] }, usable: false, certificate: null }));
  // Conflicts inside the Gateway: one port, one protocol; one hostname per port.
  const byPort = new Map<number, ListenerState[]>();
  for (const s of states) byPort.set(s.rec.port, [...(byPort.get(s.rec.port) ?? []), s]);
  const conflict = new Map<ListenerState, Condition>();
  for (const group of byPort.values()) {
    if (new Set(group.map((s) => s.rec.protocol)).size > 1) {
      for (const s of group) conflict.set(s, cond('Conflicted', true, 'ProtocolConflict', `port ${s.rec.port} is used with protocols ${[...new Set(group.map((g) => g.rec.protocol))].join(' and ')}`));
      continue;
    }
    const seen = new Map<string, ListenerState>();
    for (const s of group) {
      const h = s.rec.hostname ?? '';
      const first = seen.get(h);
      if (first) {
        const c = cond('Conflicted', true, 'HostnameConflict', `listeners ${first.rec.name} and ${s.rec.name} both serve hostname ${JSON.stringify(h || '*')} on port ${s.rec.port}`);
        conflict.set(first, c);
        conflict.set(s, c);
      } else seen.set(h, s);
    }
  }

  for (const s of states) {
    const l = s.rec;
    const st = s.status;
    const supported = l.protocol === 'HTTP' || l.protocol === 'HTTPS';
    const kinds = l.allowedRoutes.kinds ?? [ROUTE_KIND];
    st.supportedKinds = supported ? kinds.filter((k) => k.group === ROUTE_KIND.group && k.kind === ROUTE_KIND.kind) : [];
    const other = claimed.get(l.port);
    const portTaken = other !== undefined && other.gateway !== key(gw.namespace, gw.name) && (other.nodes === null || nodes === null || other.nodes.some((n) => nodes.includes(n)));
    let accepted: Condition;
    if (!supported) accepted = cond('Accepted', false, 'UnsupportedProtocol', `protocol ${JSON.stringify(l.protocol)} is not supported (HTTP, HTTPS)`);
    else if (l.protocol === 'HTTPS' && l.tls?.mode === 'Passthrough') accepted = cond('Accepted', false, 'UnsupportedValue', 'tls.mode Passthrough is not supported for HTTPS listeners');
    else if (portTaken) accepted = cond('Accepted', false, 'PortUnavailable', `port ${l.port} is already served by Gateway ${other.gateway} on the same nodes`);
    else accepted = cond('Accepted', true, 'Accepted');

    let resolved = cond('ResolvedRefs', true, 'ResolvedRefs');
    if (supported && st.supportedKinds.length === 0) resolved = cond('ResolvedRefs', false, 'InvalidRouteKinds', `none of the allowed route kinds is supported (${kinds.map((k) => `${k.group}/${k.kind}`).join(', ')}); supported: ${GATEWAY_GROUP}/HTTPRoute`);
    else if (supported && st.supportedKinds.length < kinds.length) resolved = cond('ResolvedRefs', false, 'InvalidRouteKinds', `only ${GATEWAY_GROUP}/HTTPRoute is supported`);
    if (l.protocol === 'HTTPS' && accepted.status === 'True') {
      const problems: { reason: string; message: string }[] = [];
      for (const ref of l.tls?.certificateRefs ?? []) {
        const r = checkCertificateRef(gw, ref, inputs);
        if ('problem' in r) problems.push(r.problem);
        else if (!s.certificate) s.certificate = { hostname: l.hostname, secret: key(ref.namespace, ref.name), certPem: r.secret.certPem, keyPem: r.secret.keyPem };
      }
      if ((l.tls?.certificateRefs ?? []).length === 0) problems.push({ reason: 'InvalidCertificateRef', message: 'tls.certificateRefs is empty' });
      if (problems.length > 0) resolved = cond('ResolvedRefs', false, problems[0]!.reason, problems.map((p) => p.message).join('; '));
    }
    const c = conflict.get(s) ?? cond('Conflicted', false, 'NoConflicts');
    const httpsWithoutCert = l.protocol === 'HTTPS' && s.certificate === null;
    s.usable = accepted.status === 'True' && c.status === 'False' && !httpsWithoutCert && st.supportedKinds.length > 0;
    if (s.usable) claimed.set(l.port, { gateway: key(gw.namespace, gw.name), nodes });
    const programmed = s.usable ? cond('Programmed', true, 'Programmed') : cond('Programmed', false, 'Invalid', [accepted, c, resolved].filter((x) => x.reason !== 'Accepted' && x.reason !== 'NoConflicts' && x.reason !== 'ResolvedRefs').map((x) => x.message).join('; ') || 'listener is not valid');
    st.conditions = [accepted, c, resolved, programmed];
  }
  return states;
}

function checkCertificateRef(gw: GatewayRec, ref: { group: string; kind: string; namespace: string; name: string }, inputs: GatewayInputs): { secret: TlsSecretRec } | { problem: { reason: string; message: string } } {
  const name = `Secret ${key(ref.namespace, ref.name)}`;
  if (ref.group !== '' || ref.kind !== 'Secret') return { problem: { reason: 'InvalidCertificateRef', message: `certificateRef ${ref.group}/${ref.kind} ${ref.name}: only core Secrets are supported` } };
  if (!referenceAllowed(inputs.grants, { group: GATEWAY_GROUP, kind: 'Gateway', namespace: gw.namespace }, { group: '', kind: 'Secret', namespace: ref.namespace, name: ref.name })) {
    return { problem: { reason: 'RefNotPermitted', message: `${name} is in another namespace and no ReferenceGrant there allows Gateways of ${gw.namespace}` } };
  }
  const secret = inputs.secret(ref.namespace, ref.name);
  if (!secret) return { problem: { reason: 'InvalidCertificateRef', message: `${name} does not exist` } };
  if (secret.problem) return { problem: { reason: 'InvalidCertificateRef', message: `${name}: ${secret.problem}` } };
  return { secret };
}

/** A backendRef -> what the proxy needs; `problem` when it does not resolve (its share of requests gets 500). */
function resolveBackend(route: HTTPRouteRec, ref: BackendRefRec, inputs: GatewayInputs): { backend: IngressBackend; reason: string | null } {
  const service = key(ref.namespace, ref.name);
  const fail = (reason: string, problem: string) => ({ backend: { service, port: ref.port, weight: ref.weight, endpoints: [], problem }, reason });
  if (ref.group !== '' || ref.kind !== 'Service') return fail('InvalidKind', `backendRef ${ref.group || 'core'}/${ref.kind} ${ref.name}: only Services are supported`);
  if (!referenceAllowed(inputs.grants, { group: GATEWAY_GROUP, kind: 'HTTPRoute', namespace: route.namespace }, { group: '', kind: 'Service', namespace: ref.namespace, name: ref.name })) {
    return fail('RefNotPermitted', `Service ${service} is in another namespace and no ReferenceGrant there allows HTTPRoutes of ${route.namespace}`);
  }
  if (ref.port === null) return fail('UnsupportedValue', `backendRef to Service ${service} needs a port`);
  const svc = inputs.service(ref.namespace, ref.name);
  if (!svc) return fail('BackendNotFound', `Service ${service} does not exist in the mesh`);
  const sp = svc.ports.find((p) => p.port === ref.port && p.protocol === 'TCP');
  if (!sp) return fail('BackendNotFound', `Service ${service} has no TCP port ${ref.port}`);
  const endpoints = svc.endpoints
    .flatMap((e) => {
      const target = e.ports[sp.name];
      return target === undefined ? [] : [{ ip: e.ip, port: target, node: e.node, identity: e.pod && e.serviceAccount ? key(e.pod.namespace, e.serviceAccount) : null }];
    })
    .sort((a, b) => (a.ip === b.ip ? a.port - b.port : a.ip.localeCompare(b.ip, 'en', { numeric: true })));
  return { backend: { service, port: ref.port, weight: ref.weight, endpoints, problem: null }, reason: null };
}

function compileRule(route: HTTPRouteRec, index: number, rule: RuleRec, inputs: GatewayInputs, reasons: string[], messages: string[]): IngressRule {
  const take = (r: { backend: IngressBackend; reason: string | null }) => {
    if (r.reason) {
      reasons.push(r.reason);
      messages.push(r.backend.problem ?? '');
    }
    return r.backend;
  };
  const f = <T extends RuleRec['filters'][number]['type']>(t: T) => rule.filters.find((x) => x.type === t) as Extract<RuleRec['filters'][number], { type: T }> | undefined;
  const redirect = f('RequestRedirect');
  const rewrite = f('URLRewrite');
  return {
    route: key(route.namespace, route.name),
    index,
    requestHeaders: f('RequestHeaderModifier')?.modifier ?? null,
    responseHeaders: f('ResponseHeaderModifier')?.modifier ?? null,
    redirect: redirect ? { scheme: redirect.scheme, hostname: redirect.hostname, path: redirect.path, port: redirect.port, statusCode: redirect.statusCode } : null,
    rewrite: rewrite ? { hostname: rewrite.hostname, path: rewrite.path } : null,
    mirrors: rule.filters.flatMap((x) => (x.type === 'RequestMirror' ? [take(resolveBackend(route, x.backend, inputs))] : [])),
    backends: rule.backendRefs.map((b) => take(resolveBackend(route, b, inputs))),
    requestTimeoutMs: rule.timeouts.requestMs,
    backendRequestTimeoutMs: rule.timeouts.backendRequestMs,
  };
}

/** Which listeners of `gw` a parentRef selects, and why the route cannot attach when none takes it. */
function attach(route: HTTPRouteRec, ref: ParentRefRec, gw: GatewayState, inputs: GatewayInputs): { listeners: { state: ListenerState; hostnames: string[] }[]; refusal: Condition | null } {
  const candidates = gw.listeners.filter((l) => (ref.sectionName === null || l.rec.name === ref.sectionName) && (ref.port === null || l.rec.port === ref.port));
  if (candidates.length === 0) {
    const what = [ref.sectionName !== null ? `sectionName ${JSON.stringify(ref.sectionName)}` : '', ref.port !== null ? `port ${ref.port}` : ''].filter(Boolean).join(' and ');
    return { listeners: [], refusal: cond('Accepted', false, 'NoMatchingParent', `Gateway ${key(gw.rec.namespace, gw.rec.name)} has no listener with ${what}`) };
  }
  const out: { state: ListenerState; hostnames: string[] }[] = [];
  let notAllowed = 0;
  let noHostname = 0;
  for (const l of candidates) {
    if (!l.usable) {
      notAllowed++;
      continue;
    }
    const a = l.rec.allowedRoutes;
    const nsOk =
      a.from === 'All' ||
      (a.from === 'Same' && route.namespace === gw.rec.namespace) ||
      (a.from === 'Selector' && labelsMatch(a.selector ?? {}, inputs.namespaceLabels(route.namespace) ?? {}) && inputs.namespaceLabels(route.namespace) !== undefined);
    if (!nsOk || l.status.supportedKinds.length === 0) {
      notAllowed++;
      continue;
    }
    const hostnames = intersectHostnames(l.rec.hostname, route.hostnames);
    if (hostnames.length === 0) {
      noHostname++;
      continue;
    }
    out.push({ state: l, hostnames });
  }
  if (out.length > 0) return { listeners: out, refusal: null };
  if (noHostname > 0 && notAllowed === 0) return { listeners: [], refusal: cond('Accepted', false, 'NoMatchingListenerHostname', `no hostname of the route (${route.hostnames.join(', ')}) is served by the listeners it names`) };
  return { listeners: [], refusal: cond('Accepted', false, 'NotAllowedByListeners', `the listeners of Gateway ${key(gw.rec.namespace, gw.rec.name)} it names do not allow routes from namespace ${route.namespace} (or are not valid)`) };
}

function buildPort(gw: GatewayState, port: number, inputs: GatewayInputs, attached: { route: HTTPRouteRec; hostnames: string[] }[], ruleIndex: Map<string, { rule: IngressRule; index: number }[]>): IngressPort {
  const listeners = gw.listeners.filter((l) => l.usable && l.rec.port === port);
  const protocol = listeners[0]!.rec.protocol as 'HTTP' | 'HTTPS';
  const rules: IngressRule[] = [];
  const buckets = new Map<string, RankedMatch[]>();
  const seenRoutes = new Map<string, number>();
  for (const { route, hostnames } of attached) {
    const rk = key(route.namespace, route.name);
    let base = seenRoutes.get(rk);
    if (base === undefined) {
      base = rules.length;
      seenRoutes.set(rk, base);
      for (const r of ruleIndex.get(rk) ?? []) rules.push(r.rule);
    }
    for (const h of hostnames) {
      const list = buckets.get(h) ?? [];
      route.rules.forEach((rule, ri) => rule.matches.forEach((match, mi) => list.push({ match, created: route.creationTimestamp, route: rk, rule: base + ri, index: mi })));
      buckets.set(h, list);
    }
  }
  const hosts: IngressHost[] = [...buckets.entries()]
    .sort((a, b) => compareHostnames(a[0], b[0]))
    .map(([hostname, list]) => {
      // One route attached through two listeners of the port lists its matches twice: keep the first.
      const seen = new Set<string>();
      const unique = list.filter((m) => {
        const k = `${m.rule}/${m.index}`;
        if (seen.has(k)) return false;
        seen.add(k);
        return true;
      });
      return {
        hostname,
        matches: unique.sort(compareMatches).map((m) => ({ rule: m.rule, path: m.match.path, method: m.match.method, headers: m.match.headers, queryParams: m.match.queryParams })),
      };
    });
  const certificates = listeners
    .flatMap((l) => (l.certificate ? [l.certificate] : []))
    .sort((a, b) => compareHostnames(a.hostname ?? '*', b.hostname ?? '*'));
  return { port, protocol, listeners: listeners.map((l) => l.rec.name), certificates, hosts, rules };
}

export function resolveGateways(inputs: GatewayInputs): GatewayResolution {
  const controllerName = inputs.controllerName ?? CONTROLLER_NAME;
  const ours = new Map(inputs.classes.filter((c) => c.controllerName === controllerName).map((c) => [c.name, c]));
  const classes: ClassStatus[] = [...ours.values()]
    .sort((a, b) => a.name.localeCompare(b.name))
    .map((c) => ({ name: c.name, generation: c.generation, conditions: [cond('Accepted', true, 'Accepted', `handled by ${controllerName}`), cond('SupportedVersion', true, 'SupportedVersion')] }));

  const claimed = new Map<number, { gateway: string; nodes: string[] | null }>();
  const states = new Map<string, GatewayState>();
  for (const gw of [...inputs.gateways].filter((g) => ours.has(g.className)).sort(byCreation)) {
    const selector = gw.nodeSelector;
    const nodes = selector === null ? null : inputs.nodes.filter((n) => labelsMatch(selector, n.labels)).map((n) => n.name).sort();
    const listeners = checkListeners(gw, inputs, claimed, nodes);
    const anyUsable = listeners.some((l) => l.usable);
    const conditions = [
      anyUsable ? cond('Accepted', true, 'Accepted') : cond('Accepted', false, 'ListenersNotValid', 'no listener is valid; see the listeners\' conditions'),
      !anyUsable
        ? cond('Programmed', false, 'Invalid', 'no listener is valid')
        : nodes !== null && nodes.length === 0
          ? cond('Programmed', false, 'NoResources', `no Node matches the node selector ${Object.entries(selector ?? {}).map(([k, v]) => `${k}=${v}`).join(',')}`)
          : cond('Programmed', true, 'Programmed', nodes === null ? 'served by the proxy of every node' : `served by the proxies of ${nodes.join(', ')}`),
    ];
    states.set(key(gw.namespace, gw.name), { rec: gw, status: { namespace: gw.namespace, name: gw.name, generation: gw.generation, conditions, listeners: listeners.map((l) => l.status) }, listeners, nodes, attached: new Map() });
  }

  const routes: RouteStatus[] = [];
  const ruleIndex = new Map<string, { rule: IngressRule; index: number }[]>();
  for (const route of [...inputs.routes].sort(byCreation)) {
    const parents: RouteParentStatus[] = [];
    let compiled: { rules: IngressRule[]; resolved: Condition } | undefined;
    const compile = () => {
      if (compiled) return compiled;
      const reasons: string[] = [];
      const messages: string[] = [];
      const rules = route.rules.map((r, i) => compileRule(route, i, r, inputs, reasons, messages));
      compiled = { rules, resolved: reasons.length > 0 ? cond('ResolvedRefs', false, reasons[0]!, messages.join('; ')) : cond('ResolvedRefs', true, 'ResolvedRefs') };
      ruleIndex.set(key(route.namespace, route.name), rules.map((rule, index) => ({ rule, index })));
      return compiled;
    };
    for (const ref of route.parentRefs) {
      if (ref.group !== GATEWAY_GROUP || ref.kind !== 'Gateway') continue;
      const gw = states.get(key(ref.namespace, ref.name));
      // A Gateway that is not ours (or does not exist) gets no status from us: its own controller writes it.
      if (!gw) continue;
      const { listeners, refusal } = attach(route, ref, gw, inputs);
      const c = compile();
      if (refusal) {
        parents.push({ parentRef: ref, controllerName, conditions: [refusal, c.resolved] });
        continue;
      }
      for (const { state, hostnames } of listeners) {
        state.status.attachedRoutes++;
        const list = gw.attached.get(state.rec.port) ?? [];
        list.push({ route, hostnames });
        gw.attached.set(state.rec.port, list);
      }
      parents.push({ parentRef: ref, controllerName, conditions: [cond('Accepted', true, 'Accepted'), c.resolved] });
    }
    // Also without a parent of ours: status.ts then removes the entries we wrote before, if any.
    routes.push({ namespace: route.namespace, name: route.name, generation: route.generation, parents });
  }

  const gateways: IngressGateway[] = [];
  for (const gw of states.values()) {
    const ports = [...new Set(gw.listeners.filter((l) => l.usable).map((l) => l.rec.port))].sort((a, b) => a - b);
    if (ports.length === 0 || (gw.nodes !== null && gw.nodes.length === 0)) continue;
    gateways.push({
      namespace: gw.rec.namespace,
      name: gw.rec.name,
      identity: { namespace: gw.rec.namespace, serviceAccount: gw.rec.serviceAccount },
      nodes: gw.nodes,
      ports: ports.map((p) => buildPort(gw, p, inputs, gw.attached.get(p) ?? [], ruleIndex)),
    });
  }
  gateways.sort((a, b) => key(a.namespace, a.name).localeCompare(key(b.namespace, b.name)));
  const statuses = [...states.values()].map((s) => s.status);
  const problems = gatewayProblems(statuses, routes);
  return { ingress: problems.length > 0 ? { gateways, problems } : { gateways }, classes, gateways: statuses, routes };
}
