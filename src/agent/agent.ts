import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { gatewaySummary } from '../gateway/render.js';
import type { FastifyInstance } from 'fastify';
import type { ApplyResult, Dataplane, DesiredState, InterceptionMode } from '../dataplane/types.js';
import { FsmNodeError, errorMessage } from '../errors.js';
import { buildApi } from '../http/server.js';
import { CniService } from '../cni/service.js';
import type { NodeModeStatus, NodePolicy } from '../policy/schema.js';
import type { Registry } from 'prom-client';
import type { IdentityManager } from '../identity/agent-certs.js';
import { logger } from '../util/log.js';
import type { AgentConfig } from './config.js';
import { agentMetrics, type AgentMetrics } from './metrics.js';
import { chooseMode, type ModeDecision, type PersistedMode } from './mode.js';
import type { ProbeReport } from './probe.js';
import { SyncRunner, type SyncContext } from './sync-runner.js';

const log = logger('agent');

/** After a failed status report, reportNow() does not try again for this long. */
const REPORT_RETRY_MS = 2_000;

/** Where the agent's policy comes from: the controller client, or a fixed policy in tests. */
export interface PolicyFeed {
  current(): { policy: NodePolicy; receivedAt: number } | undefined;
  onChange(fn: () => void): void;
  start(): void;
  stop(): Promise<void>;
  fetchErrors(): number;
  /** The controller answered again after failures (the controller client). */
  onReconnect?(fn: () => void): void;
  /** New versions taken in by how they came, and body bytes received (the controller client). */
  stats?(): { updates: { full: number; delta: number }; receivedBytes: number };
}

/**
 * What the agent needs of the node proxy: the ProxySupervisor in production
 * (src/proxy/supervisor.ts), in kernel tests a proxy the test runs itself.
 */
export interface AgentProxy {
  /** Adopt a running proxy or start one, then watch it. */
  start(): void | Promise<void>;
  /** Stop watching; the proxy keeps running. */
  detach(): void;
  status(): { kind: string; up: boolean; listening: boolean; restarts: number };
  /** Running and listening. */
  ready(): boolean;
  /** The proxy's own metrics text (Pipy admin /metrics), re-exported normalised on /metrics; absent for the passthrough proxy. */
  metrics?(): Promise<string | undefined>;
  /** Hand the proxy its configuration and wait until it runs it (Pipy); absent for the passthrough proxy. */
  deliver?(config: object): Promise<{ changed: boolean; applied: boolean; ms: number }>;
  /** Fail-open policy: the proxy says when interception should stop (crash loop) and resume. */
  onInterception?(fn: (wanted: boolean, reason: string) => void): void;
}

export interface AgentDeps {
  policy: PolicyFeed;
  probe: () => Promise<ProbeReport>;
  dataplane: (mode: InterceptionMode) => Dataplane;
  render: (policy: NodePolicy) => DesiredState;
  proxy: AgentProxy;
  /** The proxy's configuration for a policy (src/proxy/config.ts), delivered before the dataplane applies. */
  proxyConfig?: (policy: NodePolicy) => object;
  /** Report the mode decision to the controller (it posts a Node Event on a fallback); best effort. */
  reportMode?: (status: NodeModeStatus) => Promise<void>;
  /**
   * Workload certificates for the node's mesh identities (src/identity/agent-certs.ts),
   * made with the agent's metrics registry and its callbacks; absent: none kept.
   */
  identities?: (o: { registry: Registry; onChange: () => void; onExpired: () => void; beforeRecover: () => Promise<void> }) => IdentityManager;
}

/** One sync as /v1/state reports it (`sync.first`, `sync.last`). */
export interface SyncOutcome {
  mode: InterceptionMode;
  full: boolean;
  /** Kernel objects the dataplane changed (map entries, rules, set members). */
  changes: number;
  /** Whether the proxy was offered a configuration other than the one it has (absent: this proxy takes none). */
  proxyConfigChanged?: boolean;
  /** Where the sync's time went (ms): what a CNI ADD waits for, phase by phase. */
  ms: SyncPhases;
  at: string;
}

/** Milliseconds per phase of one sync; a phase the sync skipped is absent. */
export interface SyncPhases {
  identities?: number;
  mode?: number;
  proxy?: number;
  render?: number;
  merge?: number;
  apply?: number;
  total: number;
}

