import { join } from 'node:path';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Dataplane } from '../dataplane/types.js';
import { BpfMap, MapType } from '../ebpf/index.js';
import { errorMessage } from '../errors.js';
import { normalisePipyMetrics } from '../proxy/metrics.js';
import { logger } from '../util/log.js';

const log = logger('metrics');

/** The pods of this node the agent knows (from the policy): names for per-pod series, identities for proxy peers. */
export interface PodRef {
  uid: string;
  namespace: string;
  name: string;
  ip: string;
}

/**
 * Values read when Prometheus scrapes, so readiness and proxy health are never
 * stale. The optional ones feed the dataplane and proxy readings; without
 * them those series are simply absent.
 */
export interface LiveValues {
  ready(): boolean;
  proxy(): { listening: boolean; restarts: number; instanceCount?: number; instances?: Array<{ listening: boolean }>; draining?: number };
  policyReceivedAt(): number | undefined;
  policyFetchErrors(): number;
  /** Policy versions taken in, by how they came (full or delta), and body bytes received. */
  policyTransfer?(): { updates: { full: number; delta: number }; receivedBytes: number };
  /** This node's name: the `node` label on the re-exported proxy metrics. */
  node?(): string;
  /** The dataplane in force (read back with installed() at scrape time, cached). */
  dataplane?(): Dataplane | undefined;
  /** This node's pods. */
  pods?(): PodRef[];
  /** Pipy's admin /metrics text, or undefined when there is none to read (passthrough proxy). Throws when Pipy does not answer. */
  proxyMetrics?(): Promise<string | undefined>;
}

/** How long one reading of the kernel (map walks, iptables-save) and of Pipy serves scrapes. */
export const READING_TTL_MS = 1000;

/**
 * A value computed at most once per `ttlMs`; concurrent callers share the one
 * computation in flight, so a burst of scrapes costs one map walk.
 */
export class Cached<T> {
  private at = -Infinity;
  private value: T | undefined;
  private pending: Promise<T> | undefined;

  constructor(
    private readonly compute: () => Promise<T>,
    private readonly ttlMs = READING_TTL_MS,
    private readonly now: () => number = Date.now,
  ) {}

  get(): Promise<T> {
    if (this.now() - this.at < this.ttlMs) return Promise.resolve(this.value as T);
    this.pending ??= this.compute()
      .then((v) => {
        this.value = v;
        this.at = this.now();
        return v;
      })
      .finally(() => {
        this.pending = undefined;
      });
    return this.pending;
  }
}

export interface MapFill {
  map: string;
  entries: number;
  capacity: number;
}

export interface PodCounters {
  redirected: number;
  excluded: number;
  inboundRefused: number;
}

/** What one read-back of the dataplane yields for metrics. */
export interface DataplaneReading {
  mode: string;
  maps: MapFill[];
  /** Per pod uid (eBPF: counted in the fsm_stats map by the programs). */
  pods: Record<string, PodCounters>;
  /** iptables: sync counters of the dataplane object and ipset member counts. */
  iptables?: { syncs: number; fullSyncs: number; tamperRepairs: number; sets: Record<string, number> };
}

/** Map types whose entries come and go (hash-like); arrays always hold max_entries. */
const COUNTABLE = new Set<number>([MapType.Hash, MapType.PercpuHash, MapType.LruHash, MapType.LruPercpuHash, MapType.LpmTrie, MapType.SockHash]);

/** Count the keys of each pinned map under `<pinDir>/maps`; a map that cannot be opened is left out (and logged). */
function mapFill(pinDir: string, maps: Record<string, { maxEntries: number }>): MapFill[] {
  const out: MapFill[] = [];
  for (const [name, m] of Object.entries(maps)) {
    try {
      using map = BpfMap.fromPin(join(pinDir, 'maps', name));
      if (!COUNTABLE.has(map.type)) continue;
      let entries = 0;
      for (const _k of map.keys()) entries += 1;
      out.push({ map: name, entries, capacity: m.maxEntries });
    } catch (err) {
      log.debug({ map: name, err: errorMessage(err) }, 'could not count map entries');
    }
  }
  return out;
}

const num = (v: unknown) => (typeof v === 'number' && Number.isFinite(v) ? v : 0);

