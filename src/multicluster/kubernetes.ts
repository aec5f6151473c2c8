import { CustomObjectsApi, ListWatch, Watch, type KubeConfig, type KubernetesObject } from '@kubernetes/client-node';
import { errorMessage } from '../errors.js';
import { backoffDelay } from '../policy/client.js';
import { logger } from '../util/log.js';
import { FSMN_MC_API_VERSION, MCS_API_VERSION, parseGlobalTrafficPolicy, parseServiceExport, type GlobalTrafficPolicySpec, type ServiceExportRec } from './api.js';
import type { MulticlusterController, MulticlusterStatus } from './controller.js';
import { exportKey } from './protocol.js';

const log = logger('multicluster-kubernetes');

/** Label on the ServiceImports this controller writes: only those are ever replaced or deleted. */
export const MANAGED_BY = { key: 'app.kubernetes.io/managed-by', value: 'fsm-node' } as const;

const [MCS_GROUP, MCS_VERSION] = MCS_API_VERSION.split('/') as [string, string];
const [GTP_GROUP, GTP_VERSION] = FSMN_MC_API_VERSION.split('/') as [string, string];

interface Obj extends KubernetesObject {
  spec?: unknown;
  status?: { conditions?: { type: string; status: string; reason?: string; message?: string; lastTransitionTime?: string }[]; [k: string]: unknown };
}

/**
 * Kubernetes mode of the clusterset member (docs/multicluster.md): informers
 * on ServiceExport (multicluster.x-k8s.io) and GlobalTrafficPolicy
 * (multicluster.fsm-node.io), list then watch with bookmarks and a restart
 * with backoff on errors, as src/controller/sources/kubernetes.ts does for the
 * mesh kinds; and a writer that reconciles, after every new status of the
 * member, the ServiceImport objects (one per import, in its namespace) and
 * the Valid/Conflict conditions of this cluster's ServiceExports (KEP-1645).
 *
 * A bad object is left out (logged with its field); the rest apply. Writes
 * go through the status subresource for conditions; a failed write is
 * retried at the next status or on the periodic resync.
 */
export class MulticlusterKubernetes {
  private readonly custom: CustomObjectsApi;
  private readonly informers: { name: string; lw: ListWatch<Obj>; failures: number; restart?: NodeJS.Timeout }[] = [];
  private stopped = false;
  private last: MulticlusterStatus | undefined;
  private writing: Promise<void> = Promise.resolve();
  private readonly bad = new Map<string, string>();

  constructor(
    private readonly kc: KubeConfig,
    private readonly mc: () => MulticlusterController | undefined,
    private readonly backoff = { initialMs: 500, maxMs: 30_000 },
  ) {
    this.custom = kc.makeApiClient(CustomObjectsApi);
    this.informer('ServiceExport', `/apis/${MCS_GROUP}/${MCS_VERSION}/serviceexports`, () => this.custom.listClusterCustomObject({ group: MCS_GROUP, version: MCS_VERSION, plural: 'serviceexports' }));
    this.informer('GlobalTrafficPolicy', `/apis/${GTP_GROUP}/${GTP_VERSION}/globaltrafficpolicies`, () =>
      this.custom.listClusterCustomObject({ group: GTP_GROUP, version: GTP_VERSION, plural: 'globaltrafficpolicies' }),
    );
  }

  private informer(name: string, path: string, list: () => Promise<unknown>): void {
    const lw = new ListWatch<Obj>(path, new Watch(this.kc), list as never, false);
    const inf = { name, lw, failures: 0 } as (typeof this.informers)[number];
    const changed = () => {
      inf.failures = 0;
      this.feed();
    };
    lw.on('add', changed);
    lw.on('update', changed);
    lw.on('delete', changed);
    lw.on('error', (err: unknown) => {
      if (this.stopped) return;
      inf.failures++;
      const delay = backoffDelay(inf.failures, this.backoff);
      log.warn({ kind: name, err: errorMessage(err), retryInMs: Math.round(delay) }, 'list/watch failed; restarting');
      clearTimeout(inf.restart);
      inf.restart = setTimeout(() => void lw.start().then(() => this.feed()), delay);
    });
    this.informers.push(inf);
  }

