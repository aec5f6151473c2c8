import { performance } from 'node:perf_hooks';
import { CommandError, FsmNodeError, errorMessage } from '../../errors.js';
import { logger } from '../../util/log.js';
import type { ApplyResult, CleanupReport, Dataplane, DesiredState, InstalledState } from '../types.js';
import { BACKENDS, removeStateFile, resolveBackend, restoreCommand, saveCommand, type Backend, type BackendChoice } from './backend.js';
import {
  IpsetSession,
  IpsetUnavailableError,
  kernelMissing,
  parseIpsetSave,
  parseListHeader,
  planSets,
  undoCommands,
  type InstalledSet,
  type IpsetChannel,
  type IpsetReply,
} from './ipset.js';
import { isOurSet, makeNames, TABLES, type Names, type Table } from './names.js';
import { nodeExec, type NodeExec } from './netns.js';
import { countReferences, renderSets, renderTables, type TableSpec } from './render.js';
import { SetCache } from './set-cache.js';
import { failedLine, linesAround, parseSave, planRemoval, planTable, savedTables, type InstalledTable, type TablePlan } from './tables.js';
import { validateDesired, type NormalState } from './validate.js';

const log = logger('dataplane.iptables');

export interface IptablesDataplaneOptions {
  /** Network namespace (name under /run/netns) the node's pod traffic is routed through; undefined = the agent's own. */
  netns?: string;
  /** Where the backend choice is persisted (iptables-backend.json). Without it the choice is re-derived from our own chains. */
  stateDir?: string;
  /** Name prefix: chains `<PREFIX>_*`, sets `<prefix>-*` (default fsmn). */
  prefix?: string;
  /** Seams for tests. */
  exec?: NodeExec;
  ipset?: IpsetChannel;
  hooks?: {
    /** Sees (and may replace) each iptables-restore input before it is applied: how tests inject a failing line. */
    beforeRestore?: (table: string, text: string) => string;
  };
}

/** Counters for metrics (wired by the agent) and `status`. */
export interface IptablesStats {
  syncs: number;
  fullSyncs: number;
  /** Failed applies: each one left the previous state in force and made the next sync full. */
  failures: number;
  /** Non-full syncs that found tampering (a missing jump or chain, a flushed set) and went full. */
  tamperRepairs: number;
  lastChanges: number;
  lastError: string | undefined;
}

/** iptables-restore rejected a transaction; nothing of it was applied. */
export class RestoreError extends FsmNodeError {
  constructor(backend: Backend, table: string, stderr: string, line: number | undefined, around: string[]) {
    super('FSMN_ERR_IPTABLES_RESTORE', `${restoreCommand(backend)} of table ${table} failed${line ? ` at line ${line}` : ''}: ${stderr.trim()}`, {
      details: { backend, table, line, around },
    });
  }
}

/** An ipset command of a sync failed; what the sync had done was undone. */
export class IpsetApplyError extends FsmNodeError {
  constructor(reply: IpsetReply) {
    super('FSMN_ERR_IPSET_APPLY', `ipset ${reply.command} failed: ${reply.output.trim()}`, { details: { command: reply.command } });
  }
}

interface Cache {
  /** Rules as last applied: a non-full sync with the same rules touches no table. */
  tablesKey: string;
  sets: SetCache;
}

/** One sync's input: the validated state and the rules rendered from it (sets are rendered only when a full sync needs them). */
interface SyncInput {
  state: NormalState;
  tables: Record<Table, TableSpec>;
  /** How many of our rules name each set: what the kernel reports as the set's References. */
  references: Map<string, number>;
}

function tablesKey(tables: Record<Table, TableSpec>): string {
  return TABLES.map((t) => [...tables[t].jumps, ...[...tables[t].chains].map(([c, rules]) => [c, ...rules].join('\n'))].join('\n')).join('\n--\n');
}

function firstFailure(replies: IpsetReply[]): IpsetReply | undefined {
  return replies.find((r) => !r.ok);
}

