import { existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { parse, stringify } from 'yaml';
import { READING_TTL_MS } from '../../agent/metrics.js';
import { errorMessage } from '../../errors.js';
import { IDENTITIES_DIR } from '../../identity/agent-certs.js';
import { controllerVersion, waitConverged, type CaseResult, type CheckCase, type CheckReport } from '../check.js';
import type { EchoAnswer, GetResult } from '../echo-server.js';
import { agentState, echoScript, processDied, waitFor } from '../lab.js';
import { ECHO_PORT, LAB_NAMESPACE } from '../manifests.js';
import { runInside, sleep, startDetached, stopProcess } from '../processes.js';
import { gatherLabStatus, restartNotes } from '../status.js';
import { labFiles, writeLabState, type LabCluster, type LabNode, type LabPod, type LabState } from '../state.js';
import { applyClusterLink } from './link.js';
import { podBatch, type BatchSummary } from './load.js';
import { CLUSTER_SERVICE, expectedTiers, POLICY_FILE, renderTrafficPolicy, type TrafficPolicySpec } from './manifests.js';
import { readClusterStatus } from './status.js';
import { LAB_GATEWAY_PORT } from './up.js';

/**
 * `lab check` of a cluster lab. Inside each cluster: pod to pod, and the
 * cluster's own Service from every pod (answered by that cluster's pods
 * only); between clusters: no pod address is routed. Then, from a pod of
 * the last cluster (the client cluster, c2 of two) to echo's clusterset IP,
 * each policy and fault in turn, with real requests:
 *
 *   ActiveActive      answers from every cluster;
 *   Locality          only from the client's cluster;
 *   FailOver          from the client's cluster first (all of them);
 *   local faulted     its echo servers stopped but still listed: every GET
 *                     answered by another cluster, none failed;
 *   local not ready   its pods not ready (no local endpoints): the same;
 *   uplink cut        ActiveActive, c1's uplink cut: after the first
 *                     requests find the dead gateways, every GET is
 *                     answered by the client's cluster within 1 s;
 *   uplink restored   c1 answers again.
 *
 * Each step waits until every agent of the client's cluster runs the policy
 * the controller serves after the change. Whatever the check changes it puts
 * back (policy file, manifests, echo servers, link), also when a case fails.
 */

const CONVERGE_MS = 30_000;

interface Ctx {
  state: LabState;
  client: LabCluster;
  remote: LabCluster;
  clientPod: LabPod;
  url: string;
}

const nodesOf = (state: LabState, c: LabCluster): LabNode[] => state.nodes.filter((n) => n.cluster === c.name);
export const podsOf = (state: LabState, c: LabCluster): LabPod[] => state.pods.filter((p) => nodesOf(state, c).some((n) => n.name === p.node));
const clusterOfPod = (state: LabState, pod: string): string | undefined => state.nodes.find((n) => n.name === state.pods.find((p) => p.name === pod)?.node)?.cluster;

async function get(from: LabPod, url: string, timeoutMs = 12_000): Promise<GetResult> {
  const res = await runInside(from.cgroupPath, from.netns, [process.execPath, echoScript(), 'get', url], timeoutMs);
  try {
    return JSON.parse(res.stdout.trim().split('\n').pop() ?? '') as GetResult;
  } catch {
    return { ok: false, error: `client exited ${res.code}: ${(res.stderr || res.stdout).trim().slice(0, 200)}` };
  }
}

const answerOf = (r: GetResult): EchoAnswer | undefined => {
  try {
    return JSON.parse(r.body ?? '') as EchoAnswer;
  } catch {
    return undefined;
  }
};

/**
 * Requests the node's proxy routed to `cluster` for echo (fsm_node_proxy_multicluster_routed_total),
 * read after the agent's cached reading has expired so it includes everything sent before the call.
 */
async function routedTo(node: LabNode, cluster: string): Promise<number | undefined> {
  await sleep(READING_TTL_MS + 200);
  try {
    const text = await (await fetch(`${node.agentUrl}/metrics`, { signal: AbortSignal.timeout(5000) })).text();
    const line = text.split('\n').find((l) => l.startsWith('fsm_node_proxy_multicluster_routed_total{') && l.includes(`service="${LAB_NAMESPACE}/${CLUSTER_SERVICE.name}"`) && l.includes(`cluster="${cluster}"`));
    return line ? Number(line.slice(line.lastIndexOf(' ') + 1)) : 0;
  } catch {
    return undefined;
  }
}

/** Answers by cluster ("c1 12, c2 8"). */
function byCluster(state: LabState, s: BatchSummary): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [pod, n] of Object.entries(s.pods)) {
    const c = clusterOfPod(state, pod) ?? `?${pod}`;
    out[c] = (out[c] ?? 0) + n;
  }
  return out;
}

