import { createHash } from 'node:crypto';
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { FsmNodeError } from '../errors.js';

/**
 * The codebase directory a Pipy instance runs: a copy of the project's Pipy
 * program (read-only in the image) plus the config.json the supervisor
 * writes. Each program version gets its own directory named by a hash of its
 * files, so an upgrade starts the new instance from a new directory while the
 * old instance keeps reading its own. config.json is not part of the hash:
 * it changes on every policy change, the program does not.
 */

export const CONFIG_FILE = 'config.json';
export const ENTRY_FILE = 'main.js';

function files(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile()) out.push(relative(dir, p));
    }
  };
  walk(dir);
  return out.filter((f) => f !== CONFIG_FILE).sort();
}

/** sha256 over the program's file names and contents (not config.json), 12 hex digits. */
export function programHash(programDir: string): string {
  if (!existsSync(join(programDir, ENTRY_FILE))) {
    throw new FsmNodeError('FSMN_ERR_PROXY_PROGRAM', `Pipy program not found: ${join(programDir, ENTRY_FILE)} does not exist`, { details: { programDir } });
  }
  const h = createHash('sha256');
  for (const f of files(programDir)) h.update(f).update('\0').update(readFileSync(join(programDir, f))).update('\0');
  return h.digest('hex').slice(0, 12);
}

/**
 * Copy the program into `<root>/<hash>/` (once; an existing complete copy is
 * reused) and return that directory. The copy is made beside and renamed into
 * place, so a crash never leaves a half-copied codebase under the final name.
 */
export function stageCodebase(programDir: string, root: string): { dir: string; hash: string } {
  const hash = programHash(programDir);
  const dir = join(root, hash);
  if (existsSync(join(dir, ENTRY_FILE))) return { dir, hash };
  const tmp = `${dir}.tmp${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true, mode: 0o755 });
  for (const f of files(programDir)) cpSync(join(programDir, f), join(tmp, f));
  rmSync(dir, { recursive: true, force: true });
  renameSync(tmp, dir);
  return { dir, hash };
}

/** Atomic replace: Pipy reads config.json on (re)load and must never see half a file. */
export function writeConfig(dir: string, text: string): void {
  const tmp = join(dir, `.${CONFIG_FILE}.tmp`);
  writeFileSync(tmp, text, { mode: 0o644 });
  renameSync(tmp, join(dir, CONFIG_FILE));
}

/** Remove staged codebases other than `keep` (after an upgrade retired their instance). */
export function pruneCodebases(root: string, keep: string[]): void {
  if (!existsSync(root)) return;
  for (const name of readdirSync(root)) {
    const p = join(root, name);
    if (!keep.includes(p) && statSync(p).isDirectory()) rmSync(p, { recursive: true, force: true });
  }
}
