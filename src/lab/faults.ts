import { mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { CommandError, InvalidInputError } from '../errors.js';
import { run } from '../util/exec.js';
import { LabError, labFiles, type LabNode, type LabState } from './state.js';
import { underlayNetnsName } from './topology.js';

/**
 * Faults the lab injects (issue 18): the test bed for timeouts, retries,
 * outlier detection and, later, failover.
 *
 * - Pod faults: each echo server is started with `--fault-file
 *   <dir>/faults/<pod>.json` and looks at that file on every request (a stat;
 *   a read only when it changed), so `lab fault` flips a running server
 *   without a control port that traffic could reach.
 * - Link faults: tc netem on both ends of a node's underlay veth (ul0 in the
 *   node, u<i> on the underlay bridge) so delay and loss hit both directions;
 *   `--down` sets the bridge end down: the node keeps its addresses and
 *   routes (a cut cable, not a deconfigured node) and loses carrier.
 * Everything stays inside the lab's network namespaces.
 */

export type PodFault = { kind: 'status'; status: number } | { kind: 'hang' } | { kind: 'close' };

export const faultFile = (labDir: string, pod: string): string => join(labFiles(labDir).faults, `${pod}.json`);

/** The fault from CLI flags: exactly one of --status, --hang, --close, --clear (undefined = clear). */
export function podFaultFromFlags(flags: { status?: string | undefined; hang?: boolean | undefined; close?: boolean | undefined; clear?: boolean | undefined }): PodFault | undefined {
  const given = [flags.status !== undefined && '--status', flags.hang && '--hang', flags.close && '--close', flags.clear && '--clear'].filter(Boolean);
  if (given.length !== 1) throw new InvalidInputError('lab fault flags', given.join(' ') || '(none)', 'give exactly one of --status CODE, --hang, --close, --clear');
  if (flags.clear) return undefined;
  if (flags.hang) return { kind: 'hang' };
  if (flags.close) return { kind: 'close' };
  return { kind: 'status', status: parseStatus(flags.status) };
}

function parseStatus(value: unknown, field = '--status'): number {
  const n = typeof value === 'string' && /^\d{3}$/.test(value) ? Number(value) : typeof value === 'number' ? value : NaN;
  if (!Number.isInteger(n) || n < 200 || n > 599) throw new InvalidInputError(field, value, 'must be an HTTP status code from 200 to 599');
  return n;
}

/** Parse a fault file's content; a broken file is an error naming it (the echo server then answers 200 and logs it). */
export function parsePodFault(text: string, where = 'fault file'): PodFault | undefined {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new InvalidInputError(where, text.slice(0, 80), `not JSON: ${(err as Error).message}`);
  }
  if (raw === null) return undefined;
  const r = raw as { kind?: unknown; status?: unknown };
  if (r.kind === 'hang' || r.kind === 'close') return { kind: r.kind };
  if (r.kind === 'status') return { kind: 'status', status: parseStatus(r.status, `${where}.status`) };
  throw new InvalidInputError(`${where}.kind`, r.kind, 'must be status, hang or close');
}

export function describePodFault(f: PodFault | undefined): string {
  if (!f) return 'no fault (answers 200)';
  if (f.kind === 'status') return `answers every request with HTTP ${f.status}`;
  return f.kind === 'hang' ? 'accepts requests and never answers' : 'closes every connection without an answer';
}

/** Write (or remove, for undefined) a pod's fault atomically: the server never reads half a file. */
export function writePodFault(file: string, fault: PodFault | undefined): void {
  if (!fault) {
    rmSync(file, { force: true });
    return;
  }
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(`${file}.tmp`, `${JSON.stringify(fault)}\n`);
  renameSync(`${file}.tmp`, file);
}

/**
 * What the echo server asks on each request: the current fault, re-read only
 * when the file's mtime or size changed. A missing file is no fault.
 */
export class FaultWatch {
  private stamp = '';
  private current: PodFault | undefined;
  constructor(
    readonly file: string,
    private readonly onError: (err: Error) => void = () => undefined,
  ) {}

  get(): PodFault | undefined {
    let stamp: string;
    try {
      const st = statSync(this.file);
      stamp = `${st.mtimeMs}:${st.size}:${st.ino}`;
    } catch {
      this.stamp = '';
      this.current = undefined;
      return undefined;
    }
    if (stamp !== this.stamp) {
      this.stamp = stamp;
      try {
        this.current = parsePodFault(readFileSync(this.file, 'utf8'), this.file);
      } catch (err) {
        this.current = undefined;
        this.onError(err as Error);
      }
    }
    return this.current;
  }
}

// ---- link faults ---------------------------------------------------------------

export interface LinkShape {
  delayMs?: number | undefined;
  lossPct?: number | undefined;
}

export type LinkAction = { kind: 'shape'; shape: LinkShape } | { kind: 'down' } | { kind: 'up' } | { kind: 'clear' };

