import '../../ebpf/dispose.js';
import { existsSync, mkdirSync, readdirSync, rmdirSync, statSync, unlinkSync } from 'node:fs';
import { join, relative, sep } from 'node:path';
import { performance } from 'node:perf_hooks';
import { BpfError, BpfMap, KeyNotFoundError, Link, Program, type Collection } from '../../ebpf/index.js';
import { FsmNodeError, InvalidInputError, errorMessage } from '../../errors.js';
import { cgroup2Root } from '../../util/cgroup.js';
import { logger } from '../../util/log.js';
import { bpfObjectDir } from '../../util/paths.js';
import type { ApplyResult, CleanupReport, Dataplane, DesiredState, InstalledState } from '../types.js';
import { ABI_VERSION, CfgFlag, MapName, configCodec, decodePerCpuFastpath, decodePerCpuStats, podCodec } from './abi.js';
import {
  ALL_PROGRAMS,
  ATTACHMENTS,
  DEFAULT_CAPACITY,
  SK_MSG,
  loadObjects,
  mapSizes,
  programVersion,
  type Capacity,
  type LoadConstants,
  type ObjectName,
} from './objects.js';
import { inspectPinDir, pinLayout, writeManifest, type Manifest, type PinLayout } from './pins.js';
import { OWNED_MAPS, checkCgroups, diffMap, emptyEncoded, encodeMaps, mergeEncoded, renderNode, renderPod, type CgroupIds, type EncodedMaps, type OwnedMap } from './render.js';
import { samePod, validateDesired, type NormalPod, type NormalState } from './validate.js';

const log = logger('dataplane.ebpf');

export interface EbpfDataplaneOptions {
  /** bpffs directory the dataplane owns (created if missing; refused if it holds someone else's pins). */
  pinDir: string;
  /** The cgroup v2 directory above every pod (kubepods on a node): connect4, sockops and ingress attach here once. */
  podsCgroup: string;
  /** The proxy's cgroup v2 directory: getsockopt and the proxy-side sockops attach here. */
  proxyCgroup: string;
  /** Where the BPF objects are (default: the package's bpf/build). */
  objectDir?: string;
  /** Same-node fast path (sockhash + sk_msg) between pod and proxy sockets. Default true. */
  fastPath?: boolean;
  /** Map sizes of a fresh install; an adopted install keeps the sizes it was pinned with. */
  capacity?: Partial<Capacity>;
  /** How far below podsCgroup a pod's processes may live (kubelet: <qos>/pod<uid>/<container> = 3). */
  podMaxDepth?: number;
}

/**
 * What the last successful apply made the owned maps hold, node-wide entries
 * and each pod's apart: an incremental apply re-renders only the pods that
 * changed and diffs only their entries.
 */
interface Mirror {
  node: EncodedMaps;
  pods: Map<string, { pod: NormalPod; cgroupId: bigint; meshIncludes: boolean; entries: EncodedMaps }>;
}

/** What the dataplane holds open while it runs: maps, programs and links, all from pins. */
interface Live {
  maps: Record<MapName, BpfMap>;
  programs: Map<string, Program>;
  links: Map<string, Link>;
  manifest: Manifest;
}

export class EbpfApplyError extends FsmNodeError {
  constructor(message: string, cause: unknown) {
    super('FSMN_ERR_EBPF_APPLY', `${message}: ${errorMessage(cause)}`, { cause });
  }
}

const ZERO_KEY = Buffer.alloc(4);

/**
 * The eBPF interception dataplane. Programs are attached once, as pinned
 * bpf_links, to the pods' parent cgroup and the proxy's cgroup; a pod is
 * enrolled by writing its cgroup id into fsm_pods. Everything is pinned under
 * `pinDir`, so traffic keeps flowing while no agent runs, and a restarted
 * agent adopts the pins instead of reloading. A new program version (object
 * files or load-time constants changed) replaces the old one by link update:
 * pods are never unintercepted.
 */
