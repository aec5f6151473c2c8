import type { FastifyInstance } from 'fastify';
import { mkdir, readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Registry } from 'prom-client';
import { Gauge } from 'prom-client';
import { parseAllDocuments } from 'yaml';
import { errorMessage, FsmNodeError } from '../errors.js';
import { parseListen } from '../controller/main.js';
import type { PolicyCompiler } from '../policy/compiler.js';
import type { ImportTierMember, MulticlusterPart, PolicyImport } from '../policy/schema.js';
import { writeFileAtomic } from '../policy/store.js';
import { splitPem } from '../identity/x509.js';
import { logger } from '../util/log.js';
import { parseGlobalTrafficPolicy, parseServiceExport, type ClusterSetConfig, type GlobalTrafficPolicySpec, type ServiceExportRec } from './api.js';
import { allocate, loadAllocations, parseCidr4, saveAllocations, type Cidr4 } from './ipam.js';
import { mergeAll, type ClusterExport, type Condition, type MergedImport } from './merge.js';
import { PeerClient } from './peer-client.js';
import { buildPeerServer, ExportsHub } from './peer-server.js';
import { exportKey, exportsDocument, ExportsDocumentSchema, type ExportsDocument } from './protocol.js';
import { tiersFor } from './tiers.js';

const log = logger('multicluster');

export interface MulticlusterOptions {
  config: ClusterSetConfig & { leaseMs: number };
  compiler: PolicyCompiler;
  /** Keeps the ClusterSetIP table, the peers' last documents and status.json. */
  stateDir: string;
  /** Directory of ServiceExport and GlobalTrafficPolicy manifests (manifest mode). */
  objectsDir?: string;
  /** PEM: the clusterset CA, this cluster's certificate chain and key. */
  tls: { ca: string; cert: string; key: string };
  registry?: Registry;
  now?: () => number;
  /** How often objectsDir is re-read and leases are checked. Default 1 s. */
  pollMs?: number;
  /** Long-poll wait asked of peers. Default 30 s. */
  peerWaitMs?: number;
  /**
   * Kubernetes mode (src/multicluster/kubernetes.ts): called with every new
   * status (exports' conditions, imports) so ServiceImports and ServiceExport
   * conditions are written back through the API. Objects come in by setObjects().
   */
  onStatus?: (status: MulticlusterStatus) => void;
}

/** What `status.json` holds (lab status, people): exports with their conditions, imports, peers. */
export interface MulticlusterStatus {
  cluster: string;
  exports: { namespace: string; name: string; conditions: Condition[]; readyEndpoints: number }[];
  imports: { namespace: string; name: string; type: string; ips: string[]; clusters: string[]; ports: number[]; tiers: string[][] }[];
  peers: { cluster: string; url: string; lastSeen: string | null; error: string | null; exports: number; leaseExpired: boolean }[];
}

interface Objects {
  exports: Map<string, ServiceExportRec>;
  policies: Map<string, GlobalTrafficPolicySpec>;
}

/**
 * The multi-cluster side of a controller: computes this cluster's exports
 * from its Services (through the compiler) and serves them to peers; imports
 * the peers' exports; merges everything with the KEP's rules; allocates
 * ClusterSetIPs; hands the compiler the imports with their tiers, which go
 * into every node's policy. Local traffic never waits on any of this: a
 * peer's state only changes what the remote tiers hold.
 */
export class MulticlusterController {
  readonly hub = new ExportsHub();
  readonly peers: PeerClient[] = [];
  private server: FastifyInstance | undefined;
  private objects: Objects = { exports: new Map(), policies: new Map() };
  private objectsStamp = '';
  private readonly firstSeen = new Map<string, number>();
  private readonly generations = new Map<string, { json: string; generation: number }>();
  private ips: Record<string, string> = {};
  private readonly cidr: Cidr4;
  private timer: NodeJS.Timeout | undefined;
  private lastStatus = '';
  private readonly now: () => number;
  private changed = () => {};
  private url = '';
  private readonly peersGauge: Gauge | undefined;