export function linkActionFromFlags(flags: { delay?: string | undefined; loss?: string | undefined; down?: boolean | undefined; up?: boolean | undefined; clear?: boolean | undefined }): LinkAction {
  const shaping = flags.delay !== undefined || flags.loss !== undefined;
  const given = [shaping && '--delay/--loss', flags.down && '--down', flags.up && '--up', flags.clear && '--clear'].filter(Boolean);
  if (given.length !== 1) throw new InvalidInputError('lab link flags', given.join(' ') || '(none)', 'give --delay MS and/or --loss PCT, or exactly one of --down, --up, --clear');
  if (flags.down) return { kind: 'down' };
  if (flags.up) return { kind: 'up' };
  if (flags.clear) return { kind: 'clear' };
  const shape: LinkShape = {};
  if (flags.delay !== undefined) {
    const d = Number(flags.delay);
    if (!/^\d+$/.test(flags.delay) || d > 60_000) throw new InvalidInputError('--delay', flags.delay, 'must be whole milliseconds from 0 to 60000');
    shape.delayMs = d;
  }
  if (flags.loss !== undefined) {
    const l = Number(flags.loss);
    if (!/^\d+(\.\d+)?$/.test(flags.loss) || l > 100) throw new InvalidInputError('--loss', flags.loss, 'must be a percentage from 0 to 100');
    shape.lossPct = l;
  }
  return { kind: 'shape', shape };
}

/** The two ends of a node's underlay link. */
export function linkEnds(prefix: string, node: Pick<LabNode, 'netns' | 'index'>): { netns: string; dev: string }[] {
  return [
    { netns: node.netns, dev: 'ul0' },
    { netns: underlayNetnsName(prefix), dev: `u${node.index}` },
  ];
}

/**
 * The commands for a link action, as argv lists (pure; run by applyLinkAction).
 * netem goes on both ends (egress of each), so a 50 ms delay is 50 ms each
 * way and a 5 % loss is 5 % each way. `clear` removes netem and sets the link up.
 */
export function renderLinkCommands(prefix: string, node: Pick<LabNode, 'netns' | 'index'>, action: LinkAction): { cmd: string; args: string[]; allowFail?: boolean }[] {
  const ends = linkEnds(prefix, node);
  const bridgeEnd = ends[1]!;
  switch (action.kind) {
    case 'down':
      return [{ cmd: 'ip', args: ['-n', bridgeEnd.netns, 'link', 'set', bridgeEnd.dev, 'down'] }];
    case 'up':
      return [{ cmd: 'ip', args: ['-n', bridgeEnd.netns, 'link', 'set', bridgeEnd.dev, 'up'] }];
    case 'clear':
      return [
        ...ends.map((e) => ({ cmd: 'tc', args: ['-n', e.netns, 'qdisc', 'del', 'dev', e.dev, 'root'], allowFail: true })),
        { cmd: 'ip', args: ['-n', bridgeEnd.netns, 'link', 'set', bridgeEnd.dev, 'up'] },
      ];
    case 'shape': {
      const netem = ['netem'];
      if (action.shape.delayMs !== undefined) netem.push('delay', `${action.shape.delayMs}ms`);
      if (action.shape.lossPct !== undefined) netem.push('loss', `${action.shape.lossPct}%`);
      return ends.map((e) => ({ cmd: 'tc', args: ['-n', e.netns, 'qdisc', 'replace', 'dev', e.dev, 'root', ...netem] }));
    }
  }
}

export function describeLinkAction(node: string, a: LinkAction): string {
  switch (a.kind) {
    case 'down':
      return `${node}: underlay link down (carrier lost; addresses and routes kept)`;
    case 'up':
      return `${node}: underlay link up`;
    case 'clear':
      return `${node}: underlay link up, no delay or loss`;
    case 'shape':
      return `${node}: underlay link ${[a.shape.delayMs !== undefined && `delay ${a.shape.delayMs} ms`, a.shape.lossPct !== undefined && `loss ${a.shape.lossPct} %`].filter(Boolean).join(', ')} each way`;
  }
}

export function findNode(state: LabState, name: string | undefined): LabNode {
  const node = state.nodes.find((n) => n.name === name);
  if (!node) throw new InvalidInputError('NODE', name, `no such lab node; nodes: ${state.nodes.map((n) => n.name).join(', ')}`);
  return node;
}

/** tc's answer when the kernel has no such qdisc (here: CONFIG_NET_SCH_NETEM off, no module). */
export const NO_NETEM = /Specified qdisc kind is unknown/;

export async function applyLinkAction(state: LabState, nodeName: string | undefined, action: LinkAction): Promise<string> {
  const node = findNode(state, nodeName);
  for (const c of renderLinkCommands(state.prefix, node, action)) {
    const r = await run(c.cmd, c.args, { allowFail: true });
    if (r.code === 0 || c.allowFail) continue;
    if (c.cmd === 'tc' && NO_NETEM.test(r.stderr)) {
      // Nothing half-applied: undo a first end that took the qdisc (none can, without netem, but be sure).
      for (const e of linkEnds(state.prefix, node)) await run('tc', ['-n', e.netns, 'qdisc', 'del', 'dev', e.dev, 'root'], { allowFail: true });
      throw new LabError('lab link --delay/--loss needs the kernel\'s netem qdisc (CONFIG_NET_SCH_NETEM, module sch_netem), which this kernel does not have; --down, --up and --clear work without it');
    }
    throw new CommandError(c.cmd, c.args, r.code, r.stderr);
  }
  return describeLinkAction(node.name, action);
}
