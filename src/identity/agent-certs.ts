import { createPrivateKey, X509Certificate } from 'node:crypto';
import { mkdir, readFile, rm, stat } from 'node:fs/promises';
import { Agent, request } from 'node:https';
import { join } from 'node:path';
import { gatewayIdentities } from '../gateway/render.js';
import { multiclusterIdentities } from '../multicluster/identity.js';
import { Counter, Gauge, type Registry } from 'prom-client';
import { MAX_BATCH } from '../controller/identity-batch.js';
import { errorMessage, FsmNodeError } from '../errors.js';
import { writeFileAtomic } from '../policy/store.js';
import { DEFAULT_TRUST, type NodePolicy } from '../policy/schema.js';
import { logger } from '../util/log.js';
import { ownKeyFiles, type FileOwner } from './key-files.js';
import { identityKey, sameIdentity, type WorkloadIdentity } from './spiffe.js';
import { createCsr, generateKeyPair, parseCertificate, privateKeyToPem, splitPem, verifyChain } from './x509.js';

const log = logger('identity-agent');

/**
 * The agent's workload certificates (docs/security.md "On the node"): one per
 * identity (service account) that has a mesh pod on this node. Fetched when
 * the first pod of an identity appears, dropped (files removed) when the last
 * one leaves. The key pair is made here and never sent: the controller gets a
 * CSR. Key (0600) and chain live in <stateDir>/identities/<ns>/<sa>/, so
 * they survive an agent restart and a controller outage; they are read back
 * at start. Renewal at half life (±10 % jitter); failures back off per
 * identity (0.5 s doubling to 150 s) while the valid certificate stays in
 * use. A certificate that expires without renewal makes its identity fail
 * closed: state 'expired' with the reason, a metric and an event, never a
 * silently expired certificate handed to the proxy.
 */

export type IdentityCertState = 'pending' | 'valid' | 'expired';

export interface IdentityCert {
  identity: WorkloadIdentity;
  state: IdentityCertState;
  /** Leaf first (empty while pending). */
  certChainPem: string[];
  keyPath: string;
  certPath: string;
  notAfter?: Date;
  /** When the next renewal (or retry) is due. */
  nextAttempt?: Date;
  /** The last failure to obtain a certificate (cleared on success). */
  lastError?: string;
  /** Why the identity is failing closed (state 'expired'). */
  reason?: string;
}

/** What the controller answers (POST /v1/nodes/:node/identities). */
export interface IssuedAnswer {
  certificateChain: string[];
  trustBundle: string[];
  notAfter: string;
}

export interface IdentityIssuer {
  issue(identity: WorkloadIdentity, csrPem: string): Promise<IssuedAnswer>;
}

export class IdentityFetchError extends FsmNodeError {
  constructor(
    readonly reason: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super('FSMN_ERR_IDENTITY', message, options);
  }
}

export interface ControllerIssuerOptions {
  url: string;
  node: string;
  ca: string | Buffer;
  token: () => string;
  timeoutMs?: number;
  /** Identities asked for with no more than this gap between them go in one batch request (default 5 ms; 0: one request each). */
  coalesceMs?: number;
  /** A batch is sent at the latest this long after its first identity (default 50 ms). */
  coalesceMaxMs?: number;
  /** Most identities per batch request (default and ceiling: the controller's MAX_BATCH). */
  maxBatch?: number;
}

/** After an older controller answered 404/405 to a batch, ask one identity per request for this long, then try a batch again. */
export const BATCH_UNSUPPORTED_RETRY_MS = 10 * 60_000;

interface Waiting {
  identity: WorkloadIdentity;
  csrPem: string;
  resolve(a: IssuedAnswer): void;
  reject(err: unknown): void;
}

interface Reply {
  status: number;
  body: Record<string, unknown>;
  text: string;
}

