import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { Counter, type Registry } from 'prom-client';
import { errorMessage } from '../errors.js';
import type { CompiledNode } from '../policy/compiler.js';
import { DELTA_IM, type DeltaBase } from '../policy/delta.js';
import { formatIssues, NodeModeStatusSchema, type NodeModeStatus } from '../policy/schema.js';
import { logger } from '../util/log.js';
import type { Authenticator } from './auth.js';
import type { PolicyHub } from './hub.js';
import { registerIdentityRoutes, type IdentityService } from './identities.js';

const log = logger('controller-server');

export interface PolicyServerOptions {
  hub: PolicyHub;
  auth: Authenticator;
  /** PEM serving certificate and key (HTTPS only: the policy path carries bearer tokens). */
  tls: { cert: string; key: string };
  registry?: Registry;
  /** Longest long-poll granted (a longer ?wait is clamped). Default 60 s. */
  maxWaitMs?: number;
  /** An agent reported its interception mode (the Kubernetes controller posts an Event on a fallback). */
  onNodeStatus?: (node: string, status: NodeModeStatus) => void;
  /** Workload certificates (POST /v1/nodes/:node/identities[/batch]); absent: the routes are not served. */
  identities?: IdentityService;
}

const NODE_NAME = /^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/;

/** "30s", "500ms", "2m" or a bare number of seconds -> milliseconds; undefined when malformed. */
export function parseWait(v: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(v.trim());
  if (!m) return undefined;
  const n = Number(m[1]);
  return m[2] === 'ms' ? n : m[2] === 'm' ? n * 60_000 : n * 1000;
}

