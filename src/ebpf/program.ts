import './dispose.js';
import { closeSync, constants as fsc, openSync, statfsSync } from 'node:fs';
import { constants, release as osRelease } from 'node:os';
import { InvalidInputError } from '../errors.js';
import { BpfError, NotSupportedError } from './errors.js';
import { FdHandle, openPinned, removePin } from './fd.js';
import type { BpfMap } from './map.js';
import { native, type NativeLinkInfo } from './native.js';

const CGROUP2_SUPER_MAGIC = 0x63677270;

/** Open a cgroup v2 directory for attaching; names the path when it is not one. */
function openCgroup(path: string): number {
  let type: number;
  try {
    type = statfsSync(path).type;
  } catch (err) {
    throw new InvalidInputError('cgroupPath', path, `cannot stat: ${(err as Error).message}`);
  }
  if (type !== CGROUP2_SUPER_MAGIC) throw new InvalidInputError('cgroupPath', path, 'not on a cgroup v2 file system');
  try {
    return openSync(path, fsc.O_RDONLY | fsc.O_DIRECTORY);
  } catch (err) {
    throw new InvalidInputError('cgroupPath', path, `cannot open: ${(err as Error).message}`);
  }
}

/**
 * A loaded program. It stays in the kernel while this fd, a pin, a link or
 * an attachment holds it. Attaching is separate from loading: attachCgroup
 * returns a Link; attachToMap is the sockmap-style prog_attach.
 */
export class Program implements Disposable {
  readonly name: string;
  readonly type: number;
  readonly id: number;
  /** From the ELF section (libbpf); unknown for a program opened from a pin. */
  readonly expectedAttachType: number | undefined;
  #handle: FdHandle;

  /** @internal use Collection.programs or Program.fromPin. */
  constructor(handle: FdHandle, name: string, expectedAttachType: number | undefined) {
    this.#handle = handle;
    const info = native().progInfo(handle.fd);
    this.name = name;
    this.type = info.type;
    this.id = info.id;
    this.expectedAttachType = expectedAttachType;
  }

  static fromPin(path: string): Program {
    const handle = new FdHandle(openPinned(path, 'prog'), `program pinned at ${path}`);
    try {
      return new Program(handle, native().progInfo(handle.fd).name, undefined);
    } catch (err) {
      handle.close();
      throw err;
    }
  }

  get fd(): number {
    return this.#handle.fd;
  }

  get closed(): boolean {
    return this.#handle.closed;
  }

  /**
   * Attach to a cgroup v2 directory as a bpf_link (BPF_LINK_CREATE). The
   * attachment lasts while the Link's fd is open or the link is pinned.
   */
  attachCgroup(cgroupPath: string, attachType: number | undefined = this.expectedAttachType): Link {
    if (attachType === undefined) {
      throw new InvalidInputError('attachType', attachType, `program '${this.name}' was opened from a pin: pass the attach type`);
    }
    const progFd = this.fd;
    const cg = openCgroup(cgroupPath);
    let linkFd: number;
    try {
      linkFd = native().linkCreate(progFd, cg, attachType);
    } catch (err) {
      throw linkError(err, `attach program '${this.name}' to cgroup ${cgroupPath} with attach type ${attachType}`);
    } finally {
      closeSync(cg);
    }
    return new Link(new FdHandle(linkFd, `link of program '${this.name}'`), undefined);
  }

  /** Attach to a sockmap/sockhash (BPF_PROG_ATTACH), e.g. AttachType.SkMsgVerdict. Lasts while the map lives. */
  attachToMap(map: BpfMap<unknown, unknown>, attachType: number): void {
    native().progAttach(this.fd, map.fd, attachType, 0);
  }

  detachFromMap(map: BpfMap<unknown, unknown>, attachType: number): void {
    native().progDetach(this.fd, map.fd, attachType);
  }

