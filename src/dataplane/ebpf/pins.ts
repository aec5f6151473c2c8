import { existsSync, readdirSync, statfsSync } from 'node:fs';
import { join } from 'node:path';
import { BpfMap } from '../../ebpf/index.js';
import { InvalidInputError } from '../../errors.js';
import { ABI_VERSION, META_MAGIC, MapName, metaCodec } from './abi.js';
import { ALL_PROGRAMS, ATTACHMENTS } from './objects.js';

/**
 * The agent's pin directory:
 *   <dir>/maps/<map>    every map, pinned by name by libbpf (fsm_meta marks the directory as ours)
 *   <dir>/progs/<prog>  every program (what a restarted agent adopts)
 *   <dir>/links/<link>  every cgroup bpf_link (what keeps the programs attached without an agent)
 */

const BPF_FS_MAGIC = 0xcafe4a11;

export interface PinLayout {
  dir: string;
  maps: string;
  progs: string;
  links: string;
}

export function pinLayout(dir: string): PinLayout {
  return { dir, maps: join(dir, 'maps'), progs: join(dir, 'progs'), links: join(dir, 'links') };
}

/** What the agent records in fsm_meta (JSON): enough to adopt, upgrade or refuse. */
export interface Manifest {
  owner: 'fsm-node';
  abi: number;
  /** programVersion() of the loaded programs; '' while an install is under way. */
  version: string;
  podsCgroup: string;
  proxyCgroup: string;
  installedAt: string;
  updatedAt: string;
}

export function readManifest(mapsDir: string): Manifest | undefined {
  const path = join(mapsDir, MapName.meta);
  if (!existsSync(path)) return undefined;
  using m = BpfMap.fromPin(path);
  if (m.valueSize !== metaCodec.size) return undefined;
  const raw = m.lookup(Buffer.alloc(4));
  if (raw === undefined) return undefined;
  const meta = metaCodec.decode(raw);
  if (meta.magic !== META_MAGIC) return undefined;
  try {
    return { ...(JSON.parse(meta.json) as Manifest), abi: meta.abi };
  } catch {
    return undefined;
  }
}

export function writeManifest(meta: BpfMap, manifest: Manifest): void {
  meta.update(Buffer.alloc(4), metaCodec.encode({ magic: META_MAGIC, abi: ABI_VERSION, json: JSON.stringify(manifest) }));
}

const OUR_MAPS: ReadonlySet<string> = new Set(Object.values(MapName));
const OUR_PROGS: ReadonlySet<string> = new Set(ALL_PROGRAMS);
const OUR_LINKS: ReadonlySet<string> = new Set(ATTACHMENTS.map((a) => a.link));

function list(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir) : [];
}

/** Entries under the pin directory that are not ours by name. */
export function foreignEntries(l: PinLayout): string[] {
  const foreign: string[] = [];
  for (const e of list(l.dir)) if (!['maps', 'progs', 'links'].includes(e)) foreign.push(e);
  for (const [sub, ours] of [[l.maps, OUR_MAPS], [l.progs, OUR_PROGS], [l.links, OUR_LINKS]] as const) {
    for (const e of list(sub)) if (!ours.has(e)) foreign.push(join(sub.slice(l.dir.length + 1), e));
  }
  return foreign;
}

export type PinDirState = { kind: 'absent' } | { kind: 'empty' } | { kind: 'ours'; manifest: Manifest | undefined };

/**
 * Whose is the pin directory? Ours when fsm_meta carries our magic, or when
 * an install was interrupted before writing it (everything there has our
 * names and fsm_meta exists). Anything else is refused, never touched; in a
 * directory of ours, entries with foreign names are left alone by cleanup.
 */
export function inspectPinDir(l: PinLayout): PinDirState {
  if (!existsSync(l.dir)) return { kind: 'absent' };
  if (statfsSync(l.dir).type !== BPF_FS_MAGIC) throw new InvalidInputError('pinDir', l.dir, 'is not on a bpf file system (mount -t bpf bpf /sys/fs/bpf)');
  if (list(l.dir).length === 0) return { kind: 'empty' };
  const manifest = readManifest(l.maps);
  if (manifest !== undefined) return { kind: 'ours', manifest };
  const foreign = foreignEntries(l);
  if (foreign.length === 0 && existsSync(join(l.maps, MapName.meta))) return { kind: 'ours', manifest: undefined };
  const shown = foreign.length > 0 ? foreign.slice(0, 5).join(', ') : 'no fsm-node marker (maps/fsm_meta)';
  throw new InvalidInputError('pinDir', l.dir, `holds pins that are not fsm-node's (${shown}); refusing to touch it`);
}