/**
 * After a switch, how long the old mode keeps answering for connections it
 * redirected just before it stopped capturing: an eBPF-rewritten connect whose
 * accept by the proxy (and SO_ORIGINAL_DST query) is still under way needs the
 * old getsockopt program for that long. The proxy accepts within milliseconds.
 */
const SWITCH_DRAIN_MS = 250;

/**
 * The agent: one reconcile loop from policy + probe + node state to the
 * dataplane and the proxy. Event handlers only request syncs; each sync
 * chooses the mode, renders the whole desired state and applies it (a
 * pods-only sync, for CNI ADD/DEL, reuses what depends on the policy alone:
 * mode, proxy configuration, the rendering; see sync()). A mode
 * change is make-before-break: the new dataplane is applied (and so verified
 * by its own read-back) before the old one is cleaned up.
 */
export class Agent {
  readonly metrics: AgentMetrics;
  private readonly runner: SyncRunner;
  private api: FastifyInstance | undefined;
  private report: ProbeReport | undefined;
  private decision: ModeDecision | undefined;
  private active: Dataplane | undefined;
  /** The previous mode's dataplane after a switch, until its cleanup has succeeded (retried by the next sync). */
  private retiring: Dataplane | undefined;
  private lastModeLog: string | undefined;
  /** The latest mode decision (reported again with failing identities when the controller comes back). */
  private lastDecision: ModeDecision | undefined;
  /** What the controller last acknowledged (mode decision and failing identities, as a key). */
  private reported: string | undefined;
  private reporting: Promise<void> | undefined;
  private reportFailedAt = 0;
  /** The last completed live switch: new mode in force after applyMs, old mode gone after totalMs. */
  private lastSwitch: { from: InterceptionMode; to: InterceptionMode; applyMs: number; totalMs: number; at: string } | undefined;
  private applied: { version: string; pods: number; at: string } | undefined;
  /** The first sync of this process and the latest one: a restarted agent that adopts shows 0 changes in `first`. */
  private syncs: { count: number; first?: SyncOutcome; last?: SyncOutcome } = { count: 0 };
  /** Set while the proxy's fail-open policy has asked to stop redirecting (the proxy is crash-looping). */
  private suspended: string | undefined;
  private lastError: string | undefined;
  private readonly modeFile: string;
  /** Certificates of the local identities; the proxy configuration renders from its snapshot(). */
  readonly identities: IdentityManager | undefined;
  /** Enrolment at pod creation through the CNI plugin (src/cni/), when --cni-socket is set. */
  readonly cni: CniService | undefined;
  /** Addresses of the pods in the last applied desired state: what a CNI ADD waits to see. */
  private appliedIps = new Set<string>();
  /** The policy the last successful sync applied: a pods-only sync of it skips what depends only on the policy. */
  private lastGood: NodePolicy | undefined;
  /** renderPolicy's memo. */
  private rendered: { policy: NodePolicy; version: string; state: DesiredState } | undefined;
  /** What mode.json holds (written only when it changes). */
  private persisted: string | undefined;

  constructor(
    readonly config: AgentConfig,
    private readonly deps: AgentDeps,
  ) {
    this.modeFile = join(config.stateDir, 'mode.json');
    this.metrics = agentMetrics({
      ready: () => this.notReadyReason() === undefined,
      proxy: () => this.deps.proxy.status(),
      policyReceivedAt: () => this.deps.policy.current()?.receivedAt,
      policyFetchErrors: () => this.deps.policy.fetchErrors(),
      ...(this.deps.policy.stats ? { policyTransfer: () => this.deps.policy.stats!() } : {}),
      node: () => this.config.node,
      dataplane: () => this.active,
      pods: () => this.deps.policy.current()?.policy.pods ?? [],
      ...(this.deps.proxy.metrics ? { proxyMetrics: () => this.deps.proxy.metrics!() } : {}),
    });
    this.identities = this.deps.identities?.({
      registry: this.metrics.registry,
      // A certificate obtained, renewed, dropped or expired: the proxy's configuration follows at the next sync.
      onChange: () => this.runner.request('identity certificates changed'),
      // Reported with the mode (the controller posts a Node Event).
      onExpired: () => this.runner.request('identity expired or recovered'),
      // The controller hears of an expiry before the contact that may end it (a renewal) is made.
      beforeRecover: () => this.reportNow(),
    });
    this.runner = new SyncRunner((ctx) => this.sync(ctx), {
      minIntervalMs: 20,
      maxIntervalMs: 60_000,
      retryBaseMs: 500,
      onResult: (r) => {
        this.metrics.reconcile.observe({ full: String(r.full) }, r.durationMs / 1000);
        if (!r.ok) {
          this.lastError = errorMessage(r.error);
          log.error({ err: this.lastError }, 'reconcile failed; previous state kept, next sync is full');
        } else this.lastError = undefined;
      },
    });
    this.cni = config.cniSocket
      ? new CniService(
          {
            socket: config.cniSocket,
            spool: config.cniSpool,
            stateDir: config.stateDir,
            failurePolicy: config.cniFailurePolicy,
            ...(config.cniConfDirs.length ? { install: { confDirs: config.cniConfDirs, binDir: config.cniBinDir } } : {}),
          },
          {
            policy: () => this.deps.policy.current()?.policy,
            // Pods only: the sync skips identities, mode choice and proxy configuration (see sync()).
            syncNow: (reason) => this.runner.requestAndWait(reason, { podsOnly: true }),
            enrolled: (ip) => this.appliedIps.has(ip),
            notEnrolling: () => (this.suspended ? `suspended: ${this.suspended}` : this.decision && !this.decision.ready ? this.decision.reason : undefined),
          },
        )
      : undefined;
  }