const show = (m: Record<string, number>): string => Object.entries(m).sort().map(([k, v]) => `${k} ${v}`).join(', ') || 'none';

/**
 * Make a change in cluster `c` and wait until every agent of `c` has applied
 * the policy its controller serves after it: each node's served version must
 * differ from before the change (the change must alter the policy) and be
 * the one its agent applied.
 */
export async function changeAndConverge(state: LabState, c: LabCluster, what: string, change: () => void, ready: () => boolean = () => true): Promise<void> {
  const nodes = nodesOf(state, c);
  const before = new Map(await Promise.all(nodes.map(async (n) => [n.name, await controllerVersion(state, n)] as const)));
  change();
  await waitFor(`${c.name}: ${what}`, CONVERGE_MS, processDied(c.controller.process), async () => {
    if (!ready()) return undefined;
    for (const n of nodes) {
      const want = await controllerVersion(state, n);
      if (want === undefined || want === before.get(n.name)) return undefined;
      const s = await agentState(n.agentUrl).catch(() => undefined);
      if ((s?.applied as { version?: string } | undefined)?.version !== want || s?.ready !== true) return undefined;
    }
    return true;
  });
}

function tiersNow(c: LabCluster): string[][] | undefined {
  return readClusterStatus(c)?.imports.find((i) => i.name === CLUSTER_SERVICE.name && i.namespace === LAB_NAMESPACE)?.tiers.map((t) => t.map((m) => m.split(':')[0]!));
}

/** Write cluster `client`'s GlobalTrafficPolicy for echo and wait until its agents run the tiers it gives. */
export async function setClusterPolicy(state: LabState, client: LabCluster, spec: TrafficPolicySpec): Promise<void> {
  const ids = (state.clusters ?? []).map((c) => c.name);
  const want = JSON.stringify(expectedTiers(spec, client.name, ids));
  const file = join(client.multiclusterDir, POLICY_FILE);
  const text = renderTrafficPolicy(spec);
  if (existsSync(file) && readFileSync(file, 'utf8') === text && JSON.stringify(tiersNow(client)) === want) return;
  if (JSON.stringify(tiersNow(client)) === want) {
    // Same tiers already (e.g. the policy file says the same in other words): nothing will change.
    writeFileSync(file, text);
    return;
  }
  await changeAndConverge(state, client, `policy ${spec.mode} applied (tiers ${want})`, () => writeFileSync(file, text), () => JSON.stringify(tiersNow(client)) === want);
}

/** A Pod manifest with its Ready condition False (pure). */
export function notReady(podYaml: string): string {
  const doc = parse(podYaml) as { status?: Record<string, unknown> };
  doc.status = { ...(doc.status ?? {}), conditions: [{ type: 'Ready', status: 'False' }] };
  return stringify(doc);
}

const podBackup = (c: LabCluster, p: LabPod): string => join(c.manifests, 'pods', `.${p.name}.yaml.lab-check`);

/**
 * Take pods out of their Services the way Kubernetes does (Ready=False); the
 * pods stay enrolled. Each manifest is kept aside as a dot file (which the
 * controller skips) until restoreReady puts it back.
 */
