import { codecs, type Codec } from '../../ebpf/index.js';

/**
 * The TypeScript mirror of bpf/include/fsm_abi.h: constants and the byte
 * layout of every map key and value the agent reads or writes. Offsets and
 * sizes are written out as in the C structs (padding included);
 * test/unit/ebpf-abi.test.ts checks them against the built objects.
 */

export const ABI_VERSION = 2;
/** "FSMNODE1" little endian: first word of fsm_meta in a pin directory we own. */
export const META_MAGIC = 0x3145444f4e4d5346n;

export const AF_INET = 2;

export const CfgFlag = { fastPath: 1 } as const;
export const PodFlag = { strict: 1, hasInclude: 2 } as const;
export const AddrFlag = { node: 1, proxySource: 2 } as const;
export const Dir = { out: 1, in: 2 } as const;
/** fsm_port_key.scope / fsm_cidr_key.scope of mesh-wide entries (otherwise a pod's cgroup id). */
export const SCOPE_MESH = 0n;

export const CIDR_KEY_PREFIX_BITS = 96;
export const ADDR_KEY_PREFIX_BITS = 32;
export const UID_LEN = 48;
export const META_JSON_LEN = 4080;

/** Names of the maps (pinned by name) and programs, as in the C sources. */
export const MapName = {
  config: 'fsm_config',
  pods: 'fsm_pods',
  podIps: 'fsm_pod_ips',
  addrs: 'fsm_addrs',
  ports: 'fsm_ports',
  cidrExcl: 'fsm_cidr_excl',
  cidrIncl: 'fsm_cidr_incl',
  cookieOrig: 'fsm_cookie_orig',
  seqOrig: 'fsm_seq_orig',
  tupleOrig: 'fsm_tuple_orig',
  sockhash: 'fsm_sockhash',
  skState: 'fsm_sk_state',
  stats: 'fsm_stats',
  fastpathStats: 'fsm_fastpath_stats',
  meta: 'fsm_meta',
} as const;
export type MapName = (typeof MapName)[keyof typeof MapName];

/** `const volatile` globals the agent sets before load (bpf/include/fsm_policy.h). */
export const Constant = {
  podsParentLevel: 'fsm_pods_parent_level',
  podMaxDepth: 'fsm_pod_max_depth',
} as const;

// ---- address fields: 16 bytes, network order, IPv4 in the first word ----------

const addr16: Codec<string> = {
  size: 16,
  encode(v) {
    const b = Buffer.alloc(16);
    codecs.ipv4.encode(v).copy(b, 0);
    return b;
  },
  decode: (b) => codecs.ipv4.decode(b.subarray(0, 4)),
};

/** A 16-bit field stored in network byte order. */
const be16: Codec<number> = {
  size: 2,
  encode(v) {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    return b;
  },
  decode: (b) => b.readUInt16BE(0),
};

const uid: Codec<string> = {
  size: UID_LEN,
  encode(v) {
    const b = Buffer.alloc(UID_LEN);
    b.write(v, 'utf8');
    return b;
  },
  decode(b) {
    const end = b.indexOf(0);
    return b.subarray(0, end < 0 ? b.length : end).toString('utf8');
  },
};

// ---- structs ------------------------------------------------------------------------

export interface ConfigValue {
  proxyIp4: string;
  outboundPort: number;
  inboundPort: number;
  proxyCgroupId: bigint;
  flags: number;
}
export const configCodec = codecs.struct<ConfigValue>(40, {
  proxyIp4: { offset: 0, codec: codecs.ipv4 },
  outboundPort: { offset: 4, codec: be16 },
  inboundPort: { offset: 6, codec: be16 },
  proxyCgroupId: { offset: 24, codec: codecs.u64 },
  flags: { offset: 32, codec: codecs.u32 },
});

export interface PodValue {
  flags: number;
  uid: string;
}
export const podCodec = codecs.struct<PodValue>(56, {
  flags: { offset: 0, codec: codecs.u32 },
  uid: { offset: 8, codec: uid },
});

