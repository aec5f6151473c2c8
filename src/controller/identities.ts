import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { Counter, Histogram, type Registry } from 'prom-client';
import { z } from 'zod';
import { errorMessage, InvalidInputError } from '../errors.js';
import { DEFAULT_CERT_LIFETIME_MS } from '../identity/lifetime.js';
import { ProviderError, type CertificateProvider } from '../identity/provider.js';
import { identityDnsName, identityKey, spiffeId, validateIdentity, type WorkloadIdentity } from '../identity/spiffe.js';
import { parseCsr, type ParsedCsr } from '../identity/x509.js';
import { formatIssues } from '../policy/schema.js';
import { issueBatch, MAX_BATCH } from './identity-batch.js';
import { logger } from '../util/log.js';

const log = logger('controller-identities');

/**
 * Workload certificates for node agents (docs/security.md "Issuing"):
 *   POST /v1/nodes/:node/identities  {namespace, serviceAccount, csr}
 *   -> 200 {certificateChain: [PEM], trustBundle: [PEM], notAfter}
 *   POST /v1/nodes/:node/identities/batch  many at once (identity-batch.ts)
 * Same bearer token as the policy path. A node gets only identities of
 * service accounts that have an enrolled pod on it in the compiled state (a
 * stolen node credential cannot mint the identity of a workload running
 * elsewhere); the request must name exactly that identity with a P-256 key;
 * each node is rate limited and bounded in how many identities it holds.
 */

export const DEFAULT_RATE = { perSecond: 20, burst: 50 };
export const DEFAULT_MAX_IDENTITIES_PER_NODE = 256;
const MAX_CSR_CHARS = 16 * 1024;
/** Room for MAX_BATCH requests of the largest CSR the single route takes, and their JSON. */
const BATCH_BODY_LIMIT = MAX_BATCH * (MAX_CSR_CHARS + 1024);

export const IssueBodySchema = z
  .object({
    namespace: z.string().min(1).max(63),
    serviceAccount: z.string().min(1).max(253),
    csr: z.string().min(1).max(MAX_CSR_CHARS),
  })
  .strict();

export interface IssueAnswer {
  certificateChain: string[];
  trustBundle: string[];
  notAfter: string;
}

export type Refusal = 'bad_request' | 'csr_mismatch' | 'key_algorithm' | 'not_on_node' | 'rate_limited' | 'too_many_identities' | 'provider';

export interface IdentityServiceOptions {
  provider: CertificateProvider;
  /** Service accounts of the enrolled pods on `node` in the compiled state (undefined: no policy for it). */
  podsOf(node: string): readonly { namespace: string; serviceAccount: string }[] | undefined;
  /** Trust domain and lifetime from the mesh config (null lifetime: defaultLifetimeMs). */
  settings(): { trustDomain: string; certificateLifetimeMs: number | null };
  /** Controller flag; default 24 h. */
  defaultLifetimeMs?: number;
  rate?: { perSecond: number; burst: number };
  maxIdentitiesPerNode?: number;
  registry?: Registry;
  now?: () => number;
}

export interface ErrorBody {
  error: string;
  message: string;
  reason?: Refusal;
}

/** An HTTP answer: status and JSON body (errors: {error, message, reason?}), plus Retry-After seconds when throttled. */
export interface Answer {
  status: number;
  body: IssueAnswer | ErrorBody;
  retryAfterS?: number;
}

/** How one identity's request is answered: for a batch entry, where it is (refusals name requests[i]) and the duplicate check. */
export interface EntryOptions {
  started: number;
  /** A batch entry: its path in the request body, and that path as text ("requests[3]"). */
  at?: { path: (string | number)[]; label: string };
  /** Why this identity may not be asked for here (it is in the batch already), or undefined. */
  claim?: (key: string) => string | undefined;
}

export class IdentityService {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();
  /** Per node: identity key -> when its newest certificate expires (what the node holds). */
  private readonly held = new Map<string, Map<string, number>>();
  private readonly now: () => number;
  private readonly rate: { perSecond: number; burst: number };
  private readonly maxIds: number;
  private readonly issued: Counter;
  private readonly refused: Counter;
  private readonly latency: Histogram;
  private readonly batchEntries: Histogram;

