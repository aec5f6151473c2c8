import Fastify, { type FastifyInstance } from 'fastify';
import type { TLSSocket } from 'node:tls';
import { Counter, type Registry } from 'prom-client';
import { parseIfNoneMatch, parseWait } from '../controller/server.js';
import { logger } from '../util/log.js';
import { peerClusterOf } from './identity.js';
import { EXPORTS_DELTA_IM, exportsDelta, type ExportsDocument } from './protocol.js';

const log = logger('multicluster-server');

/** True when an A-IM header (RFC 3229) lists the exports delta. */
export function asksDelta(v: string | string[] | undefined): boolean {
  return [v ?? []].flat().join(',').split(',').some((im) => im.split(';')[0]!.trim().toLowerCase() === EXPORTS_DELTA_IM);
}

/** Versions remembered as delta bases. */
const HISTORY = 4;

/**
 * This cluster's exports as served to peers: the current document, the
 * long-polls parked on it, and the last few versions to send deltas from.
 */
export class ExportsHub {
  private doc: ExportsDocument | undefined;
  private readonly history: ExportsDocument[] = [];
  private waiters = new Set<() => void>();

  current(): ExportsDocument | undefined {
    return this.doc;
  }

  /** A new document; wakes the long-polls when its version differs. */
  publish(doc: ExportsDocument): boolean {
    if (doc.version === this.doc?.version) return false;
    this.doc = doc;
    this.history.push(doc);
    if (this.history.length > HISTORY) this.history.shift();
    const w = this.waiters;
    this.waiters = new Set();
    for (const wake of w) wake();
    return true;
  }

  base(version: string): ExportsDocument | undefined {
    return this.history.find((d) => d.version === version);
  }

  wait(ms: number, signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        signal.removeEventListener('abort', done);
        this.waiters.delete(done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal.addEventListener('abort', done, { once: true });
      this.waiters.add(done);
    });
  }

  wakeAll(): void {
    for (const wake of this.waiters) wake();
  }
}

export interface PeerServerOptions {
  hub: ExportsHub;
  /** This cluster's identity (certificate chain and key, PEM) and the clusterset CA clients must chain to. */
  tls: { cert: string; key: string; ca: string };
  /** Cluster ids allowed to read (the configured peers). */
  peers: () => Iterable<string>;
  registry?: Registry;
  maxWaitMs?: number;
}

/**
 * The peers' API, on its own listener. Mutual TLS: a client without a
 * certificate chaining to the clusterset CA fails the handshake; a client
 * whose certificate names no configured peer cluster gets 403. The one route
 * is read-only:
 *   GET /v1/clusterset/exports[?wait=30s]  If-None-Match: "<version>"
 *     200 the ClusterExports document, 226 a ClusterExportsDelta (A-IM:
 *     fsm-exports-delta and a remembered base), 304 unchanged at the end of
 *     the wait, 503 before the first document.
 * Nothing of the node policy API is served here, and the node policy API
 * (another listener, bearer tokens of nodes) knows nothing of cluster certificates.
 */
export function buildPeerServer(o: PeerServerOptions): FastifyInstance {
  const maxWait = o.maxWaitMs ?? 60_000;
  const app = Fastify({
    https: { cert: o.tls.cert, key: o.tls.key, ca: o.tls.ca, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.3' },
    keepAliveTimeout: maxWait + 10_000,
    logger: false,
    return503OnClosing: true,
  });
  const responses = new Counter({
    name: 'fsm_node_multicluster_export_responses_total',
    help: 'Answers to peer clusters asking for this cluster\'s exports, by peer and kind (full, delta, not_modified, refused).',
    labelNames: ['peer', 'kind'],
    registers: o.registry ? [o.registry] : [],
  });

  // Every request, whatever its path, must come from a configured peer's controller.
  app.addHook('onRequest', async (req, reply) => {
    const socket = req.raw.socket as TLSSocket;
    const der = socket.getPeerCertificate?.(false)?.raw;
    const cluster = socket.authorized ? peerClusterOf(der, o.peers()) : undefined;
    if (!cluster) {
      log.warn({ remote: socket.remoteAddress, path: req.url }, 'refused: not a peer cluster of this clusterset');
      responses.inc({ peer: 'unknown', kind: 'refused' });
      return reply.code(403).send({ error: 'Forbidden', message: 'the client certificate names no peer cluster of this clusterset' });
    }
    (req as unknown as { peerCluster: string }).peerCluster = cluster;
  });

  app.get<{ Querystring: { wait?: string } }>('/v1/clusterset/exports', async (req, reply) => {
    const peer = (req as unknown as { peerCluster: string }).peerCluster;
    let waitMs = 0;
    if (req.query.wait !== undefined) {
      const w = parseWait(req.query.wait);
      if (w === undefined) return reply.code(400).send({ error: 'BadRequest', message: `invalid wait ${JSON.stringify(req.query.wait)}: use e.g. 30s` });
      waitMs = Math.min(w, maxWait);
    }
    const held = parseIfNoneMatch(req.headers['if-none-match']);
    let cur = o.hub.current();
    if (cur && cur.version === held && waitMs > 0) {
      const gone = new AbortController();
      const onClose = () => gone.abort();
      req.raw.socket.once('close', onClose);
      await o.hub.wait(waitMs, gone.signal);
      req.raw.socket.off('close', onClose);
      cur = o.hub.current();
    }
    if (!cur) return reply.header('retry-after', '1').code(503).send({ error: 'NotReady', message: 'exports not computed yet' });
    reply.header('etag', `"${cur.version}"`).header('cache-control', 'no-cache');
    if (cur.version === held) {
      responses.inc({ peer, kind: 'not_modified' });
      return reply.code(304).send();
    }
    const base = held !== undefined && asksDelta(req.headers['a-im']) ? o.hub.base(held) : undefined;
    if (base) {
      responses.inc({ peer, kind: 'delta' });
      return reply.code(226).header('im', EXPORTS_DELTA_IM).type('application/json').send(exportsDelta(base, cur));
    }
    responses.inc({ peer, kind: 'full' });
    return reply.type('application/json').send(cur);
  });

  app.addHook('preClose', async () => o.hub.wakeAll());
  return app;
}