/**
 * The controller's certificate endpoints over HTTPS, with the agent's
 * node-bound token. Identities asked for at about the same moment (agent
 * start, a burst of new pods, renewals due together) are gathered for a few
 * milliseconds and sent as one batch request (POST .../identities/batch):
 * each request costs the controller about as much in HTTPS, JSON and routing
 * as checking and signing one certificate (bench/identity-issue.ts). The
 * answer is per identity, so each caller gets its own certificate or its
 * own refusal, and backoff and expiry stay per identity (IdentityManager).
 * A lone identity, and every identity for a while after an older controller
 * answered the batch route with 404/405, goes to the single route.
 *
 * Connections are kept alive (a few per node, closed after 20 s idle, before
 * the controller's own idle timeout): a fresh TLS handshake per request cost
 * the controller more CPU than checking and signing a certificate
 * (--connection-per-request). A request that fails on a kept connection the
 * controller closed meanwhile is sent once more on a new one.
 */
export function controllerIssuer(o: ControllerIssuerOptions): IdentityIssuer {
  const agent = new Agent({ keepAlive: true, maxSockets: 4, timeout: 20_000 });
  const coalesceMs = o.coalesceMs ?? 5;
  const coalesceMaxMs = o.coalesceMaxMs ?? 50;
  const maxBatch = Math.max(1, Math.min(o.maxBatch ?? MAX_BATCH, MAX_BATCH));
  const base = `/v1/nodes/${encodeURIComponent(o.node)}/identities`;

  const post = (path: string, body: unknown, retry: boolean): Promise<Reply> =>
    new Promise((resolve, reject) => {
      let token: string;
      try {
        token = o.token();
      } catch (err) {
        return reject(new IdentityFetchError('token', errorMessage(err), { cause: err }));
      }
      const req = request(new URL(path, o.url), { method: 'POST', ca: o.ca, agent, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' } }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let parsed: unknown;
          try {
            parsed = JSON.parse(text);
          } catch {
            /* reported by the caller */
          }
          resolve({ status: res.statusCode ?? 0, body: parsed && typeof parsed === 'object' ? (parsed as Record<string, unknown>) : {}, text });
        });
      });
      req.setTimeout(o.timeoutMs ?? 30_000, () => req.destroy(new Error('no answer from the controller')));
      req.on('error', (err: NodeJS.ErrnoException) => {
        // The controller closed an idle kept connection as we reused it: nothing reached it, ask again on a new one.
        if (retry && req.reusedSocket && (err.code === 'ECONNRESET' || err.code === 'EPIPE')) return resolve(post(path, body, false));
        reject(new IdentityFetchError('network', errorMessage(err), { cause: err }));
      });
      req.end(JSON.stringify(body));
    });
  const refusal = (status: number, body: Record<string, unknown>, text: string) =>
    new IdentityFetchError(`http_${status}`, `controller answered ${status}: ${typeof body.message === 'string' ? body.message : text.slice(0, 200)}`);

  const single = async (identity: WorkloadIdentity, csrPem: string): Promise<IssuedAnswer> => {
    const r = await post(base, { namespace: identity.namespace, serviceAccount: identity.serviceAccount, csr: csrPem }, true);
    if (r.status === 200 && Array.isArray(r.body.certificateChain)) return r.body as unknown as IssuedAnswer;
    throw refusal(r.status, r.body, r.text);
  };

  let batchUnsupportedUntil = 0;
  const batch = async (items: Waiting[]): Promise<void> => {
    let r: Reply;
    try {
      r = await post(`${base}/batch`, { requests: items.map((w) => ({ namespace: w.identity.namespace, serviceAccount: w.identity.serviceAccount, csr: w.csrPem })) }, true);
    } catch (err) {
      for (const w of items) w.reject(err);
      return;
    }
    if (r.status === 404 || r.status === 405) {
      if (batchUnsupportedUntil === 0) log.info({ status: r.status }, 'the controller has no batch certificate route (an older version); asking one identity per request');
      batchUnsupportedUntil = Date.now() + BATCH_UNSUPPORTED_RETRY_MS;
      for (const w of items) single(w.identity, w.csrPem).then(w.resolve, w.reject);
      return;
    }
    const results = r.body.results;
    if (r.status !== 200 || !Array.isArray(results) || results.length !== items.length) {
      const err = r.status === 200 ? new IdentityFetchError('invalid_answer', `the controller answered ${results === undefined ? 'no results' : 'results that do not match the request'} to a batch of ${items.length}`) : refusal(r.status, r.body, r.text);
      for (const w of items) w.reject(err);
      return;
    }
    const trustBundle = Array.isArray(r.body.trustBundle) ? (r.body.trustBundle as string[]) : [];
    items.forEach((w, i) => {
      const one = (results[i] ?? {}) as Record<string, unknown>;
      if (one.status === 200 && Array.isArray(one.certificateChain)) w.resolve({ certificateChain: one.certificateChain as string[], trustBundle, notAfter: String(one.notAfter) });
      else w.reject(refusal(typeof one.status === 'number' ? one.status : 0, one, JSON.stringify(one)));
    });
  };

  let queue: Waiting[] = [];
  let timer: NodeJS.Timeout | undefined;
  let openedAt = 0;
  const flush = (): void => {
    if (timer) clearTimeout(timer);
    timer = undefined;
    const items = queue;
    queue = [];
    if (items.length === 1 || Date.now() < batchUnsupportedUntil) for (const w of items) single(w.identity, w.csrPem).then(w.resolve, w.reject);
    else if (items.length > 1) void batch(items);
  };
  return {
    issue: (identity, csrPem) => {
      if (coalesceMs <= 0) return single(identity, csrPem);
      return new Promise<IssuedAnswer>((resolve, reject) => {
        queue.push({ identity, csrPem, resolve, reject });
        if (queue.length >= maxBatch) return flush();
        if (queue.length === 1) openedAt = performance.now();
        if (timer) clearTimeout(timer);
        timer = setTimeout(flush, Math.max(0, Math.min(coalesceMs, openedAt + coalesceMaxMs - performance.now())));
      });
    },
  };
}

