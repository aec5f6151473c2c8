import type { ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { once } from 'node:events';
import type { ExecTarget } from '../../src/lab/net-probe.js';

/**
 * Real TCP traffic for the dataplane tests, run with this Node binary inside
 * pods: an echo server that returns every byte (and says who it saw as the
 * peer), a client that sends a payload and checks it comes back intact, and
 * a load loop that keeps connections going and counts failures.
 */

// Echo server: first line back is "<name> <peer address>\n", then every byte
// received, then FIN after the client's FIN. Prints "listening" when bound.
const ECHO_SERVER = `
const net = require('node:net');
const [name, port] = process.argv.slice(1);
net.createServer({ allowHalfOpen: true }, (s) => {
  s.write(name + ' ' + s.remoteAddress + '\\n');
  s.pipe(s);
  s.on('error', () => {});
}).listen(Number(port), '0.0.0.0', () => console.log('listening'));
`;

// Client: sends <bytes> deterministic pseudo-random bytes in chunks, half-closes,
// reads everything back, prints one JSON line. Exit 0 whatever the outcome.
const ECHO_CLIENT = `
const net = require('node:net');
const crypto = require('node:crypto');
const [host, port, bytes, timeoutMs] = process.argv.slice(1);
const payload = crypto.createHash('sha256').update('fsm').digest();
const data = Buffer.alloc(Number(bytes));
for (let i = 0; i < data.length; i += 32) payload.copy(data, i, 0, Math.min(32, data.length - i));
for (let i = 0; i < data.length; i++) data[i] ^= (i * 7) & 255;
const done = (r) => { process.stdout.write(JSON.stringify(r) + '\\n'); process.exit(0); };
const s = net.connect({ host, port: Number(port), allowHalfOpen: true });
const chunks = [];
s.setTimeout(Number(timeoutMs), () => done({ outcome: 'timeout' }));
s.on('connect', () => {
  let off = 0;
  const step = 65536;
  const pump = () => {
    while (off < data.length) {
      const ok = s.write(data.subarray(off, off + step));
      off += step;
      if (!ok) return s.once('drain', pump);
    }
    s.end();
  };
  pump();
});
s.on('data', (d) => chunks.push(d));
s.on('end', () => {
  const all = Buffer.concat(chunks);
  const nl = all.indexOf(10);
  const banner = all.subarray(0, nl).toString();
  const back = all.subarray(nl + 1);
  done({ outcome: 'ok', banner, intact: back.equals(data), sent: data.length, received: back.length, local: s.localAddress + ':' + s.localPort });
});
s.on('error', (e) => done({ outcome: 'error', code: e.code, message: e.message }));
`;

// Load loop: connections one after another until SIGTERM, each a short echo;
// prints "." per finished connection and a JSON summary line on SIGTERM.
const LOAD_CLIENT = `
const net = require('node:net');
const [host, port] = process.argv.slice(1);
let ok = 0, failed = 0, stopping = false;
const errors = [];
const one = () => new Promise((resolve) => {
  const s = net.connect({ host, port: Number(port), allowHalfOpen: true });
  let got = '';
  s.setTimeout(10000, () => { s.destroy(new Error('timeout')); });
  s.on('connect', () => s.end('ping'));
  s.on('data', (d) => (got += d));
  s.on('end', () => { if (got.endsWith('ping')) ok++; else { failed++; errors.push('bad reply ' + JSON.stringify(got)); } resolve(); });
  s.on('error', (e) => { failed++; errors.push(e.code || e.message); resolve(); });
});
(async () => {
  while (!stopping) { await one(); process.stdout.write('.'); }
  process.stdout.write('\\n' + JSON.stringify({ ok, failed, errors: errors.slice(0, 5) }) + '\\n');
  process.exit(0);
})();
process.on('SIGTERM', () => { stopping = true; });
console.error('started');
`;

export interface EchoResult {
  outcome: 'ok' | 'error' | 'timeout';
  banner?: string;
  intact?: boolean;
  sent?: number;
  received?: number;
  local?: string;
  code?: string;
  message?: string;
}

export interface Server {
  child: ChildProcess;
  stop(): Promise<void>;
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  child.kill('SIGTERM');
  await exited;
}

/** Wait for `marker` on the child's stdout (or stderr); rejects if it exits first. */
export function waitForOutput(child: ChildProcess, marker: string, stream: 'stdout' | 'stderr' = 'stdout'): Promise<string> {
  return new Promise((resolve, reject) => {
    let out = '';
    let err = '';
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (err += d));
    const src = stream === 'stdout' ? child.stdout : child.stderr;
    src?.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      if (out.includes(marker)) resolve(out);
    });
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`process exited (code ${code}) before printing ${marker}: ${err.trim() || out.trim()}`)));
  });
}

