import { existsSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseAllDocuments, stringify } from 'yaml';
import { READING_TTL_MS } from '../agent/metrics.js';
import { errorMessage } from '../errors.js';
import { parseExposition } from '../proxy/metrics.js';
import { resilienceView } from '../proxy/resilience-status.js';
import type { CheckCase, MeshView } from './check.js';
import { podBatch, type BatchSummary } from './clusters/load.js';
import { faultFile, writePodFault, type PodFault } from './faults.js';
import { agentState } from './lab.js';
import { deniedPair, ECHO_PORT, LAB_NAMESPACE, LAB_SERVICES, type LabService } from './manifests.js';
import { sleep } from './processes.js';
import { LabError, labFiles, type LabNode, type LabPod, type LabState } from './state.js';

/**
 * The resilience cases of `lab check` (issue 18, docs/resilience.md), one per
 * policy kind, each with a fault of `lab fault` and a policy written into the
 * lab's manifests the way a user would, judged by real requests from a pod
 * and the node proxy's metrics:
 *
 *   Retry           one endpoint answers 503: without a Retry some GETs fail,
 *                   with one none do, and the proxy counts the recoveries;
 *   request timeout one endpoint hangs: a request costs the timeout (504),
 *                   not the client's patience;
 *   outlier         the hung endpoint is ejected after a handful of failures
 *                   (what `fsm-node status` shows), gets nothing meanwhile,
 *                   and serves again after the fault is cleared;
 *   rate limit      a burst gets 429 beyond the bucket, within 10 %.
 *
 * Each case puts back its fault, also when it fails; the policy file is
 * removed at the end, and every policy change is waited for until every
 * agent runs the version the controller serves after it (the proxy then runs
 * it: agents deliver the proxy config before they report a version applied).
 */

/** The manifest the cases write and remove (theirs alone: any other Retry or UpstreamTrafficSetting makes them skip). */
export const CHECK_FILE = '90-lab-check-resilience.yaml';
const CONVERGE_MS = 30_000;
const TIMEOUT_MS = 1000;
const EJECTION_S = 20;
const CONSECUTIVE = 2;
export const RATE = { requests: 4, burst: 16 } as const;

export interface ResiliencePlan {
  service: LabService;
  client: LabPod;
  /** The endpoint the cases fault (on the client's node when one is). */
  faulty: LabPod;
  healthy: LabPod[];
}

/** What the cases take from check.ts, passed in so that the two modules do not import each other. */
export interface ResilienceDeps {
  /** The policy version the controller serves a node now (check.ts's controllerVersion). */
  served(n: LabNode): Promise<string | undefined>;
}

const CASES = ['Retry', 'request timeout', 'outlier detection', 'local rate limit'] as const;

/**
 * Which service, client and faulty endpoint (pure). A backend service of the
 * example (not the split's root: there a TrafficSplit picks the backend
 * before any endpoint) with two endpoints or more, and an enrolled client
 * outside it that may call all of them. A string says why there is none.
 */
export function planResilience(pods: readonly LabPod[], view: MeshView): ResiliencePlan | string {
  const denied = deniedPair(pods);
  for (const service of LAB_SERVICES.filter((s) => s.name !== 'echo')) {
    const endpoints = pods.filter((p) => view.enrolled.has(p.name) && Object.entries(service.selector).every(([k, v]) => view.labels.get(p.name)?.[k] === v));
    if (endpoints.length < 2) continue;
    const client = pods.find(
      (p) => view.enrolled.has(p.name) && !endpoints.includes(p) && !view.excludedPorts.get(p.name)?.has(ECHO_PORT) && !endpoints.some((e) => denied?.from === p.name && denied.to === e.name),
    );
    if (!client) continue;
    const faulty = endpoints.find((e) => e.node === client.node) ?? endpoints[0]!;
    return { service, client, faulty, healthy: endpoints.filter((e) => e !== faulty) };
  }
  return 'needs a backend service (echo-v1 or echo-v2) with two enrolled endpoints and an enrolled client outside it (lab up with 2 nodes x 2 pods or more)';
}

