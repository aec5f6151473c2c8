import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FsmNodeError, errorMessage } from '../errors.js';
import { run } from '../util/exec.js';
import { logger } from '../util/log.js';
import { packageRoot } from '../util/paths.js';
import { ENTRY_FILE, pruneCodebases, stageCodebase, writeConfig } from './codebase.js';
import { adminGet, listeningPorts, parseReloadAck, probeAdmin, processStartTime } from './health.js';
import { findPipy, nodeCpus, pipyArgs, pipyVersion, threadsFor } from './pipy.js';

const log = logger('proxy');

/**
 * Keeps the node's shared proxy running. The proxy is started detached, in its
 * own cgroup (so the eBPF dataplane never re-captures it), optionally as its
 * own uid, and in the lab in the node's network namespace; what runs is
 * recorded in <stateDir>/proxy.json. A restarted agent adopts a live proxy
 * instead of starting a second one, so agent restarts never interrupt traffic;
 * an adopted proxy of another binary or program version is replaced hitlessly
 * (upgrade: new instance beside the old on the same ports, then drain the old).
 *
 * A dead or hung proxy is restarted with exponential backoff and jitter; N
 * crashes within a window are a crash loop (status, counter, log) handled by
 * the failure policy: fail-closed keeps interception (connections fail until
 * the proxy is back), fail-open asks the agent to stop redirecting through
 * onInterception(false) and to resume with onInterception(true) once the proxy
 * has been ready for recoverAfterMs.
 *
 * Config delivery (deliver): write <codebase>/config.json atomically, SIGHUP,
 * and wait for Pipy's own per-thread reload log lines. Pipy swaps programs only
 * when every thread loaded the new one and keeps its listening sockets, so a
 * change drops no connection; a config the program rejects is rolled back on
 * disk and reported, the running proxy keeps the last good one. See docs/proxy.md.
 */

export type FailurePolicy = 'fail-closed' | 'fail-open';

export interface PipySettings {
  /** Pipy binary; default PIPY_BIN, then pipy on PATH. */
  bin?: string;
  /** Directory holding the Pipy program (main.js ...); default <package>/proxy. */
  programDir?: string;
  /** Admin API port on 127.0.0.1; an upgrade's second instance uses port+1. Default 6060. */
  adminPort?: number;
  /** Worker threads; default one per CPU up to threadCap. */
  threads?: number;
  /** Upper bound on threads (small boards). Default 4. */
  threadCap?: number;
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
  /** SIGINT grace before SIGKILL when stopping or retiring an instance. Default 10 s. */
  drainMs?: number;
  /**
   * Before an upgrade, set net.ipv4.tcp_migrate_req=1 in the proxy's network
   * namespace: connections still in the old listener's accept queue when it
   * closes move to the new instance's listener instead of being reset. In
   * production that namespace is the node's. Default true.
   */
  migrateRequests?: boolean;
  /** Extra environment for the proxy process. */
  env?: Record<string, string>;
  /** config.json before any deliver() (when no last good one is stored). */
  initialConfig?: object;
  /** Jitter source (tests). */
  random?: () => number;
}

/** What runs, as recorded in proxy.json (the adoption record). */
export interface ProxyInstance {
  pid: number;
  /** /proc/<pid>/stat start time: pid reuse cannot pass for our proxy. */
  startTime: string;
  kind: 'passthrough' | 'pipy';
  bin: string;
  version: string;
  programHash?: string;
  codebase?: string;
  adminPort?: number;
  threads: number;
  logFile: string;
  startedAt: string;
}

