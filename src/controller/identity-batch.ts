import { z } from 'zod';
import { formatIssues } from '../policy/schema.js';
import { logger } from '../util/log.js';
import type { ErrorBody, IdentityService, IssueAnswer } from './identities.js';

/**
 * Many workload certificates in one request (docs/security.md "Issuing"):
 *   POST /v1/nodes/:node/identities/batch  {requests: [{namespace, serviceAccount, csr}, ...]}
 *   -> 200 {trustBundle: [PEM], results: [{status: 200, certificateChain, notAfter} | {status, error, message, reason}, ...]}
 * An agent asks for every identity that falls due at the same moment (its
 * start, a burst of new pods, renewals due together) in one request: each
 * single request cost the controller about as much in HTTPS, JSON and
 * routing as checking and signing its certificate (bench/identity-issue.ts).
 *
 * Each entry goes through exactly the single route's checks
 * (IdentityService.issueIdentity) and is answered on its own, in order: one
 * entry the node may not have (403 not_on_node), a malformed one (400 naming
 * requests[i]) or one over the rate (429) does not fail the others. The rate
 * limit and the bound on identities count identities, not requests. Only
 * the envelope can fail the whole request: not an object, no entries, more
 * than MAX_BATCH.
 */

const log = logger('controller-identity-batch');

/** Most identities in one batch request (a node with more sends several). */
export const MAX_BATCH = 100;

export const BatchBodySchema = z
  .object({
    requests: z.array(z.unknown()).min(1, 'must name at least one identity').max(MAX_BATCH, `at most ${MAX_BATCH} identities per request`),
  })
  .strict();

export type BatchResult = ({ status: 200 } & Omit<IssueAnswer, 'trustBundle'>) | ({ status: number; retryAfter?: number } & ErrorBody);

export interface BatchAnswer {
  status: number;
  body: { trustBundle: string[]; results: BatchResult[] } | ErrorBody;
  retryAfterS?: number;
}

/** Answer one batch request of `node` (already authenticated as that node). */
export async function issueBatch(service: IdentityService, node: string, rawBody: unknown): Promise<BatchAnswer> {
  const started = performance.now();
  const envelope = BatchBodySchema.safeParse(rawBody);
  if (!envelope.success) {
    // A refused envelope costs a rate token like a refused single request: a node cannot flood for free.
    if (!service.take(node)) return service.rateLimited(node);
    return service.refuse(node, 400, 'bad_request', `invalid request: ${formatIssues(envelope.error)}`);
  }
  const entries = envelope.data.requests;
  service.observeBatch(entries.length);
  const first = new Map<string, number>();
  // issueIdentity checks synchronously up to its first await: the map runs every entry's checks in order, then signs them together.
  const answers = await Promise.all(
    entries.map((raw, i) =>
      service.issueIdentity(node, raw, {
        started,
        at: { path: ['requests', i], label: `requests[${i}]` },
        claim: (key) => {
          const j = first.get(key);
          if (j !== undefined) return `invalid requests[${i}]: identity ${key} is asked for in requests[${j}] already`;
          first.set(key, i);
          return undefined;
        },
      }),
    ),
  );
  const results: BatchResult[] = answers.map((a) => {
    if (a.status === 200 && 'certificateChain' in a.body) return { status: 200, certificateChain: a.body.certificateChain, notAfter: a.body.notAfter };
    return { status: a.status, ...(a.body as ErrorBody), ...(a.retryAfterS ? { retryAfter: a.retryAfterS } : {}) };
  });
  const issued = results.filter((r) => r.status === 200).length;
  log.info({ node, entries: entries.length, issued, refused: entries.length - issued, ms: Math.round(performance.now() - started) }, 'certificate batch answered');
  return { status: 200, body: { trustBundle: service.provider.trustBundle(), results } };
}
