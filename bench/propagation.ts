import { fork, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';
import { generateTokens, writeTokensFile } from '../src/controller/auth.js';
import { runController, type RunningController } from '../src/controller/main.js';
import { now, type FleetCommand, type FleetReport, type Transfer } from './propagation-fleet.js';
import { nodeName, shapeFlags, syntheticChanges, syntheticCluster, type ClusterShape, type K8sObject } from './synthetic-cluster.js';
import { intFlag, quantile, round } from './util.js';

/**
 * propagation: the lab path end to end on loopback. The controller runs in
 * manifest mode over a directory (one file per service, so a change rewrites
 * one file); 100 node clients long-poll it over HTTPS, plus one real agent
 * policy client (schema check, atomic write to disk, desiredState) on node-0.
 * The clients run in a child process (bench/propagation-fleet.ts): they
 * stand for remote machines, whose work must not share the controller's
 * event loop; on this 2-core machine the two processes get a core each.
 * Each change is a file written (atomically) into the directory; latency runs
 * from just before that write until a node holds the new version: fs watch,
 * debounce, reload, incremental compile, long-poll wake, gzip, TLS, transfer.
 * Changes: an EndpointSlice port (every node in permissive mode), a split
 * weight (every node), a pod added on node-0 (every node too: the mesh pods list).
 * Target: p99 under 100 ms.
 *
 * Both transfers are measured in one run, in alternating blocks (delta, full,
 * delta, full, ...) so that machine noise falls on both alike: `delta` (the
 * agents' default: A-IM, 226 + NodePolicyDelta) and `full` (every change sends
 * the whole policy, as before deltas). Rows give per-mode p50/p99 and the
 * bytes a node received per change; ratio rows give full / delta.
 */

function writeAtomic(path: string, text: string): void {
  const tmp = join(path, '..', `.tmp-${process.pid}`);
  writeFileSync(tmp, text);
  renameSync(tmp, path);
}

const yaml = (objs: K8sObject[]): string => objs.map((o) => stringify(o)).join('---\n');

async function until(cond: () => boolean, ms: number): Promise<boolean> {
  const end = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > end) return false;
    await new Promise((r) => setTimeout(r, 1));
  }
  return true;
}