  async start(): Promise<void> {
    mkdirSync(this.config.stateDir, { recursive: true });
    this.report = await this.deps.probe();
    for (const c of this.report.checks) this.metrics.probe.set({ check: c.name }, c.ok ? 1 : 0);
    this.deps.proxy.onInterception?.((wanted, reason) => {
      this.suspended = wanted ? undefined : reason;
      log.warn({ wanted, reason }, wanted ? 'proxy is back: interception resumes' : 'proxy crash-looping, fail-open: interception suspended');
      this.runner.request(wanted ? 'proxy recovered' : 'proxy failing open', { full: true });
    });
    await this.deps.proxy.start();
    this.deps.policy.onChange(() => this.runner.request('policy changed'));
    this.deps.policy.onReconnect?.(() => this.controllerBack());
    this.deps.policy.start();
    this.runner.start();
    await this.cni?.start();
    const [host, port] = splitHostPort(this.config.listen);
    this.api = buildApi({ notReadyReason: () => this.notReadyReason(), state: () => this.state(), registry: this.metrics.registry, exposition: () => this.metrics.exposition() });
    try {
      await this.api.listen({ host, port });
    } catch (err) {
      await this.stop();
      throw new FsmNodeError('FSMN_ERR_LISTEN', `agent API cannot listen on ${this.config.listen}: ${errorMessage(err)}`, { cause: err });
    }
    log.info({ node: this.config.node, listen: this.config.listen }, 'agent started');
  }

  /** SIGTERM: stop taking work; dataplane and proxy stay in place so traffic keeps flowing. */
  async stop(): Promise<void> {
    await this.cni?.stop();
    await this.runner.stop();
    await this.identities?.stop();
    await this.deps.policy.stop();
    this.deps.proxy.detach();
    await this.active?.close();
    await this.retiring?.close();
    await this.api?.close();
    log.info('agent stopped; dataplane and proxy left in place');
  }

  /** Where the HTTP API listens (after start), e.g. http://127.0.0.1:15900. */
  apiUrl(): string | undefined {
    const a = this.api?.server.address();
    return a && typeof a === 'object' ? `http://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}` : undefined;
  }

  /** Ask for a sync now (mode change requests from the API, tests). */
  requestSync(reason: string): void {
    this.runner.request(reason, { full: true });
  }

  notReadyReason(): string | undefined {
    if (!this.deps.policy.current()) return 'no policy yet (controller unreachable and no last good copy)';
    if (this.decision && !this.decision.ready) return this.decision.reason;
    if (!this.applied) return this.lastError ? `dataplane not applied: ${this.lastError}` : 'dataplane not applied yet';
    if (!this.deps.proxy.ready()) return 'proxy not ready (not running or not listening)';
    return undefined;
  }

  state(): Record<string, unknown> {
    const cur = this.deps.policy.current();
    return {
      node: this.config.node,
      ready: this.notReadyReason() === undefined,
      notReadyReason: this.notReadyReason(),
      mode: this.decision,
      probe: this.report,
      policy: cur ? { version: cur.policy.version, ageSeconds: (Date.now() - cur.receivedAt) / 1000, pods: cur.policy.pods.length } : undefined,
      applied: this.applied,
      sync: this.syncs,
      retiring: this.retiring?.mode,
      interceptionSuspended: this.suspended,
      lastSwitch: this.lastSwitch,
      lastError: this.lastError,
      proxy: this.deps.proxy.status(),
      ...(this.identities ? { identities: this.identities.status() } : {}),
      ...(this.cni ? { cni: this.cni.status() } : {}),
      ...(cur?.policy.ingress ? { gateways: gatewaySummary(cur.policy), ...(cur.policy.ingress.problems ? { gatewayProblems: cur.policy.ingress.problems } : {}) } : {}),
    };
  }

