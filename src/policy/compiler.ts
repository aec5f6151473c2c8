import { createHash } from 'node:crypto';
import type { ZodTypeAny } from 'zod';
import { logger } from '../util/log.js';
import { DEFAULT_CONTROLLER_NAMESPACE, MESH_CONFIG_NAME } from './fsm.js';
import { IssueReporter } from './issues.js';
import { compileResilience, RESILIENCE_DEFAULTS } from './resilience.js';
import { resolveGateways, type GatewayResolution } from '../gateway/resolve.js';
import { EMPTY_INGRESS, type Ingress } from '../gateway/schema.js';
import type { EgressPolicy } from '../egress/schema.js';
import {
  FieldError,
  IDENTITY_DEFAULTS,
  MESH_DEFAULTS,
  type MeshIdentitySettings,
  refOf,
  toRecord,
  type Kind,
  type ObjectRef,
  type PodRec,
  type RecordOf,
  type ServiceRec,
  type SplitRec,
  type TargetRec,
} from './objects.js';
import {
  AccessSchema,
  formatIssues,
  GlobalPartSchema,
  NodePartSchema,
  POLICY_API_VERSION,
  PolicyServiceSchema,
  SplitSchema,
  type Access,
  type Endpoint,
  type GlobalPart,
  type MeshPod,
  type MeshSettings,
  type MulticlusterPart,
  type NodePart,
  type NodePolicy,
  type PolicyPod,
  type PolicyService,
  type Split,
} from './schema.js';

/**
 * Incremental compiler from cluster objects to one NodePolicy per node.
 *
 * Sources feed objects in with upsert/remove (each is checked on the way in;
 * a bad one is reported and its last good record stays). Each change marks
 * what it can affect: a pod marks its node and the services it backs, an
 * EndpointSlice its service, a split or target the shared parts. compile()
 * then rebuilds only what is marked and returns the nodes whose policy
 * version changed.
 *
 * A policy is assembled from four cached parts so that one change costs
 * little and 100 nodes do not each hold a copy of 2k services:
 *   - global: mesh settings and every node proxy's addresses (one for all);
 *   - mesh pods: every enrolled pod's address, identity and node (one for
 *             all), so that a proxy never mistakes a mesh pod it may not
 *             reach for egress; assembled from per-node slices, so a pod
 *             change rebuilds its node's slice and rehashes 100 short hashes;
 *   - node:   the node, its enrolled pods and, in smi mode, the access rules
 *             whose destination is one of its pods' identities;
 *   - section: the services (with endpoints) and splits the node's pods may
 *             reach, and those of its pods' own identities; shared by all
 *             nodes with the same set (all nodes in permissive mode).
 * The version is a hash over the part hashes: content-addressed, so replicas
 * compiling the same objects agree and an unrelated change wakes nobody.
 */

const shortHash = (s: string): string => createHash('sha256').update(s).digest('hex').slice(0, 16);
const idKey = (namespace: string, serviceAccount: string): string => `${namespace}/${serviceAccount}`;
const byKey = <T>(entries: Iterable<[string, T]>): T[] => [...entries].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)).map((e) => e[1]);

/** JSON text shared by several nodes' policies; the same object for as long as the text is the same. */
export interface SharedJson {
  text(): string;
}

/** The one compiled policy of a node. Parts are shared with other nodes: do not mutate. */
export interface CompiledNode {
  readonly node: string;
  readonly version: string;
  readonly policy: NodePolicy;
  /** The policy as JSON text (built on first use, then kept). */
  json(): string;
  /**
   * The same JSON in two pieces: `{` + shared.text() is shared by every node
   * that may reach the same services (mesh pods, services and splits), so an encoder can
   * cache its encoding once for all of them; tail is this node's own
   * (see controller/hub.ts).
   */
  pieces(): readonly [shared: SharedJson, tail: string];
  /** What the policy was assembled from: a delta between two versions compares these (policy/delta.ts). */
  readonly parts: PolicyParts;
}

/** A piece of a policy's JSON that a delta carries whole or not at all. */
export interface Keyed {
  /** ns/name for services and splits, the node name for a mesh pods slice. */
  readonly key: string;
  readonly hash: string;
  /** Its JSON (a slice: its pods' objects, comma-joined). */
  readonly json: string;
}

/** The keyed pieces every node with the same services shares; the same object for as long as they are the same. */
export interface SharedParts {
  /** Sorted by key, as in the policy. */
  readonly services: readonly Keyed[];
  readonly splits: readonly Keyed[];
  /** One slice per node with enrolled pods, sorted by node name. */
  readonly meshPods: readonly Keyed[];
  readonly meshPodCount: number;
}

export interface PolicyParts {
  /** `"mesh":…,"proxies":…` */
  readonly global: { readonly hash: string; readonly members: string };
  /** `"node":…,"pods":…,"access":…` */
  readonly node: { readonly hash: string; readonly members: string };
  readonly shared: SharedParts;
}

export interface CompileResult {
  /** Nodes whose version changed, or whose policy is gone (no Node object and no pods any more). */
  changed: string[];
  durationMs: number;
}

interface Part<T> {
  value: T;
  /** JSON of the part without its outer braces: policies are assembled by concatenation. */
  members: string;
  hash: string;
}

interface ServiceEntry extends Keyed {
  service: PolicyService;
  json: string;
  hash: string;
  /** Identities (ns/serviceAccount) behind the endpoints: what smi access is granted to. */
  identities: Set<string>;
  /** Pods (ns/name) the entry read: a change to one of them rebuilds the entry. */
  pods: string[];
}

interface SplitEntry extends Keyed {
  split: Split;
  /** ns/name of the root service: a node gets the split when it may reach that service. */
  root: string;
  hash: string;
}

