import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { FsmNodeError } from '../errors.js';
import { run } from '../util/exec.js';
import type { ExecResult, ExecOptions, RunOptions } from './topology.js';

/**
 * Real-TCP probes for topologies: a one-file echo server and client run with
 * this very Node binary inside pods (or nodes), used by the topology tests
 * and `fsm-node lab selfcheck`.
 */

/** Anything processes can be started in: a TopoPod or a TopoNode. */
export interface ExecTarget {
  exec(cmd: string, args: string[], opts?: ExecOptions): ChildProcess;
  run(cmd: string, args: string[], opts?: RunOptions): Promise<ExecResult>;
}

// Answers every connection with "<name> <peer address> <first chunk>" and
// closes. Prints "listening" once bound, so a caller knows when to connect.
const ECHO_SERVER = `
const net = require('node:net');
const [name, port] = process.argv.slice(1);
net.createServer((s) => {
  s.once('data', (d) => s.end(name + ' ' + s.remoteAddress + ' ' + d.toString()));
  s.on('error', () => {});
}).listen(Number(port), '0.0.0.0', () => console.log('listening'));
`;

const ECHO_CLIENT = `
const net = require('node:net');
const [host, port, payload] = process.argv.slice(1);
const s = net.connect(Number(port), host, () => s.write(payload));
let got = '';
s.setTimeout(5000, () => { console.error('timeout talking to ' + host + ':' + port); process.exit(2); });
s.on('data', (d) => (got += d));
s.on('end', () => { process.stdout.write(got); process.exit(0); });
s.on('error', (e) => { console.error(e.message); process.exit(1); });
`;

export class ProbeError extends FsmNodeError {
  constructor(message: string, details?: Record<string, unknown>) {
    super('FSMN_ERR_PROBE', message, details === undefined ? undefined : { details });
  }
}

export interface EchoServer {
  child: ChildProcess;
  pid: number;
  stop(): Promise<void>;
}

/** Start the echo server in a pod or node and wait until it listens. */
export async function startEchoServer(target: ExecTarget, name: string, port: number): Promise<EchoServer> {
  const child = target.exec(process.execPath, ['-e', ECHO_SERVER, name, String(port)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  await new Promise<void>((resolve, reject) => {
    let out = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      if (out.includes('listening')) resolve();
    });
    child.once('error', reject);
    child.once('exit', (code) => reject(new ProbeError(`echo server ${name} exited (code ${code}) before listening: ${stderr.trim()}`, { name, port })));
  });
  const pid = child.pid;
  if (pid === undefined) throw new ProbeError(`echo server ${name} has no pid`);
  return {
    child,
    pid,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = once(child, 'exit');
      child.kill('SIGTERM');
      await exited;
    },
  };
}

/** Connect from `from` to host:port, send `payload`, return the echo server's answer. */
export async function tcpProbe(from: ExecTarget, host: string, port: number, payload: string): Promise<string> {
  const res = await from.run(process.execPath, ['-e', ECHO_CLIENT, host, String(port), payload]);
  if (res.code !== 0) {
    throw new ProbeError(`TCP probe to ${host}:${port} failed (exit ${res.code}): ${res.stderr.trim()}`, { host, port });
  }
  return res.stdout;
}

/**
 * The host network namespace's links, addresses, routes and iptables rules,
 * normalised (no counters, timestamps or lifetimes that count down). Read-only; compared before and
 * after to prove a topology leaves the host alone.
 */
export async function hostNetworkSnapshot(): Promise<string> {
  const parts: string[] = [];
  for (const [cmd, args] of [
    ['ip', ['-o', 'link', 'show']],
    ['ip', ['-o', 'addr', 'show']],
    ['ip', ['route', 'show', 'table', 'all']],
    ['iptables-save', []],
  ] as const) {
    const res = await run(cmd, args, { allowFail: true });
    parts.push(`## ${cmd} ${args.join(' ')} (exit ${res.code})`, normaliseSnapshot(res.stdout));
  }
  return parts.join('\n');
}

export function normaliseSnapshot(text: string): string {
  return text
    .split('\n')
    .filter((l) => !l.startsWith('#'))
    .map((l) => l.replace(/\[\d+:\d+\]/g, '[]').replace(/\b\d+sec\b/g, 'Nsec'))
    .join('\n');
}
