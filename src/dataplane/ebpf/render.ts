import { InvalidInputError } from '../../errors.js';
import { formatIPv4, type Cidr } from '../../util/ipv4.js';
import {
  AF_INET,
  AddrFlag,
  CfgFlag,
  Dir,
  MapName,
  PodFlag,
  SCOPE_MESH,
  addrKeyCodec,
  cidrKeyCodec,
  configCodec,
  ipKeyCodec,
  podCodec,
  portKeyCodec,
  type AddrKey,
  type CidrKey,
  type ConfigValue,
  type IpKey,
  type PodValue,
  type PortKey,
} from './abi.js';
import { codecs } from '../../ebpf/index.js';
import type { NormalExclusions, NormalPod, NormalState } from './validate.js';

/**
 * DesiredState (validated, see validate.ts) -> the contents of the maps the
 * agent owns. Pure: cgroup ids come in resolved. Every map is rendered whole,
 * so the dataplane can diff it with what the kernel holds and prune the rest.
 */

export interface CgroupIds {
  proxy: bigint;
  /** Pod uid -> the id of its cgroup. */
  pods: ReadonlyMap<string, bigint>;
}

export interface RenderOptions {
  fastPath: boolean;
}

export interface RenderedMaps {
  config: ConfigValue;
  pods: Array<[bigint, PodValue]>;
  podIps: Array<[IpKey, bigint]>;
  addrs: Array<[AddrKey, number]>;
  ports: Array<[PortKey, number]>;
  cidrExcl: Array<[CidrKey, number]>;
  cidrIncl: Array<[CidrKey, number]>;
}

/** The maps the agent writes, in the order an apply writes them: enrolment (fsm_pods) last, so a pod is never enrolled without its exclusions. */
export const OWNED_MAPS = [MapName.config, MapName.addrs, MapName.ports, MapName.cidrExcl, MapName.cidrIncl, MapName.podIps, MapName.pods] as const;
export type OwnedMap = (typeof OWNED_MAPS)[number];

/** Encoded map contents: key hex -> value bytes. */
export type EncodedMaps = Record<OwnedMap, Map<string, Buffer>>;

const PRESENT = 1;

function contains(outer: Cidr, inner: Cidr): boolean {
  if (outer.prefix > inner.prefix) return false;
  const mask = outer.prefix === 0 ? 0 : (0xffffffff << (32 - outer.prefix)) >>> 0;
  return ((inner.network & mask) >>> 0) === outer.network;
}

/**
 * fsm_addrs is an LPM trie and a lookup returns the longest match only, so
 * each entry carries the flags of every entry that covers it.
 */
export function renderAddrs(nodeAddresses: number[], proxySources: Cidr[]): Array<[AddrKey, number]> {
  const own = new Map<string, { cidr: Cidr; flags: number }>();
  const add = (cidr: Cidr, flag: number): void => {
    const key = `${cidr.network}/${cidr.prefix}`;
    const e = own.get(key) ?? { cidr, flags: 0 };
    e.flags |= flag;
    own.set(key, e);
  };
  for (const a of nodeAddresses) add({ network: a, prefix: 32 }, AddrFlag.node);
  for (const c of proxySources) add(c, AddrFlag.proxySource);
  const all = [...own.values()];
  return all
    .sort((a, b) => a.cidr.network - b.cidr.network || a.cidr.prefix - b.cidr.prefix)
    .map((e) => {
      const flags = all.filter((o) => contains(o.cidr, e.cidr)).reduce((f, o) => f | o.flags, 0);
      return [{ prefixLen: e.cidr.prefix, family: AF_INET, addr: formatIPv4(e.cidr.network) }, flags];
    });
}

type Exclusive = Pick<RenderedMaps, 'ports' | 'cidrExcl' | 'cidrIncl'>;

function exclusionEntries(scope: bigint, ex: NormalExclusions, out: Exclusive): void {
  for (const port of ex.outboundPorts) out.ports.push([{ scope, port, dir: Dir.out }, PRESENT]);
  for (const port of ex.inboundPorts) out.ports.push([{ scope, port, dir: Dir.in }, PRESENT]);
  const cidrKey = (c: Cidr): CidrKey => ({ prefixLen: c.prefix, family: AF_INET, scope, addr: formatIPv4(c.network) });
  for (const c of ex.outboundCidrs) out.cidrExcl.push([cidrKey(c), PRESENT]);
  for (const c of ex.outboundIncludeCidrs) out.cidrIncl.push([cidrKey(c), PRESENT]);
}

/** The node-wide entries: config, addresses, mesh-wide exclusions (scope 0). */
export type NodeEntries = Omit<RenderedMaps, 'pods' | 'podIps'>;
/** One pod's entries: enrolment, address, its own exclusions (scope = its cgroup id). */
export type PodEntries = Pick<RenderedMaps, 'pods' | 'podIps' | 'ports' | 'cidrExcl' | 'cidrIncl'>;

export function renderNode(state: NormalState, proxyCgroupId: bigint, opts: RenderOptions): NodeEntries {
  const out: NodeEntries = {
    config: {
      proxyIp4: formatIPv4(state.proxy.address),
      outboundPort: state.proxy.outboundPort,
      inboundPort: state.proxy.inboundPort,
      proxyCgroupId,
      flags: opts.fastPath ? CfgFlag.fastPath : 0,
    },
    addrs: renderAddrs(state.nodeAddresses, state.proxySources),
    ports: [],
    cidrExcl: [],
    cidrIncl: [],
  };
  exclusionEntries(SCOPE_MESH, state.mesh, out);
  return out;
}

