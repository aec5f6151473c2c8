import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import type { IncomingMessage } from 'node:http';
import { Agent, request } from 'node:https';
import { gunzip, gunzipSync } from 'node:zlib';
import { promisify } from 'node:util';
import { errorMessage, FsmNodeError } from '../errors.js';
import { logger } from '../util/log.js';
import { applyDelta, DELTA_IM, DeltaError } from './delta.js';
import { formatIssues, NodePolicyDeltaSchema, NodePolicySchema, type NodeModeStatus, type NodePolicy } from './schema.js';
import { readLastGood, writeLastGood } from './store.js';

const gunzipAsync = promisify(gunzip);
/** Compressed bodies below this are inflated on the spot. */
const SYNC_GUNZIP_MAX = 64 * 1024;
const log = logger('policy-client');

/**
 * The agent's side of the policy protocol (docs/controller.md "Protocol"):
 * a long-poll loop against GET /v1/nodes/<node>/policy with the version it
 * holds in If-None-Match. Once it holds a policy it asks for deltas (A-IM,
 * policy/delta.ts): a change then costs its own size, not the policy's.
 * Every policy, and every piece a delta brings, is checked against the schema
 * before use, and kept on disk as the last good copy; at start the client serves that
 * copy until the controller answers, so a node keeps working through an
 * uplink outage and its own reboot. Failures back off exponentially with
 * jitter so a fleet of agents does not reconnect in step.
 */

export interface PolicyClientOptions {
  /** https://host:port of the controller. */
  url: string;
  node: string;
  /** PEM of the CA that signed the controller's certificate. */
  ca: string | Buffer;
  /** A fixed bearer token (lab), or a file read before every request (a projected ServiceAccount token rotates). */
  token?: string;
  tokenFile?: string;
  /** Where the last good policy is kept (<stateDir>/policy.json). */
  stateDir: string;
  /** Long-poll wait the client asks for (default 30 s). */
  waitSeconds?: number;
  backoff?: { initialMs: number; maxMs: number };
  /** Ask for deltas once a policy is held (default true). */
  deltas?: boolean;
}

export type FetchErrorKind = 'network' | 'status' | 'invalid' | 'persist' | 'token';

export interface PolicyClientStats {
  version: string | undefined;
  /** Milliseconds since epoch when the policy in hand was received from the controller. */
  receivedAt: number | undefined;
  /** Last time the controller confirmed the policy (a 200 or a 304). */
  lastContactAt: number | undefined;
  fetches: number;
  notModified: number;
  /** New versions taken in, by how they came. */
  updates: { full: number; delta: number };
  /** Body bytes received (compressed, as on the wire). */
  receivedBytes: number;
  errors: Record<FetchErrorKind, number>;
}

export interface PolicyEvent {
  policy: NodePolicy;
  receivedAt: number;
  source: 'controller' | 'disk';
}

class FetchError extends FsmNodeError {
  constructor(
    readonly kind: FetchErrorKind,
    message: string,
    options?: { cause?: unknown },
  ) {
    super('FSMN_ERR_POLICY_FETCH', message, options);
  }
}

export class PolicyClient extends EventEmitter {
  private readonly opts: Required<Omit<PolicyClientOptions, 'token' | 'tokenFile'>> & Pick<PolicyClientOptions, 'token' | 'tokenFile'>;
  private readonly agent: Agent;
  private held: PolicyEvent | undefined;
  private running: Promise<void> | undefined;
  private abort = new AbortController();
  private readonly counters: PolicyClientStats;
  /** After a delta that did not fit: ask for the whole policy once. */
  private fullNext = false;
  /** The newest policy not yet on disk, and the write in progress. */
  private unsaved: { policy: NodePolicy; receivedAt: number; text?: string } | undefined;
  private saving: Promise<void> | undefined;

  constructor(options: PolicyClientOptions) {
    super();
    if (!options.token === !options.tokenFile) throw new FsmNodeError('FSMN_ERR_INVALID_INPUT', 'PolicyClient needs exactly one of token and tokenFile');
    this.opts = { waitSeconds: 30, backoff: { initialMs: 500, maxMs: 30_000 }, deltas: true, ...options };
    this.agent = new Agent({ keepAlive: true, maxSockets: 1, ca: options.ca });
    this.counters = {
      version: undefined,
      receivedAt: undefined,
      lastContactAt: undefined,
      fetches: 0,
      notModified: 0,
      updates: { full: 0, delta: 0 },
      receivedBytes: 0,
      errors: { network: 0, status: 0, invalid: 0, persist: 0, token: 0 },
    };
  }

