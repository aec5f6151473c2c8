import http from 'node:http';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { InvalidInputError, errorMessage } from '../errors.js';
import { FaultWatch } from './faults.js';

/**
 * The lab's workload, run as its own process inside a pod (netns + cgroup):
 *
 *   node echo-server.js serve --name POD --port 8080 [--fault-file FILE]
 *     an HTTP server answering every request with a JSON body naming the pod
 *     and the peer address it saw (a node proxy's address, not the client
 *     pod's, when the connection went through a proxy); with --fault-file it
 *     obeys the fault written there by `lab fault` (src/lab/faults.ts): a
 *     fixed status, no answer at all, or a closed connection. A request with
 *     the header `x-lab-record` is also written to stdout (the pod's log) as
 *     one JSON line, so a test can see a request arrive where the client's
 *     answer does not tell (a RequestMirror copy); other requests are not
 *     logged, so load does not fill the log;
 *   node echo-server.js get URL
 *     one HTTP GET without keep-alive; prints one JSON line with the status,
 *     the body and the client's local port (how `lab check` finds the
 *     connection in the proxy's log). Exit 0 on any HTTP answer, 1 otherwise;
 *   node echo-server.js loop URL --seconds S [--interval-ms MS]
 *     one GET after another (a new connection each) for S seconds or until
 *     SIGTERM; prints {"event":"flowing","pid":N} at the first answer, then
 *     at the end one JSON line (LoopSummary): answers by pod and by peer,
 *     failures, the longest gap between two answers. Exit 0 when no request
 *     failed.
 *
 * A separate file rather than `node -e`, so the processes show up readably in
 * `ps` and the protocol is typed in one place.
 */

export interface EchoAnswer {
  pod: string;
  /** The TCP peer the server saw. */
  peer: string;
  method: string;
  path: string;
}

export interface GetResult {
  ok: boolean;
  status?: number;
  body?: string;
  localAddress?: string;
  localPort?: number;
  error?: string;
}

export interface LoopSummary {
  ok: number;
  failed: number;
  /** The first few failures, as they came. */
  errors: string[];
  /** Answers by the pod that gave them, and by the peer the server saw. */
  pods: Record<string, number>;
  peers: Record<string, number>;
  startedAt: number;
  endedAt: number;
  /** Longest time between two successful answers (or from the start to the first). */
  maxGapMs: number;
}

/**
 * Requests back to back for `seconds` (or until `stop` aborts), paced by
 * `intervalMs`: traffic that must keep flowing while something else happens.
 * `onFirst` runs at the first answer, so a caller knows it flows.
 */
export async function loop(url: string, seconds: number, intervalMs: number, opts: { stop?: AbortSignal; onFirst?: () => void } = {}): Promise<LoopSummary> {
  const sum: LoopSummary = { ok: 0, failed: 0, errors: [], pods: {}, peers: {}, startedAt: Date.now(), endedAt: 0, maxGapMs: 0 };
  const end = sum.startedAt + seconds * 1000;
  let lastOk = sum.startedAt;
  while (Date.now() < end && !opts.stop?.aborted) {
    const r = await get(url, 2000);
    let answer: EchoAnswer | undefined;
    try {
      answer = JSON.parse(r.body ?? '') as EchoAnswer;
    } catch {
      answer = undefined;
    }
    if (r.ok && r.status === 200 && answer) {
      sum.ok += 1;
      sum.pods[answer.pod] = (sum.pods[answer.pod] ?? 0) + 1;
      sum.peers[answer.peer] = (sum.peers[answer.peer] ?? 0) + 1;
      sum.maxGapMs = Math.max(sum.maxGapMs, Date.now() - lastOk);
      lastOk = Date.now();
      if (sum.ok === 1) opts.onFirst?.();
    } else {
      sum.failed += 1;
      if (sum.errors.length < 5) sum.errors.push(`${new Date().toISOString()} ${r.ok ? `HTTP ${r.status}: ${String(r.body).slice(0, 100)}` : r.error}`);
    }
    if (intervalMs > 0) await new Promise((res) => setTimeout(res, intervalMs));
  }
  sum.endedAt = Date.now();
  sum.maxGapMs = Math.max(sum.maxGapMs, sum.endedAt - lastOk);
  return sum;
}

