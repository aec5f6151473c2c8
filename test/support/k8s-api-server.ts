import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { KubeConfig } from '@kubernetes/client-node';

/**
 * A local Kubernetes API server for tests: an in-memory object store behind
 * the REST paths client-node uses, with list/watch implemented the way the
 * real server does it, so the real client-node informers can be tested:
 *
 * - one global resourceVersion counter; every write bumps it and stamps the object;
 * - list returns the current resourceVersion; watch from a resourceVersion
 *   replays the history after it, then streams ADDED/MODIFIED/DELETED live;
 *   watch without one starts with synthetic ADDED events for the current state;
 * - compact() forgets history: a watch resuming from before it gets an
 *   ERROR event with a 410 Status ("too old resource version") and is closed,
 *   which is what makes a client relist;
 * - BOOKMARK events (only to watches that sent allowWatchBookmarks=true);
 * - label selectors (=, ==, !=, exists, !exists, in, notin) and the field
 *   selectors metadata.name, metadata.namespace and spec.nodeName, with
 *   objects moving in and out of a selector seen as ADDED/DELETED;
 * - timeoutSeconds ends a watch cleanly; dropWatches() kills the connections;
 * - create/get/replace/delete, generateName, 409 on conflicts;
 * - metadata.generation: 1 at creation, +1 when anything but metadata and
 *   status changes (as for objects with a status subresource);
 * - PATCH of an object or of its `status` subresource with a JSON merge
 *   patch (RFC 7386; other patch types get 415, as a type the real server
 *   does not take for that object would): a status patch changes only
 *   status and never the generation, an object patch everything but status;
 * - TokenReview from a table of tokens set by the test;
 * - PUT of the `status` subresource replaces only the status;
 * - failNext() injects an error status for the next matching requests.
 */

export interface ApiResource {
  group: string;
  version: string;
  plural: string;
  kind: string;
  namespaced: boolean;
}

export const RESOURCES: ApiResource[] = [
  { group: '', version: 'v1', plural: 'namespaces', kind: 'Namespace', namespaced: false },
  { group: '', version: 'v1', plural: 'nodes', kind: 'Node', namespaced: false },
  { group: '', version: 'v1', plural: 'pods', kind: 'Pod', namespaced: true },
  { group: '', version: 'v1', plural: 'services', kind: 'Service', namespaced: true },
  { group: '', version: 'v1', plural: 'configmaps', kind: 'ConfigMap', namespaced: true },
  { group: '', version: 'v1', plural: 'secrets', kind: 'Secret', namespaced: true },
  { group: '', version: 'v1', plural: 'events', kind: 'Event', namespaced: true },
  { group: 'discovery.k8s.io', version: 'v1', plural: 'endpointslices', kind: 'EndpointSlice', namespaced: true },
  { group: 'certificates.k8s.io', version: 'v1', plural: 'certificatesigningrequests', kind: 'CertificateSigningRequest', namespaced: false },
  { group: 'split.smi-spec.io', version: 'v1alpha4', plural: 'trafficsplits', kind: 'TrafficSplit', namespaced: true },
  { group: 'access.smi-spec.io', version: 'v1alpha3', plural: 'traffictargets', kind: 'TrafficTarget', namespaced: true },
  { group: 'specs.smi-spec.io', version: 'v1alpha4', plural: 'httproutegroups', kind: 'HTTPRouteGroup', namespaced: true },
  { group: 'specs.smi-spec.io', version: 'v1alpha4', plural: 'tcproutes', kind: 'TCPRoute', namespaced: true },
  { group: 'specs.fsm-node.io', version: 'v1alpha1', plural: 'mqttroutegroups', kind: 'MQTTRouteGroup', namespaced: true },
  { group: 'gateway.networking.k8s.io', version: 'v1', plural: 'gatewayclasses', kind: 'GatewayClass', namespaced: false },
  { group: 'gateway.networking.k8s.io', version: 'v1', plural: 'gateways', kind: 'Gateway', namespaced: true },
  { group: 'gateway.networking.k8s.io', version: 'v1', plural: 'httproutes', kind: 'HTTPRoute', namespaced: true },
  { group: 'gateway.networking.k8s.io', version: 'v1beta1', plural: 'referencegrants', kind: 'ReferenceGrant', namespaced: true },
  { group: 'policy.flomesh.io', version: 'v1alpha1', plural: 'egresses', kind: 'Egress', namespaced: true },
  { group: 'multicluster.x-k8s.io', version: 'v1alpha1', plural: 'serviceexports', kind: 'ServiceExport', namespaced: true },
  { group: 'multicluster.x-k8s.io', version: 'v1alpha1', plural: 'serviceimports', kind: 'ServiceImport', namespaced: true },
  { group: 'multicluster.fsm-node.io', version: 'v1alpha1', plural: 'globaltrafficpolicies', kind: 'GlobalTrafficPolicy', namespaced: true },
  { group: 'policy.flomesh.io', version: 'v1alpha1', plural: 'retries', kind: 'Retry', namespaced: true },
  { group: 'policy.flomesh.io', version: 'v1alpha1', plural: 'upstreamtrafficsettings', kind: 'UpstreamTrafficSetting', namespaced: true },
];

