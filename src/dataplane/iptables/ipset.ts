import type { ChildProcessWithoutNullStreams } from 'node:child_process';
import { FsmNodeError } from '../../errors.js';
import { isOurSet, tmpSetName, type Names } from './names.js';
import type { SetSpec } from './render.js';

/**
 * ipset: reading `ipset save` output, planning set changes, and a long-lived
 * ipset process to send them through.
 *
 * Why a long-lived process: enrolling one pod is one `add`; spawning
 * `nsenter ... ipset` for it costs ~3 ms, a round trip to an ipset already
 * running in the namespace ~0.2 ms. The process is ipset's own interactive
 * mode (`ipset -`, the same command language as `ipset restore`), with stdout
 * unbuffered (stdbuf) and stderr merged into it: each command's answer is
 * what ipset prints before its next `ipset> ` prompt, so every command gets
 * its own success or error, in order. That is what makes the set half of a
 * sync all-or-nothing: we know exactly which commands took effect and undo
 * those.
 *
 * One quirk decides what the session may run: in interactive mode the list
 * flags (-n, -t) and the output format of list/save stay set for every later
 * command. So the session runs only commands that print nothing (create,
 * add, del, swap, destroy, flush) and `list -t <set>`, whose sticky header
 * flag is then always what it wants; reading members goes through a
 * one-off `ipset save`.
 */

export interface InstalledSet {
  name: string;
  type: string;
  family: string;
  comment: boolean;
  /** The kernel's random hash seed, fixed when the set is created: tells a re-created set from an adopted one. */
  initval: string | undefined;
  members: Map<string, string | undefined>;
}

/** `ipset save` output -> sets by name. Members keep their comment (unquoted). */
export function parseIpsetSave(text: string): Map<string, InstalledSet> {
  const sets = new Map<string, InstalledSet>();
  for (const line of text.split('\n')) {
    const words = line.split(' ');
    if (words[0] === 'create' && words.length >= 3) {
      const name = words[1] as string;
      const familyAt = words.indexOf('family');
      const initvalAt = words.indexOf('initval');
      sets.set(name, {
        name,
        type: words[2] as string,
        family: familyAt > 0 ? (words[familyAt + 1] ?? '') : '',
        comment: words.slice(3).includes('comment'),
        initval: initvalAt > 0 ? words[initvalAt + 1] : undefined,
        members: new Map(),
      });
    } else if (words[0] === 'add' && words.length >= 3) {
      const set = sets.get(words[1] as string);
      if (!set) continue;
      const m = / comment "((?:[^"\\]|\\.)*)"/.exec(line);
      set.members.set(words[2] as string, m ? m[1] : undefined);
    }
  }
  return sets;
}

export function headerMatches(installed: InstalledSet, spec: SetSpec): boolean {
  return installed.type === spec.type && installed.family === 'inet' && installed.comment === spec.comment;
}

export function createCommand(spec: SetSpec, name: string = spec.name): string {
  return `create ${name} ${spec.type} family inet${spec.comment ? ' comment' : ''}`;
}

export function addCommand(set: string, member: string, comment: string | undefined): string {
  return comment === undefined ? `add ${set} ${member}` : `add ${set} ${member} comment "${comment}"`;
}

export function delCommand(set: string, member: string): string {
  return `del ${set} ${member}`;
}

/** Members to delete and to add so `have` becomes `want`; a changed comment is a delete plus an add. */
export function diffMembers(
  have: ReadonlyMap<string, string | undefined>,
  want: ReadonlyMap<string, string | undefined>,
): { del: [string, string | undefined][]; add: [string, string | undefined][] } {
  const del: [string, string | undefined][] = [];
  const add: [string, string | undefined][] = [];
  for (const [m, c] of have) if (!want.has(m) || want.get(m) !== c) del.push([m, c]);
  for (const [m, c] of want) if (!have.has(m) || have.get(m) !== c) add.push([m, c]);
  return { del, add };
}

export class SetMismatchError extends FsmNodeError {
  constructor(set: string, found: string, expected: string) {
    super('FSMN_ERR_IPSET_MISMATCH', `ipset ${set} exists as "${found}" but fsm-node needs "${expected}": it was changed outside fsm-node; run fsm-node cleanup to remove it`, {
      details: { set, found, expected },
    });
  }
}

/**
 * A full set sync in three steps, so the live sets change only in `commit`:
 *  prepare: create missing sets (unreferenced until the rules land) and fill
 *           a scratch `<set>-tmp` for each set whose members differ;
 *  commit:  `swap` each scratch set with its live set (atomic per set);
 *  finish:  destroy the scratch sets (now holding the old members) and our
 *           sets that are no longer desired, after the rules stopped naming them.
 * Undo (see undoCommands) destroys what prepare created and swaps back.
 */