/** meshIncludes: the mesh has an inclusion list, so every pod is an inclusion-list pod. */
export function renderPod(pod: NormalPod, cgroupId: bigint, meshIncludes: boolean): PodEntries {
  let flags = 0;
  if (pod.strict) flags |= PodFlag.strict;
  if (meshIncludes || pod.exclusions.outboundIncludeCidrs.length > 0) flags |= PodFlag.hasInclude;
  const out: PodEntries = {
    pods: [[cgroupId, { flags, uid: pod.uid }]],
    podIps: [[{ family: AF_INET, addr: formatIPv4(pod.ip) }, cgroupId]],
    ports: [],
    cidrExcl: [],
    cidrIncl: [],
  };
  exclusionEntries(cgroupId, pod.exclusions, out);
  return out;
}

/** Pods sharing a cgroup, or living in the proxy's, cannot be told apart by the programs. */
export function checkCgroups(state: NormalState, ids: CgroupIds): void {
  const byCgroup = new Map<bigint, string>();
  for (const pod of state.pods) {
    const cg = ids.pods.get(pod.uid);
    const field = (): string => `pods[uid=${pod.uid}].cgroupPath`;
    if (cg === undefined) throw new InvalidInputError(field(), pod.cgroupPath, 'cgroup id not resolved');
    const other = byCgroup.get(cg);
    if (other !== undefined) throw new InvalidInputError(field(), pod.cgroupPath, `is the same cgroup as pod ${other}'s`);
    if (cg === ids.proxy) throw new InvalidInputError(field(), pod.cgroupPath, "is the proxy's cgroup");
    byCgroup.set(cg, pod.uid);
  }
}

/** The whole desired content of the owned maps. */
export function renderMaps(state: NormalState, ids: CgroupIds, opts: RenderOptions): RenderedMaps {
  checkCgroups(state, ids);
  const out: RenderedMaps = { ...renderNode(state, ids.proxy, opts), pods: [], podIps: [] };
  const meshIncludes = state.mesh.outboundIncludeCidrs.length > 0;
  for (const pod of state.pods) {
    const e = renderPod(pod, ids.pods.get(pod.uid)!, meshIncludes);
    out.pods.push(...e.pods);
    out.podIps.push(...e.podIps);
    out.ports.push(...e.ports);
    out.cidrExcl.push(...e.cidrExcl);
    out.cidrIncl.push(...e.cidrIncl);
  }
  return out;
}

function encodeAll<K, V>(entries: Array<[K, V]> | undefined, key: (k: K) => Buffer, value: (v: V) => Buffer): Map<string, Buffer> {
  return new Map((entries ?? []).map(([k, v]) => [key(k).toString('hex'), value(v)]));
}

/** Bytes of every entry, keyed by the key's hex: what the dataplane compares with the kernel's maps. Absent parts encode as empty maps. */
export function encodeMaps(r: Partial<RenderedMaps>): EncodedMaps {
  const u32 = (v: number): Buffer => codecs.u32.encode(v);
  return {
    fsm_config: encodeAll(r.config === undefined ? [] : [[0, r.config]], u32, (v: ConfigValue) => configCodec.encode(v)),
    fsm_addrs: encodeAll(r.addrs, (k) => addrKeyCodec.encode(k), u32),
    fsm_ports: encodeAll(r.ports, (k) => portKeyCodec.encode(k), u32),
    fsm_cidr_excl: encodeAll(r.cidrExcl, (k) => cidrKeyCodec.encode(k), u32),
    fsm_cidr_incl: encodeAll(r.cidrIncl, (k) => cidrKeyCodec.encode(k), u32),
    fsm_pod_ips: encodeAll(r.podIps, (k) => ipKeyCodec.encode(k), (v) => codecs.u64.encode(v)),
    fsm_pods: encodeAll(r.pods, (k) => codecs.u64.encode(k), (v) => podCodec.encode(v)),
  };
}

export function emptyEncoded(): EncodedMaps {
  return encodeMaps({});
}

/** Add every entry of `src` to `into` (key spaces of node and pods never overlap). */
export function mergeEncoded(into: EncodedMaps, src: EncodedMaps): EncodedMaps {
  for (const name of OWNED_MAPS) for (const [k, v] of src[name]) into[name].set(k, v);
  return into;
}

export interface MapDiff {
  /** Entries to write: new keys and keys whose value differs. */
  upserts: Array<[string, Buffer]>;
  /** Keys that are installed but no longer desired (pruned). */
  deletes: string[];
}

export function diffMap(current: ReadonlyMap<string, Buffer>, desired: ReadonlyMap<string, Buffer>): MapDiff {
  const upserts: Array<[string, Buffer]> = [];
  for (const [k, v] of desired) {
    const have = current.get(k);
    if (have === undefined || !have.equals(v)) upserts.push([k, v]);
  }
  const deletes = [...current.keys()].filter((k) => !desired.has(k));
  return { upserts, deletes };
}