  /**
   * BPF_PROG_TEST_RUN: run the program once (or `repeat` times) on `data`.
   * For tests of socket filter / skb programs; other types may not support it.
   */
  testRun(data: Buffer, opts: { repeat?: number; dataOutSize?: number } = {}): { retval: number; data: Buffer; durationNs: number } {
    return native().progTestRun(this.fd, data, opts.dataOutSize ?? 0, opts.repeat ?? 1);
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
}

export interface LinkInfo {
  id: number;
  progId: number;
  /** The link type (LinkType.Cgroup = 3 for cgroup links). */
  type: number;
  attachType: number;
  cgroupId?: bigint;
}

/**
 * A bpf_link. Closing our fd does not detach a pinned link: the pin keeps
 * it attached (what lets the data path outlive the agent). detach() stops
 * the program for everybody; unpin() removes the pin this Link made or was
 * opened from.
 */
export class Link implements Disposable {
  #handle: FdHandle;
  #pinnedAt: string | undefined;

  /** @internal use Program.attachCgroup or Link.fromPin. */
  constructor(handle: FdHandle, pinnedAt: string | undefined) {
    this.#handle = handle;
    this.#pinnedAt = pinnedAt;
  }

  static fromPin(path: string): Link {
    return new Link(new FdHandle(openPinned(path, 'link'), `link pinned at ${path}`), path);
  }

  get fd(): number {
    return this.#handle.fd;
  }

  get closed(): boolean {
    return this.#handle.closed;
  }

  /** Where this link is pinned, if we pinned it or opened it from a pin. */
  get pinnedAt(): string | undefined {
    return this.#pinnedAt;
  }

  pin(path: string): void {
    native().objPin(this.fd, path);
    this.#pinnedAt = path;
  }

  unpin(): void {
    if (this.#pinnedAt === undefined) return;
    removePin(this.#pinnedAt);
    this.#pinnedAt = undefined;
  }

  /**
   * Atomically replace the program (BPF_LINK_UPDATE). With `expected`, the
   * swap happens only if that program is the one attached now (else EPERM).
   */
  update(program: Program, opts: { expected?: Program } = {}): void {
    try {
      native().linkUpdate(this.fd, program.fd, opts.expected?.fd ?? -1);
    } catch (err) {
      if (err instanceof BpfError && err.errno === constants.errno.EPERM && opts.expected !== undefined) {
        throw new BpfError(`link update to '${program.name}': program '${opts.expected.name}' is no longer the attached one`, {
          errno: err.errno,
          syscall: err.syscall,
          cause: err,
        });
      }
      throw err;
    }
  }

  info(): LinkInfo {
    const i: NativeLinkInfo = native().linkInfo(this.fd);
    const out: LinkInfo = { id: i.id, progId: i.progId, type: i.type, attachType: i.attachType ?? -1 };
    if (i.cgroupId !== undefined) out.cgroupId = i.cgroupId;
    return out;
  }

  /** Detach in the kernel (BPF_LINK_DETACH, Linux 5.9+): the program stops even if the link is pinned. */
  detach(): void {
    try {
      native().linkDetach(this.fd);
    } catch (err) {
      throw linkError(err, 'link detach', { feature: 'BPF_LINK_DETACH', minKernel: '5.9' });
    }
  }

  close(): void {
    this.#handle.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** Whether the running kernel is at least `version` ("5.7"). */
export function kernelAtLeast(version: string, release: string = osRelease()): boolean {
  const want = version.split('.').map(Number);
  const have = (/^(\d+)\.(\d+)/.exec(release) ?? []).slice(1).map(Number);
  for (let i = 0; i < 2; i++) {
    const h = have[i] ?? 0;
    const w = want[i] ?? 0;
    if (h !== w) return h > w;
  }
  return true;
}

/**
 * EINVAL from a link command is what kernels older than the feature answer;
 * on a kernel that has the feature it means a bad argument (usually an attach
 * type that does not fit the program).
 */
function linkError(err: unknown, what: string, feature = { feature: 'cgroup bpf_link (BPF_LINK_CREATE)', minKernel: '5.7' }): unknown {
  if (!(err instanceof BpfError)) return err;
  const info = { errno: err.errno, syscall: err.syscall, reason: err.reason, libbpfLog: err.libbpfLog, cause: err };
  if (err.errno === constants.errno.EINVAL && !kernelAtLeast(feature.minKernel)) {
    return new NotSupportedError(feature.feature, { ...info, minKernel: feature.minKernel, hint: `${what} failed with EINVAL` });
  }
  const hint = err.errno === constants.errno.EINVAL ? ' (does the attach type fit the program type?)' : '';
  return new BpfError(`${what}: ${err.message}${hint}`, info);
}
