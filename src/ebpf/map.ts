import './dispose.js';
import { constants } from 'node:os';
import { InvalidInputError } from '../errors.js';
import { codecs, shown, type Codec } from './codec.js';
import { perCpuMapTypes, UpdateFlag, type UpdateMode } from './constants.js';
import { BpfError, KeyNotFoundError } from './errors.js';
import { FdHandle, openPinned, removePin } from './fd.js';
import { native, type NativeMapInfo } from './native.js';

/** errnos with which the kernel says "no batch ops for this map type / kernel". */
const BATCH_UNSUPPORTED = new Set([constants.errno.EINVAL, constants.errno.EOPNOTSUPP, 524 /* ENOTSUPP */]);

/** Elements per BPF_MAP_LOOKUP_BATCH call in dump(). */
const BATCH_CHUNK = 256;

/** Bytes of one value as the syscall sees it: per-CPU maps carry one 8-aligned slot per possible CPU. */
export function syscallValueSize(type: number, valueSize: number): number {
  return perCpuMapTypes.has(type) ? Math.ceil(valueSize / 8) * 8 * native().numPossibleCpus() : valueSize;
}

/**
 * A live BPF map. Keys and values go through codecs (raw Buffers by default);
 * their sizes are checked against the kernel's view of the map. Iteration
 * walks keys with get_next_key; entries deleted meanwhile are skipped.
 */
export class BpfMap<K = Buffer, V = Buffer> implements Disposable {
  readonly name: string;
  readonly type: number;
  readonly keySize: number;
  readonly valueSize: number;
  readonly maxEntries: number;
  readonly id: number;
  #handle: FdHandle;
  #key: Codec<K>;
  #value: Codec<V>;
  #syscallValueSize: number;
  #batchUnsupported = false;
  #nativeInfo: NativeMapInfo;

  /** @internal use Collection.maps, Collection.map() or BpfMap.fromPin. */
  constructor(handle: FdHandle, info: NativeMapInfo, key: Codec<K>, value: Codec<V>) {
    this.#handle = handle;
    this.#nativeInfo = info;
    this.name = info.name;
    this.type = info.type;
    this.keySize = info.keySize;
    this.valueSize = info.valueSize;
    this.maxEntries = info.maxEntries;
    this.id = info.id;
    this.#syscallValueSize = syscallValueSize(info.type, info.valueSize);
    this.#key = checkCodec(`map '${info.name}' key`, key, info.keySize);
    this.#value = checkCodec(`map '${info.name}' value`, value, this.#syscallValueSize);
  }

  /** Open a pinned map. Without codecs keys and values are raw Buffers. */
  static fromPin<K = Buffer, V = Buffer>(path: string, key?: Codec<K>, value?: Codec<V>): BpfMap<K, V> {
    const handle = new FdHandle(openPinned(path, 'map'), `map pinned at ${path}`);
    try {
      return BpfMap.fromHandle(handle, key, value);
    } catch (err) {
      handle.close();
      throw err;
    }
  }

  /** @internal `name` overrides the kernel's, which is cut to 15 characters. */
  static fromHandle<K = Buffer, V = Buffer>(handle: FdHandle, key?: Codec<K>, value?: Codec<V>, name?: string): BpfMap<K, V> {
    const info = { ...native().mapInfo(handle.fd), ...(name === undefined ? {} : { name }) };
    const vsize = syscallValueSize(info.type, info.valueSize);
    return new BpfMap<K, V>(handle, info, key ?? (codecs.raw(info.keySize) as unknown as Codec<K>), value ?? (codecs.raw(vsize) as unknown as Codec<V>));
  }