export function markNotReady(c: LabCluster, pods: readonly LabPod[]): void {
  for (const p of pods) {
    const file = join(c.manifests, 'pods', `${p.name}.yaml`);
    if (!existsSync(file) || existsSync(podBackup(c, p))) continue;
    const text = readFileSync(file, 'utf8');
    writeFileSync(podBackup(c, p), text);
    writeFileSync(file, notReady(text));
  }
}

export function restoreReady(c: LabCluster, pods: readonly LabPod[]): void {
  for (const p of pods) if (existsSync(podBackup(c, p))) renameSync(podBackup(c, p), join(c.manifests, 'pods', `${p.name}.yaml`));
}

export const notReadyPods = (c: LabCluster, pods: readonly LabPod[]): boolean => pods.some((p) => existsSync(podBackup(c, p)));

function caseOf(name: string, from: string, ok: boolean, reason: string, evidence?: Record<string, unknown>): CheckCase {
  return { name, kind: 'multicluster', from, to: `${CLUSTER_SERVICE.name}.${LAB_NAMESPACE}`, result: ok ? 'pass' : 'fail', reason, ...(evidence ? { evidence } : {}) };
}

export async function restartServers(state: LabState, pods: LabPod[]): Promise<void> {
  const logs = labFiles(state.dir).logs;
  const log = (p: LabPod): string => join(logs, `pod-${p.name}.log`);
  const listened = (p: LabPod): number => (existsSync(log(p)) ? readFileSync(log(p), 'utf8').split('"listening"').length : 0);
  const before = new Map(pods.map((p) => [p.name, listened(p)]));
  for (const pod of pods) pod.server = startDetached(pod.cgroupPath, pod.netns, [process.execPath, echoScript(), 'serve', '--name', pod.name, '--port', String(ECHO_PORT)], log(pod));
  writeLabState(state);
  await Promise.all(pods.map((p) => waitFor(`echo server in pod ${p.name}`, 10_000, processDied(p.server), async () => (listened(p) > before.get(p.name)! ? true : undefined))));
}

/** The cases inside each cluster and the isolation between them (both proxies). */
async function clusterLocalCases(state: LabState): Promise<CheckCase[]> {
  const cases: CheckCase[] = [];
  for (const c of state.clusters ?? []) {
    const pods = podsOf(state, c);
    const from = pods[0];
    if (!from) continue;
    for (const to of pods.slice(1)) {
      const r = await get(from, `http://${to.ip}:${ECHO_PORT}/`);
      const a = answerOf(r);
      cases.push({ name: `${c.name}: ${from.name} -> ${to.name}`, kind: 'pod-to-pod', from: from.name, to: to.name, result: r.ok && a?.pod === to.name ? 'pass' : 'fail', reason: r.ok ? `HTTP ${r.status} from ${a?.pod ?? '?'}` : (r.error ?? 'failed') });
    }
    if (state.proxy === 'pipy') {
      const bad: string[] = [];
      for (const p of pods) {
        const r = await get(p, `http://${CLUSTER_SERVICE.clusterIP}:${ECHO_PORT}/`);
        const a = answerOf(r);
        if (!r.ok || r.status !== 200 || !a || clusterOfPod(state, a.pod) !== c.name) bad.push(`${p.name}: ${r.ok ? `HTTP ${r.status} from ${a?.pod ?? '?'}` : r.error}`);
      }
      cases.push({ name: `${c.name}: service ${CLUSTER_SERVICE.name} (${CLUSTER_SERVICE.clusterIP}) from every pod`, kind: 'service', from: '*', to: CLUSTER_SERVICE.name, result: bad.length ? 'fail' : 'pass', reason: bad.length ? bad.join('; ') : `${pods.length} pods answered by ${c.name}'s own pods (a cluster IP stays in its cluster)` });
    }
  }
  // No pod address crosses clusters: a pod of the last cluster cannot reach a pod of the first by its IP.
  const [first, last] = [state.clusters?.[0], state.clusters?.[state.clusters.length - 1]];
  const from = last ? podsOf(state, last)[0] : undefined;
  const to = first ? podsOf(state, first)[0] : undefined;
  if (from && to) {
    const r = await get(from, `http://${to.ip}:${ECHO_PORT}/`, 8000);
    const reached = r.ok && answerOf(r)?.pod === to.name;
    cases.push({ name: `${from.name} -> ${to.name} by pod IP (across clusters)`, kind: 'pod-to-pod', from: from.name, to: to.name, result: reached ? 'fail' : 'pass', reason: reached ? `reached ${to.name} at ${to.ip}: pod subnets must not be routed between clusters` : `not reachable, as designed (pod addresses stay in their cluster): ${r.ok ? `HTTP ${r.status}` : r.error}` });
  }
  return cases;
}

