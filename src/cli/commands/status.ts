import { FsmNodeError, errorMessage } from '../../errors.js';
import { resilienceStatusRows, resilienceView, type ResilienceView } from '../../proxy/resilience-status.js';
import { proxyStatusRows, type ProxyView } from '../../proxy/status-rows.js';
import type { Command } from '../command.js';
import type { GatewaySummary } from '../../gateway/render.js';
import type { IngressProblem } from '../../gateway/schema.js';

interface AgentState {
  node?: string;
  ready?: boolean;
  notReadyReason?: string;
  mode?: { ready: boolean; desired: string; desiredSource: string; effective?: string; fallbackReason?: string; reason?: string };
  probe?: { platform: Record<string, unknown>; checks: Array<{ name: string; ok: boolean; detail: string }> };
  policy?: { version: string; ageSeconds: number; pods: number };
  applied?: { version: string; pods: number; at: string };
  lastError?: string;
  proxy?: ProxyView;
  identities?: Array<{ identity: string; state: string; notAfter?: string; lastError?: string; reason?: string }>;
  sync?: { count: number; first?: SyncOutcome; last?: SyncOutcome };
  gateways?: GatewaySummary[];
  /** Not from /v1/state: read from the agent's /metrics by this command (ejected endpoints, open circuits). */
  resilience?: ResilienceView;
  /** Gateway API conditions that are not as they should be, the mesh's (src/gateway/problems.ts). */
  gatewayProblems?: IngressProblem[];
}

interface SyncOutcome {
  full: boolean;
  changes: number;
  proxyConfigChanged?: boolean;
  /** Milliseconds per phase (agents since the CNI ADD cost work). */
  ms?: Record<string, number>;
  at: string;
}

/** "3.3 ms (merge 0.9, apply 2.2)": where a sync's time went. */
function syncCost(ms: Record<string, number>): string {
  const phases = Object.entries(ms).filter(([k]) => k !== 'total');
  return `${ms.total} ms${phases.length ? ` (${phases.map(([k, v]) => `${k} ${v}`).join(', ')})` : ''}`;
}

const DEFAULT_AGENT = 'http://127.0.0.1:15900';

/** "full, 0 changes, proxy config unchanged at ...": one sync as a person reads it. */
function syncText(o: SyncOutcome): string {
  const proxy = o.proxyConfigChanged === undefined ? '' : o.proxyConfigChanged ? ', proxy config changed' : ', proxy config unchanged';
  return `${o.full ? 'full' : 'incremental'}, ${o.changes} changes${proxy} at ${o.at}`;
}

/** A readable summary of the agent's /v1/state. Pure, so tests can check it without an agent. */
export function renderStatus(s: AgentState): string {
  const rows: Array<[string, string]> = [
    ['node', s.node ?? '?'],
    ['ready', s.ready ? 'yes' : `no — ${s.notReadyReason ?? 'unknown'}`],
  ];
  if (s.mode) {
    const m = s.mode;
    rows.push(['mode', m.ready ? `${m.effective} (desired ${m.desired} from ${m.desiredSource})` : `none — ${m.reason}`]);
    if (m.fallbackReason) rows.push(['fallback', m.fallbackReason]);
  }
  if (s.policy) rows.push(['policy', `${s.policy.version.slice(0, 12)} (${s.policy.pods} pods, ${Math.round(s.policy.ageSeconds)} s old)`]);
  if (s.applied) rows.push(['applied', `${s.applied.version.slice(0, 12)}: ${s.applied.pods} pods enrolled at ${s.applied.at}`]);
  if (s.sync?.first) {
    const f = s.sync.first;
    rows.push(['first sync', `${syncText(f)}${f.changes === 0 && f.proxyConfigChanged !== true ? ' (adopted what was installed)' : ''}`]);
  }
  if (s.sync?.last && s.sync.count > 1) rows.push(['last sync', `${syncText(s.sync.last)}${s.sync.last.ms ? ` in ${syncCost(s.sync.last.ms)}` : ''}`]);
  if (s.proxy) rows.push(...proxyStatusRows(s.proxy));
  if (s.resilience) rows.push(...resilienceStatusRows(s.resilience));
  for (const i of s.identities ?? []) {
    const detail = i.state === 'valid' ? `valid until ${i.notAfter}${i.lastError ? ` (renewal failing: ${i.lastError})` : ''}` : i.state === 'expired' ? `EXPIRED, failing closed: ${i.reason}` : `pending${i.lastError ? `: ${i.lastError}` : ''}`;
    rows.push([`identity ${i.identity}`, detail]);
  }
  for (const g of s.gateways ?? []) {
    const ports = g.ports.map((p) => `:${p.port} ${p.protocol} (${p.rules} rules; hosts ${p.hostnames.join(' ') || 'none'}${p.protocol === 'HTTPS' ? `; ${p.certificates} certificates` : ''})`);
    rows.push([`gateway ${g.gateway}`, `${ports.join(', ')} as ${g.identity}`]);
  }
  for (const p of s.gatewayProblems ?? []) rows.push(['gateway problem', p.type ? `${p.object}: ${p.type} ${p.status} ${p.reason}${p.message ? ` (${p.message})` : ''}` : `${p.object}: ${p.message}`]);
  if (s.lastError) rows.push(['last error', s.lastError]);
  for (const c of s.probe?.checks ?? []) rows.push([`probe ${c.name}`, `${c.ok ? 'ok' : 'FAILED'}: ${c.detail}`]);
  const width = Math.max(...rows.map(([k]) => k.length)) + 2;
  return rows.map(([k, v]) => `${k.padEnd(width)}${v}`).join('\n') + '\n';
}

