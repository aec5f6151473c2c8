import { appendFileSync } from 'node:fs';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { originalDst } from '../ebpf/index.js';
import { InvalidInputError, errorMessage } from '../errors.js';

/**
 * A minimal L4 passthrough proxy for tests, benchmarks and the lab when no
 * Pipy is around. It is NOT the production proxy: no policy, no routing, no
 * tunnel, no mTLS. For each accepted connection it reads the original
 * destination (getsockopt SO_ORIGINAL_DST, which the eBPF getsockopt program
 * or netfilter answers), connects there, and pipes bytes both ways with
 * half-close. Every connection is recorded in memory and, with a log file,
 * as JSON lines: an "open" line written before the upstream connect (so a
 * client that got any reply knows its record is there) and a "close" line
 * with byte counts.
 */

export const NOT_PRODUCTION_BANNER =
  '*** fsm-node passthrough proxy: NOT the production proxy (no policy, no routing, no mTLS) - for tests, benchmarks and the lab only ***';

export interface ConnectionRecord {
  event: 'open' | 'close';
  id: number;
  source: string;
  sourcePort: number;
  /** null when the socket has no original destination (a direct connection to the listener): it is closed. */
  originalDst: { address: string; port: number } | null;
  bytesUp?: number;
  bytesDown?: number;
  error?: string;
}

export interface PassthroughOptions {
  host: string;
  port: number;
  /** JSON lines file the records are appended to. */
  logFile?: string;
}

/** "a.b.c.d:port" -> parts, with the field named in errors. */
export function parseHostPort(field: string, text: string): { host: string; port: number } {
  const m = /^(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})$/.exec(text);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !net.isIPv4(m[1]!) || !(port >= 1 && port <= 65535)) throw new InvalidInputError(field, text, 'must be IPv4:port, e.g. 10.77.1.1:15001');
  return { host: m[1]!, port };
}

export class PassthroughProxy {
  readonly records: ConnectionRecord[] = [];
  #server: net.Server | undefined;
  #sockets = new Set<net.Socket>();
  #nextId = 1;

  constructor(private readonly opts: PassthroughOptions) {}

  /** Resolves once listening; the bound address (port 0 picks one). */
  start(): Promise<{ address: string; port: number }> {
    const server = net.createServer({ allowHalfOpen: true }, (s) => this.#accept(s));
    this.#server = server;
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host: this.opts.host, port: this.opts.port }, () => {
        server.off('error', reject);
        const a = server.address() as net.AddressInfo;
        resolve({ address: a.address, port: a.port });
      });
    });
  }

  close(): Promise<void> {
    for (const s of this.#sockets) s.destroy();
    const server = this.#server;
    this.#server = undefined;
    return new Promise((resolve) => (server ? server.close(() => resolve()) : resolve()));
  }

  #record(r: ConnectionRecord): void {
    this.records.push(r);
    if (this.opts.logFile !== undefined) appendFileSync(this.opts.logFile, `${JSON.stringify(r)}\n`);
  }

  #track(s: net.Socket): void {
    this.#sockets.add(s);
    s.once('close', () => this.#sockets.delete(s));
  }

  #accept(client: net.Socket): void {
    this.#track(client);
    const id = this.#nextId++;
    const base = { id, source: client.remoteAddress ?? '', sourcePort: client.remotePort ?? 0 };
    let dst: { address: string; port: number } | null = null;
    try {
      dst = originalDst((client as unknown as { _handle: { fd: number } })._handle.fd);
    } catch (err) {
      this.#record({ event: 'close', ...base, originalDst: null, error: errorMessage(err) });
      client.destroy();
      return;
    }
    if (dst.port === this.opts.port && (dst.address === this.opts.host || dst.address === client.localAddress)) {
      this.#record({ event: 'close', ...base, originalDst: dst, error: 'original destination is this proxy: refusing to loop' });
      client.destroy();
      return;
    }
    this.#record({ event: 'open', ...base, originalDst: dst });
    const upstream = net.connect({ host: dst.address, port: dst.port, allowHalfOpen: true });
    this.#track(upstream);
    let up = 0;
    let down = 0;
    let error: string | undefined;
    client.on('data', (d: Buffer) => (up += d.length));
    upstream.on('data', (d: Buffer) => (down += d.length));
    client.pipe(upstream);
    upstream.pipe(client);
    const fail = (err: Error): void => {
      error ??= err.message;
      client.destroy();
      upstream.destroy();
    };
    client.on('error', fail);
    upstream.on('error', fail);
    let closed = 0;
    const onClose = (): void => {
      if (++closed < 2) return;
      this.#record({ event: 'close', ...base, originalDst: dst, bytesUp: up, bytesDown: down, ...(error === undefined ? {} : { error }) });
    };
    client.once('close', onClose);
    upstream.once('close', onClose);
  }
}

async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { listen: { type: 'string' }, log: { type: 'string' } }, strict: true });
  if (values.listen === undefined) throw new InvalidInputError('--listen', undefined, 'required, e.g. --listen 10.77.1.1:15001');
  const { host, port } = parseHostPort('--listen', values.listen);
  process.stderr.write(`${NOT_PRODUCTION_BANNER}\n`);
  const proxy = new PassthroughProxy({ host, port, ...(values.log === undefined ? {} : { logFile: values.log }) });
  const bound = await proxy.start();
  // One line on stdout that a parent process waits for.
  process.stdout.write(`${JSON.stringify({ event: 'listening', ...bound })}\n`);
  const stop = (): void => void proxy.close().then(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    process.stderr.write(`passthrough: ${errorMessage(err)}\n`);
    process.exit(2);
  });
}