  /** Serve the last good copy from disk (if any) at once, then keep polling until stop(). */
  start(): void {
    if (this.running) return;
    const disk = readLastGood(this.opts.stateDir);
    if (disk.ok && disk.value.policy.node.name === this.opts.node) {
      this.hold({ ...disk.value, source: 'disk' });
      this.counters.lastContactAt = disk.value.receivedAt;
      log.info({ version: disk.value.policy.version }, 'starting from the last good policy on disk');
    } else if (disk.ok) {
      log.warn({ node: disk.value.policy.node.name }, 'last good policy on disk is for another node; ignored');
    } else {
      log.info({ why: disk.why }, 'no last good policy on disk');
    }
    this.abort = new AbortController();
    this.running = this.loop(this.abort.signal);
  }

  async stop(): Promise<void> {
    this.abort.abort();
    await this.running;
    this.running = undefined;
    this.agent.destroy();
    await this.persisted();
  }

  /** Resolves once the newest policy taken in is on disk (or its write failed, counted as a persist error). */
  async persisted(): Promise<void> {
    while (this.saving) await this.saving;
  }

  current(): PolicyEvent | undefined {
    return this.held;
  }

  onChange(fn: (e: PolicyEvent) => void): void {
    this.on('policy', fn);
  }

  /** The controller answered again after `failures` failed fetches in a row. */
  onReconnect(fn: (failures: number) => void): void {
    this.on('reconnected', fn);
  }

  fetchErrors(): number {
    return Object.values(this.counters.errors).reduce((a, b) => a + b, 0);
  }

  stats(): PolicyClientStats {
    return { ...this.counters, updates: { ...this.counters.updates }, errors: { ...this.counters.errors } };
  }

  private hold(e: PolicyEvent): void {
    this.held = e;
    this.counters.version = e.policy.version;
    this.counters.receivedAt = e.receivedAt;
    this.emit('policy', e);
  }

  private async loop(signal: AbortSignal): Promise<void> {
    let failures = 0;
    while (!signal.aborted) {
      try {
        await this.fetchOnce(signal);
        // Back in touch after failures: whoever waits on the controller (certificate renewals) can retry now.
        if (failures > 0) this.emit('reconnected', failures);
        failures = 0;
      } catch (err) {
        if (signal.aborted) break;
        const kind = err instanceof FetchError ? err.kind : 'network';
        this.counters.errors[kind]++;
        failures++;
        const delay = backoffDelay(failures, this.opts.backoff);
        log.warn({ err: errorMessage(err), kind, retryInMs: Math.round(delay) }, 'policy fetch failed; keeping the policy in hand');
        this.emit('fetchError', err);
        await sleep(delay, signal);
      }
    }
  }

  private async fetchOnce(signal: AbortSignal): Promise<void> {
    const headers: Record<string, string> = { authorization: `Bearer ${this.token()}`, 'accept-encoding': 'gzip' };
    if (this.held) {
      headers['if-none-match'] = `"${this.held.policy.version}"`;
      if (this.opts.deltas && !this.fullNext) headers['a-im'] = DELTA_IM;
    }
    const url = new URL(`/v1/nodes/${encodeURIComponent(this.opts.node)}/policy`, this.opts.url);
    url.searchParams.set('wait', `${this.opts.waitSeconds}s`);
    this.counters.fetches++;
    const res = await this.get(url, headers, signal);
    this.counters.receivedBytes += res.wireBytes;
    if (res.status === 304) {
      this.counters.notModified++;
      this.counters.lastContactAt = Date.now();
      return;
    }
    const delta = res.status === 226 && headers['a-im'] !== undefined;
    if (res.status !== 200 && !delta) throw new FetchError('status', `controller answered ${res.status}: ${res.body.toString('utf8').slice(0, 200)}`);
    const text = res.body.toString('utf8');
    let policy: NodePolicy;
    try {
      policy = delta ? this.applyDelta(text) : this.check(text);
      this.checkIdentity(policy, res.etag);
    } catch (err) {
      if (delta) this.fullNext = true;
      throw err;
    }
    this.fullNext = false;
    const receivedAt = Date.now();
    this.counters.lastContactAt = receivedAt;
    if (policy.version === this.held?.policy.version) return;
    this.counters.updates[delta ? 'delta' : 'full']++;
    this.hold({ policy, receivedAt, source: 'controller' });
    // After use, not before: the node must not wait on its disk to apply a policy.
    // A full policy is stored as received (it passed the strict schema, so it is the policy).
    this.persist({ policy, receivedAt, text: delta ? undefined : text });
  }

  private check(body: string): NodePolicy {
    const r = NodePolicySchema.safeParse(parseJson(body, 'policy'));
    if (!r.success) throw new FetchError('invalid', `policy fails the NodePolicy schema: ${formatIssues(r.error)}`);
    return r.data;
  }

  /** The held policy with the delta applied; every piece it brings passes its schema first. */
  private applyDelta(body: string): NodePolicy {
    const r = NodePolicyDeltaSchema.safeParse(parseJson(body, 'policy delta'));
    if (!r.success) throw new FetchError('invalid', `policy delta fails the NodePolicyDelta schema: ${formatIssues(r.error)}`);
    try {
      return applyDelta(this.held!.policy, r.data);
    } catch (err) {
      if (err instanceof DeltaError) throw new FetchError('invalid', `policy delta does not apply: ${err.message}`, { cause: err });
      throw err;
    }
  }

