import Fastify, { type FastifyInstance, type FastifyRequest } from 'fastify';
import type { Registry } from 'prom-client';
import { logger } from '../util/log.js';

const log = logger('http');

/** What the agent exposes to its HTTP API; the agent owns the data, the API only reads it. */
export interface AgentView {
  /** Undefined when ready; otherwise why not (policy not loaded, dataplane not applied, proxy not ready...). */
  notReadyReason(): string | undefined;
  state(): unknown;
  registry: Registry;
  /** The whole /metrics text when it is more than the registry (the agent appends the node proxy's metrics). */
  exposition?: () => Promise<string>;
}

export interface ApiOptions {
  /** Bearer token that also grants /v1/state from non-loopback callers. */
  token?: string;
}

const isLoopback = (ip: string) => ip === '127.0.0.1' || ip === '::1' || ip === '::ffff:127.0.0.1' || ip.startsWith('127.');

/**
 * The agent's HTTP API (default :15900). /healthz says the process lives;
 * /readyz says whether policy, dataplane and proxy are all in force (503 with
 * the reason when not); /metrics is read-only and safe to expose; /v1/state
 * carries node detail and is reachable from loopback or with the token only.
 */
export function buildApi(view: AgentView, opts: ApiOptions = {}): FastifyInstance {
  const app = Fastify({ logger: false });

  app.get('/healthz', async () => ({ ok: true }));

  app.get('/readyz', async (_req, reply) => {
    const reason = view.notReadyReason();
    if (reason) return reply.code(503).send({ ready: false, reason });
    return { ready: true };
  });

  app.get('/metrics', async (_req, reply) => {
    reply.header('content-type', view.registry.contentType);
    return view.exposition ? view.exposition() : view.registry.metrics();
  });

  app.register(async (scoped) => {
    scoped.addHook('onRequest', async (req: FastifyRequest, reply) => {
      if (isLoopback(req.ip)) return;
      if (opts.token && req.headers.authorization === `Bearer ${opts.token}`) return;
      log.warn({ ip: req.ip, url: req.url }, 'refused state request from non-loopback caller without token');
      return reply.code(403).send({ error: 'state is reachable from loopback or with the agent token only' });
    });
    scoped.get('/v1/state', async () => view.state());
  });

  return app;
}