interface Section {
  /** Member service keys, sorted: a content change to one of them rebuilds the section from these. */
  keys: string[];
  /** Aligned with keys. */
  entries: ServiceEntry[];
  splitEntries: SplitEntry[];
  services: PolicyService[];
  splits: Split[];
  hash: string;
  /** `"services":[...],"splits":[...]` */
  shared: SharedJson;
}

interface NodeEntry {
  part: Part<NodePart>;
  /** Which section the node reads: '*' (everything) or the sorted identities its pods may reach or run as. */
  signature: string;
  /** The node's slice of the mesh pods part: its enrolled pods by address; json is their comma-joined objects. */
  meshPods: MeshPodsSlice;
}

interface MeshPodsSlice extends Keyed {
  pods: MeshPod[];
}

/** Every node's mesh pods slice, concatenated in node name order. */
interface MeshPodsAll {
  slices: MeshPodsSlice[];
  pods: MeshPod[];
  hash: string;
  /** `"meshPods":[...]`, built on first use. */
  text(): string;
}

type Store = { [K in Kind]: Map<string, RecordOf[K]> };

export interface CompilerOptions {
  /** Namespace of the mesh ConfigMap (fsm-mesh-config). */
  controllerNamespace?: string;
  reporter?: IssueReporter;
}

export class PolicyCompiler {
  readonly reporter: IssueReporter;
  private readonly controllerNamespace: string;
  private readonly log = logger('policy-compiler');

  private readonly store: Store = {
    Namespace: new Map(),
    Node: new Map(),
    Pod: new Map(),
    Service: new Map(),
    EndpointSlice: new Map(),
    ConfigMap: new Map(),
    TrafficSplit: new Map(),
    TrafficTarget: new Map(),
    HTTPRouteGroup: new Map(),
    TCPRoute: new Map(),
    MQTTRouteGroup: new Map(),
    GatewayClass: new Map(),
    Gateway: new Map(),
    HTTPRoute: new Map(),
    ReferenceGrant: new Map(),
    Secret: new Map(),
    Egress: new Map(),
    Retry: new Map(),
    UpstreamTrafficSetting: new Map(),
  };

  // Indexes kept in step with the store.
  private readonly podsByNode = new Map<string, Set<string>>();
  private readonly podsByNamespace = new Map<string, Set<string>>();
  private readonly servicesByNamespace = new Map<string, Set<string>>();
  private readonly slicesByService = new Map<string, Set<string>>();
  private readonly servicesByPod = new Map<string, Set<string>>();

  // Compiled parts.
  private global: Part<GlobalPart> | undefined;
  /** The mesh's Gateways (part of the global part) and the status they resolved to. */
  private ingress: Ingress = EMPTY_INGRESS;
  private gatewayResolution: GatewayResolution | undefined;
  private ingressDirty = false;
  private readonly serviceEntries = new Map<string, ServiceEntry>();
  private sortedServiceKeys: string[] | undefined;
  /** Identity -> keys of the services with an endpoint of it; built with sortedServiceKeys, dropped with it. */
  private servicesByIdentity: Map<string, string[]> | undefined;
  /** Sorted by key: every section takes its splits from here, in this order. */
  private splitEntries: SplitEntry[] = [];
  private accessByDestination = new Map<string, Access[]>();
  private destinationsBySource = new Map<string, Set<string>>();
  private readonly sections = new Map<string, Section>();
  private readonly nodeEntries = new Map<string, NodeEntry>();
  private readonly compiled = new Map<string, CompiledNode>();
  private meshPods: MeshPodsAll | undefined;
  /** Mesh pods + section as one shared piece, per section; replaced whenever the mesh pods change. */
  private sharedBySection = new WeakMap<Section, { json: SharedJson; parts: SharedParts }>();
  /** The last version of each split/target whose references all resolved: kept in force while a newer one does not. */
  private readonly lastResolvedSplit = new Map<string, SplitRec>();
  private readonly lastResolvedTarget = new Map<string, TargetRec>();

  // What the next compile must redo.
  private fullDirty = true;
  /** Sorted monitored namespace names; dropped on every full recompile (a Namespace or the mesh changed). */
  private monitoredCache: string[] | undefined;
  private globalDirty = false;
  private trustBundle: string[] = [];
  private multicluster: MulticlusterPart | undefined;
  private splitsDirty = false;
  private accessDirty = false;
  private readonly dirtyServices = new Set<string>();
  private readonly dirtyNodes = new Set<string>();

  constructor(opts: CompilerOptions = {}) {
    this.controllerNamespace = opts.controllerNamespace ?? DEFAULT_CONTROLLER_NAMESPACE;
    this.reporter = opts.reporter ?? new IssueReporter();
  }

  /**
   * Check `obj` (a Kubernetes object of `kind`) and take it in. Returns false
   * when it is rejected (reported; the last good version stays) or not ours
   * (a ConfigMap other than the mesh config).
   */
  upsert<K extends Kind>(kind: K, obj: unknown, origin?: string): boolean {
    const ref = refOf(kind, obj);
    if (kind === 'ConfigMap' && !this.isMeshConfig(ref)) return false;
    const key = `${ref.namespace}/${ref.name}`;
    const map = this.store[kind] as Map<string, RecordOf[K]>;
    let rec: RecordOf[K];
    try {
      rec = toRecord(kind, obj);
    } catch (err) {
      if (!(err instanceof FieldError)) throw err;
      this.reporter.report({ ref, stage: 'input', field: err.field, message: err.message, origin, keptLastGood: map.has(key) });
      return false;
    }
    this.reporter.clear(ref, 'input');
    const old = map.get(key);
    map.set(key, rec);
    this.touch(kind, key, old, rec);
    return true;
  }

