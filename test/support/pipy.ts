import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { copyFileSync, mkdirSync, readdirSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TopoNode } from '../../src/lab/topology.js';
import type { ProxyConfig } from '../../src/proxy/config.js';

/**
 * The project's Pipy program (proxy/) run for real in a topology node, the
 * way the supervisor runs it: the codebase directory is proxy/*.js plus the
 * rendered config.json, the entry is main.js, admin on 127.0.0.1:6060 in the
 * node's network namespace, the process in the node's proxy cgroup.
 */

export { pipyBinary as findPipy } from '../../src/proxy/pipy.js';
import { pipyBinary as findPipy } from '../../src/proxy/pipy.js';

export const ADMIN_PORT = 6060;
const programDir = fileURLToPath(new URL('../../proxy/', import.meta.url));

/** The one skip line a Pipy-tier file prints when there is no Pipy. */
export function pipySkipReason(): string | undefined {
  return findPipy() ? undefined : 'SKIP pipy tier: no Pipy binary (set PIPY_BIN or put pipy on PATH)';
}

/** Copy the program into `dir` and write the config next to it; returns the entry path. */
export function writeCodebase(dir: string, config: ProxyConfig): string {
  mkdirSync(dir, { recursive: true });
  for (const f of readdirSync(programDir)) if (f.endsWith('.js')) copyFileSync(join(programDir, f), join(dir, f));
  writeConfig(dir, config);
  return join(dir, 'main.js');
}

export function writeConfig(dir: string, config: ProxyConfig): void {
  writeFileSync(join(dir, 'config.json.tmp'), JSON.stringify(config));
  // rename is atomic: a reload never reads half a file.
  renameSync(join(dir, 'config.json.tmp'), join(dir, 'config.json'));
}

export interface NodeProxy {
  child: ChildProcess;
  /** Prometheus text from the proxy's admin /metrics. */
  metrics(): Promise<string>;
  /** What the proxy printed so far (stdout and stderr): its log and access records. */
  log(): string;
  /** SIGHUP: Pipy reloads the codebase from disk; established connections stay. */
  reload(): void;
  stop(): Promise<void>;
}

async function listening(node: TopoNode, port: number): Promise<boolean> {
  const r = await node.run('ss', ['-Hltn', `sport = :${port}`]);
  return r.stdout.trim() !== '';
}

export async function startNodeProxy(node: TopoNode, pipy: string, entry: string, config: ProxyConfig): Promise<NodeProxy> {
  let log = '';
  const child = node.exec(pipy, [`--admin-port=127.0.0.1:${ADMIN_PORT}`, '--log-level=warn', entry], { inProxyCgroup: true, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout?.setEncoding('utf8').on('data', (d: string) => (log += d));
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (log += d));
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`pipy exited (${child.exitCode}) in ${node.name}: ${log}`);
    if ((await listening(node, config.listen.outbound)) && (await listening(node, config.listen.inbound)) && (await listening(node, ADMIN_PORT))) break;
    if (Date.now() > deadline) throw new Error(`pipy in ${node.name} did not listen on ${config.listen.outbound}/${config.listen.inbound}: ${log}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    child,
    log: () => log,
    async metrics() {
      const r = await node.run('curl', ['-sf', `http://127.0.0.1:${ADMIN_PORT}/metrics`]);
      if (r.code !== 0) throw new Error(`metrics of ${node.name}: curl exit ${r.code} ${r.stderr}; pipy log: ${log}`);
      return r.stdout;
    },
    reload() {
      child.kill('SIGHUP');
    },
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = once(child, 'exit');
      child.kill('SIGINT');
      const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** The value of one labelled sample (labels given as a subset), 0 when absent. */
export function metricValue(text: string, name: string, labels: Record<string, string>): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`)) continue;
    const body = line.slice(name.length + 1, line.lastIndexOf('}'));
    const have = Object.fromEntries([...body.matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) sum += Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return sum;
}