  private constructor(private readonly o: MulticlusterOptions) {
    this.now = o.now ?? Date.now;
    this.cidr = parseCidr4(o.config.clustersetCidr, 'ClusterSet.spec.clustersetCidr');
    this.peersGauge = o.registry
      ? new Gauge({ name: 'fsm_node_multicluster_peer_up', help: 'Whether a peer cluster answered its last long-poll (1) or not (0).', labelNames: ['peer'], registers: [o.registry] })
      : undefined;
  }

  get cluster(): string {
    return this.o.config.clusterId;
  }

  /** https://host:port of the peers' API. */
  get address(): string {
    return this.url;
  }

  /**
   * Start serving peers and polling them. `onChange` is called when the
   * imports changed for a reason of ours (a peer, a lease, an object): the
   * caller compiles and publishes, then calls refresh() again.
   */
  static async start(o: MulticlusterOptions, onChange: () => void): Promise<MulticlusterController> {
    const mc = new MulticlusterController(o);
    mc.changed = onChange;
    await mkdir(join(o.stateDir, 'peers'), { recursive: true });
    mc.ips = await loadAllocations(join(o.stateDir, 'clusterset-ips.json'));
    await mc.loadObjects();
    for (const p of o.config.peers) {
      const restored = await mc.restorePeer(p.clusterId);
      const client = new PeerClient({
        cluster: p.clusterId,
        url: p.url,
        tls: o.tls,
        waitMs: o.peerWaitMs,
        restored,
        now: mc.now,
        onChange: () => {
          void mc.savePeer(client.state.cluster, client.state.doc, client.state.lastSeen);
          mc.changed();
        },
        onAttempt: () => {
          mc.peersGauge?.set({ peer: p.clusterId }, client.state.error ? 0 : 1);
          mc.writePeers();
        },
      });
      mc.peers.push(client);
    }
    const { host, port } = parseListen(o.config.listen);
    const ids = new Set(o.config.peers.map((p) => p.clusterId));
    mc.server = buildPeerServer({ hub: mc.hub, tls: o.tls, peers: () => ids, registry: o.registry });
    try {
      mc.url = await mc.server.listen({ host, port });
    } catch (err) {
      throw new FsmNodeError('FSMN_ERR_LISTEN', `cannot listen for peer clusters on ${host}:${port}: ${errorMessage(err)}`, { cause: err });
    }
    for (const p of mc.peers) p.start();
    mc.timer = setInterval(() => void mc.tick(), o.pollMs ?? 1000);
    mc.timer.unref();
    log.info({ cluster: o.config.clusterId, url: mc.url, peers: o.config.peers.map((p) => p.clusterId), leaseMs: o.config.leaseMs }, 'clusterset member serving');
    return mc;
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await Promise.all(this.peers.map((p) => p.stop()));
    await this.server?.close();
  }

  /**
   * Recompute this cluster's exports (served to peers) and the imports (into
   * the compiler). True when the imports changed: compile and publish again.
   */
  refresh(): boolean {
    const local = this.localExports();
    this.hub.publish(exportsDocument(this.cluster, local.exports));
    const all = [...local.exports, ...this.liveRemoteExports()];
    const merged = mergeAll(all).filter((m) => this.o.compiler.namespaceInMesh(m.namespace));
    const part = this.importsPart(merged, all);
    const changed = this.o.compiler.setMulticluster(part);
    this.writeStatus(local.conditions, merged, part, all);
    return changed;
  }

  private async tick(): Promise<void> {
    try {
      if (await this.loadObjects()) return this.changed();
      // Leases run out with time alone: check whether the imports would change.
      const before = JSON.stringify(this.liveRemoteExports().map((e) => e.cluster));
      if (before !== this.lastLive) {
        this.lastLive = before;
        this.changed();
      }
    } catch (err) {
      log.error({ err: errorMessage(err) }, 'multicluster tick failed');
    }
  }
  private lastLive = '';

