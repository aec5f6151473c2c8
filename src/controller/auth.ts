import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { z } from 'zod';
import { errorMessage, FsmNodeError } from '../errors.js';
import { writeFileAtomic } from '../policy/store.js';
import { formatIssues } from '../policy/schema.js';
import { logger } from '../util/log.js';

/**
 * Who is asking: every policy request carries a bearer token that binds the
 * caller to exactly one node. The server answers 401 when no node can be
 * bound to the token and 403 when the bound node is not the one asked for.
 * Tokens are never logged; cache keys are their SHA-256.
 */
export interface Caller {
  node: string;
  /** For logs: which credential vouched for the node (never the token). */
  principal: string;
}

export interface Authenticator {
  authenticate(token: string): Promise<Caller | undefined>;
}

export class AuthConfigError extends FsmNodeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('FSMN_ERR_AUTH_CONFIG', message, options);
  }
}

const sha256 = (s: string): Buffer => createHash('sha256').update(s).digest();

// ---- lab: a tokens file ------------------------------------------------------

const TokensFileSchema = z.record(z.string().min(1), z.string().min(32, 'tokens must have at least 32 characters'));

/** New random tokens for the given nodes (lab setup writes them with writeTokensFile). */
export function generateTokens(nodes: string[]): Record<string, string> {
  return Object.fromEntries(nodes.map((n) => [n, randomBytes(32).toString('base64url')]));
}

/** `{ "<node>": "<token>" }`, mode 0600, written atomically. */
export function writeTokensFile(path: string, tokens: Record<string, string>): Promise<void> {
  return writeFileAtomic(path, `${JSON.stringify(tokens, null, 2)}\n`, 0o600);
}

/**
 * Lab mode: a JSON file mapping node name to token, written at lab setup.
 * Re-read when it changes on disk, so nodes can be added without a restart.
 */
export class TokenFileAuthenticator implements Authenticator {
  private loaded: { stamp: string; byHash: { hash: Buffer; node: string }[] } | undefined;

  constructor(private readonly path: string) {
    this.table();
  }

  async authenticate(token: string): Promise<Caller | undefined> {
    const h = sha256(token);
    // Compare against every entry in constant time per entry: no early exit on a prefix.
    let found: string | undefined;
    for (const e of this.table()) if (timingSafeEqual(e.hash, h)) found = e.node;
    return found === undefined ? undefined : { node: found, principal: `lab token of ${found}` };
  }

  private table(): { hash: Buffer; node: string }[] {
    let stamp: string;
    try {
      const st = statSync(this.path);
      stamp = `${st.mtimeMs}:${st.size}:${st.ino}`;
    } catch (err) {
      if (this.loaded) return this.loaded.byHash;
      throw new AuthConfigError(`cannot read tokens file ${this.path}: ${errorMessage(err)}`, { cause: err });
    }
    if (this.loaded?.stamp === stamp) return this.loaded.byHash;
    try {
      const r = TokensFileSchema.safeParse(JSON.parse(readFileSync(this.path, 'utf8')));
      if (!r.success) throw new AuthConfigError(`tokens file ${this.path}: ${formatIssues(r.error)}`);
      this.loaded = { stamp, byHash: Object.entries(r.data).map(([node, token]) => ({ node, hash: sha256(token) })) };
    } catch (err) {
      // A half-edited file must not lock every agent out: keep the last good table.
      if (!this.loaded) throw err instanceof AuthConfigError ? err : new AuthConfigError(`tokens file ${this.path}: ${errorMessage(err)}`, { cause: err });
      logger('controller-auth').error({ path: this.path, err: errorMessage(err) }, 'tokens file unreadable; keeping the previous tokens');
    }
    return this.loaded.byHash;
  }
}

// ---- cluster: TokenReview ------------------------------------------------------

export interface TokenReviewResult {
  authenticated: boolean;
  username?: string;
  extra?: Record<string, string[]>;
}

export interface TokenReviewAuthOptions {
  /** Calls the API server's TokenReview (authentication.k8s.io/v1). */
  review(token: string): Promise<TokenReviewResult>;
  /** The pod's node and uid, from the informer cache or the API. */
  pod(namespace: string, name: string): Promise<{ nodeName: string | undefined; uid: string | undefined } | undefined>;
  /** namespace:name of the agent's ServiceAccount; tokens of any other account are refused. */
  agentServiceAccount: string;
  cacheTtlMs?: number;
  now?: () => number;
}

const POD_NAME = 'authentication.kubernetes.io/pod-name';
const POD_UID = 'authentication.kubernetes.io/pod-uid';

/**
 * Cluster mode: the agent sends its (projected, pod-bound) ServiceAccount
 * token. TokenReview says whose it is and, in the extra claims, which pod it
 * is bound to; that pod's spec.nodeName is the node the caller may read.
 * Results are cached briefly so a fleet of long-polling agents does not turn
 * into a TokenReview storm.
 */
export class TokenReviewAuthenticator implements Authenticator {
  private readonly cache = new Map<string, { until: number; caller: Caller | undefined }>();
  private readonly ttl: number;
  private readonly now: () => number;
  private readonly log = logger('controller-auth');

  constructor(private readonly o: TokenReviewAuthOptions) {
    this.ttl = o.cacheTtlMs ?? 30_000;
    this.now = o.now ?? Date.now;
  }

  async authenticate(token: string): Promise<Caller | undefined> {
    const key = sha256(token).toString('hex');
    const hit = this.cache.get(key);
    if (hit && hit.until > this.now()) return hit.caller;
    const caller = await this.resolve(token);
    if (this.cache.size > 10_000) this.cache.clear();
    this.cache.set(key, { until: this.now() + this.ttl, caller });
    return caller;
  }

  private async resolve(token: string): Promise<Caller | undefined> {
    const r = await this.o.review(token);
    if (!r.authenticated || !r.username) return undefined;
    const [ns, sa] = this.o.agentServiceAccount.split(':');
    if (r.username !== `system:serviceaccount:${ns}:${sa}`) {
      this.log.warn({ principal: r.username }, 'policy request with a token of another ServiceAccount');
      return undefined;
    }
    const podName = r.extra?.[POD_NAME]?.[0];
    if (!podName) {
      this.log.warn({ principal: r.username }, 'token is not bound to a pod (use a projected ServiceAccount token)');
      return undefined;
    }
    const pod = await this.o.pod(ns!, podName);
    const podUid = r.extra?.[POD_UID]?.[0];
    if (!pod?.nodeName || (podUid !== undefined && pod.uid !== undefined && podUid !== pod.uid)) return undefined;
    return { node: pod.nodeName, principal: `${r.username} pod ${podName}` };
  }
}