export interface SetPlan {
  prepare: string[];
  commit: string[];
  finish: string[];
  changes: number;
}

/**
 * What undoes the commands that succeeded, newest first: a created set is
 * destroyed, a swap is swapped back, an added member deleted and the reverse.
 * Built from the replies, so a command that failed (a set that already
 * existed) is never "undone" into damage.
 */
export function undoCommands(replies: IpsetReply[], comments: ReadonlyMap<string, ReadonlyMap<string, string | undefined>> = new Map()): string[] {
  const undo: string[] = [];
  for (const r of replies) {
    if (!r.ok) continue;
    const [verb, set, arg] = r.command.split(' ') as [string, string, string | undefined];
    if (verb === 'create') undo.push(`destroy ${set}`);
    else if (verb === 'swap') undo.push(r.command);
    else if (verb === 'add' && arg !== undefined) undo.push(delCommand(set, arg));
    else if (verb === 'del' && arg !== undefined) undo.push(addCommand(set, arg, comments.get(set)?.get(arg)));
  }
  return undo.reverse();
}

export function planSets(installed: ReadonlyMap<string, InstalledSet>, ourSetNames: string[], desired: SetSpec[], names: Names): SetPlan {
  const plan: SetPlan = { prepare: [], commit: [], finish: [], changes: 0 };
  const desiredNames = new Set(desired.map((s) => s.name));
  const scratch = new Set(desired.map((s) => tmpSetName(s.name)));
  // A scratch set left by a sync that died half-way: never referenced by a rule, safe to drop.
  for (const name of ourSetNames) if (scratch.has(name)) plan.prepare.push(`destroy ${name}`);
  for (const spec of desired) {
    const have = installed.get(spec.name);
    if (have && !headerMatches(have, spec)) {
      throw new SetMismatchError(spec.name, `${have.type} family ${have.family}${have.comment ? ' comment' : ''}`, `${spec.type} family inet${spec.comment ? ' comment' : ''}`);
    }
    const target = have ? tmpSetName(spec.name) : spec.name;
    if (have) {
      const { del, add } = diffMembers(have.members, spec.members);
      if (del.length + add.length === 0) continue;
      plan.changes += del.length + add.length;
      plan.commit.push(`swap ${target} ${spec.name}`);
      plan.finish.push(`destroy ${target}`);
    } else {
      plan.changes += 1 + spec.members.size;
    }
    plan.prepare.push(createCommand(spec, target));
    // Sorted only so the same state always gives the same text (golden files, logs).
    for (const m of [...spec.members.keys()].sort()) plan.prepare.push(addCommand(target, m, spec.members.get(m)));
  }
  for (const name of ourSetNames) {
    if (isOurSet(names, name) && !desiredNames.has(name) && !scratch.has(name)) {
      plan.finish.push(`destroy ${name}`);
      plan.changes += 1;
    }
  }
  return plan;
}

export interface SetHeader {
  references: number;
  entries: number;
}

/** `ipset list -t <set>` -> the two numbers the cheap tamper check compares. */
export function parseListHeader(text: string): SetHeader | undefined {
  const refs = /^References: (\d+)$/m.exec(text);
  const entries = /^Number of entries: (\d+)$/m.exec(text);
  if (!refs || !entries) return undefined;
  return { references: Number(refs[1]), entries: Number(entries[1]) };
}

// ---- the long-lived ipset process ----------------------------------------------

export interface IpsetReply {
  command: string;
  ok: boolean;
  /** What ipset printed for this command (data for list/save, the message for an error). */
  output: string;
}

/** Where ipset commands go; the real one is IpsetSession, unit tests pass a fake. */
export interface IpsetChannel {
  run(commands: string[]): Promise<IpsetReply[]>;
  close(): Promise<void>;
}

export class IpsetUnavailableError extends FsmNodeError {
  constructor(why: string, options?: { cause?: unknown }) {
    super('FSMN_ERR_IPSET_UNAVAILABLE', `ipset is not usable on this node: ${why}`, options);
  }
}

const PROMPT = 'ipset> ';
/** See the quirk above: nothing whose output flags would stick. One line each. */
const SESSION_COMMAND = /^(create|add|del|swap|destroy|flush) [^\n]+$|^list -t [^\s]+$/;
/** Error lines of ipset start with its name and version. */
const ERROR_LINE = /^ipset v[0-9.]+: /m;