  /** The object is gone from its source. */
  remove(ref: ObjectRef): void {
    const key = `${ref.namespace}/${ref.name}`;
    const map = this.store[ref.kind] as Map<string, unknown>;
    const old = map.get(key);
    this.reporter.clear(ref);
    // A later object of the same name is a new object: it inherits no last good version.
    if (ref.kind === 'TrafficSplit') this.lastResolvedSplit.delete(key);
    if (ref.kind === 'TrafficTarget') this.lastResolvedTarget.delete(key);
    if (old === undefined) return;
    map.delete(key);
    this.touch(ref.kind, key, old as never, undefined);
  }

  get(node: string): CompiledNode | undefined {
    return this.compiled.get(node);
  }

  nodes(): string[] {
    return [...this.compiled.keys()];
  }

  mesh(): MeshSettings {
    return this.store.ConfigMap.get(`${this.controllerNamespace}/${MESH_CONFIG_NAME}`)?.settings ?? MESH_DEFAULTS;
  }

  /** Trust domain and certificate lifetime from the mesh ConfigMap (the controller's identity API reads them). */
  identitySettings(): MeshIdentitySettings {
    return this.store.ConfigMap.get(`${this.controllerNamespace}/${MESH_CONFIG_NAME}`)?.identity ?? IDENTITY_DEFAULTS;
  }

  /**
   * The PEM roots the certificate provider publishes (old and new during a
   * root rotation). Goes into every node's policy; the next compile carries
   * it. True when it differs from the bundle held.
   */
  /**
   * The clusterset's imports (src/multicluster/controller.ts), in every
   * node's policy; undefined without a clusterset. True when it changed (then
   * compile and publish).
   */
  setMulticluster(part: MulticlusterPart | undefined): boolean {
    if (JSON.stringify(part) === JSON.stringify(this.multicluster)) return false;
    this.multicluster = part;
    this.globalDirty = true;
    return true;
  }

  /** A monitored service as compiled (ports, cluster IPs, ready endpoints): what the multicluster exports read. */
  compiledService(namespace: string, name: string): PolicyService | undefined {
    return this.serviceEntries.get(`${namespace}/${name}`)?.service;
  }

  /** Whether a Service object exists (monitored or not) and its cluster IPs: an export of a missing Service is not Valid. */
  serviceRecord(namespace: string, name: string): { clusterIPs: string[] } | undefined {
    const r = this.store.Service.get(`${namespace}/${name}`);
    return r && { clusterIPs: r.clusterIPs };
  }

  /** Whether the namespace exists and is in the mesh (a ServiceImport appears only where its namespace does). */
  namespaceInMesh(namespace: string): boolean {
    return this.monitored(namespace, this.mesh());
  }

  /** Nodes labelled as multicluster gateways, by name, with their addresses. */
  gatewayNodes(): { node: string; addresses: string[] }[] {
    return byKey(this.store.Node.entries())
      .filter((n) => n.gateway && n.addresses.length > 0)
      .map((n) => ({ node: n.name, addresses: n.addresses }));
  }

  setTrustBundle(bundle: readonly string[]): boolean {
    if (bundle.join('\n') === this.trustBundle.join('\n')) return false;
    this.trustBundle = [...bundle];
    this.globalDirty = true;
    return true;
  }

  private isMeshConfig(ref: ObjectRef): boolean {
    return ref.namespace === this.controllerNamespace && ref.name === MESH_CONFIG_NAME;
  }

  // ---- change tracking ------------------------------------------------------

  private touch<K extends Kind>(kind: K, key: string, old: RecordOf[K] | undefined, rec: RecordOf[K] | undefined): void {
    switch (kind) {
      case 'Namespace': {
        const o = old as RecordOf['Namespace'] | undefined;
        const n = rec as RecordOf['Namespace'] | undefined;
        if (o?.monitoredBy !== n?.monitoredBy) this.fullDirty = true;
        break;
      }
      case 'ConfigMap':
        this.fullDirty = true;
        break;
      case 'Node': {
        const o = old as RecordOf['Node'] | undefined;
        const n = rec as RecordOf['Node'] | undefined;
        if (o?.addresses.join() !== n?.addresses.join() || !o || !n) this.globalDirty = true;
        this.dirtyNodes.add(key.slice(1));
        break;
      }
      case 'Pod':
        this.touchPod(key, old as PodRec | undefined, rec as PodRec | undefined);
        break;
      case 'Service': {
        const svc = (old ?? rec) as ServiceRec;
        indexSet(this.servicesByNamespace, svc.namespace, key, rec !== undefined);
        this.dirtyServices.add(key);
        break;
      }
      case 'EndpointSlice': {
        const o = old as RecordOf['EndpointSlice'] | undefined;
        const n = rec as RecordOf['EndpointSlice'] | undefined;
        if (o?.service) {
          indexSet(this.slicesByService, `${o.namespace}/${o.service}`, key, false);
          this.dirtyServices.add(`${o.namespace}/${o.service}`);
        }
        if (n?.service) {
          indexSet(this.slicesByService, `${n.namespace}/${n.service}`, key, true);
          this.dirtyServices.add(`${n.namespace}/${n.service}`);
        }
        break;
      }
      case 'TrafficSplit':
        this.splitsDirty = true;
        break;
      case 'HTTPRouteGroup':
        this.splitsDirty = true;
        this.accessDirty = true;
        break;
      case 'TrafficTarget':
      case 'TCPRoute':
      case 'MQTTRouteGroup':
        this.accessDirty = true;
        break;
      case 'GatewayClass':
      case 'Gateway':
      case 'HTTPRoute':
      case 'ReferenceGrant':
      case 'Secret':
        this.ingressDirty = true;
        break;
      case 'Egress':
      case 'Retry':
      case 'UpstreamTrafficSetting':
        // Mesh-wide, like the trust: every node gets them (the proxy of the source's node applies Retry).
        this.globalDirty = true;
        break;
    }
    // Gateways read nodes (selectors), namespaces (allowedRoutes) and services (backends) too.
    if ((kind === 'Node' || kind === 'Namespace') && this.store.Gateway.size > 0) this.ingressDirty = true;
  }