/** One read-back of either dataplane (installed(); for eBPF also a key walk of each pinned map) -> the numbers metrics show. */
export async function readDataplane(dp: Dataplane): Promise<DataplaneReading> {
  const installed = await dp.installed();
  const d = installed.detail;
  if (installed.mode === 'ebpf') {
    const maps = d.installed === true && typeof d.pinDir === 'string' && d.maps && typeof d.maps === 'object' ? mapFill(d.pinDir, d.maps as Record<string, { maxEntries: number }>) : [];
    const pods: Record<string, PodCounters> = {};
    for (const [uid, s] of Object.entries((d.stats ?? {}) as Record<string, Partial<PodCounters>>)) {
      pods[uid] = { redirected: num(s.redirected), excluded: num(s.excluded), inboundRefused: num(s.inboundRefused) };
    }
    return { mode: installed.mode, maps, pods };
  }
  const stats = (d.stats ?? {}) as Record<string, unknown>;
  const sets: Record<string, number> = {};
  for (const [name, n] of Object.entries((d.sets ?? {}) as Record<string, unknown>)) sets[name] = num(n);
  return { mode: installed.mode, maps: [], pods: {}, iptables: { syncs: num(stats.syncs), fullSyncs: num(stats.fullSyncs), tamperRepairs: num(stats.tamperRepairs), sets } };
}

/** Set a counter to an absolute value read elsewhere (kernel counters, totals kept by other objects). */
function setCounter<T extends string>(c: Counter<T>, labels: Partial<Record<T, string>>, value: number): void {
  c.inc(labels, Math.max(0, value));
}

