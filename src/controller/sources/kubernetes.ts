import {
  CoreV1Api,
  CustomObjectsApi,
  DiscoveryV1Api,
  ListWatch,
  Watch,
  type KubeConfig,
  type KubernetesListObject,
  type KubernetesObject,
} from '@kubernetes/client-node';
import { errorMessage } from '../../errors.js';
import { backoffDelay } from '../../policy/client.js';
import type { PolicyCompiler } from '../../policy/compiler.js';
import { MESH_CONFIG_NAME } from '../../policy/fsm.js';
import type { ObjectIssue } from '../../policy/issues.js';
import { CLUSTER_SCOPED, KINDS, type Kind } from '../../policy/objects.js';
import { logger } from '../../util/log.js';

const log = logger('source-kubernetes');

/** A client-node Watch that asks for bookmarks, so a resumed watch starts from a recent resourceVersion. */
class BookmarkWatch extends Watch {
  override watch(path: string, query: Record<string, unknown>, callback: (phase: string, obj: unknown, watchObj?: unknown) => void, done: (err: unknown) => void): Promise<AbortController> {
    return super.watch(path, { ...query, allowWatchBookmarks: true }, callback, done);
  }
}

interface Resource {
  kind: Kind;
  path: string;
  list: () => Promise<KubernetesListObject<KubernetesObject>>;
  fieldSelector?: string;
  /** A CRD that may not be installed: 404 counts as "none" (retried slowly) rather than blocking sync. */
  optional?: boolean;
}

interface Informer {
  /** The resource watched now: one of `versions`. */
  res: Resource;
  /**
   * The versions the controller reads, newest first (SMI kinds: KINDS). A
   * version the cluster does not serve (404) is followed by the next one at
   * once, so a cluster whose CRD serves only an older version (OSM's
   * TrafficSplit: v1alpha2) is still read; after the last, the newest again.
   */
  versions: Resource[];
  lw: ListWatch<KubernetesObject>;
  synced: boolean;
  failures: number;
  restart?: NodeJS.Timeout;
}

export interface KubernetesSourceOptions {
  kubeConfig: KubeConfig;
  compiler: PolicyCompiler;
  /** The controller's namespace: where the mesh ConfigMap is read and where Events for cluster-scoped objects go. */
  namespace: string;
  /** Called after dirty keys were fed to the compiler (compile and publish from there). */
  onChange: () => void;
  /** Quiet time before a batch of dirty keys is processed, and the longest a key may wait. */
  debounceMs?: number;
  maxDelayMs?: number;
  backoff?: { initialMs: number; maxMs: number };
  /** Post a Kubernetes Event on objects reported as bad (default true). */
  events?: boolean;
}

/**
 * Cluster state from the Kubernetes API through client-node informers (list,
 * then watch from the list's resourceVersion, with bookmarks). Event handlers
 * only mark keys dirty; a debounced flush re-reads each key's latest object
 * from the informer cache and feeds it (or its deletion) to the compiler, so
 * a burst of updates to one object costs one compile step.
 *
 * client-node relists by itself after 410 Gone and re-watches after a clean
 * close; on any other error the informer stops, and this source restarts it
 * with exponential backoff and jitter (resuming from its last resourceVersion).
 */
export class KubernetesSource {
  private readonly informers: Informer[] = [];
  private readonly dirty = new Set<string>();
  private flushTimer: NodeJS.Timeout | undefined;
  private firstDirtyAt = 0;
  private stopped = false;
  private allSynced: (() => void) | undefined;
  private readonly core: CoreV1Api;

