import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BpfError, NotSupportedError } from './errors.js';

/**
 * The raw surface of the fsm_bpf addon (native/*.cc), declared once. It takes
 * primitives, Buffers and fds, does no checking beyond what C++ needs to stay
 * memory-safe given correct sizes, and throws BpfError with errno and the
 * failing call. Everything else (validation, defaults, types) is in the
 * classes of this directory; nothing outside src/ebpf should call it.
 */

export interface NativeMapDesc {
  name: string;
  type: number;
  keySize: number;
  valueSize: number;
  maxEntries: number;
  /** libbpf's own maps for .rodata / .data / .bss / .kconfig. */
  internal: boolean;
  /** Set by libbpf for maps declared with LIBBPF_PIN_BY_NAME (a default under /sys/fs/bpf). */
  pinPath: string | null;
}

export interface NativeProgramDesc {
  name: string;
  section: string;
  type: number;
  expectedAttachType: number;
}

export interface NativeDatasecVar {
  section: string;
  name: string;
  offset: number;
  size: number;
}

export interface NativeMapInfo {
  id: number;
  type: number;
  keySize: number;
  valueSize: number;
  maxEntries: number;
  flags: number;
  name: string;
}

export interface NativeProgInfo {
  id: number;
  type: number;
  name: string;
}

export interface NativeLinkInfo {
  id: number;
  type: number;
  progId: number;
  /** Only for cgroup links. */
  attachType?: number;
  cgroupId?: bigint;
}

export interface NativeAddon {
  init(classes: { BpfError: typeof BpfError }): void;

  /** Returns an object handle (an id into the addon's table). */
  objectOpen(path: string): number;
  objectDescribe(handle: number): { maps: NativeMapDesc[]; programs: NativeProgramDesc[] };
  objectDatasecs(handle: number): NativeDatasecVar[];
  objectSetMaxEntries(handle: number, map: string, n: number): void;
  objectGetInitialValue(handle: number, map: string): Buffer | null;
  objectSetInitialValue(handle: number, map: string, data: Buffer): void;
  objectSetPinPath(handle: number, map: string, path: string | null): void;
  /** Consumes the handle, success or not. Returns duplicated fds the caller owns. */
  objectLoad(handle: number): { maps: Record<string, number>; programs: Record<string, number> };
  objectClose(handle: number): void;

  closeFd(fd: number): void;
  mapInfo(fd: number): NativeMapInfo;
  progInfo(fd: number): NativeProgInfo;
  linkInfo(fd: number): NativeLinkInfo;

  linkCreate(progFd: number, targetFd: number, attachType: number): number;
  /** oldProgFd -1: unconditional replace. */
  linkUpdate(linkFd: number, progFd: number, oldProgFd: number): void;
  linkDetach(linkFd: number): void;
  progAttach(progFd: number, targetFd: number, attachType: number, flags: number): void;
  progDetach(progFd: number, targetFd: number, attachType: number): void;

  objPin(fd: number, path: string): void;
  objGet(path: string): number;

  /** null when the key is absent. */
  mapLookup(fd: number, key: Buffer, valueSize: number): Buffer | null;
  mapUpdate(fd: number, key: Buffer, value: Buffer, flags: number): void;
  /** false when the key was absent. */
  mapDelete(fd: number, key: Buffer): boolean;
  /** First key for null; null after the last. */
  mapNextKey(fd: number, key: Buffer | null, keySize: number): Buffer | null;
  mapUpdateBatch(fd: number, keys: Buffer, values: Buffer, count: number, elemFlags: number): number;
  mapDeleteBatch(fd: number, keys: Buffer, count: number): number;
  /** One BPF_MAP_LOOKUP_BATCH step; `done` when the kernel said ENOENT (last chunk). */
  mapLookupBatch(
    fd: number,
    inBatch: Buffer | null,
    keySize: number,
    valueSize: number,
    count: number,
    tokenSize: number,
  ): { keys: Buffer; values: Buffer; count: number; outBatch: Buffer; done: boolean };

  progTestRun(fd: number, data: Buffer, dataOutSize: number, repeat: number): { retval: number; data: Buffer; durationNs: number };
  originalDst(fd: number): { address: string; port: number };
  numPossibleCpus(): number;
}

const ADDON_RELATIVE = join('build', 'Release', 'fsm_bpf.node');

/** The package root: the nearest directory above this file with our package.json (src/ or dist/src/ alike). */
function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg) && (JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'fsm-node') return dir;
    const up = dirname(dir);
    if (up === dir) throw new NotSupportedError('fsm_bpf native addon', { hint: 'cannot find the fsm-node package root' });
    dir = up;
  }
}

let loaded: NativeAddon | undefined;

/** The addon, loaded on first use (importing src/ebpf never fails on a machine without it). */
export function native(): NativeAddon {
  if (loaded !== undefined) return loaded;
  const path = join(packageRoot(), ADDON_RELATIVE);
  if (!existsSync(path)) {
    throw new NotSupportedError('fsm_bpf native addon', { hint: `addon not built (${path} missing): run npm run build:native` });
  }
  const addon = createRequire(import.meta.url)(path) as NativeAddon;
  addon.init({ BpfError });
  loaded = addon;
  return addon;
}