  private checkIdentity(policy: NodePolicy, etag: string | undefined): void {
    if (policy.node.name !== this.opts.node) throw new FetchError('invalid', `policy is for node ${JSON.stringify(policy.node.name)}, not ${JSON.stringify(this.opts.node)}`);
    if (etag !== undefined && etag !== `"${policy.version}"`) throw new FetchError('invalid', `ETag ${etag} does not match policy version ${policy.version}`);
  }

  /** Write the newest policy to disk, one write at a time: versions that arrive during a write fold into the next one. */
  private persist(p: { policy: NodePolicy; receivedAt: number; text?: string }): void {
    this.unsaved = p;
    this.saving ??= (async () => {
      while (this.unsaved) {
        const { policy, receivedAt, text } = this.unsaved;
        this.unsaved = undefined;
        try {
          await writeLastGood(this.opts.stateDir, policy, receivedAt, text);
        } catch (err) {
          // Still used: a full disk must not keep the node on an old policy.
          this.counters.errors.persist++;
          log.error({ err: errorMessage(err) }, 'could not store the last good policy');
        }
      }
      this.saving = undefined;
    })();
  }

  private token(): string {
    if (this.opts.token) return this.opts.token;
    try {
      return readFileSync(this.opts.tokenFile!, 'utf8').trim();
    } catch (err) {
      throw new FetchError('token', `cannot read token file ${this.opts.tokenFile}: ${errorMessage(err)}`);
    }
  }

  /** Tell the controller this node's interception mode (it posts an Event on a fallback). Throws on failure. */
  async reportStatus(status: NodeModeStatus): Promise<void> {
    const url = new URL(`/v1/nodes/${encodeURIComponent(this.opts.node)}/status`, this.opts.url);
    const body = JSON.stringify(status);
    const code = await new Promise<number>((resolve, reject) => {
      // Not on the pooled agent: its one socket is parked in the long-poll.
      const req = request(url, { method: 'POST', ca: this.opts.ca, agent: false, headers: { authorization: `Bearer ${this.token()}`, 'content-type': 'application/json' } }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      });
      req.setTimeout(10_000, () => req.destroy(new Error('no answer from the controller')));
      req.on('error', (err) => reject(new FetchError('network', errorMessage(err), { cause: err })));
      req.end(body);
    });
    if (code !== 204) throw new FetchError('status', `controller answered ${code} to the node status report`);
  }

  private get(url: URL, headers: Record<string, string>, signal: AbortSignal): Promise<{ status: number; etag: string | undefined; body: Buffer; wireBytes: number }> {
    return new Promise((resolve, reject) => {
      const req = request(url, { method: 'GET', headers, agent: this.agent, signal }, (res: IncomingMessage) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', (err) => reject(new FetchError('network', errorMessage(err), { cause: err })));
        res.on('end', () => {
          const raw = Buffer.concat(chunks);
          const done = (body: Buffer) => resolve({ status: res.statusCode ?? 0, etag: res.headers.etag, body, wireBytes: raw.length });
          const bad = (err: unknown) => reject(new FetchError('invalid', `bad gzip body: ${errorMessage(err)}`));
          if (res.headers['content-encoding'] !== 'gzip') done(raw);
          // A delta inflates in microseconds: a trip through libuv's thread pool (shared with fs and dns) costs more.
          else if (raw.length < SYNC_GUNZIP_MAX) {
            let body: Buffer;
            try {
              body = gunzipSync(raw);
            } catch (err) {
              return bad(err);
            }
            done(body);
          } else gunzipAsync(raw).then(done, bad);
        });
      });
      // A long-poll answers within the wait; silence well past it means a dead peer.
      req.setTimeout((this.opts.waitSeconds + 15) * 1000, () => req.destroy(new Error('no answer from the controller')));
      req.on('error', (err) => reject(new FetchError('network', errorMessage(err), { cause: err })));
      req.end();
    });
  }
}

function parseJson(body: string, what: string): unknown {
  try {
    return JSON.parse(body);
  } catch (err) {
    throw new FetchError('invalid', `${what} is not JSON: ${errorMessage(err)}`);
  }
}

/** Exponential backoff with equal jitter: half fixed, half random, capped. */
export function backoffDelay(failures: number, b: { initialMs: number; maxMs: number }, random = Math.random): number {
  const ceiling = Math.min(b.maxMs, b.initialMs * 2 ** Math.min(failures - 1, 30));
  return ceiling / 2 + (random() * ceiling) / 2;
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal.removeEventListener('abort', done);
      resolve();
    }
    signal.addEventListener('abort', done, { once: true });
  });
}