export interface IdentityManagerOptions {
  stateDir: string;
  issuer: IdentityIssuer;
  /** Owner of key and certificate files (the proxy's runAs uid/gid), so the proxy can read its keys. */
  owner?: FileOwner;
  registry?: Registry;
  /** Backoff between failed attempts of one identity. */
  backoff?: { initialMs: number; maxMs: number };
  /** Renew at this fraction of the remaining lifetime (default 0.5), ± jitter (default 0.1). */
  renewAt?: number;
  jitter?: number;
  now?: () => number;
  random?: () => number;
  /** A certificate was obtained, renewed, dropped or expired: the proxy's configuration should follow. */
  onChange?: () => void;
  /** An identity started or stopped failing closed (expired without renewal). */
  onExpired?: (identity: WorkloadIdentity, reason: string | undefined) => void;
  /**
   * Awaited before asking for a certificate for an identity that is failing
   * closed: the agent reports it to the controller first, so the controller
   * hears of the expiry (its Node Event) even when the same contact ends it.
   * Errors are ignored (the request that follows will fail the same way).
   */
  beforeRecover?: () => Promise<void>;
}

interface Entry {
  cert: IdentityCert;
  /** When the certificate in use was received (renewal is due at a fraction of [receivedAt, notAfter]). */
  receivedAt?: number;
  failures: number;
  timer?: NodeJS.Timeout;
  expiryTimer?: NodeJS.Timeout;
  busy?: Promise<void>;
  gone?: boolean;
}

export const IDENTITIES_DIR = 'identities';
/**
 * Retry ceiling for an identity that is failing closed. A valid certificate
 * can wait (backoff up to 150 s, as ztunnel); an expired one is an outage of
 * that identity's cross-node traffic, and one refused HTTPS request every
 * 10 s is cheap next to it.
 */
export const EXPIRED_RETRY_MAX_MS = 10_000;

export class IdentityManager {
  private readonly entries = new Map<string, Entry>();
  private trustDomain = DEFAULT_TRUST.trustDomain;
  private bundle: string[] = [];
  private readonly now: () => number;
  private readonly random: () => number;
  private readonly backoff: { initialMs: number; maxMs: number };
  private readonly failures: Counter | undefined;
  private stopped = false;

