import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { AttachType, BpfMap, MapType, ObjectSpec, type Collection } from '../../ebpf/index.js';
import { FsmNodeError } from '../../errors.js';
import { Constant, MapName } from './abi.js';

/**
 * The BPF objects of the data path (bpf/*.bpf.c -> bpf/build/*.o), what each
 * program attaches to, and how they are loaded: map sizes and constants set
 * before load, maps pinned by name and shared by all objects.
 */

export const OBJECTS = ['connect4', 'connect6', 'inbound', 'sockops', 'getsockopt', 'sk_msg'] as const;
export type ObjectName = (typeof OBJECTS)[number];

export interface Attachment {
  /** Pin name under <pinDir>/links. */
  link: string;
  object: ObjectName;
  program: string;
  /** Which cgroup: the pods' parent or the proxy's. */
  target: 'pods' | 'proxy';
  attachType: number;
}

/** Every cgroup attachment, as a bpf_link each. */
export const ATTACHMENTS: readonly Attachment[] = [
  { link: 'connect4', object: 'connect4', program: 'fsm_connect4', target: 'pods', attachType: AttachType.CgroupInet4Connect },
  // IPv4 over dual-stack sockets (::ffff:a.b.c.d) reaches connect6, not connect4.
  { link: 'connect6', object: 'connect6', program: 'fsm_connect6', target: 'pods', attachType: AttachType.CgroupInet6Connect },
  { link: 'inbound', object: 'inbound', program: 'fsm_inbound', target: 'pods', attachType: AttachType.CgroupInetIngress },
  { link: 'sockops_pod', object: 'sockops', program: 'fsm_sockops_pod', target: 'pods', attachType: AttachType.CgroupSockOps },
  { link: 'sockops_proxy', object: 'sockops', program: 'fsm_sockops_proxy', target: 'proxy', attachType: AttachType.CgroupSockOps },
  { link: 'getsockopt', object: 'getsockopt', program: 'fsm_getsockopt', target: 'proxy', attachType: AttachType.CgroupGetsockopt },
];

/** The sk_msg program is attached to the sockhash (prog_attach), not to a cgroup. */
export const SK_MSG = { object: 'sk_msg' as ObjectName, program: 'fsm_sk_msg', map: MapName.sockhash, attachType: AttachType.SkMsgVerdict };

export const ALL_PROGRAMS: readonly string[] = [...ATTACHMENTS.map((a) => a.program), SK_MSG.program];

export interface Capacity {
  /** Enrolled pods per node (fsm_pods, fsm_pod_ips, fsm_stats). FSM caps a node at 1024 pods. */
  pods: number;
  /** Port and CIDR exclusion entries, mesh-wide and per pod together. */
  rules: number;
  /** Concurrent redirected connections being tracked (original destination records, fast-path sockets). */
  connections: number;
}

export const DEFAULT_CAPACITY: Capacity = { pods: 8192, rules: 65536, connections: 65536 };

/** max_entries of each sized map; maps not listed keep the header's size. */
export function mapSizes(c: Capacity): Partial<Record<MapName, number>> {
  return {
    fsm_pods: c.pods,
    fsm_pod_ips: c.pods,
    fsm_stats: c.pods,
    fsm_ports: c.rules,
    fsm_cidr_excl: c.rules,
    fsm_cidr_incl: c.rules,
    fsm_cookie_orig: c.connections,
    fsm_seq_orig: c.connections,
    fsm_tuple_orig: c.connections,
    fsm_sockhash: c.connections,
  };
}

export interface LoadConstants {
  podsParentLevel: number;
  podMaxDepth: number;
}

export class ObjectsMissingError extends FsmNodeError {
  constructor(dir: string, missing: string[]) {
    super('FSMN_ERR_BPF_OBJECTS_MISSING', `BPF objects missing in ${dir}: ${missing.join(', ')} (run npm run build:bpf)`, { details: { dir, missing } });
  }
}

export function objectPath(dir: string, name: ObjectName): string {
  return join(dir, `${name}.o`);
}

/**
 * Identity of what would be loaded: the object files and the constants set
 * into them. A pin directory whose manifest carries another version gets
 * its programs replaced (atomically, by link update).
 */
export function programVersion(dir: string, constants: LoadConstants): string {
  const missing = OBJECTS.filter((o) => !existsSync(objectPath(dir, o)));
  if (missing.length > 0) throw new ObjectsMissingError(dir, missing.map((m) => `${m}.o`));
  const h = createHash('sha256');
  for (const o of OBJECTS) h.update(o).update(readFileSync(objectPath(dir, o)));
  h.update(JSON.stringify(constants));
  return h.digest('hex').slice(0, 16);
}

/**
 * Load every object, reusing the maps pinned under mapsDir. Sizes of maps
 * that already exist come from the pins (libbpf reuses a pin only if it
 * matches exactly); new maps get `sizes`. All or nothing: on failure the
 * collections loaded so far are closed (the maps stay pinned: they are the
 * live state).
 */
export function loadObjects(dir: string, mapsDir: string, sizes: Partial<Record<MapName, number>>, constants: LoadConstants): Map<ObjectName, Collection> {
  const loaded = new Map<ObjectName, Collection>();
  try {
    for (const name of OBJECTS) {
      using spec = ObjectSpec.fromFile(objectPath(dir, name));
      for (const m of spec.maps.values()) {
        if (!m.pinByName || m.type === MapType.SkStorage) continue;
        const pinned = pinnedMaxEntries(join(mapsDir, m.name));
        const size = pinned ?? sizes[m.name as MapName];
        if (size !== undefined && size !== m.maxEntries) spec.setMaxEntries(m.name, size);
      }
      const names = spec.constants;
      if (names.includes(Constant.podsParentLevel)) spec.setConstant(Constant.podsParentLevel, constants.podsParentLevel);
      if (names.includes(Constant.podMaxDepth)) spec.setConstant(Constant.podMaxDepth, constants.podMaxDepth);
      loaded.set(name, spec.load({ pinPath: mapsDir }));
    }
  } catch (err) {
    for (const c of loaded.values()) c.close();
    throw err;
  }
  return loaded;
}

function pinnedMaxEntries(path: string): number | undefined {
  if (!existsSync(path)) return undefined;
  using m = BpfMap.fromPin(path);
  return m.maxEntries;
}