  /** A view of the same map (same fd) with other codecs; closing either closes both. */
  typed<K2, V2>(key: Codec<K2>, value: Codec<V2>): BpfMap<K2, V2> {
    return new BpfMap<K2, V2>(this.#handle, this.#nativeInfo, key, value);
  }

  get fd(): number {
    return this.#handle.fd;
  }

  get closed(): boolean {
    return this.#handle.closed;
  }

  lookup(key: K): V | undefined {
    const v = native().mapLookup(this.fd, this.#encodeKey(key), this.#syscallValueSize);
    return v === null ? undefined : this.#value.decode(v);
  }

  /** Like lookup, but a missing key is a KeyNotFoundError. */
  get(key: K): V {
    const k = this.#encodeKey(key);
    const v = native().mapLookup(this.fd, k, this.#syscallValueSize);
    if (v === null) throw new KeyNotFoundError(this.name, k);
    return this.#value.decode(v);
  }

  update(key: K, value: V, flags: UpdateMode = 'any'): void {
    native().mapUpdate(this.fd, this.#encodeKey(key), this.#encodeValue(value), updateFlag(flags));
  }

  /** true when the key was there. */
  delete(key: K): boolean {
    return native().mapDelete(this.fd, this.#encodeKey(key));
  }

  *keys(): IterableIterator<K> {
    for (const k of this.#rawKeys()) yield this.#key.decode(k);
  }

  *entries(): IterableIterator<[K, V]> {
    for (const k of this.#rawKeys()) {
      const v = native().mapLookup(this.fd, k, this.#syscallValueSize);
      if (v !== null) yield [this.#key.decode(k), this.#value.decode(v)];
    }
  }

  /**
   * All entries at once, read with BPF_MAP_LOOKUP_BATCH (hash maps since
   * 5.6, arrays since 5.7) in chunks, else with entries(). A consistent
   * snapshot only per chunk, like any dump of a live map.
   */
  dump(): Array<[K, V]> {
    const out: Array<[K, V]> = [];
    let chunk = Math.max(1, Math.min(this.maxEntries, BATCH_CHUNK));
    let token: Buffer | null = null;
    // The resume token: a bucket index for hash maps, a key for arrays.
    const tokenSize = Math.max(this.keySize, 8);
    for (;;) {
      let step: ReturnType<ReturnType<typeof native>['mapLookupBatch']>;
      try {
        step = native().mapLookupBatch(this.fd, token, this.keySize, this.#syscallValueSize, chunk, tokenSize);
      } catch (err) {
        if (!(err instanceof BpfError)) throw err;
        if (err.errno === constants.errno.ENOSPC && chunk < this.maxEntries) {
          chunk = Math.min(this.maxEntries, chunk * 2); // a hash bucket larger than the chunk
          continue;
        }
        if (token === null && err.errno !== undefined && BATCH_UNSUPPORTED.has(err.errno)) return [...this.entries()];
        throw err;
      }
      for (let i = 0; i < step.count; i++) {
        const k = step.keys.subarray(i * this.keySize, (i + 1) * this.keySize);
        const v = step.values.subarray(i * this.#syscallValueSize, (i + 1) * this.#syscallValueSize);
        out.push([this.#key.decode(Buffer.from(k)), this.#value.decode(Buffer.from(v))]);
      }
      if (step.done) return out;
      token = step.outBatch;
    }
  }

  [Symbol.iterator](): IterableIterator<[K, V]> {
    return this.entries();
  }

  /**
   * Update many entries with one BPF_MAP_UPDATE_BATCH when the kernel has it
   * for this map type (hash and array maps since 5.6), else one update each.
   * Not atomic: on failure the entries before the failing one are applied
   * (the error's `processed` says how many).
   */
  updateBatch(entries: Array<[K, V]>, flags: UpdateMode = 'any'): void {
    if (entries.length === 0) return;
    const keys = entries.map(([k]) => this.#encodeKey(k));
    const values = entries.map(([, v]) => this.#encodeValue(v));
    if (this.#tryBatch(entries.length, () => native().mapUpdateBatch(this.fd, Buffer.concat(keys), Buffer.concat(values), entries.length, updateFlag(flags)))) return;
    for (let i = 0; i < keys.length; i++) native().mapUpdate(this.fd, keys[i]!, values[i]!, updateFlag(flags));
  }

  /**
   * Delete many keys (BPF_MAP_DELETE_BATCH, or one by one). A missing key is a
   * KeyNotFoundError; the keys before it are deleted by then.
   */
  deleteBatch(keys: K[]): void {
    if (keys.length === 0) return;
    const raw = keys.map((k) => this.#encodeKey(k));
    try {
      if (this.#tryBatch(raw.length, () => native().mapDeleteBatch(this.fd, Buffer.concat(raw), raw.length))) return;
    } catch (err) {
      const missing = err instanceof BpfError && err.errno === constants.errno.ENOENT ? raw[err.processed ?? 0] : undefined;
      if (missing !== undefined) throw new KeyNotFoundError(this.name, missing);
      throw err;
    }
    for (const k of raw) if (!native().mapDelete(this.fd, k)) throw new KeyNotFoundError(this.name, k);
  }

  pin(path: string): void {
    native().objPin(this.fd, path);
  }

  unpin(path: string): void {
    removePin(path);
  }

  close(): void {
    this.#handle.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /**
   * Runs a batch op of n elements; false when the kernel has no batch op for
   * this map (then the caller loops). The kernel leaves the in/out count as
   * it was (n) when it rejects the command before touching an element.
   */
  #tryBatch(n: number, op: () => number): boolean {
    if (this.#batchUnsupported) return false;
    try {
      op();
      return true;
    } catch (err) {
      const untouched = err instanceof BpfError && (err.processed === 0 || err.processed === n);
      if (untouched && err.errno !== undefined && BATCH_UNSUPPORTED.has(err.errno)) {
        this.#batchUnsupported = true;
        return false;
      }
      throw err;
    }
  }

  /** Keys as Buffers, walked with get_next_key. */
  *#rawKeys(): IterableIterator<Buffer> {
    let cur: Buffer | null = null;
    for (;;) {
      const next: Buffer | null = native().mapNextKey(this.fd, cur, this.keySize);
      if (next === null) return;
      yield next;
      cur = next;
    }
  }

  #encodeKey(key: K): Buffer {
    return sized(`map '${this.name}' key`, this.#key.encode(key), this.keySize);
  }

  #encodeValue(value: V): Buffer {
    return sized(`map '${this.name}' value`, this.#value.encode(value), this.#syscallValueSize);
  }
}

function updateFlag(mode: UpdateMode): number {
  const f = UpdateFlag[mode];
  if (f === undefined) throw new InvalidInputError('update flags', mode, `must be one of ${Object.keys(UpdateFlag).join(', ')}`);
  return f;
}

function checkCodec<T>(what: string, codec: Codec<T>, size: number): Codec<T> {
  if (codec.size !== size) throw new InvalidInputError(`${what} codec size`, codec.size, `the map has ${size}-byte ${what.endsWith('key') ? 'keys' : 'values'}`);
  return codec;
}

function sized(what: string, b: Buffer, size: number): Buffer {
  if (b.length !== size) throw new InvalidInputError(what, shown(b), `encodes to ${b.length} bytes, the map needs ${size}`);
  return b;
}
