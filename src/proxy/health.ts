import { spawn } from 'node:child_process';
import http from 'node:http';
import { closeSync, openSync, readdirSync, readFileSync, readlinkSync, readSync } from 'node:fs';

/**
 * How the supervisor sees the proxy without sharing its network namespace.
 * In the lab the agent runs in the host namespace and the proxy in the
 * node's; in production both share the node's. Everything here works in both:
 *
 * - liveness: the pid exists, is not a zombie, and its start time is the one
 *   we recorded (pid reuse cannot fool it);
 * - readiness: each wanted port has a LISTEN socket owned by THIS process
 *   (/proc/<pid>/net/tcp{,6} is the proxy's namespace; /proc/<pid>/fd maps the
 *   sockets to the process, so a second instance beside it during an upgrade
 *   is told apart);
 * - hang detection: GET /status on the loopback admin port. Same namespace:
 *   a plain HTTP request. Other namespace: a short-lived `nsenter --net`
 *   helper process (about 180 ms wall, a Node start-up), so it runs every few seconds only.
 */

/** Field 22 of /proc/<pid>/stat (clock ticks since boot); undefined when the pid is gone or a zombie. */
export function processStartTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const rest = stat.slice(stat.lastIndexOf(') ') + 2).split(' ');
    if (rest[0] === 'Z' || rest[0] === 'X') return undefined;
    return rest[19];
  } catch {
    return undefined;
  }
}

/** LISTEN sockets of a /proc/net/tcp{,6} table: inode -> local port. */
export function listenInodes(table: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of table.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f[3] !== '0A' || f[1] === undefined || f[9] === undefined) continue;
    out.set(f[9], parseInt(f[1].slice(f[1].lastIndexOf(':') + 1), 16));
  }
  return out;
}

/**
 * The head of a /proc/net/tcp{,6} table up to its last LISTEN row. The kernel
 * lists the listening hash before the established one, so reading stops at
 * the first other row: on a node under connection churn the table holds tens
 * of thousands of TIME_WAIT rows (megabytes the kernel formats on read), and
 * the supervisor checks every instance twice a second.
 */
export function readListenRows(path: string): string {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch {
    return '';
  }
  try {
    const buf = Buffer.alloc(64 * 1024);
    let text = '';
    let scanned = text.length;
    let header = true;
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, null);
      if (n <= 0) return text;
      text += buf.toString('latin1', 0, n);
      for (let nl = text.indexOf('\n', scanned); nl >= 0; nl = text.indexOf('\n', scanned)) {
        const line = text.slice(scanned, nl);
        scanned = nl + 1;
        if (header) {
          header = false;
          continue;
        }
        if (line.trim().split(/\s+/)[3] !== '0A') return text.slice(0, scanned);
      }
    }
  } catch {
    return '';
  } finally {
    closeSync(fd);
  }
}

/** The wanted ports this process itself listens on (in its own network namespace). */
export function listeningPorts(pid: number, ports: readonly number[]): Set<number> {
  const listen = new Map([...listenInodes(readListenRows(`/proc/${pid}/net/tcp`)), ...listenInodes(readListenRows(`/proc/${pid}/net/tcp6`))]);
  const wanted = new Map([...listen].filter(([, port]) => ports.includes(port)));
  const found = new Set<number>();
  if (wanted.size === 0) return found;
  let fds: string[];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return found;
  }
  for (const fd of fds) {
    let target: string;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue;
    }
    const m = /^socket:\[(\d+)\]$/.exec(target);
    const port = m ? wanted.get(m[1]!) : undefined;
    if (port !== undefined) {
      found.add(port);
      if (found.size === new Set(wanted.values()).size) break;
    }
  }
  return found;
}

// Prints the status code on the first line, then the body.
const GET_SCRIPT = `
const [port, path, timeout] = process.argv.slice(1);
const req = require('http').get({ host: '127.0.0.1', port: Number(port), path, timeout: Number(timeout) }, (res) => {
  const chunks = [];
  res.on('data', (d) => chunks.push(d));
  res.on('end', () => { process.stdout.write(res.statusCode + '\\n'); process.stdout.write(Buffer.concat(chunks)); });
});
req.on('timeout', () => { req.destroy(); process.exit(3); });
req.on('error', () => process.exit(4));
`;