/**
 * The iptables dataplane: nat PREROUTING redirect of enrolled pods (an ipset)
 * to the node proxy, strict inbound in filter FORWARD, all inside one node
 * network namespace. See render.ts for the rules and why they look so.
 *
 * A sync is either
 *  - non-full (the common case, e.g. one pod enrolled): rules unchanged since
 *    the last sync, so only set members are added / deleted, and in the same
 *    ipset round trip every set's header is read: its "References" must equal
 *    the number of our rules naming it (a deleted jump or a flushed chain
 *    drops it) and its size what we put in (a flushed set). Any surprise, or
 *    changed rules, escalates to
 *  - full: read everything of ours back (iptables-save, ipset save), and make
 *    it equal to the rendering: sets via scratch set + swap, one
 *    iptables-restore --noflush per table that differs. Any failure undoes
 *    what this sync already did (sets swapped back, committed tables planned
 *    back to their snapshot), so the previous state stays in force.
 */
export class IptablesDataplane implements Dataplane {
  readonly mode = 'iptables' as const;
  readonly names: Names;
  readonly stats: IptablesStats = { syncs: 0, fullSyncs: 0, failures: 0, tamperRepairs: 0, lastChanges: 0, lastError: undefined };
  private readonly exec: NodeExec;
  private readonly ipset: IpsetChannel;
  private readonly stateDir: string | undefined;
  private readonly hooks: IptablesDataplaneOptions['hooks'];
  private backend: BackendChoice | undefined;
  private ipsetChecked = false;
  private cache: Cache | undefined;
  private needFull = true;
  private closed = false;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(opts: IptablesDataplaneOptions = {}) {
    this.names = makeNames(opts.prefix);
    this.exec = opts.exec ?? nodeExec(opts.netns);
    this.ipset = opts.ipset ?? new IpsetSession(() => this.exec.spawnIpset());
    this.stateDir = opts.stateDir;
    this.hooks = opts.hooks;
  }

  /** The backend in use, once the first apply / installed() decided it. */
  get backendChoice(): BackendChoice | undefined {
    return this.backend;
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    if (this.closed) return Promise.reject(new FsmNodeError('FSMN_ERR_CLOSED', 'the iptables dataplane is closed'));
    const next = this.queue.then(fn);
    this.queue = next.catch(() => undefined);
    return next;
  }

  async apply(desired: DesiredState, opts: { full?: boolean } = {}): Promise<ApplyResult> {
    const started = performance.now();
    // Everything is checked before the kernel is touched: bad input changes nothing.
    const state = validateDesired(desired);
    const tables = renderTables(state, this.names);
    const input: SyncInput = { state, tables, references: countReferences(tables, this.names) };
    return this.serial(async () => {
      let full = opts.full === true || this.needFull || this.cache === undefined;
      try {
        await this.prepare(true);
        let changes = 0;
        if (!full) {
          const r = await this.syncIncremental(input);
          changes = r.changes;
          if (r.escalate) full = true;
        }
        if (full) changes += await this.syncFull(input);
        this.needFull = false;
        this.stats.syncs++;
        if (full) this.stats.fullSyncs++;
        this.stats.lastChanges = changes;
        const result = { full, changes, durationMs: performance.now() - started };
        log.debug({ ...result, pods: desired.pods.length }, 'sync done');
        return result;
      } catch (err) {
        this.needFull = true;
        this.cache = undefined;
        this.stats.failures++;
        this.stats.lastError = errorMessage(err);
        log.error({ err, full }, 'sync failed: previous state kept, next sync is full');
        throw err;
      }
    });
  }

  /** Once per instance: ipset usable, backend chosen (and persisted, unless a read-only caller asks). */
  private async prepare(persist: boolean): Promise<BackendChoice> {
    if (!this.ipsetChecked) {
      const probe = await this.exec.run('ipset', ['list', '-n'], { allowFail: true }).catch((err: unknown) => {
        throw new IpsetUnavailableError(`cannot run the ipset command (${errorMessage(err)}): install ipset`, { cause: err });
      });
      if (probe.code !== 0) {
        const said = probe.stderr.trim();
        throw new IpsetUnavailableError(kernelMissing(said) ? `the kernel has no ipset support (CONFIG_IP_SET, module ip_set): ${said}` : said);
      }
      this.ipsetChecked = true;
    }
    if (this.backend) return this.backend;
    const choice = await resolveBackend(this.exec, this.names, this.stateDir, persist);
    if (persist) {
      this.backend = choice;
      log.info({ backend: choice.backend, source: choice.source, observed: choice.observed, stateFile: choice.stateFile }, 'iptables backend chosen');
    }
    return choice;
  }