  private async sync(ctx: SyncContext): Promise<void> {
    const cur = this.deps.policy.current();
    this.refreshGauges(cur);
    if (!cur) return;
    const { policy } = cur;
    const t0 = performance.now();
    const ms: SyncPhases = { total: 0 };
    let mark = t0;
    const phase = (name: Exclude<keyof SyncPhases, 'total'>): void => {
      const now = performance.now();
      ms[name] = round2(now - mark);
      mark = now;
    };
    // Before the proxy configuration: gone identities are dropped, new ones
    // are read from the state directory (an adopting agent renders what the
    // running proxy uses) and start fetching when none is stored.
    //
    // A pods-only sync (CNI ADD/DEL) of the policy the last good sync applied
    // skips all of that and the mode choice: none of their inputs changed
    // (any other request merged into the run clears podsOnly). What a pod
    // creation waits for is then the merge and the dataplane's one-pod delta.
    const podsOnly = ctx.podsOnly && this.lastGood === policy && this.decision?.ready === true;
    if (this.identities && !podsOnly) {
      await this.identities.update(policy);
      phase('identities');
    }
    let decision = this.decision;
    if (!podsOnly || !decision) {
      decision = chooseMode(
        { nodeLabel: policy.node.interceptionMode ?? undefined, meshDefault: policy.mesh.interceptionMode, flag: this.config.mode },
        this.report!.support,
        this.readPersistedMode(),
      );
      this.decision = decision;
      this.metrics.mode.reset();
      this.logDecision(decision);
      if (!decision.ready) return;
      this.metrics.mode.set({ desired: decision.desired, effective: decision.effective, fallback_reason: decision.fallbackReason ?? '' }, 1);
      phase('mode');
    }
    if (!decision.ready) return;

    const proxyConfigChanged = podsOnly ? (this.deps.proxy.deliver && this.deps.proxyConfig ? false : undefined) : await this.deliverProxyConfig(policy);
    if (!podsOnly && proxyConfigChanged !== undefined) phase('proxy');
    const own = this.renderPolicy(policy, ctx.full);
    phase('render');
    // Pods the CNI plugin enrolled at creation stay in until the policy names them (src/cni/enrolled.ts).
    const rendered = this.cni ? this.cni.merge(own, policy, { full: ctx.full }) : own;
    if (this.cni) phase('merge');
    // Fail-open: while the proxy crash-loops no pod is redirected, so pods talk directly instead of failing.
    const desired = this.suspended ? { ...rendered, pods: [] } : rendered;
    const previous = this.active;
    const next = previous?.mode === decision.effective ? previous : this.deps.dataplane(decision.effective);
    const started = performance.now();
    let result: ApplyResult;
    try {
      result = await next.apply(desired, { full: ctx.full || next !== previous });
      phase('apply');
    } catch (err) {
      this.metrics.applyFailures.inc({ dataplane: next.mode });
      if (next !== previous) await next.close();
      throw err;
    }
    // Make before break: the new mode is in force (apply read it back); from here on it is the active one.
    this.active = next;
    this.persistMode({ desired: decision.desired, effective: decision.effective });
    this.lastGood = policy;
    this.applied = { version: policy.version, pods: desired.pods.length, at: new Date().toISOString() };
    this.appliedIps = new Set(desired.pods.map((p) => p.ip));
    this.metrics.enrolledPods.set(desired.pods.length);
    ms.total = round2(performance.now() - t0);
    this.recordSync({ mode: next.mode, full: result.full, changes: result.changes, ...(proxyConfigChanged === undefined ? {} : { proxyConfigChanged }), ms, at: this.applied.at });
    if (this.retiring?.mode === next.mode) {
      // Switched back before the old instance was removed: `next` adopted its state.
      await this.retiring.close();
      this.retiring = undefined;
    }
    if (previous && previous !== next) {
      const applyMs = performance.now() - started;
      this.retiring = previous;
      // Only eBPF needs the drain: iptables answers SO_ORIGINAL_DST from conntrack, which outlives its rules.
      await this.retire(previous, desired, previous.mode === 'ebpf');
      this.metrics.modeSwitches.inc({ from: previous.mode, to: next.mode });
      this.lastSwitch = { from: previous.mode, to: next.mode, applyMs, totalMs: performance.now() - started, at: new Date().toISOString() };
    } else if (this.retiring && this.retiring.mode !== next.mode) {
      await this.retire(this.retiring, desired, false);
    } else if (!previous) {
      await this.cleanupOtherMode(next.mode);
    }
  }