export class EbpfDataplane implements Dataplane {
  readonly mode = 'ebpf' as const;
  readonly #opts: Required<Omit<EbpfDataplaneOptions, 'capacity'>> & { capacity: Capacity };
  readonly #layout: PinLayout;
  #live: Live | undefined;
  /** What we last wrote into the owned maps; undefined = read back at the next apply. */
  #mirror: Mirror | undefined;
  #needFull = true;
  /** cgroup path -> id, re-resolved on every full sync. */
  #cgroupIds = new Map<string, bigint>();
  #queue: Promise<unknown> = Promise.resolve();
  /** Whether this instance converged before (periodic full syncs re-adopt quietly). */
  #adopted = false;

  constructor(opts: EbpfDataplaneOptions) {
    this.#opts = {
      objectDir: bpfObjectDir(),
      fastPath: true,
      podMaxDepth: 3,
      ...opts,
      capacity: { ...DEFAULT_CAPACITY, ...opts.capacity },
    };
    for (const [field, n] of Object.entries(this.#opts.capacity)) {
      if (!Number.isInteger(n) || n < 1 || n > 1 << 24) throw new InvalidInputError(`capacity.${field}`, n, 'must be an integer from 1 to 16777216');
    }
    if (!Number.isInteger(this.#opts.podMaxDepth) || this.#opts.podMaxDepth < 1 || this.#opts.podMaxDepth > 6) {
      throw new InvalidInputError('podMaxDepth', this.#opts.podMaxDepth, 'must be an integer from 1 to 6');
    }
    this.#layout = pinLayout(opts.pinDir);
  }

  apply(desired: DesiredState, opts: { full?: boolean } = {}): Promise<ApplyResult> {
    return this.#serial(() => this.#apply(desired, opts.full === true));
  }

  installed(): Promise<InstalledState> {
    return this.#serial(() => this.#installed());
  }

  cleanup(): Promise<CleanupReport> {
    return this.#serial(() => this.#cleanup());
  }

  close(): Promise<void> {
    return this.#serial(() => {
      this.#closeLive();
      this.#mirror = undefined;
      this.#needFull = true;
    });
  }