  /** Peers' exports still within their lease. */
  private liveRemoteExports(): ClusterExport[] {
    const now = this.now();
    const out: ClusterExport[] = [];
    for (const p of this.peers) {
      const s = p.state;
      if (!s.doc || now - s.lastSeen > this.o.config.leaseMs) continue;
      out.push(...s.doc.exports);
    }
    return out;
  }

  private localExports(): { exports: ClusterExport[]; conditions: Map<string, Condition[]> } {
    const c = this.o.compiler;
    const gateways = c.gatewayNodes().map((g) => `${g.addresses.find((a) => /^\d+\.\d+\.\d+\.\d+$/.test(a)) ?? g.addresses[0]}:${this.o.config.gatewayPort}`);
    const exports: ClusterExport[] = [];
    const conditions = new Map<string, Condition[]>();
    for (const [key, rec] of [...this.objects.exports].sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
      const invalid = (reason: string, message: string) => conditions.set(key, [{ type: 'Valid', status: 'False', reason, message }]);
      const svcRec = c.serviceRecord(rec.namespace, rec.name);
      if (!svcRec) {
        invalid('ServiceNotFound', `no Service ${key} in this cluster`);
        continue;
      }
      const svc = c.compiledService(rec.namespace, rec.name);
      if (!svc) {
        invalid('NotInMesh', `Service ${key} is not in the mesh (its namespace is not monitored)`);
        continue;
      }
      if (!this.firstSeen.has(key)) this.firstSeen.set(key, this.now());
      const base = {
        cluster: this.cluster,
        namespace: rec.namespace,
        name: rec.name,
        type: svcRec.clusterIPs.length === 0 ? ('Headless' as const) : ('ClusterSetIP' as const),
        ports: svc.ports.map((p) => ({ name: p.name, protocol: p.protocol, appProtocol: p.appProtocol, port: p.port })),
        sessionAffinity: 'None' as const,
        exportTime: rec.createdMs || this.firstSeen.get(key)!,
        readyEndpoints: svc.endpoints.length,
        gateways,
      };
      const json = JSON.stringify(base);
      const g = this.generations.get(key);
      const generation = !g ? 1 : g.json === json ? g.generation : g.generation + 1;
      this.generations.set(key, { json, generation });
      if (gateways.length < 2) {
        conditions.set(key, [{ type: 'Valid', status: 'True', reason: 'FewGateways', message: `only ${gateways.length} gateway node(s) labelled ${'multicluster.fsm-node.io/gateway=true'}: other clusters reach this service through them, label at least 2` }]);
      } else conditions.set(key, [{ type: 'Valid', status: 'True', reason: 'Exported', message: 'exported to the clusterset' }]);
      exports.push({ ...base, generation });
    }
    for (const k of this.generations.keys()) if (!this.objects.exports.has(k)) this.generations.delete(k);
    return { exports, conditions };
  }

  private importsPart(merged: MergedImport[], all: ClusterExport[]): MulticlusterPart {
    const byKey = new Map<string, ClusterExport[]>();
    for (const e of all) {
      const k = exportKey(e);
      byKey.set(k, [...(byKey.get(k) ?? []), e]);
    }
    const wanted = merged.filter((m) => m.type === 'ClusterSetIP').map(exportKey);
    const alloc = allocate(wanted, this.cidr, this.ips);
    for (const k of alloc.exhausted) log.error({ service: k, cidr: this.o.config.clustersetCidr }, 'clusterset CIDR is full: no ClusterSetIP for this import');
    if (JSON.stringify(alloc.ips) !== JSON.stringify(this.ips)) {
      // Kept addresses of imports that went away are dropped only here, with the table written in the same step.
      this.ips = alloc.ips;
      void saveAllocations(join(this.o.stateDir, 'clusterset-ips.json'), alloc.ips).catch((err: unknown) => log.error({ err: errorMessage(err) }, 'cannot save the ClusterSetIP table'));
    }
    const imports: PolicyImport[] = merged.map((m) => {
      const key = exportKey(m);
      const exps = new Map((byKey.get(key) ?? []).map((e) => [e.cluster, e]));
      const tiers = tiersFor(this.objects.policies.get(key), this.cluster, m.clusters).map((tier) =>
        tier.map((t): ImportTierMember => {
          const e = exps.get(t.cluster)!;
          const local = t.cluster === this.cluster;
          return { cluster: t.cluster, weight: t.weight, local, gateways: local ? [] : e.gateways, readyEndpoints: e.readyEndpoints };
        }),
      );
      const ip = alloc.ips[key];
      return {
        namespace: m.namespace,
        name: m.name,
        type: m.type,
        ips: m.type === 'ClusterSetIP' && ip ? [ip] : [],
        ports: m.ports.map((p) => ({ name: p.name, port: p.port, protocol: p.protocol, appProtocol: p.appProtocol })),
        tiers,
      };
    });
    return { cluster: this.cluster, gatewayPort: this.o.config.gatewayPort, imports, clustersetBundle: splitPem(this.o.tls.ca), peers: this.o.config.peers.map((p) => p.clusterId).sort() };
  }