  constructor(private readonly o: IdentityManagerOptions) {
    this.now = o.now ?? Date.now;
    this.random = o.random ?? Math.random;
    this.backoff = o.backoff ?? { initialMs: 500, maxMs: 150_000 };
    if (o.registry) {
      const entries = this.entries;
      new Gauge({
        name: 'fsm_node_identity_certificate_expiry_timestamp_seconds',
        help: 'When the workload certificate of each local identity expires (Unix seconds).',
        labelNames: ['identity'],
        registers: [o.registry],
        collect() {
          this.reset();
          for (const [k, e] of entries) if (e.cert.notAfter) this.set({ identity: k }, e.cert.notAfter.getTime() / 1000);
        },
      });
      new Gauge({
        name: 'fsm_node_identities',
        help: 'Local identities by certificate state (expired: failing closed).',
        labelNames: ['state'],
        registers: [o.registry],
        collect() {
          this.reset();
          for (const s of ['pending', 'valid', 'expired']) this.set({ state: s }, 0);
          for (const e of entries.values()) this.inc({ state: e.cert.state });
        },
      });
      this.failures = new Counter({
        name: 'fsm_node_identity_certificate_failures_total',
        help: 'Failed attempts to obtain a workload certificate, by kind (issue: none held; renew: a valid one held) and reason.',
        labelNames: ['kind', 'reason'],
        registers: [o.registry],
      });
    }
  }

  /** The local identities a policy asks for: the service accounts of this node's mesh pods. */
  static identitiesOf(policy: NodePolicy): WorkloadIdentity[] {
    const seen = new Map<string, WorkloadIdentity>();
    for (const p of policy.pods) seen.set(`${p.namespace}/${p.serviceAccount}`, { namespace: p.namespace, serviceAccount: p.serviceAccount });
    // A Gateway served on this node speaks into the mesh with its own identity (src/gateway/render.ts).
    for (const g of gatewayIdentities(policy)) seen.set(`${g.namespace}/${g.serviceAccount}`, g);
    // A clusterset member's node proxy presents the gateway identity to other clusters (src/multicluster/identity.ts).
    for (const g of multiclusterIdentities(policy)) seen.set(`${g.namespace}/${g.serviceAccount}`, g);
    return [...seen.values()];
  }

  /**
   * Follow a policy: start obtaining certificates for new identities (from
   * disk when a usable one is stored, else from the controller), drop those
   * whose last pod left. A trust domain change renews every identity.
   */
  /**
   * Follow the policy's local identities. Resolves once every new identity's
   * stored certificate is read (not fetched): a restarted agent then renders
   * the proxy configuration it adopts with the certificates the running proxy
   * already uses, not as pending (which made the adopted proxy refuse tunnels
   * with identity-unavailable until the read finished).
   */
  update(policy: NodePolicy): Promise<void> {
    if (this.stopped) return Promise.resolve();
    const trust = policy.trust ?? DEFAULT_TRUST;
    const bundleChanged = trust.bundle.join('') !== this.bundle.join('');
    this.bundle = trust.bundle;
    const domainChanged = trust.trustDomain !== this.trustDomain;
    this.trustDomain = trust.trustDomain;
    const want = new Map(IdentityManager.identitiesOf(policy).map((id) => [identityKey(id), id]));
    for (const [k, e] of this.entries) {
      if (!want.has(k)) this.drop(k, e);
      else if (domainChanged) this.schedule(e, 0);
      else if (bundleChanged && e.cert.state === 'valid') {
        // End of a root rotation: a certificate of a root no longer trusted is renewed now, not at half life.
        const chain = e.cert.certChainPem;
        void this.verify(chain, this.bundle).then((why) => {
          if (why && e.cert.certChainPem === chain) {
            log.info({ identity: k, why }, 'certificate no longer verifies against the trust bundle; renewing now');
            this.schedule(e, 0);
          }
        });
      }
    }
    const loads: Promise<void>[] = [];
    for (const [k, id] of want) {
      if (this.entries.has(k)) continue;
      const dir = join(this.o.stateDir, IDENTITIES_DIR, id.namespace, id.serviceAccount);
      const e: Entry = { cert: { identity: id, state: 'pending', certChainPem: [], keyPath: join(dir, 'key.pem'), certPath: join(dir, 'cert.pem') }, failures: 0 };
      this.entries.set(k, e);
      e.busy = this.loadStored(e).then((ok) => {
        e.busy = undefined;
        if (!ok) this.schedule(e, 0);
      });
      loads.push(e.busy);
    }
    return Promise.all(loads).then(() => undefined);
  }