export async function startEchoServer(target: ExecTarget, name: string, port: number): Promise<Server> {
  const child = target.exec(process.execPath, ['-e', ECHO_SERVER, name, String(port)], { stdio: ['ignore', 'pipe', 'pipe'] });
  await waitForOutput(child, 'listening');
  return { child, stop: () => stopChild(child) };
}

/** One echo exchange of `bytes` bytes; never throws for network outcomes. */
export async function echo(target: ExecTarget, host: string, port: number, bytes = 1024, timeoutMs = 5000): Promise<EchoResult> {
  const r = await target.run(process.execPath, ['-e', ECHO_CLIENT, host, String(port), String(bytes), String(timeoutMs)]);
  const line = r.stdout.trim().split('\n').pop() ?? '';
  try {
    return JSON.parse(line) as EchoResult;
  } catch {
    throw new Error(`echo client printed no result (exit ${r.code}): ${r.stderr.trim() || r.stdout.trim()}`);
  }
}

export interface LoadSummary {
  ok: number;
  failed: number;
  errors: string[];
}

export interface Load {
  /** Resolves once `n` more connections have finished (ok or not) since the call. */
  progress(n: number): Promise<void>;
  stop(): Promise<LoadSummary>;
}

/** Connections one after another against an echo server until stop(). */
export async function startLoad(target: ExecTarget, host: string, port: number): Promise<Load> {
  const child = target.exec(process.execPath, ['-e', LOAD_CLIENT, host, String(port)], { stdio: ['ignore', 'pipe', 'pipe'] });
  await waitForOutput(child, 'started', 'stderr');
  let out = '';
  let done = 0;
  const waiters: Array<{ at: number; resolve: () => void }> = [];
  child.stdout?.setEncoding('utf8').on('data', (d: string) => {
    out += d;
    done += [...d].filter((c) => c === '.').length;
    for (const w of waiters.filter((x) => done >= x.at)) {
      waiters.splice(waiters.indexOf(w), 1);
      w.resolve();
    }
  });
  return {
    progress(n) {
      return new Promise((resolve, reject) => {
        waiters.push({ at: done + n, resolve });
        child.once('exit', () => reject(new Error('load client exited')));
      });
    },
    async stop() {
      const exited = once(child, 'exit');
      child.kill('SIGTERM');
      await exited;
      return JSON.parse(out.trim().split('\n').pop() ?? '{}') as LoadSummary;
    },
  };
}

const tsRegister = fileURLToPath(new URL('./ts-register.mjs', import.meta.url));
const labEchoServer = fileURLToPath(new URL('../../src/lab/echo-server.ts', import.meta.url));

/** The lab's HTTP echo server (src/lab/echo-server.ts) in a pod, answering as `name`; resolves once it listens. */
export async function startLabEchoServer(target: ExecTarget, name: string, port: number): Promise<ChildProcess> {
  const child = target.exec(process.execPath, ['--import', tsRegister, labEchoServer, 'serve', '--name', name, '--port', String(port)], { stdio: ['ignore', 'pipe', 'pipe'] });
  await waitForOutput(child, 'listening');
  return child;
}
