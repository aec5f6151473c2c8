import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FsmNodeError } from '../errors.js';
import { logger } from '../util/log.js';
import { packageRoot } from '../util/paths.js';

const log = logger('proxy');

/**
 * Keeps the node's shared proxy running. The proxy is started detached, in its
 * own cgroup (so the eBPF dataplane never re-captures it) and, in the lab, in
 * the node's network namespace; its pid is kept in the state directory. A
 * restarted agent adopts a live proxy instead of starting a second one, so
 * agent restarts never interrupt traffic. A dead proxy is restarted with
 * exponential backoff and jitter; crash loops are counted.
 */
export interface ProxySupervisorOptions {
  kind: 'passthrough' | 'pipy';
  stateDir: string;
  cgroup: string;
  netns?: string;
  address: string;
  outboundPort: number;
  inboundPort: number;
  /** Poll interval for liveness. */
  checkIntervalMs?: number;
}

export interface ProxyStatus {
  kind: string;
  pid: number | undefined;
  up: boolean;
  listening: boolean;
  restarts: number;
  adopted: boolean;
  lastExit?: string;
}

export class ProxySupervisor {
  private pid: number | undefined;
  private restarts = 0;
  private adopted = false;
  private timer: NodeJS.Timeout | undefined;
  private nextStartAt = 0;
  private consecutiveCrashes = 0;
  private lastExit: string | undefined;
  private readonly pidFile: string;

  constructor(private readonly opts: ProxySupervisorOptions) {
    this.pidFile = join(opts.stateDir, 'proxy.pid');
  }

  /** Adopt a running proxy or start one; then watch it. */
  start(): void {
    mkdirSync(this.opts.stateDir, { recursive: true });
    const pid = this.readPid();
    if (pid !== undefined && isAlive(pid) && this.isOurs(pid)) {
      this.pid = pid;
      this.adopted = true;
      log.info({ pid }, 'adopted the running proxy');
    } else {
      this.spawnProxy();
    }
    this.timer = setInterval(() => this.check(), this.opts.checkIntervalMs ?? 500);
    this.timer.unref();
  }

  /** Stop watching; the proxy keeps running (agent restarts must not drop traffic). */
  detach(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Stop the proxy for good (cleanup, node shutdown): SIGINT to drain, SIGKILL after the grace period. */
  async stop(graceMs = 3000): Promise<boolean> {
    this.detach();
    const pid = this.pid ?? this.readPid();
    rmSync(this.pidFile, { force: true });
    if (pid === undefined || !isAlive(pid) || !this.isOurs(pid)) return false;
    process.kill(pid, 'SIGINT');
    const deadline = Date.now() + graceMs;
    while (isAlive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    if (isAlive(pid)) process.kill(pid, 'SIGKILL');
    this.pid = undefined;
    return true;
  }

  status(): ProxyStatus {
    const up = this.pid !== undefined && isAlive(this.pid);
    return {
      kind: this.opts.kind,
      pid: this.pid,
      up,
      listening: up && this.listening(),
      restarts: this.restarts,
      adopted: this.adopted,
      ...(this.lastExit ? { lastExit: this.lastExit } : {}),
    };
  }

  /** Ready = alive and its outbound listener is in LISTEN state in its network namespace. */
  ready(): boolean {
    return this.status().listening;
  }

  private check(): void {
    if (this.pid !== undefined && isAlive(this.pid)) return;
    if (this.pid !== undefined) {
      this.lastExit = `proxy pid ${this.pid} exited`;
      this.consecutiveCrashes += 1;
      const backoff = Math.min(250 * 2 ** (this.consecutiveCrashes - 1), 30_000) * (0.8 + Math.random() * 0.4);
      this.nextStartAt = Date.now() + backoff;
      log.warn({ pid: this.pid, crashes: this.consecutiveCrashes, backoffMs: Math.round(backoff) }, 'proxy exited; restarting after backoff');
      this.pid = undefined;
    }
    if (Date.now() >= this.nextStartAt) {
      this.restarts += 1;
      this.spawnProxy();
    }
  }

  private command(): string[] {
    if (this.opts.kind === 'passthrough') {
      const script = join(packageRoot(), 'dist', 'src', 'proxy', 'passthrough.js');
      if (!existsSync(script)) throw new FsmNodeError('FSMN_ERR_PROXY', `passthrough proxy not built: ${script} missing (run npm run build:ts)`);
      return [process.execPath, script, '--listen', `0.0.0.0:${this.opts.outboundPort}`, '--log', join(this.opts.stateDir, 'proxy-connections.jsonl')];
    }
    throw new FsmNodeError('FSMN_ERR_PROXY', 'the Pipy proxy program is not part of this build yet; use --proxy passthrough');
  }

  private spawnProxy(): void {
    const argv = this.command();
    const enter = this.opts.netns ? ['nsenter', `--net=/run/netns/${this.opts.netns}`, '--'] : [];
    const out = openSync(join(this.opts.stateDir, 'proxy.log'), 'a');
    // The shell joins the proxy cgroup before exec, so no socket is ever opened outside it.
    const child = spawn('/bin/sh', ['-c', 'echo $$ > "$0/cgroup.procs" && exec "$@"', this.opts.cgroup, ...enter, ...argv], {
      detached: true,
      stdio: ['ignore', out, out],
    });
    closeSync(out);
    child.unref();
    this.pid = child.pid;
    this.adopted = false;
    writeFileSync(this.pidFile, String(child.pid));
    log.info({ pid: child.pid, kind: this.opts.kind, netns: this.opts.netns }, 'started the proxy');
  }

  private readPid(): number | undefined {
    try {
      const n = Number(readFileSync(this.pidFile, 'utf8').trim());
      return Number.isInteger(n) && n > 0 ? n : undefined;
    } catch {
      return undefined;
    }
  }

  /** Guard against pid reuse: only a process in our proxy cgroup is ours. */
  private isOurs(pid: number): boolean {
    try {
      const cg = readFileSync(`/proc/${pid}/cgroup`, 'utf8');
      return cg.split('\n').some((l) => l.startsWith('0::') && this.opts.cgroup.endsWith(l.slice(3)));
    } catch {
      return false;
    }
  }

  private listening(): boolean {
    try {
      const hexPort = this.opts.outboundPort.toString(16).toUpperCase().padStart(4, '0');
      const table = readFileSync(`/proc/${this.pid}/net/tcp`, 'utf8');
      return table.split('\n').some((l) => {
        const f = l.trim().split(/\s+/);
        return f[1]?.endsWith(`:${hexPort}`) && f[3] === '0A';
      });
    } catch {
      return false;
    }
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return !readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.startsWith('Z');
  } catch {
    return false;
  }
}