  private touchPod(key: string, old: PodRec | undefined, rec: PodRec | undefined): void {
    for (const p of [old, rec]) {
      if (!p) continue;
      if (p.node) this.dirtyNodes.add(p.node);
      // Services selecting the pod by labels (manifest mode: no EndpointSlices).
      for (const svcKey of this.servicesByNamespace.get(p.namespace) ?? []) {
        const svc = this.store.Service.get(svcKey);
        if (svc?.selector && !this.slicesByService.get(svcKey)?.size && selects(svc.selector, p.labels)) this.dirtyServices.add(svcKey);
      }
    }
    // Services whose endpoints name this pod (identity, node).
    for (const svcKey of this.servicesByPod.get(key) ?? []) this.dirtyServices.add(svcKey);
    if (old?.node && old.node !== rec?.node) indexSet(this.podsByNode, old.node, key, false);
    if (rec?.node) indexSet(this.podsByNode, rec.node, key, true);
    const ns = (old ?? rec)!.namespace;
    indexSet(this.podsByNamespace, ns, key, rec !== undefined);
  }

  // ---- compile --------------------------------------------------------------

  compile(): CompileResult {
    const started = performance.now();
    const mesh = this.mesh();
    let allNodes = false;
    if (this.fullDirty) {
      this.monitoredCache = undefined;
      for (const k of new Set([...this.store.Service.keys(), ...this.serviceEntries.keys()])) this.dirtyServices.add(k);
      for (const n of this.nodeNames()) this.dirtyNodes.add(n);
      for (const n of this.nodeEntries.keys()) this.dirtyNodes.add(n);
      this.globalDirty = this.splitsDirty = this.accessDirty = true;
      this.fullDirty = false;
    }

    if (this.globalDirty) {
      const prev = this.global?.hash;
      this.global = this.buildGlobal(mesh) ?? this.global;
      if (this.global?.hash !== prev) allNodes = true;
    }

    // Sections are dropped when who-is-in-which-section may change; when only
    // the content of member services changed they are rebuilt from their keys.
    let sectionsStale = false;
    const contentChanged = new Set<string>();
    for (const key of this.dirtyServices) {
      const r = this.rebuildService(key, mesh);
      if (r === 'changed') contentChanged.add(key);
      if (r === 'membership') {
        sectionsStale = true;
        this.sortedServiceKeys = undefined;
        this.servicesByIdentity = undefined;
        this.splitsDirty = true;
      }
    }
    if (this.store.Gateway.size > 0 && this.dirtyServices.size > 0) this.ingressDirty = true;
    if (this.ingressDirty || this.gatewayResolution === undefined) {
      this.ingressDirty = false;
      const before = JSON.stringify(this.ingress);
      this.gatewayResolution = this.resolveIngress();
      this.ingress = this.gatewayResolution.ingress;
      this.reportGatewayRefusals(this.gatewayResolution);
      if (JSON.stringify(this.ingress) !== before) {
        const prev = this.global?.hash;
        this.global = this.buildGlobal(mesh) ?? this.global;
        if (this.global?.hash !== prev) allNodes = true;
      }
    }
    if (this.accessDirty) {
      this.rebuildAccess(mesh);
      // Access only exists in smi mode (a mode change is a full compile anyway).
      if (mesh.trafficPolicy === 'smi') {
        for (const n of this.nodeNames()) this.dirtyNodes.add(n);
        sectionsStale = true;
      }
    }
    // Splits do not decide which services a section holds, only which splits: rebuild from the keys.
    const splitsChanged = this.splitsDirty && this.rebuildSplits(mesh);
    if (sectionsStale) {
      this.sections.clear();
      allNodes = true;
    } else if (contentChanged.size > 0 || splitsChanged) {
      for (const [signature, section] of this.sections) {
        if (splitsChanged || section.keys.some((k) => contentChanged.has(k))) this.sections.set(signature, this.buildSection(section.keys));
      }
      allNodes = true;
    }

    const changed: string[] = [];
    const present = this.nodeNames();
    let meshPodsDirty = this.meshPods === undefined;
    for (const node of this.dirtyNodes) {
      const old = this.nodeEntries.get(node);
      if (present.has(node)) {
        const entry = this.buildNode(node, mesh);
        if (entry) this.nodeEntries.set(node, entry);
        if (entry?.meshPods.hash !== old?.meshPods.hash) meshPodsDirty = true;
      } else if (this.nodeEntries.delete(node)) {
        meshPodsDirty = true;
        if (this.compiled.delete(node)) changed.push(node);
      }
    }
    if (meshPodsDirty) {
      const all = this.buildMeshPods();
      if (all.hash !== this.meshPods?.hash) {
        this.meshPods = all;
        this.sharedBySection = new WeakMap();
        allNodes = true;
      }
    }
    const meshPods = this.meshPods!;
    for (const node of allNodes ? present : this.dirtyNodes) {
      const entry = this.nodeEntries.get(node);
      if (!entry || !this.global) continue;
      const section = this.section(entry.signature, mesh);
      const version = shortHash(`${this.global.hash}.${meshPods.hash}.${entry.part.hash}.${section.hash}`);
      if (this.compiled.get(node)?.version === version) continue;
      this.compiled.set(node, compiledNode(node, version, this.global, meshPods, entry.part, section, this.sharedOf(section, meshPods)));
      changed.push(node);
    }

    this.dirtyServices.clear();
    this.dirtyNodes.clear();
    this.globalDirty = this.splitsDirty = this.accessDirty = false;
    return { changed, durationMs: performance.now() - started };
  }