  constructor(private readonly o: KubernetesSourceOptions) {
    const kc = o.kubeConfig;
    this.core = kc.makeApiClient(CoreV1Api);
    const discovery = kc.makeApiClient(DiscoveryV1Api);
    const custom = kc.makeApiClient(CustomObjectsApi);
    const crd = (kind: Kind, plural: string): Resource[] =>
      (KINDS[kind] as readonly string[]).map((apiVersion) => {
        const [group, version] = apiVersion.split('/') as [string, string];
        return { kind, path: `/apis/${group}/${version}/${plural}`, list: () => custom.listClusterCustomObject({ group, version, plural }), optional: true };
      });
    const core: Resource[] = [
      { kind: 'Namespace', path: '/api/v1/namespaces', list: () => this.core.listNamespace() },
      { kind: 'Node', path: '/api/v1/nodes', list: () => this.core.listNode() },
      { kind: 'Pod', path: '/api/v1/pods', list: () => this.core.listPodForAllNamespaces() },
      { kind: 'Service', path: '/api/v1/services', list: () => this.core.listServiceForAllNamespaces() },
      { kind: 'EndpointSlice', path: '/apis/discovery.k8s.io/v1/endpointslices', list: () => discovery.listEndpointSliceForAllNamespaces() },
      // Listener certificates: only TLS Secrets, and only their records (PEM) reach the compiler.
      { kind: 'Secret', path: '/api/v1/secrets', fieldSelector: 'type=kubernetes.io/tls', list: () => this.core.listSecretForAllNamespaces({ fieldSelector: 'type=kubernetes.io/tls' }) },
      {
        kind: 'ConfigMap',
        path: `/api/v1/namespaces/${o.namespace}/configmaps`,
        fieldSelector: `metadata.name=${MESH_CONFIG_NAME}`,
        list: () => this.core.listNamespacedConfigMap({ namespace: o.namespace, fieldSelector: `metadata.name=${MESH_CONFIG_NAME}` }),
      },
    ];
    const resources = [...core.map((r) => [r]), crd('TrafficSplit', 'trafficsplits'), crd('TrafficTarget', 'traffictargets'), crd('HTTPRouteGroup', 'httproutegroups'), crd('TCPRoute', 'tcproutes'), crd('MQTTRouteGroup', 'mqttroutegroups'),
      // Gateway API (src/gateway/): optional like the SMI kinds, a cluster without their CRDs has no Gateways.
      crd('GatewayClass', 'gatewayclasses'), crd('Gateway', 'gateways'), crd('HTTPRoute', 'httproutes'), crd('ReferenceGrant', 'referencegrants'),
      crd('Egress', 'egresses'), crd('Retry', 'retries'), crd('UpstreamTrafficSetting', 'upstreamtrafficsettings')];
    for (const versions of resources) this.informers.push(this.makeInformer(versions));
    if (o.events !== false) o.compiler.reporter.onIssue((issue) => void this.postEvent(issue));
  }

