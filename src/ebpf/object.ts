import './dispose.js';
import { mkdirSync, statfsSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import { InvalidInputError } from '../errors.js';
import { shown, type Codec } from './codec.js';
import { BpfError, ClosedError, VerifierError } from './errors.js';
import { FdHandle } from './fd.js';
import { BpfMap } from './map.js';
import { native, type NativeDatasecVar } from './native.js';
import { Program } from './program.js';

const BPF_FS_MAGIC = 0xcafe4a11;

export interface MapSpec {
  readonly name: string;
  readonly type: number;
  readonly keySize: number;
  readonly valueSize: number;
  readonly maxEntries: number;
  /** For libbpf's data maps: the ELF section (.rodata, .data, .bss, .kconfig). */
  readonly section: string | undefined;
  /** Declared with LIBBPF_PIN_BY_NAME: load({ pinPath }) pins it (or reuses the pin) at pinPath/name. */
  readonly pinByName: boolean;
}

export interface ProgramSpec {
  readonly name: string;
  /** ELF section, e.g. "cgroup/connect4". */
  readonly section: string;
  readonly type: number;
  /** What libbpf derived from the section; the default for Program.attachCgroup. */
  readonly expectedAttachType: number;
}

export interface LoadOptions {
  /**
   * bpffs directory for maps declared with LIBBPF_PIN_BY_NAME: an existing
   * compatible pin is reused, else the new map is pinned there. Created if
   * missing. Without it such maps are neither pinned nor reused.
   */
  pinPath?: string;
}

/** The ELF section of a libbpf data map: "fixture.rodata" -> ".rodata", ".rodata.cfg" -> itself. */
function dataSection(mapName: string): string | undefined {
  const dot = mapName.indexOf('.');
  return dot < 0 ? undefined : mapName.slice(dot);
}

/** Verifier output from libbpf's printed messages, with the program it belongs to. */
export function parseVerifierLog(libbpfLog: string): { program: string; log: string } | undefined {
  const m = /prog '([^']+)': -- BEGIN PROG LOAD LOG --\n([\s\S]*?)-- END PROG LOAD LOG --/.exec(libbpfLog);
  return m === null ? undefined : { program: m[1]!, log: m[2]! };
}

/** The last line libbpf printed, without its "libbpf: " prefix: usually the reason. */
function lastLibbpfLine(libbpfLog: string | undefined): string | undefined {
  const lines = (libbpfLog ?? '').split('\n').map((l) => l.replace(/^libbpf: /, '').trim()).filter((l) => l !== '');
  return lines.at(-1);
}

function encodeConstant(name: string, size: number, value: number | bigint | boolean | Buffer): Buffer {
  const field = `constant ${name}`;
  if (Buffer.isBuffer(value)) {
    if (value.length !== size) throw new InvalidInputError(field, shown(value), `is ${size} bytes, got ${value.length}`);
    return value;
  }
  if (typeof value === 'boolean') value = value ? 1 : 0;
  if (![1, 2, 4, 8].includes(size)) throw new InvalidInputError(field, shown(value), `is ${size} bytes: pass a Buffer`);
  let big: bigint;
  if (typeof value === 'bigint') big = value;
  else if (Number.isSafeInteger(value)) big = BigInt(value);
  else throw new InvalidInputError(field, shown(value), 'must be an integer, a bigint, a boolean or a Buffer');
  // Accept both signed and unsigned ranges: the BTF var does not tell signedness cheaply.
  const bits = BigInt(size * 8);
  if (big < -(1n << (bits - 1n)) || big >= 1n << bits) throw new InvalidInputError(field, String(value), `does not fit in ${size} bytes`);
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt.asUintN(64, big));
  const host = b.subarray(0, size);
  return new Uint8Array(new Uint16Array([1]).buffer)[0] === 1 ? host : Buffer.from(host).reverse();
}

/**
 * A parsed BPF object file, still editable (map sizes, `const volatile`
 * constants); nothing is in the kernel yet. load() consumes it.
 */