export interface AdminAnswer {
  status: number;
  body: string;
}

/**
 * GET http://127.0.0.1:<port><path> on the proxy's admin API, from inside
 * `netnsPath` when given; undefined when nothing answered within the timeout.
 */
export function adminGet(port: number, path: string, timeoutMs: number, netnsPath?: string): Promise<AdminAnswer | undefined> {
  if (netnsPath) {
    return new Promise((resolve) => {
      const child = spawn('nsenter', [`--net=${netnsPath}`, '--', process.execPath, '-e', GET_SCRIPT, String(port), path, String(timeoutMs)], { stdio: ['ignore', 'pipe', 'ignore'] });
      let out = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
      const kill = setTimeout(() => child.kill('SIGKILL'), timeoutMs + 2000);
      child.on('error', () => resolve(undefined));
      child.on('close', (code) => {
        clearTimeout(kill);
        const nl = out.indexOf('\n');
        resolve(code === 0 && nl > 0 ? { status: Number(out.slice(0, nl)), body: out.slice(nl + 1) } : undefined);
      });
    });
  }
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path, timeout: timeoutMs, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      res.on('error', () => resolve(undefined));
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(undefined));
  });
}

// GETs one path on several ports at once; prints a JSON array of {status, body} or null per port.
const GET_MANY_SCRIPT = `
const [ports, path, timeout] = process.argv.slice(1);
const one = (port) => new Promise((resolve) => {
  const req = require('http').get({ host: '127.0.0.1', port: Number(port), path, timeout: Number(timeout) }, (res) => {
    const chunks = [];
    res.on('data', (d) => chunks.push(d));
    res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString('utf8') }));
    res.on('error', () => resolve(null));
  });
  req.on('timeout', () => req.destroy());
  req.on('error', () => resolve(null));
});
Promise.all(ports.split(',').map(one)).then((r) => process.stdout.write(JSON.stringify(r)));
`;

/**
 * GET the same path on several admin ports (the instances of one proxy share
 * a namespace): across namespaces one helper process for all of them, so N
 * instances cost one Node start-up per probe round, not N.
 */
export function adminGetMany(ports: readonly number[], path: string, timeoutMs: number, netnsPath?: string): Promise<Array<AdminAnswer | undefined>> {
  if (!netnsPath) return Promise.all(ports.map((p) => adminGet(p, path, timeoutMs)));
  return new Promise((resolve) => {
    const none = ports.map(() => undefined);
    const child = spawn('nsenter', [`--net=${netnsPath}`, '--', process.execPath, '-e', GET_MANY_SCRIPT, ports.join(','), path, String(timeoutMs)], { stdio: ['ignore', 'pipe', 'ignore'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    const kill = setTimeout(() => child.kill('SIGKILL'), timeoutMs + 2000);
    child.on('error', () => resolve(none));
    child.on('close', (code) => {
      clearTimeout(kill);
      try {
        const r = code === 0 ? (JSON.parse(out) as Array<AdminAnswer | null>) : [];
        resolve(ports.map((_, i) => r[i] ?? undefined));
      } catch {
        resolve(none);
      }
    });
  });
}

/** GET /status answered 200 within the timeout: the liveness probe. */
export async function probeAdmin(port: number, timeoutMs: number, netnsPath?: string): Promise<boolean> {
  return (await adminGet(port, '/status', timeoutMs, netnsPath))?.status === 200;
}

export type ReloadAck = { state: 'pending' } | { state: 'ok' } | { state: 'failed'; line: string };

/**
 * Pipy's log after a SIGHUP: every worker thread logs
 * "[restart] Codebase reloaded on thread N", or "[restart] Failed reloading
 * codebase N" (then Pipy keeps the old program on every thread).
 */
export function parseReloadAck(logTail: string, threads: number): ReloadAck {
  const failed = /^.*\[restart\] (Failed reloading codebase|Codebase has no entry point).*$/m.exec(logTail);
  if (failed) return { state: 'failed', line: failed[0].trim() };
  const done = logTail.match(/\[restart\] Codebase reloaded on thread \d+/g)?.length ?? 0;
  return done >= threads ? { state: 'ok' } : { state: 'pending' };
}