export type Obj = {
  apiVersion?: string;
  kind?: string;
  metadata: { name?: string; generateName?: string; namespace?: string; resourceVersion?: string; uid?: string; labels?: Record<string, string>; [k: string]: unknown };
  [k: string]: unknown;
};

type EventType = 'ADDED' | 'MODIFIED' | 'DELETED';
interface HistoryEvent {
  rv: number;
  type: EventType;
  res: ApiResource;
  obj: Obj;
  old: Obj | undefined;
}

interface Watcher {
  res: ApiResource;
  namespace: string | undefined;
  match: (o: Obj) => boolean;
  bookmarks: boolean;
  res_: ServerResponse;
}

export interface RequestRecord {
  method: string;
  path: string;
  query: Record<string, string>;
  contentType?: string;
}

/** RFC 7386: objects merge key by key, null removes a key, anything else (arrays too) replaces. */
export function mergePatch(target: unknown, patch: unknown): unknown {
  if (patch === null || typeof patch !== 'object' || Array.isArray(patch)) return patch;
  const out: Record<string, unknown> = target !== null && typeof target === 'object' && !Array.isArray(target) ? { ...(target as Record<string, unknown>) } : {};
  for (const [k, v] of Object.entries(patch as Record<string, unknown>)) {
    if (v === null) delete out[k];
    else out[k] = mergePatch(out[k], v);
  }
  return out;
}

/** Everything of an object but metadata and status: what moves metadata.generation. */
const specOf = (o: Obj): string => JSON.stringify({ ...o, metadata: undefined, status: undefined, apiVersion: undefined, kind: undefined });

const apiVersionOf = (r: ApiResource): string => (r.group ? `${r.group}/${r.version}` : r.version);
const clone = <T>(o: T): T => JSON.parse(JSON.stringify(o)) as T;

class HttpError extends Error {
  constructor(
    readonly code: number,
    readonly reason: string,
    message: string,
  ) {
    super(message);
  }
}

export class TestApiServer {
  /** Every request received, for assertions on what the client asked (selectors, bookmarks...). */
  readonly requests: RequestRecord[] = [];
  /** TokenReview answers: token -> user; unknown tokens are not authenticated. */
  readonly tokens = new Map<string, { username: string; extra?: Record<string, string[]> }>();

  private rv = 1;
  private compactedRv = 0;
  private readonly objects = new Map<string, Obj>();
  private history: HistoryEvent[] = [];
  private readonly watchers = new Set<Watcher>();
  private readonly sockets = new Set<Socket>();
  private readonly failures: { method: string; pathPrefix: string; status: number; times: number }[] = [];

  private constructor(
    private readonly server: Server,
    /** RESOURCES, with the versions a test chose to serve instead. */
    private readonly resources: ApiResource[],
  ) {}

