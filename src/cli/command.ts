import { parseArgs, type ParseArgsConfig } from 'node:util';
import { InvalidInputError } from '../errors.js';

type OptionSpec = NonNullable<ParseArgsConfig['options']>[string] & { description: string; valueName?: string };

/**
 * One subcommand of `fsm-node`. Each lives in src/cli/commands/<name>.ts and
 * declares its flags once: the same table drives parsing and --help.
 */
export interface Command {
  name: string;
  summary: string;
  /** Usage lines after `fsm-node <name>`, e.g. `[--mode ebpf|iptables]`. */
  usage: string[];
  /** Free text shown under the usage: what it does, defaults, examples. */
  help: string;
  options: Record<string, OptionSpec>;
  /** Accepts positionals (sub-verbs like `lab up`). */
  positionals?: boolean;
  run(values: Record<string, string | boolean | string[] | undefined>, positionals: string[]): Promise<number>;
}

export type ParsedValues = Record<string, string | boolean | string[] | undefined>;

/** Parse argv for a command; unknown flags and missing values become InvalidInputError naming the flag. */
export function parseCommandArgs(cmd: Command, argv: string[]): { values: ParsedValues; positionals: string[] } {
  const options: ParseArgsConfig['options'] = { help: { type: 'boolean', short: 'h' } };
  for (const [name, spec] of Object.entries(cmd.options)) {
    const { description: _d, valueName: _v, ...parseSpec } = spec;
    options[name] = parseSpec;
  }
  try {
    const { values, positionals } = parseArgs({ args: argv, options, strict: true, allowPositionals: cmd.positionals ?? false });
    return { values: values as ParsedValues, positionals };
  } catch (err) {
    throw new InvalidInputError(`fsm-node ${cmd.name} arguments`, argv.join(' '), `${(err as Error).message.replace(/\. To specify.*$/s, '')}; see fsm-node ${cmd.name} --help`);
  }
}

export function renderHelp(cmd: Command): string {
  const lines = [`fsm-node ${cmd.name} — ${cmd.summary}`, '', 'Usage:'];
  for (const u of cmd.usage) lines.push(`  fsm-node ${cmd.name} ${u}`.trimEnd());
  lines.push('', ...cmd.help.trim().split('\n'), '', 'Options:');
  const rows = Object.entries(cmd.options).map(([name, spec]) => {
    const flag = `${spec.short ? `-${spec.short}, ` : '    '}--${name}${spec.type === 'string' ? ` ${spec.valueName ?? 'VALUE'}` : ''}`;
    const dflt = spec.default !== undefined && spec.type === 'string' ? ` (default: ${String(spec.default)})` : '';
    return [flag, spec.description + dflt] as const;
  });
  rows.push(['-h, --help', 'Show this help.']);
  const width = Math.max(...rows.map(([f]) => f.length)) + 2;
  for (const [f, d] of rows) lines.push(`  ${f.padEnd(width)}${d}`);
  return lines.join('\n') + '\n';
}

/** Read a string flag that must be one of `allowed`; the error lists the allowed values. */
export function oneOf<T extends string>(flag: string, value: unknown, allowed: readonly T[]): T {
  if (typeof value === 'string' && (allowed as readonly string[]).includes(value)) return value as T;
  throw new InvalidInputError(`--${flag}`, value, `allowed: ${allowed.join(', ')}`);
}

/** Read a string flag that must be a positive integer within bounds. */
export function intFlag(flag: string, value: unknown, min: number, max: number): number {
  const n = typeof value === 'string' && /^\d+$/.test(value) ? Number(value) : NaN;
  if (!Number.isInteger(n) || n < min || n > max) throw new InvalidInputError(`--${flag}`, value, `expected an integer from ${min} to ${max}`);
  return n;
}