/** The first entity tag of If-None-Match without quotes or weak prefix ("*" never matches a version). */
export function parseIfNoneMatch(v: string | undefined): string | undefined {
  const first = v?.split(',')[0]?.trim().replace(/^W\//, '');
  if (!first || first === '*') return undefined;
  return first.replace(/^"(.*)"$/, '$1');
}

/** True when an A-IM header (RFC 3229) lists the policy delta manipulation. */
export function acceptsDelta(v: string | string[] | undefined): boolean {
  return [v ?? []].flat().join(',').split(',').some((im) => im.split(';')[0]!.trim().toLowerCase() === DELTA_IM);
}

/**
 * The controller's HTTPS API (docs/controller.md "Protocol"):
 *   GET /v1/nodes/:node/policy[?wait=30s]  with If-None-Match: "<version>"
 *     200 + ETag when the node's version differs (at once, or as soon as it
 *     changes within the wait), 226 + a NodePolicyDelta instead when the
 *     request has A-IM: fsm-policy-delta and the held version is one the
 *     controller remembers, 304 when the wait ends without a change,
 *     401 unknown token, 403 token of another node, 404 unknown node,
 *     503 before the first full sync. gzip when the client accepts it.
 *   POST /v1/nodes/:node/status  the agent's interception mode (NodeModeStatus),
 *     same credentials; 204, 400 on a malformed body.
 *   POST /v1/nodes/:node/identities  a workload certificate for a CSR, same
 *     credentials (identities.ts; docs/security.md); .../identities/batch
 *     up to 100 at once, answered per identity (identity-batch.ts).
 *   GET /healthz, /readyz, /metrics (no credentials, nothing secret).
 */
export function buildPolicyServer(o: PolicyServerOptions): FastifyInstance {
  const maxWait = o.maxWaitMs ?? 60_000;
  const app = Fastify({
    https: { cert: o.tls.cert, key: o.tls.key },
    // Long-polls park for up to maxWait; keep idle keep-alive sockets longer than that.
    keepAliveTimeout: maxWait + 10_000,
    logger: false,
    return503OnClosing: true,
  });

  const problem = (reply: FastifyReply, code: number, error: string, message: string) => reply.code(code).send({ error, message });
  const responses = new Counter({
    name: 'fsm_node_controller_policy_responses_total',
    help: 'Policy answers to agents, by kind: full (200), delta (226), not_modified (304).',
    labelNames: ['kind'],
    registers: o.registry ? [o.registry] : [],
  });
  const responseBytes = new Counter({
    name: 'fsm_node_controller_policy_response_bytes_total',
    help: 'Policy body bytes sent to agents (as sent: gzip when asked), by kind.',
    labelNames: ['kind'],
    registers: o.registry ? [o.registry] : [],
  });

  app.get('/healthz', async () => ({ ok: true }));
  app.get('/readyz', async (_req, reply) => (o.hub.ready ? { ready: true } : problem(reply, 503, 'NotReady', 'sources have not synced yet')));
  if (o.registry) {
    const registry = o.registry;
    app.get('/metrics', async (_req, reply) => {
      reply.header('content-type', registry.contentType);
      return registry.metrics();
    });
  }

  /** The caller's token must be valid and bound to `node`; otherwise the reply is sent and false returned. */
  async function authorized(req: FastifyRequest<{ Params: { node: string } }>, reply: FastifyReply): Promise<boolean> {
    const deny = (code: number, error: string, message: string): false => {
      void problem(reply, code, error, message);
      return false;
    };
    const { node } = req.params;
    if (!NODE_NAME.test(node)) return deny(400, 'BadRequest', `invalid node name ${JSON.stringify(node)}`);
    const token = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '')?.[1];
    if (!token) return deny(401, 'Unauthorized', 'a bearer token is required');
    let caller;
    try {
      caller = await o.auth.authenticate(token);
    } catch (err) {
      log.error({ err: errorMessage(err) }, 'authentication backend failed');
      return deny(503, 'AuthUnavailable', 'cannot check the token now; retry');
    }
    if (!caller) return deny(401, 'Unauthorized', 'unknown token');
    if (caller.node !== node) {
      log.warn({ principal: caller.principal, asked: node }, 'refused: another node');
      return deny(403, 'Forbidden', `this token belongs to node ${JSON.stringify(caller.node)}`);
    }
    return true;
  }

  if (o.identities) registerIdentityRoutes(app, o.identities, authorized);

  app.post<{ Params: { node: string } }>('/v1/nodes/:node/status', async (req, reply) => {
    if (!(await authorized(req, reply))) return reply;
    const parsed = NodeModeStatusSchema.safeParse(req.body);
    if (!parsed.success) return problem(reply, 400, 'BadRequest', `invalid node status: ${formatIssues(parsed.error)}`);
    o.onNodeStatus?.(req.params.node, parsed.data);
    return reply.code(204).send();
  });

  app.get<{ Params: { node: string }; Querystring: { wait?: string } }>('/v1/nodes/:node/policy', async (req, reply) => {
    const { node } = req.params;
    if (!(await authorized(req, reply))) return reply;
    if (!o.hub.ready) return reply.header('retry-after', '1').code(503).send({ error: 'NotReady', message: 'sources have not synced yet' });
    let waitMs = 0;
    if (req.query.wait !== undefined) {
      const w = parseWait(req.query.wait);
      if (w === undefined) return problem(reply, 400, 'BadRequest', `invalid wait ${JSON.stringify(req.query.wait)}: use e.g. 30s or 500ms`);
      waitMs = Math.min(w, maxWait);
    }
    const held = parseIfNoneMatch(req.headers['if-none-match']);

    let cur = o.hub.get(node);
    if (cur && cur.version === held && waitMs > 0) {
      const gone = new AbortController();
      const onClose = () => gone.abort();
      req.raw.socket.once('close', onClose);
      await o.hub.wait(node, waitMs, gone.signal);
      req.raw.socket.off('close', onClose);
      cur = o.hub.get(node);
    }
    if (!cur) return problem(reply, 404, 'NotFound', `no policy for node ${JSON.stringify(node)} (no Node object and no pods)`);
    if (cur.version === held) {
      // Confirmed: the node holds it (perhaps from another replica or an earlier run), so the next change can be a delta.
      o.hub.held(cur);
      responses.inc({ kind: 'not_modified' });
      return reply.code(304).header('etag', `"${cur.version}"`).send();
    }
    const base = held !== undefined && acceptsDelta(req.headers['a-im']) ? o.hub.base(node, held) : undefined;
    return send(reply, cur, base, /\bgzip\b/.test(req.headers['accept-encoding'] ?? ''));
  });

  async function send(reply: FastifyReply, c: CompiledNode, base: DeltaBase | undefined, gzip: boolean) {
    reply.header('etag', `"${c.version}"`).header('cache-control', 'no-cache').header('vary', 'accept-encoding, a-im').type('application/json');
    let body: Buffer;
    if (base) {
      reply.code(226).header('im', DELTA_IM).header('delta-base', `"${base.version}"`);
      const d = await o.hub.delta(base, c, gzip);
      body = d.body;
      gzip = d.gzip;
    } else body = gzip ? await o.hub.gzip(c) : o.hub.body(c);
    if (gzip) reply.header('content-encoding', 'gzip');
    o.hub.held(c);
    const kind = base ? 'delta' : 'full';
    responses.inc({ kind });
    responseBytes.inc({ kind }, body.length);
    return reply.send(body);
  }

  app.addHook('preClose', async () => o.hub.wakeAll());
  return app;
}
