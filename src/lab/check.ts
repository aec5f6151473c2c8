import { readdirSync, readFileSync } from 'node:fs';
import { request as httpsRequest } from 'node:https';
import { join } from 'node:path';
import { parseAllDocuments } from 'yaml';
import { READING_TTL_MS } from '../agent/metrics.js';
import { errorMessage } from '../errors.js';
import {
  ANNOTATION_OUTBOUND_PORT_EXCLUSION,
  ANNOTATION_SIDECAR_INJECTION,
  DEFAULT_CONTROLLER_NAMESPACE,
  LABEL_MONITORED_BY,
  MESH_CONFIG_NAME,
  parsePortList,
} from '../policy/fsm.js';
import { packageRoot } from '../util/paths.js';
import { agentState } from './lab.js';
import { CANARY, deniedPair, ECHO_PORT, LAB_NAMESPACE, LAB_SERVICES, SPLIT_WEIGHTS } from './manifests.js';
import { resilienceCases } from './check-resilience.js';
import type { EchoAnswer, GetResult } from './echo-server.js';
import { mqttCases } from './mqtt-lab.js';
import { runInside, sleep } from './processes.js';
import { gatherLabStatus, restartNotes } from './status.js';
import { labFiles, type LabNode, type LabPod, type LabState } from './state.js';
import { controllerOf } from './supervisor.js';

/**
 * `lab check`: real HTTP requests from inside every pod to every other pod,
 * each judged against what the manifests *now* say (so a live edit changes
 * the expectation too), with evidence from both ends: the echo server names
 * itself and the peer it saw, and the client's node proxy logged the
 * connection with its original destination.
 */

export type CaseResult = 'pass' | 'fail' | 'skip';

export interface CheckCase {
  name: string;
  kind: 'pod-to-pod' | 'service' | 'split' | 'access' | 'mqtt' | 'multicluster' | 'resilience';
  from: string;
  to: string;
  result: CaseResult;
  reason: string;
  evidence?: Record<string, unknown>;
}

export interface CheckReport {
  ok: boolean;
  proxy: string;
  passed: number;
  failed: number;
  skipped: number;
  notes: string[];
  cases: CheckCase[];
}

// ---- what the manifests say now --------------------------------------------------

export interface MeshView {
  /** Pods the mesh enrols (present in the manifests, namespace monitored, not opted out). */
  enrolled: Set<string>;
  /** Outbound ports excluded per pod (its annotation plus the mesh-wide list). */
  excludedPorts: Map<string, Set<number>>;
  /** Labels of every pod in the lab namespace (to find a service's endpoints). */
  labels: Map<string, Record<string, string>>;
  /** The TrafficSplit of the root service `echo` without matches: backend service -> weight. */
  split: Map<string, number>;
  /** Backend services (weight > 0) of the TrafficSplits of `echo` with matches: where the canary path goes. */
  canary: Set<string>;
}

interface K8sDoc {
  kind?: string;
  spec?: { service?: string; backends?: Array<{ service?: string; weight?: unknown }>; matches?: unknown[] };
  metadata?: { name?: string; namespace?: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  data?: Record<string, string>;
}

function yamlFiles(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile() && /\.ya?ml$/.test(e.name) && !e.name.startsWith('.'))
    .map((e) => join(e.parentPath, e.name));
}

function ports(value: string | undefined): number[] {
  try {
    return value ? parsePortList(value) : [];
  } catch {
    return []; // the controller reports the bad annotation and keeps the last good pod
  }
}

