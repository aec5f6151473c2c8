import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { errorMessage, InvalidInputError } from '../errors.js';

/**
 * The lab's outside server: a system off the mesh that pods call out to
 * (egress) on plain HTTP and on TLS. Run in the lab's outside-server network
 * namespace (src/lab/outside.ts):
 *
 *   node outside-server.js --name NAME --http 80 --https 443 --cert PEM --key PEM
 *
 * Every answer is one JSON line naming the server, the TCP peer it saw (a
 * node's address when the mesh's proxy carried the request), the Host, the
 * path and whether it came over TLS.
 */

export interface OutsideAnswer {
  server: string;
  peer: string;
  host: string;
  path: string;
  tls: boolean;
}

function handler(name: string, tls: boolean): http.RequestListener {
  return (req, res) => {
    const answer: OutsideAnswer = { server: name, peer: req.socket.remoteAddress ?? '', host: req.headers.host ?? '', path: req.url ?? '', tls };
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(`${JSON.stringify(answer)}\n`);
  };
}

function port(value: string | undefined, flag: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw new InvalidInputError(flag, value, 'must be a port number');
  return n;
}

function main(argv: string[]): void {
  const { values } = parseArgs({ args: argv, options: { name: { type: 'string' }, http: { type: 'string' }, https: { type: 'string' }, cert: { type: 'string' }, key: { type: 'string' } }, strict: true });
  const name = values.name ?? 'outside';
  let listening = 0;
  const ready = (what: string) => () => {
    process.stdout.write(`${JSON.stringify({ event: 'listening', server: name, on: what })}\n`);
    if (++listening === 2) process.stdout.write(`${JSON.stringify({ event: 'ready', server: name })}\n`);
  };
  const plain = http.createServer(handler(name, false)).listen(port(values.http ?? '80', '--http'), '0.0.0.0', ready('http'));
  if (!values.cert || !values.key) throw new InvalidInputError('--cert/--key', values.cert, 'both are required for the TLS server');
  const secure = https.createServer({ cert: readFileSync(values.cert), key: readFileSync(values.key) }, handler(name, true)).listen(port(values.https ?? '443', '--https'), '0.0.0.0', ready('https'));
  const stop = (): void => {
    plain.close();
    secure.close(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  try {
    main(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`outside-server: ${errorMessage(err)}\n`);
    process.exit(2);
  }
}