export interface ProxyStatus {
  kind: string;
  pid: number | undefined;
  up: boolean;
  listening: boolean;
  restarts: number;
  adopted: boolean;
  version?: string;
  threads?: number;
  crashes: number;
  crashLoop: boolean;
  crashLoopsDetected: number;
  failurePolicy: FailurePolicy;
  /** What the agent should do: false only under fail-open while the proxy is unavailable. */
  interceptionWanted: boolean;
  reloads: number;
  reloadFailures: number;
  lastReload?: { at: string; ms: number; ok: boolean; error?: string };
  upgrades: number;
  lastExit?: string;
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

export class ProxySupervisor {
  private current: ProxyInstance | undefined;
  private restarts = 0;
  private adopted = false;
  private timer: NodeJS.Timeout | undefined;
  private nextStartAt = 0;
  private consecutiveCrashes = 0;
  private crashTimes: number[] = [];
  private crashes = 0;
  private crashLoop = false;
  private crashLoopsDetected = 0;
  private interceptionWanted = true;
  private lastExit: string | undefined;
  private killReason: string | undefined;
  private upSince = 0;
  private readySince = 0;
  private livenessMisses = 0;
  private lastProbeAt = 0;
  private probing = false;
  private busy = false;
  private stopped = false;
  private reloads = 0;
  private reloadFailures = 0;
  private upgrades = 0;
  private lastReload: ProxyStatus['lastReload'];
  private delivery: Promise<unknown> = Promise.resolve();
  private pipyBin: string | undefined;
  private pipyVersionText: string | undefined;
  private threads = 1;
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
  }

  /** Fail-open hook: called with false when the agent should stop redirecting, true when it may again. */
  onInterception(fn: (wanted: boolean, reason: string) => void): void {
    this.listeners.push(fn);
  }

  /**
   * Adopt a running proxy or start one; then watch it. An adopted proxy of
   * another kind, binary version or program is upgraded in the background.
   */
  async start(): Promise<void> {
    mkdirSync(this.opts.stateDir, { recursive: true });
    this.stopped = false;
    if (this.opts.kind === 'pipy') {
      this.pipyBin = this.opts.pipy?.bin ?? findPipy();
      this.pipyVersionText = await pipyVersion(this.pipyBin);
      this.threads = this.opts.pipy?.threads ?? threadsFor(await nodeCpus(), this.opts.pipy?.threadCap ?? 4);
    }
    const found = this.readState();
    if (found && isAlive(found) && this.inOurCgroup(found.pid)) {
      this.current = found;
      this.adopted = true;
      this.upSince = Date.now();
      log.info({ pid: found.pid, kind: found.kind, version: found.version }, 'adopted the running proxy');
      const why = this.replaceReason(found);
      if (why) void this.upgrade(why).catch((err: unknown) => log.error({ err: errorMessage(err) }, 'upgrade of the adopted proxy failed; it keeps running'));
    } else {
      this.launch();
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
    const inst = this.current ?? this.readState();
    rmSync(this.stateFile, { force: true });
    this.current = undefined;
    if (!inst || !isAlive(inst) || !this.inOurCgroup(inst.pid)) return false;
    await this.retire(inst, graceMs);
    return true;
  }

  status(): ProxyStatus {
    const inst = this.current;
    const up = inst !== undefined && isAlive(inst);
    return {
      kind: inst?.kind ?? this.opts.kind,
      pid: inst?.pid,
      up,
      listening: up && this.listening(inst),
      restarts: this.restarts,
      adopted: this.adopted,
      ...(inst ? { version: inst.version, threads: inst.threads } : {}),
      crashes: this.crashes,
      crashLoop: this.crashLoop,
      crashLoopsDetected: this.crashLoopsDetected,
      failurePolicy: this.o.failurePolicy,
      interceptionWanted: this.interceptionWanted,
      reloads: this.reloads,
      reloadFailures: this.reloadFailures,
      ...(this.lastReload ? { lastReload: this.lastReload } : {}),
      upgrades: this.upgrades,
      ...(this.lastExit ? { lastExit: this.lastExit } : {}),
    };
  }

  /**
   * Pipy's Prometheus text from its admin API (GET /metrics), for the agent to
   * normalise and re-export; undefined for the passthrough proxy or when the
   * proxy does not answer. Crosses into the proxy's namespace when needed.
   */
  async metrics(timeoutMs = 2000): Promise<string | undefined> {
    const inst = this.current;
    if (!inst?.adminPort || !isAlive(inst)) return undefined;
    const r = await adminGet(inst.adminPort, '/metrics', timeoutMs, this.opts.netns ? `/proc/${inst.pid}/ns/net` : undefined);
    return r?.status === 200 ? r.body : undefined;
  }

  /** Ready = alive and every ready port is in LISTEN on a socket of the proxy process itself. */
  ready(): boolean {
    return this.status().listening;
  }

  /** Resolves when ready, rejects after the timeout (tests, benchmarks, upgrade). */
  async waitReady(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.ready()) {
      if (Date.now() > deadline) throw new FsmNodeError('FSMN_ERR_PROXY_NOT_READY', `proxy not ready within ${timeoutMs} ms`, { details: { status: this.status() } });
      await sleep(10);
    }
  }