export class ObjectSpec implements Disposable {
  readonly path: string;
  readonly maps: ReadonlyMap<string, MapSpec>;
  readonly programs: ReadonlyMap<string, ProgramSpec>;
  #maps = new Map<string, MapSpec>();
  #vars: NativeDatasecVar[];
  #handle: number | undefined;

  private constructor(path: string, handle: number) {
    this.path = path;
    this.#handle = handle;
    const desc = native().objectDescribe(handle);
    for (const m of desc.maps) {
      this.#maps.set(m.name, {
        name: m.name,
        type: m.type,
        keySize: m.keySize,
        valueSize: m.valueSize,
        maxEntries: m.maxEntries,
        section: m.internal ? dataSection(m.name) : undefined,
        pinByName: m.pinPath !== null,
      });
    }
    this.maps = this.#maps;
    this.programs = new Map(desc.programs.map((p) => [p.name, { ...p }]));
    this.#vars = native().objectDatasecs(handle);
  }

  static fromFile(path: string): ObjectSpec {
    let handle: number;
    try {
      handle = native().objectOpen(path);
    } catch (err) {
      if (!(err instanceof BpfError)) throw err;
      const why = lastLibbpfLine(err.libbpfLog);
      throw new BpfError(`cannot open BPF object ${path}: ${err.reason ?? err.message}${why === undefined ? '' : ` (libbpf: ${why})`}`, {
        errno: err.errno,
        syscall: err.syscall,
        reason: err.reason,
        libbpfLog: err.libbpfLog,
        cause: err,
        details: { path },
      });
    }
    try {
      return new ObjectSpec(path, handle);
    } catch (err) {
      native().objectClose(handle);
      throw err;
    }
  }

  /** Names of the `const volatile` variables setConstant accepts. */
  get constants(): string[] {
    return this.#vars.filter((v) => v.section.startsWith('.rodata')).map((v) => v.name);
  }

  setMaxEntries(map: string, n: number): this {
    const h = this.#open();
    const spec = this.#map(map);
    if (!Number.isInteger(n) || n < 1 || n > 0xffff_ffff) throw new InvalidInputError(`max_entries of map ${map}`, n, 'must be an integer 1..2^32-1');
    native().objectSetMaxEntries(h, map, n);
    this.#maps.set(map, { ...spec, maxEntries: n });
    return this;
  }

  /** Set a `const volatile` global (in .rodata) by its BTF name; the value must fit its size. */
  setConstant(name: string, value: number | bigint | boolean | Buffer): this {
    const h = this.#open();
    const v = this.#vars.find((x) => x.name === name && x.section.startsWith('.rodata'));
    if (v === undefined) {
      throw new InvalidInputError('constant', name, `no const volatile of that name in ${this.path} (have: ${this.constants.join(', ') || 'none'})`);
    }
    const map = [...this.#maps.values()].find((m) => m.section === v.section);
    if (map === undefined) throw new InvalidInputError('constant', name, `section ${v.section} has no data map in ${this.path}`);
    const data = native().objectGetInitialValue(h, map.name);
    if (data === null || data.length < v.offset + v.size) throw new BpfError(`map ${map.name} has no initial value to hold constant ${name}`);
    encodeConstant(name, v.size, value).copy(data, v.offset);
    native().objectSetInitialValue(h, map.name, data);
    return this;
  }

  /**
   * Load every map and program, all or nothing: on failure libbpf has removed
   * what it created (and pins it made) and the error says why; a verifier
   * rejection is a VerifierError with the log. The spec is consumed either way.
   */
  load(opts: LoadOptions = {}): Collection {
    const h = this.#open();
    const pinPath = opts.pinPath;
    try {
      if (pinPath !== undefined) preparePinDir(pinPath);
      for (const m of this.#maps.values()) {
        if (m.pinByName) native().objectSetPinPath(h, m.name, pinPath === undefined ? null : join(pinPath, m.name));
      }
    } catch (err) {
      this.close();
      throw err;
    }
    this.#handle = undefined;
    let fds: { maps: Record<string, number>; programs: Record<string, number> };
    try {
      fds = native().objectLoad(h);
    } catch (err) {
      throw loadError(err, this.path);
    }
    return Collection.adopt(fds, this.programs);
  }

  close(): void {
    if (this.#handle === undefined) return;
    native().objectClose(this.#handle);
    this.#handle = undefined;
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #open(): number {
    if (this.#handle === undefined) throw new ClosedError(`object spec ${this.path}`);
    return this.#handle;
  }

  #map(name: string): MapSpec {
    const m = this.#maps.get(name);
    if (m === undefined) throw new InvalidInputError('map', name, `not in ${this.path} (have: ${[...this.#maps.keys()].join(', ')})`);
    return m;
  }
}

function preparePinDir(pinPath: string): void {
  if (!isAbsolute(pinPath)) throw new InvalidInputError('pinPath', pinPath, 'must be an absolute path');
  try {
    mkdirSync(pinPath, { recursive: true });
  } catch (err) {
    throw new InvalidInputError('pinPath', pinPath, `cannot create: ${(err as Error).message}`);
  }
  if (statfsSync(pinPath).type !== BPF_FS_MAGIC) throw new InvalidInputError('pinPath', pinPath, 'is not on a bpf file system (mount -t bpf bpf /sys/fs/bpf)');
}

function loadError(err: unknown, path: string): unknown {
  if (!(err instanceof BpfError)) return err;
  const info = { errno: err.errno, syscall: err.syscall, reason: err.reason, libbpfLog: err.libbpfLog, cause: err, details: { path } };
  const reason = err.reason ?? err.message;
  const verifier = parseVerifierLog(err.libbpfLog ?? '');
  if (verifier !== undefined) return new VerifierError(`${reason} (object ${path})`, { ...info, ...verifier });
  const why = lastLibbpfLine(err.libbpfLog);
  return new BpfError(`cannot load BPF object ${path}: ${reason}${why === undefined ? '' : ` (libbpf: ${why})`}`, info);
}

/**
 * What one load put in the kernel: every map and program of the object, each
 * owning its own fd. close() closes them all (idempotent) and never unpins.
 */
export class Collection implements Disposable {
  readonly maps: Record<string, BpfMap>;
  readonly programs: Record<string, Program>;

  private constructor(maps: Record<string, BpfMap>, programs: Record<string, Program>) {
    this.maps = maps;
    this.programs = programs;
  }

  /** @internal wrap the fds a load returned; closes them all if wrapping fails. */
  static adopt(fds: { maps: Record<string, number>; programs: Record<string, number> }, specs: ReadonlyMap<string, ProgramSpec>): Collection {
    // Own every fd first, so a failure below cannot leak one.
    const mapHandles = Object.entries(fds.maps).map(([name, fd]) => [name, new FdHandle(fd, `map '${name}'`)] as const);
    const progHandles = Object.entries(fds.programs).map(([name, fd]) => [name, new FdHandle(fd, `program '${name}'`)] as const);
    try {
      const maps: Record<string, BpfMap> = {};
      const programs: Record<string, Program> = {};
      for (const [name, h] of mapHandles) maps[name] = BpfMap.fromHandle(h, undefined, undefined, name);
      for (const [name, h] of progHandles) programs[name] = new Program(h, name, specs.get(name)?.expectedAttachType);
      return new Collection(maps, programs);
    } catch (err) {
      for (const [, h] of [...mapHandles, ...progHandles]) h.close();
      throw err;
    }
  }

  /** A typed view of one map; codec sizes must match the map's key and value sizes. */
  map<K, V>(name: string, key: Codec<K>, value: Codec<V>): BpfMap<K, V> {
    const m = this.maps[name];
    if (m === undefined) throw new InvalidInputError('map', name, `not in this collection (have: ${Object.keys(this.maps).join(', ')})`);
    return m.typed(key, value);
  }

  /** A program by name, or a clear error naming the ones there are. */
  program(name: string): Program {
    const p = this.programs[name];
    if (p === undefined) throw new InvalidInputError('program', name, `not in this collection (have: ${Object.keys(this.programs).join(', ')})`);
    return p;
  }

  close(): void {
    for (const p of Object.values(this.programs)) p.close();
    for (const m of Object.values(this.maps)) m.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