  /** `served`: kind -> the one version to serve for it instead of RESOURCES' (a cluster with other CRDs). */
  static async start(opts: { served?: Record<string, string> } = {}): Promise<TestApiServer> {
    const server = createServer();
    const api = new TestApiServer(server, RESOURCES.map((r) => ({ ...r, version: opts.served?.[r.kind] ?? r.version })));
    server.on('request', (req, res) => api.handle(req, res));
    server.on('connection', (s) => {
      api.sockets.add(s);
      s.on('close', () => api.sockets.delete(s));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return api;
  }

  get url(): string {
    const a = this.server.address() as AddressInfo;
    return `http://127.0.0.1:${a.port}`;
  }

  kubeConfig(token = 'test-token'): KubeConfig {
    const kc = new KubeConfig();
    kc.loadFromOptions({
      clusters: [{ name: 'test', server: this.url, skipTLSVerify: true }],
      users: [{ name: 'test', token }],
      contexts: [{ name: 'test', cluster: 'test', user: 'test' }],
      currentContext: 'test',
    });
    return kc;
  }

  async close(): Promise<void> {
    this.dropWatches();
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  // ---- store operations (what a controller-manager or kubectl would do) ----

  create(obj: Obj): Obj {
    const res = this.resourceOf(obj);
    const o = clone(obj);
    o.apiVersion = apiVersionOf(res);
    o.kind ??= res.kind;
    if (!o.metadata.name && o.metadata.generateName) o.metadata.name = `${o.metadata.generateName}${randomUUID().slice(0, 5)}`;
    if (res.namespaced) o.metadata.namespace ??= 'default';
    const key = this.key(res, o.metadata.namespace, o.metadata.name!);
    if (this.objects.has(key)) throw new HttpError(409, 'AlreadyExists', `${res.plural} "${o.metadata.name}" already exists`);
    o.metadata.uid ??= randomUUID();
    o.metadata.creationTimestamp ??= new Date().toISOString();
    o.metadata.generation ??= 1;
    return this.write('ADDED', res, key, o, undefined);
  }

  /** Replace an object; with metadata.resourceVersion set it must match (optimistic concurrency). */
  update(obj: Obj): Obj {
    const res = this.resourceOf(obj);
    const key = this.key(res, res.namespaced ? (obj.metadata.namespace ?? 'default') : undefined, obj.metadata.name!);
    const old = this.objects.get(key);
    if (!old) throw new HttpError(404, 'NotFound', `${res.plural} "${obj.metadata.name}" not found`);
    if (obj.metadata.resourceVersion && obj.metadata.resourceVersion !== old.metadata.resourceVersion) {
      throw new HttpError(409, 'Conflict', `the object has been modified; please apply your changes to the latest version`);
    }
    const o = clone(obj);
    o.apiVersion = apiVersionOf(res);
    o.kind ??= old.kind;
    const generation = Number(old.metadata.generation ?? 1);
    o.metadata = { ...o.metadata, uid: old.metadata.uid, creationTimestamp: old.metadata.creationTimestamp, namespace: old.metadata.namespace, generation: specOf(o) === specOf(old) ? generation : generation + 1 };
    return this.write('MODIFIED', res, key, o, old);
  }

  /** A JSON merge patch of the object (status left as it is) or, with `subresource` 'status', of its status only. */
  patch(kind: string, namespace: string | undefined, name: string, patch: unknown, subresource?: 'status'): Obj {
    const res = this.resources.find((r) => r.kind === kind)!;
    const key = this.key(res, namespace, name);
    const old = this.objects.get(key);
    if (!old) throw new HttpError(404, 'NotFound', `${res.plural} "${name}" not found`);
    if (patch === null || typeof patch !== 'object' || Array.isArray(patch)) throw new HttpError(400, 'BadRequest', 'a merge patch must be a JSON object');
    const p = patch as Record<string, unknown>;
    const merged = mergePatch(old, subresource === 'status' ? (p.status === undefined ? {} : { status: p.status }) : { ...p, status: undefined }) as Obj;
    const rv = (p.metadata as { resourceVersion?: string } | undefined)?.resourceVersion;
    if (rv && rv !== old.metadata.resourceVersion) throw new HttpError(409, 'Conflict', 'the object has been modified; please apply your changes to the latest version');
    if (subresource !== 'status') merged.status = old.status;
    else merged.metadata = old.metadata;
    const o = clone(merged);
    const generation = Number(old.metadata.generation ?? 1);
    o.metadata = { ...o.metadata, name: old.metadata.name, uid: old.metadata.uid, creationTimestamp: old.metadata.creationTimestamp, namespace: old.metadata.namespace, generation: specOf(o) === specOf(old) ? generation : generation + 1 };
    return this.write('MODIFIED', res, key, o, old);
  }

  /** PUT of the `status` subresource: the status is replaced, everything else (and the generation) kept. */
  replaceStatus(kind: string, namespace: string | undefined, name: string, obj: Obj): Obj {
    const res = this.resources.find((r) => r.kind === kind)!;
    const key = this.key(res, namespace, name);
    const old = this.objects.get(key);
    if (!old) throw new HttpError(404, 'NotFound', `${res.plural} "${name}" not found`);
    const rv = obj.metadata?.resourceVersion;
    if (rv && rv !== old.metadata.resourceVersion) throw new HttpError(409, 'Conflict', 'the object has been modified; please apply your changes to the latest version');
    return this.write('MODIFIED', res, key, { ...clone(old), status: clone(obj.status) }, old);
  }

  upsert(obj: Obj): Obj {
    const res = this.resourceOf(obj);
    const key = this.key(res, res.namespaced ? (obj.metadata.namespace ?? 'default') : undefined, obj.metadata.name!);
    return this.objects.has(key) ? this.update({ ...obj, metadata: { ...obj.metadata, resourceVersion: undefined } }) : this.create(obj);
  }

  remove(kind: string, namespace: string | undefined, name: string): void {
    const res = this.resources.find((r) => r.kind === kind)!;
    const key = this.key(res, namespace, name);
    const old = this.objects.get(key);
    if (!old) throw new HttpError(404, 'NotFound', `${res.plural} "${name}" not found`);
    const o = clone(old);
    this.objects.delete(key);
    this.rv++;
    o.metadata.resourceVersion = String(this.rv);
    this.emit({ rv: this.rv, type: 'DELETED', res, obj: o, old });
  }

  get(kind: string, namespace: string | undefined, name: string): Obj | undefined {
    const res = this.resources.find((r) => r.kind === kind)!;
    const o = this.objects.get(this.key(res, namespace, name));
    return o && clone(o);
  }

  list(kind: string): Obj[] {
    const res = this.resources.find((r) => r.kind === kind)!;
    return [...this.objects.entries()].filter(([k]) => k.startsWith(`${res.plural}/`)).map(([, o]) => clone(o));
  }

  /** Forget all history: a watch resuming from an older resourceVersion now gets 410 Gone. */
  compact(): void {
    this.compactedRv = this.rv;
    this.history = [];
  }

  /** Send a BOOKMARK carrying the current resourceVersion to every watch that allows them. */
  bookmark(): void {
    for (const w of this.watchers) {
      if (!w.bookmarks) continue;
      this.send(w.res_, { type: 'BOOKMARK', object: { kind: w.res.kind, apiVersion: apiVersionOf(w.res), metadata: { resourceVersion: String(this.rv) } } });
    }
  }

  /** Kill every watch connection, as a network drop or an API server restart would. */
  dropWatches(): void {
    for (const w of this.watchers) w.res_.socket?.destroy();
    this.watchers.clear();
  }

  /** Watches open now (by plural), for tests waiting until a client is connected. */
  watchCount(plural?: string): number {
    return [...this.watchers].filter((w) => !plural || w.res.plural === plural).length;
  }

  /** Answer the next `times` requests with `method` whose path starts with `pathPrefix` with `status`. */
  failNext(method: string, pathPrefix: string, status: number, times = 1): void {
    this.failures.push({ method, pathPrefix, status, times });
  }

  /** Forget the failures failNext() left. */
  clearFailures(): void {
    this.failures.length = 0;
  }

  // ---- internals ----

  private key(res: ApiResource, namespace: string | undefined, name: string): string {
    return `${res.plural}/${res.namespaced ? (namespace ?? 'default') : ''}/${name}`;
  }

  /**
   * The resource of an object of any version of its group: like a CRD whose
   * conversion strategy is None, the object is kept as written and served
   * under the resource's version, with only apiVersion changed (see create).
   */
  private resourceOf(obj: Obj): ApiResource {
    const group = (v: string) => (v.includes('/') ? v.slice(0, v.indexOf('/')) : '');
    const res = this.resources.find((r) => r.kind === obj.kind && (obj.apiVersion === undefined || r.group === group(obj.apiVersion)));
    if (!res) throw new HttpError(400, 'BadRequest', `no resource for ${obj.apiVersion}/${obj.kind}`);
    return res;
  }

  private write(type: EventType, res: ApiResource, key: string, o: Obj, old: Obj | undefined): Obj {
    this.rv++;
    o.metadata.resourceVersion = String(this.rv);
    this.objects.set(key, o);
    this.emit({ rv: this.rv, type, res, obj: clone(o), old });
    return clone(o);
  }

  private emit(ev: HistoryEvent): void {
    this.history.push(ev);
    for (const w of this.watchers) this.deliver(w, ev);
  }

  /** What a watcher sees of one change, given its selectors: objects leaving the selection are DELETED. */
  private deliver(w: Watcher, ev: HistoryEvent): void {
    if (w.res !== ev.res) return;
    if (w.namespace !== undefined && ev.obj.metadata.namespace !== w.namespace) return;
    const now = ev.type !== 'DELETED' && w.match(ev.obj);
    const before = ev.old !== undefined && w.match(ev.old);
    let type: string | undefined;
    if (ev.type === 'DELETED') type = before ? 'DELETED' : undefined;
    else if (now && before) type = 'MODIFIED';
    else if (now) type = 'ADDED';
    else if (before) type = 'DELETED';
    if (type) this.send(w.res_, { type, object: ev.obj });
  }

  private send(res: ServerResponse, ev: unknown): void {
    if (!res.writableEnded) res.write(`${JSON.stringify(ev)}\n`);
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url ?? '/', 'http://x');
    const query = Object.fromEntries(url.searchParams);
    const contentType = req.headers['content-type'];
    this.requests.push({ method: req.method ?? 'GET', path: url.pathname, query, ...(contentType ? { contentType } : {}) });
    const fail = this.failures.find((f) => f.method === req.method && url.pathname.startsWith(f.pathPrefix) && f.times > 0);
    if (fail) {
      fail.times--;
      return this.status(res, new HttpError(fail.status, 'InjectedFailure', `injected ${fail.status}`));
    }
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (c: string) => (body += c));
    req.on('end', () => {
      try {
        this.route(req.method ?? 'GET', url.pathname, query, body, res, contentType ?? '');
      } catch (err) {
        this.status(res, err instanceof HttpError ? err : new HttpError(500, 'InternalError', String(err)));
      }
    });
  }

  private route(method: string, path: string, query: Record<string, string>, body: string, res: ServerResponse, contentType = ''): void {
    if (method === 'POST' && path === '/apis/authentication.k8s.io/v1/tokenreviews') return this.tokenReview(body, res);
    const m = /^\/(?:api\/(v1)|apis\/([^/]+)\/([^/]+))\/(.*)$/.exec(path);
    if (!m) throw new HttpError(404, 'NotFound', `no route for ${path}`);
    const group = m[2] ?? '';
    const version = m[1] ?? m[3]!;
    const parts = m[4]!.split('/').filter(Boolean);
    let namespace: string | undefined;
    if (parts[0] === 'namespaces' && parts.length >= 3) {
      namespace = parts[1];
      parts.splice(0, 2);
    }
    const [plural, name, subresource] = parts;
    const r = this.resources.find((x) => x.group === group && x.version === version && x.plural === plural);
    if (!r) throw new HttpError(404, 'NotFound', `the server could not find the requested resource (${path})`);
    if (subresource !== undefined && (subresource !== 'status' || parts.length > 3)) throw new HttpError(404, 'NotFound', `the server could not find the requested resource (${path})`);
    if (method === 'PATCH' && name !== undefined) {
      const type = contentType.split(';')[0]!.trim();
      if (type !== 'application/merge-patch+json') throw new HttpError(415, 'UnsupportedMediaType', `the test API server applies only application/merge-patch+json patches (got ${JSON.stringify(type)})`);
      return this.json(res, 200, this.patch(r.kind, namespace, name, JSON.parse(body), subresource === 'status' ? 'status' : undefined));
    }
    if (method === 'PUT' && name !== undefined && subresource === 'status') {
      return this.json(res, 200, this.replaceStatus(r.kind, namespace, name, JSON.parse(body) as Obj));
    }
    if (subresource !== undefined && method !== 'GET') throw new HttpError(405, 'MethodNotAllowed', `${method} not allowed on ${path}`);
    if (name === undefined) {
      if (method === 'GET') return query.watch === 'true' || query.watch === '1' ? this.watch(r, namespace, query, res) : this.listResponse(r, namespace, query, res);
      if (method === 'POST') {
        const o = JSON.parse(body) as Obj;
        if (r.namespaced) o.metadata.namespace = namespace ?? o.metadata.namespace;
        return this.json(res, 201, this.create({ ...o, kind: o.kind ?? r.kind, apiVersion: o.apiVersion ?? apiVersionOf(r) }));
      }
    } else {
      const key = this.key(r, namespace, name);
      if (method === 'GET') {
        const o = this.objects.get(key);
        if (!o) throw new HttpError(404, 'NotFound', `${r.plural} "${name}" not found`);
        return this.json(res, 200, o);
      }
      if (method === 'PUT') {
        const o = JSON.parse(body) as Obj;
        return this.json(res, 200, this.update({ ...o, kind: o.kind ?? r.kind, apiVersion: o.apiVersion ?? apiVersionOf(r), metadata: { ...o.metadata, namespace, name } }));
      }
      if (method === 'DELETE') {
        this.remove(r.kind, namespace, name);
        return this.json(res, 200, { kind: 'Status', apiVersion: 'v1', status: 'Success' });
      }
    }
    throw new HttpError(405, 'MethodNotAllowed', `${method} not allowed on ${path}`);
  }

  private matcher(query: Record<string, string>): (o: Obj) => boolean {
    const labels = parseLabelSelector(query.labelSelector ?? '');
    const fields = parseFieldSelector(query.fieldSelector ?? '');
    return (o) => labels(o.metadata.labels ?? {}) && fields(o);
  }

  private selected(r: ApiResource, namespace: string | undefined, query: Record<string, string>): Obj[] {
    const match = this.matcher(query);
    const out: Obj[] = [];
    for (const [k, o] of this.objects) {
      if (!k.startsWith(`${r.plural}/`)) continue;
      if (namespace !== undefined && o.metadata.namespace !== namespace) continue;
      if (match(o)) out.push(o);
    }
    return out;
  }

  private listResponse(r: ApiResource, namespace: string | undefined, query: Record<string, string>, res: ServerResponse): void {
    // Built-in types come without kind/apiVersion on list items, as from the real server.
    const items = this.selected(r, namespace, query).map((o) => (r.group === '' || r.group.endsWith('k8s.io') ? { ...o, kind: undefined, apiVersion: undefined } : o));
    this.json(res, 200, { kind: `${r.kind}List`, apiVersion: apiVersionOf(r), metadata: { resourceVersion: String(this.rv) }, items });
  }

  private watch(r: ApiResource, namespace: string | undefined, query: Record<string, string>, res: ServerResponse): void {
    const match = this.matcher(query);
    res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': 'chunked' });
    res.flushHeaders();
    const from = query.resourceVersion && query.resourceVersion !== '0' ? Number(query.resourceVersion) : undefined;
    if (from !== undefined && from < this.compactedRv) {
      this.send(res, {
        type: 'ERROR',
        object: { kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Failure', message: `too old resource version: ${from} (${this.compactedRv})`, reason: 'Expired', code: 410 },
      });
      res.end();
      return;
    }
    const w: Watcher = { res: r, namespace, match, bookmarks: query.allowWatchBookmarks === 'true', res_: res };
    if (from === undefined) {
      for (const o of this.selected(r, namespace, query)) this.send(res, { type: 'ADDED', object: o });
    } else {
      for (const ev of this.history) if (ev.rv > from) this.deliver(w, ev);
    }
    this.watchers.add(w);
    const timeout = query.timeoutSeconds ? setTimeout(() => res.end(), Number(query.timeoutSeconds) * 1000) : undefined;
    res.on('close', () => {
      clearTimeout(timeout);
      this.watchers.delete(w);
    });
  }

  private tokenReview(body: string, res: ServerResponse): void {
    const review = JSON.parse(body) as { spec?: { token?: string } };
    const user = this.tokens.get(review.spec?.token ?? '');
    this.json(res, 201, {
      kind: 'TokenReview',
      apiVersion: 'authentication.k8s.io/v1',
      metadata: {},
      spec: review.spec,
      status: user ? { authenticated: true, user: { username: user.username, uid: randomUUID(), extra: user.extra ?? {} } } : { authenticated: false, error: 'invalid bearer token' },
    });
  }

  private json(res: ServerResponse, code: number, body: unknown): void {
    res.writeHead(code, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  }

  private status(res: ServerResponse, err: HttpError): void {
    this.json(res, err.code, { kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Failure', message: err.message, reason: err.reason, code: err.code });
  }
}

/** Label selector grammar of the API server (set-based and equality-based). */
export function parseLabelSelector(sel: string): (labels: Record<string, string>) => boolean {
  const reqs: ((l: Record<string, string>) => boolean)[] = [];
  for (const raw of splitTop(sel)) {
    const s = raw.trim();
    if (!s) continue;
    let m: RegExpExecArray | null;
    if ((m = /^([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)$/.exec(s))) {
      const [, k, op, vs] = m;
      const set = new Set(vs!.split(',').map((v) => v.trim()));
      reqs.push(op === 'in' ? (l) => l[k!] !== undefined && set.has(l[k!]!) : (l) => l[k!] === undefined || !set.has(l[k!]!));
    } else if ((m = /^([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)$/.exec(s))) {
      const [, k, op, v] = m;
      reqs.push(op === '!=' ? (l) => l[k!] !== v : (l) => l[k!] === v);
    } else if ((m = /^!([\w./-]+)$/.exec(s))) {
      const k = m[1]!;
      reqs.push((l) => l[k] === undefined);
    } else if ((m = /^([\w./-]+)$/.exec(s))) {
      const k = m[1]!;
      reqs.push((l) => l[k] !== undefined);
    } else throw new HttpError(400, 'BadRequest', `unable to parse requirement: ${s}`);
  }
  return (l) => reqs.every((r) => r(l));
}

const FIELDS: Record<string, (o: Obj) => unknown> = {
  'metadata.name': (o) => o.metadata.name,
  'metadata.namespace': (o) => o.metadata.namespace,
  'spec.nodeName': (o) => (o.spec as { nodeName?: string } | undefined)?.nodeName ?? '',
  // Secrets only, as the real server: the controller lists kubernetes.io/tls Secrets.
  type: (o) => (o as { type?: string }).type ?? 'Opaque',
};

export function parseFieldSelector(sel: string): (o: Obj) => boolean {
  const reqs: ((o: Obj) => boolean)[] = [];
  for (const s of sel.split(',').map((x) => x.trim()).filter(Boolean)) {
    const m = /^([\w.]+)\s*(==|=|!=)\s*(.*)$/.exec(s);
    if (!m) throw new HttpError(400, 'BadRequest', `invalid field selector: ${s}`);
    const [, field, op, value] = m;
    const get = FIELDS[field!];
    if (!get) throw new HttpError(400, 'BadRequest', `field label not supported: ${field}`);
    reqs.push(op === '!=' ? (o) => get(o) !== value : (o) => get(o) === value);
  }
  return (o) => reqs.every((r) => r(o));
}

function splitTop(s: string): string[] {
  const out: string[] = [];
  let depth = 0;
  let cur = '';
  for (const c of s) {
    if (c === '(') depth++;
    if (c === ')') depth--;
    if (c === ',' && depth === 0) {
      out.push(cur);
      cur = '';
    } else cur += c;
  }
  out.push(cur);
  return out;
}
