import { renderStatus } from '../../src/cli/commands/status.js';
import { renderSummary } from '../../src/lab/lab.js';
import type { LabState } from '../../src/lab/state.js';
import { ago, renderLabStatus, restartNotes, type LabStatus, type NodeView } from '../../src/lab/status.js';
import { AGENT_BACKOFF, describeExit, nextRestartDelay, type SupervisorStatus } from '../../src/lab/supervisor.js';

describe('agent restart backoff (the lab supervisor)', () => {
  test('doubles from 1 s for an agent that keeps dying, capped at 30 s', () => {
    const delays: number[] = [];
    let d = 0;
    for (let i = 0; i < 8; i++) delays.push((d = nextRestartDelay(d, 500)));
    expect(delays).toEqual([1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
  });

  test('starts over once the agent ran a minute, not before', () => {
    expect(nextRestartDelay(16000, AGENT_BACKOFF.resetAfterMs - 1)).toBe(30000);
    expect(nextRestartDelay(16000, AGENT_BACKOFF.resetAfterMs)).toBe(1000);
    expect(nextRestartDelay(30000, 10 * 60_000)).toBe(1000);
  });

  test('follows a given policy', () => {
    expect(nextRestartDelay(0, 0, { initialMs: 10, maxMs: 25, resetAfterMs: 100 })).toBe(10);
    expect(nextRestartDelay(20, 50, { initialMs: 10, maxMs: 25, resetAfterMs: 100 })).toBe(25);
  });

  test('says how a process ended', () => {
    expect(describeExit(null, 'SIGKILL')).toBe('killed by SIGKILL');
    expect(describeExit(1, null)).toBe('exited with code 1');
    expect(describeExit(0, null)).toBe('exited with code 0');
  });
});

const now = Date.parse('2026-12-04T08:00:00Z');
const iso = (secondsAgo: number): string => new Date(now - secondsAgo * 1000).toISOString();

function node(name: string, over: Partial<NodeView> = {}, agent: Partial<NodeView['agent']> = {}): NodeView {
  return {
    name,
    mode: 'ebpf',
    agent: { url: `http://127.0.0.1:1590${name.slice(1)}`, pid: 100 + Number(name.slice(1)), up: true, ready: true, restarts: 0, ...agent },
    proxy: { kind: 'passthrough', pid: 200, up: true, listening: true, restarts: 0, adopted: false },
    pods: name === 'n1' ? ['p1', 'p2'] : ['p3', 'p4'],
    ...over,
  };
}

function status(nodes: NodeView[], over: Partial<LabStatus> = {}): LabStatus {
  return {
    ok: true,
    dir: '/tmp/lab',
    mode: 'auto',
    proxy: 'passthrough',
    controller: { url: 'https://127.0.0.1:15443', pid: 10, up: true },
    supervisor: { pid: 11, up: true, startedAt: iso(60) },
    nodes,
    pods: [{ name: 'p1', node: 'n1', ip: '10.77.1.2', version: 'v1', up: true, pid: 300 }],
    ...over,
  };
}

describe('lab status rendering', () => {
  test('one row per node with pid, restarts, last exit and proxy; a restarted agent says what its first sync changed', () => {
    const restarted = node('n1', { firstSync: { full: true, changes: 0, at: iso(3) }, proxy: { kind: 'pipy', pid: 201, up: true, listening: true, restarts: 0, adopted: true } }, {
      restarts: 1,
      pid: 150,
      lastExit: { at: iso(5), code: null, signal: 'SIGKILL', reason: 'killed by SIGKILL', ranSeconds: 30.2 },
    });
    const lines = renderLabStatus(status([restarted, node('n2')]), now);
    expect(lines[0]).toMatch(/^NODE\s+MODE\s+AGENT\s+PID\s+STATUS\s+RESTARTS\s+LAST EXIT\s+PROXY\s+PODS$/);
    expect(lines[1]).toMatch(/^n1\s+ebpf\s+http:\/\/127\.0\.0\.1:15901\s+150\s+ready\s+1\s+killed by SIGKILL 5 s ago\s+pipy pid 201\s+p1 p2$/);
    expect(lines[2]).toMatch(/^n2\s+ebpf\s+\S+\s+102\s+ready\s+0\s+-\s+passthrough pid 200\s+p3 p4$/);
    expect(lines).toContain('agent of n1 restarted 1 time by the lab supervisor (last exit: killed by SIGKILL 5 s ago); its first sync: 0 changes (adopted what was installed)');
    expect(lines.at(-1)).toBe('lab status: everything up');
  });

  test('a dead agent waiting out its backoff shows DOWN and when it comes back; the lab is not ok', () => {
    const down = node('n2', { mode: undefined, proxy: undefined }, { up: false, ready: false, restarts: 3, nextRestartAt: new Date(now + 4000).toISOString(), unreachable: 'fetch failed' });
    const lines = renderLabStatus(status([node('n1'), down], { ok: false }), now);
    expect(lines[2]).toMatch(/^n2\s+-\s+\S+\s+-\s+DOWN, restart in 4 s\s+3\s+-\s+-\s+p3 p4$/);
    expect(lines).toContain('agent of n2 restarted 3 times by the lab supervisor; no answer from it yet');
    expect(lines.at(-1)).toMatch(/NOT everything is up/);
  });

  test('without the supervisor a dead agent stays dead, and the status says so', () => {
    const lines = renderLabStatus(status([node('n1', {}, { up: false, ready: false })], { ok: false, supervisor: { up: false } }), now);
    expect(lines[1]).toMatch(/\bDOWN\b/);
    expect(lines.find((l) => l.startsWith('supervisor:'))).toBe('supervisor: DOWN: dead agents are not restarted');
  });

  test('a first sync that changed something is not called an adoption', () => {
    const n = node('n1', { firstSync: { full: true, changes: 4, proxyConfigChanged: true, at: iso(1) } }, { restarts: 1 });
    expect(restartNotes({ nodes: [n] }, now)[0]).toMatch(/its first sync: 4 changes, proxy config changed$/);
    expect(restartNotes({ nodes: [node('n2')] }, now)).toEqual([]);
  });

  test('relative times', () => {
    expect(ago(iso(0), now)).toBe('0 s ago');
    expect(ago(iso(90), now)).toBe('90 s ago');
    expect(ago(iso(600), now)).toBe('10 min ago');
    expect(ago(new Date(now + 2000).toISOString(), now)).toBe('in 2 s');
  });
});

describe('lab up summary', () => {
  const state = {
    dir: '/tmp/lab',
    proxy: 'passthrough',
    mode: 'auto',
    controller: { url: 'https://127.0.0.1:15443' },
    nodes: [{ name: 'n1', agentUrl: 'http://127.0.0.1:15901' }],
    pods: [{ name: 'p1', node: 'n1', ip: '10.77.1.2' }],
  } as unknown as LabState;
  const sup: SupervisorStatus = { pid: 11, startedAt: iso(5), updatedAt: iso(1), agents: { n1: { pid: 120, cgroup: '/cg', log: '/l', running: true, restarts: 2 } } };

  test('has a RESTARTS column from the supervisor, "?" without it', () => {
    const lines = renderSummary(state, { n1: 'ebpf' }, sup);
    expect(lines[0]).toMatch(/^NODE\s+MODE\s+PODS\s+AGENT\s+RESTARTS\s+METRICS$/);
    expect(lines[1]).toMatch(/^n1\s+ebpf\s+p1=10\.77\.1\.2\s+http:\/\/127\.0\.0\.1:15901\s+2\s+http:\/\/127\.0\.0\.1:15901\/metrics$/);
    expect(renderSummary(state, { n1: 'ebpf' }, undefined)[1]).toMatch(/15901\s+\?\s+http/);
  });
});

describe('fsm-node status', () => {
  test("shows the agent's first sync and calls 0 changes an adoption", () => {
    const text = renderStatus({ node: 'n1', ready: true, sync: { count: 3, first: { full: true, changes: 0, proxyConfigChanged: false, at: '2026-12-04T08:00:00.000Z' } } });
    expect(text).toMatch(/first sync\s+full, 0 changes, proxy config unchanged at 2026-12-04T08:00:00.000Z \(adopted what was installed\)/);
    expect(renderStatus({ node: 'n1', ready: true, sync: { count: 1, first: { full: true, changes: 7, at: 'x' } } })).not.toMatch(/adopted|last sync/);
    const last = { full: false, changes: 2, proxyConfigChanged: false, ms: { render: 0, merge: 0.9, apply: 2.2, total: 3.3 }, at: 'y' };
    expect(renderStatus({ node: 'n1', ready: true, sync: { count: 9, first: { full: true, changes: 0, at: 'x' }, last } })).toMatch(/last sync\s+incremental, 2 changes, proxy config unchanged at y in 3\.3 ms \(render 0, merge 0\.9, apply 2\.2\)/);
  });
});