export function serve(name: string, port: number, opts: { faultFile?: string | undefined; host?: string } = {}): http.Server {
  const faults = opts.faultFile ? new FaultWatch(opts.faultFile, (err) => process.stderr.write(`echo-server: ${err.message}; answering normally\n`)) : undefined;
  const server = http.createServer((req, res) => {
    const record = req.headers['x-lab-record'];
    if (record !== undefined) process.stdout.write(`${JSON.stringify({ event: 'request', method: req.method, path: req.url, record })}\n`);
    const fault = faults?.get();
    // A hung request keeps its socket until the client gives up (or the server closes).
    if (fault?.kind === 'hang') return;
    if (fault?.kind === 'close') {
      req.socket.destroy();
      return;
    }
    const answer: EchoAnswer = { pod: name, peer: req.socket.remoteAddress ?? '', method: req.method ?? '', path: req.url ?? '' };
    res.writeHead(fault?.kind === 'status' ? fault.status : 200, { 'content-type': 'application/json', connection: 'close' });
    res.end(`${JSON.stringify(answer)}\n`);
  });
  server.listen(port, opts.host ?? '0.0.0.0', () => process.stdout.write(`${JSON.stringify({ event: 'listening', pod: name, port: (server.address() as { port: number }).port })}\n`));
  return server;
}

export function get(url: string, timeoutMs = 5000): Promise<GetResult> {
  return new Promise((resolve) => {
    let local: { localAddress?: string; localPort?: number } = {};
    const req = http.get(url, { agent: false, timeout: timeoutMs }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ ok: true, status: res.statusCode ?? 0, body, ...local }));
    });
    req.on('socket', (s) => s.on('connect', () => (local = { localAddress: s.localAddress ?? '', localPort: s.localPort ?? 0 })));
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', (err) => resolve({ ok: false, error: errorMessage(err), ...local }));
  });
}

async function main(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  const { values, positionals } = parseArgs({ args: rest, options: { name: { type: 'string' }, port: { type: 'string' }, 'fault-file': { type: 'string' }, seconds: { type: 'string' }, 'interval-ms': { type: 'string' } }, allowPositionals: true, strict: true });
  if (verb === 'serve') {
    const port = Number(values.port ?? '8080');
    if (!values.name) throw new InvalidInputError('--name', values.name, 'required: the pod name to answer with');
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new InvalidInputError('--port', values.port, 'must be a port number');
    const server = serve(values.name, port, { faultFile: values['fault-file'] });
    const stop = (): void => {
      server.closeAllConnections();
      server.close(() => process.exit(0));
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
    return new Promise<number>(() => undefined);
  }
  if (verb === 'get' && positionals[0] !== undefined) {
    const result = await get(positionals[0]);
    process.stdout.write(`${JSON.stringify(result)}\n`);
    return result.ok ? 0 : 1;
  }
  if (verb === 'loop' && positionals[0] !== undefined) {
    const seconds = Number(values.seconds ?? '5');
    const interval = Number(values['interval-ms'] ?? '20');
    if (!(seconds > 0 && seconds <= 600)) throw new InvalidInputError('--seconds', values.seconds, 'must be a number of seconds from 0 to 600');
    if (!Number.isInteger(interval) || interval < 0 || interval > 10_000) throw new InvalidInputError('--interval-ms', values['interval-ms'], 'must be an integer from 0 to 10000');
    const stop = new AbortController();
    process.once('SIGTERM', () => stop.abort());
    const summary = await loop(positionals[0], seconds, interval, {
      stop: stop.signal,
      onFirst: () => void process.stdout.write(`${JSON.stringify({ event: 'flowing', pid: process.pid })}\n`),
    });
    process.stdout.write(`${JSON.stringify(summary)}\n`);
    return summary.failed === 0 ? 0 : 1;
  }
  throw new InvalidInputError('verb', argv.join(' '), 'usage: echo-server.js serve --name POD [--port 8080] [--fault-file FILE] | get URL | loop URL [--seconds S] [--interval-ms MS]');
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`echo-server: ${errorMessage(err)}\n`);
      process.exit(2);
    },
  );
}