  /** Every local identity: its chain, key and certificate paths, expiry and state. */
  snapshot(): Map<string, IdentityCert> {
    return new Map([...this.entries].map(([k, e]) => [k, { ...e.cert, identity: { ...e.cert.identity }, certChainPem: [...e.cert.certChainPem] }]));
  }

  /** For /v1/state and `fsm-node status`. */
  status(): { identity: string; state: IdentityCertState; notAfter?: string; nextAttempt?: string; lastError?: string; reason?: string }[] {
    return [...this.entries].map(([k, e]) => ({
      identity: k,
      state: e.cert.state,
      ...(e.cert.notAfter ? { notAfter: e.cert.notAfter.toISOString() } : {}),
      ...(e.cert.nextAttempt ? { nextAttempt: e.cert.nextAttempt.toISOString() } : {}),
      ...(e.cert.lastError ? { lastError: e.cert.lastError } : {}),
      ...(e.cert.reason ? { reason: e.cert.reason } : {}),
    }));
  }

  /** Identities failing closed, with the reason (reported to the controller for a Node Event). */
  expired(): { namespace: string; serviceAccount: string; reason: string }[] {
    return [...this.entries.values()].filter((e) => e.cert.state === 'expired').map((e) => ({ ...e.cert.identity, reason: e.cert.reason ?? 'expired' }));
  }

  /**
   * The controller is reachable again (the policy client got through after
   * failures): every identity that is failing (renewal errors, pending or
   * expired) tries at once instead of waiting out its backoff, which after a
   * long outage is up to 150 s. Returns how many were rescheduled.
   */
  retryNow(why: string): number {
    let n = 0;
    for (const [k, e] of this.entries) {
      if (e.busy || e.failures === 0) continue;
      log.info({ identity: k, why, state: e.cert.state }, 'retrying the certificate now');
      this.schedule(e, 0);
      n++;
    }
    return n;
  }

  /** Wait until no fetch is under way (tests, shutdown). */
  async settled(): Promise<void> {
    for (;;) {
      const busy = [...this.entries.values()].map((e) => e.busy).filter(Boolean);
      if (busy.length === 0) return;
      await Promise.all(busy);
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const e of this.entries.values()) this.clearTimers(e);
    await this.settled();
  }

  // ---- internals -------------------------------------------------------------

  private schedule(e: Entry, delayMs: number): void {
    if (this.stopped || e.gone) return;
    if (e.timer) clearTimeout(e.timer);
    e.cert.nextAttempt = new Date(this.now() + delayMs);
    e.timer = setTimeout(() => {
      e.timer = undefined;
      if (e.busy) return this.schedule(e, 50);
      e.busy = this.fetch(e).finally(() => (e.busy = undefined));
    }, delayMs);
    e.timer.unref();
  }

  private async fetch(e: Entry): Promise<void> {
    const id = e.cert.identity;
    const k = identityKey(id);
    const kind = e.cert.state === 'valid' ? 'renew' : 'issue';
    try {
      const keys = await generateKeyPair();
      const csr = await createCsr(keys, this.trustDomain, id);
      // Decided only now, with nothing awaited between it and the request: the
      // certificate can expire while the key and CSR are made (seen under qemu).
      if (e.cert.state === 'expired') await this.o.beforeRecover?.().catch(() => undefined);
      const answer = await this.o.issuer.issue(id, csr);
      const keyPem = await privateKeyToPem(keys.privateKey);
      const chain = answer.certificateChain.flatMap((p) => splitPem(p));
      this.check(chain, keyPem, id);
      // The controller's answer comes over the same authenticated channel as the policy: its bundle is as good.
      const why = await verifyChain(chain, answer.trustBundle ?? [], new Date(this.now()));
      if (why) throw new IdentityFetchError('invalid_answer', `the certificate returned does not verify against the trust bundle: ${why}`);
      if (e.gone || this.stopped) return;
      await this.store(e, keyPem, chain);
      if (e.gone) return void (await this.removeFiles(e));
      e.failures = 0;
      this.install(e, chain, this.now());
      log.info({ identity: k, notAfter: e.cert.notAfter!.toISOString(), kind }, kind === 'renew' ? 'certificate renewed' : 'certificate obtained');
      this.o.onChange?.();
    } catch (err) {
      if (e.gone || this.stopped) return;
      e.failures++;
      const reason = err instanceof IdentityFetchError ? err.reason : err instanceof FsmNodeError ? err.code : 'error';
      this.failures?.inc({ kind, reason });
      e.cert.lastError = errorMessage(err);
      // Failing closed costs traffic every second: an expired identity retries at least every EXPIRED_RETRY_MAX_MS.
      const cap = e.cert.state === 'expired' ? Math.min(this.backoff.maxMs, EXPIRED_RETRY_MAX_MS) : this.backoff.maxMs;
      const delay = Math.min(cap, this.backoff.initialMs * 2 ** Math.min(e.failures - 1, 30));
      log.warn({ identity: k, kind, failures: e.failures, retryInMs: Math.round(delay), err: e.cert.lastError }, 'could not obtain a certificate; keeping the one held, if valid');
      this.schedule(e, delay);
    }
  }