  constructor(private readonly o: IdentityServiceOptions) {
    this.now = o.now ?? Date.now;
    this.rate = o.rate ?? DEFAULT_RATE;
    this.maxIds = o.maxIdentitiesPerNode ?? DEFAULT_MAX_IDENTITIES_PER_NODE;
    const registers = o.registry ? [o.registry] : [];
    this.issued = new Counter({ name: 'fsm_node_controller_certificates_issued_total', help: 'Workload certificates issued to agents.', registers });
    this.refused = new Counter({ name: 'fsm_node_controller_certificate_refusals_total', help: 'Workload certificate requests refused, by reason.', labelNames: ['reason'], registers });
    this.latency = new Histogram({
      name: 'fsm_node_controller_certificate_issue_seconds',
      help: 'Time to answer a certificate request that was issued (checks and signing).',
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30],
      registers,
    });
    this.batchEntries = new Histogram({
      name: 'fsm_node_controller_certificate_batch_entries',
      help: 'Identities per batch certificate request (POST /v1/nodes/:node/identities/batch).',
      buckets: [1, 2, 5, 10, 20, 50, 100],
      registers,
    });
  }

  get provider(): CertificateProvider {
    return this.o.provider;
  }

  /** Answer one request of `node` (already authenticated as that node). */
  issue(node: string, rawBody: unknown): Promise<Answer> {
    return this.issueIdentity(node, rawBody, { started: performance.now() });
  }

  /**
   * One identity's request of `node`, for the single route and for each entry
   * of a batch (identity-batch.ts): the rate token, the body's shape, the
   * node binding, the bound on identities, the CSR, the provider. Everything
   * up to the first await runs synchronously, so the entries of a batch are
   * checked (and their bound slots reserved) in order before any is signed.
   */
  async issueIdentity(node: string, raw: unknown, o: EntryOptions): Promise<Answer> {
    const at = o.at;
    if (!this.take(node)) return this.rateLimited(node);

    const parsed = IssueBodySchema.safeParse(raw);
    if (!parsed.success) {
      if (at) for (const i of parsed.error.issues) i.path = [...at.path, ...i.path];
      return this.refuse(node, 400, 'bad_request', `invalid request: ${formatIssues(parsed.error)}`);
    }
    let identity: WorkloadIdentity;
    try {
      identity = validateIdentity({ namespace: parsed.data.namespace, serviceAccount: parsed.data.serviceAccount }, at?.label ?? 'body');
    } catch (err) {
      return this.refuse(node, 400, 'bad_request', errorMessage(err));
    }
    const key = identityKey(identity);
    const twice = o.claim?.(key);
    if (twice) return this.refuse(node, 400, 'bad_request', twice);
    const { trustDomain, certificateLifetimeMs } = this.o.settings();

    // Authorization before any expensive work: the identity must run on this node.
    const pods = this.o.podsOf(node);
    if (!pods?.some((p) => p.namespace === identity.namespace && p.serviceAccount === identity.serviceAccount)) {
      return this.refuse(node, 403, 'not_on_node', `node ${node} runs no mesh pod with service account ${key}: it may not hold that identity`);
    }
    const held = this.heldBy(node);
    if (!held.has(key) && held.size >= this.maxIds) {
      return this.refuse(node, 429, 'too_many_identities', `node ${node} holds ${held.size} identities already, the most one node may hold (${this.maxIds})`, 60);
    }
    // A new identity holds its slot while it is checked and signed: requests in
    // flight together (a batch, parallel requests) cannot pass the bound between them.
    const reserved = !held.has(key);
    if (reserved) held.set(key, Infinity);
    const release = () => {
      if (reserved && held.get(key) === Infinity) held.delete(key);
    };

    const csrField = at ? `${at.label}.csr` : 'csr';
    const checked = await this.checkCsr(parsed.data.csr, trustDomain, identity, csrField);
    if ('reason' in checked) {
      release();
      return this.refuse(node, 400, checked.reason, checked.message);
    }

    const lifetimeMs = certificateLifetimeMs ?? this.o.defaultLifetimeMs ?? DEFAULT_CERT_LIFETIME_MS;
    let issued;
    try {
      issued = await this.o.provider.issue({ csrPem: parsed.data.csr, csr: checked.csr, identity, trustDomain, lifetimeMs });
    } catch (err) {
      release();
      const transient = err instanceof ProviderError && (err.reason === 'unavailable' || err.reason === 'timeout');
      log.error({ node, identity: key, provider: this.o.provider.describe(), err: errorMessage(err) }, 'the certificate provider did not issue');
      return this.refuse(node, transient ? 503 : 502, 'provider', `${this.o.provider.describe()} did not issue a certificate for ${key}: ${errorMessage(err)}`, transient ? 5 : undefined);
    }
    held.set(key, issued.notAfter.getTime());
    this.issued.inc();
    this.latency.observe((performance.now() - o.started) / 1000);
    log.info({ node, identity: key, notAfter: issued.notAfter.toISOString() }, 'certificate issued');
    return { status: 200, body: { certificateChain: issued.certChainPem, trustBundle: this.o.provider.trustBundle(), notAfter: issued.notAfter.toISOString() } };
  }

  /** A refusal, counted by reason and logged (also for a batch as a whole). */
  refuse(node: string, status: number, reason: Refusal, message: string, retryAfterS?: number): Answer & { body: ErrorBody } {
    this.refused.inc({ reason });
    log.warn({ node, reason, why: message }, 'certificate request refused');
    return { status, body: { error: status === 400 ? 'BadRequest' : status === 403 ? 'Forbidden' : status === 429 ? 'TooManyRequests' : 'CertificateUnavailable', message, reason }, ...(retryAfterS ? { retryAfterS } : {}) };
  }

  rateLimited(node: string): Answer & { body: ErrorBody } {
    return this.refuse(node, 429, 'rate_limited', `node ${node} exceeds ${this.rate.perSecond} certificate requests per second (burst ${this.rate.burst})`, 1);
  }

  /** How many identities one batch request carried (identity-batch.ts). */
  observeBatch(entries: number): void {
    this.batchEntries.observe(entries);
  }

  /** The parsed CSR when it is exactly a request for `identity` with a P-256 key; otherwise why not. */
  private async checkCsr(pem: string, trustDomain: string, identity: WorkloadIdentity, field: string): Promise<{ csr: ParsedCsr } | { reason: Refusal; message: string }> {
    let csr: ParsedCsr;
    try {
      csr = await parseCsr(pem, field);
    } catch (err) {
      return { reason: 'bad_request', message: errorMessage(err) };
    }
    if (!csr.signatureValid) return { reason: 'bad_request', message: 'invalid csr: its signature does not verify with the key it carries' };
    if (csr.keyAlgorithm !== 'ECDSA P-256') return { reason: 'key_algorithm', message: new InvalidInputError(`${field} public key`, csr.keyAlgorithm, 'must be ECDSA P-256').message };
    const dns = identityDnsName(trustDomain, identity);
    const uri = spiffeId(trustDomain, identity);
    const exactly = (field: string, have: string[], want: string): string | undefined =>
      have.length === 1 && have[0] === want ? undefined : new InvalidInputError(field, have, `must be exactly [${JSON.stringify(want)}] for identity ${identityKey(identity)}`).message;
    const why = exactly(`${field} subject CN`, csr.commonNames, dns) ?? exactly(`${field} DNS SANs`, csr.dnsNames, dns) ?? exactly(`${field} URI SANs`, csr.uris, uri) ?? (csr.otherNames.length ? new InvalidInputError(`${field} SANs`, csr.otherNames, 'only the DNS and URI names of the identity are allowed').message : undefined);
    return why ? { reason: 'csr_mismatch', message: why } : { csr };
  }

  /** Take one of `node`'s rate tokens (a batch takes one per identity, and one when it is refused as a whole). */
  take(node: string): boolean {
    const now = this.now();
    const b = this.buckets.get(node) ?? { tokens: this.rate.burst, at: now };
    b.tokens = Math.min(this.rate.burst, b.tokens + ((now - b.at) / 1000) * this.rate.perSecond);
    b.at = now;
    this.buckets.set(node, b);
    if (b.tokens < 1) return false;
    b.tokens -= 1;
    return true;
  }

  private heldBy(node: string): Map<string, number> {
    let m = this.held.get(node);
    if (!m) this.held.set(node, (m = new Map()));
    const now = this.now();
    for (const [k, until] of m) if (until <= now) m.delete(k);
    return m;
  }
}

/** Routes on the policy server; `authorized` is the policy path's token check (401/403 sent when false). */
export function registerIdentityRoutes(
  app: FastifyInstance,
  service: IdentityService,
  authorized: (req: FastifyRequest<{ Params: { node: string } }>, reply: FastifyReply) => Promise<boolean>,
): void {
  app.post<{ Params: { node: string } }>('/v1/nodes/:node/identities', async (req, reply) => {
    if (!(await authorized(req, reply))) return reply;
    const a = await service.issue(req.params.node, req.body);
    if (a.retryAfterS) reply.header('retry-after', String(a.retryAfterS));
    return reply.code(a.status).header('cache-control', 'no-store').send(a.body);
  });
  app.post<{ Params: { node: string } }>('/v1/nodes/:node/identities/batch', { bodyLimit: BATCH_BODY_LIMIT }, async (req, reply) => {
    if (!(await authorized(req, reply))) return reply;
    const a = await issueBatch(service, req.params.node, req.body);
    if (a.retryAfterS) reply.header('retry-after', String(a.retryAfterS));
    return reply.code(a.status).header('cache-control', 'no-store').send(a.body);
  });
}
