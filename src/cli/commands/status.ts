import { FsmNodeError, errorMessage } from '../../errors.js';
import type { Command } from '../command.js';

interface AgentState {
  node?: string;
  ready?: boolean;
  notReadyReason?: string;
  mode?: { ready: boolean; desired: string; desiredSource: string; effective?: string; fallbackReason?: string; reason?: string };
  probe?: { platform: Record<string, unknown>; checks: Array<{ name: string; ok: boolean; detail: string }> };
  policy?: { version: string; ageSeconds: number; pods: number };
  applied?: { version: string; pods: number; at: string };
  lastError?: string;
  proxy?: { kind: string; pid?: number; up: boolean; listening: boolean; restarts: number; adopted: boolean };
  identities?: Array<{ identity: string; state: string; notAfter?: string; lastError?: string; reason?: string }>;
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
  if (s.proxy) rows.push(['proxy', `${s.proxy.kind} pid ${s.proxy.pid ?? '-'}, ${s.proxy.listening ? 'listening' : 'NOT listening'}, ${s.proxy.restarts} restarts${s.proxy.adopted ? ', adopted' : ''}`]);
  for (const i of s.identities ?? []) {
    const detail = i.state === 'valid' ? `valid until ${i.notAfter}${i.lastError ? ` (renewal failing: ${i.lastError})` : ''}` : i.state === 'expired' ? `EXPIRED, failing closed: ${i.reason}` : `pending${i.lastError ? `: ${i.lastError}` : ''}`;
    rows.push([`identity ${i.identity}`, detail]);
  }
  if (s.lastError) rows.push(['last error', s.lastError]);
  for (const c of s.probe?.checks ?? []) rows.push([`probe ${c.name}`, `${c.ok ? 'ok' : 'FAILED'}: ${c.detail}`]);
  const width = Math.max(...rows.map(([k]) => k.length)) + 2;
  return rows.map(([k, v]) => `${k.padEnd(width)}${v}`).join('\n') + '\n';
}

export const statusCommand: Command = {
  name: 'status',
  summary: "show the local agent's mode (and why), probe report, enrolled pods, policy version and proxy state",
  usage: ['[--agent URL] [--json]'],
  help: `
Asks the agent on this node (its /v1/state endpoint on loopback) and prints a
summary table, or the raw state with --json for scripts. Says so clearly when
no agent answers.`,
  options: {
    agent: { type: 'string', valueName: 'URL', default: 'http://127.0.0.1:15900', description: 'Agent HTTP API to ask.' },
    json: { type: 'boolean', description: 'Print machine-readable JSON.' },
  },
  async run(values) {
    const url = `${String(values.agent).replace(/\/$/, '')}/v1/state`;
    let state: AgentState;
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(3000) });
      if (!res.ok) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
      state = (await res.json()) as AgentState;
    } catch (err) {
      throw new FsmNodeError('FSMN_ERR_NO_AGENT', `no agent answered at ${url} (${errorMessage(err)}); is fsm-node agent running on this node?`);
    }
    process.stdout.write(values.json ? JSON.stringify(state, null, 2) + '\n' : renderStatus(state));
    return state.ready ? 0 : 1;
  },
};
