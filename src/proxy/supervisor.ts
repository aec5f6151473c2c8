import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FsmNodeError, errorMessage } from '../errors.js';
import { run } from '../util/exec.js';
import { logger } from '../util/log.js';
import { packageRoot } from '../util/paths.js';
import { ENTRY_FILE, pruneCodebases, stageCodebase, writeConfig } from './codebase.js';
import { configVersion, parseDrainAck, startFailure, type ReloadMode } from './handover.js';
import { adminGetMany, listeningPorts, parseReloadAck, processStartTime } from './health.js';
import { instanceCount, logFileName, parseAdoptionRecord, pickAdminPorts, planAdoption, splitThreads, type AdoptionRecord, type ProxyInstance } from './instances.js';
import { InstanceMetricsSum } from './metrics-sum.js';
import { findPipy, nodeCpus, pipyArgs, pipyVersion, threadsFor } from './pipy.js';

export type { ProxyInstance } from './instances.js';
export type { ReloadMode } from './handover.js';

const log = logger('proxy');

/**
 * Keeps the node's shared proxy running. The proxy is N instances (Pipy
 * processes, default 2) listening on the same ports with SO_REUSEPORT: when
 * one dies the kernel sends new connections to the others at once while it
 * is restarted. Each is started detached, in the proxy cgroup (so the eBPF
 * dataplane never re-captures it), optionally as its own uid, and in the lab
 * in the node's network namespace; what runs is recorded in
 * <stateDir>/proxy.json. A restarted agent adopts the live instances instead
 * of starting others, so agent restarts never interrupt traffic; an adopted
 * set of another binary, program or shape is replaced hitlessly (upgrade: the
 * new set beside the old on the same ports, then drain the old).
 *
 * A dead or hung instance is restarted with exponential backoff and jitter;
 * crashes are counted per instance, and N crashes within a window are that
 * instance's crash loop. When every instance is crash-looping the proxy is,
 * and the failure policy applies: fail-closed keeps interception (connections
 * fail until the proxy is back), fail-open asks the agent to stop redirecting
 * through onInterception(false) and to resume with onInterception(true) once
 * an instance has been ready for recoverAfterMs.
 *
 * Config delivery (deliver), by default a hand-over: write the new
 * config.json, start a new set of instances from it beside the running set on
 * the same ports, and once each listens retire the old set with SIGINT, whose
 * program (proxy/drain.js) answers its requests in flight before it exits. A
 * config the new instances reject (they exit before listening) is rolled back
 * on disk and reported; the old set never stopped. Pipy's in-place SIGHUP
 * reload (pipy.reload: 'signal') is kept: it costs no process start, but
 * Pipy 1.5 stops the old program by force and resets requests in flight.
 * See docs/proxy.md.
 */

export type FailurePolicy = 'fail-closed' | 'fail-open';

export interface PipySettings {
  /** Pipy binary; default PIPY_BIN, then pipy on PATH. */
  bin?: string;
  /** Directory holding the Pipy program (main.js ...); default <package>/proxy. */
  programDir?: string;
  /** First admin API port on 127.0.0.1: instances use 6060, 6061, ...; an upgrade's new set the next free ones. Default 6060. */
  adminPort?: number;
  /**
   * Pipy processes sharing the listeners (SO_REUSEPORT), so a crash of one
   * fails no new connection. Default 2 (DEFAULT_PIPY_INSTANCES).
   */
  instances?: number;
  /** Worker threads of the whole proxy, split among the instances; default one per CPU up to threadCap. */
  threads?: number;
  /** Upper bound on threads (small boards). Default 4. */
  threadCap?: number;
  /**
   * How deliver() makes a config live: 'handover' (default; a new set of
   * instances, the old one drained: no request in flight fails) or 'signal'
   * (SIGHUP: in place, no process start, but Pipy 1.5 resets requests in flight).
   */
  reload?: ReloadMode;
}

export interface ProxySupervisorOptions {
  kind: 'passthrough' | 'pipy';
  stateDir: string;
  /** cgroup v2 directory the proxy runs in; without it the proxy stays in the agent's cgroup (unit tests only). */
  cgroup?: string;
  netns?: string;
  address: string;
  outboundPort: number;
  inboundPort: number;
  /** Ports that must be listening for readiness; default outbound (+ inbound for Pipy). */
  readyPorts?: number[];
  /** Poll interval for liveness and readiness. Default 500 ms. */
  checkIntervalMs?: number;
  pipy?: PipySettings;
  /** Run the proxy as this uid/gid (FSM: 1500), keeping CAP_NET_ADMIN for transparent listeners. */
  runAs?: { uid: number; gid: number };
  /** Default fail-closed. */
  failurePolicy?: FailurePolicy;
  /** A crash loop is `crashes` exits within `windowMs`. Default 5 in 60 s. */
  crashLoop?: { crashes: number; windowMs: number };
  /** Restart delay base * 2^(n-1), at most maxMs, +-20 % jitter. Default 250 ms .. 30 s. */
  backoff?: { baseMs: number; maxMs: number };
  /** Uptime after which the consecutive-crash count (and so the backoff) resets. Default 10 s. */
  stableMs?: number;
  /** Ready this long after a crash loop before fail-open restores interception. Default 3 s. */
  recoverAfterMs?: number;
  /** Not listening this long after start: killed and counted as a crash. Default 30 s. */
  startTimeoutMs?: number;
  /** Admin /status probe (Pipy): every intervalMs, killed after `failures` misses in a row. */
  liveness?: { intervalMs: number; timeoutMs: number; failures: number };
  /**
   * SIGINT grace before a forced shutdown when stopping or retiring an
   * instance. The program's own drain deadline (FSMN_PROXY_DRAIN_MS, in
   * proxy/drain.js) is set 1 s below it. Default 10 s.
   */
  drainMs?: number;
  /**
   * At start (with more than one instance) and before an upgrade, set
   * net.ipv4.tcp_migrate_req=1 in the proxy's network namespace: connections
   * still in a listener's accept queue when it closes (retired or crashed
   * instance) move to another listener of the group instead of being reset.
   * In production that namespace is the node's. Default true.
   */
  migrateRequests?: boolean;
  /** Extra environment for the proxy process. */
  env?: Record<string, string>;
  /** config.json before any deliver() (when no last good one is stored). */
  initialConfig?: object;
  /** Jitter source (tests). */
  random?: () => number;
}

/** One instance in status(). */
export interface ProxyInstanceStatus {
  slot: number;
  pid: number | undefined;
  up: boolean;
  listening: boolean;
  adminPort?: number;
  threads: number;
  restarts: number;
  crashes: number;
  crashLoop: boolean;
  lastExit?: string;
}