/** The policy objects of one step (pure): an UpstreamTrafficSetting for the service and, with `retry`, a Retry from the client. */
export function renderCheckPolicy(plan: ResiliencePlan, upstream: Record<string, unknown>, retry = false): string {
  const objects: unknown[] = [
    {
      apiVersion: 'policy.flomesh.io/v1alpha1',
      kind: 'UpstreamTrafficSetting',
      metadata: { name: `lab-check-${plan.service.name}`, namespace: LAB_NAMESPACE },
      spec: { host: plan.service.name, ...upstream },
    },
  ];
  if (retry) {
    objects.push({
      apiVersion: 'policy.flomesh.io/v1alpha1',
      kind: 'Retry',
      metadata: { name: `lab-check-${plan.client.name}-to-${plan.service.name}`, namespace: LAB_NAMESPACE },
      spec: {
        source: { kind: 'ServiceAccount', name: plan.client.name, namespace: LAB_NAMESPACE },
        destinations: [{ kind: 'Service', name: plan.service.name, namespace: LAB_NAMESPACE }],
        retryPolicy: { retryOn: '5xx', numRetries: 2, retryBackoffBaseInterval: '10ms' },
      },
    });
  }
  return objects.map((o) => stringify(o)).join('---\n');
}

/** Retry and UpstreamTrafficSetting objects in the manifests other than the check's own file: "kind ns/name". */
export function foreignResilienceObjects(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { recursive: true, withFileTypes: true })) {
    if (!e.isFile() || !/\.ya?ml$/.test(e.name) || e.name.startsWith('.') || (e.parentPath === dir && e.name === CHECK_FILE)) continue;
    for (const d of parseAllDocuments(readFileSync(join(e.parentPath, e.name), 'utf8'))) {
      const o = (d.errors.length ? null : d.toJS()) as { kind?: unknown; metadata?: { name?: unknown; namespace?: unknown } } | null;
      if (o?.kind === 'Retry' || o?.kind === 'UpstreamTrafficSetting') out.push(`${String(o.kind)} ${String(o.metadata?.namespace ?? 'default')}/${String(o.metadata?.name)}`);
    }
  }
  return out;
}

/** Sum of a metric's samples whose labels include `labels` (the agent sums the proxy's instances already). */
export function sampleSum(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const f of parseExposition(text).families) {
    for (const s of f.samples) {
      if (s.name === name && Object.entries(labels).every(([k, v]) => s.labels.some(([lk, lv]) => lk === k && lv === v))) sum += s.value;
    }
  }
  return sum;
}

interface Ctx {
  state: LabState;
  deps: ResilienceDeps;
  plan: ResiliencePlan;
  clientNode: LabNode;
  url: string;
  /** Worker threads of the client node's proxy, all instances together: each keeps its own limits and outlier state. */
  threads: number;
}

/** The agent's /metrics, read after its cached reading of the proxy has expired (so it holds what was sent before the call). */
async function freshMetrics(n: LabNode): Promise<string> {
  await sleep(READING_TTL_MS + 200);
  const res = await fetch(`${n.agentUrl}/metrics`, { signal: AbortSignal.timeout(5000) });
  if (!res.ok) throw new LabError(`metrics of ${n.name}: HTTP ${res.status}`);
  return res.text();
}

/**
 * Write (text) or remove (undefined) the check's policy file and wait until
 * every agent runs the version its controller serves after the change and
 * its proxy reports that version loaded (fsm_node_proxy_config).
 */