  /**
   * Kubernetes mode: the ServiceExports and GlobalTrafficPolicies the
   * informers hold (each already parsed; a bad one was left out and
   * reported). Calls onChange when they changed.
   */
  setObjects(exports: Map<string, ServiceExportRec>, policies: Map<string, GlobalTrafficPolicySpec>): void {
    const next: Objects = { exports: new Map([...exports].sort()), policies: new Map([...policies].sort()) };
    const same = JSON.stringify([...this.objects.exports, ...this.objects.policies]) === JSON.stringify([...next.exports, ...next.policies]);
    this.objects = next;
    if (!same) this.changed();
  }

  /** Re-read objectsDir when anything in it changed; true when the objects changed. A bad document keeps the last good set. */
  private async loadObjects(): Promise<boolean> {
    const dir = this.o.objectsDir;
    if (!dir) return false;
    let files: string[];
    try {
      files = (await readdir(dir)).filter((f) => /\.ya?ml$/.test(f) && !f.startsWith('.')).sort();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') files = [];
      else throw err;
    }
    const stamps = await Promise.all(files.map(async (f) => `${f}:${(await stat(join(dir, f)).catch(() => undefined))?.mtimeMs ?? 0}`));
    const stamp = stamps.join('|');
    if (stamp === this.objectsStamp) return false;
    this.objectsStamp = stamp;
    const next: Objects = { exports: new Map(), policies: new Map() };
    try {
      for (const f of files) {
        const docs = parseAllDocuments(await readFile(join(dir, f), 'utf8'));
        docs.forEach((d, i) => {
          const where = `${f}#${i}`;
          if (d.errors.length) throw new FsmNodeError('FSMN_ERR_INVALID_INPUT', `${where}: YAML: ${d.errors[0]!.message.split('\n')[0]}`);
          const obj = d.toJS() as { kind?: unknown } | null;
          if (obj === null) return;
          try {
            if (obj.kind === 'ServiceExport') {
              const r = parseServiceExport(obj);
              next.exports.set(exportKey(r), r);
            } else if (obj.kind === 'GlobalTrafficPolicy') {
              const r = parseGlobalTrafficPolicy(obj);
              next.policies.set(exportKey(r), r.spec);
            } else throw new FsmNodeError('FSMN_ERR_INVALID_INPUT', `unknown kind ${JSON.stringify(obj.kind)} (known: ServiceExport, GlobalTrafficPolicy)`);
          } catch (err) {
            throw new FsmNodeError('FSMN_ERR_INVALID_INPUT', `${where}: ${errorMessage(err)}`, { cause: err });
          }
        });
      }
    } catch (err) {
      log.error({ dir, err: errorMessage(err) }, 'multicluster objects rejected; keeping the last good set');
      return false;
    }
    const same = JSON.stringify([...this.objects.exports, ...this.objects.policies]) === JSON.stringify([...next.exports, ...next.policies]);
    this.objects = next;
    return !same;
  }