  /**
   * The policy's own desired state, rendered once per policy: a sync of the
   * same policy (CNI ADDs, identity changes) reuses it, a full sync renders
   * afresh. A policy pod whose cgroup was not found is left out by the
   * renderer; while one is missing the rendering is not kept, so every sync
   * looks for it again. The result is never mutated (merge and dataplanes copy).
   */
  private renderPolicy(policy: NodePolicy, full: boolean): DesiredState {
    const memo = this.rendered;
    if (!full && memo?.policy === policy && memo.version === policy.version) return memo.state;
    const state = this.deps.render(policy);
    this.rendered = state.pods.length === policy.pods.length ? { policy, version: policy.version, state } : undefined;
    return state;
  }

  /**
   * The proxy learns a policy before the kernel redirects to it: a new
   * service is routable by the time pods' connections reach the proxy. A
   * config the proxy rejects keeps its previous one running (the supervisor
   * restores it) and counts as a failed reload; the dataplane still applies.
   */
  private async deliverProxyConfig(policy: NodePolicy): Promise<boolean | undefined> {
    if (!this.deps.proxy.deliver || !this.deps.proxyConfig) return undefined;
    const started = performance.now();
    try {
      const r = await this.deps.proxy.deliver(this.deps.proxyConfig(policy));
      if (r.changed && r.applied) this.metrics.proxyReload.observe({ result: 'ok' }, r.ms / 1000);
      return r.changed;
    } catch (err) {
      this.metrics.proxyReload.observe({ result: 'failed' }, (performance.now() - started) / 1000);
      log.error({ err: errorMessage(err), version: policy.version }, 'proxy rejected the configuration; it keeps running the previous one');
      return true;
    }
  }

  /**
   * What a sync changed. The first one of a process is full and compares with
   * the kernel, not with memory: after a restart it is the proof of adoption
   * (0 changes: the pins, rules and proxy config found were exactly the desired ones).
   */
  private recordSync(outcome: SyncOutcome): void {
    this.syncs.count += 1;
    this.syncs.last = outcome;
    if (this.syncs.first) return;
    this.syncs.first = outcome;
    const adopted = outcome.changes === 0 && outcome.proxyConfigChanged !== true;
    log.info({ ...outcome }, adopted ? 'first sync changed nothing: adopted what was installed' : 'first sync installed the desired state');
  }

  /**
   * Break after make: with `drain`, the old mode first stops capturing (its
   * pods are un-enrolled, so every new connection meets only the new mode) and
   * keeps answering for a moment for connections it redirected just before;
   * then everything of it is removed. A failure leaves it in `retiring`; the
   * next sync (full, after a failure) retries the cleanup.
   */
  private async retire(old: Dataplane, desired: DesiredState, drain: boolean): Promise<void> {
    if (drain) {
      await old.apply({ ...desired, pods: [] });
      await new Promise((r) => setTimeout(r, SWITCH_DRAIN_MS));
    }
    const report = await old.cleanup();
    await old.close();
    this.retiring = undefined;
    log.info({ from: old.mode, to: this.active?.mode, removed: report.removed.length }, 'switched interception mode; nothing of the old mode remains');
  }

  /**
   * One log line and one report to the controller per new decision (not one
   * per sync): the fallback reason, or why nothing works. A failed report is
   * retried by the next sync.
   */
  private logDecision(d: ModeDecision): void {
    const expired = this.identities?.expired() ?? [];
    const key = JSON.stringify([d, expired]);
    this.lastDecision = d;
    if (key === this.lastModeLog) return;
    const modeChanged = this.lastModeLog === undefined || !this.lastModeLog.startsWith(`[${JSON.stringify(d)},`);
    this.lastModeLog = key;
    this.reportStatus(d, expired, key).catch(() => undefined); // logged; retried by the next sync
    if (!modeChanged) return;
    if (!d.ready) log.error({ desired: d.desired, source: d.desiredSource, reason: d.reason }, 'no interception mode works on this node; not ready');
    else if (d.fallbackReason) log.warn({ desired: d.desired, source: d.desiredSource, effective: d.effective, reason: d.fallbackReason }, 'interception mode fell back');
    else log.info({ desired: d.desired, source: d.desiredSource, effective: d.effective }, 'interception mode chosen');
  }

