import { errorMessage } from '../errors.js';
import { gatherClusters, renderClusters, type ClusterView } from './clusters/status.js';
import { isOurs } from './processes.js';
import type { LabState } from './state.js';
import { AGENT_BACKOFF, agentProcess, readSupervisorStatus, type AgentRun } from './supervisor.js';

/**
 * `lab status`: what runs in the lab now, gathered from lab.json, the
 * supervisor's status file, the processes themselves and each agent's
 * /v1/state. The JSON is an object of lists (`nodes`, `pods`, ...) so later
 * parts (clusters, services) add keys without breaking scripts.
 */

export interface AgentView {
  url: string;
  pid?: number;
  /** The process runs (and is the one the supervisor started, not a reused pid). */
  up: boolean;
  /** Its API answered ready. */
  ready: boolean;
  notReadyReason?: string;
  /** Why there is no answer, when the API did not answer. */
  unreachable?: string;
  restarts: number;
  lastExit?: AgentRun['lastExit'];
  nextRestartAt?: string;
  startedAt?: string;
}

export interface NodeView {
  name: string;
  /** Effective interception mode as the agent reports it, else undefined. */
  mode?: string;
  fallbackReason?: string;
  agent: AgentView;
  proxy?: { kind: string; pid?: number; up: boolean; listening: boolean; restarts: number; adopted?: boolean };
  /** The agent's first sync after its (re)start: 0 changes = it adopted what was installed. */
  firstSync?: { full: boolean; changes: number; proxyConfigChanged?: boolean; at: string };
  pods: string[];
}

export interface PodView {
  name: string;
  node: string;
  ip: string;
  version: string;
  up: boolean;
  pid?: number;
}

export interface LabStatus {
  ok: boolean;
  dir: string;
  mode: string;
  proxy: string;
  controller: { url: string; pid?: number; up: boolean };
  supervisor: { pid?: number; up: boolean; startedAt?: string };
  nodes: NodeView[];
  pods: PodView[];
  /** A cluster lab only: its clusters, with their services, exports and imports (src/lab/clusters/status.ts). */
  clusters?: ClusterView[];
}

interface AgentStateAnswer {
  ready?: boolean;
  notReadyReason?: string;
  mode?: { effective?: string; fallbackReason?: string };
  proxy?: NodeView['proxy'];
  sync?: { first?: NodeView['firstSync'] };
}

async function askAgent(url: string): Promise<AgentStateAnswer> {
  const res = await fetch(`${url}/v1/state`, { signal: AbortSignal.timeout(2000) });
  if (!res.ok) throw new Error(`HTTP ${res.status}`);
  return (await res.json()) as AgentStateAnswer;
}

export async function gatherLabStatus(state: LabState): Promise<LabStatus> {
  const sup = readSupervisorStatus(state.dir);
  const supUp = state.supervisor !== undefined && isOurs(state.supervisor) && sup?.stoppedAt === undefined;
  const nodes = await Promise.all(
    state.nodes.map(async (n): Promise<NodeView> => {
      const run = sup?.agents[n.name];
      const proc = agentProcess(run);
      const agent: AgentView = {
        url: n.agentUrl,
        ...(proc ? { pid: proc.pid } : {}),
        up: proc !== undefined && isOurs(proc),
        ready: false,
        restarts: run?.restarts ?? 0,
        ...(run?.lastExit ? { lastExit: run.lastExit } : {}),
        ...(run?.nextRestartAt && supUp ? { nextRestartAt: run.nextRestartAt } : {}),
        ...(run?.startedAt ? { startedAt: run.startedAt } : {}),
      };
      const view: NodeView = { name: n.name, agent, pods: state.pods.filter((p) => p.node === n.name).map((p) => p.name) };
      try {
        const s = await askAgent(n.agentUrl);
        agent.ready = s.ready === true;
        if (!agent.ready) agent.notReadyReason = s.notReadyReason ?? 'unknown';
        if (s.mode?.effective) view.mode = s.mode.effective;
        if (s.mode?.fallbackReason) view.fallbackReason = s.mode.fallbackReason;
        if (s.proxy) view.proxy = s.proxy;
        if (s.sync?.first) view.firstSync = s.sync.first;
      } catch (err) {
        agent.unreachable = errorMessage(err);
      }
      return view;
    }),
  );
  const pods = state.pods.map((p): PodView => ({ name: p.name, node: p.node, ip: p.ip, version: p.version, up: p.server !== undefined && isOurs(p.server), ...(p.server ? { pid: p.server.pid } : {}) }));
  const ctl = state.controller.process;
  const clusters = state.clusters ? await gatherClusters(state) : undefined;
  return {
    ok: supUp && nodes.every((n) => n.agent.up && n.agent.ready) && pods.every((p) => p.up) && (clusters ?? []).every((c) => c.controller.up && c.clusterset.relay.up),
    dir: state.dir,
    mode: state.mode,
    proxy: state.proxy,
    controller: { url: state.controller.url, ...(ctl ? { pid: ctl.pid } : {}), up: ctl !== undefined && isOurs(ctl) },
    supervisor: { ...(state.supervisor ? { pid: state.supervisor.pid } : {}), up: supUp, ...(sup ? { startedAt: sup.startedAt } : {}) },
    nodes,
    pods,
    ...(clusters ? { clusters } : {}),
  };
}