  /** List every kind once (the member's first imports must see every export), then watch. */
  async start(): Promise<void> {
    await Promise.all(this.informers.map((i) => i.lw.start()));
    this.feed();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const i of this.informers) {
      clearTimeout(i.restart);
      await i.lw.stop();
    }
    await this.writing;
  }

  /** The informers' objects, parsed, into the member. */
  private feed(): void {
    const mc = this.mc();
    if (!mc || this.stopped) return;
    const exports = new Map<string, ServiceExportRec>();
    const policies = new Map<string, GlobalTrafficPolicySpec>();
    // Items of a list may come without apiVersion and kind (the list names them once): the informer's own apply.
    const parseEach = <T>(i: number, put: (r: T) => void, parse: (o: unknown) => T, typeMeta: { apiVersion: string; kind: string }) => {
      for (const item of this.informers[i]!.lw.list()) {
        const o = { ...typeMeta, ...item };
        const where = `${this.informers[i]!.name} ${o.metadata?.namespace}/${o.metadata?.name}`;
        try {
          put(parse(o));
          this.bad.delete(where);
        } catch (err) {
          const why = errorMessage(err);
          if (this.bad.get(where) !== why) log.error({ object: where, err: why }, 'multicluster object rejected; left out');
          this.bad.set(where, why);
        }
      }
    };
    parseEach(0, (r: ServiceExportRec) => exports.set(exportKey(r), r), parseServiceExport, { apiVersion: MCS_API_VERSION, kind: 'ServiceExport' });
    parseEach(1, (r: { namespace: string; name: string; spec: GlobalTrafficPolicySpec }) => policies.set(exportKey(r), r.spec), parseGlobalTrafficPolicy, { apiVersion: FSMN_MC_API_VERSION, kind: 'GlobalTrafficPolicy' });
    mc.setObjects(exports, policies);
  }

  /** The member's new status: write ServiceImports and ServiceExport conditions (one write pass at a time). */
  onStatus(status: MulticlusterStatus): void {
    this.last = status;
    this.writing = this.writing.then(() => (this.last === status && !this.stopped ? this.write(status) : undefined)).catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'writing multicluster objects failed; will retry with the next status'));
  }

  private async write(status: MulticlusterStatus): Promise<void> {
    await this.writeImports(status);
    await this.writeConditions(status);
  }

  private async writeImports(status: MulticlusterStatus): Promise<void> {
    const want = new Map(status.imports.map((i) => [exportKey(i), serviceImport(i)]));
    const have = (await this.custom.listClusterCustomObject({ group: MCS_GROUP, version: MCS_VERSION, plural: 'serviceimports', labelSelector: `${MANAGED_BY.key}=${MANAGED_BY.value}` })) as { items?: Obj[] };
    const haveByKey = new Map((have.items ?? []).map((o) => [`${o.metadata?.namespace}/${o.metadata?.name}`, o]));
    for (const [key, body] of want) {
      const cur = haveByKey.get(key);
      const ns = body.metadata.namespace;
      if (!cur) {
        await this.custom.createNamespacedCustomObject({ group: MCS_GROUP, version: MCS_VERSION, namespace: ns, plural: 'serviceimports', body });
        log.info({ import: key }, 'ServiceImport created');
      } else if (JSON.stringify([cur.spec, cur.status]) !== JSON.stringify([body.spec, body.status])) {
        await this.custom.replaceNamespacedCustomObject({ group: MCS_GROUP, version: MCS_VERSION, namespace: ns, plural: 'serviceimports', name: body.metadata.name, body: { ...body, metadata: { ...body.metadata, resourceVersion: cur.metadata?.resourceVersion } } });
      }
    }
    for (const [key, cur] of haveByKey) {
      if (want.has(key)) continue;
      await this.custom.deleteNamespacedCustomObject({ group: MCS_GROUP, version: MCS_VERSION, namespace: cur.metadata!.namespace!, plural: 'serviceimports', name: cur.metadata!.name! });
      log.info({ import: key }, 'ServiceImport deleted (no cluster exports it any more)');
    }
  }

  private async writeConditions(status: MulticlusterStatus): Promise<void> {
    const now = new Date().toISOString();
    for (const e of status.exports) {
      const cur = this.informers[0]!.lw.get(e.name, e.namespace);
      if (!cur) continue;
      const old = cur.status?.conditions ?? [];
      const conditions = e.conditions.map((c) => {
        const prev = old.find((o) => o.type === c.type);
        // lastTransitionTime moves only when the status does (Kubernetes API conventions).
        return { type: c.type, status: c.status, reason: c.reason, message: c.message, lastTransitionTime: prev && prev.status === c.status && prev.lastTransitionTime ? prev.lastTransitionTime : now };
      });
      const strip = (cs: typeof old) => cs.map(({ lastTransitionTime: _t, ...rest }) => rest);
      if (JSON.stringify(strip(old)) === JSON.stringify(strip(conditions))) continue;
      await this.custom.replaceNamespacedCustomObjectStatus({
        group: MCS_GROUP,
        version: MCS_VERSION,
        namespace: e.namespace,
        plural: 'serviceexports',
        name: e.name,
        body: { ...cur, status: { ...(cur.status ?? {}), conditions } },
      });
    }
  }
}

/** The ServiceImport object of an import (KEP-1645 v1alpha1 shape). Pure. */
export function serviceImport(i: MulticlusterStatus['imports'][number]): { apiVersion: string; kind: 'ServiceImport'; metadata: { name: string; namespace: string; labels: Record<string, string> }; spec: unknown; status: unknown } {
  return {
    apiVersion: MCS_API_VERSION,
    kind: 'ServiceImport',
    metadata: { name: i.name, namespace: i.namespace, labels: { [MANAGED_BY.key]: MANAGED_BY.value } },
    spec: { type: i.type, ips: i.ips, ports: i.ports.map((port) => ({ port, protocol: 'TCP' })) },
    status: { clusters: i.clusters.map((cluster) => ({ cluster })) },
  };
}