  /** Start every informer; resolves once each has listed once (the first compile must see a whole cluster). */
  async start(): Promise<void> {
    const synced = new Promise<void>((resolve) => (this.allSynced = resolve));
    for (const inf of this.informers) void this.run(inf);
    await synced;
    this.flush();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.flushTimer);
    for (const inf of this.informers) {
      clearTimeout(inf.restart);
      await inf.lw.stop();
    }
  }

  get synced(): boolean {
    return this.informers.every((i) => i.synced);
  }

  /** An object from the informer cache, as the cluster holds it (status writers compare with it). */
  object(kind: Kind, namespace: string, name: string): KubernetesObject | undefined {
    return this.informers.find((i) => i.res.kind === kind)?.lw.get(name, namespace || undefined);
  }

  /** A pod from the informer cache (TokenReview binding). */
  pod(namespace: string, name: string): { nodeName: string | undefined; uid: string | undefined } | undefined {
    const p = this.informers.find((i) => i.res.kind === 'Pod')!.lw.get(name, namespace) as { spec?: { nodeName?: string }; metadata?: { uid?: string } } | undefined;
    return p && { nodeName: p.spec?.nodeName, uid: p.metadata?.uid };
  }

  private makeInformer(versions: Resource[]): Informer {
    const inf: Informer = { res: versions[0]!, versions, synced: false, failures: 0 } as Informer;
    this.listWatch(inf);
    return inf;
  }

  /** A ListWatch for the informer's current resource. */
  private listWatch(inf: Informer): void {
    const res = inf.res;
    const list = async () => {
      const l = await res.list();
      inf.failures = 0;
      return l;
    };
    inf.lw = new ListWatch(res.path, new BookmarkWatch(this.o.kubeConfig), list, false, undefined, res.fieldSelector);
    const mark = (obj: KubernetesObject) => {
      inf.failures = 0;
      this.markDirty(res.kind, obj);
    };
    inf.lw.on('add', mark);
    inf.lw.on('update', mark);
    inf.lw.on('delete', mark);
    inf.lw.on('error', (err: unknown) => this.failed(inf, err));
  }

  private async run(inf: Informer): Promise<void> {
    if (this.stopped) return;
    let errored = false;
    const onError = () => (errored = true);
    // The error handler may move the informer to another version (a new ListWatch) meanwhile.
    const lw = inf.lw;
    lw.on('error', onError);
    await lw.start();
    lw.off('error', onError);
    if (!errored) this.markSynced(inf);
  }

  private failed(inf: Informer, err: unknown): void {
    if (this.stopped) return;
    const status = (err as { code?: number; statusCode?: number }).code ?? (err as { statusCode?: number }).statusCode;
    inf.failures++;
    const absent = status === 404 && inf.res.optional;
    if (absent && inf.versions.length > 1) {
      const next = inf.versions[(inf.versions.indexOf(inf.res) + 1) % inf.versions.length]!;
      const lastTried = next === inf.versions[0];
      log.info({ kind: inf.res.kind, path: inf.res.path, next: next.path }, lastTried ? 'no version served; will look again from the newest' : 'version not served; trying the next older one');
      void inf.lw.stop();
      inf.res = next;
      this.listWatch(inf);
      if (!lastTried) {
        clearTimeout(inf.restart);
        inf.restart = setTimeout(() => void this.run(inf), 0);
        return;
      }
    }
    // An absent CRD is not an outage: count it as synced (nothing there) and look again later.
    if (absent) this.markSynced(inf);
    const delay = absent ? (this.o.backoff?.maxMs ?? 30_000) : backoffDelay(inf.failures, this.o.backoff ?? { initialMs: 500, maxMs: 30_000 });
    log[absent ? 'info' : 'warn']({ kind: inf.res.kind, path: inf.res.path, status, err: errorMessage(err), retryInMs: Math.round(delay) }, absent ? 'resource not served (CRD not installed?); will look again' : 'list/watch failed; restarting');
    clearTimeout(inf.restart);
    inf.restart = setTimeout(() => void this.run(inf), delay);
  }

  private markSynced(inf: Informer): void {
    if (inf.synced) return;
    inf.synced = true;
    log.debug({ kind: inf.res.kind }, 'informer synced');
    if (this.synced) this.allSynced?.();
  }

  private markDirty(kind: Kind, obj: KubernetesObject): void {
    const ns = CLUSTER_SCOPED.has(kind) ? '' : (obj.metadata?.namespace ?? '');
    this.dirty.add(`${kind}\n${ns}\n${obj.metadata?.name ?? ''}`);
    if (!this.synced) return; // the first flush runs once everything has listed
    const now = Date.now();
    if (this.flushTimer === undefined) this.firstDirtyAt = now;
    clearTimeout(this.flushTimer);
    const wait = Math.max(0, Math.min(this.o.debounceMs ?? 10, this.firstDirtyAt + (this.o.maxDelayMs ?? 100) - now));
    this.flushTimer = setTimeout(() => this.flush(), wait);
  }

  /** Feed every dirty key's latest state to the compiler. */
  private flush(): void {
    clearTimeout(this.flushTimer);
    this.flushTimer = undefined;
    if (this.dirty.size === 0 || this.stopped) return;
    const keys = [...this.dirty];
    this.dirty.clear();
    for (const key of keys) {
      const [kind, namespace, name] = key.split('\n') as [Kind, string, string];
      const inf = this.informers.find((i) => i.res.kind === kind)!;
      const obj = inf.lw.get(name, namespace || undefined);
      if (obj) this.o.compiler.upsert(kind, obj);
      else this.o.compiler.remove({ kind, namespace, name });
    }
    this.o.onChange();
  }

  /** A Warning Event on the bad object, as kubectl describe shows it. Best effort. */
  private async postEvent(issue: ObjectIssue): Promise<void> {
    if (issue.ref.kind === 'Document') return;
    const namespace = issue.ref.namespace || this.o.namespace;
    const apiVersion = KINDS[issue.ref.kind as Kind]?.[0];
    const now = new Date();
    try {
      await this.core.createNamespacedEvent({
        namespace,
        body: {
          metadata: { generateName: `${issue.ref.name}.`, namespace },
          involvedObject: { kind: issue.ref.kind, name: issue.ref.name, namespace: issue.ref.namespace || undefined, apiVersion },
          reason: 'InvalidMeshObject',
          message: `${issue.field}: ${issue.message}${issue.keptLastGood ? ' (last good version kept)' : ' (object skipped)'}`,
          type: 'Warning',
          source: { component: 'fsm-node-controller' },
          firstTimestamp: now,
          lastTimestamp: now,
          count: 1,
        },
      });
    } catch (err) {
      log.debug({ err: errorMessage(err) }, 'could not post Event');
    }
  }
}