  private async restorePeer(cluster: string): Promise<{ doc: ExportsDocument; lastSeen: number } | undefined> {
    try {
      const raw = JSON.parse(await readFile(join(this.o.stateDir, 'peers', `${cluster}.json`), 'utf8')) as { lastSeen?: unknown; doc?: unknown };
      const doc = ExportsDocumentSchema.safeParse(raw.doc);
      if (!doc.success || typeof raw.lastSeen !== 'number' || doc.data.cluster !== cluster) return undefined;
      if (this.now() - raw.lastSeen > this.o.config.leaseMs) return undefined;
      log.info({ peer: cluster, lastSeen: new Date(raw.lastSeen).toISOString() }, "restored a peer's exports from disk (within its lease)");
      return { doc: doc.data, lastSeen: raw.lastSeen };
    } catch {
      return undefined;
    }
  }

  private async savePeer(cluster: string, doc: ExportsDocument | undefined, lastSeen: number): Promise<void> {
    if (!doc) return;
    await writeFileAtomic(join(this.o.stateDir, 'peers', `${cluster}.json`), JSON.stringify({ lastSeen, doc })).catch((err: unknown) =>
      log.warn({ peer: cluster, err: errorMessage(err) }, "cannot save a peer's exports"),
    );
  }

  /** The last status written, with the peers as they are now. */
  status(): MulticlusterStatus {
    const s = JSON.parse(this.lastStatus || 'null') as MulticlusterStatus;
    return { ...s, peers: this.peersStatus() };
  }

  /** Rewrite status.json with the peers' state now (after a long-poll answered or failed). */
  private writePeers(): void {
    if (!this.lastStatus) return;
    const s = this.status();
    const text = JSON.stringify(s, null, 2);
    if (text === this.lastStatus) return;
    this.lastStatus = text;
    void writeFileAtomic(join(this.o.stateDir, 'status.json'), `${text}\n`, 0o644).catch(() => {});
  }

  private peersStatus(): MulticlusterStatus['peers'] {
    const now = this.now();
    return this.peers.map((p) => ({
      cluster: p.state.cluster,
      url: p.state.url,
      lastSeen: p.state.lastSeen ? new Date(p.state.lastSeen).toISOString() : null,
      error: p.state.error ?? null,
      exports: p.state.doc?.exports.length ?? 0,
      leaseExpired: p.state.doc !== undefined && now - p.state.lastSeen > this.o.config.leaseMs,
    }));
  }

  private writeStatus(conditions: Map<string, Condition[]>, merged: MergedImport[], part: MulticlusterPart, all: ClusterExport[]): void {
    const conflictOf = new Map(merged.map((m) => [exportKey(m), m.conflict]));
    const status: MulticlusterStatus = {
      cluster: this.cluster,
      exports: [...conditions].map(([key, conds]) => {
        const [namespace, name] = key.split('/') as [string, string];
        const conflict = conflictOf.get(key);
        const mine = all.find((e) => e.cluster === this.cluster && exportKey(e) === key);
        return { namespace, name, conditions: conflict ? [...conds, conflict] : conds, readyEndpoints: mine?.readyEndpoints ?? 0 };
      }),
      imports: part.imports.map((i) => ({
        namespace: i.namespace,
        name: i.name,
        type: i.type,
        ips: i.ips,
        clusters: merged.find((m) => exportKey(m) === exportKey(i))?.clusters ?? [],
        ports: i.ports.map((p) => p.port),
        tiers: i.tiers.map((t) => t.map((m) => `${m.cluster}:${m.weight}`)),
      })),
      peers: this.peersStatus(),
    };
    const text = JSON.stringify(status, null, 2);
    if (text === this.lastStatus) return;
    this.lastStatus = text;
    this.o.onStatus?.(status);
    void writeFileAtomic(join(this.o.stateDir, 'status.json'), `${text}\n`, 0o644).catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'cannot write multicluster status'));
  }
}
