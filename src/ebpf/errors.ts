import { constants } from 'node:os';
import { FsmNodeError } from '../errors.js';

/**
 * Errors of the eBPF object model. The native addon throws BpfError itself
 * (the class is handed to it at load, see native.ts); the other classes are
 * raised by the TypeScript layer, which knows what a failure means.
 */

/** What the addon (or the TS layer) knows about a failed call. */
export interface BpfErrorInfo {
  errno?: number;
  /** The syscall or libbpf function that failed, e.g. "bpf_link_create". */
  syscall?: string;
  /** strerror of errno (or libbpf's text for its own 4000+ codes), without context. */
  reason?: string;
  /** What libbpf printed during the call (warnings, the verifier log). */
  libbpfLog?: string;
  /** Batch operations: how many elements the kernel applied before failing. */
  processed?: number;
  cause?: unknown;
  details?: Record<string, unknown>;
}

const errnoNames = new Map<number, string>(Object.entries(constants.errno).map(([name, n]) => [n, name]));
// The kernel's internal ENOTSUPP leaks out of some bpf() commands (batch ops on sockmaps).
errnoNames.set(524, 'ENOTSUPP');

export function errnoName(errno: number | undefined): string | undefined {
  return errno === undefined ? undefined : errnoNames.get(errno);
}

export class BpfError extends FsmNodeError {
  readonly errno: number | undefined;
  readonly syscall: string | undefined;
  /** Symbolic errno (ENOENT, EPERM, ...), when there is one. */
  readonly errnoCode: string | undefined;
  readonly reason: string | undefined;
  readonly libbpfLog: string | undefined;
  readonly processed: number | undefined;

  constructor(message: string, info: BpfErrorInfo = {}, code = 'FSMN_ERR_BPF') {
    const errnoCode = errnoName(info.errno);
    super(code, errnoCode !== undefined && !message.includes(errnoCode) ? `${message} (${errnoCode})` : message, {
      cause: info.cause,
      details: { ...info.details, errno: info.errno, syscall: info.syscall },
    });
    this.errno = info.errno;
    this.syscall = info.syscall;
    this.errnoCode = errnoCode;
    this.reason = info.reason;
    this.libbpfLog = info.libbpfLog;
    this.processed = info.processed;
  }
}

/** How many trailing verifier log lines go into the message (the whole log is in `.log`). */
const LOG_TAIL_LINES = 20;

/** The kernel verifier rejected a program; `log` is the verifier's full output. */
export class VerifierError extends BpfError {
  readonly log: string;
  readonly program: string | undefined;

  constructor(message: string, info: BpfErrorInfo & { log: string; program?: string }) {
    const tail = info.log.trimEnd().split('\n').slice(-LOG_TAIL_LINES).join('\n');
    const who = info.program === undefined ? 'a program' : `program '${info.program}'`;
    super(`verifier rejected ${who}: ${message}\n--- verifier log (last ${LOG_TAIL_LINES} lines) ---\n${tail}`, info, 'FSMN_ERR_BPF_VERIFIER');
    this.log = info.log;
    this.program = info.program;
  }
}

/** The kernel (or this build) lacks a feature; names it and the kernel that has it. */
export class NotSupportedError extends BpfError {
  readonly feature: string;
  readonly minKernel: string | undefined;

  constructor(feature: string, opts: BpfErrorInfo & { minKernel?: string; hint?: string } = {}) {
    const needs = opts.minKernel === undefined ? '' : ` (needs Linux ${opts.minKernel} or later)`;
    const hint = opts.hint === undefined ? '' : `: ${opts.hint}`;
    super(`${feature} is not supported here${needs}${hint}`, opts, 'FSMN_ERR_NOT_SUPPORTED');
    this.feature = feature;
    this.minKernel = opts.minKernel;
  }
}

export class KeyNotFoundError extends BpfError {
  constructor(map: string, key: Buffer) {
    super(`key ${key.toString('hex')} not found in map '${map}'`, { errno: constants.errno.ENOENT, details: { map } }, 'FSMN_ERR_BPF_KEY_NOT_FOUND');
  }
}

/** A map, program, link, collection or spec was used after close(). */
export class ClosedError extends BpfError {
  constructor(what: string) {
    super(`${what} is closed`, { errno: constants.errno.EBADF }, 'FSMN_ERR_BPF_CLOSED');
  }
}