  private async syncIncremental(input: SyncInput): Promise<{ changes: number; escalate: boolean }> {
    const cache = this.cache as Cache;
    if (tablesKey(input.tables) !== cache.tablesKey) return { changes: 0, escalate: true };
    const delta = cache.sets.changes(input.state);
    const setNames = Object.values(this.names.sets);
    const replies = await this.ipset.run([...delta.commands, ...setNames.map((s) => `list -t ${s}`)]);
    const applied = replies.slice(0, delta.commands.length);
    const failed = firstFailure(applied);
    if (failed) {
      // Most likely a set was destroyed behind our back: undo what did apply, let the full sync repair.
      await this.undoSets(applied, delta.deletedComments);
      log.warn({ command: failed.command, output: failed.output.trim() }, 'set update failed: going full');
      this.stats.tamperRepairs++;
      return { changes: 0, escalate: true };
    }
    const surprises: string[] = [];
    setNames.forEach((set, i) => {
      const reply = replies[delta.commands.length + i];
      const header = reply?.ok ? parseListHeader(reply.output) : undefined;
      const refs = input.references.get(set) ?? 0;
      const size = cache.sets.sizes.get(set) ?? 0;
      if (!header) surprises.push(`${set} missing`);
      else if (header.references !== refs) surprises.push(`${set} referenced by ${header.references} rules, expected ${refs}`);
      else if (header.entries !== size) surprises.push(`${set} holds ${header.entries} entries, expected ${size}`);
    });
    if (surprises.length > 0) {
      log.warn({ surprises }, 'installed state differs from the last sync (tampering?): going full');
      this.stats.tamperRepairs++;
      return { changes: delta.commands.length, escalate: true };
    }
    return { changes: delta.commands.length, escalate: false };
  }

  /** Our part of nat and filter, from one iptables-save (without -t: listing a table must not create it). */
  private async readTables(backend: Backend): Promise<{ tables: Record<Table, InstalledTable> }> {
    const { stdout } = await this.exec.run(saveCommand(backend), []);
    return { tables: { nat: parseSave(stdout, 'nat', this.names), filter: parseSave(stdout, 'filter', this.names) } };
  }

  /** Our sets, read with one `ipset save` (the session must not run it, see ipset.ts). */
  private async readSets(): Promise<{ ours: string[]; sets: Map<string, InstalledSet> }> {
    const { stdout } = await this.exec.run('ipset', ['save']);
    const sets = new Map([...parseIpsetSave(stdout)].filter(([name]) => isOurSet(this.names, name)));
    return { ours: [...sets.keys()], sets };
  }

  /**
   * Run ipset commands that must all succeed. On the first failure undo what
   * succeeded here and in `earlier` steps of the same sync, then throw.
   */
  private async ipsetStep(commands: string[], earlier: IpsetReply[] = []): Promise<IpsetReply[]> {
    const replies = await this.ipset.run(commands);
    const failed = firstFailure(replies);
    if (!failed) return replies;
    await this.undoSets([...earlier, ...replies]);
    throw new IpsetApplyError(failed);
  }

  private async undoSets(replies: IpsetReply[], deletedComments?: Map<string, Map<string, string | undefined>>): Promise<void> {
    const undoReplies = await this.ipset.run(undoCommands(replies, deletedComments));
    const failed = firstFailure(undoReplies);
    if (failed) log.error({ command: failed.command, output: failed.output.trim() }, 'undo of set changes failed; the next full sync repairs it');
  }

  private async restore(backend: Backend, plan: TablePlan): Promise<void> {
    const text = this.hooks?.beforeRestore ? this.hooks.beforeRestore(plan.table, plan.text as string) : (plan.text as string);
    const res = await this.exec.run(restoreCommand(backend), ['--noflush', '--wait=5'], { input: text, allowFail: true });
    if (res.code === 0) return;
    const line = failedLine(res.stderr);
    const around = line === undefined ? text.split('\n') : linesAround(text, line);
    log.error({ table: plan.table, line, stderr: res.stderr.trim(), around }, 'iptables-restore failed; the table is unchanged');
    throw new RestoreError(backend, plan.table, res.stderr, line, around);
  }