  /** The mesh pods part from the nodes' slices: concatenation and a hash over short hashes, never a pass over every pod's JSON. */
  private buildMeshPods(): MeshPodsAll {
    const slices = byKey(this.nodeEntries.entries()).map((e) => e.meshPods).filter((m) => m.pods.length > 0);
    let text: string | undefined;
    return {
      slices,
      pods: slices.flatMap((m) => m.pods),
      hash: shortHash(slices.map((m) => m.hash).join('')),
      text: () => (text ??= `"meshPods":[${slices.map((m) => m.json).join(',')}]`),
    };
  }

  /** One shared piece per section for as long as the mesh pods stay the same (an encoder caches by identity). */
  private sharedOf(section: Section, meshPods: MeshPodsAll): { json: SharedJson; parts: SharedParts } {
    let s = this.sharedBySection.get(section);
    if (!s) {
      let text: string | undefined;
      s = {
        json: { text: () => (text ??= `${meshPods.text()},${section.shared.text()}`) },
        parts: { services: section.entries, splits: section.splitEntries, meshPods: meshPods.slices, meshPodCount: meshPods.pods.length },
      };
      this.sharedBySection.set(section, s);
    }
    return s;
  }

  /** Nodes that get a policy: every Node object, and every node that runs pods. */
  private nodeNames(): Set<string> {
    const names = new Set([...this.store.Node.keys()].map((k) => k.slice(1)));
    for (const [node, pods] of this.podsByNode) if (pods.size > 0) names.add(node);
    return names;
  }

  /** Sorted names of the namespaces the mesh monitors (every node's part carries them, for the CNI plugin). */
  private monitoredNamespaces(mesh: MeshSettings): string[] {
    this.monitoredCache ??= [...this.store.Namespace.values()].filter((n) => n.monitoredBy === mesh.name).map((n) => n.name).sort();
    return this.monitoredCache;
  }

  private monitored(namespace: string, mesh: MeshSettings): boolean {
    return this.store.Namespace.get(`/${namespace}`)?.monitoredBy === mesh.name;
  }

  private enrolled(p: PodRec, mesh: MeshSettings): p is PodRec & { ip: string } {
    return p.ip !== null && p.active && !p.optOut && !p.hostNetwork && this.monitored(p.namespace, mesh);
  }

  /** Check a compiled part against its schema; the controller never serves what fails it. */
  private checked<T>(schema: ZodTypeAny, value: T, ref: ObjectRef): T | undefined {
    const r = schema.safeParse(value);
    if (r.success) return value;
    this.log.error({ object: ref, issues: formatIssues(r.error) }, 'compiled part fails the NodePolicy schema; previous part kept');
    return undefined;
  }

  private buildGlobal(mesh: MeshSettings): Part<GlobalPart> | undefined {
    const proxies = byKey(this.store.Node.entries())
      .filter((n) => n.addresses.length > 0)
      .map((n) => ({ node: n.name, addresses: n.addresses }));
    const trust = { trustDomain: this.identitySettings().trustDomain, bundle: this.trustBundle };
    const resilience = compileResilience(this.store.ConfigMap.get(`${this.controllerNamespace}/${MESH_CONFIG_NAME}`)?.resilience ?? RESILIENCE_DEFAULTS, byKey(this.store.Retry.entries()), byKey(this.store.UpstreamTrafficSetting.entries()));
    const multicluster = this.multicluster ? { multicluster: this.multicluster } : {};
    const value = this.checked(GlobalPartSchema, { mesh, proxies, trust, ...(resilience ? { resilience } : {}), ...multicluster, ...(this.ingress.gateways.length > 0 || this.ingress.problems ? { ingress: this.ingress } : {}), ...this.egressPart() }, { kind: 'ConfigMap', namespace: this.controllerNamespace, name: MESH_CONFIG_NAME });
    return value && part(value);
  }

  /** The Egress objects, sorted, as the global part carries them (nothing when there are none: versions of meshes without any stay the same). */
  private egressPart(): { egressPolicies?: EgressPolicy[] } {
    const list = byKey(this.store.Egress.entries());
    return list.length > 0 ? { egressPolicies: list } : {};
  }

  /** Gateway API objects -> the Ingress part and their status (src/gateway/resolve.ts). */
  private resolveIngress(): GatewayResolution {
    const s = this.store;
    return resolveGateways({
      classes: [...s.GatewayClass.values()],
      gateways: [...s.Gateway.values()],
      routes: [...s.HTTPRoute.values()],
      grants: [...s.ReferenceGrant.values()],
      secret: (ns, name) => s.Secret.get(`${ns}/${name}`),
      service: (ns, name) => this.serviceEntries.get(`${ns}/${name}`)?.service,
      namespaceLabels: (ns) => s.Namespace.get(`/${ns}`)?.labels,
      nodes: [...s.Node.values()].map((n) => ({ name: n.name, labels: n.labels })),
    });
  }

  private gatewayIssueRefs: ObjectRef[] = [];

  /**
   * Listeners and route parents that do not serve, as issues (a log line; an
   * Event in cluster mode), so manifest mode shows them too. Cleared when fixed.
   */
  private reportGatewayRefusals(r: GatewayResolution): void {
    for (const ref of this.gatewayIssueRefs) this.reporter.clear(ref, 'reference');
    this.gatewayIssueRefs = [];
    const report = (ref: ObjectRef, field: string, message: string) => {
      this.gatewayIssueRefs.push(ref);
      this.reporter.report({ ref, stage: 'reference', field, message, keptLastGood: false });
    };
    for (const g of r.gateways) {
      const ref: ObjectRef = { kind: 'Gateway', namespace: g.namespace, name: g.name };
      const bad = g.listeners.flatMap((l) => l.conditions.filter((c) => c.type === 'Programmed' && c.status === 'False').map((c) => `listener ${l.name}: ${c.reason}: ${c.message}`));
      if (bad.length > 0) report(ref, 'spec.listeners', bad.join('; '));
    }
    for (const route of r.routes) {
      const bad = route.parents.flatMap((p) => p.conditions.filter((c) => c.type === 'Accepted' && c.status === 'False').map((c) => `parent ${p.parentRef.namespace}/${p.parentRef.name}${p.parentRef.sectionName ? `/${p.parentRef.sectionName}` : ''}: ${c.reason}: ${c.message}`));
      if (bad.length > 0) report({ kind: 'HTTPRoute', namespace: route.namespace, name: route.name }, 'spec.parentRefs', bad.join('; '));
    }
  }

