import { request, Agent } from 'node:https';
import type { PeerCertificate } from 'node:tls';
import { errorMessage } from '../errors.js';
import { formatIssues } from '../policy/schema.js';
import { logger } from '../util/log.js';
import { peerClusterOf } from './identity.js';
import { applyExportsDelta, EXPORTS_DELTA_IM, ExportsDeltaSchema, ExportsDocumentSchema, type ExportsDocument } from './protocol.js';

const log = logger('multicluster-client');

export interface PeerState {
  cluster: string;
  url: string;
  /** The last document received (kept through outages, until the lease runs out). */
  doc: ExportsDocument | undefined;
  /** When the peer last answered (any answer, 304 included); epoch ms, 0 never. */
  lastSeen: number;
  /** Why the last attempt failed; undefined when it answered. */
  error: string | undefined;
}

export interface PeerClientOptions {
  cluster: string;
  url: string;
  tls: { cert: string; key: string; ca: string };
  /** Called when the document changed (not on 304s). */
  onChange: () => void;
  /** Called after every attempt, answered or failed (the controller reevaluates leases). */
  onAttempt?: () => void;
  /** Long-poll wait asked of the peer. Default 30 s. */
  waitMs?: number;
  /** A document restored from disk (after a restart, within its lease). */
  restored?: { doc: ExportsDocument; lastSeen: number };
  now?: () => number;
}

/**
 * One peer cluster's exports, long-polled over mutual TLS. The server's
 * certificate must chain to the clusterset CA and name the cluster we meant
 * to reach (not just any member of the clusterset: its host name is not
 * what is checked, its cluster identity is).
 */
export class PeerClient {
  readonly state: PeerState;
  private stopped = false;
  private current: { destroy(): void } | undefined;
  private readonly agent: Agent;
  private loop: Promise<void> | undefined;
  private readonly now: () => number;

  constructor(private readonly o: PeerClientOptions) {
    this.now = o.now ?? Date.now;
    this.state = { cluster: o.cluster, url: o.url, doc: o.restored?.doc, lastSeen: o.restored?.lastSeen ?? 0, error: undefined };
    this.agent = new Agent({
      keepAlive: true,
      cert: o.tls.cert,
      key: o.tls.key,
      ca: o.tls.ca,
      minVersion: 'TLSv1.3',
      checkServerIdentity: (_host: string, cert: PeerCertificate) =>
        peerClusterOf(cert.raw, [o.cluster]) === o.cluster ? undefined : new Error(`the server's certificate does not name cluster ${o.cluster}`),
    });
  }

  start(): void {
    this.loop ??= this.run();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.current?.destroy();
    await this.loop;
    this.agent.destroy();
  }

  private async run(): Promise<void> {
    let backoff = 250;
    while (!this.stopped) {
      try {
        await this.poll();
        this.state.error = undefined;
        backoff = 250;
      } catch (err) {
        if (this.stopped) break;
        const why = errorMessage(err);
        if (why !== this.state.error) log.warn({ peer: this.o.cluster, err: why }, 'peer cluster not answering; keeping its exports for the lease');
        this.state.error = why;
        this.o.onAttempt?.();
        await new Promise((r) => setTimeout(r, backoff));
        backoff = Math.min(backoff * 2, 5000);
      }
    }
  }

  private async poll(): Promise<void> {
    const held = this.state.doc;
    const wait = held ? (this.o.waitMs ?? 30_000) : 0;
    const headers: Record<string, string> = { accept: 'application/json' };
    if (held) {
      headers['if-none-match'] = `"${held.version}"`;
      headers['a-im'] = EXPORTS_DELTA_IM;
    }
    const url = new URL('/v1/clusterset/exports', this.o.url);
    if (wait) url.searchParams.set('wait', `${Math.round(wait / 1000)}s`);
    const res = await this.get(url, headers, wait + 10_000);
    if (res.status === 304) {
      this.state.lastSeen = this.now();
      this.o.onAttempt?.();
      return;
    }
    if (res.status !== 200 && res.status !== 226) throw new Error(`HTTP ${res.status}: ${res.body.slice(0, 200)}`);
    let doc: ExportsDocument | undefined;
    const json = JSON.parse(res.body) as unknown;
    if (res.status === 226) {
      const d = ExportsDeltaSchema.safeParse(json);
      if (!d.success) throw new Error(`invalid exports delta: ${formatIssues(d.error)}`);
      doc = held && applyExportsDelta(held, d.data);
      if (!doc) {
        // Drifted: drop what we hold and ask for the whole document.
        this.state.doc = undefined;
        return this.poll();
      }
    } else {
      const d = ExportsDocumentSchema.safeParse(json);
      if (!d.success) throw new Error(`invalid exports document: ${formatIssues(d.error)}`);
      doc = d.data;
    }
    if (doc.cluster !== this.o.cluster) throw new Error(`the document is of cluster ${doc.cluster}, not ${this.o.cluster}`);
    if (doc.exports.some((e) => e.cluster !== this.o.cluster)) throw new Error(`cluster ${this.o.cluster} sent exports of another cluster`);
    this.state.doc = doc;
    this.state.lastSeen = this.now();
    this.o.onChange();
    this.o.onAttempt?.();
  }

  private get(url: URL, headers: Record<string, string>, timeoutMs: number): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      const req = request(url, { agent: this.agent, headers, timeout: timeoutMs }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }));
        res.on('error', reject);
      });
      req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
      req.on('error', reject);
      req.end();
      this.current = req;
    });
  }
}