/** Every agent metric, in one registry, named fsm_node_*; the agent sets them, /metrics reads them. */
export function agentMetrics(live: LiveValues) {
  const registry = new Registry();
  // The event-loop delay monitor samples with a timer; at prom-client's default 10 ms it is most of an idle agent's CPU.
  collectDefaultMetrics({ register: registry, prefix: 'fsm_node_process_', eventLoopMonitoringPrecision: 100 });
  // prom-client names these gauges *_total, which Prometheus reserves for counters (promtool rejects them).
  for (const n of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total']) registry.removeSingleMetric(`fsm_node_process_${n}`);
  const r = [registry];

  const dataplane = new Cached(async (): Promise<DataplaneReading | undefined> => {
    const dp = live.dataplane?.();
    if (!dp) return undefined;
    try {
      return await readDataplane(dp);
    } catch (err) {
      log.warn({ err: errorMessage(err) }, 'could not read the dataplane back for metrics');
      return undefined;
    }
  });
  const podNames = () => new Map((live.pods?.() ?? []).map((p) => [p.uid, p]));

  /** Per-pod counters from the eBPF stats map; pods the policy no longer names are left out (bounded by the node's pods). */
  const perPod = (field: keyof PodCounters) =>
    async function (this: Counter<'namespace' | 'pod'>) {
      this.reset();
      const reading = await dataplane.get();
      if (!reading) return;
      const names = podNames();
      for (const [uid, c] of Object.entries(reading.pods)) {
        const p = names.get(uid);
        if (p) setCounter(this, { namespace: p.namespace, pod: p.name }, c[field]);
      }
    };

  const proxyScrape = new Cached(async (): Promise<{ text: string; ok: boolean }> => {
    if (!live.proxyMetrics) return { text: '', ok: true };
    try {
      const raw = await live.proxyMetrics();
      if (raw === undefined) return { text: '', ok: true };
      const byIp = new Map((live.pods?.() ?? []).map((p) => [p.ip, p]));
      const node = live.node?.();
      const out = normalisePipyMetrics(raw, { ...(node ? { constLabels: { node } } : {}), podByIp: (ip) => byIp.get(ip) });
      if (out.rejected.length) log.warn({ lines: out.rejected.slice(0, 3), count: out.rejected.length }, 'Pipy metrics lines that could not be read were dropped');
      return { text: out.text, ok: true };
    } catch (err) {
      log.warn({ err: errorMessage(err) }, 'could not read the proxy metrics');
      return { text: '', ok: false };
    }
  });

  const metrics = {
    registry,
    mode: new Gauge({ name: 'fsm_node_mode_info', help: 'Interception mode: 1 for the current desired/effective pair, with the fallback reason.', labelNames: ['desired', 'effective', 'fallback_reason'], registers: r }),
    ready: new Gauge({ name: 'fsm_node_ready', help: '1 when policy, dataplane and proxy are all in force.', registers: r, collect() { this.set(live.ready() ? 1 : 0); } }),
    probe: new Gauge({ name: 'fsm_node_probe_check', help: 'Capability probe results: 1 passed, 0 failed.', labelNames: ['check'], registers: r }),
    enrolledPods: new Gauge({ name: 'fsm_node_enrolled_pods', help: 'Pods whose interception is installed.', registers: r }),
    reconcile: new Histogram({ name: 'fsm_node_reconcile_duration_seconds', help: 'Duration of reconcile runs.', labelNames: ['full'], buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5], registers: r }),
    applyFailures: new Counter({ name: 'fsm_node_apply_failures_total', help: 'Dataplane applies that failed (previous state kept).', labelNames: ['dataplane'], registers: r }),
    modeSwitches: new Counter({ name: 'fsm_node_mode_switches_total', help: 'Live switches between interception modes.', labelNames: ['from', 'to'], registers: r }),
    bpfMapEntries: new Gauge({
      name: 'fsm_node_bpf_map_entries',
      help: 'Entries in each hash-like BPF map of the eBPF dataplane (read at scrape time, cached 1 s).',
      labelNames: ['map'],
      registers: r,
      async collect() {
        this.reset();
        for (const m of (await dataplane.get())?.maps ?? []) this.set({ map: m.map }, m.entries);
      },
    }),
    bpfMapCapacity: new Gauge({
      name: 'fsm_node_bpf_map_capacity',
      help: 'max_entries of each hash-like BPF map of the eBPF dataplane.',
      labelNames: ['map'],
      registers: r,
      async collect() {
        this.reset();
        for (const m of (await dataplane.get())?.maps ?? []) this.set({ map: m.map }, m.capacity);
      },
    }),
    redirected: new Counter({
      name: 'fsm_node_redirected_connections_total',
      help: 'Connections of each enrolled pod redirected to the node proxy (eBPF: counted by the connect programs).',
      labelNames: ['namespace', 'pod'],
      registers: r,
      collect: perPod('redirected'),
    }),
    excluded: new Counter({
      name: 'fsm_node_excluded_connections_total',
      help: 'Connections of each enrolled pod left alone by an exclusion (eBPF).',
      labelNames: ['namespace', 'pod'],
      registers: r,
      collect: perPod('excluded'),
    }),
    inboundRefused: new Counter({
      name: 'fsm_node_inbound_refused_connections_total',
      help: 'Inbound connections refused to strict pods because they did not come from a node proxy (eBPF).',
      labelNames: ['namespace', 'pod'],
      registers: r,
      collect: perPod('inboundRefused'),
    }),
    iptablesSyncs: new Counter({
      name: 'fsm_node_iptables_syncs_total',
      help: 'Successful iptables dataplane syncs, full or not (full: first, after a failure, periodic repair).',
      labelNames: ['full'],
      registers: r,
      async collect() {
        this.reset();
        const ipt = (await dataplane.get())?.iptables;
        if (!ipt) return;
        setCounter(this, { full: 'true' }, ipt.fullSyncs);
        setCounter(this, { full: 'false' }, ipt.syncs - ipt.fullSyncs);
      },
    }),
    iptablesTamperRepairs: new Counter({
      name: 'fsm_node_iptables_tamper_repairs_total',
      help: 'iptables syncs that found our rules or sets tampered with and rewrote them.',
      registers: r,
      async collect() {
        this.reset();
        const ipt = (await dataplane.get())?.iptables;
        if (ipt) setCounter(this, {}, ipt.tamperRepairs);
      },
    }),
    ipsetMembers: new Gauge({
      name: 'fsm_node_ipset_members',
      help: 'Members of each of our ipsets (iptables dataplane).',
      labelNames: ['set'],
      registers: r,
      async collect() {
        this.reset();
        for (const [set, n] of Object.entries((await dataplane.get())?.iptables?.sets ?? {})) this.set({ set }, n);
      },
    }),
    policyVersion: new Gauge({ name: 'fsm_node_policy_info', help: 'The policy version in force.', labelNames: ['version'], registers: r }),
    policyAge: new Gauge({
      name: 'fsm_node_policy_age_seconds',
      help: 'Seconds since the policy in force was received from the controller.',
      registers: r,
      collect() {
        const at = live.policyReceivedAt();
        if (at !== undefined) this.set((Date.now() - at) / 1000);
      },
    }),
    policyFetchErrors: new Counter({
      name: 'fsm_node_policy_fetch_errors_total',
      help: 'Failed policy fetches from the controller since the agent started.',
      registers: r,
      collect() {
        this.reset();
        this.inc(live.policyFetchErrors());
      },
    }),
    ...(live.policyTransfer ? policyTransferMetrics(registry, live.policyTransfer) : {}),
    proxyUp: new Gauge({ name: 'fsm_node_proxy_up', help: '1 when the node proxy runs and listens.', registers: r, collect() { this.set(live.proxy().listening ? 1 : 0); } }),
    proxyRestarts: new Gauge({ name: 'fsm_node_proxy_restarts', help: 'Proxy restarts by this agent.', registers: r, collect() { this.set(live.proxy().restarts); } }),
    proxyInstances: new Gauge({ name: 'fsm_node_proxy_instances', help: 'Node proxy instances (Pipy processes sharing the proxy ports) wanted.', registers: r, collect() { this.set(live.proxy().instanceCount ?? 1); } }),
    proxyInstancesListening: new Gauge({
      name: 'fsm_node_proxy_instances_listening',
      help: 'Node proxy instances listening on every proxy port; below fsm_node_proxy_instances while one is down (the node stays ready on the others).',
      registers: r,
      collect() {
        const p = live.proxy();
        this.set(p.instances ? p.instances.filter((i) => i.listening).length : p.listening ? 1 : 0);
      },
    }),
    proxyInstancesDraining: new Gauge({
      name: 'fsm_node_proxy_instances_draining',
      help: 'Old node proxy instances still answering their requests in flight after a config hand-over or an upgrade (at most one generation; gone by --proxy-drain-seconds).',
      registers: r,
      collect() {
        this.set(live.proxy().draining ?? 0);
      },
    }),
    /** Observed by the proxy supervisor around each config reload (result: ok | failed). */
    proxyReload: new Histogram({
      name: 'fsm_node_proxy_reload_seconds',
      help: 'Time from writing a new proxy config to the proxy running it.',
      labelNames: ['result'],
      buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers: r,
    }),
    proxyMetricsUp: new Gauge({
      name: 'fsm_node_proxy_metrics_up',
      help: "1 when the last read of Pipy's admin /metrics worked (or there is none to read), 0 when Pipy did not answer.",
      registers: r,
      async collect() {
        this.set((await proxyScrape.get()).ok ? 1 : 0);
      },
    }),
    /**
     * The agent's exposition plus the node proxy's, normalised
     * (src/proxy/metrics.ts): what /metrics serves. The page is kept for the
     * same second as the readings it is made of, so scrapes in a burst (HA
     * Prometheus pairs, a dashboard refresh) cost one rendering.
     */
    exposition: (): Promise<string> => page.get(),
  };
  const page = new Cached(async () => {
    const own = await registry.metrics();
    const proxy = (await proxyScrape.get()).text;
    return proxy ? `${own.endsWith('\n') ? own : own + '\n'}${proxy}` : own;
  });
  return metrics;
}
export type AgentMetrics = ReturnType<typeof agentMetrics>;

/** Read Pipy's admin /metrics over HTTP (the supervisor knows the address; loopback only, Pipy's admin can change code). */
export function pipyAdminMetrics(url: string, timeoutMs = 500): () => Promise<string> {
  return async () => {
    const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    return res.text();
  };
}

function policyTransferMetrics(r: Registry, read: NonNullable<LiveValues['policyTransfer']>) {
  return {
    policyUpdates: new Counter({
      name: 'fsm_node_policy_updates_total',
      help: 'Policy versions taken in from the controller, by how they came: full or delta.',
      labelNames: ['kind'],
      registers: [r],
      collect() {
        this.reset();
        const { updates } = read();
        this.inc({ kind: 'full' }, updates.full);
        this.inc({ kind: 'delta' }, updates.delta);
      },
    }),
    policyBytes: new Counter({
      name: 'fsm_node_policy_received_bytes_total',
      help: 'Policy body bytes received from the controller (as on the wire).',
      registers: [r],
      collect() {
        this.reset();
        this.inc(read().receivedBytes);
      },
    }),
  };
}