const GATEWAY_REQUESTS = 8;

/**
 * What another cluster sees of cluster `c`'s gateways: from a node of `from`,
 * GATEWAY_REQUESTS tunnels (HTTP CONNECT naming echo over mutual TLS, as node
 * proxies send them; curl) to each of c's gateways, each answered by one of c's pods. A
 * gateway picks any endpoint of its cluster, also one on another node, so
 * this also covers the hop from the gateway to another node's proxy.
 */
async function gatewayCase(state: LabState, c: LabCluster, from: LabCluster): Promise<CheckCase> {
  const node = nodesOf(state, from)[0]!;
  const cgroup = join(dirname(node.podsCgroup), 'system');
  const pods = new Set(podsOf(state, c).map((p) => p.name));
  const bad: string[] = [];
  let ok = 0;
  for (const gw of c.gateways) {
    const addr = state.nodes.find((n) => n.name === gw)!.underlayIp;
    for (let i = 0; i < GATEWAY_REQUESTS; i++) {
      // Gateways take mutual TLS only (docs/multicluster.md): the tunnel presents the source node's
      // gateway identity, with the SNI a node proxy sends. The gateway's own certificate is checked by
      // the proxy tests (test/pipy/multicluster-mtls.test.ts), not here (--proxy-insecure).
      const sni = `gateway.${c.name}.cluster.local`;
      const id = join(node.stateDir, IDENTITIES_DIR, 'fsm-system', 'fsm-node-gateway');
      const r = await runInside(
        cgroup,
        node.netns,
        ['curl', '-sS', '-m', '5', '-p', '-x', `https://${sni}:${LAB_GATEWAY_PORT}`, '--resolve', `${sni}:${LAB_GATEWAY_PORT}:${addr}`, '--proxy-insecure', '--proxy-cert', join(id, 'cert.pem'), '--proxy-key', join(id, 'key.pem'), `http://${CLUSTER_SERVICE.name}.${LAB_NAMESPACE}:${ECHO_PORT}/`],
        10_000,
      );
      const pod = answerOf({ ok: true, body: r.stdout })?.pod;
      if (r.code === 0 && pod && pods.has(pod)) ok++;
      else bad.push(`${gw}: ${(r.stdout || r.stderr).trim().slice(0, 80) || `curl exit ${r.code}`}`);
    }
  }
  const total = c.gateways.length * GATEWAY_REQUESTS;
  const hint = '';
  return {
    name: `${from.name} -> ${c.name}'s gateways (${c.gateways.join(' ')}): every tunnel answered by a ${c.name} pod`,
    kind: 'multicluster',
    from: node.name,
    to: `${CLUSTER_SERVICE.name}.${LAB_NAMESPACE}@${c.name}`,
    result: ok === total ? 'pass' : 'fail',
    reason: `${ok}/${total} answered by ${c.name}'s pods${bad.length ? `; ${bad.length} not: ${[...new Set(bad)].slice(0, 3).join('; ')}${hint}` : ''}`,
  };
}