  /** What the Gateway API objects resolved to at the last compile (status for the cluster source and `fsm-node status`). */
  gatewayStatus(): GatewayResolution | undefined {
    return this.gatewayResolution;
  }

  /** 'same' | 'changed' | 'membership' (the service entered or left the mesh). */
  private rebuildService(key: string, mesh: MeshSettings): 'same' | 'changed' | 'membership' {
    const old = this.serviceEntries.get(key);
    const svc = this.store.Service.get(key);
    const entry = svc && this.monitored(svc.namespace, mesh) ? this.buildService(key, svc) : undefined;
    for (const pod of old?.pods ?? []) indexSet(this.servicesByPod, pod, key, false);
    for (const pod of entry?.pods ?? []) indexSet(this.servicesByPod, pod, key, true);
    if (entry) this.serviceEntries.set(key, entry);
    else this.serviceEntries.delete(key);
    if (!old || !entry) return old === entry ? 'same' : 'membership';
    if (!sameSet(old.identities, entry.identities)) return 'membership';
    return old.hash === entry.hash ? 'same' : 'changed';
  }

  private buildService(key: string, svc: ServiceRec): ServiceEntry | undefined {
    const byIp = new Map<string, Endpoint>();
    const pods: string[] = [];
    const slices = this.slicesByService.get(key);
    const add = (ip: string, ports: Record<string, number>, node: string | null, podKey: string | null) => {
      const pod = podKey ? this.store.Pod.get(podKey) : undefined;
      if (podKey) pods.push(podKey);
      const prev = byIp.get(ip);
      if (prev) Object.assign(prev.ports, ports);
      else {
        byIp.set(ip, {
          ip,
          ports,
          node: node ?? pod?.node ?? null,
          pod: pod ? { namespace: pod.namespace, name: pod.name } : null,
          serviceAccount: pod?.serviceAccount ?? null,
        });
      }
    };
    if (slices?.size) {
      for (const sliceKey of slices) {
        const slice = this.store.EndpointSlice.get(sliceKey)!;
        const ports = Object.fromEntries(slice.ports.map((p) => [p.name, p.port]));
        for (const e of slice.endpoints) {
          if (!e.ready) continue;
          for (const ip of e.addresses) add(ip, { ...ports }, e.node, e.pod ? `${e.pod.namespace}/${e.pod.name}` : null);
        }
      }
    } else if (svc.selector && Object.keys(svc.selector).length > 0) {
      // No EndpointSlice (manifest mode has no endpoint controller): select pods ourselves.
      for (const podKey of this.podsByNamespace.get(svc.namespace) ?? []) {
        const p = this.store.Pod.get(podKey)!;
        if (!p.ip || !p.active || !p.ready || !selects(svc.selector, p.labels)) continue;
        const ports: Record<string, number> = {};
        for (const sp of svc.ports) {
          const t = sp.targetPort;
          const port = t === null ? sp.port : typeof t === 'number' ? t : p.containerPorts[t];
          if (port !== undefined) ports[sp.name] = port;
        }
        add(p.ip, ports, p.node, podKey);
      }
    }
    const endpoints = [...byIp.values()].sort((a, b) => (a.ip < b.ip ? -1 : a.ip > b.ip ? 1 : 0));
    const service: PolicyService = {
      namespace: svc.namespace,
      name: svc.name,
      clusterIPs: svc.clusterIPs,
      ports: svc.ports.map((p) => ({ name: p.name, port: p.port, protocol: p.protocol, appProtocol: p.appProtocol })),
      endpoints,
    };
    if (!this.checked(PolicyServiceSchema, service, { kind: 'Service', namespace: svc.namespace, name: svc.name })) return this.serviceEntries.get(key);
    const json = JSON.stringify(service);
    const identities = new Set<string>();
    for (const e of endpoints) if (e.pod && e.serviceAccount) identities.add(idKey(e.pod.namespace, e.serviceAccount));
    return { key, service, json, hash: shortHash(json), identities, pods };
  }

  /** Resolve every split against the services in the mesh; true when the set of splits changed. */
  private rebuildSplits(mesh: MeshSettings): boolean {
    const before = this.splitEntries.map((e) => e.hash).join();
    const entries: SplitEntry[] = [];
    for (const [key, rec] of this.store.TrafficSplit) {
      if (!this.monitored(rec.namespace, mesh)) continue;
      const split = this.resolveKeepingLastGood('TrafficSplit', key, rec, this.lastResolvedSplit, (r) => this.resolveSplit(r));
      if (!split) continue;
      const value = this.checked(SplitSchema, split, { kind: 'TrafficSplit', namespace: rec.namespace, name: rec.name });
      if (!value) continue;
      const json = JSON.stringify(value);
      entries.push({ key, split: value, root: `${rec.namespace}/${rec.service}`, json, hash: shortHash(json) });
    }
    this.splitEntries = entries.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    return before !== this.splitEntries.map((e) => e.hash).join();
  }

