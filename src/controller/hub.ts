import { promisify } from 'node:util';
import { constants, crc32, deflateRaw, deflateRawSync } from 'node:zlib';
import type { CompiledNode, SharedJson } from '../policy/compiler.js';
import { deltaPieces, type DeltaBase } from '../policy/delta.js';

const deflateRawAsync = promisify(deflateRaw);
/** gzip member header: magic, deflate, no flags, no mtime, no extra flags, OS unknown. */
const GZIP_HEADER = Buffer.from([0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);

/**
 * What is kept of `{` + a shared text (the start of every document that shares
 * it): its CRC and length, and its raw deflate ended with a full flush
 * (byte-aligned and free of back-references, so it can be spliced). Not the
 * text's bytes: in smi mode every node has a shared piece of its own, and
 * holding 100 of them as buffers cost ~90 MB at 10k pods.
 */
interface SharedEncoding {
  crc: number;
  length: number;
  deflated: Promise<Buffer>;
}

/** Smaller delta bodies go uncompressed. */
export const GZIP_MIN_BYTES = 1400;

/** Tails shorter than this go into the gzip body as a stored block (a zlib stream costs ~70 µs per node to set up). */
const STORED_TAIL_MAX = 1024;

/** Versions of a node remembered as delta bases: an agent a few versions behind still gets a delta. */
const HISTORY = 4;

type Pieces = readonly [shared: SharedJson, tail: string];

/**
 * Between the compiler and the HTTP server: the current policy of each node,
 * the long-polls waiting for a node's next version, the encoded bodies
 * (plain and gzip), made once per version however many requests want them,
 * and the last versions each node was known to hold, to send deltas from.
 */
export class PolicyHub {
  private isReady = false;
  private readonly waiters = new Map<string, Set<() => void>>();
  private readonly gzipped = new WeakMap<CompiledNode, Promise<Buffer>>();
  private readonly shared = new WeakMap<SharedJson, SharedEncoding>();
  /** Per node, the versions it was last known to hold, newest last: their parts only, not their encodings. */
  private readonly history = new Map<string, DeltaBase[]>();

  constructor(private readonly lookup: (node: string) => CompiledNode | undefined) {}

  /** False until the sources have synced once: an empty cache must never be served as an empty policy. */
  get ready(): boolean {
    return this.isReady;
  }

  setReady(): void {
    this.isReady = true;
  }

  get(node: string): CompiledNode | undefined {
    return this.lookup(node);
  }

  /** New versions for these nodes: wake their long-polls. */
  publish(nodes: Iterable<string>): void {
    for (const node of nodes) {
      if (!this.lookup(node)) this.history.delete(node);
      const set = this.waiters.get(node);
      if (!set) continue;
      this.waiters.delete(node);
      for (const wake of set) wake();
    }
  }

  /** Resolves at the node's next publish, after `ms`, or on abort, whichever is first. */
  wait(node: string, ms: number, signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      let set = this.waiters.get(node);
      if (!set) this.waiters.set(node, (set = new Set()));
      const done = () => {
        clearTimeout(timer);
        signal.removeEventListener('abort', done);
        set.delete(done);
        if (set.size === 0 && this.waiters.get(node) === set) this.waiters.delete(node);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal.addEventListener('abort', done, { once: true });
      set.add(done);
    });
  }

  /** Long-polls currently parked. */
  waiting(): number {
    let n = 0;
    for (const s of this.waiters.values()) n += s.size;
    return n;
  }

  /** Wake every long-poll (shutdown). */
  wakeAll(): void {
    this.publish([...this.waiters.keys()]);
  }

  /** The node now holds `c` (it was sent, or confirmed by a 304): a later delta may start from it. */
  held(c: CompiledNode): void {
    let list = this.history.get(c.node);
    if (!list) this.history.set(c.node, (list = []));
    if (list.at(-1)?.version === c.version) return;
    list.push({ version: c.version, parts: c.parts });
    if (list.length > HISTORY) list.shift();
  }

  /** A version the node was known to hold, when still remembered. */
  base(node: string, version: string): DeltaBase | undefined {
    return this.history.get(node)?.find((b) => b.version === version);
  }

  /** The policy uncompressed (made per request: agents ask for gzip, plain is for people with curl). */
  body(c: CompiledNode): Buffer {
    return this.plainOf(c.pieces());
  }

  /**
   * The NodePolicyDelta from `base` to `c` (policy/delta.ts), gzipped when
   * asked and worth it: a delta under a packet's size goes plain (gzip would
   * save a few hundred bytes for a deflate per node).
   */
  async delta(base: DeltaBase, c: CompiledNode, gzip: boolean): Promise<{ body: Buffer; gzip: boolean }> {
    const pieces = deltaPieces(base, c);
    // Characters, not bytes: near enough for a threshold, and no body is built only to be measured.
    if (!gzip || pieces[0].text().length + pieces[1].length < GZIP_MIN_BYTES) return { body: this.plainOf(pieces), gzip: false };
    return { body: await this.gzipOf(pieces), gzip: true };
  }

  private plainOf([shared, tail]: Pieces): Buffer {
    return Buffer.from(`{${shared.text()}${tail}`);
  }

  /**
   * One ordinary single-member gzip body, built the way pigz splices its
   * output: the shared start of the document (mesh pods, services and splits, the bulk,
   * the same for every node in permissive mode) is deflated and checksummed
   * once; each node's tail is deflated on its own and the CRC carried on from
   * the shared part's. A change that touches every node then costs one big
   * deflate, not one per node.
   */
  gzip(c: CompiledNode): Promise<Buffer> {
    let p = this.gzipped.get(c);
    if (!p) this.gzipped.set(c, (p = this.gzipOf(c.pieces())));
    return p;
  }

  private gzipOf([shared, tail]: Pieces): Promise<Buffer> {
    const enc = this.encoding(shared);
    return enc.deflated.then((head) => {
      const t = Buffer.from(tail);
      const trailer = Buffer.alloc(8);
      trailer.writeUInt32LE(crc32(t, enc.crc), 0);
      trailer.writeUInt32LE((enc.length + t.length) % 2 ** 32, 4);
      return Buffer.concat([GZIP_HEADER, head, t.length < STORED_TAIL_MAX ? storedBlock(t) : deflateRawSync(t), trailer]);
    });
  }

  private encoding(shared: SharedJson): SharedEncoding {
    let e = this.shared.get(shared);
    if (!e) {
      const utf8 = Buffer.from(`{${shared.text()}`);
      e = { crc: crc32(utf8), length: utf8.length, deflated: deflateRawAsync(utf8, { finishFlush: constants.Z_FULL_FLUSH }) };
      this.shared.set(shared, e);
    }
    return e;
  }
}

/**
 * `data` as the final deflate block, stored as is (RFC 1951, 3.2.4). The
 * shared part ends with a full flush, so the block starts on a byte boundary:
 * one header byte (BFINAL=1, BTYPE=00), LEN and its complement, the bytes.
 */
export function storedBlock(data: Buffer): Buffer {
  const header = Buffer.alloc(5);
  header[0] = 1;
  header.writeUInt16LE(data.length, 1);
  header.writeUInt16LE(~data.length & 0xffff, 3);
  return Buffer.concat([header, data]);
}