async function applyPolicy(ctx: Ctx, text: string | undefined): Promise<void> {
  const file = join(labFiles(ctx.state.dir).manifests, CHECK_FILE);
  const current = existsSync(file) ? readFileSync(file, 'utf8') : undefined;
  if (current === text) return;
  const before = new Map(await Promise.all(ctx.state.nodes.map(async (n) => [n.name, await ctx.deps.served(n)] as const)));
  if (text === undefined) rmSync(file, { force: true });
  else {
    // Atomic: the controller never reads half a file (a dot file is not read at all).
    const tmp = join(labFiles(ctx.state.dir).manifests, `.${CHECK_FILE}.tmp`);
    writeFileSync(tmp, text);
    renameSync(tmp, file);
  }
  const deadline = Date.now() + CONVERGE_MS;
  const pending = new Set(ctx.state.nodes);
  let last = '';
  while (pending.size > 0) {
    for (const n of [...pending]) {
      const want = await ctx.deps.served(n);
      const s = await agentState(n.agentUrl).catch(() => undefined);
      const applied = (s?.applied as { version?: string } | undefined)?.version;
      if (want === undefined || want === before.get(n.name)) last = `${n.name}: the controller still serves ${want ?? 'nothing'} (a policy it rejects is reported in logs/controller.log)`;
      else if (applied !== want || s?.ready !== true) last = `${n.name}: agent applied ${applied ?? 'nothing'}, controller serves ${want}`;
      else {
        const res = await fetch(`${n.agentUrl}/metrics`, { signal: AbortSignal.timeout(5000) }).catch(() => undefined);
        if (res?.ok && sampleSum(await res.text(), 'fsm_node_proxy_config', { version: want }) >= 1) pending.delete(n);
        else last = `${n.name}: the proxy does not report version ${want} loaded yet`;
      }
    }
    if (pending.size === 0) break;
    if (Date.now() > deadline) throw new LabError(`policy ${text === undefined ? `removal of ${CHECK_FILE}` : CHECK_FILE} did not reach every node within ${CONVERGE_MS / 1000} s: ${last}`);
    await sleep(200);
  }
}

const fault = (ctx: Ctx, f: PodFault | undefined): void => writePodFault(faultFile(ctx.state.dir, ctx.plan.faulty.name), f);

const show = (m: Record<string, number>): string =>
  Object.entries(m)
    .sort()
    .map(([k, v]) => `${k} ${v}`)
    .join(', ') || 'none';

const batch = (ctx: Ctx, count: number, concurrency: number, timeoutMs = 10_000): Promise<BatchSummary> => podBatch(ctx.plan.client, ctx.url, count, { concurrency, timeoutMs });

type Judged = { pass: boolean; reason: string };

async function retryCase(ctx: Ctx): Promise<Judged> {
  const { faulty, service } = ctx.plan;
  fault(ctx, { kind: 'status', status: 503 });
  // Outlier detection off for the service, so it cannot be what hides the failures.
  const noOutlier = { outlierDetection: { enabled: false } };
  await applyPolicy(ctx, renderCheckPolicy(ctx.plan, noOutlier));
  const without = await batch(ctx, 20, 2);
  await applyPolicy(ctx, renderCheckPolicy(ctx.plan, noOutlier, true));
  const recovered = async (): Promise<number> =>
    sampleSum(await freshMetrics(ctx.clientNode), 'fsm_node_proxy_retries_total', { source: `${LAB_NAMESPACE}/${ctx.plan.client.name}`, service: `${LAB_NAMESPACE}/${service.name}`, result: 'recovered' });
  const r0 = await recovered();
  const withRetry = await batch(ctx, 40, 2);
  const retried = (await recovered()) - r0;
  const n503 = without.statuses['503'] ?? 0;
  const pass = n503 > 0 && withRetry.ok === 40 && !withRetry.pods[faulty.name] && retried > 0;
  return {
    pass,
    reason:
      `without a Retry ${n503}/20 answered 503 (${show(without.statuses)}); ` +
      `with one ${withRetry.ok}/40 answered (${show(withRetry.pods)}${withRetry.failed ? `; failed: ${withRetry.errors.join('; ')}` : ''}), ${retried} recovered by a retry (fsm_node_proxy_retries_total)`,
  };
}