  private resolveSplit(rec: SplitRec): Split {
    const missing = (svc: string) => !this.serviceEntries.has(`${rec.namespace}/${svc}`);
    if (missing(rec.service)) throw new FieldError('spec.service', `service ${rec.namespace}/${rec.service} not found in the mesh`);
    rec.backends.forEach((b, i) => {
      if (missing(b.service)) throw new FieldError(`spec.backends[${i}].service`, `service ${rec.namespace}/${b.service} not found in the mesh`);
    });
    const matches = rec.matchGroups.flatMap((g, i) => {
      const group = this.store.HTTPRouteGroup.get(`${rec.namespace}/${g}`);
      if (!group) throw new FieldError(`spec.matches[${i}].name`, `HTTPRouteGroup ${rec.namespace}/${g} not found`);
      return group.matches;
    });
    return { namespace: rec.namespace, name: rec.name, service: rec.service, backends: rec.backends, matches };
  }

  private rebuildAccess(mesh: MeshSettings): void {
    this.accessByDestination = new Map();
    this.destinationsBySource = new Map();
    if (mesh.trafficPolicy !== 'smi') return;
    for (const [key, rec] of [...this.store.TrafficTarget].sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
      if (!this.monitored(rec.namespace, mesh)) continue;
      const resolved = this.resolveKeepingLastGood('TrafficTarget', key, rec, this.lastResolvedTarget, (r) => this.resolveTarget(r));
      const access = resolved && this.checked(AccessSchema, resolved, { kind: 'TrafficTarget', namespace: rec.namespace, name: rec.name });
      if (!access) continue;
      const dst = idKey(access.destination.namespace, access.destination.serviceAccount);
      const list = this.accessByDestination.get(dst) ?? [];
      list.push(access);
      this.accessByDestination.set(dst, list);
      for (const s of access.sources) {
        // Sources of other clusters have no pods here: nothing to route for them on this cluster's nodes.
        if (s.trustDomain !== undefined) continue;
        const src = idKey(s.namespace, s.serviceAccount);
        const set = this.destinationsBySource.get(src) ?? new Set();
        set.add(dst);
        this.destinationsBySource.set(src, set);
      }
    }
  }

  private resolveTarget(rec: TargetRec): Access {
    const rules = rec.rules.map((r, i): Access['rules'][number] => {
      if (r.kind === 'TCPRoute') {
        const route = this.store.TCPRoute.get(`${rec.namespace}/${r.name}`);
        if (!route) throw new FieldError(`spec.rules[${i}].name`, `TCPRoute ${rec.namespace}/${r.name} not found`);
        return { kind: 'TCPRoute', name: r.name, ports: route.ports };
      }
      if (r.kind === 'MQTTRouteGroup') {
        const group = this.store.MQTTRouteGroup.get(`${rec.namespace}/${r.name}`);
        if (!group) throw new FieldError(`spec.rules[${i}].name`, `MQTTRouteGroup ${rec.namespace}/${r.name} not found`);
        const matches = r.matches === null ? group.matches : r.matches.map((m, j) => {
          const found = group.matches.find((g) => g.name === m);
          if (!found) throw new FieldError(`spec.rules[${i}].matches[${j}]`, `match ${JSON.stringify(m)} not in MQTTRouteGroup ${rec.namespace}/${r.name}`);
          return found;
        });
        return { kind: 'MQTTRouteGroup', name: r.name, matches };
      }
      const group = this.store.HTTPRouteGroup.get(`${rec.namespace}/${r.name}`);
      if (!group) throw new FieldError(`spec.rules[${i}].name`, `HTTPRouteGroup ${rec.namespace}/${r.name} not found`);
      const matches = r.matches === null ? group.matches : r.matches.map((m, j) => {
        const found = group.matches.find((g) => g.name === m);
        if (!found) throw new FieldError(`spec.rules[${i}].matches[${j}]`, `match ${JSON.stringify(m)} not in HTTPRouteGroup ${rec.namespace}/${r.name}`);
        return found;
      });
      return { kind: 'HTTPRouteGroup', name: r.name, matches };
    });
    // A source named in this mesh's own trust domain is a local identity, whichever way it was written.
    const own = this.identitySettings().trustDomain;
    const sources = rec.sources.map((s) => (s.trustDomain === own ? { namespace: s.namespace, serviceAccount: s.serviceAccount } : s));
    return { namespace: rec.namespace, name: rec.name, destination: rec.destination, sources, rules };
  }

  /**
   * Resolve an object's references; when they do not resolve, report it and
   * fall back to the last version that did (if that one still resolves).
   */
  private resolveKeepingLastGood<R, O>(kind: Kind, key: string, rec: R, lastGood: Map<string, R>, resolve: (r: R) => O): O | undefined {
    const [namespace = '', name = ''] = key.split('/');
    const ref = { kind, namespace, name };
    try {
      const out = resolve(rec);
      lastGood.set(key, rec);
      this.reporter.clear(ref, 'reference');
      return out;
    } catch (err) {
      if (!(err instanceof FieldError)) throw err;
      const prev = lastGood.get(key);
      let out: O | undefined;
      if (prev !== undefined && prev !== rec) {
        try {
          out = resolve(prev);
        } catch {
          out = undefined;
        }
      }
      this.reporter.report({ ref, stage: 'reference', field: err.field, message: err.message, keptLastGood: out !== undefined });
      return out;
    }
  }

