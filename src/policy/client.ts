import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import type { IncomingMessage } from 'node:http';
import { Agent, request } from 'node:https';
import { gunzip } from 'node:zlib';
import { promisify } from 'node:util';
import { errorMessage, FsmNodeError } from '../errors.js';
import { logger } from '../util/log.js';
import { formatIssues, NodePolicySchema, type NodeModeStatus, type NodePolicy } from './schema.js';
import { readLastGood, writeLastGood } from './store.js';

const gunzipAsync = promisify(gunzip);
const log = logger('policy-client');

/**
 * The agent's side of the policy protocol (docs/controller.md "Protocol"):
 * a long-poll loop against GET /v1/nodes/<node>/policy with the version it
 * holds in If-None-Match. Every policy is checked against the schema before
 * use and kept on disk as the last good copy; at start the client serves that
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

  constructor(options: PolicyClientOptions) {
    super();
    if (!options.token === !options.tokenFile) throw new FsmNodeError('FSMN_ERR_INVALID_INPUT', 'PolicyClient needs exactly one of token and tokenFile');
    this.opts = { waitSeconds: 30, backoff: { initialMs: 500, maxMs: 30_000 }, ...options };
    this.agent = new Agent({ keepAlive: true, maxSockets: 1, ca: options.ca });
    this.counters = {
      version: undefined,
      receivedAt: undefined,
      lastContactAt: undefined,
      fetches: 0,
      notModified: 0,
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
  }

  current(): PolicyEvent | undefined {
    return this.held;
  }

  onChange(fn: (e: PolicyEvent) => void): void {
    this.on('policy', fn);
  }

  fetchErrors(): number {
    return Object.values(this.counters.errors).reduce((a, b) => a + b, 0);
  }

  stats(): PolicyClientStats {
    return { ...this.counters, errors: { ...this.counters.errors } };
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
    if (this.held) headers['if-none-match'] = `"${this.held.policy.version}"`;
    const url = new URL(`/v1/nodes/${encodeURIComponent(this.opts.node)}/policy`, this.opts.url);
    url.searchParams.set('wait', `${this.opts.waitSeconds}s`);
    this.counters.fetches++;
    const res = await this.get(url, headers, signal);
    if (res.status === 304) {
      this.counters.notModified++;
      this.counters.lastContactAt = Date.now();
      return;
    }
    if (res.status !== 200) throw new FetchError('status', `controller answered ${res.status}: ${res.body.toString('utf8').slice(0, 200)}`);
    const text = res.body.toString('utf8');
    const policy = this.check(text, res.etag);
    const receivedAt = Date.now();
    this.counters.lastContactAt = receivedAt;
    if (policy.version === this.held?.policy.version) return;
    try {
      // The text as received: it passed the (strict) schema, so it is the policy.
      writeLastGood(this.opts.stateDir, policy, receivedAt, text);
    } catch (err) {
      // Still use it: a full disk must not keep the node on an old policy.
      this.counters.errors.persist++;
      log.error({ err: errorMessage(err) }, 'could not store the last good policy');
    }
    this.hold({ policy, receivedAt, source: 'controller' });
  }

  private check(body: string, etag: string | undefined): NodePolicy {
    let json: unknown;
    try {
      json = JSON.parse(body);
    } catch (err) {
      throw new FetchError('invalid', `policy is not JSON: ${errorMessage(err)}`);
    }
    const r = NodePolicySchema.safeParse(json);
    if (!r.success) throw new FetchError('invalid', `policy fails the NodePolicy schema: ${formatIssues(r.error)}`);
    if (r.data.node.name !== this.opts.node) throw new FetchError('invalid', `policy is for node ${JSON.stringify(r.data.node.name)}, not ${JSON.stringify(this.opts.node)}`);
    if (etag !== undefined && etag !== `"${r.data.version}"`) throw new FetchError('invalid', `ETag ${etag} does not match policy version ${r.data.version}`);
    return r.data;
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

  private get(url: URL, headers: Record<string, string>, signal: AbortSignal): Promise<{ status: number; etag: string | undefined; body: Buffer }> {
    return new Promise((resolve, reject) => {
      const req = request(url, { method: 'GET', headers, agent: this.agent, signal }, (res: IncomingMessage) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', (err) => reject(new FetchError('network', errorMessage(err), { cause: err })));
        res.on('end', () => {
          const raw = Buffer.concat(chunks);
          const done = (body: Buffer) => resolve({ status: res.statusCode ?? 0, etag: res.headers.etag, body });
          if (res.headers['content-encoding'] === 'gzip') gunzipAsync(raw).then(done, (err: unknown) => reject(new FetchError('invalid', `bad gzip body: ${errorMessage(err)}`)));
          else done(raw);
        });
      });
      // A long-poll answers within the wait; silence well past it means a dead peer.
      req.setTimeout((this.opts.waitSeconds + 15) * 1000, () => req.destroy(new Error('no answer from the controller')));
      req.on('error', (err) => reject(new FetchError('network', errorMessage(err), { cause: err })));
      req.end();
    });
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
