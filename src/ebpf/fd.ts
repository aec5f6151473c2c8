import { readlinkSync, unlinkSync } from 'node:fs';
import { BpfError, ClosedError } from './errors.js';
import { native } from './native.js';

/**
 * One kernel fd with explicit lifetime: close() is idempotent, use after
 * close throws ClosedError. Typed map views share the handle of the map
 * they view, so closing either closes both.
 */
export class FdHandle {
  #fd: number;

  constructor(
    fd: number,
    private readonly what: string,
  ) {
    this.#fd = fd;
  }

  get fd(): number {
    if (this.#fd < 0) throw new ClosedError(this.what);
    return this.#fd;
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    native().closeFd(fd);
  }
}

export type BpfFdKind = 'map' | 'prog' | 'link';

/** What kind of BPF object an fd refers to, from its anon inode name. */
export function bpfFdKind(fd: number): BpfFdKind | undefined {
  let target: string;
  try {
    target = readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return undefined;
  }
  if (target === 'anon_inode:bpf-map') return 'map';
  if (target === 'anon_inode:bpf-prog') return 'prog';
  // A created link is "bpf_link", one opened from a pin "bpf-link" on some kernels.
  if (target === 'anon_inode:bpf_link' || target === 'anon_inode:bpf-link') return 'link';
  return undefined;
}

/** bpf_obj_get on a pin, checked to be the expected kind (the fd is closed otherwise). */
export function openPinned(path: string, kind: BpfFdKind): number {
  const fd = native().objGet(path);
  const got = bpfFdKind(fd);
  if (got !== kind) {
    native().closeFd(fd);
    throw new BpfError(`pin ${path} holds a ${got ?? 'non-BPF object'}, not a ${kind}`, { syscall: 'bpf_obj_get', details: { path } });
  }
  return fd;
}

/** Remove a pin. A pin that is already gone is fine: unpin is idempotent. */
export function removePin(path: string): void {
  try {
    unlinkSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw new BpfError(`cannot unpin ${path}: ${(err as Error).message}`, { errno: -((err as NodeJS.ErrnoException).errno ?? 0) || undefined, syscall: 'unlink', cause: err });
  }
}