  /** Report mode and failing identities to the controller (it posts Node Events); a failure is retried by the next sync. */
  private async reportStatus(d: ModeDecision, expired: { namespace: string; serviceAccount: string; reason: string }[], key: string): Promise<void> {
    if (!this.deps.reportMode) return;
    const status: NodeModeStatus = {
      ...(d.ready ? { ready: true, desired: d.desired, effective: d.effective, ...(d.fallbackReason ? { fallbackReason: d.fallbackReason } : {}) } : { ready: false, desired: d.desired, reason: d.reason }),
      ...(expired.length ? { expiredIdentities: expired } : {}),
    };
    try {
      await this.deps.reportMode(status);
      this.reported = key;
    } catch (err) {
      if (this.lastModeLog === key) this.lastModeLog = undefined;
      log.warn({ err: errorMessage(err) }, 'could not report the interception mode to the controller; retried at the next sync');
      throw err;
    }
  }

  /**
   * Report the current mode and failing identities unless the controller
   * already has exactly this; rejects when it cannot be reached. Called
   * before each renewal of an expired identity, so: one report in flight at
   * a time for all of them, and after a failure none for REPORT_RETRY_MS
   * (a hundred identities expiring together make one POST, not a hundred).
   */
  private reportNow(): Promise<void> {
    if (!this.lastDecision) return Promise.resolve();
    const expired = this.identities?.expired() ?? [];
    const key = JSON.stringify([this.lastDecision, expired]);
    if (key === this.reported) return Promise.resolve();
    if (this.reporting) return this.reporting;
    if (Date.now() - this.reportFailedAt < REPORT_RETRY_MS) return Promise.reject(new Error('the last status report failed moments ago'));
    this.lastModeLog = key;
    this.reporting = this.reportStatus(this.lastDecision, expired, key)
      .catch((err: unknown) => {
        this.reportFailedAt = Date.now();
        throw err;
      })
      .finally(() => (this.reporting = undefined));
    return this.reporting;
  }

  /**
   * The controller answers again after an outage: every failing identity is
   * renewed at once rather than after its backoff (which grows to 150 s); a
   * renewal of an expired one reports it first (beforeRecover).
   */
  private controllerBack(): void {
    const n = this.identities?.retryNow('controller reachable again') ?? 0;
    if (n) log.info({ retried: n }, 'controller reachable again: retrying failing certificates now');
  }

  /** On the first sync, leftovers of the other mode (a switch interrupted by a crash) are removed after ours is in force. */
  private async cleanupOtherMode(mode: InterceptionMode): Promise<void> {
    const other: InterceptionMode = mode === 'ebpf' ? 'iptables' : 'ebpf';
    if (this.report?.support[other] !== undefined) return;
    const dp = this.deps.dataplane(other);
    try {
      const installed = await dp.installed();
      if (installed.pods.length > 0 || Object.keys(installed.detail).length > 0) {
        const report = await dp.cleanup();
        if (report.removed.length) log.info({ mode: other, removed: report.removed }, 'removed leftovers of the other mode');
      }
    } catch (err) {
      log.warn({ mode: other, err: errorMessage(err) }, 'could not inspect the other mode for leftovers');
    } finally {
      await dp.close();
    }
  }

  private refreshGauges(cur: ReturnType<PolicyFeed['current']>): void {
    this.metrics.policyVersion.reset();
    if (cur) this.metrics.policyVersion.set({ version: cur.policy.version }, 1);
  }

  private readPersistedMode(): PersistedMode | undefined {
    try {
      return JSON.parse(readFileSync(this.modeFile, 'utf8')) as PersistedMode;
    } catch {
      return undefined;
    }
  }

  private persistMode(m: PersistedMode): void {
    const text = JSON.stringify(m) + '\n';
    if (text === this.persisted) return;
    const tmp = `${this.modeFile}.tmp`;
    writeFileSync(tmp, text);
    renameSync(tmp, this.modeFile);
    this.persisted = text;
  }
}

const round2 = (x: number): number => Math.round(x * 100) / 100;

export function splitHostPort(s: string): [string, number] {
  const i = s.lastIndexOf(':');
  return [s.slice(0, i), Number(s.slice(i + 1))];
}