  private async syncFull(input: SyncInput): Promise<number> {
    const backend = (this.backend as BackendChoice).backend;
    const { tables: before } = await this.readTables(backend);
    const { ours, sets } = await this.readSets();
    // Planning throws on a set we cannot fix (wrong type): before anything changed.
    const setPlan = planSets(sets, ours, renderSets(input.state, this.names), this.names);
    const tablePlans = TABLES.map((t) => planTable(before[t], input.tables[t]));

    const prepared = await this.ipsetStep(setPlan.prepare);
    const swapped = await this.ipsetStep(setPlan.commit, prepared);
    const committed: TablePlan[] = [];
    for (const plan of tablePlans) {
      if (plan.text === undefined) continue;
      try {
        await this.restore(backend, plan);
        committed.push(plan);
      } catch (err) {
        await this.rollback(backend, input.tables, before, committed, [...prepared, ...swapped]);
        throw err;
      }
    }
    const finish = await this.ipset.run(setPlan.finish);
    for (const r of finish) {
      // The new state is in force; a leftover scratch or stale set is only untidy. The next full sync retries.
      if (!r.ok) log.warn({ command: r.command, output: r.output.trim() }, 'could not remove a set that is no longer used');
    }
    this.cache = { tablesKey: tablesKey(input.tables), sets: SetCache.fromState(input.state, this.names) };
    return setPlan.changes + tablePlans.reduce((n, p) => n + p.changes, 0);
  }

  /** Put committed tables back as they were (planning from the new state to the snapshot), then the sets. */
  private async rollback(backend: Backend, tables: Record<Table, TableSpec>, before: Record<Table, InstalledTable>, committed: TablePlan[], setReplies: IpsetReply[]): Promise<void> {
    for (const plan of [...committed].reverse()) {
      const table = plan.table as Table;
      const back = planTable(tables[table], before[table]);
      if (back.text === undefined) continue;
      try {
        await this.restore(backend, back);
      } catch (err) {
        log.error({ err, table }, 'rollback of a committed table failed; the next full sync repairs it');
      }
    }
    // Swapped back before the created sets are destroyed: undoCommands puts the newest first.
    await this.undoSets(setReplies);
  }

  async installed(): Promise<InstalledState> {
    return this.serial(async () => {
      const choice = await this.prepare(false);
      const backend = choice.backend;
      const { tables } = await this.readTables(backend);
      const { sets } = await this.readSets();
      const pods = [...(sets.get(this.names.sets.pods)?.members.values() ?? [])].filter((uid): uid is string => uid !== undefined).sort();
      return {
        mode: this.mode,
        pods,
        detail: {
          backend,
          backendSource: choice.source,
          stateFile: choice.stateFile,
          netns: this.exec.netns,
          chains: Object.fromEntries(TABLES.map((t) => [t, Object.fromEntries([...tables[t].chains].map(([c, rules]) => [c, rules.length]))])),
          jumps: Object.fromEntries(TABLES.map((t) => [t, tables[t].jumps.length])),
          sets: Object.fromEntries([...sets].map(([name, s]) => [name, s.members.size])),
          setIds: Object.fromEntries([...sets].map(([name, s]) => [name, s.initval])),
          stats: { ...this.stats },
        },
      };
    });
  }

  /**
   * Remove every jump to our chains, our chains and our sets, in both
   * backends (a node whose backend changed under us still ends clean), and
   * forget the backend choice. Touches nothing without our prefix.
   */
  async cleanup(): Promise<CleanupReport> {
    return this.serial(async () => {
      const removed: string[] = [];
      for (const backend of BACKENDS) {
        const stdout = await this.exec.run(saveCommand(backend), []).then(
          (r) => r.stdout,
          (err: unknown) => {
            if (err instanceof CommandError) return undefined; // that backend is not installed: nothing of ours in it
            throw err;
          },
        );
        if (stdout === undefined) continue;
        for (const table of savedTables(stdout)) {
          const installed = parseSave(stdout, table, this.names);
          const plan = planRemoval(installed);
          if (plan.text === undefined) continue;
          await this.restore(backend, plan);
          for (const j of [...installed.jumps, ...installed.foreignJumps]) removed.push(`${backend} ${table} rule: ${j}`);
          for (const c of installed.chains.keys()) removed.push(`${backend} ${table} chain ${c}`);
        }
      }
      const { ours } = await this.readSets();
      const destroyed = await this.ipset.run(ours.map((n) => `destroy ${n}`));
      const failed = firstFailure(destroyed);
      if (failed) throw new IpsetApplyError(failed);
      removed.push(...ours.map((n) => `ipset ${n}`));
      const stateFile = await removeStateFile(this.stateDir);
      if (stateFile) removed.push(`state file ${stateFile}`);
      this.backend = undefined;
      this.cache = undefined;
      this.needFull = true;
      log.info({ removed }, 'cleanup done');
      return { removed };
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.queue;
    this.closed = true;
    await this.ipset.close();
  }
}
