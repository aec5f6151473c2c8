import http from 'node:http';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { InvalidInputError, errorMessage } from '../errors.js';

/**
 * The lab's workload, run as its own process inside a pod (netns + cgroup):
 *
 *   node echo-server.js serve --name POD --port 8080
 *     an HTTP server answering every request with a JSON body naming the pod
 *     and the peer address it saw (a node proxy's address, not the client
 *     pod's, when the connection went through a proxy);
 *   node echo-server.js get URL
 *     one HTTP GET without keep-alive; prints one JSON line with the status,
 *     the body and the client's local port (how `lab check` finds the
 *     connection in the proxy's log). Exit 0 on any HTTP answer, 1 otherwise.
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

export function serve(name: string, port: number): http.Server {
  const server = http.createServer((req, res) => {
    const answer: EchoAnswer = { pod: name, peer: req.socket.remoteAddress ?? '', method: req.method ?? '', path: req.url ?? '' };
    res.writeHead(200, { 'content-type': 'application/json', connection: 'close' });
    res.end(`${JSON.stringify(answer)}\n`);
  });
  server.listen(port, '0.0.0.0', () => process.stdout.write(`${JSON.stringify({ event: 'listening', pod: name, port })}\n`));
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
  const { values, positionals } = parseArgs({ args: rest, options: { name: { type: 'string' }, port: { type: 'string' } }, allowPositionals: true, strict: true });
  if (verb === 'serve') {
    const port = Number(values.port ?? '8080');
    if (!values.name) throw new InvalidInputError('--name', values.name, 'required: the pod name to answer with');
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new InvalidInputError('--port', values.port, 'must be a port number');
    const server = serve(values.name, port);
    const stop = (): void => void server.close(() => process.exit(0));
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
    return new Promise<number>(() => undefined);
  }
  if (verb === 'get' && positionals[0] !== undefined) {
    const result = await get(positionals[0]);
    process.stdout.write(`${JSON.stringify(result)}\n`);
    return result.ok ? 0 : 1;
  }
  throw new InvalidInputError('verb', argv.join(' '), 'usage: echo-server.js serve --name POD [--port 8080] | get URL');
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