export interface IpKey {
  family: number;
  addr: string;
}
export const ipKeyCodec = codecs.struct<IpKey>(20, {
  family: { offset: 0, codec: codecs.u32 },
  addr: { offset: 4, codec: addr16 },
});

/** fsm_addrs key; prefixLen is the CIDR's (the family bits are added here). */
export interface AddrKey {
  prefixLen: number;
  family: number;
  addr: string;
}
export const addrKeyCodec: Codec<AddrKey> = lpmPrefix(
  ADDR_KEY_PREFIX_BITS,
  codecs.struct<AddrKey>(24, {
    prefixLen: { offset: 0, codec: codecs.u32 },
    family: { offset: 4, codec: codecs.u32 },
    addr: { offset: 8, codec: addr16 },
  }),
);

export interface PortKey {
  scope: bigint;
  port: number;
  dir: number;
}
export const portKeyCodec = codecs.struct<PortKey>(16, {
  scope: { offset: 0, codec: codecs.u64 },
  port: { offset: 8, codec: codecs.u16 },
  dir: { offset: 10, codec: codecs.u8 },
});

/** fsm_cidr_excl / fsm_cidr_incl key; prefixLen is the CIDR's. */
export interface CidrKey {
  prefixLen: number;
  family: number;
  scope: bigint;
  addr: string;
}
export const cidrKeyCodec: Codec<CidrKey> = lpmPrefix(
  CIDR_KEY_PREFIX_BITS,
  codecs.struct<CidrKey>(32, {
    prefixLen: { offset: 0, codec: codecs.u32 },
    family: { offset: 4, codec: codecs.u32 },
    scope: { offset: 8, codec: codecs.u64 },
    addr: { offset: 16, codec: addr16 },
  }),
);

export interface Tuple {
  family: number;
  saddr: string;
  daddr: string;
  sport: number;
  dport: number;
}
export const tupleCodec = codecs.struct<Tuple>(40, {
  family: { offset: 0, codec: codecs.u32 },
  saddr: { offset: 4, codec: addr16 },
  daddr: { offset: 20, codec: addr16 },
  sport: { offset: 36, codec: codecs.u16 },
  dport: { offset: 38, codec: codecs.u16 },
});

export interface OrigDst {
  addr: string;
  port: number;
  family: number;
  podCgroupId: bigint;
}
export const origDstCodec = codecs.struct<OrigDst>(32, {
  addr: { offset: 0, codec: addr16 },
  port: { offset: 16, codec: be16 },
  family: { offset: 18, codec: codecs.u16 },
  podCgroupId: { offset: 24, codec: codecs.u64 },
});

/** fsm_seq_orig key: a redirected connection by its handshake's sequence numbers (pod ISN + 1, proxy ISN + 1). */
export interface SeqKey {
  family: number;
  podAddr: string;
  proxyAddr: string;
  proxyPort: number;
  podSeq: number;
  proxySeq: number;
}
export const seqKeyCodec = codecs.struct<SeqKey>(48, {
  family: { offset: 0, codec: codecs.u32 },
  podAddr: { offset: 4, codec: addr16 },
  proxyAddr: { offset: 20, codec: addr16 },
  proxyPort: { offset: 36, codec: codecs.u16 },
  podSeq: { offset: 40, codec: codecs.u32 },
  proxySeq: { offset: 44, codec: codecs.u32 },
});

/** fsm_seq_orig value: the original destination and the pod socket's own port. */
export interface Pending {
  orig: OrigDst;
  podPort: number;
}
export const pendingCodec = codecs.struct<Pending>(40, {
  orig: { offset: 0, codec: origDstCodec },
  podPort: { offset: 32, codec: codecs.u16 },
});

/** Sum per-CPU values of an all-u64 struct (one 8-aligned slot per possible CPU) into named fields. */
function sumPerCpu<T extends Record<string, bigint>>(raw: Buffer, fields: ReadonlyArray<keyof T & string>): T {
  const size = fields.length * 8;
  const sum = Object.fromEntries(fields.map((f) => [f, 0n])) as Record<string, bigint>;
  for (let off = 0; off + size <= raw.length; off += size) {
    fields.forEach((f, i) => (sum[f]! += codecs.u64.decode(raw.subarray(off + i * 8, off + i * 8 + 8))));
  }
  return sum as T;
}