async function timeoutCase(ctx: Ctx): Promise<Judged> {
  fault(ctx, { kind: 'hang' });
  await applyPolicy(ctx, renderCheckPolicy(ctx.plan, { connectionSettings: { http: { requestTimeout: `${TIMEOUT_MS}ms` } }, outlierDetection: { enabled: false } }));
  const m = await batch(ctx, 8, 4, 10_000);
  const n504 = m.statuses['504'] ?? 0;
  const others = Object.keys(m.statuses).filter((s) => s !== '200' && s !== '504');
  // A generous upper bound: the timer fires on time, the rest is a loaded machine's scheduling.
  const pass = n504 > 0 && others.length === 0 && m.minFailMs >= TIMEOUT_MS - 50 && m.maxFailMs <= TIMEOUT_MS + 4000 && Object.keys(m.pods).every((p) => p !== ctx.plan.faulty.name);
  return {
    pass,
    reason: `${n504}/8 answered 504 by the proxy after ${m.minFailMs}-${m.maxFailMs} ms (timeout ${TIMEOUT_MS} ms, the client would wait 10 s); outcomes ${show(m.statuses)}, answers ${show(m.pods)}`,
  };
}

async function outlierCase(ctx: Ctx): Promise<Judged> {
  const { faulty } = ctx.plan;
  const endpoint = `${faulty.ip}:${ECHO_PORT}`;
  fault(ctx, { kind: 'hang' });
  await applyPolicy(
    ctx,
    renderCheckPolicy(ctx.plan, { connectionSettings: { http: { requestTimeout: `${TIMEOUT_MS}ms` } }, outlierDetection: { consecutiveFailures: CONSECUTIVE, baseEjectionTime: `${EJECTION_S}s`, maxEjectionPercent: 50 } }),
  );
  // Each proxy thread learns on its own: send until every one has ejected it (each after CONSECUTIVE failures).
  let failed = 0;
  let sent = 0;
  let ejectedBy = 0;
  let shown = false;
  for (let round = 0; round < 5 && ejectedBy < ctx.threads; round++) {
    const b = await batch(ctx, 6, 1);
    failed += b.failed;
    sent += 6;
    const text = await freshMetrics(ctx.clientNode);
    ejectedBy = sampleSum(text, 'fsm_node_proxy_ejected_endpoints', { endpoint });
    shown = resilienceView(text).ejected.some((e) => e.endpoint === endpoint);
  }
  const bound = ctx.threads * CONSECUTIVE;
  const after = await batch(ctx, 10, 2);
  fault(ctx, undefined);
  const clearedAt = Date.now();
  let backAfter: number | undefined;
  while (Date.now() - clearedAt < (EJECTION_S + 20) * 1000) {
    const b = await batch(ctx, 4, 1);
    if (b.pods[faulty.name]) {
      backAfter = (Date.now() - clearedAt) / 1000;
      break;
    }
    await sleep(1000);
  }
  const pass = ejectedBy >= ctx.threads && shown && failed >= 1 && failed <= bound && after.ok === 10 && !after.pods[faulty.name] && backAfter !== undefined;
  return {
    pass,
    reason:
      `${faulty.name} hung: ejected by ${ejectedBy} of ${ctx.threads} proxy threads after ${failed} failed of ${sent} GETs (at most ${bound}: ${CONSECUTIVE} per thread), ` +
      `${shown ? 'shown' : 'NOT shown'} by fsm-node status; then ${after.ok}/10 answered (${show(after.pods)}); ` +
      (backAfter === undefined ? `NOT answering again within ${EJECTION_S + 20} s of clearing the fault` : `answering again ${backAfter.toFixed(1)} s after the fault was cleared (ejection ${EJECTION_S} s)`),
  };
}

async function rateLimitCase(ctx: Ctx): Promise<Judged> {
  const { requests: R, burst: B } = RATE;
  await applyPolicy(ctx, renderCheckPolicy(ctx.plan, { rateLimit: { local: { http: { requests: R, unit: 'second', burst: B } } } }));
  const metric = async (): Promise<number> => sampleSum(await freshMetrics(ctx.clientNode), 'fsm_node_proxy_resilience_rejected_total', { service: `${LAB_NAMESPACE}/${ctx.plan.service.name}`, reason: 'rate-limited' });
  const before = await metric();
  // Enough that every thread's bucket runs dry (connections spread over the instances).
  const count = 60 * ctx.threads;
  const m = await batch(ctx, count, 20);
  const refused = (await metric()) - before;
  const ok = m.statuses['200'] ?? 0;
  const n429 = m.statuses['429'] ?? 0;
  // A token bucket per thread: R + B at once, then R per second while the burst lasts.
  const expected = ctx.threads * (R + B + (R * m.elapsedMs) / 1000);
  const tolerance = Math.ceil(expected * 0.1);
  const pass = Math.abs(ok - expected) <= tolerance && ok + n429 === count && refused === n429;
  return {
    pass,
    reason:
      `${R}/s, burst ${B}: ${ok} of ${count} GETs passed in ${m.elapsedMs} ms, ${n429} got 429 (${show(m.statuses)}); ` +
      `expected ${expected.toFixed(1)} ± ${tolerance} = ${ctx.threads} proxy thread(s) x (${R + B} + ${R}/s x ${(m.elapsedMs / 1000).toFixed(1)} s); ${refused} counted rate-limited by the proxy`,
  };
}