  private buildNode(node: string, mesh: MeshSettings): NodeEntry | undefined {
    const rec = this.store.Node.get(`/${node}`);
    const pods: PolicyPod[] = [];
    const optedOut: string[] = [];
    const identities = new Set<string>();
    for (const key of this.podsByNode.get(node) ?? []) {
      const p = this.store.Pod.get(key)!;
      // Known before the pod has an address: the CNI plugin must not enrol it at creation.
      if (p.optOut && p.active && !p.hostNetwork && this.monitored(p.namespace, mesh)) optedOut.push(`${p.namespace}/${p.name}`);
      if (!this.enrolled(p, mesh)) continue;
      identities.add(idKey(p.namespace, p.serviceAccount));
      pods.push({
        uid: p.uid,
        namespace: p.namespace,
        name: p.name,
        ip: p.ip,
        serviceAccount: p.serviceAccount,
        cgroup: { qosClass: p.qosClass, path: p.cgroupPath },
        exclusions: p.exclusions,
      });
    }
    pods.sort((a, b) => (a.uid < b.uid ? -1 : a.uid > b.uid ? 1 : 0));
    const slice = pods
      .map((p): MeshPod => ({ ip: p.ip, namespace: p.namespace, serviceAccount: p.serviceAccount, node }))
      .sort((a, b) => (a.ip < b.ip ? -1 : a.ip > b.ip ? 1 : 0));
    const sliceJson = slice.map((p) => JSON.stringify(p)).join(',');
    const access: Access[] = [];
    // The section also holds the services of the node's own identities: the
    // inbound side reads its pods' port protocols from them (HTTP routes need
    // to know a port is HTTP), whether or not a pod here may reach them.
    const reachable = new Set<string>(identities);
    for (const id of [...identities].sort()) {
      access.push(...(this.accessByDestination.get(id) ?? []));
      for (const dst of this.destinationsBySource.get(id) ?? []) reachable.add(dst);
    }
    const value: NodePart = {
      node: {
        name: node,
        addresses: rec?.addresses ?? [],
        interceptionMode: rec?.modeLabel ?? null,
        monitoredNamespaces: this.monitoredNamespaces(mesh),
        optedOutPods: optedOut.sort(),
      },
      pods,
      access,
    };
    const checked = this.checked(NodePartSchema, value, { kind: 'Node', namespace: '', name: node });
    if (!checked) return this.nodeEntries.get(node);
    return {
      part: part(checked),
      signature: mesh.trafficPolicy === 'smi' ? [...reachable].sort().join('\n') : '*',
      meshPods: { key: node, pods: slice, json: sliceJson, hash: shortHash(sliceJson) },
    };
  }

  private section(signature: string, mesh: MeshSettings): Section {
    let s = this.sections.get(signature);
    if (s) return s;
    this.sortedServiceKeys ??= [...this.serviceEntries.keys()].sort();
    let keys = this.sortedServiceKeys;
    if (mesh.trafficPolicy === 'smi') {
      // Every node has a section of its own (its own identities are in its
      // signature): gather from an index rather than filter every service per node.
      const index = (this.servicesByIdentity ??= this.indexServicesByIdentity(keys));
      const picked = new Set<string>();
      for (const id of signature.split('\n')) for (const k of index.get(id) ?? []) picked.add(k);
      keys = [...picked].sort();
    }
    s = this.buildSection(keys);
    this.sections.set(signature, s);
    return s;
  }

  private indexServicesByIdentity(keys: string[]): Map<string, string[]> {
    const index = new Map<string, string[]>();
    for (const k of keys) {
      for (const id of this.serviceEntries.get(k)!.identities) {
        const list = index.get(id);
        if (list) list.push(k);
        else index.set(id, [k]);
      }
    }
    return index;
  }

  private buildSection(keys: string[]): Section {
    const entries = keys.map((k) => this.serviceEntries.get(k)!);
    const members = new Set(keys);
    const splits = this.splitEntries.filter((e) => members.has(e.root));
    let json: string | undefined;
    return {
      keys,
      entries,
      splitEntries: splits,
      services: entries.map((e) => e.service),
      splits: splits.map((e) => e.split),
      hash: shortHash(entries.map((e) => e.hash).join('') + '|' + splits.map((e) => e.hash).join('')),
      shared: { text: () => (json ??= `"services":[${entries.map((e) => e.json).join(',')}],"splits":[${splits.map((e) => e.json).join(',')}]`) },
    };
  }
}

function part<T>(value: T): Part<T> {
  const json = JSON.stringify(value);
  return { value, members: json.slice(1, -1), hash: shortHash(json) };
}

/**
 * The shared parts (mesh pods, services) come first in the document (key
 * order means nothing to JSON readers): an encoder can then keep the gzip
 * state and CRC of `{` + shared once, and only carry on over each node's own tail.
 */
function compiledNode(
  node: string,
  version: string,
  global: Part<GlobalPart>,
  meshPods: MeshPodsAll,
  nodePart: Part<NodePart>,
  section: Section,
  shared: { json: SharedJson; parts: SharedParts },
): CompiledNode {
  const tail = `,"apiVersion":"${POLICY_API_VERSION}","kind":"NodePolicy","version":"${version}",${global.members},${nodePart.members}}`;
  let json: string | undefined;
  return {
    node,
    version,
    policy: {
      meshPods: meshPods.pods,
      services: section.services,
      splits: section.splits,
      apiVersion: POLICY_API_VERSION,
      kind: 'NodePolicy',
      version,
      ...global.value,
      ...nodePart.value,
    },
    json: () => (json ??= `{${shared.json.text()}${tail}`),
    pieces: () => [shared.json, tail],
    parts: { global, node: nodePart, shared: shared.parts },
  };
}

function sameSet(a: Set<string>, b: Set<string>): boolean {
  if (a.size !== b.size) return false;
  for (const x of a) if (!b.has(x)) return false;
  return true;
}

function selects(selector: Record<string, string>, labels: Record<string, string>): boolean {
  for (const k in selector) if (labels[k] !== selector[k]) return false;
  return true;
}

function indexSet(index: Map<string, Set<string>>, key: string, member: string, present: boolean): void {
  let set = index.get(key);
  if (present) {
    if (!set) index.set(key, (set = new Set()));
    set.add(member);
  } else if (set) {
    set.delete(member);
    if (set.size === 0) index.delete(key);
  }
}