export function isErrorOutput(output: string): boolean {
  return ERROR_LINE.test(output);
}

/** Messages that mean the kernel side is missing, not that a command was wrong. */
export function kernelMissing(output: string): boolean {
  return /Kernel error received: ipset protocol error|Cannot open session to kernel|Kernel support protocol versions/.test(output);
}

export class IpsetSession implements IpsetChannel {
  private child: ChildProcessWithoutNullStreams | undefined;
  private buffer = '';
  /** stderr of the wrapper (nsenter, sh): only there when starting fails. */
  private startErrors = '';
  private answers: string[] = [];
  private startup = true;
  private waiter: { need: number; resolve: () => void; reject: (err: Error) => void } | undefined;
  private exitError: Error | undefined;
  /** Calls are serialised: one batch in flight, answers matched by order. */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly spawnIpset: () => ChildProcessWithoutNullStreams,
    private readonly timeoutMs = 30_000,
  ) {}

  run(commands: string[]): Promise<IpsetReply[]> {
    const next = this.queue.then(() => this.runNow(commands));
    this.queue = next.catch(() => undefined);
    return next;
  }

  private start(): ChildProcessWithoutNullStreams {
    const child = this.spawnIpset();
    this.child = child;
    this.buffer = '';
    this.startErrors = '';
    this.answers = [];
    this.startup = true;
    this.exitError = undefined;
    child.stdout.setEncoding('utf8').on('data', (d: string) => this.onData(d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (this.startErrors += d));
    child.stdin.on('error', () => {}); // an exited ipset shows up as 'exit' below
    // An idle session must not keep the agent (or a CLI, or jest) alive: ipset
    // exits on its own when our end of its stdin closes. While a batch is in
    // flight its timeout timer keeps the event loop running.
    child.unref();
    for (const stream of [child.stdin, child.stdout, child.stderr]) (stream as unknown as { unref?: () => void }).unref?.();
    const onGone = (why: string): void => {
      if (this.child !== child) return;
      this.child = undefined;
      const said = `${this.startErrors}${this.buffer}`.trim();
      this.exitError = new IpsetUnavailableError(`the ipset process ${why}${said ? `: ${said}` : ''}`);
      this.waiter?.reject(this.exitError);
      this.waiter = undefined;
    };
    child.on('error', (err) => onGone(`could not start (${err.message})`));
    child.on('exit', (code, signal) => onGone(`exited (${signal ?? `code ${code}`})`));
    return child;
  }

  private onData(data: string): void {
    this.buffer += data;
    let at = this.buffer.indexOf(PROMPT);
    while (at >= 0) {
      const answer = this.buffer.slice(0, at);
      this.buffer = this.buffer.slice(at + PROMPT.length);
      if (this.startup) this.startup = false;
      else this.answers.push(answer);
      at = this.buffer.indexOf(PROMPT);
    }
    if (this.waiter && !this.startup && this.answers.length >= this.waiter.need) {
      this.waiter.resolve();
      this.waiter = undefined;
    }
  }

  private async runNow(commands: string[]): Promise<IpsetReply[]> {
    if (commands.length === 0) return [];
    for (const c of commands) {
      if (!SESSION_COMMAND.test(c)) throw new FsmNodeError('FSMN_ERR_IPSET_COMMAND', `not a command for the ipset session (writes and "list -t <set>" only): ${JSON.stringify(c)}`);
    }
    const child = this.child ?? this.start();
    this.answers = [];
    const done = new Promise<void>((resolve, reject) => {
      if (this.exitError) return reject(this.exitError);
      this.waiter = { need: commands.length, resolve, reject };
    });
    const timer = setTimeout(() => {
      this.waiter?.reject(new IpsetUnavailableError(`no answer from the ipset process within ${this.timeoutMs} ms`));
      this.waiter = undefined;
      child.kill('SIGKILL');
    }, this.timeoutMs);
    try {
      child.stdin.write(`${commands.join('\n')}\n`);
      await done;
    } finally {
      clearTimeout(timer);
    }
    const answers = this.answers.splice(0, commands.length);
    return commands.map((command, i) => {
      const output = answers[i] ?? '';
      return { command, ok: !isErrorOutput(output), output };
    });
  }

  async close(): Promise<void> {
    const child = this.child;
    if (!child) return;
    this.child = undefined;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.stdin.end();
    const timer = setTimeout(() => child.kill('SIGKILL'), 2000);
    await exited;
    clearTimeout(timer);
  }
}