const RUNNERS: Record<(typeof CASES)[number], (ctx: Ctx) => Promise<Judged>> = {
  Retry: retryCase,
  'request timeout': timeoutCase,
  'outlier detection': outlierCase,
  'local rate limit': rateLimitCase,
};

function caseName(kind: (typeof CASES)[number], plan: ResiliencePlan | undefined): string {
  if (!plan) return `resilience: ${kind}`;
  const { client, service, faulty } = plan;
  switch (kind) {
    case 'Retry':
      return `resilience: Retry ${client.name} -> ${service.name}, ${faulty.name} answering 503`;
    case 'request timeout':
      return `resilience: request timeout ${TIMEOUT_MS} ms, ${faulty.name} hung`;
    case 'outlier detection':
      return `resilience: outlier detection, ${faulty.name} hung then cleared`;
    case 'local rate limit':
      return `resilience: local rate limit ${RATE.requests}/s burst ${RATE.burst} on ${service.name}`;
  }
}

/** The resilience cases (Pipy only). Called by labCheck after the other cases. */
export async function resilienceCases(state: LabState, view: MeshView, deps: ResilienceDeps): Promise<CheckCase[]> {
  const skipAll = (reason: string): CheckCase[] => CASES.map((k) => ({ name: caseName(k, undefined), kind: 'resilience', from: '*', to: '*', result: 'skip', reason }));
  if (state.proxy === 'passthrough') return skipAll('needs the Pipy proxy (passthrough enforces no resilience policy)');
  const planned = planResilience(state.pods, view);
  if (typeof planned === 'string') return skipAll(planned);
  const manifests = labFiles(state.dir).manifests;
  const foreign = foreignResilienceObjects(manifests);
  if (foreign.length > 0) return skipAll(`the manifests hold resilience objects of their own (${foreign.join(', ')}): the cases would not know what to expect`);
  const clientNode = state.nodes.find((n) => n.name === planned.client.node);
  if (!clientNode) return skipAll(`no node ${planned.client.node} for ${planned.client.name}`);
  const proxy = ((await agentState(clientNode.agentUrl).catch(() => undefined))?.proxy ?? {}) as { threads?: number };
  const ctx: Ctx = { state, deps, plan: planned, clientNode, url: `http://${planned.service.clusterIP}:${ECHO_PORT}/`, threads: Math.max(1, proxy.threads ?? 1) };
  const cases: CheckCase[] = [];
  try {
    for (const kind of CASES) {
      const base = { name: caseName(kind, planned), kind: 'resilience' as const, from: planned.client.name, to: planned.service.name };
      try {
        const j = await RUNNERS[kind](ctx);
        cases.push({ ...base, result: j.pass ? 'pass' : 'fail', reason: j.reason });
      } catch (err) {
        cases.push({ ...base, result: 'fail', reason: errorMessage(err) });
      } finally {
        fault(ctx, undefined);
      }
    }
  } finally {
    // Put the mesh back as the manifests had it: the policy file goes (also after a failed case).
    try {
      await applyPolicy(ctx, undefined);
    } catch (err) {
      cases.push({ name: 'resilience: policies removed again', kind: 'resilience', from: '*', to: '*', result: 'fail', reason: errorMessage(err) });
    }
  }
  return cases;
}
