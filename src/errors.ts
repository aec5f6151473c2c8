/**
 * One error scheme for the whole project: every failure we raise is an
 * FsmNodeError with a stable `code` (FSMN_ERR_...) a caller can branch on, a
 * message that names the field and the value at fault, and optional details.
 * Modules subclass it (see src/ebpf/errors.ts) rather than inventing schemes.
 */
export class FsmNodeError extends Error {
  readonly code: string;
  readonly details: Record<string, unknown> | undefined;

  constructor(code: string, message: string, options?: { cause?: unknown; details?: Record<string, unknown> }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.details = options?.details;
  }
}

/** Bad input from a user, a manifest, a flag or an API request: names the field and value. */
export class InvalidInputError extends FsmNodeError {
  readonly field: string;
  readonly value: unknown;

  constructor(field: string, value: unknown, why: string) {
    super('FSMN_ERR_INVALID_INPUT', `invalid ${field} ${show(value)}: ${why}`, { details: { field, value } });
    this.field = field;
    this.value = value;
  }
}

/** A feature the code has not got yet (CLI subcommands filled in by later work). */
export class NotImplementedError extends FsmNodeError {
  constructor(what: string) {
    super('FSMN_ERR_NOT_IMPLEMENTED', `${what}: not implemented yet`);
  }
}

/** An external command (ip, iptables-restore, ipset, ...) failed. */
export class CommandError extends FsmNodeError {
  constructor(
    readonly command: string,
    readonly args: readonly string[],
    readonly exitCode: number | null,
    readonly stderr: string,
  ) {
    super('FSMN_ERR_COMMAND', `${command} ${args.join(' ')} failed (exit ${exitCode}): ${stderr.trim()}`, {
      details: { command, args, exitCode },
    });
  }
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** A value as it appears in error messages: JSON, bigints as numbers, never throwing. */
export function show(value: unknown): string {
  try {
    return JSON.stringify(value, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v)) ?? String(value);
  } catch {
    return String(value);
  }
}
