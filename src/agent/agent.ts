import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import type { Dataplane, DesiredState, InterceptionMode } from '../dataplane/types.js';
import { FsmNodeError, errorMessage } from '../errors.js';
import { buildApi } from '../http/server.js';
import type { NodePolicy } from '../policy/schema.js';
import type { ProxySupervisor } from '../proxy/supervisor.js';
import { logger } from '../util/log.js';
import type { AgentConfig } from './config.js';
import { agentMetrics, type AgentMetrics } from './metrics.js';
import { chooseMode, type ModeDecision, type PersistedMode } from './mode.js';
import type { ProbeReport } from './probe.js';
import { SyncRunner, type SyncContext } from './sync-runner.js';

const log = logger('agent');

/** Where the agent's policy comes from: the controller client, or a fixed policy in tests. */
export interface PolicyFeed {
  current(): { policy: NodePolicy; receivedAt: number } | undefined;
  onChange(fn: () => void): void;
  start(): void;
  stop(): Promise<void>;
  fetchErrors(): number;
}

export interface AgentDeps {
  policy: PolicyFeed;
  probe: () => Promise<ProbeReport>;
  dataplane: (mode: InterceptionMode) => Dataplane;
  render: (policy: NodePolicy) => DesiredState;
  proxy: ProxySupervisor;
}

/**
 * The agent: one reconcile loop from policy + probe + node state to the
 * dataplane and the proxy. Event handlers only request syncs; each sync
 * chooses the mode, renders the whole desired state and applies it. A mode
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
  private applied: { version: string; pods: number; at: string } | undefined;
  private lastError: string | undefined;
  private readonly modeFile: string;

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
  }

  async start(): Promise<void> {
    mkdirSync(this.config.stateDir, { recursive: true });
    this.report = await this.deps.probe();
    for (const c of this.report.checks) this.metrics.probe.set({ check: c.name }, c.ok ? 1 : 0);
    this.deps.proxy.start();
    this.deps.policy.onChange(() => this.runner.request('policy changed'));
    this.deps.policy.start();
    this.runner.start();
    const [host, port] = splitHostPort(this.config.listen);
    this.api = buildApi({ notReadyReason: () => this.notReadyReason(), state: () => this.state(), registry: this.metrics.registry });
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
    await this.runner.stop();
    await this.deps.policy.stop();
    this.deps.proxy.detach();
    await this.active?.close();
    await this.api?.close();
    log.info('agent stopped; dataplane and proxy left in place');
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
      lastError: this.lastError,
      proxy: this.deps.proxy.status(),
    };
  }

  private async sync(ctx: SyncContext): Promise<void> {
    const cur = this.deps.policy.current();
    this.refreshGauges(cur);
    if (!cur) return;
    const { policy } = cur;
    const decision = chooseMode(
      { nodeLabel: policy.node.interceptionMode ?? undefined, meshDefault: policy.mesh.interceptionMode, flag: this.config.mode },
      this.report!.support,
      this.readPersistedMode(),
    );
    this.decision = decision;
    this.metrics.mode.reset();
    if (!decision.ready) {
      log.error({ reason: decision.reason }, 'no interception mode works on this node; not ready');
      return;
    }
    this.metrics.mode.set({ desired: decision.desired, effective: decision.effective, fallback_reason: decision.fallbackReason ?? '' }, 1);
    if (decision.fallbackReason) log.warn({ desired: decision.desired, effective: decision.effective, reason: decision.fallbackReason }, 'interception mode fell back');

    const desired = this.deps.render(policy);
    const previous = this.active;
    const next = previous?.mode === decision.effective ? previous : this.deps.dataplane(decision.effective);
    try {
      await next.apply(desired, { full: ctx.full || next !== previous });
    } catch (err) {
      this.metrics.applyFailures.inc({ dataplane: next.mode });
      if (next !== previous) await next.close();
      throw err;
    }
    if (previous && previous !== next) {
      // Make before break: the new mode is in force; now remove every trace of the old one.
      const report = await previous.cleanup();
      await previous.close();
      this.metrics.modeSwitches.inc({ from: previous.mode, to: next.mode });
      log.info({ from: previous.mode, to: next.mode, removed: report.removed.length }, 'switched interception mode');
    } else if (!previous) {
      await this.cleanupOtherMode(next.mode);
    }
    this.active = next;
    this.persistMode({ desired: decision.desired, effective: decision.effective });
    this.applied = { version: policy.version, pods: desired.pods.length, at: new Date().toISOString() };
    this.metrics.enrolledPods.set(desired.pods.length);
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
    const tmp = `${this.modeFile}.tmp`;
    writeFileSync(tmp, JSON.stringify(m) + '\n');
    renameSync(tmp, this.modeFile);
  }
}

export function splitHostPort(s: string): [string, number] {
  const i = s.lastIndexOf(':');
  return [s.slice(0, i), Number(s.slice(i + 1))];
}