  #serial<T>(fn: () => T | Promise<T>): Promise<T> {
    const run = this.#queue.then(fn, fn);
    this.#queue = run.catch(() => undefined);
    return run;
  }

  // ---- apply ---------------------------------------------------------------------

  #apply(desired: DesiredState, forceFull: boolean): ApplyResult {
    const t0 = performance.now();
    const normal = validateDesired(desired);
    if (normal.proxy.cgroupPath !== this.#opts.proxyCgroup) {
      throw new InvalidInputError('proxy.cgroupPath', normal.proxy.cgroupPath, `this dataplane's programs are attached to the proxy cgroup ${this.#opts.proxyCgroup}`);
    }
    const full = forceFull || this.#needFull || this.#mirror === undefined;
    const ids = this.#resolveCgroups(normal, full);
    checkCgroups(normal, ids);
    const meshIncludes = normal.mesh.outboundIncludeCidrs.length > 0;
    const node = encodeMaps(renderNode(normal, ids.proxy, { fastPath: this.#opts.fastPath }));
    const pods: Mirror['pods'] = new Map();
    // What this apply compares: everything on a full sync, else node-wide entries and the pods that changed.
    const previous = full ? undefined : this.#mirror;
    const desiredEntries = mergeEncoded(emptyEncoded(), node);
    const currentEntries = previous === undefined ? undefined : mergeEncoded(emptyEncoded(), previous.node);
    for (const pod of normal.pods) {
      const cgroupId = ids.pods.get(pod.uid)!;
      const prev = previous?.pods.get(pod.uid);
      if (prev !== undefined && prev.cgroupId === cgroupId && prev.meshIncludes === meshIncludes && samePod(prev.pod, pod)) {
        pods.set(pod.uid, prev);
        continue;
      }
      const entries = encodeMaps(renderPod(pod, cgroupId, meshIncludes));
      pods.set(pod.uid, { pod, cgroupId, meshIncludes, entries });
      mergeEncoded(desiredEntries, entries);
      if (prev !== undefined && currentEntries !== undefined) mergeEncoded(currentEntries, prev.entries);
    }
    if (previous !== undefined && currentEntries !== undefined) {
      for (const [uid, prev] of previous.pods) if (!pods.has(uid)) mergeEncoded(currentEntries, prev.entries);
    }
    try {
      // A full sync also re-checks the pins: links or programs removed behind our back are put back.
      if (full) this.#closeLive();
      const live = this.#converge();
      const current = currentEntries ?? readOwnedMaps(live);
      const { changes, removedPods } = writeMaps(live, current, desiredEntries);
      pruneStats(live, full ? undefined : removedPods, desiredEntries);
      this.#mirror = { node, pods };
      this.#needFull = false;
      const durationMs = performance.now() - t0;
      if (changes > 0 || full) log.debug({ full, changes, pods: normal.pods.length, durationMs }, 'applied');
      return { full, changes, durationMs };
    } catch (err) {
      this.#needFull = true;
      this.#mirror = undefined;
      throw err instanceof FsmNodeError ? err : new EbpfApplyError('eBPF apply failed, previous state kept', err);
    }
  }

  /** cgroup ids of the proxy and every pod; new paths are checked and stat'ed, known ones come from the cache unless full. */
  #resolveCgroups(normal: NormalState, full: boolean): CgroupIds {
    if (full) this.#cgroupIds.clear();
    const parent = this.#opts.podsCgroup;
    const resolve = (field: string, path: string, underParent: boolean): bigint => {
      const known = this.#cgroupIds.get(path);
      if (known !== undefined) return known;
      if (underParent) {
        const rel = relative(parent, path);
        if (rel === '' || rel.startsWith('..') || rel.split(sep).length > this.#opts.podMaxDepth) {
          throw new InvalidInputError(field, path, `must lie at most ${this.#opts.podMaxDepth} levels below the pods' parent cgroup ${parent}, where the programs are attached`);
        }
      }
      let id: bigint;
      try {
        const st = statSync(path, { bigint: true });
        if (!st.isDirectory()) throw new Error('not a directory');
        id = st.ino;
      } catch {
        throw new InvalidInputError(field, path, underParent ? 'no such cgroup: the pod is unknown on this node (or gone)' : 'no such cgroup');
      }
      this.#cgroupIds.set(path, id);
      return id;
    };
    const pods = new Map<string, bigint>();
    for (const pod of normal.pods) {
      // The cache first: the field name is only needed to report a new path's fault (every sync, every pod).
      const known = this.#cgroupIds.get(pod.cgroupPath);
      pods.set(pod.uid, known ?? resolve(`pods[uid=${pod.uid}].cgroupPath`, pod.cgroupPath, true));
    }
    return { proxy: resolve('proxy.cgroupPath', normal.proxy.cgroupPath, false), pods };
  }

  // ---- install, adopt, upgrade ------------------------------------------------------

  #constants(): LoadConstants {
    const root = cgroup2Root();
    const rel = relative(root, this.#opts.podsCgroup);
    if (rel === '' || rel.startsWith('..') || !existsSync(this.#opts.podsCgroup)) {
      throw new InvalidInputError('podsCgroup', this.#opts.podsCgroup, `must be an existing cgroup below the cgroup v2 root ${root} (never the root itself)`);
    }
    if (!existsSync(this.#opts.proxyCgroup) || relative(root, this.#opts.proxyCgroup).startsWith('..')) {
      throw new InvalidInputError('proxyCgroup', this.#opts.proxyCgroup, `must be an existing cgroup below the cgroup v2 root ${root}`);
    }
    return { podsParentLevel: rel.split(sep).length, podMaxDepth: this.#opts.podMaxDepth };
  }

  /**
   * Make the pin directory hold the current programs, attached: install into
   * an empty directory, adopt pins of the same version without touching them,
   * replace programs of another version by link update, repair missing
   * pieces. Once per process (and again after cleanup or close).
   */
  #converge(): Live {
    if (this.#live !== undefined) return this.#live;
    const l = this.#layout;
    const constants = this.#constants();
    const version = programVersion(this.#opts.objectDir, constants);
    const state = inspectPinDir(l);
    const fresh = state.kind !== 'ours';
    const previous = state.kind === 'ours' ? state.manifest : undefined;
    if (previous !== undefined) {
      if (previous.abi !== ABI_VERSION) {
        throw new InvalidInputError('pinDir', l.dir, `holds maps of fsm-node ABI ${previous.abi}, this agent speaks ${ABI_VERSION}: run fsm-node cleanup first`);
      }
      for (const [field, want, have] of [['podsCgroup', this.#opts.podsCgroup, previous.podsCgroup], ['proxyCgroup', this.#opts.proxyCgroup, previous.proxyCgroup]] as const) {
        if (want !== have) throw new InvalidInputError(field, want, `the programs pinned in ${l.dir} are attached to ${have}: run fsm-node cleanup first`);
      }
    }
    for (const d of [l.dir, l.maps, l.progs, l.links]) mkdirSync(d, { recursive: true });

    const undo: Array<() => void> = [];
    let collections: Map<ObjectName, Collection> | undefined;
    const programs = new Map<string, Program>();
    const links = new Map<string, Link>();
    let maps: Record<MapName, BpfMap> | undefined;
    try {
      const reload = previous === undefined || previous.version !== version || !ALL_PROGRAMS.every((p) => existsSync(join(l.progs, p)));
      if (reload) {
        collections = loadObjects(this.#opts.objectDir, l.maps, mapSizes(this.#opts.capacity), constants);
        for (const c of collections.values()) for (const [name, p] of Object.entries(c.programs)) programs.set(name, p);
      } else {
        for (const p of ALL_PROGRAMS) programs.set(p, Program.fromPin(join(l.progs, p)));
      }
      maps = openMaps(l);
      const now = new Date().toISOString();
      const manifest: Manifest = {
        owner: 'fsm-node',
        abi: ABI_VERSION,
        version,
        podsCgroup: this.#opts.podsCgroup,
        proxyCgroup: this.#opts.proxyCgroup,
        installedAt: previous?.installedAt ?? now,
        updatedAt: reload ? now : (previous?.updatedAt ?? now),
      };
      // Mark the directory as ours before attaching anything; version '' makes an interrupted install reload next time.
      if (previous === undefined) writeManifest(maps.fsm_meta, { ...manifest, version: '' });

      for (const a of ATTACHMENTS) {
        const prog = programs.get(a.program)!;
        const cgroup = a.target === 'pods' ? this.#opts.podsCgroup : this.#opts.proxyCgroup;
        links.set(a.link, this.#ensureLink(a.link, prog, cgroup, a.attachType, undo));
      }
      if (reload) {
        // Replaces whatever verdict program the sockhash had; sockets already in it keep the old one until they close.
        const skMsg = programs.get(SK_MSG.program)!;
        skMsg.attachToMap(maps[SK_MSG.map], SK_MSG.attachType);
        for (const [name, p] of programs) {
          const pin = join(l.progs, name);
          if (existsSync(pin)) p.unpin(pin);
          p.pin(pin);
        }
        const stale = removeStale(l);
        if (stale.length > 0) log.info({ removed: stale }, 'removed what the previous version had and this one has not');
      }
      writeManifest(maps.fsm_meta, manifest);
      if (collections !== undefined) for (const c of collections.values()) for (const m of Object.values(c.maps)) m.close();
      this.#live = { maps, programs, links, manifest };
      if (reload) log.info({ pinDir: l.dir, version, previous: previous?.version ?? null, fresh }, fresh ? 'installed' : 'programs replaced');
      else if (!this.#adopted) log.info({ pinDir: l.dir, version }, 'adopted pinned state');
      this.#adopted = true;
      return this.#live;
    } catch (err) {
      for (const u of undo.reverse()) {
        try {
          u();
        } catch (undoErr) {
          log.error({ err: errorMessage(undoErr) }, 'undo after failed install step failed');
        }
      }
      for (const lk of links.values()) lk.close();
      for (const p of programs.values()) p.close();
      if (collections !== undefined) for (const c of collections.values()) c.close();
      if (maps !== undefined) for (const m of Object.values(maps)) m.close();
      if (fresh) {
        try {
          removePins(l, []);
        } catch (rmErr) {
          log.error({ err: errorMessage(rmErr) }, 'removing the pins of a failed install failed');
        }
      }
      throw err;
    }
  }

  /** The pinned link, updated to `prog` if it runs another program, or a new link pinned in its place. */
  #ensureLink(name: string, prog: Program, cgroup: string, attachType: number, undo: Array<() => void>): Link {
    const pin = join(this.#layout.links, name);
    const cgroupId = statSync(cgroup, { bigint: true }).ino;
    if (existsSync(pin)) {
      const link = Link.fromPin(pin);
      const info = link.info();
      if (info.cgroupId === cgroupId) {
        if (info.progId !== prog.id) {
          const oldPin = join(this.#layout.progs, prog.name);
          const old = existsSync(oldPin) ? Program.fromPin(oldPin) : undefined;
          try {
            link.update(prog, old !== undefined && old.id === info.progId ? { expected: old } : {});
            if (old !== undefined) undo.push(() => link.update(old, { expected: prog }));
          } catch (err) {
            old?.close();
            link.close();
            throw err;
          }
          log.info({ link: name, from: info.progId, to: prog.id }, 'link updated to the new program');
        }
        return link;
      }
      // The cgroup the link was attached to is gone (or was recreated): drop the dead link.
      log.warn({ link: name, cgroup, linkCgroupId: String(info.cgroupId ?? 0n) }, 'pinned link is not attached to the cgroup any more; re-attaching');
      link.unpin();
      link.close();
    }
    const link = prog.attachCgroup(cgroup, attachType);
    try {
      link.pin(pin);
    } catch (err) {
      link.close();
      throw err;
    }
    undo.push(() => {
      link.detach();
      link.unpin();
    });
    return link;
  }

  /** Open whatever of ours is pinned, read-only: for installed() and cleanup() without converging. */
  #openExisting(): Live | undefined {
    if (this.#live !== undefined) return this.#live;
    const state = inspectPinDir(this.#layout);
    if (state.kind !== 'ours' || !existsSync(join(this.#layout.maps, MapName.pods))) return undefined;
    const maps = openMaps(this.#layout);
    const links = new Map<string, Link>();
    const programs = new Map<string, Program>();
    for (const a of ATTACHMENTS) {
      const pin = join(this.#layout.links, a.link);
      if (existsSync(pin)) links.set(a.link, Link.fromPin(pin));
    }
    for (const p of ALL_PROGRAMS) {
      const pin = join(this.#layout.progs, p);
      if (existsSync(pin)) programs.set(p, Program.fromPin(pin));
    }
    const manifest = state.manifest ?? { owner: 'fsm-node', abi: ABI_VERSION, version: '', podsCgroup: '', proxyCgroup: '', installedAt: '', updatedAt: '' };
    return { maps, programs, links, manifest };
  }

  #closeLive(): void {
    const live = this.#live;
    this.#live = undefined;
    if (live === undefined) return;
    closeAll(live);
  }

  // ---- installed, cleanup ---------------------------------------------------------------

  #installed(): InstalledState {
    const live = this.#openExisting();
    if (live === undefined) return { mode: 'ebpf', pods: [], detail: { pinDir: this.#layout.dir, installed: false } };
    try {
      const pods: string[] = [];
      const byCgroup = new Map<string, string>();
      for (const [k, v] of live.maps.fsm_pods.entries()) {
        const uid = podCodec.decode(v).uid;
        pods.push(uid);
        byCgroup.set(k.toString('hex'), uid);
      }
      const stats: Record<string, { redirected: number; excluded: number; inboundRefused: number }> = {};
      for (const [k, v] of live.maps.fsm_stats.entries()) {
        const uid = byCgroup.get(k.toString('hex'));
        if (uid === undefined) continue;
        const s = decodePerCpuStats(v);
        stats[uid] = { redirected: Number(s.redirected), excluded: Number(s.excluded), inboundRefused: Number(s.inboundRefused) };
      }
      const config = configCodec.decode(live.maps.fsm_config.get(ZERO_KEY));
      const fp = decodePerCpuFastpath(live.maps.fsm_fastpath_stats.get(ZERO_KEY));
      const links: Record<string, { id: number; progId: number; cgroupId: string }> = {};
      for (const [name, link] of live.links) {
        const i = link.info();
        links[name] = { id: i.id, progId: i.progId, cgroupId: String(i.cgroupId ?? 0n) };
      }
      const programs: Record<string, number> = {};
      for (const [name, p] of live.programs) programs[name] = p.id;
      const maps: Record<string, { id: number; maxEntries: number }> = {};
      for (const [name, m] of Object.entries(live.maps)) maps[name] = { id: m.id, maxEntries: m.maxEntries };
      return {
        mode: 'ebpf',
        pods: pods.sort(),
        detail: {
          pinDir: this.#layout.dir,
          installed: true,
          version: live.manifest.version,
          installedAt: live.manifest.installedAt,
          podsCgroup: live.manifest.podsCgroup,
          proxyCgroup: live.manifest.proxyCgroup,
          proxy: `${config.proxyIp4}:${config.outboundPort}`,
          fastPath: (config.flags & CfgFlag.fastPath) !== 0,
          fastPathStats: { redirectedMsgs: Number(fp.redirectedMsgs), redirectedBytes: Number(fp.redirectedBytes), tcpSockets: Number(fp.tcpSockets) },
          links,
          programs,
          maps,
          stats,
        },
      };
    } finally {
      if (live !== this.#live) closeAll(live);
    }
  }

  #cleanup(): CleanupReport {
    const state = inspectPinDir(this.#layout);
    this.#closeLive();
    this.#mirror = undefined;
    this.#needFull = true;
    this.#cgroupIds.clear();
    if (state.kind === 'absent') return { removed: [] };
    const l = this.#layout;
    const removed = detachLinks(l, () => true);
    const skMsgPin = join(l.progs, SK_MSG.program);
    const sockhashPin = join(l.maps, SK_MSG.map);
    if (existsSync(skMsgPin) && existsSync(sockhashPin)) {
      using prog = Program.fromPin(skMsgPin);
      using sockhash = BpfMap.fromPin(sockhashPin);
      try {
        prog.detachFromMap(sockhash, SK_MSG.attachType);
        removed.push(`sk_msg attachment of ${SK_MSG.program} on ${SK_MSG.map}`);
      } catch (err) {
        // ENOENT: another program replaced it already, nothing of ours is attached.
        if (!(err instanceof BpfError && err.errnoCode === 'ENOENT')) throw err;
      }
    }
    if (existsSync(sockhashPin)) {
      // Sockets of established fast-path connections hold the sk_msg program, and it holds the
      // maps: without this the kernel objects outlive the pins until those connections close.
      // Out of the sockhash, such a connection carries on over plain TCP.
      using sockhash = BpfMap.fromPin(sockhashPin);
      let n = 0;
      for (const key of [...sockhash.keys()]) if (sockhash.delete(key)) n++;
      if (n > 0) removed.push(`${n} established sockets from ${SK_MSG.map} (they continue without the fast path)`);
    }
    removed.push(...removePins(l, removed));
    return { removed };
  }
}

// ---- helpers ---------------------------------------------------------------------------------

function openMaps(l: PinLayout): Record<MapName, BpfMap> {
  const out: Partial<Record<MapName, BpfMap>> = {};
  try {
    for (const name of Object.values(MapName)) out[name] = BpfMap.fromPin(join(l.maps, name));
  } catch (err) {
    for (const m of Object.values(out)) m.close();
    throw err;
  }
  return out as Record<MapName, BpfMap>;
}

function closeAll(live: Live): void {
  for (const lk of live.links.values()) lk.close();
  for (const p of live.programs.values()) p.close();
  for (const m of Object.values(live.maps)) m.close();
}

/**
 * Detach and unpin the pinned links under links/ that `which` selects. Every
 * pin in our links/ directory is ours by construction (also those of an older
 * version that had other attach points).
 */
function detachLinks(l: PinLayout, which: (name: string) => boolean): string[] {
  const removed: string[] = [];
  for (const name of listDir(l.links).filter(which)) {
    using link = Link.fromPin(join(l.links, name));
    const info = link.info();
    // A link whose cgroup is gone is detached already.
    if (info.cgroupId !== undefined && info.cgroupId !== 0n) link.detach();
    link.unpin();
    removed.push(`link ${name} (id ${info.id}, program ${info.progId})`);
  }
  return removed;
}

function listDir(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir) : [];
}

/** Unpin what is left under links/, progs/ and maps/ and remove the directories; a foreign top-level entry stays. */
function removePins(l: PinLayout, already: string[]): string[] {
  const removed: string[] = [];
  for (const [sub, what] of [[l.links, 'link pin'], [l.progs, 'program pin'], [l.maps, 'map pin']] as const) {
    for (const n of listDir(sub)) {
      unlinkSync(join(sub, n));
      removed.push(`${what} ${n}`);
    }
  }
  for (const d of [l.links, l.progs, l.maps, l.dir]) {
    try {
      rmdirSync(d);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') continue;
      if (code === 'ENOTEMPTY') throw new FsmNodeError('FSMN_ERR_PIN_DIR_NOT_EMPTY', `${d} still holds entries that are not fsm-node's; left in place (removed so far: ${[...already, ...removed].join(', ')})`);
      throw err;
    }
  }
  removed.push(`directory ${l.dir}`);
  return removed;
}

/** After a reload: links, programs and maps an older version had and this one has not. */
function removeStale(l: PinLayout): string[] {
  const links = new Set(ATTACHMENTS.map((a) => a.link));
  const removed = detachLinks(l, (n) => !links.has(n));
  for (const [sub, ours, what] of [[l.progs, new Set(ALL_PROGRAMS), 'program pin'], [l.maps, new Set<string>(Object.values(MapName)), 'map pin']] as const) {
    for (const n of listDir(sub).filter((x) => !ours.has(x))) {
      unlinkSync(join(sub, n));
      removed.push(`${what} ${n}`);
    }
  }
  return removed;
}

function readOwnedMaps(live: Live): EncodedMaps {
  const out = {} as EncodedMaps;
  for (const name of OWNED_MAPS) {
    const entries = new Map<string, Buffer>();
    for (const [k, v] of live.maps[name].entries()) entries.set(k.toString('hex'), v);
    out[name] = entries;
  }
  return out;
}

interface Journal {
  map: BpfMap;
  key: Buffer;
  old: Buffer | undefined;
}

/**
 * Write the difference between `current` and `desired`: upserts map by map in
 * OWNED_MAPS order (a pod's exclusions before its enrolment), then deletions
 * in reverse (enrolment first). On failure every planned entry is put back as
 * it was, so the previous state stays in force.
 */
function writeMaps(live: Live, current: EncodedMaps, desired: EncodedMaps): { changes: number; removedPods: Buffer[] } {
  const diffs = new Map<OwnedMap, ReturnType<typeof diffMap>>(OWNED_MAPS.map((name) => [name, diffMap(current[name], desired[name])]));
  const journal: Journal[] = [];
  let changes = 0;
  try {
    for (const name of OWNED_MAPS) {
      const { upserts } = diffs.get(name)!;
      if (upserts.length === 0) continue;
      const map = live.maps[name];
      const entries = upserts.map(([k, v]) => [Buffer.from(k, 'hex'), v] as [Buffer, Buffer]);
      for (const [k] of entries) journal.push({ map, key: k, old: current[name].get(k.toString('hex')) });
      map.updateBatch(entries);
      changes += entries.length;
    }
    for (const name of [...OWNED_MAPS].reverse()) {
      const { deletes } = diffs.get(name)!;
      if (deletes.length === 0) continue;
      const map = live.maps[name];
      const keys = deletes.map((k) => Buffer.from(k, 'hex'));
      for (const k of keys) journal.push({ map, key: k, old: current[name].get(k.toString('hex')) });
      try {
        map.deleteBatch(keys);
      } catch (err) {
        // Someone removed an entry behind our back: delete the rest one by one.
        if (!(err instanceof KeyNotFoundError)) throw err;
        for (const k of keys) map.delete(k);
      }
      changes += keys.length;
    }
  } catch (err) {
    for (const j of journal.reverse()) {
      try {
        if (j.old === undefined) j.map.delete(j.key);
        else j.map.update(j.key, j.old);
      } catch (undoErr) {
        log.error({ map: j.map.name, err: errorMessage(undoErr) }, 'rollback of a map entry failed');
      }
    }
    throw new EbpfApplyError('writing the maps failed, previous entries restored', err);
  }
  const removedPods = diffs.get(MapName.pods)!.deletes.map((k) => Buffer.from(k, 'hex'));
  return { changes, removedPods };
}

/** Drop counters of pods that are gone: those just removed, or (full sync) every key not enrolled. */
function pruneStats(live: Live, removedPods: Buffer[] | undefined, desired: EncodedMaps): void {
  const stats = live.maps.fsm_stats;
  const keys = removedPods ?? [...stats.keys()].filter((k) => !desired.fsm_pods.has(k.toString('hex')));
  for (const k of keys) stats.delete(k);
}