export interface ProxyStatus {
  kind: string;
  /** The first running instance's pid. */
  pid: number | undefined;
  /** Some instance runs. */
  up: boolean;
  /** Ready: some instance listens on every ready port (the kernel sends new connections only to listening ones). */
  listening: boolean;
  /** Summed over the instances. */
  restarts: number;
  adopted: boolean;
  version?: string;
  /** Worker threads of the running instances together. */
  threads?: number;
  crashes: number;
  /** The proxy as a whole: every instance is crash-looping (what the failure policy acts on). */
  crashLoop: boolean;
  crashLoopsDetected: number;
  failurePolicy: FailurePolicy;
  /** What the agent should do: false only under fail-open while the proxy is unavailable. */
  interceptionWanted: boolean;
  reloads: number;
  reloadFailures: number;
  lastReload?: { at: string; ms: number; ok: boolean; error?: string };
  upgrades: number;
  /** How deliver() applies a config. */
  reloadMode?: ReloadMode;
  /** Old instances still answering their requests in flight after a hand-over or upgrade. */
  draining: number;
  lastExit?: string;
  /** Instances wanted, and each slot's state. */
  instanceCount: number;
  instances: ProxyInstanceStatus[];
}

export interface DeliverResult {
  /** false: same config as last time, nothing done. */
  changed: boolean;
  /** true: the running proxy acknowledged the reload; false: written for the next start (proxy down or passthrough). */
  applied: boolean;
  ms: number;
}

export class ProxyReloadError extends FsmNodeError {
  constructor(message: string, details: Record<string, unknown>) {
    super('FSMN_ERR_PROXY_RELOAD', message, { details });
  }
}

/** Restart delay after the n-th consecutive crash (n >= 1): exponential, capped, +-20 % jitter. */
export function backoffDelay(n: number, cfg: { baseMs: number; maxMs: number }, random: () => number = Math.random): number {
  return Math.min(cfg.baseMs * 2 ** Math.max(0, n - 1), cfg.maxMs) * (0.8 + random() * 0.4);
}

/** Crash times still inside the window, and whether they make a crash loop. */
export function crashWindow(times: readonly number[], now: number, cfg: { crashes: number; windowMs: number }): { recent: number[]; loop: boolean } {
  const recent = times.filter((t) => now - t <= cfg.windowMs);
  return { recent, loop: recent.length >= cfg.crashes };
}