/** Read the manifest directory the way the controller does, as far as the checks need. */
export function meshView(dir: string): MeshView {
  const docs: K8sDoc[] = [];
  for (const file of yamlFiles(dir)) {
    for (const d of parseAllDocuments(readFileSync(file, 'utf8'))) {
      const o = d.errors.length ? undefined : (d.toJS() as K8sDoc | null);
      if (o && typeof o === 'object') docs.push(o);
    }
  }
  const mesh = docs.find((d) => d.kind === 'ConfigMap' && d.metadata?.name === MESH_CONFIG_NAME && d.metadata.namespace === DEFAULT_CONTROLLER_NAMESPACE);
  const meshName = mesh?.data?.meshName ?? 'fsm';
  const meshPorts = ports(mesh?.data?.outboundPortExclusionList);
  const ns = docs.find((d) => d.kind === 'Namespace' && d.metadata?.name === LAB_NAMESPACE);
  const monitored = ns?.metadata?.labels?.[LABEL_MONITORED_BY] === meshName;
  const view: MeshView = { enrolled: new Set(), excludedPorts: new Map(), labels: new Map(), split: new Map(), canary: new Set() };
  const splits = docs.filter((d) => d.kind === 'TrafficSplit' && d.spec?.service === 'echo');
  const split = splits.find((d) => !d.spec?.matches?.length);
  for (const b of split?.spec?.backends ?? []) if (b.service && typeof b.weight === 'number') view.split.set(b.service, b.weight);
  for (const d of splits.filter((x) => x.spec?.matches?.length)) {
    for (const b of d.spec?.backends ?? []) if (b.service && typeof b.weight === 'number' && b.weight > 0) view.canary.add(b.service);
  }
  for (const d of docs) {
    if (d.kind !== 'Pod' || (d.metadata?.namespace ?? 'default') !== LAB_NAMESPACE || !d.metadata?.name) continue;
    const a = d.metadata.annotations ?? {};
    view.labels.set(d.metadata.name, d.metadata.labels ?? {});
    if (monitored && a[ANNOTATION_SIDECAR_INJECTION] !== 'disabled') view.enrolled.add(d.metadata.name);
    view.excludedPorts.set(d.metadata.name, new Set([...meshPorts, ...ports(a[ANNOTATION_OUTBOUND_PORT_EXCLUSION])]));
  }
  return view;
}

/** Should a request from `from` to port `port` be intercepted (go through the from-node's proxy)? */
export function expectIntercepted(view: MeshView, from: string, port: number): boolean {
  return view.enrolled.has(from) && !view.excludedPorts.get(from)?.has(port);
}

// ---- convergence -----------------------------------------------------------------