/** fsm_stats (per pod). */
export interface Stats extends Record<string, bigint> {
  redirected: bigint;
  excluded: bigint;
  inboundRefused: bigint;
}
const STATS_FIELDS = ['redirected', 'excluded', 'inboundRefused'] as const;
export const statsSize = STATS_FIELDS.length * 8;
export const decodePerCpuStats = (raw: Buffer): Stats => sumPerCpu<Stats>(raw, STATS_FIELDS);

/** fsm_fastpath_stats[0]. */
export interface FastpathStats extends Record<string, bigint> {
  redirectedMsgs: bigint;
  redirectedBytes: bigint;
  tcpSockets: bigint;
}
const FASTPATH_FIELDS = ['redirectedMsgs', 'redirectedBytes', 'tcpSockets'] as const;
export const fastpathStatsSize = FASTPATH_FIELDS.length * 8;
export const decodePerCpuFastpath = (raw: Buffer): FastpathStats => sumPerCpu<FastpathStats>(raw, FASTPATH_FIELDS);

export interface Meta {
  magic: bigint;
  abi: number;
  json: string;
}
export const metaCodec: Codec<Meta> = {
  size: 4096,
  encode(v) {
    const body = Buffer.from(v.json, 'utf8');
    if (body.length > META_JSON_LEN) throw new RangeError(`fsm_meta manifest is ${body.length} bytes, the map holds ${META_JSON_LEN}`);
    const b = Buffer.alloc(4096);
    codecs.u64.encode(v.magic).copy(b, 0);
    codecs.u32.encode(v.abi).copy(b, 8);
    codecs.u32.encode(body.length).copy(b, 12);
    body.copy(b, 16);
    return b;
  },
  decode(b) {
    const len = Math.min(codecs.u32.decode(b.subarray(12, 16)), META_JSON_LEN);
    return { magic: codecs.u64.decode(b.subarray(0, 8)), abi: codecs.u32.decode(b.subarray(8, 12)), json: b.subarray(16, 16 + len).toString('utf8') };
  },
};

/** LPM keys count the bytes in front of the address in prefixlen; callers deal in CIDR prefix lengths only. */
function lpmPrefix<T extends { prefixLen: number }>(extraBits: number, inner: Codec<T>): Codec<T> {
  return {
    size: inner.size,
    encode: (v) => inner.encode({ ...v, prefixLen: v.prefixLen + extraBits }),
    decode(b) {
      const v = inner.decode(b);
      return { ...v, prefixLen: v.prefixLen - extraBits };
    },
  };
}

/** Key and value sizes per map, what the C header declares (checked against BTF by the ABI test). */
export const mapLayout: Record<MapName, { keySize: number; valueSize: number }> = {
  fsm_config: { keySize: 4, valueSize: configCodec.size },
  fsm_pods: { keySize: 8, valueSize: podCodec.size },
  fsm_pod_ips: { keySize: ipKeyCodec.size, valueSize: 8 },
  fsm_addrs: { keySize: addrKeyCodec.size, valueSize: 4 },
  fsm_ports: { keySize: portKeyCodec.size, valueSize: 4 },
  fsm_cidr_excl: { keySize: cidrKeyCodec.size, valueSize: 4 },
  fsm_cidr_incl: { keySize: cidrKeyCodec.size, valueSize: 4 },
  fsm_cookie_orig: { keySize: 8, valueSize: origDstCodec.size },
  fsm_seq_orig: { keySize: seqKeyCodec.size, valueSize: pendingCodec.size },
  fsm_tuple_orig: { keySize: tupleCodec.size, valueSize: origDstCodec.size },
  fsm_sockhash: { keySize: tupleCodec.size, valueSize: 4 },
  fsm_sk_state: { keySize: 4, valueSize: 4 },
  fsm_stats: { keySize: 8, valueSize: statsSize },
  fsm_fastpath_stats: { keySize: 4, valueSize: fastpathStatsSize },
  fsm_meta: { keySize: 4, valueSize: metaCodec.size },
};