/** The argv that puts the proxy in its cgroup (before exec, so no socket is ever opened outside it), netns and uid. */
export function launchArgv(o: { cgroup?: string; netnsPath?: string; runAs?: { uid: number; gid: number }; argv: string[] }): string[] {
  const enter = o.netnsPath ? ['nsenter', `--net=${o.netnsPath}`, '--'] : [];
  const drop = o.runAs
    ? ['setpriv', `--reuid=${o.runAs.uid}`, `--regid=${o.runAs.gid}`, '--clear-groups', '--inh-caps=+net_admin', '--ambient-caps=+net_admin', '--']
    : [];
  const cmd = [...enter, ...drop, ...o.argv];
  return o.cgroup ? ['/bin/sh', '-c', 'echo $$ > "$0/cgroup.procs" && exec "$@"', o.cgroup, ...cmd] : cmd;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function isAlive(inst: ProxyInstance): boolean {
  return processStartTime(inst.pid) === inst.startTime;
}

/** Everything the supervisor tracks about one instance slot (its process comes and goes). */
interface Slot {
  index: number;
  threads: number;
  inst: ProxyInstance | undefined;
  restarts: number;
  crashes: number;
  consecutiveCrashes: number;
  crashTimes: number[];
  crashLoop: boolean;
  crashLoopsDetected: number;
  nextStartAt: number;
  upSince: number;
  readySince: number;
  livenessMisses: number;
  lastProbeAt: number;
  probing: boolean;
  killReason: string | undefined;
  lastExit: string | undefined;
}

function newSlot(index: number, threads: number): Slot {
  return {
    index, threads, inst: undefined, restarts: 0, crashes: 0, consecutiveCrashes: 0, crashTimes: [], crashLoop: false, crashLoopsDetected: 0,
    nextStartAt: 0, upSince: 0, readySince: 0, livenessMisses: 0, lastProbeAt: 0, probing: false, killReason: undefined, lastExit: undefined,
  };
}

export class ProxySupervisor {
  private slots: Slot[] = [];
  private adopted = false;
  private timer: NodeJS.Timeout | undefined;
  /** The proxy as a whole is crash-looping (every instance is). */
  private crashLoop = false;
  private crashLoopsDetected = 0;
  private interceptionWanted = true;
  private lastExit: string | undefined;
  private busy = false;
  private stopped = false;
  /** A delivery is between writing config.json and its outcome: a restarting instance must not overwrite the file. */
  private delivering = false;
  private reloads = 0;
  private reloadFailures = 0;
  private upgrades = 0;
  /** Old instances a hand-over retired that may still drain (in proxy.json's retiring list until gone). */
  private retiring: ProxyInstance[] = [];
  /** Their generations, oldest first, each with its retirement; at most MAX_DRAINING_GENERATIONS. */
  private drainingGenerations: Array<{ insts: ProxyInstance[]; done: Promise<void> }> = [];
  /** Retiring instances whose program said it drained (nothing left in flight): safe to end at once. */
  private readonly drainedIds = new Set<string>();
  /** Someone reads metrics(): a hand-over then reads the old instances' counters a last time. */
  private metricsRead = false;
  private lastReload: ProxyStatus['lastReload'];
  private delivery: Promise<unknown> = Promise.resolve();
  private pipyBin: string | undefined;
  private pipyVersionText: string | undefined;
  private readonly metricSum = new InstanceMetricsSum();
  private readonly listeners: Array<(wanted: boolean, reason: string) => void> = [];
  private readonly stateFile: string;
  private readonly configFile: string;
  private readonly codebaseRoot: string;
  private readonly o: Required<Pick<ProxySupervisorOptions, 'checkIntervalMs' | 'failurePolicy' | 'crashLoop' | 'backoff' | 'stableMs' | 'recoverAfterMs' | 'startTimeoutMs' | 'liveness' | 'drainMs'>>;

  constructor(private readonly opts: ProxySupervisorOptions) {
    this.stateFile = join(opts.stateDir, 'proxy.json');
    this.configFile = join(opts.stateDir, 'proxy-config.json');
    this.codebaseRoot = join(opts.stateDir, 'proxy-codebase');
    this.o = {
      checkIntervalMs: opts.checkIntervalMs ?? 500,
      failurePolicy: opts.failurePolicy ?? 'fail-closed',
      crashLoop: opts.crashLoop ?? { crashes: 5, windowMs: 60_000 },
      backoff: opts.backoff ?? { baseMs: 250, maxMs: 30_000 },
      stableMs: opts.stableMs ?? 10_000,
      recoverAfterMs: opts.recoverAfterMs ?? 3000,
      startTimeoutMs: opts.startTimeoutMs ?? 30_000,
      liveness: opts.liveness ?? { intervalMs: 5000, timeoutMs: 1000, failures: 3 },
      drainMs: opts.drainMs ?? 10_000,
    };
    // Validated here, so a bad setting fails the agent's start, not a later restart.
    instanceCount(opts.kind, opts.pipy?.instances);
  }

  /** Fail-open hook: called with false when the agent should stop redirecting, true when it may again. */
  onInterception(fn: (wanted: boolean, reason: string) => void): void {
    this.listeners.push(fn);
  }

  /**
   * Adopt the running instances or start them; then watch them. Missing
   * instances are started beside adopted ones; an adopted set of another
   * kind, binary version, program or thread split is upgraded in the background.
   */
  async start(): Promise<void> {
    mkdirSync(this.opts.stateDir, { recursive: true });
    this.stopped = false;
    const n = instanceCount(this.opts.kind, this.opts.pipy?.instances);
    let threads = [1];
    if (this.opts.kind === 'pipy') {
      this.pipyBin = this.opts.pipy?.bin ?? findPipy();
      this.pipyVersionText = await pipyVersion(this.pipyBin);
      const total = this.opts.pipy?.threads ?? threadsFor(await nodeCpus(), this.opts.pipy?.threadCap ?? 4);
      threads = splitThreads(total, n);
    }
    this.slots = threads.map((t, i) => newSlot(i, t));
    if ((n > 1 || this.reloadMode() === 'handover') && this.opts.migrateRequests !== false) await this.enableRequestMigration();
    const record = this.readState();
    const ours = (i: ProxyInstance): boolean => isAlive(i) && this.inOurCgroup(i.pid);
    for (const r of record.retiring.filter(ours)) {
      log.warn({ pid: r.pid }, 'an interrupted upgrade left an old proxy instance; retiring it');
      void this.retire(r, this.o.drainMs);
    }
    const alive = record.instances.filter(ours);
    if (alive.length === 0) {
      for (const slot of this.slots) this.startSlot(slot);
    } else {
      const plan = planAdoption(alive, { n, threads, differs: (i) => this.replaceReason(i) });
      this.adopted = true;
      const now = Date.now();
      plan.slots.forEach((inst, i) => {
        if (!inst) return;
        const slot = this.slots[i]!;
        slot.inst = inst;
        slot.upSince = now;
        slot.lastProbeAt = now;
      });
      log.info({ pids: alive.map((i) => i.pid), kind: alive[0]!.kind, version: alive[0]!.version, want: n }, 'adopted the running proxy');
      for (const extra of plan.surplus) {
        log.info({ pid: extra.pid, want: n }, 'more proxy instances run than wanted; retiring one');
        void this.retire(extra, this.o.drainMs);
      }
      if (plan.replace) {
        this.writeState();
        void this.upgrade(plan.replace).catch((err: unknown) => log.error({ err: errorMessage(err) }, 'upgrade of the adopted proxy failed; it keeps running'));
      } else {
        for (const slot of this.slots) if (!slot.inst) this.startSlot(slot);
        this.writeState();
      }
    }
    this.timer = setInterval(() => this.check(), this.o.checkIntervalMs);
    this.timer.unref();
  }

  /** Stop watching; the proxy keeps running (agent restarts must not drop traffic). */
  detach(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /**
   * Stop the proxy for good (cleanup, graceful node shutdown): SIGINT lets Pipy
   * close its listeners and drain open connections; SIGKILL after the grace.
   */
  async stop(graceMs = this.o.drainMs): Promise<boolean> {
    this.detach();
    this.stopped = true;
    const record = this.readState();
    const tracked = this.slots.flatMap((s) => (s.inst ? [s.inst] : []));
    const all = [...tracked, ...record.instances, ...record.retiring].filter((i, k, xs) => xs.findIndex((j) => j.pid === i.pid && j.startTime === i.startTime) === k);
    rmSync(this.stateFile, { force: true });
    for (const s of this.slots) s.inst = undefined;
    const ours = all.filter((i) => isAlive(i) && this.inOurCgroup(i.pid));
    const version = configVersion(this.startConfig());
    await Promise.all(ours.map((i) => this.retire(i, graceMs, { version })));
    this.retiring = [];
    this.drainingGenerations = [];
    return ours.length > 0;
  }

  status(): ProxyStatus {
    const instances: ProxyInstanceStatus[] = this.slots.map((s) => {
      const up = s.inst !== undefined && isAlive(s.inst);
      return {
        slot: s.index,
        pid: s.inst?.pid,
        up,
        listening: up && this.listening(s.inst!),
        ...(s.inst?.adminPort !== undefined ? { adminPort: s.inst.adminPort } : {}),
        threads: s.inst?.threads ?? s.threads,
        restarts: s.restarts,
        crashes: s.crashes,
        crashLoop: s.crashLoop,
        ...(s.lastExit ? { lastExit: s.lastExit } : {}),
      };
    });
    const running = this.slots.filter((s, i) => instances[i]!.up).map((s) => s.inst!);
    const first = running[0] ?? this.slots.find((s) => s.inst)?.inst;
    const sum = (f: (s: Slot) => number): number => this.slots.reduce((a, s) => a + f(s), 0);
    return {
      kind: first?.kind ?? this.opts.kind,
      pid: first?.pid,
      up: running.length > 0,
      listening: instances.some((i) => i.listening),
      restarts: sum((s) => s.restarts),
      adopted: this.adopted,
      ...(first ? { version: first.version, threads: running.reduce((a, i) => a + i.threads, 0) } : {}),
      crashes: sum((s) => s.crashes),
      crashLoop: this.crashLoop,
      crashLoopsDetected: this.crashLoopsDetected,
      failurePolicy: this.o.failurePolicy,
      interceptionWanted: this.interceptionWanted,
      reloads: this.reloads,
      reloadFailures: this.reloadFailures,
      ...(this.lastReload ? { lastReload: this.lastReload } : {}),
      upgrades: this.upgrades,
      ...(this.opts.kind === 'pipy' ? { reloadMode: this.reloadMode() } : {}),
      draining: this.retiring.filter(isAlive).length,
      ...(this.lastExit ? { lastExit: this.lastExit } : {}),
      instanceCount: this.slots.length,
      instances,
    };
  }

  /**
   * Pipy's Prometheus text from the admin API (GET /metrics) of every
   * instance, summed (counters as running totals that survive an instance's
   * restart or reload: metrics-sum.ts), for the agent to normalise and
   * re-export; undefined for the passthrough proxy or when no instance
   * answers. Crosses into the proxy's namespace when needed.
   */
  async metrics(timeoutMs = 2000): Promise<string | undefined> {
    this.metricsRead = true;
    const live = this.slots.filter((s) => s.inst?.adminPort !== undefined && isAlive(s.inst));
    if (live.length === 0) return undefined;
    const answers = await adminGetMany(live.map((s) => s.inst!.adminPort!), '/metrics', timeoutMs, this.netnsPath());
    let answered = false;
    live.forEach((s, i) => {
      const r = answers[i];
      if (r?.status !== 200) return;
      this.metricSum.observe(s.index, instanceId(s.inst!), r.body);
      answered = true;
    });
    if (!answered) return undefined;
    return this.metricSum.render(new Map(this.slots.filter((s) => s.inst && isAlive(s.inst)).map((s) => [s.index, instanceId(s.inst!)])));
  }

  /** Ready = some instance is alive and listens on every ready port with sockets of its own. */
  ready(): boolean {
    return this.slots.some((s) => s.inst !== undefined && isAlive(s.inst) && this.listening(s.inst));
  }

  /** Resolves when ready (with `all`: when every instance listens), rejects after the timeout (tests, benchmarks, upgrade). */
  async waitReady(timeoutMs = 10_000, o: { all?: boolean } = {}): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const done = (): boolean => (o.all ? this.slots.length > 0 && this.status().instances.every((i) => i.listening) : this.ready());
    while (!done()) {
      if (Date.now() > deadline) throw new FsmNodeError('FSMN_ERR_PROXY_NOT_READY', `proxy not ready within ${timeoutMs} ms`, { details: { status: this.status() } });
      await sleep(10);
    }
  }

  /**
   * Hand the proxy a new config.json and make it live in every instance.
   * Calls are serialised; an unchanged config is a no-op. Rejects with
   * ProxyReloadError when an instance could not load it: the file is rolled
   * back, instances that took it reload the previous one, and the proxy keeps
   * running the last good config.
   */
  deliver(config: object, timeoutMs = 5000): Promise<DeliverResult> {
    const run = this.delivery.then(() => this.deliverNow(JSON.stringify(config, null, 1) + '\n', timeoutMs));
    this.delivery = run.catch(() => undefined);
    return run;
  }

  /**
   * Replace the running instances without a failed connection: start the new
   * set (current binary, program and thread split; admin ports disjoint from
   * the old set's) beside the old on the same ports (--reuse-port), wait until
   * each new instance listens, record them, then SIGINT the old ones so they
   * stop accepting and drain.
   */
  upgrade(reason = 'requested'): Promise<void> {
    // Paused from now: the check loop must not start missing instances the upgrade is about to start.
    this.busy = true;
    // In the delivery queue: a config delivered meanwhile reaches the new instances, not the retiring ones.
    const run = this.delivery.then(() => this.upgradeNow(reason));
    this.delivery = run.catch(() => undefined);
    return run;
  }

  private async upgradeNow(reason: string): Promise<void> {
    this.busy = true;
    try {
      const old = this.slots.flatMap((s) => (s.inst && isAlive(s.inst) ? [s.inst] : []));
      if (old.some((i) => i.kind !== 'pipy') || this.opts.kind !== 'pipy') {
        // The passthrough proxy cannot share its port (no SO_REUSEPORT in Node 20): stop, then start.
        log.warn({ reason, from: old[0]?.kind, to: this.opts.kind }, 'replacing the proxy with a short listening gap (kind change)');
        await Promise.all(old.map((i) => this.retire(i, this.o.drainMs)));
        for (const slot of this.slots) {
          slot.inst = undefined;
          this.startSlot(slot);
        }
        await this.waitReady(this.o.startTimeoutMs);
        this.upgrades += 1;
        return;
      }
      if (old.length && this.opts.migrateRequests !== false) await this.enableRequestMigration();
      const ports = pickAdminPorts(this.adminBase(), this.slots.length, old.map((i) => i.adminPort));
      const next: ProxyInstance[] = [];
      const abandon = (why: string): never => {
        for (const i of next) if (isAlive(i)) process.kill(i.pid, 'SIGKILL');
        throw new FsmNodeError('FSMN_ERR_PROXY_UPGRADE', `new proxy instances (pids ${next.map((i) => i.pid).join(', ')}) ${why}; the old ones (pids ${old.map((i) => i.pid).join(', ')}) keep serving`, { details: { reason } });
      };
      try {
        for (const slot of this.slots) next.push(this.spawnInstance(slot.index, slot.threads, ports[slot.index]!));
      } catch (err) {
        abandon(`could not all be started: ${errorMessage(err)}`);
      }
      const deadline = Date.now() + this.o.startTimeoutMs;
      while (!next.every((i) => isAlive(i) && this.listening(i))) {
        if (next.some((i) => !isAlive(i))) abandon('exited before listening');
        if (Date.now() > deadline) abandon(`did not all listen within ${this.o.startTimeoutMs} ms`);
        await sleep(10);
      }
      const now = Date.now();
      for (const slot of this.slots) {
        Object.assign(slot, { inst: next[slot.index], upSince: now, readySince: 0, livenessMisses: 0, lastProbeAt: now, killReason: undefined });
      }
      this.writeState(old);
      log.info({ reason, old: old.map((i) => i.pid), new: next.map((i) => i.pid), version: next[0]?.version }, 'new proxy instances ready; draining the old ones');
      // The new set is watched from here on; the old one only drains.
      this.busy = false;
      await Promise.all(old.map((i) => this.retire(i, this.o.drainMs)));
      this.writeState();
      pruneCodebases(this.codebaseRoot, [...new Set(next.flatMap((i) => (i.codebase ? [i.codebase] : [])))]);
      this.upgrades += 1;
    } finally {
      this.busy = false;
    }
  }

  // ---- internals -------------------------------------------------------------

  private emitInterception(wanted: boolean, reason: string): void {
    if (this.interceptionWanted === wanted) return;
    this.interceptionWanted = wanted;
    for (const fn of this.listeners) {
      try {
        fn(wanted, reason);
      } catch (err) {
        log.error({ err: errorMessage(err) }, 'interception listener failed');
      }
    }
  }

  private check(): void {
    if (this.busy || this.stopped || this.timer === undefined) return;
    const now = Date.now();
    const probe: Slot[] = [];
    for (const slot of this.slots) {
      const inst = slot.inst;
      if (inst && isAlive(inst)) {
        if (this.watchRunning(slot, inst, now)) probe.push(slot);
        continue;
      }
      if (inst) this.recordCrash(slot, `proxy instance ${slot.index} (pid ${inst.pid}) exited`, now);
      if (now >= slot.nextStartAt) {
        slot.restarts += 1;
        try {
          this.startSlot(slot);
        } catch (err) {
          this.recordCrash(slot, `proxy instance ${slot.index} could not be started: ${errorMessage(err)}`, now);
        }
      }
    }
    this.proxyCrashLoop();
    if (probe.length) void this.probe(probe);
  }

  /** The failure policy acts on the proxy as a whole: crash-looping when every instance is. */
  private proxyCrashLoop(): void {
    const all = this.slots.length > 0 && this.slots.every((s) => s.crashLoop);
    if (all === this.crashLoop) return;
    this.crashLoop = all;
    if (all) {
      this.crashLoopsDetected += 1;
      const each = this.slots.length > 1 ? `, in each of its ${this.slots.length} instances` : '';
      const reason = `proxy crash loop: ${this.o.crashLoop.crashes} exits within ${this.o.crashLoop.windowMs} ms${each} (last: ${this.lastExit})`;
      log.error({ policy: this.o.failurePolicy, instances: this.slots.length }, reason);
      if (this.o.failurePolicy === 'fail-open') this.emitInterception(false, reason);
    } else {
      log.info('proxy recovered from the crash loop');
      this.emitInterception(true, 'proxy recovered');
    }
  }

  /** Readiness, stability and crash-loop recovery of a running instance; true when its liveness probe is due. */
  private watchRunning(slot: Slot, inst: ProxyInstance, now: number): boolean {
    const ready = this.listening(inst);
    if (!ready) {
      slot.readySince = 0;
      if (now - slot.upSince > this.o.startTimeoutMs) this.kill(slot, inst, `not listening on ${this.readyPorts().join(', ')} ${this.o.startTimeoutMs} ms after start`);
      return false;
    }
    if (slot.readySince === 0) slot.readySince = now;
    if (now - slot.upSince >= this.o.stableMs) slot.consecutiveCrashes = 0;
    if (slot.crashLoop && now - slot.readySince >= this.o.recoverAfterMs) {
      slot.crashLoop = false;
      log.info({ slot: slot.index, pid: inst.pid }, 'proxy instance recovered from its crash loop');
    }
    return inst.adminPort !== undefined && !slot.probing && now - slot.lastProbeAt >= this.o.liveness.intervalMs;
  }

  /** GET /status on the admin port of each due instance, all in one helper process when it crosses namespaces. */
  private async probe(slots: Slot[]): Promise<void> {
    const insts = slots.map((s) => s.inst!);
    const now = Date.now();
    for (const s of slots) Object.assign(s, { probing: true, lastProbeAt: now });
    try {
      const answers = await adminGetMany(insts.map((i) => i.adminPort!), '/status', this.o.liveness.timeoutMs, this.netnsPath());
      slots.forEach((slot, k) => {
        const inst = insts[k]!;
        if (slot.inst !== inst) return;
        slot.livenessMisses = answers[k]?.status === 200 ? 0 : slot.livenessMisses + 1;
        if (slot.livenessMisses >= this.o.liveness.failures) this.kill(slot, inst, `hung: admin /status unanswered ${slot.livenessMisses} times`);
      });
    } finally {
      for (const s of slots) s.probing = false;
    }
  }

  /** The proxy's network namespace by name (stable, unlike a pid's, which goes with a dead instance); undefined: ours. */
  private netnsPath(): string | undefined {
    return this.opts.netns ? `/run/netns/${this.opts.netns}` : undefined;
  }

  /** A hung or stuck instance: SIGKILL; the next check sees it dead and restarts it as after a crash. */
  private kill(slot: Slot, inst: ProxyInstance, why: string): void {
    log.error({ slot: slot.index, pid: inst.pid, why }, 'killing a proxy instance');
    slot.killReason = why;
    slot.livenessMisses = 0;
    try {
      process.kill(inst.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }

  private recordCrash(slot: Slot, what: string, now: number): void {
    slot.lastExit = slot.killReason ? `${what}: killed, ${slot.killReason}` : what;
    this.lastExit = slot.lastExit;
    slot.killReason = undefined;
    slot.inst = undefined;
    slot.crashes += 1;
    slot.consecutiveCrashes += 1;
    slot.readySince = 0;
    const { recent, loop } = crashWindow([...slot.crashTimes, now], now, this.o.crashLoop);
    slot.crashTimes = recent;
    const delay = backoffDelay(slot.consecutiveCrashes, this.o.backoff, this.opts.random);
    slot.nextStartAt = now + delay;
    // Restart on time rather than on the next poll.
    setTimeout(() => this.check(), delay + 1).unref();
    const others = this.slots.filter((s) => s !== slot && s.inst !== undefined && isAlive(s.inst) && this.listening(s.inst)).length;
    log.warn({ slot: slot.index, crashes: slot.consecutiveCrashes, backoffMs: Math.round(delay), lastExit: slot.lastExit, otherInstancesListening: others }, 'proxy instance down; restarting after backoff');
    if (loop && !slot.crashLoop) {
      slot.crashLoop = true;
      slot.crashLoopsDetected += 1;
      log.error({ slot: slot.index, crashes: recent.length, windowMs: this.o.crashLoop.windowMs, lastExit: slot.lastExit }, 'proxy instance crash loop');
    }
  }

  private readyPorts(): number[] {
    return this.opts.readyPorts ?? (this.opts.kind === 'pipy' ? [this.opts.outboundPort, this.opts.inboundPort] : [this.opts.outboundPort]);
  }

  private listening(inst: ProxyInstance): boolean {
    const want = this.readyPorts();
    return listeningPorts(inst.pid, want).size === new Set(want).size;
  }

  private adminBase(): number {
    return this.opts.pipy?.adminPort ?? 6060;
  }

  /** Why an adopted instance is not what this agent would start (kind, binary, program), or undefined. */
  private replaceReason(found: ProxyInstance): string | undefined {
    if (found.kind !== this.opts.kind) return `kind ${found.kind} -> ${this.opts.kind}`;
    if (found.kind !== 'pipy') return undefined;
    if (found.bin !== this.pipyBin || found.version !== this.pipyVersionText) return `pipy ${found.bin} (${found.version}) -> ${this.pipyBin} (${this.pipyVersionText})`;
    const hash = stageCodebase(this.programDir(), this.codebaseRoot).hash;
    return found.programHash !== hash ? `program ${found.programHash} -> ${hash}` : undefined;
  }

  private programDir(): string {
    return this.opts.pipy?.programDir ?? join(packageRoot(), 'proxy');
  }

  /** The config.json a new instance starts with: the last delivered one, else the initial one. */
  private startConfig(): string {
    if (existsSync(this.configFile)) return readFileSync(this.configFile, 'utf8');
    return JSON.stringify(this.opts.initialConfig ?? {}, null, 1) + '\n';
  }

  private command(threads: number, adminPort: number): { argv: string[]; inst: Omit<ProxyInstance, 'pid' | 'startTime' | 'logFile' | 'startedAt'> } {
    if (this.opts.kind === 'passthrough') {
      const script = join(packageRoot(), 'dist', 'src', 'proxy', 'passthrough.js');
      if (!existsSync(script)) throw new FsmNodeError('FSMN_ERR_PROXY', `passthrough proxy not built: ${script} missing (run npm run build:ts)`);
      return {
        argv: [process.execPath, script, '--listen', `0.0.0.0:${this.opts.outboundPort}`, '--log', join(this.opts.stateDir, 'proxy-connections.jsonl')],
        inst: { kind: 'passthrough', bin: process.execPath, version: process.version, threads: 1 },
      };
    }
    const { dir, hash } = stageCodebase(this.programDir(), this.codebaseRoot);
    return {
      argv: [this.pipyBin!, ...pipyArgs({ entry: join(dir, ENTRY_FILE), threads, adminPort })],
      inst: { kind: 'pipy', bin: this.pipyBin!, version: this.pipyVersionText!, programHash: hash, codebase: dir, adminPort, threads },
    };
  }

  /** Start (or restart) the instance of a slot, on its own admin port when free, and record it. */
  private startSlot(slot: Slot): ProxyInstance {
    const used = new Set([...this.slots.filter((s) => s !== slot && s.inst && isAlive(s.inst)).map((s) => s.inst!), ...this.retiring.filter(isAlive)].map((i) => i.adminPort));
    const preferred = this.adminBase() + slot.index;
    const port = used.has(preferred) ? pickAdminPorts(this.adminBase(), 1, used)[0]! : preferred;
    const inst = this.spawnInstance(slot.index, slot.threads, port);
    const now = Date.now();
    Object.assign(slot, { inst, upSince: now, readySince: 0, livenessMisses: 0, lastProbeAt: now });
    this.writeState();
    return inst;
  }

  /** Spawn one instance (not yet tracked by a slot). */
  private spawnInstance(slot: number, threads: number, adminPort: number): ProxyInstance {
    const { argv, inst } = this.command(threads, adminPort);
    // Mid-delivery the file holds the candidate config, which the instance then starts with.
    if (inst.codebase && !this.delivering) writeConfig(inst.codebase, this.startConfig());
    // One log per admin port: no running instance shares it, so rotating it never renames a live instance's log.
    const logFile = join(this.opts.stateDir, inst.kind === 'pipy' ? logFileName(adminPort) : logFileName(undefined));
    if (existsSync(logFile)) renameSync(logFile, `${logFile}.1`);
    const out = openSync(logFile, 'a');
    const full = launchArgv({ ...(this.opts.cgroup ? { cgroup: this.opts.cgroup } : {}), ...(this.opts.netns ? { netnsPath: `/run/netns/${this.opts.netns}` } : {}), ...(this.opts.runAs ? { runAs: this.opts.runAs } : {}), argv });
    // The program's drain deadline (proxy/drain.js), below the grace retire() gives it.
    const env = { ...process.env, FSMN_PROXY_DRAIN_MS: String(Math.max(0, this.o.drainMs - 1000)), ...this.opts.env };
    const child = spawn(full[0]!, full.slice(1), { detached: true, stdio: ['ignore', out, out], env });
    closeSync(out);
    child.on('error', (err) => log.error({ err: err.message }, 'proxy spawn failed'));
    // Our own child (not an adopted one): notice its exit at once instead of at the next poll.
    child.once('exit', () => setImmediate(() => this.check()));
    child.unref();
    const pid = child.pid;
    const startTime = pid === undefined ? undefined : processStartTime(pid);
    if (pid === undefined || startTime === undefined) throw new FsmNodeError('FSMN_ERR_PROXY', `proxy did not start: ${full.join(' ')}`);
    const next: ProxyInstance = { ...inst, pid, startTime, logFile, startedAt: new Date().toISOString() };
    log.info({ slot, pid, kind: next.kind, version: next.version, threads: next.threads, adminPort: next.adminPort, netns: this.opts.netns }, 'started a proxy instance');
    return next;
  }

  /**
   * SIGINT (stop accepting, drain), SIGKILL after the grace; waits until the
   * process is gone. With `drain` (the config version the instance runs), the
   * program's own end of drain (proxy/drain.js: a log line per thread) ends
   * the wait early, and the process is then killed: Pipy 1.5 itself often
   * keeps "waiting for workers to drain" after its exit callbacks resolved.
   */
  private async retire(inst: ProxyInstance, graceMs: number, drain?: { version: string }): Promise<void> {
    const offset = fileSize(inst.logFile);
    try {
      process.kill(inst.pid, 'SIGINT');
    } catch {
      return;
    }
    const deadline = Date.now() + graceMs;
    let drained = false;
    while (isAlive(inst) && Date.now() < deadline) {
      await sleep(20);
      if (!drain) continue;
      const ack = parseDrainAck(readFrom(inst.logFile, offset), drain.version, inst.threads);
      if (!ack.done) continue;
      drained = true;
      this.drainedIds.add(instanceId(inst));
      if (ack.deadline) log.warn({ pid: inst.pid, threads: ack.deadline }, 'old proxy instance reached its drain deadline; connections still open were closed');
      break;
    }
    if (drained && isAlive(inst)) {
      // Nothing left in flight: end the process at once. Pipy's own (forced)
      // shutdown took over a second on a starved core in the cluster lab,
      // and meanwhile a peer's request that arrived on an idle pooled tunnel
      // hung until it was killed; closed now, the peer sees the close and
      // sends the request through another connection.
      signal(inst, 'SIGKILL');
      const gone = Date.now() + 1000;
      while (isAlive(inst) && Date.now() < gone) await sleep(10);
    } else if (isAlive(inst)) {
      // A second SIGINT makes Pipy end its workers at once. Needed in practice:
      // Pipy 1.5 sometimes keeps "waiting for workers to drain" with no client left.
      log.warn({ pid: inst.pid, graceMs }, 'proxy still draining after the grace; second SIGINT (forced shutdown)');
      process.kill(inst.pid, 'SIGINT');
      const forced = Date.now() + 1000;
      while (isAlive(inst) && Date.now() < forced) await sleep(10);
    }
    if (isAlive(inst)) {
      log.warn({ pid: inst.pid, graceMs }, 'proxy did not exit after SIGINT; SIGKILL');
      process.kill(inst.pid, 'SIGKILL');
      while (isAlive(inst)) await sleep(10);
    }
  }

  private async deliverNow(text: string, timeoutMs: number): Promise<DeliverResult> {
    const t0 = performance.now();
    const previous = existsSync(this.configFile) ? readFileSync(this.configFile, 'utf8') : undefined;
    if (previous === text) return { changed: false, applied: false, ms: 0 };
    const live = this.slots.flatMap((s) => (s.inst?.codebase && isAlive(s.inst) ? [s.inst] : []));
    if (this.opts.kind !== 'pipy' || live.length === 0) {
      // Not running (or being replaced): the next instance starts from this file.
      writeFileSync(this.configFile, text);
      return { changed: true, applied: false, ms: performance.now() - t0 };
    }
    if (this.reloadMode() === 'handover') return this.handOver(text, previous ?? this.startConfig(), live, t0);
    const codebases = [...new Set(live.map((i) => i.codebase!))];
    this.delivering = true;
    try {
      const offsets = live.map((i) => fileSize(i.logFile));
      for (const dir of codebases) writeConfig(dir, text);
      for (const i of live) signal(i, 'SIGHUP');
      const outcome = await this.awaitAcks(live, offsets, timeoutMs, t0);
      const ms = performance.now() - t0;
      const bad = live.map((_, k) => k).filter((k) => outcome[k]!.state === 'failed' || outcome[k]!.state === 'pending');
      if (bad.length === 0) {
        writeFileSync(this.configFile, text);
        const acked = outcome.some((o) => o.state === 'ok');
        if (acked) {
          this.reloads += 1;
          this.lastReload = { at: new Date().toISOString(), ms, ok: true };
        }
        // Every instance died meanwhile: the restarted ones start from this config.
        return { changed: true, applied: acked, ms };
      }
      // Roll back: the previous file, and instances that took the new config reload the previous one.
      const back = previous ?? this.startConfig();
      for (const dir of codebases) writeConfig(dir, back);
      const took = live.filter((_, k) => outcome[k]!.state === 'ok');
      const backOffsets = took.map((i) => fileSize(i.logFile));
      for (const i of took) signal(i, 'SIGHUP');
      if (took.length) await this.awaitAcks(took, backOffsets, timeoutMs, performance.now());
      this.reloadFailures += 1;
      const first = outcome[bad[0]!]!;
      const error = first.state === 'failed' ? first.line : `no reload ack within ${timeoutMs} ms`;
      this.lastReload = { at: new Date().toISOString(), ms, ok: false, error };
      const pids = bad.map((k) => live[k]!.pid);
      log.error({ error, pids, log: readFrom(live[bad[0]!]!.logFile, offsets[bad[0]!]!).slice(-2000) }, 'proxy rejected the new config; last good config kept');
      throw new ProxyReloadError(`proxy did not apply the new config: ${error}`, { pids });
    } finally {
      this.delivering = false;
    }
  }

  private reloadMode(): ReloadMode {
    return this.opts.pipy?.reload ?? 'handover';
  }

  /**
   * A config made live as a hand-over: a new set of instances starts from it
   * beside `old` on the same ports (their admin ports disjoint), and once each
   * listens (the program loaded the config and opened its listeners) the
   * slots switch to it and the old set is retired in the background: SIGINT,
   * proxy/drain.js answers what is in flight, then the process ends. A new
   * instance that exits before listening rejected the config: the new set is
   * killed, config.json goes back to `previous`, and the old set, which never
   * stopped serving, keeps the last good config.
   */
  private async handOver(text: string, previous: string, old: ProxyInstance[], t0: number): Promise<DeliverResult> {
    // Bounded memory: at most MAX_DRAINING_GENERATIONS old sets drain; the
    // oldest beyond that (a burst of changes) is ended now.
    await this.limitDraining(MAX_DRAINING_GENERATIONS - 1);
    this.busy = true;
    this.delivering = true;
    const next: ProxyInstance[] = [];
    const { dir } = stageCodebase(this.programDir(), this.codebaseRoot);
    try {
      // The new instances start from this file; the old ones read it only at a start or SIGHUP.
      writeConfig(dir, text);
      // Admin ports (and so log files) of no live instance: neither the running set's nor a draining one's.
      const ports = pickAdminPorts(this.adminBase(), this.slots.length, [...old, ...this.retiring.filter(isAlive)].map((i) => i.adminPort));
      const fail = (why: string, line: string): never => {
        for (const i of next) signal(i, 'SIGKILL');
        writeConfig(dir, previous);
        this.reloadFailures += 1;
        this.lastReload = { at: new Date().toISOString(), ms: performance.now() - t0, ok: false, error: line };
        log.error({ why, error: line, new: next.map((i) => i.pid), old: old.map((i) => i.pid) }, 'proxy rejected the new config; the running instances keep the last good one');
        throw new ProxyReloadError(`proxy did not apply the new config: ${line}`, { pids: next.map((i) => i.pid) });
      };
      try {
        for (const slot of this.slots) next.push(this.spawnInstance(slot.index, slot.threads, ports[slot.index]!));
      } catch (err) {
        fail('start', `new proxy instances could not be started: ${errorMessage(err)}`);
      }
      const deadline = Date.now() + this.o.startTimeoutMs;
      while (!next.every((i) => isAlive(i) && this.listening(i))) {
        const dead = next.find((i) => !isAlive(i));
        if (dead) fail('exited', startFailure(readFrom(dead.logFile, 0)));
        if (Date.now() > deadline) fail('timeout', `new proxy instances did not listen within ${this.o.startTimeoutMs} ms`);
        await sleep(5);
      }
      // The old instances' counters a last time, so the summed ones carry them on (metrics-sum.ts).
      if (this.metricsRead) await this.metrics(1000).catch(() => undefined);
      const now = Date.now();
      for (const slot of this.slots) {
        Object.assign(slot, { inst: next[slot.index], upSince: now, readySince: 0, livenessMisses: 0, lastProbeAt: now, killReason: undefined });
      }
      this.retiring = [...this.retiring, ...old];
      this.writeState();
      writeFileSync(this.configFile, text);
      const ms = performance.now() - t0;
      this.reloads += 1;
      this.lastReload = { at: new Date().toISOString(), ms, ok: true };
      log.info({ old: old.map((i) => i.pid), new: next.map((i) => i.pid), version: configVersion(text), ms: Math.round(ms) }, 'config live in new proxy instances; draining the old ones');
      const version = configVersion(previous);
      const generation = {
        insts: old,
        done: Promise.all(old.map((i) => this.retire(i, this.o.drainMs, { version }))).then(() => {
          this.drainingGenerations = this.drainingGenerations.filter((g) => g !== generation);
          for (const i of old) this.drainedIds.delete(instanceId(i));
          this.retiring = this.retiring.filter((r) => !old.includes(r));
          if (!this.stopped) this.writeState();
        }),
      };
      this.drainingGenerations.push(generation);
      return { changed: true, applied: true, ms };
    } finally {
      this.busy = false;
      this.delivering = false;
    }
  }

  /**
   * End the drains of the oldest generations until at most `keep` remain,
   * and wait until they are gone: a second SIGINT is Pipy's forced shutdown,
   * SIGKILL a second later.
   */
  private async limitDraining(keep: number): Promise<void> {
    while (this.drainingGenerations.length > keep) {
      const oldest = this.drainingGenerations[0]!;
      const left = oldest.insts.filter(isAlive);
      // Drained ones only linger in Pipy's shutdown: SIGKILL ends them without waiting.
      for (const i of left) if (this.drainedIds.has(instanceId(i))) signal(i, 'SIGKILL');
      if (left.some((i) => !this.drainedIds.has(instanceId(i)))) {
        log.warn({ pids: left.map((i) => i.pid), draining: this.drainingGenerations.length }, 'new config while older proxy instances still drain; ending the oldest drain now');
        for (const i of left) signal(i, 'SIGINT');
        const forced = Date.now() + 1000;
        while (left.some(isAlive) && Date.now() < forced) await sleep(10);
        for (const i of left) if (isAlive(i)) signal(i, 'SIGKILL');
      }
      await oldest.done;
      for (const i of oldest.insts) this.drainedIds.delete(instanceId(i));
    }
  }

  /** Each instance's reload outcome: ok, failed (its log says so), pending (no ack in time), gone (died meanwhile). */
  private async awaitAcks(insts: ProxyInstance[], offsets: number[], timeoutMs: number, t0: number): Promise<Array<ReloadOutcome>> {
    const out: ReloadOutcome[] = insts.map(() => ({ state: 'pending' }));
    for (;;) {
      let waiting = false;
      insts.forEach((inst, k) => {
        if (out[k]!.state !== 'pending') return;
        const ack = parseReloadAck(readFrom(inst.logFile, offsets[k]!), inst.threads);
        if (ack.state !== 'pending') out[k] = ack;
        else if (!isAlive(inst)) out[k] = { state: 'gone' };
        else waiting = true;
      });
      if (!waiting || performance.now() - t0 > timeoutMs) return out;
      await sleep(2);
    }
  }

  /**
   * tcp_migrate_req is per network namespace: written from inside the proxy's
   * (/proc/sys/net shows the writer's namespace). A plain file write, so the
   * image needs no sysctl binary (procps); Linux 5.14+, older kernels lack it.
   */
  private async enableRequestMigration(): Promise<void> {
    const file = '/proc/sys/net/ipv4/tcp_migrate_req';
    let err: string | undefined;
    if (this.opts.netns) {
      const r = await run('nsenter', [`--net=/run/netns/${this.opts.netns}`, '--', '/bin/sh', '-c', `echo 1 > ${file}`], { allowFail: true });
      if (r.code !== 0) err = r.stderr.trim();
    } else {
      try {
        writeFileSync(file, '1\n');
      } catch (e) {
        err = errorMessage(e);
      }
    }
    if (err !== undefined) log.warn({ err }, 'cannot enable tcp_migrate_req; connections queued on a closing listener may be reset');
  }

  /** proxy.json: the slots' instances in order, and (during an upgrade or a hand-over) the old ones being retired. */
  private writeState(retiring: ProxyInstance[] = []): void {
    const record: AdoptionRecord = { instances: this.slots.flatMap((s) => (s.inst ? [s.inst] : [])), retiring: [...this.retiring, ...retiring] };
    const tmp = `${this.stateFile}.tmp`;
    writeFileSync(tmp, JSON.stringify(record) + '\n');
    renameSync(tmp, this.stateFile);
  }

  private readState(): AdoptionRecord {
    try {
      return parseAdoptionRecord(readFileSync(this.stateFile, 'utf8'));
    } catch {
      return { instances: [], retiring: [] };
    }
  }

  /** Second guard beside the start time: a proxy that left our cgroup is not ours to signal. */
  private inOurCgroup(pid: number): boolean {
    if (!this.opts.cgroup) return true;
    try {
      const cg = readFileSync(`/proc/${pid}/cgroup`, 'utf8');
      return cg.split('\n').some((l) => l.startsWith('0::') && this.opts.cgroup!.endsWith(l.slice(3)));
    } catch {
      return false;
    }
  }
}

type ReloadOutcome = { state: 'pending' } | { state: 'ok' } | { state: 'failed'; line: string } | { state: 'gone' };

const instanceId = (i: ProxyInstance): string => `${i.pid}:${i.startTime}`;

/**
 * Old instance sets a burst of config changes may leave draining at once
 * (each is gone after drainMs at the latest; most within proxy/drain.js's
 * 2 s for idle keep-alive connections): three, so the changes of one event
 * (the lab's "pods not ready" makes 3-4 within a second under load) do not
 * end a drain that still holds a client's idle connection, while memory
 * stays bounded at four sets.
 */
const MAX_DRAINING_GENERATIONS = 3;

function signal(inst: ProxyInstance, sig: NodeJS.Signals): void {
  try {
    process.kill(inst.pid, sig);
  } catch {
    // gone: its reload outcome is "gone"
  }
}

function fileSize(file: string): number {
  try {
    return statSync(file).size;
  } catch {
    return 0;
  }
}

function readFrom(file: string, offset: number): string {
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch {
    return '';
  }
  try {
    const size = statSync(file).size;
    if (size <= offset) return '';
    const buf = Buffer.alloc(size - offset);
    readSync(fd, buf, 0, buf.length, offset);
    return buf.toString('utf8');
  } finally {
    closeSync(fd);
  }
}