  /** The chain must be for this identity (in the current trust domain) and this key. */
  private check(chain: string[], keyPem: string, id: WorkloadIdentity): void {
    if (chain.length === 0) throw new IdentityFetchError('invalid_answer', 'the controller returned no certificate');
    const leaf = parseCertificate(chain[0]!, 'certificateChain[0]');
    if (!leaf.identity || !sameIdentity(leaf.identity, id) || leaf.trustDomain !== this.trustDomain) {
      throw new IdentityFetchError('invalid_answer', `the controller returned a certificate for ${leaf.uris.join(',') || leaf.subject}, not ${identityKey(id)} in ${this.trustDomain}`);
    }
    if (!new X509Certificate(chain[0]!).checkPrivateKey(createPrivateKey(keyPem))) throw new IdentityFetchError('invalid_answer', 'the certificate is not for the key this node generated');
  }

  private async verify(chain: string[], bundle: string[]): Promise<string | undefined> {
    return bundle.length ? verifyChain(chain, bundle, new Date(this.now())) : undefined;
  }

  private install(e: Entry, chain: string[], receivedAt: number): void {
    const leaf = parseCertificate(chain[0]!);
    const wasExpired = e.cert.state === 'expired';
    e.cert = { ...e.cert, state: 'valid', certChainPem: chain, notAfter: leaf.notAfter, lastError: undefined, reason: undefined };
    e.receivedAt = receivedAt;
    const lifetime = leaf.notAfter.getTime() - receivedAt;
    const fraction = (this.o.renewAt ?? 0.5) * (1 + (this.o.jitter ?? 0.1) * (2 * this.random() - 1));
    this.schedule(e, Math.max(0, lifetime * fraction));
    this.armExpiry(e, leaf.notAfter);
    if (wasExpired) {
      log.info({ identity: identityKey(e.cert.identity) }, 'identity has a valid certificate again');
      this.o.onExpired?.(e.cert.identity, undefined);
    }
  }

  private armExpiry(e: Entry, notAfter: Date): void {
    if (e.expiryTimer) clearTimeout(e.expiryTimer);
    // setTimeout holds at most ~24.8 days; a longer certificate re-arms on its renewal anyway.
    e.expiryTimer = setTimeout(() => this.expire(e), Math.min(Math.max(0, notAfter.getTime() - this.now()), 2 ** 31 - 1));
    e.expiryTimer.unref();
  }

  private expire(e: Entry): void {
    e.expiryTimer = undefined;
    if (e.gone || !e.cert.notAfter) return;
    // A timer may fire a millisecond before the wall clock reaches notAfter (or
    // the clock was set back): wait again rather than never failing closed.
    if (e.cert.notAfter.getTime() > this.now()) return this.armExpiry(e, e.cert.notAfter);
    const k = identityKey(e.cert.identity);
    const reason = `certificate expired at ${e.cert.notAfter.toISOString()} without renewal${e.cert.lastError ? `: ${e.cert.lastError}` : ''}`;
    e.cert = { ...e.cert, state: 'expired', reason };
    log.error({ identity: k, reason }, 'identity fails closed: its certificate expired');
    // Its next attempt may be far off (a long backoff): from now on it retries within EXPIRED_RETRY_MAX_MS.
    if (!e.busy && (e.cert.nextAttempt?.getTime() ?? 0) > this.now() + EXPIRED_RETRY_MAX_MS) this.schedule(e, 0);
    this.o.onExpired?.(e.cert.identity, reason);
    this.o.onChange?.();
  }