export function controllerVersion(state: LabState, n: LabNode): Promise<string | undefined> {
  return new Promise((resolve) => {
    let token: string;
    let ca: string;
    try {
      token = readFileSync(n.tokenFile, 'utf8').trim();
      ca = readFileSync(controllerOf(state, n).caFile, 'utf8');
    } catch {
      return resolve(undefined);
    }
    const req = httpsRequest(`${controllerOf(state, n).url}/v1/nodes/${n.name}/policy`, { ca, timeout: 2000, headers: { authorization: `Bearer ${token}` } }, (res) => {
      res.resume();
      resolve(res.statusCode === 200 ? String(res.headers.etag ?? '').replace(/^W\//, '').replace(/"/g, '') || undefined : undefined);
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(undefined));
    req.end();
  });
}

/**
 * Wait (bounded) until every agent has applied the policy version the
 * controller serves its node now, so a check right after a manifest edit
 * judges the new mesh. Returns notes for agents that did not converge.
 */
export async function waitConverged(state: LabState, timeoutMs = 10_000): Promise<string[]> {
  const deadline = Date.now() + timeoutMs;
  const pending = new Map(state.nodes.map((n) => [n.name, n]));
  let last = new Map<string, string>();
  for (;;) {
    last = new Map();
    for (const n of [...pending.values()]) {
      const [want, s] = await Promise.all([controllerVersion(state, n), agentState(n.agentUrl).catch(() => undefined)]);
      const applied = (s?.applied as { version?: string } | undefined)?.version;
      if (want !== undefined && applied === want && s?.ready === true) pending.delete(n.name);
      else last.set(n.name, `agent of ${n.name}: applied ${applied ?? 'nothing'}, controller serves ${want ?? '(no answer)'}${s?.ready === false ? `, not ready: ${String(s.notReadyReason)}` : ''}`);
    }
    if (pending.size === 0) return [];
    if (Date.now() > deadline) return [...last.values()];
    await sleep(200);
  }
}

// ---- the cases -------------------------------------------------------------------

interface ProxyRecord {
  event: string;
  source: string;
  sourcePort: number;
  originalDst: { address: string; port: number } | null;
}

function proxyRecords(n: LabNode): ProxyRecord[] {
  let text: string;
  try {
    text = readFileSync(join(n.stateDir, 'proxy-connections.jsonl'), 'utf8');
  } catch {
    return [];
  }
  return text
    .split('\n')
    .filter((l) => l !== '')
    .flatMap((l) => {
      try {
        return [JSON.parse(l) as ProxyRecord];
      } catch {
        return [];
      }
    });
}

async function request(from: LabPod, url: string): Promise<GetResult> {
  const script = join(packageRoot(), 'dist', 'src', 'lab', 'echo-server.js');
  const res = await runInside(from.cgroupPath, from.netns, [process.execPath, script, 'get', url], 10_000);
  try {
    return JSON.parse(res.stdout.trim().split('\n').pop() ?? '') as GetResult;
  } catch {
    return { ok: false, error: `client exited ${res.code}: ${(res.stderr || res.stdout).trim().slice(0, 300)}` };
  }
}

/**
 * Did `to`'s node proxy accept a mutual-TLS tunnel whose client certificate
 * proved `from`'s identity (service account = pod name in the lab)? Read from
 * its agent's /metrics (fsm_node_proxy_tunnels_total, proxy/README.md).
 */
async function tunnelEvidence(toNode: LabNode, from: LabPod, to: LabPod): Promise<{ mtls: boolean; source: string; seen: string }> {
  // The agent serves the proxy's metrics from a reading up to READING_TTL_MS old (src/agent/metrics.ts):
  // a tunnel opened just now may not be in it yet, so look again past that age before calling it missing.
  const first = await tunnelEvidenceOnce(toNode, from, to);
  if (first.mtls) return first;
  await sleep(READING_TTL_MS + 200);
  return tunnelEvidenceOnce(toNode, from, to);
}

async function tunnelEvidenceOnce(toNode: LabNode, from: LabPod, to: LabPod): Promise<{ mtls: boolean; source: string; seen: string }> {
  const source = `${LAB_NAMESPACE}/${from.name}`;
  const destination = `${LAB_NAMESPACE}/${to.name}`;
  // The agent serves one reading of Pipy's counters for READING_TTL_MS, and the
  // cases run side by side: a reading taken just before this case's tunnel does
  // not show it yet. Read again until it does, for a little longer than that.
  const deadline = Date.now() + 3 * READING_TTL_MS;
  for (;;) {
    let text = '';
    try {
      const res = await fetch(`${toNode.agentUrl}/metrics`, { signal: AbortSignal.timeout(5000) });
      text = await res.text();
    } catch (err) {
      return { mtls: false, source, seen: `metrics of ${toNode.name}: ${errorMessage(err)}` };
    }
    const lines = text.split('\n').filter((l) => l.startsWith('fsm_node_proxy_tunnels_total{') && l.includes(`source="${source}"`) && l.includes(`destination="${destination}"`) && l.includes('result="accepted"'));
    const count = (transport: string): number => lines.filter((l) => l.includes(`transport="${transport}"`)).reduce((n, l) => n + Number(l.slice(l.lastIndexOf(' ') + 1)), 0);
    const mtls = count('mtls') > 0;
    if (mtls || Date.now() > deadline) return { mtls, source, seen: count('plaintext') > 0 ? `plaintext tunnels from ${source}` : `no tunnel from ${source} counted by ${toNode.name}` };
    await sleep(250);
  }
}

function parseAnswer(body: string | undefined): EchoAnswer | undefined {
  try {
    return JSON.parse(body ?? '') as EchoAnswer;
  } catch {
    return undefined;
  }
}

/**
 * Judge one pod-to-pod request under the passthrough proxy. Intercepted:
 * the answer names the target, the client's node proxy logged this very
 * connection (source ip:port) with the target as original destination, and
 * the server saw the proxy's node address (the gateway for a same-node hop,
 * so it never left the node; the underlay address across nodes). Not
 * intercepted: the answer names the target, the server saw the client pod
 * itself and no proxy logged the connection.
 */
export function judgePodCase(
  c: { from: LabPod; to: LabPod; fromNode: LabNode; intercepted: boolean },
  got: GetResult,
  records: ProxyRecord[],
): { result: CaseResult; reason: string; evidence: Record<string, unknown> } {
  const { from, to, fromNode, intercepted } = c;
  const answer = parseAnswer(got.body);
  const evidence: Record<string, unknown> = { status: got.status, answer, clientPort: got.localPort };
  if (!got.ok) return { result: 'fail', reason: `request failed: ${got.error}`, evidence };
  if (got.status !== 200 || answer?.pod !== to.name) return { result: 'fail', reason: `expected an answer from ${to.name}, got HTTP ${got.status}: ${String(got.body).trim().slice(0, 120)}`, evidence };
  // The caller passes the records written since the request started; the newest open from this port is its.
  const record = records.filter((r) => r.event === 'open' && r.source === from.ip && r.sourcePort === got.localPort).pop();
  evidence.proxyRecord = record ?? null;
  const sameNode = from.node === to.node;
  if (!intercepted) {
    if (record) return { result: 'fail', reason: `not enrolled (or port excluded) but ${fromNode.name}'s proxy logged the connection`, evidence };
    if (answer.peer !== from.ip) return { result: 'fail', reason: `not enrolled: the server should see the client ${from.ip}, saw ${answer.peer}`, evidence };
    return { result: 'pass', reason: `direct (not intercepted, as the manifests say): answer from ${to.name}, server saw ${from.ip}`, evidence };
  }
  if (!record) return { result: 'fail', reason: `answered by ${to.name} but ${fromNode.name}'s proxy has no record of ${from.ip}:${got.localPort}: not intercepted`, evidence };
  const dst = record.originalDst;
  if (dst?.address !== to.ip || dst.port !== ECHO_PORT) return { result: 'fail', reason: `proxy recorded original destination ${dst?.address}:${dst?.port}, expected ${to.ip}:${ECHO_PORT}`, evidence };
  const wantPeer = sameNode ? fromNode.gateway : fromNode.underlayIp;
  if (answer.peer !== wantPeer) {
    return { result: 'fail', reason: `server saw ${answer.peer}, expected ${fromNode.name}'s ${sameNode ? 'gateway (same-node hop kept on the node)' : 'underlay address'} ${wantPeer}`, evidence };
  }
  return {
    result: 'pass',
    reason: `via ${fromNode.name} proxy (original dst ${to.ip}:${ECHO_PORT}), answer from ${to.name}${sameNode ? `, stayed on ${fromNode.name}` : `, crossed to ${to.node}`}`,
    evidence,
  };
}

async function pool<T>(items: T[], limit: number, fn: (t: T) => Promise<void>): Promise<void> {
  const queue = [...items];
  await Promise.all(Array.from({ length: Math.min(limit, queue.length) }, async () => {
    for (let t = queue.shift(); t !== undefined; t = queue.shift()) await fn(t);
  }));
}

export interface CheckOptions {
  /** Leave out the resilience cases (src/lab/check-resilience.ts): they inject faults and policies and take about a minute. */
  resilience?: boolean;
}

export async function labCheck(all: LabState, opts: CheckOptions = {}): Promise<CheckReport> {
  // Pods added live (`lab pod add`) run the user's command, not the echo server: not part of the check.
  const state = { ...all, pods: all.pods.filter((p) => p.containerId === undefined) };
  const notes = await waitConverged(state);
  notes.push(...restartNotes(await gatherLabStatus(state)));
  const view = meshView(labFiles(state.dir).manifests);
  const nodes = new Map(state.nodes.map((n) => [n.name, n]));
  const cases: CheckCase[] = [];
  const pairs = state.pods.flatMap((from) => state.pods.filter((to) => to !== from).map((to) => ({ from, to })));
  const needsPipy = 'needs the Pipy proxy (passthrough forwards to the original destination and enforces no policy)';

  // One pod's requests one after another: with two in flight from a pod, both could hold the same
  // source port (to different destinations) and the proxy log could not tell them apart.
  const byPod = [...new Set(pairs.map((p) => p.from.name))].map((name) => pairs.filter((p) => p.from.name === name));
  await pool(byPod, 4, async (group) => {
    for (const pair of group) await podCase(pair);
  });
  async function podCase({ from, to }: (typeof pairs)[number]): Promise<void> {
    const fromNode = nodes.get(from.node)!;
    const name = `${from.name} -> ${to.name} (${from.node === to.node ? 'same node' : `${from.node} -> ${to.node}`})`;
    // Only records written after the request started are this request's: the
    // log spans the lab's life and Linux reuses a source port for other destinations.
    const logged = state.proxy === 'passthrough' ? proxyRecords(fromNode).length : 0;
    let got: GetResult;
    try {
      got = await request(from, `http://${to.ip}:${ECHO_PORT}/`);
    } catch (err) {
      got = { ok: false, error: errorMessage(err) };
    }
    const intercepted = expectIntercepted(view, from.name, ECHO_PORT);
    if (state.proxy !== 'passthrough') {
      // Pipy keeps its own logs: judge by the answer and the access rules.
      const denied = deniedPair(state.pods);
      const allowed = !(denied && denied.from === from.name && denied.to === to.name) || !intercepted;
      const answer = parseAnswer(got.body);
      let ok = allowed ? got.ok && answer?.pod === to.name : !(got.ok && answer?.pod === to.name);
      const outcome = got.ok ? (answer ? `HTTP ${got.status} from ${answer.pod}` : `HTTP ${got.status}`) : got.error;
      let tunnel = '';
      if (intercepted && from.node !== to.node && got.ok) {
        // The far node's proxy counts each tunnel it accepted by the identity the client certificate proved.
        const t = await tunnelEvidence(nodes.get(to.node)!, from, to);
        tunnel = t.mtls ? `; mTLS, ${to.node} verified ${t.source}` : `; tunnel NOT mTLS (${t.seen})`;
        ok &&= t.mtls;
      }
      cases.push({ name, kind: 'pod-to-pod', from: from.name, to: to.name, result: ok ? 'pass' : 'fail', reason: `${allowed ? 'allowed' : 'denied'}: ${outcome}${tunnel}` });
      return;
    }
    // The proxy may write its record a moment after the answer arrived: wait for it (at most 1 s).
    const mine = (): ProxyRecord[] => proxyRecords(fromNode).slice(logged);
    for (let i = 0; intercepted && got.ok && i < 20 && !mine().some((r) => r.source === from.ip && r.sourcePort === got.localPort); i++) await sleep(50);
    const judged = judgePodCase({ from, to, fromNode, intercepted }, got, mine());
    cases.push({ name, kind: 'pod-to-pod', from: from.name, to: to.name, ...judged });
  }
  cases.sort((a, b) => a.from.localeCompare(b.from, 'en', { numeric: true }) || a.to.localeCompare(b.to, 'en', { numeric: true }));

  const denied = deniedPair(state.pods);
  if (state.proxy === 'passthrough') {
    for (const s of LAB_SERVICES) {
      cases.push({ name: `service ${s.name} (${s.clusterIP}:${ECHO_PORT}) from every pod`, kind: 'service', from: '*', to: s.name, result: 'skip', reason: `${needsPipy}; a service address is routed to its endpoints by the proxy` });
    }
    cases.push({ name: `split echo ${Object.entries(SPLIT_WEIGHTS).map(([k, v]) => `${k}=${v}`).join(' ')}`, kind: 'split', from: '*', to: 'echo', result: 'skip', reason: needsPipy });
    cases.push({ name: canaryName(view), kind: 'split', from: '*', to: 'echo', result: 'skip', reason: needsPipy });
    if (denied) cases.push({ name: `deny ${denied.from} -> ${denied.to}`, kind: 'access', from: denied.from, to: denied.to, result: 'skip', reason: needsPipy });
  } else {
    cases.push(...(await serviceCases(state, view, denied?.from)));
  }
  cases.push(...(await mqttCases(state)));
  if (opts.resilience === false) notes.push('resilience cases left out (--no-resilience)');
  else cases.push(...(await resilienceCases(state, view, { served: (n) => controllerVersion(state, n) })));
  const count = (r: CaseResult): number => cases.filter((c) => c.result === r).length;
  const failed = count('fail');
  return { ok: failed === 0 && cases.length > 0, proxy: state.proxy, passed: count('pass'), failed, skipped: count('skip'), notes, cases };
}

/** Endpoints of a lab service: pods whose labels match its selector. */
function endpointsOf(view: MeshView, selector: Record<string, string>): Set<string> {
  const out = new Set<string>();
  for (const [pod, labels] of view.labels) if (Object.entries(selector).every(([k, v]) => labels[k] === v)) out.add(pod);
  return out;
}

const SPLIT_REQUESTS = 200;
const SPLIT_TOLERANCE_POINTS = 12;

/**
 * With Pipy: every pod reaches every service by its cluster address and is
 * answered by one of that service's endpoints; and requests to the split's
 * root service land on its backends in the ratio of the weights (within a
 * stated tolerance over SPLIT_REQUESTS requests). The denied source is left
 * out: its access to some endpoints is refused by design.
 */
async function serviceCases(state: LabState, view: MeshView, deniedFrom: string | undefined): Promise<CheckCase[]> {
  const cases: CheckCase[] = [];
  const clients = state.pods.filter((p) => p.name !== deniedFrom && view.enrolled.has(p.name));
  for (const s of LAB_SERVICES) {
    const endpoints = endpointsOf(view, s.selector);
    const bad: string[] = [];
    await pool(clients, 4, async (from) => {
      const got = await request(from, `http://${s.clusterIP}:${ECHO_PORT}/`).catch((err: unknown): GetResult => ({ ok: false, error: errorMessage(err) }));
      const answer = parseAnswer(got.body);
      if (!got.ok || got.status !== 200 || !answer || !endpoints.has(answer.pod)) bad.push(`${from.name}: ${got.ok ? `HTTP ${got.status} from ${answer?.pod}` : got.error}`);
    });
    cases.push({
      name: `service ${s.name} (${s.clusterIP}:${ECHO_PORT}) from every pod`,
      kind: 'service',
      from: '*',
      to: s.name,
      result: bad.length === 0 && clients.length > 0 ? 'pass' : 'fail',
      reason: bad.length === 0 ? `${clients.length} clients answered by endpoints of ${s.name} (${[...endpoints].join(' ')})` : `not answered by an endpoint: ${bad.join('; ')}`,
    });
  }
  const total = [...view.split.values()].reduce((a, b) => a + b, 0);
  const client = clients[0];
  if (!client || total === 0) return cases;
  const backendOf = new Map<string, string>();
  for (const s of LAB_SERVICES) if (view.split.has(s.name)) for (const pod of endpointsOf(view, s.selector)) backendOf.set(pod, s.name);
  const seen = new Map<string, number>();
  const root = LAB_SERVICES.find((s) => s.name === 'echo')!;
  for (let i = 0; i < SPLIT_REQUESTS; i += 20) {
    await pool(Array.from({ length: 20 }, (_v, k) => k), 10, async () => {
      const got = await request(client, `http://${root.clusterIP}:${ECHO_PORT}/`).catch((): GetResult => ({ ok: false, error: 'failed' }));
      const pod = parseAnswer(got.body)?.pod;
      const backend = (pod && backendOf.get(pod)) ?? 'none';
      seen.set(backend, (seen.get(backend) ?? 0) + 1);
    });
  }
  const shares = [...view.split].map(([svc, w]) => ({ svc, want: (100 * w) / total, got: (100 * (seen.get(svc) ?? 0)) / SPLIT_REQUESTS }));
  const off = shares.filter((x) => Math.abs(x.want - x.got) > SPLIT_TOLERANCE_POINTS);
  cases.push({
    name: `split echo ${[...view.split].map(([k, v]) => `${k}=${v}`).join(' ')}`,
    kind: 'split',
    from: client.name,
    to: 'echo',
    result: off.length === 0 && (seen.get('none') ?? 0) === 0 ? 'pass' : 'fail',
    reason: `${SPLIT_REQUESTS} requests from ${client.name}: ${shares.map((x) => `${x.svc} ${x.got.toFixed(0)}% (want ${x.want.toFixed(0)}±${SPLIT_TOLERANCE_POINTS})`).join(', ')}${seen.get('none') ? `, ${seen.get('none')} failed` : ''}`,
  });
  if (view.canary.size > 0) cases.push(await canaryCase(view, client, root.clusterIP));
  return cases;
}

const CANARY_REQUESTS = 20;

function canaryName(view: MeshView): string {
  return `split echo ${CANARY.path}/* -> ${[...view.canary].join(' ') || CANARY.backend}`;
}

/** Requests on the canary path land only on the canary backends (HTTP matches of a v1alpha4 TrafficSplit). */
async function canaryCase(view: MeshView, client: LabPod, rootIp: string): Promise<CheckCase> {
  const allowed = new Set<string>();
  for (const s of LAB_SERVICES) if (view.canary.has(s.name)) for (const pod of endpointsOf(view, s.selector)) allowed.add(pod);
  const stray: string[] = [];
  await pool(Array.from({ length: CANARY_REQUESTS }, (_v, k) => k), 10, async (k) => {
    const got = await request(client, `http://${rootIp}:${ECHO_PORT}${CANARY.path}/${k}`).catch((err: unknown): GetResult => ({ ok: false, error: errorMessage(err) }));
    const pod = parseAnswer(got.body)?.pod;
    if (!got.ok || got.status !== 200 || !pod || !allowed.has(pod)) stray.push(got.ok ? `HTTP ${got.status} from ${pod ?? '?'}` : (got.error ?? 'failed'));
  });
  return {
    name: canaryName(view),
    kind: 'split',
    from: client.name,
    to: 'echo',
    result: stray.length === 0 ? 'pass' : 'fail',
    reason: stray.length === 0 ? `${CANARY_REQUESTS} requests from ${client.name} all answered by ${[...allowed].join(' ')}` : `${stray.length}/${CANARY_REQUESTS} not answered by a canary backend: ${stray.slice(0, 3).join('; ')}`,
  };
}

export function renderCheck(r: CheckReport): string[] {
  const width = Math.max(...r.cases.map((c) => c.name.length));
  const lines = r.cases.map((c) => `${c.result.toUpperCase().padEnd(4)}  ${c.name.padEnd(width)}  ${c.reason}`);
  for (const n of r.notes) lines.push(`note  ${n}`);
  lines.push(`${r.ok ? 'check passed' : 'check FAILED'}: ${r.passed} passed, ${r.failed} failed, ${r.skipped} skipped (proxy: ${r.proxy})`);
  return lines;
}