  /**
   * Hand the proxy a new config.json and make it live. Calls are serialised;
   * an unchanged config is a no-op. Rejects with ProxyReloadError when Pipy
   * could not load it: the file is rolled back and the proxy keeps running the
   * last good config.
   */
  deliver(config: object, timeoutMs = 5000): Promise<DeliverResult> {
    const run = this.delivery.then(() => this.deliverNow(JSON.stringify(config, null, 1) + '\n', timeoutMs));
    this.delivery = run.catch(() => undefined);
    return run;
  }

  /**
   * Replace the running instance without a failed connection: start the new
   * one (current binary and program) beside it on the same ports
   * (--reuse-port), wait until it listens, record it, then SIGINT the old one
   * so it stops accepting and drains.
   */
  upgrade(reason = 'requested'): Promise<void> {
    // In the delivery queue: a config delivered meanwhile reaches the new instance, not the retiring one.
    const run = this.delivery.then(() => this.upgradeNow(reason));
    this.delivery = run.catch(() => undefined);
    return run;
  }

  private async upgradeNow(reason: string): Promise<void> {
    this.busy = true;
    try {
      const old = this.current;
      if (old && (old.kind !== 'pipy' || this.opts.kind !== 'pipy')) {
        // The passthrough proxy cannot share its port (no SO_REUSEPORT in Node 20): stop, then start.
        log.warn({ reason, from: old.kind, to: this.opts.kind }, 'replacing the proxy with a short listening gap (kind change)');
        await this.retire(old, this.o.drainMs);
        this.launch();
        await this.waitReady(this.o.startTimeoutMs);
        this.upgrades += 1;
        return;
      }
      if (old && this.opts.migrateRequests !== false) await enableRequestMigration(old.pid);
      const base = this.opts.pipy?.adminPort ?? 6060;
      const next = this.launch({ adminPort: old?.adminPort === base ? base + 1 : base, keepPrevious: true });
      const deadline = Date.now() + this.o.startTimeoutMs;
      while (!(isAlive(next) && this.listening(next))) {
        if (!isAlive(next) || Date.now() > deadline) {
          if (isAlive(next)) process.kill(next.pid, 'SIGKILL');
          this.current = old;
          if (old) this.writeState(old);
          throw new FsmNodeError('FSMN_ERR_PROXY_UPGRADE', `new proxy instance (pid ${next.pid}) did not become ready; the old one (pid ${old?.pid}) keeps serving`, { details: { reason } });
        }
        await sleep(10);
      }
      log.info({ reason, old: old?.pid, new: next.pid, version: next.version }, 'new proxy instance ready; draining the old one');
      if (old && isAlive(old)) await this.retire(old, this.o.drainMs);
      if (next.codebase) pruneCodebases(this.codebaseRoot, [next.codebase]);
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
    const inst = this.current;
    if (inst && isAlive(inst)) {
      this.watchRunning(inst, now);
      return;
    }
    if (inst) this.recordCrash(`proxy pid ${inst.pid} exited`, now);
    if (now >= this.nextStartAt) {
      this.restarts += 1;
      try {
        this.launch();
      } catch (err) {
        this.recordCrash(`proxy could not be started: ${errorMessage(err)}`, now);
      }
    }
  }

  private watchRunning(inst: ProxyInstance, now: number): void {
    const ready = this.listening(inst);
    if (!ready) {
      this.readySince = 0;
      if (now - this.upSince > this.o.startTimeoutMs) this.kill(inst, `not listening on ${this.readyPorts().join(', ')} ${this.o.startTimeoutMs} ms after start`);
      return;
    }
    if (this.readySince === 0) this.readySince = now;
    if (now - this.upSince >= this.o.stableMs) this.consecutiveCrashes = 0;
    if (this.crashLoop && now - this.readySince >= this.o.recoverAfterMs) {
      this.crashLoop = false;
      log.info({ pid: inst.pid }, 'proxy recovered from the crash loop');
      this.emitInterception(true, 'proxy recovered');
    }
    if (inst.adminPort !== undefined && !this.probing && now - this.lastProbeAt >= this.o.liveness.intervalMs) void this.probe(inst);
  }

  private async probe(inst: ProxyInstance): Promise<void> {
    this.probing = true;
    this.lastProbeAt = Date.now();
    try {
      const ok = await probeAdmin(inst.adminPort!, this.o.liveness.timeoutMs, this.opts.netns ? `/proc/${inst.pid}/ns/net` : undefined);
      if (this.current !== inst) return;
      this.livenessMisses = ok ? 0 : this.livenessMisses + 1;
      if (this.livenessMisses >= this.o.liveness.failures) this.kill(inst, `hung: admin /status unanswered ${this.livenessMisses} times`);
    } finally {
      this.probing = false;
    }
  }

  /** A hung or stuck proxy: SIGKILL; the next check sees it dead and restarts it as after a crash. */
  private kill(inst: ProxyInstance, why: string): void {
    log.error({ pid: inst.pid, why }, 'killing the proxy');
    this.killReason = why;
    this.livenessMisses = 0;
    try {
      process.kill(inst.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }

  private recordCrash(what: string, now: number): void {
    this.lastExit = this.killReason ? `${what}: killed, ${this.killReason}` : what;
    this.killReason = undefined;
    this.current = undefined;
    this.crashes += 1;
    this.consecutiveCrashes += 1;
    this.readySince = 0;
    const { recent, loop } = crashWindow([...this.crashTimes, now], now, this.o.crashLoop);
    this.crashTimes = recent;
    const delay = backoffDelay(this.consecutiveCrashes, this.o.backoff, this.opts.random);
    this.nextStartAt = now + delay;
    // Restart on time rather than on the next poll.
    setTimeout(() => this.check(), delay + 1).unref();
    log.warn({ crashes: this.consecutiveCrashes, backoffMs: Math.round(delay), lastExit: this.lastExit }, 'proxy down; restarting after backoff');
    if (loop && !this.crashLoop) {
      this.crashLoop = true;
      this.crashLoopsDetected += 1;
      const reason = `proxy crash loop: ${recent.length} exits within ${this.o.crashLoop.windowMs} ms (last: ${this.lastExit})`;
      log.error({ policy: this.o.failurePolicy, crashes: recent.length }, reason);
      if (this.o.failurePolicy === 'fail-open') this.emitInterception(false, reason);
    }
  }

  private readyPorts(): number[] {
    return this.opts.readyPorts ?? (this.opts.kind === 'pipy' ? [this.opts.outboundPort, this.opts.inboundPort] : [this.opts.outboundPort]);
  }

  private listening(inst: ProxyInstance): boolean {
    const want = this.readyPorts();
    return listeningPorts(inst.pid, want).size === new Set(want).size;
  }

  /** Why an adopted instance must be replaced, or undefined when it is what we would start. */
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

  private command(adminPort: number): { argv: string[]; inst: Omit<ProxyInstance, 'pid' | 'startTime' | 'logFile' | 'startedAt'> } {
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
      argv: [this.pipyBin!, ...pipyArgs({ entry: join(dir, ENTRY_FILE), threads: this.threads, adminPort })],
      inst: { kind: 'pipy', bin: this.pipyBin!, version: this.pipyVersionText!, programHash: hash, codebase: dir, adminPort, threads: this.threads },
    };
  }

  private launch(o: { adminPort?: number; keepPrevious?: boolean } = {}): ProxyInstance {
    const { argv, inst } = this.command(o.adminPort ?? this.opts.pipy?.adminPort ?? 6060);
    if (inst.codebase) writeConfig(inst.codebase, this.startConfig());
    const logFile = join(this.opts.stateDir, 'proxy.log');
    // The old log is kept once; an instance being replaced keeps writing to its (renamed) file.
    if (existsSync(logFile)) renameSync(logFile, `${logFile}.1`);
    const out = openSync(logFile, 'a');
    const full = launchArgv({ ...(this.opts.cgroup ? { cgroup: this.opts.cgroup } : {}), ...(this.opts.netns ? { netnsPath: `/run/netns/${this.opts.netns}` } : {}), ...(this.opts.runAs ? { runAs: this.opts.runAs } : {}), argv });
    const child = spawn(full[0]!, full.slice(1), { detached: true, stdio: ['ignore', out, out], env: { ...process.env, ...this.opts.env } });
    closeSync(out);
    child.on('error', (err) => log.error({ err: err.message }, 'proxy spawn failed'));
    // Our own child (not an adopted one): notice its exit at once instead of at the next poll.
    child.once('exit', () => setImmediate(() => this.check()));
    child.unref();
    const pid = child.pid;
    const startTime = pid === undefined ? undefined : processStartTime(pid);
    if (pid === undefined || startTime === undefined) throw new FsmNodeError('FSMN_ERR_PROXY', `proxy did not start: ${full.join(' ')}`);
    const next: ProxyInstance = { ...inst, pid, startTime, logFile, startedAt: new Date().toISOString() };
    if (!o.keepPrevious) this.adopted = false;
    this.current = next;
    this.upSince = Date.now();
    this.readySince = 0;
    this.livenessMisses = 0;
    this.lastProbeAt = Date.now();
    this.writeState(next);
    log.info({ pid, kind: next.kind, version: next.version, threads: next.threads, netns: this.opts.netns }, 'started the proxy');
    return next;
  }

  /** SIGINT (stop accepting, drain), SIGKILL after the grace; waits until the process is gone. */
  private async retire(inst: ProxyInstance, graceMs: number): Promise<void> {
    try {
      process.kill(inst.pid, 'SIGINT');
    } catch {
      return;
    }
    const deadline = Date.now() + graceMs;
    while (isAlive(inst) && Date.now() < deadline) await sleep(20);
    if (isAlive(inst)) {
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
    const inst = this.current;
    if (this.opts.kind !== 'pipy' || !inst?.codebase || !isAlive(inst)) {
      // Not running (or being replaced): the next instance starts from this file.
      writeFileSync(this.configFile, text);
      return { changed: true, applied: false, ms: performance.now() - t0 };
    }
    const offset = statSync(inst.logFile).size;
    writeConfig(inst.codebase, text);
    process.kill(inst.pid, 'SIGHUP');
    for (;;) {
      const ack = parseReloadAck(readFrom(inst.logFile, offset), inst.threads);
      const ms = performance.now() - t0;
      if (ack.state === 'ok') {
        writeFileSync(this.configFile, text);
        this.reloads += 1;
        this.lastReload = { at: new Date().toISOString(), ms, ok: true };
        return { changed: true, applied: true, ms };
      }
      if (!isAlive(inst) && ack.state === 'pending') {
        // It died for its own reasons (the check loop restarts it): the next instance starts from this config.
        writeFileSync(this.configFile, text);
        return { changed: true, applied: false, ms };
      }
      if (ack.state === 'failed' || ms > timeoutMs) {
        writeConfig(inst.codebase, previous ?? this.startConfig());
        this.reloadFailures += 1;
        const error = ack.state === 'failed' ? ack.line : `no reload ack within ${timeoutMs} ms`;
        this.lastReload = { at: new Date().toISOString(), ms, ok: false, error };
        log.error({ error, log: readFrom(inst.logFile, offset).slice(-2000) }, 'proxy rejected the new config; last good config kept');
        throw new ProxyReloadError(`proxy did not apply the new config: ${error}`, { pid: inst.pid });
      }
      await sleep(2);
    }
  }

  private writeState(inst: ProxyInstance): void {
    const tmp = `${this.stateFile}.tmp`;
    writeFileSync(tmp, JSON.stringify(inst) + '\n');
    renameSync(tmp, this.stateFile);
  }

  private readState(): ProxyInstance | undefined {
    try {
      const s = JSON.parse(readFileSync(this.stateFile, 'utf8')) as ProxyInstance;
      return Number.isInteger(s.pid) && s.pid > 0 && typeof s.startTime === 'string' ? s : undefined;
    } catch {
      return undefined;
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

/** tcp_migrate_req is per network namespace: set it from inside the proxy's (Linux 5.14+; older kernels just lack it). */
async function enableRequestMigration(pid: number): Promise<void> {
  const r = await run('nsenter', [`--net=/proc/${pid}/ns/net`, '--', 'sysctl', '-qw', 'net.ipv4.tcp_migrate_req=1'], { allowFail: true });
  if (r.code !== 0) log.warn({ err: r.stderr.trim() }, 'cannot enable tcp_migrate_req; connections queued on the old listener may be reset during the upgrade');
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
