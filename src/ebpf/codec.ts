import { InvalidInputError } from '../errors.js';

/**
 * A fixed-size binary encoding of a map key or value. Host byte order for
 * integers (what the BPF program sees on the same machine); network order only
 * where the kernel stores it so (ipv4).
 */
export interface Codec<T> {
  readonly size: number;
  encode(v: T): Buffer;
  decode(b: Buffer): T;
}

/**
 * A value as InvalidInputError can show it: it JSON-encodes values, which a
 * bigint cannot be and a Buffer should not be (hex is what one wants to read).
 */
export function shown(v: unknown): unknown {
  if (typeof v === 'bigint') return v.toString();
  if (Buffer.isBuffer(v)) return `0x${v.toString('hex')}`;
  return v;
}

const littleEndian = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function intCodec(size: 1 | 2 | 4, name: string): Codec<number> {
  const max = 2 ** (size * 8) - 1;
  return {
    size,
    encode(v) {
      if (!Number.isInteger(v) || v < 0 || v > max) throw new InvalidInputError(name, shown(v), `must be an integer 0..${max}`);
      const b = Buffer.alloc(size);
      if (size === 1) b.writeUInt8(v);
      else if (littleEndian) b.writeUIntLE(v, 0, size);
      else b.writeUIntBE(v, 0, size);
      return b;
    },
    decode(b) {
      if (size === 1) return b.readUInt8(0);
      return littleEndian ? b.readUIntLE(0, size) : b.readUIntBE(0, size);
    },
  };
}

const u64: Codec<bigint> = {
  size: 8,
  encode(v) {
    if (typeof v !== 'bigint' || v < 0n || v > 0xffff_ffff_ffff_ffffn) throw new InvalidInputError('u64', shown(v), 'must be a bigint 0..2^64-1');
    const b = Buffer.alloc(8);
    if (littleEndian) b.writeBigUInt64LE(v);
    else b.writeBigUInt64BE(v);
    return b;
  },
  decode: (b) => (littleEndian ? b.readBigUInt64LE(0) : b.readBigUInt64BE(0)),
};

function raw(size: number): Codec<Buffer> {
  if (!Number.isInteger(size) || size <= 0) throw new InvalidInputError('codec size', size, 'must be a positive integer');
  return {
    size,
    encode(v) {
      if (!Buffer.isBuffer(v) || v.length !== size) throw new InvalidInputError('value', shown(v), `must be a Buffer of ${size} bytes`);
      return v;
    },
    decode: (b) => Buffer.from(b),
  };
}

/** Dotted IPv4 address stored in network byte order (as in bpf_sock_addr.user_ip4). */
const ipv4: Codec<string> = {
  size: 4,
  encode(v) {
    const parts = typeof v === 'string' ? v.split('.') : [];
    const bytes = parts.map((p) => (/^\d{1,3}$/.test(p) ? Number(p) : NaN));
    if (bytes.length !== 4 || bytes.some((n) => !(n >= 0 && n <= 255))) throw new InvalidInputError('ipv4', shown(v), 'must be a dotted IPv4 address');
    return Buffer.from(bytes);
  },
  decode: (b) => `${b[0]}.${b[1]}.${b[2]}.${b[3]}`,
};

export type StructFields<T> = { [K in keyof T]: { offset: number; codec: Codec<T[K]> } };

/**
 * A C struct with explicit offsets and total size (padding included), as the
 * object's BTF states them: nothing is guessed about alignment. Padding
 * bytes encode as zero.
 */
function struct<T extends object>(size: number, fields: StructFields<T>): Codec<T> {
  const entries = Object.entries(fields) as Array<[keyof T & string, { offset: number; codec: Codec<unknown> }]>;
  for (const [name, f] of entries) {
    if (f.offset < 0 || f.offset + f.codec.size > size) {
      throw new InvalidInputError(`struct field ${name}`, f.offset, `does not fit in ${size} bytes (field size ${f.codec.size})`);
    }
  }
  return {
    size,
    encode(v) {
      const b = Buffer.alloc(size);
      for (const [name, f] of entries) f.codec.encode((v as Record<string, unknown>)[name]).copy(b, f.offset);
      return b;
    },
    decode(b) {
      const out: Record<string, unknown> = {};
      for (const [name, f] of entries) out[name] = f.codec.decode(b.subarray(f.offset, f.offset + f.codec.size));
      return out as T;
    },
  };
}

export const codecs = {
  u8: intCodec(1, 'u8'),
  u16: intCodec(2, 'u16'),
  u32: intCodec(4, 'u32'),
  u64,
  ipv4,
  raw,
  struct,
};