  /** A stored key and chain that match, name the identity in the current trust domain and have not expired. */
  private async loadStored(e: Entry): Promise<boolean> {
    let keyPem: string;
    let certText: string;
    let receivedAt: number;
    try {
      [keyPem, certText] = await Promise.all([readFile(e.cert.keyPath, 'utf8'), readFile(e.cert.certPath, 'utf8')]);
      receivedAt = (await stat(e.cert.certPath)).mtimeMs;
    } catch {
      return false;
    }
    const k = identityKey(e.cert.identity);
    try {
      const chain = splitPem(certText);
      this.check(chain, keyPem, e.cert.identity);
      const leaf = parseCertificate(chain[0]!);
      if (leaf.notAfter.getTime() <= this.now()) {
        log.info({ identity: k, notAfter: leaf.notAfter.toISOString() }, 'stored certificate has expired; fetching a new one');
        return false;
      }
      const why = await this.verify(chain, this.bundle);
      if (why) {
        log.info({ identity: k, why }, 'stored certificate does not verify against the trust bundle; fetching a new one');
        return false;
      }
      if (e.gone || this.stopped) return true;
      // Stored before the proxy got its own user (or by another one): hand the files over first.
      if (this.o.owner) await ownKeyFiles(this.keyFiles(e), this.o.owner);
      this.install(e, chain, Math.min(receivedAt, this.now()));
      log.info({ identity: k, notAfter: leaf.notAfter.toISOString() }, 'using the stored certificate');
      this.o.onChange?.();
      return true;
    } catch (err) {
      log.warn({ identity: k, err: errorMessage(err) }, 'stored certificate unusable; fetching a new one');
      return false;
    }
  }

  private async store(e: Entry, keyPem: string, chain: string[]): Promise<void> {
    const dir = join(e.cert.keyPath, '..');
    const base = join(this.o.stateDir, IDENTITIES_DIR);
    await mkdir(base, { recursive: true, mode: 0o711 });
    await mkdir(dir, { recursive: true, mode: 0o700 });
    // Directories first, files owned before they are renamed into place: a proxy with its own uid reloading
    // meanwhile reads either the old key or the new one, never a file it may not open.
    if (this.o.owner) await ownKeyFiles(this.keyFiles(e).slice(0, 2), this.o.owner);
    // Key first: a crash between the two leaves a key without its certificate, which loadStored refuses (mismatch).
    await writeFileAtomic(e.cert.keyPath, keyPem, 0o600, this.o.owner);
    await writeFileAtomic(e.cert.certPath, chain.join(''), 0o644, this.o.owner);
  }

  /** What the proxy's user must own: the namespace and identity directories, key and certificate. */
  private keyFiles(e: Entry): string[] {
    const dir = join(e.cert.keyPath, '..');
    return [join(dir, '..'), dir, e.cert.keyPath, e.cert.certPath];
  }

  private drop(k: string, e: Entry): void {
    e.gone = true;
    this.clearTimers(e);
    this.entries.delete(k);
    log.info({ identity: k }, 'last pod of the identity left; certificate dropped');
    void (async () => {
      await e.busy;
      await this.removeFiles(e);
    })();
    if (e.cert.state === 'expired') this.o.onExpired?.(e.cert.identity, undefined);
    this.o.onChange?.();
  }

  private async removeFiles(e: Entry): Promise<void> {
    // Only if no newer entry of the same identity took the directory over.
    const again = this.entries.get(identityKey(e.cert.identity));
    if (again && again !== e) return;
    await rm(join(e.cert.keyPath, '..'), { recursive: true, force: true }).catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'could not remove certificate files'));
  }

  private clearTimers(e: Entry): void {
    if (e.timer) clearTimeout(e.timer);
    if (e.expiryTimer) clearTimeout(e.expiryTimer);
    e.timer = e.expiryTimer = undefined;
  }
}