export async function run(flags: Record<string, string | boolean>): Promise<object[]> {
  const shape: ClusterShape = { ...shapeFlags(flags), trafficPolicy: flags.mode === 'smi' ? 'smi' : 'permissive' };
  const samples = intFlag(flags, 'samples', 20);
  const rounds = Math.max(1, Math.min(samples, intFlag(flags, 'rounds', 2)));
  const transferFlag = flags.transfer ?? 'delta,full';
  const transfers = String(transferFlag).split(',') as Transfer[];
  if (transfers.length === 0 || transfers.some((t) => t !== 'delta' && t !== 'full')) throw new Error(`--transfer must be delta, full or delta,full, got ${JSON.stringify(transferFlag)}`);
  const dir = mkdtempSync(join(tmpdir(), 'fsm-bench-propagation-'));
  const manifests = join(dir, 'manifests');
  let ctrl: RunningController | undefined;
  let fleet: ChildProcess | undefined;
  let agentErrors = 0;
  try {
    // One file per service (service, slice, pods), the rest in cluster.yaml.
    for (const d of ['services', 'splits', 'extra']) mkdirSync(join(manifests, d), { recursive: true });
    const byService = new Map<string, K8sObject[]>();
    const rest: K8sObject[] = [];
    for (const o of syntheticCluster(shape)) {
      const svc = o.kind === 'Service' || o.kind === 'EndpointSlice' ? String(o.metadata.name).replace(/-abcde$/, '') : o.kind === 'Pod' ? (o.metadata.labels as Record<string, string>).app : undefined;
      if (svc) byService.set(svc, [...(byService.get(svc) ?? []), o]);
      else if (o.kind === 'TrafficSplit') writeFileSync(join(manifests, 'splits', `${String(o.metadata.name)}.yaml`), yaml([o]));
      else rest.push(o);
    }
    for (const [svc, objs] of byService) writeFileSync(join(manifests, 'services', `${svc}.yaml`), yaml(objs));
    writeFileSync(join(manifests, 'cluster.yaml'), yaml(rest));

    const nodes = Array.from({ length: shape.nodes }, (_, i) => nodeName(i));
    const tokens = generateTokens(nodes);
    await writeTokensFile(join(dir, 'tokens.json'), tokens);
    const started = performance.now();
    ctrl = await runController({ manifests, tokens: join(dir, 'tokens.json'), listen: '127.0.0.1:0', stateDir: join(dir, 'state') });
    const startupMs = performance.now() - started;
    const c = ctrl;

    // The node side: arrivals come back over IPC.
    const arrivals = new Map<string, Map<string, { at: number; bytes: number }>>(nodes.map((n) => [n, new Map()]));
    const held = new Map<string, string>();
    const agentArrivals = new Map<string, number>();
    let agentHolds = '';
    let modeDone: Transfer | undefined;
    let stopped: ((errors: number) => void) | undefined;
    const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
    const child = (fleet = fork(fileURLToPath(new URL(`./propagation-fleet${ext}`, import.meta.url)), [], { execArgv: process.execArgv, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }));
    child.on('message', (r: FleetReport) => {
      if (r.type === 'arrival') {
        arrivals.get(r.node)!.set(r.version, { at: r.at, bytes: r.bytes });
        held.set(r.node, r.version);
      } else if (r.type === 'agent') {
        agentArrivals.set(r.version, r.at);
        agentHolds = r.version;
      } else if (r.type === 'mode') modeDone = r.transfer;
      else stopped?.(r.agentFetchErrors);
    });
    const tell = (m: FleetCommand) => child.send(m);
    tell({ cmd: 'start', url: c.url, ca: c.caCert, tokens, agentNode: nodes[0]!, dir });
    const current = (n: string) => c.compiler.get(n)?.version;
    if (!(await until(() => nodes.every((n) => held.get(n) === current(n)), 60_000))) throw new Error('the node clients never all held the first policy');
    const switchTo = async (transfer: Transfer): Promise<void> => {
      modeDone = undefined;
      tell({ cmd: 'mode', transfer });
      const ok = await until(() => modeDone === transfer && agentHolds === current(nodes[0]!) && c.hub.waiting() === nodes.length + 1, 60_000);
      if (!ok) throw new Error(`the node clients did not settle in ${transfer} mode`);
    };

    const change = syntheticChanges(shape);
    const changes: Record<string, (i: number) => void> = {
      endpoint_port: (i) => {
        const { svc, slice } = change.endpointPort(i);
        const objs = byService.get(`svc-${svc}`)!.map((o) => (o.kind === 'EndpointSlice' ? slice : o));
        writeAtomic(join(manifests, 'services', `svc-${svc}.yaml`), yaml(objs));
      },
      split_weight: (i) => {
        const split = change.splitWeight(i);
        writeAtomic(join(manifests, 'splits', `${String(split.metadata.name)}.yaml`), yaml([split]));
      },
      pod_added: (i) => {
        const p = shape.pods + i * shape.nodes; // lands on node-0
        writeAtomic(join(manifests, 'extra', `pod-${p}.yaml`), yaml([change.pod(p)]));
      },
    };

    interface Series {
      latencies: number[];
      /** From the write until the controller compiled the change (fs watch, debounce, reload, compile). */
      compiled: number[];
      bytes: number[];
      agent: number[];
      affected: number;
      missed: number;
      samples: number;
    }
    const series = new Map<string, Series>();
    const seriesOf = (t: Transfer, change: string): Series => {
      const k = `${t}/${change}`;
      let x = series.get(k);
      if (!x) series.set(k, (x = { latencies: [], compiled: [], bytes: [], agent: [], affected: 0, missed: 0, samples: 0 }));
      return x;
    };
    // Sample i of every change is written once whatever the mode: each sample is a new change.
    let i = 0;
    for (let round = 0; round < rounds; round++) {
      for (const transfer of transfers) {
        await switchTo(transfer);
        const perBlock = Math.ceil(samples / rounds);
        for (const [change, apply] of Object.entries(changes)) {
          const x = seriesOf(transfer, change);
          for (let k = 0; k < perBlock && x.samples < samples; k++, i++) {
            x.samples++;
            const before = new Map(nodes.map((n) => [n, current(n)]));
            const compiles = c.compiles();
            const t0 = now();
            apply(i);
            const compiled = await until(() => c.compiles() > compiles, 10_000);
            x.compiled.push(now() - t0);
            const changed = nodes.filter((n) => current(n) !== before.get(n));
            x.affected += changed.length;
            const all = await until(() => changed.every((n) => held.get(n) === current(n)), 10_000);
            if (!compiled || !all) x.missed++;
            for (const n of changed) {
              const got = arrivals.get(n)!.get(current(n)!);
              if (got === undefined) continue;
              x.latencies.push(got.at - t0);
              x.bytes.push(got.bytes);
            }
            if (changed.includes(nodes[0]!) && (await until(() => agentArrivals.has(current(nodes[0]!)!), 10_000))) {
              x.agent.push(agentArrivals.get(current(nodes[0]!)!)! - t0);
            }
          }
        }
      }
    }

    const out: object[] = [
      { bench: 'propagation', phase: 'setup', traffic_policy: shape.trafficPolicy, nodes: shape.nodes, pods: shape.pods, services: shape.services, clients: nodes.length, real_agents: 1, clients_in: 'a child process', rounds, startup_ms: round(startupMs) },
    ];
    for (const change of Object.keys(changes)) {
      const rows: Record<Transfer, Record<string, number>> = { delta: {}, full: {} };
      for (const transfer of transfers) {
        const x = seriesOf(transfer, change);
        rows[transfer] = {
          compiled_p50_ms: round(quantile(x.compiled, 0.5)),
          p50_ms: round(quantile(x.latencies, 0.5)),
          p99_ms: round(quantile(x.latencies, 0.99)),
          bytes_per_node_p50: quantile(x.bytes, 0.5),
          agent_p50_ms: round(quantile(x.agent, 0.5)),
          agent_p99_ms: round(quantile(x.agent, 0.99)),
        };
        out.push({
          bench: 'propagation',
          traffic_policy: shape.trafficPolicy,
          transfer,
          change,
          samples: x.samples,
          nodes_affected_per_change: x.affected / x.samples,
          missed_changes: x.missed,
          ...rows[transfer],
          max_ms: round(Math.max(...x.latencies)),
          agent_samples: x.agent.length,
        });
      }
      const ratio = (k: string) => round(rows.full[k]! / rows.delta[k]!, 2);
      if (transfers.length === 2) out.push({ bench: 'propagation', change, ratio: 'full/delta', p50: ratio('p50_ms'), p99: ratio('p99_ms'), bytes: ratio('bytes_per_node_p50'), agent_p50: ratio('agent_p50_ms'), agent_p99: ratio('agent_p99_ms') });
    }
    agentErrors = await new Promise<number>((resolve) => {
      stopped = resolve;
      tell({ cmd: 'stop' });
    });
    out.push({ bench: 'propagation', phase: 'after', controller_rss_mib: Math.round(process.memoryUsage().rss / 2 ** 20), agent_fetch_errors: agentErrors });
    return out;
  } finally {
    if (fleet && fleet.exitCode === null) {
      const exited = new Promise((r) => fleet!.once('exit', r));
      fleet.kill();
      await exited;
    }
    await ctrl?.close();
    rmSync(dir, { recursive: true, force: true });
  }
}