async function askAgent(base: string): Promise<AgentState> {
  const url = `${base.replace(/\/$/, '')}/v1/state`;
  const res = await fetch(url, { signal: AbortSignal.timeout(3000) });
  if (!res.ok) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  const state = (await res.json()) as AgentState;
  // The proxy's outlier and circuit state, from its metrics; status still works without them.
  try {
    const m = await fetch(`${base.replace(/\/$/, '')}/metrics`, { signal: AbortSignal.timeout(3000) });
    if (m.ok) state.resilience = resilienceView(await m.text());
  } catch {
    // an agent without metrics: no resilience rows
  }
  return state;
}

const noAgent = (base: string, err: unknown, more = '; is fsm-node agent running on this node?'): FsmNodeError =>
  new FsmNodeError('FSMN_ERR_NO_AGENT', `no agent answered at ${base.replace(/\/$/, '')}/v1/state (${errorMessage(err)})${more}`);

/** Every node of the running lab: one block per node (or one JSON object with `nodes`). Exit 0 when all are ready. */
async function labStatus(lab: { dir: string; nodes: Array<{ name: string; agentUrl: string }> }, json: boolean): Promise<number> {
  const nodes = await Promise.all(
    lab.nodes.map(async (n) => {
      try {
        return { node: n.name, agent: n.agentUrl, state: await askAgent(n.agentUrl) };
      } catch (err) {
        return { node: n.name, agent: n.agentUrl, error: `no answer: ${errorMessage(err)}` };
      }
    }),
  );
  if (json) process.stdout.write(`${JSON.stringify({ lab: lab.dir, nodes }, null, 2)}\n`);
  else {
    const blocks = nodes.map((n) => `== lab node ${n.node} (agent ${n.agent}) ==\n${n.state ? renderStatus(n.state) : `${n.error}; see fsm-node lab status\n`}`);
    process.stdout.write(`${blocks.join('\n')}`);
  }
  return nodes.every((n) => n.state?.ready === true) ? 0 : 1;
}

export const statusCommand: Command = {
  name: 'status',
  summary: "show the local agent's mode (and why), probe report, enrolled pods, policy version and proxy state",
  usage: ['[--agent URL] [--json]'],
  help: `
Asks the agent on this node (its /v1/state endpoint on loopback) and prints a
summary table, or the raw state with --json for scripts. Without --agent, while
a lab runs (fsm-node lab up), it asks every lab node's agent instead; otherwise
the agent at ${DEFAULT_AGENT}. Says so clearly when no agent answers.`,
  options: {
    agent: { type: 'string', valueName: 'URL', description: `Agent HTTP API to ask (default: every lab node while a lab runs, else ${DEFAULT_AGENT}).` },
    json: { type: 'boolean', description: 'Print machine-readable JSON.' },
  },
  async run(values) {
    const json = values.json === true;
    let base = typeof values.agent === 'string' ? values.agent : undefined;
    let noLab = '';
    if (base === undefined) {
      const { readLabState, resolveLabDir } = await import('../../lab/state.js');
      const dir = resolveLabDir(undefined);
      const lab = readLabState(dir);
      if (lab) return labStatus(lab, json);
      base = DEFAULT_AGENT;
      noLab = `, and no lab is up (no lab state in ${dir}): on a node, start fsm-node agent; to try the mesh, fsm-node lab up; or name an agent with --agent URL`;
    }
    let state: AgentState;
    try {
      state = await askAgent(base);
    } catch (err) {
      throw noLab ? noAgent(base, err, noLab) : noAgent(base, err);
    }
    process.stdout.write(json ? JSON.stringify(state, null, 2) + '\n' : renderStatus(state));
    return state.ready ? 0 : 1;
  },
};