/** "3 s ago", "in 2 s", "4 min ago": short relative times for the table. */
export function ago(iso: string, now: number): string {
  const s = Math.round((now - Date.parse(iso)) / 1000);
  const abs = Math.abs(s);
  const text = abs < 120 ? `${abs} s` : abs < 7200 ? `${Math.round(abs / 60)} min` : `${Math.round(abs / 3600)} h`;
  return s >= 0 ? `${text} ago` : `in ${text}`;
}

function agentColumn(a: AgentView, now: number): string {
  if (!a.up) return a.nextRestartAt ? `DOWN, restart ${ago(a.nextRestartAt, now)}` : 'DOWN';
  if (a.ready) return 'ready';
  return a.unreachable ? `starting (no answer: ${a.unreachable})` : `NOT READY: ${a.notReadyReason ?? 'unknown'}`;
}

function table(rows: string[][]): string[] {
  const widths = rows[0]!.map((_c, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd());
}

/**
 * One line per restarted agent: how it last ended and what its first sync
 * since changed (0 changes: it adopted the pins, rules and proxy it found).
 * Said by `lab status` and as notes by `lab check`.
 */
export function restartNotes(s: Pick<LabStatus, 'nodes'>, now = Date.now()): string[] {
  const out: string[] = [];
  for (const n of s.nodes) {
    const a = n.agent;
    if (a.restarts === 0) continue;
    const exit = a.lastExit ? ` (last exit: ${a.lastExit.reason} ${ago(a.lastExit.at, now)})` : '';
    let sync = '; no answer from it yet';
    const f = n.firstSync;
    if (f) {
      const proxy = f.proxyConfigChanged === undefined ? '' : f.proxyConfigChanged ? ', proxy config changed' : ', proxy config unchanged';
      sync = `; its first sync: ${f.changes} changes${proxy}${f.changes === 0 && f.proxyConfigChanged !== true ? ' (adopted what was installed)' : ''}`;
    }
    out.push(`agent of ${n.name} restarted ${a.restarts} time${a.restarts === 1 ? '' : 's'} by the lab supervisor${exit}${sync}`);
  }
  return out;
}

/** The human view of `lab status` (pure: `now` is given). */
export function renderLabStatus(s: LabStatus, now = Date.now()): string[] {
  const nodeRows = [['NODE', 'MODE', 'AGENT', 'PID', 'STATUS', 'RESTARTS', 'LAST EXIT', 'PROXY', 'PODS']];
  for (const n of s.nodes) {
    const a = n.agent;
    const mode = n.mode ? `${n.mode}${n.fallbackReason ? ' (fallback)' : ''}` : '-';
    const exit = a.lastExit ? `${a.lastExit.reason} ${ago(a.lastExit.at, now)}` : '-';
    const proxy = n.proxy ? `${n.proxy.kind} pid ${n.proxy.pid ?? '-'}${n.proxy.listening ? '' : ' NOT listening'}${n.proxy.restarts ? `, ${n.proxy.restarts} restarts` : ''}` : '-';
    nodeRows.push([n.name, mode, a.url, a.pid !== undefined && a.up ? String(a.pid) : '-', agentColumn(a, now), String(a.restarts), exit, proxy, n.pods.join(' ') || '-']);
  }
  const podRows = [['POD', 'NODE', 'IP', 'VERSION', 'ECHO SERVER']];
  for (const p of s.pods) podRows.push([p.name, p.node, p.ip, p.version, p.up ? `up (pid ${p.pid})` : 'DOWN']);
  const notes = restartNotes(s, now);
  const lines = [...table(nodeRows), ...(notes.length ? ['', ...notes] : []), ''];
  lines.push(...table(podRows), '');
  if (s.clusters) lines.push(...renderClusters(s.clusters));
  else lines.push(`controller: ${s.controller.url} ${s.controller.up ? `up (pid ${s.controller.pid})` : 'DOWN'}`);
  lines.push(`supervisor: ${s.supervisor.up ? `up (pid ${s.supervisor.pid}): restarts a dead agent after ${AGENT_BACKOFF.initialMs / 1000} s, ${(2 * AGENT_BACKOFF.initialMs) / 1000} s, ... at most ${AGENT_BACKOFF.maxMs / 1000} s` : 'DOWN: dead agents are not restarted'}`);
  lines.push(`proxy: ${s.proxy}; requested mode: ${s.mode}; lab directory ${s.dir}`);
  lines.push(s.ok ? 'lab status: everything up' : 'lab status: NOT everything is up (see above)');
  return lines;
}
