import { isOurChain, type Names } from './names.js';
import type { TableSpec } from './render.js';

/**
 * Reading iptables-save output and planning one iptables-restore --noflush
 * transaction per table that turns what is installed into what is desired.
 * Only our chains (by prefix) and jump rules to them are looked at; the rest
 * of the table is never named in the transaction, so --noflush leaves it be.
 */

export const BUILTIN_CHAINS = new Set(['PREROUTING', 'INPUT', 'FORWARD', 'OUTPUT', 'POSTROUTING']);

/** Split a save line into words the way iptables-save quotes them ("..." with \" inside). */
export function tokenize(line: string): string[] {
  const words: string[] = [];
  let i = 0;
  while (i < line.length) {
    if (line[i] === ' ') {
      i++;
      continue;
    }
    let word = '';
    if (line[i] === '"') {
      i++;
      while (i < line.length && line[i] !== '"') {
        if (line[i] === '\\' && i + 1 < line.length) i++;
        word += line[i];
        i++;
      }
      i++;
    } else {
      while (i < line.length && line[i] !== ' ') word += line[i++];
    }
    words.push(word);
  }
  return words;
}

/** The chain a rule jumps or goes to, if any. */
export function ruleTarget(line: string): string | undefined {
  const words = tokenize(line);
  for (let i = words.length - 2; i >= 0; i--) {
    if (words[i] === '-j' || words[i] === '-g') return words[i + 1];
  }
  return undefined;
}

export interface InstalledTable extends TableSpec {
  /** Rules outside built-in chains and outside ours that target our chains (only cleanup removes them). */
  foreignJumps: string[];
}

/** Our part of one table of `iptables-save` output. An absent table reads as empty. */
export function parseSave(text: string, table: string, names: Names): InstalledTable {
  const parsed: InstalledTable = { table, chains: new Map(), jumps: [], foreignJumps: [] };
  let inTable = false;
  for (const line of text.split('\n')) {
    if (line.startsWith('*')) {
      inTable = line.slice(1).trim() === table;
    } else if (!inTable) {
      continue;
    } else if (line.startsWith(':')) {
      const chain = line.slice(1).split(' ')[0] as string;
      if (isOurChain(names, chain)) parsed.chains.set(chain, []);
    } else if (line.startsWith('-A ')) {
      const chain = line.slice(3).split(' ')[0] as string;
      if (isOurChain(names, chain)) {
        const rules = parsed.chains.get(chain);
        if (rules) rules.push(line);
        else parsed.chains.set(chain, [line]);
        continue;
      }
      const target = ruleTarget(line);
      if (target === undefined || !isOurChain(names, target)) continue;
      (BUILTIN_CHAINS.has(chain) ? parsed.jumps : parsed.foreignJumps).push(line);
    }
  }
  return parsed;
}

/** Lines in one list and not the other, counting duplicates: how many rules a rewrite changes. */
export function lineDiff(a: string[], b: string[]): number {
  const counts = new Map<string, number>();
  for (const l of a) counts.set(l, (counts.get(l) ?? 0) + 1);
  let diff = 0;
  for (const l of b) {
    const n = counts.get(l) ?? 0;
    if (n > 0) counts.set(l, n - 1);
    else diff++;
  }
  for (const n of counts.values()) diff += n;
  return diff;
}

function sameLines(a: string[] | undefined, b: string[]): boolean {
  return a !== undefined && a.length === b.length && a.every((l, i) => l === b[i]);
}

export function insertLine(appendLine: string): string {
  return appendLine.replace(/^-A (\S+) /, '-I $1 1 ');
}

export function deleteLine(appendLine: string): string {
  return appendLine.replace(/^-A /, '-D ');
}

export interface TablePlan {
  table: string;
  /** The whole restore input, or undefined when the table is already right. */
  text: string | undefined;
  changes: number;
}

/**
 * Plan the transaction that makes our part of `installed` equal `desired`:
 * rewrite (declare = create or flush, then append) only the chains that
 * differ, insert a missing jump at the top of its built-in chain, delete
 * duplicate and unknown jumps to our chains, flush and delete our chains that
 * are no longer desired. Used backwards too: planning from the desired state
 * to a snapshot is how a half-committed sync is rolled back.
 */
export function planTable(installed: TableSpec, desired: TableSpec): TablePlan {
  const lines: string[] = [];
  let changes = 0;
  for (const [chain, rules] of desired.chains) {
    const have = installed.chains.get(chain);
    if (sameLines(have, rules)) continue;
    lines.push(`:${chain} - [0:0]`, ...rules);
    changes += have === undefined ? 1 + rules.length : lineDiff(have, rules);
  }
  const haveJumps = new Map<string, number>();
  for (const j of installed.jumps) haveJumps.set(j, (haveJumps.get(j) ?? 0) + 1);
  for (const jump of desired.jumps) {
    const n = haveJumps.get(jump) ?? 0;
    haveJumps.delete(jump);
    if (n === 0) lines.push(insertLine(jump));
    for (let k = 1; k < n; k++) lines.push(deleteLine(jump));
    changes += n === 0 ? 1 : n - 1;
  }
  for (const [jump, n] of haveJumps) {
    for (let k = 0; k < n; k++) lines.push(deleteLine(jump));
    changes += n;
  }
  const stale = [...installed.chains.keys()].filter((c) => !desired.chains.has(c));
  // Flush all first: a stale chain may jump to another stale chain.
  for (const chain of stale) lines.push(`:${chain} - [0:0]`);
  for (const chain of stale) lines.push(`-X ${chain}`);
  changes += stale.length;
  if (lines.length === 0) return { table: desired.table, text: undefined, changes: 0 };
  return { table: desired.table, text: `*${desired.table}\n${lines.join('\n')}\nCOMMIT\n`, changes };
}

/** Everything of ours removed from a table: every jump to our chains, then the chains. */
export function planRemoval(installed: InstalledTable): TablePlan {
  return planTable({ ...installed, jumps: [...installed.jumps, ...installed.foreignJumps] }, { table: installed.table, chains: new Map(), jumps: [] });
}

/** Names of the tables present in `iptables-save` output. */
export function savedTables(text: string): string[] {
  return text.split('\n').filter((l) => l.startsWith('*')).map((l) => l.slice(1).trim());
}

/** The restore input line N (1-based) and its neighbours, for the log of a failed restore. */
export function linesAround(text: string, lineNo: number, radius = 2): string[] {
  const lines = text.split('\n');
  const from = Math.max(1, lineNo - radius);
  const to = Math.min(lines.length, lineNo + radius);
  const out: string[] = [];
  for (let n = from; n <= to; n++) out.push(`${n === lineNo ? '>' : ' '}${String(n).padStart(4)}: ${lines[n - 1]}`);
  return out;
}

/** iptables-restore names the failing line as "line N failed", "line N: ..." or "Error occurred at line: N". */
export function failedLine(stderr: string): number | undefined {
  const m = /line:? (\d+)/.exec(stderr);
  return m ? Number(m[1]) : undefined;
}
