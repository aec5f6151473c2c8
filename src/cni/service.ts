import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { createConnection, createServer, type Server } from 'node:net';
import { dirname, join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { DesiredState } from '../dataplane/types.js';
import { errorMessage, FsmNodeError } from '../errors.js';
import type { NodePolicy } from '../policy/schema.js';
import { cgroup2Root } from '../util/cgroup.js';
import { logger } from '../util/log.js';
import { EnrolledStore, mergeEnrolled } from './enrolled.js';
import { handleCni, type HandlerDeps } from './handler.js';
import { ChainKeeper } from './install.js';
import { CniCode, CniError, decodeRequest, encodeAnswer, errorAnswer, PLUGIN_TYPE, type PluginConf } from './protocol.js';
import { findPodCgroup, hostSandboxFacts } from './sandbox.js';

const log = logger('cni');
const MAX_REQUEST = 4 << 20;
const SPOOL_SCAN_MS = 2000;

export interface CniSettings {
  /** Unix socket the plugin relays to. */
  socket: string;
  /** Where the plugin leaves requests while the agent is away. */
  spool: string;
  stateDir: string;
  /** fail-closed | fail-open, or auto: from the mesh (strict inbound -> fail-closed). */
  failurePolicy: 'auto' | 'fail-closed' | 'fail-open';
  /** Install and keep the chain (absent: someone else installs, e.g. the lab or tests). */
  install?: { confDirs: string[]; binDir: string };
}

/** What the CNI side needs of the agent. */
export interface CniHooks {
  policy(): NodePolicy | undefined;
  syncNow(reason: string): Promise<void>;
  enrolled(ip: string): boolean;
  notEnrolling(): string | undefined;
}

/** The plugin's entry in the chain, as the installer writes it. */
export function pluginConf(s: Pick<CniSettings, 'socket' | 'spool'>, failurePolicy: 'fail-closed' | 'fail-open'): PluginConf {
  return { type: PLUGIN_TYPE, socket: s.socket, spool: s.spool, failurePolicy };
}

/** auto: a strict mesh must not start pods unmeshed; a permissive one prefers pods that start. */
export function effectiveFailurePolicy(setting: CniSettings['failurePolicy'], policy: NodePolicy | undefined): 'fail-closed' | 'fail-open' {
  if (setting !== 'auto') return setting;
  return policy?.mesh.inbound === 'permissive' ? 'fail-open' : 'fail-closed';
}

export class CniService {
  readonly store: EnrolledStore;
  private server: Server | undefined;
  private keeper: ChainKeeper | undefined;
  private spoolTimer: NodeJS.Timeout | undefined;
  private readonly deps: HandlerDeps;
  private readonly counts = { add: 0, del: 0, check: 0, refused: 0, spoolReplayed: 0 };
  private readonly addMs: number[] = [];
  /** The policy of the last prune: a new one may name (or stop naming) pods the marks are about. */
  private prunedFor: NodePolicy | undefined;

  constructor(
    readonly settings: CniSettings,
    private readonly hooks: CniHooks,
  ) {
    this.store = new EnrolledStore(join(settings.stateDir, 'cni-enrolled'), { legacyFile: join(settings.stateDir, 'cni-enrolled.json') });
    const facts = hostSandboxFacts(cgroup2Root());
    this.deps = {
      store: this.store,
      policy: () => hooks.policy(),
      syncNow: (r) => hooks.syncNow(r),
      enrolled: (ip) => hooks.enrolled(ip),
      notEnrolling: () => hooks.notEnrolling(),
      findCgroup: (o) => findPodCgroup(o, facts),
      log,
    };
  }

  async start(): Promise<void> {
    await this.listen();
    if (this.settings.install) {
      this.keeper = new ChainKeeper({ ...this.settings.install, conf: pluginConf(this.settings, effectiveFailurePolicy(this.settings.failurePolicy, this.hooks.policy())) });
      this.keeper.start();
    }
    this.spoolTimer = setInterval(() => void this.replaySpool(), SPOOL_SCAN_MS);
    this.spoolTimer.unref();
    void this.replaySpool();
    log.info({ socket: this.settings.socket, install: this.settings.install }, 'CNI enrolment listening');
  }

  async stop(): Promise<void> {
    clearInterval(this.spoolTimer);
    this.keeper?.stop();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    rmSync(this.settings.socket, { force: true });
  }

  /**
   * Called at every sync: early pods into the desired state; the chain's
   * failure policy follows the mesh. Early pods whose sandbox is gone (a DEL
   * never heard) are looked for on full syncs (the first, after a failure,
   * the periodic one) and when the policy changes, not on every sync: that
   * costs two stats per early pod, and the syncs CNI ADDs wait for would pay
   * them a thousand times on a full node. An ADD needs no prune to be right:
   * a new sandbox displaces any stale one at its address (EnrolledStore.add).
   */
  merge(desired: DesiredState, policy: NodePolicy, opts: { full: boolean } = { full: true }): DesiredState {
    if (opts.full || policy !== this.prunedFor) {
      this.store.prune(policy, (p) => existsSync(p.netns) && existsSync(p.cgroupPath));
      this.prunedFor = policy;
      this.keeper?.update(pluginConf(this.settings, effectiveFailurePolicy(this.settings.failurePolicy, policy)));
    }
    return mergeEnrolled(desired, policy, this.store.list(), this.store.deletions());
  }

  status(): Record<string, unknown> {
    const sorted = [...this.addMs].sort((a, b) => a - b);
    const q = (p: number) => (sorted.length ? Number(sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]!.toFixed(2)) : undefined);
    return { socket: this.settings.socket, enrolledEarly: this.store.list().length, requests: this.counts, addMs: { p50: q(0.5), p99: q(0.99), n: sorted.length }, ...(this.keeper ? { chain: this.keeper.status() } : {}) };
  }

  private async listen(): Promise<void> {
    const path = this.settings.socket;
    mkdirSync(dirname(path), { recursive: true });
    if (existsSync(path)) {
      if (await socketAnswers(path)) throw new FsmNodeError('FSMN_ERR_LISTEN', `CNI socket ${path} is in use by another process (another agent on this node?)`);
      rmSync(path, { force: true }); // left by an agent that died
    }
    // Half-open: the plugin shuts down its sending side to mark the end of the request, then reads the answer.
    const server = createServer({ allowHalfOpen: true }, (conn) => {
      const chunks: Buffer[] = [];
      let size = 0;
      conn.on('data', (d: Buffer) => {
        size += d.length;
        if (size > MAX_REQUEST) conn.destroy();
        else chunks.push(d);
      });
      conn.on('error', () => undefined);
      conn.on('end', () => {
        void this.answer(Buffer.concat(chunks)).then((a) => conn.end(a));
      });
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => resolve());
    });
    chmodSync(path, 0o600);
    this.server = server;
  }

  private async answer(buf: Buffer): Promise<Buffer> {
    const started = performance.now();
    let version: string | undefined;
    try {
      const req = decodeRequest(buf);
      version = req.config.cniVersion;
      const a = await handleCni(req, this.deps);
      this.count(req.command, a.exitCode);
      if (req.command === 'ADD') {
        this.addMs.push(performance.now() - started);
        if (this.addMs.length > 1000) this.addMs.shift();
      }
      return encodeAnswer(a);
    } catch (err) {
      this.counts.refused++;
      return encodeAnswer(errorAnswer(version, err instanceof CniError ? err : new CniError(CniCode.ioFailure, 'fsm-node agent failed', errorMessage(err))));
    }
  }

  private count(command: string, exitCode: number): void {
    if (exitCode !== 0) this.counts.refused++;
    if (command === 'ADD') this.counts.add++;
    else if (command === 'DEL') this.counts.del++;
    else if (command === 'CHECK') this.counts.check++;
  }

  /**
   * Requests the plugin left while the agent was away (fail-open ADDs, DELs):
   * replayed in order of arrival once the agent has a policy; an ADD whose
   * sandbox is gone meanwhile is dropped.
   */
  private replaying = false;
  async replaySpool(): Promise<void> {
    if (this.replaying || !existsSync(this.settings.spool) || !this.hooks.policy()) return;
    this.replaying = true;
    try {
      for (const name of readdirSync(this.settings.spool).filter((n) => !n.startsWith('.')).sort()) {
        const file = join(this.settings.spool, name);
        try {
          const req = decodeRequest(readFileSync(file));
          if (req.command === 'ADD' && !existsSync(req.netns)) log.info({ containerId: req.containerId }, 'spooled CNI ADD dropped: its sandbox is gone');
          else {
            const a = await handleCni(req, this.deps);
            log.info({ command: req.command, containerId: req.containerId, args: req.args, exitCode: a.exitCode }, 'replayed a CNI request left while the agent was away');
          }
          this.counts.spoolReplayed++;
        } catch (err) {
          log.warn({ file, err: errorMessage(err) }, 'spooled CNI request dropped');
        }
        rmSync(file, { force: true });
      }
    } finally {
      this.replaying = false;
    }
  }
}

function socketAnswers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = createConnection(path);
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}