/** The cross-cluster cases (Pipy). Puts back everything it changed. */
async function crossClusterCases(ctx: Ctx): Promise<CheckCase[]> {
  const { state, client, remote, clientPod, url } = ctx;
  const cases: CheckCase[] = [];
  const from = clientPod.name;
  const others = (state.clusters ?? []).filter((c) => c !== client).map((c) => c.name);
  const policyFile = join(client.multiclusterDir, POLICY_FILE);
  const originalPolicy = existsSync(policyFile) ? readFileSync(policyFile, 'utf8') : undefined;
  const localPods = podsOf(state, client);
  const restorePods = (): void => restoreReady(client, localPods);
  let linkCut = false;
  let serversStopped = false;
  const step = async (name: string, fn: () => Promise<CheckCase>): Promise<boolean> => {
    try {
      const c = await fn();
      cases.push(c);
      return c.result === 'pass';
    } catch (err) {
      cases.push(caseOf(name, from, false, errorMessage(err)));
      return false;
    }
  };
  try {
    await step('ActiveActive', async () => {
      await setClusterPolicy(state, client, { mode: 'ActiveActive' });
      const s = await podBatch(clientPod, url, 40, { concurrency: 4 });
      const by = byCluster(state, s);
      const all = (state.clusters ?? []).every((c) => (by[c.name] ?? 0) > 0);
      return caseOf(`${client.name} -> clusterset IP, ActiveActive: answers from every cluster`, from, s.failed === 0 && all, `40 GETs: ${show(by)}; ${s.failed} failed${s.errors.length ? ` (${s.errors[0]})` : ''}`);
    });
    await step('Locality', async () => {
      await setClusterPolicy(state, client, { mode: 'Locality' });
      const s = await podBatch(clientPod, url, 20);
      const by = byCluster(state, s);
      return caseOf(`${client.name} -> clusterset IP, Locality: only ${client.name}`, from, s.failed === 0 && by[client.name] === 20, `20 GETs: ${show(by)}; ${s.failed} failed`);
    });
    await step('FailOver', async () => {
      await setClusterPolicy(state, client, { mode: 'FailOver', failOver: others });
      const s = await podBatch(clientPod, url, 20);
      const by = byCluster(state, s);
      return caseOf(`${client.name} -> clusterset IP, FailOver ${[client.name, ...others].join(' > ')}: local first`, from, s.failed === 0 && by[client.name] === 20, `20 GETs: ${show(by)}; ${s.failed} failed`);
    });
    await step('FailOver, local faulted', async () => {
      for (const p of localPods) await stopProcess(p.server);
      serversStopped = true;
      const s = await podBatch(clientPod, url, 20);
      const by = byCluster(state, s);
      return caseOf(
        `${client.name} -> clusterset IP, FailOver, ${client.name}'s echo servers stopped (still listed): failed over`,
        from,
        s.failed === 0 && (by[client.name] ?? 0) === 0 && s.ok === 20,
        `20 GETs: ${show(by)}; ${s.failed} failed (safe methods are retried on the next tier within the request); slowest ${s.maxMs} ms`,
      );
    });
    if (serversStopped) {
      await restartServers(state, localPods);
      serversStopped = false;
    }
    await step('FailOver, local not ready', async () => {
      // Not ready is how Kubernetes takes a pod out of its Services' endpoints; the pods stay enrolled
      // (the client is one of them). The manifests are kept aside as dot files, which the controller skips.
      await changeAndConverge(state, client, `${client.name}'s pods marked not ready`, () => markNotReady(client, localPods));
      const s = await podBatch(clientPod, url, 20);
      const by = byCluster(state, s);
      return caseOf(`${client.name} -> clusterset IP, FailOver, ${client.name}'s pods not ready (no local endpoints): the next cluster serves`, from, s.failed === 0 && (by[client.name] ?? 0) === 0 && s.ok === 20, `20 GETs: ${show(by)}; ${s.failed} failed`);
    });
    if (notReadyPods(client, localPods)) {
      await changeAndConverge(state, client, `${client.name}'s pods ready again`, () => restorePods());
    }
    await step('uplink cut', async () => {
      await setClusterPolicy(state, client, { mode: 'ActiveActive' });
      const warm = await podBatch(clientPod, url, 10, { concurrency: 2 });
      if ((byCluster(state, warm)[remote.name] ?? 0) === 0) return caseOf(`${remote.name}'s uplink cut`, from, false, `before the cut ${remote.name} did not answer (${show(byCluster(state, warm))})`);
      const t0 = Date.now();
      await applyClusterLink(state, remote.name, { kind: 'down' });
      linkCut = true;
      // The first requests may meet the dead gateways (and wait out the tunnel's timeouts before a retry).
      const first = await podBatch(clientPod, url, 10, { concurrency: 2, timeoutMs: 10_000 });
      // After that every GET is answered by the client's cluster; the client node's proxy counts how many it
      // still tried on the cut site (its gateways are marked dead once a request met them, and probed on the side).
      const clientNode = state.nodes.find((n) => n.name === clientPod.node)!;
      const applied = async (): Promise<string | undefined> => ((await agentState(clientNode.agentUrl).catch(() => undefined))?.applied as { version?: string } | undefined)?.version;
      const versionBefore = await applied();
      const routedBefore = await routedTo(clientNode, remote.name);
      const after = await podBatch(clientPod, url, 20, { concurrency: 2, timeoutMs: 10_000 });
      const routedAfter = await routedTo(clientNode, remote.name);
      const versionAfter = await applied();
      const byA = byCluster(state, after);
      const routed = routedBefore === undefined || routedAfter === undefined ? undefined : routedAfter - routedBefore;
      // Evidence, not the verdict: each Pipy worker thread keeps its own dead-gateway marks (and a reload
      // forgets them), so a thread that has not met the cut yet still tries c1 once per gateway; how fast
      // the dead site stops costing anything is the failover benchmark's to measure, not a check's.
      const reloaded = versionBefore !== versionAfter;
      const ok = first.failed === 0 && after.failed === 0 && (byA[client.name] ?? 0) === 20;
      // The control path crosses the uplinks too (relay.ts): the peer goes silent, its exports stay for the lease.
      const peer = readClusterStatus(client)?.peers.find((p) => p.cluster === remote.name);
      const kept = tiersNow(client)?.flat().includes(remote.name);
      const control = `${client.name}'s controller: peer ${remote.name} ${peer?.error ? `unreachable (${peer.error})` : 'not noticed silent yet (its long-poll is still waiting)'}, ${kept ? 'its exports kept (lease)' : 'its exports GONE'}`;
      return caseOf(
        `${client.name} -> clusterset IP, ActiveActive, ${remote.name}'s uplink cut: failed over`,
        from,
        ok,
        `first 10 GETs after the cut: ${show(byCluster(state, first))}, ${first.failed} failed, slowest ${first.maxMs} ms; next 20: ${show(byA)}, ${after.failed} failed, slowest ${after.maxMs} ms, routed to ${remote.name} meanwhile: ${routed ?? 'unknown (no metrics)'}${reloaded ? ` (the proxy's config was reloaded meanwhile, ${versionBefore} -> ${versionAfter}: it forgot the dead gateways)` : routed ? ' (worker threads that had not met the cut yet; each retried on c2)' : ''}; ${((Date.now() - t0) / 1000).toFixed(1)} s in all; ${control}`,
      );
    });
    if (linkCut) {
      await step('uplink restored', async () => {
        await applyClusterLink(state, remote.name, { kind: 'up' });
        linkCut = false;
        const t0 = Date.now();
        let last: BatchSummary | undefined;
        while (Date.now() - t0 < 30_000) {
          last = await podBatch(clientPod, url, 10, { concurrency: 2 });
          if ((byCluster(state, last)[remote.name] ?? 0) > 0) {
            return caseOf(`${remote.name}'s uplink restored: ${remote.name} serves again`, from, last.failed === 0, `${remote.name} answered again ${((Date.now() - t0) / 1000).toFixed(1)} s after the link came back (dead gateways are probed every 3 s): ${show(byCluster(state, last))}, ${last.failed} failed`);
          }
          await sleep(500);
        }
        return caseOf(`${remote.name}'s uplink restored: ${remote.name} serves again`, from, false, `${remote.name} did not answer within 30 s of the link coming back (last: ${last ? show(byCluster(state, last)) : 'none'})`);
      });
    }
  } finally {
    // Put back whatever is still changed, in reverse order; a failure here is a failed case, not a crash.
    const restore = async (what: string, fn: () => Promise<void>): Promise<void> => {
      try {
        await fn();
      } catch (err) {
        cases.push(caseOf(`restore: ${what}`, from, false, errorMessage(err)));
      }
    };
    if (linkCut) await restore(`${remote.name}'s uplink`, async () => void (await applyClusterLink(state, remote.name, { kind: 'up' })));
    if (serversStopped) await restore(`${client.name}'s echo servers`, () => restartServers(state, localPods));
    if (notReadyPods(client, localPods)) await restore(`${client.name}'s pods`, async () => restorePods());
    if (originalPolicy !== undefined && readFileSync(policyFile, 'utf8') !== originalPolicy) {
      await restore(`${client.name}'s traffic policy`, async () => {
        const spec = (parse(originalPolicy) as { spec?: TrafficPolicySpec } | null)?.spec;
        if (spec?.mode) await setClusterPolicy(state, client, spec);
        writeFileSync(policyFile, originalPolicy);
      });
    }
  }
  return cases;
}

export async function clusterCheck(all: LabState): Promise<CheckReport> {
  const state = { ...all, pods: all.pods.filter((p) => p.containerId === undefined) };
  const notes = await waitConverged(state);
  notes.push(...restartNotes(await gatherLabStatus(state)));
  const cases: CheckCase[] = [];
  cases.push(...(await clusterLocalCases(state)));
  const clusters = state.clusters ?? [];
  const client = clusters[clusters.length - 1];
  const remote = clusters[0];
  const clientPod = client ? podsOf(state, client)[0] : undefined;
  // The clusterset: every cluster imports echo from every cluster, with a clusterset IP.
  for (const c of clusters) {
    const imp = readClusterStatus(c)?.imports.find((i) => i.name === CLUSTER_SERVICE.name && i.namespace === LAB_NAMESPACE);
    const peers = readClusterStatus(c)?.peers ?? [];
    const ok = !!imp && clusters.every((x) => imp.clusters.includes(x.name)) && imp.ips.length > 0;
    cases.push({
      name: `${c.name} imports ${CLUSTER_SERVICE.name}.${LAB_NAMESPACE} from every cluster`,
      kind: 'multicluster',
      from: c.name,
      to: CLUSTER_SERVICE.name,
      result: ok ? 'pass' : 'fail',
      reason: imp ? `clusterset IP ${imp.ips[0] ?? 'none'}, clusters ${imp.clusters.join(' ')}, tiers ${imp.tiers.map((t) => t.join('+')).join(' > ')}; peers ${peers.map((p) => `${p.cluster} ${p.error ? `error: ${p.error}` : 'ok'}`).join(', ')}` : `no import in ${join(c.controller.stateDir, 'multicluster', 'status.json')}`,
    });
  }
  const ip = client ? readClusterStatus(client)?.imports.find((i) => i.name === CLUSTER_SERVICE.name)?.ips[0] : undefined;
  const needsPipy = 'needs the Pipy proxy: the clusterset data path (tiers, gateways, failover) is proxy/multicluster.js';
  if (state.proxy !== 'pipy') {
    for (const n of ['gateways', 'ActiveActive', 'Locality', 'FailOver', 'FailOver, local faulted', 'FailOver, local not ready', 'uplink cut', 'uplink restored']) {
      cases.push({ name: `cross-cluster: ${n}`, kind: 'multicluster', from: clientPod?.name ?? '-', to: CLUSTER_SERVICE.name, result: 'skip', reason: needsPipy });
    }
  } else if (client && remote && clientPod && ip) {
    for (const c of clusters) cases.push(await gatewayCase(state, c, c === client ? remote : client));
    cases.push(...(await crossClusterCases({ state, client, remote, clientPod, url: `http://${ip}:${ECHO_PORT}/` })));
  }
  const count = (r: CaseResult): number => cases.filter((c) => c.result === r).length;
  const failed = count('fail');
  return { ok: failed === 0 && cases.length > 0, proxy: state.proxy, passed: count('pass'), failed, skipped: count('skip'), notes, cases };
}
