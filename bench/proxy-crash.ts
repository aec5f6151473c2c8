import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createDataplane } from '../src/dataplane/index.js';
import { noExclusions, type DesiredState, type InterceptionMode } from '../src/dataplane/types.js';
import { Topology, type TopoNode, type TopoPod } from '../src/lab/topology.js';
import { NodePolicySchema, POLICY_API_VERSION, type NodePolicy } from '../src/policy/schema.js';
import { renderProxyConfig } from '../src/proxy/config.js';
import { DEFAULT_PIPY_INSTANCES } from '../src/proxy/instances.js';
import { pipyBinary } from '../src/proxy/pipy.js';
import { ProxySupervisor } from '../src/proxy/supervisor.js';
import { packageRoot } from '../src/util/paths.js';
import type { BenchFlags } from './run.js';
import { drainEnds, intFlag, nodeProxy, quantile, round } from './util.js';

/**
 * `npm run bench -- proxy-crash [--mode ebpf|iptables] [--path same-node,cross-node] [--kill server|client]
 *   [--instances 1,2] [--kills 2] [--gap-ms 2000] [--warm-ms 1000] [--connections 8] [--threads 2] [--no-migrate]
 *   [--action kill|handover]`
 *
 * kill -9 of one node-proxy instance under connection-per-request load from a
 * pod, on a real 2-node topology: the project's Pipy program run by the real
 * ProxySupervisor on each node (N instances sharing 15001/15003 with
 * SO_REUSEPORT), the pods intercepted by the real dataplane of each mode. Pod
 * a sends HTTP GETs, each on a new connection (Connection: close), to a
 * service cluster IP that only the proxies can route: same-node to pod b
 * (a's node proxy on 15001 is killed), cross-node to pod c on the other node
 * (through a's node proxy and the HTTP/2 tunnel to c's node proxy on 15003;
 * --kill server, the default, kills c's node proxy instances, the tunnels'
 * end). Every --gap-ms one instance (in turn) is killed with SIGKILL while the
 * supervisor restarts it.
 *
 * Per mode, path and instance count, one row:
 *   failed_new_connections  connections started after a kill (not open at any
 *                           kill) that failed: the target is 0 with 2 instances;
 *   broken_in_flight        connections open at the moment of a kill that failed
 *                           (only the killed instance's own may break);
 *   failed_new_after_kill_ms  each failed new connection's start and end after
 *                           the kill before it (a race with the kill, or later);
 *   tunnel_retries          cross-node: requests the client's node proxy sent
 *                           again because their tunnel failed before the far
 *                           side answered it (proxy/tunnel.js);
 *   rps_before_kill, relisten_ms (kill -> that instance listening again),
 *   rss_kb per instance idle and under load.
 * The supervisor warns about every kill: run with FSMN_LOG_LEVEL=error to keep
 * its log lines out of the rows (or keep the lines with "bench").
 * --no-migrate leaves net.ipv4.tcp_migrate_req at 0 (what it buys: connections
 * queued on the killed instance's listeners). The load client and the proxies
 * share the machine's 2 cores.
 */

const PORT = 8080;
const OUT = 15001;
const IN = 15003;
const NS = 'crash';
const SERVICE_IP = '10.96.7.7';
const CROSS_SERVICE_IP = '10.96.7.8';

// Answers every request with a fixed 200 (keep-alive; the client closes).
const HTTP_SERVER = `
const net = require('node:net');
const RESP = Buffer.from('HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nContent-Type: text/plain\\r\\n\\r\\nok');
net.createServer((s) => {
  let tail = '';
  s.on('data', (d) => {
    const str = tail + d.toString('latin1');
    let n = 0, i = 0, end = 0;
    while ((i = str.indexOf('\\r\\n\\r\\n', i)) >= 0) { n++; i += 4; end = i; }
    tail = str.slice(end);
    if (n > 0) s.write(n === 1 ? RESP : Buffer.concat(Array(n).fill(RESP)));
  });
  s.on('error', () => {});
}).listen(${PORT}, '0.0.0.0', () => console.log('listening'));
`;

/**
 * Connection-per-request load: `conns` workers until stdin closes (at most
 * `ms` milliseconds), each
 * opening a connection, sending one GET with Connection: close and waiting
 * for the whole 200 answer. Times are process.hrtime (CLOCK_MONOTONIC, the
 * same clock in every process of the machine) in microseconds. Prints
 * "started", then one JSON line: ok count, ok per 100 ms, and each failure
 * [start_us, end_us, phase, code].
 */
const LOAD_CLIENT = `
const net = require('node:net');
const [host, port, conns, ms] = process.argv.slice(1);
const now = () => Number(process.hrtime.bigint() / 1000n);
const REQ = 'GET / HTTP/1.1\\r\\nHost: server\\r\\nConnection: close\\r\\n\\r\\n';
const t0 = now(); const end = t0 + Number(ms) * 1000; let stop = false;
process.stdin.on('end', () => { stop = true; }).resume();
const out = { t0, ok: 0, okPer100ms: [], failures: [] };
const one = () => new Promise((resolve) => {
  const start = now(); let got = ''; let connected = false; let done = false;
  const s = net.connect({ host, port: Number(port) });
  const finish = (ok, code) => {
    if (done) return; done = true; s.destroy();
    if (ok) { out.ok++; const b = Math.floor((start - t0) / 100000); out.okPer100ms[b] = (out.okPer100ms[b] || 0) + 1; }
    else out.failures.push([start, now(), connected ? 'response' : 'connect', code]);
    resolve();
  };
  s.setTimeout(5000, () => finish(false, 'timeout'));
  s.on('connect', () => { connected = true; s.write(REQ); });
  s.on('data', (d) => { got += d.toString('latin1'); if (got.endsWith('\\r\\n\\r\\nok')) finish(got.startsWith('HTTP/1.1 200'), 'status ' + got.slice(9, 12)); });
  s.on('error', (e) => finish(false, e.code || e.message));
  s.on('close', () => finish(false, 'closed early'));
});
const worker = async () => { while (!stop && now() < end) await one(); };
console.log('started');
Promise.all(Array.from({ length: Number(conns) }, worker)).then(() => { for (let i = 0; i < out.okPer100ms.length; i++) out.okPer100ms[i] ||= 0; console.log(JSON.stringify(out)); });
`;

export interface CrashOptions {
  mode: InterceptionMode;
  instances: number;
  /** Worker threads of the whole proxy (split among the instances). Default 2 (a 2-core board). */
  threads?: number;
  kills?: number;
  gapMs?: number;
  connections?: number;
  /** same-node (default): a -> b on a's node; cross-node: a -> c on the other node through both proxies. */
  path?: 'same-node' | 'cross-node';
  /** cross-node: kill instances of the client's node proxy (default) or of the server's (the tunnels' end on 15003). */
  kill?: 'client' | 'server';
  /** Load before the first kill (rps_before_kill is measured over it). Default 1000 ms. */
  warmMs?: number;
  /** net.ipv4.tcp_migrate_req in the node namespace (default true: the supervisor sets it with 2+ instances). */
  migrate?: boolean;
  /**
   * kill (default): SIGKILL one instance per step. handover: one config
   * change per step on the victim node (a new policy version delivered: new
   * instances, the old set drained, proxy/drain.js), `kills` times.
   */
  action?: 'kill' | 'handover';
}

export interface CrashResult {
  mode: InterceptionMode;
  path: 'same-node' | 'cross-node';
  killed: string;
  instances: number;
  threads_per_instance: number[];
  tcp_migrate_req: number;
  kills: number;
  requests_ok: number;
  failed_new_connections: number;
  broken_in_flight: number;
  /** A few failure codes with their phase, to tell what broke. */
  failure_kinds: Record<string, number>;
  /** Each failed new connection's start and end, ms after the kill before it. */
  failed_new_after_kill_ms: Array<[number, number]>;
  /** handover: how the old instances' drains ended (proxy/drain.js's lines in the victim node's instance logs). */
  drain_ends?: Record<string, number>;
  /** Cross-node: requests the client's node proxy sent again because their tunnel failed before the far side answered (proxy/tunnel.js). */
  tunnel_retries: number;
  rps_before_kill: number;
  relisten_ms: number[];
  rss_kb_idle: number[];
  rss_kb_load: number[];
  /** Each kill's time, relative to the load's start (ms). */
  kill_at_ms: number[];
}

interface LoadOutput {
  t0: number;
  ok: number;
  okPer100ms: number[];
  failures: Array<[number, number, string, string]>;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const nowUs = (): number => Number(process.hrtime.bigint() / 1000n);

function rssKb(pid: number): number {
  try {
    return Number(/^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN);
  } catch {
    return NaN;
  }
}

/** Failures split by whether the connection was open at a kill (in flight) or started after one (new). */
export function classifyFailures(failures: ReadonlyArray<readonly [number, number, string, string]>, kills: readonly number[]): { failedNew: number; brokenInFlight: number; kinds: Record<string, number>; newAfterKillMs: Array<[number, number]> } {
  let failedNew = 0;
  let brokenInFlight = 0;
  const kinds: Record<string, number> = {};
  const newAfterKillMs: Array<[number, number]> = [];
  for (const [start, end, phase, code] of failures) {
    const inFlight = kills.some((k) => start <= k && k <= end);
    if (inFlight) brokenInFlight += 1;
    else {
      failedNew += 1;
      // When it started and ended after the last kill before it: tells a race with the kill from a later fault.
      const k = Math.max(...kills.filter((t) => t <= start));
      if (Number.isFinite(k)) newAfterKillMs.push([round((start - k) / 1000, 1), round((end - k) / 1000, 1)]);
    }
    const kind = `${inFlight ? 'in-flight' : 'new'} ${phase} ${code}`;
    kinds[kind] = (kinds[kind] ?? 0) + 1;
  }
  return { failedNew, brokenInFlight, kinds, newAfterKillMs };
}

/**
 * A two-node topology: client pod a on n1, server pods b on n1 (same-node
 * path) and c on n2 (cross-node path: n1's proxy tunnels to n2's proxy on
 * 15003), one cluster IP per path that only the proxies can route.
 */
export class CrashRig {
  private constructor(
    readonly topo: Topology,
    readonly client: TopoPod,
    readonly servers: { same: TopoPod; cross: TopoPod },
    private readonly serverProcs: ChildProcess[],
    private readonly work: string,
    private readonly pipyBin: string,
  ) {}

  static async create(prefix: string, pipyBin: string): Promise<CrashRig> {
    const topo = await Topology.create({ prefix, nodes: 2, podsPerNode: 0 });
    const procs: ChildProcess[] = [];
    try {
      const [n1, n2] = topo.nodes as [TopoNode, TopoNode];
      const client = await topo.addPod(n1, 'a');
      const same = await topo.addPod(n1, 'b');
      const cross = await topo.addPod(n2, 'c');
      for (const p of [same, cross]) {
        const proc = p.exec(process.execPath, ['-e', HTTP_SERVER], { stdio: ['ignore', 'pipe', 'pipe'] });
        procs.push(proc);
        await once(proc.stdout!, 'data');
      }
      return new CrashRig(topo, client, { same, cross }, procs, mkdtempSync(join(tmpdir(), `${prefix}-crash-`)), pipyBin);
    } catch (err) {
      for (const p of procs) p.kill('SIGKILL');
      await topo.destroy();
      throw err;
    }
  }

  async destroy(): Promise<void> {
    for (const p of this.serverProcs) p.kill('SIGKILL');
    await this.topo.destroy();
    rmSync(this.work, { recursive: true, force: true });
  }

  private get pods(): TopoPod[] {
    return [this.client, this.servers.same, this.servers.cross];
  }

  /** Node `node`'s policy: its own pods enrolled, the two services, every node a proxy peer. */
  policy(node: TopoNode): NodePolicy {
    const pod = (p: TopoPod) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, serviceAccount: p.name, cgroup: { qosClass: null, path: p.cgroupPath }, exclusions: noExclusions() });
    const service = (name: string, ip: string, p: TopoPod) => ({
      namespace: NS,
      name,
      clusterIPs: [ip],
      ports: [{ name: 'http', port: PORT, protocol: 'TCP', appProtocol: 'http' }],
      endpoints: [{ ip: p.ip, ports: { http: PORT }, node: p.node.name, pod: { namespace: NS, name: p.name }, serviceAccount: p.name }],
    });
    return NodePolicySchema.parse({
      apiVersion: POLICY_API_VERSION,
      kind: 'NodePolicy',
      mesh: { name: NS, inbound: 'permissive', interceptionMode: 'auto', egress: 'allow', trafficPolicy: 'permissive', exclusions: noExclusions() },
      proxies: this.topo.nodes.map((n) => ({ node: n.name, addresses: [n.gateway, n.underlayIp] })),
      node: { name: node.name, addresses: [node.gateway, node.underlayIp], interceptionMode: null },
      meshPods: this.pods.map((p) => ({ ip: p.ip, namespace: NS, serviceAccount: p.name, node: p.node.name })),
      pods: this.pods.filter((p) => p.node === node).map(pod),
      access: [],
      services: [service('same', SERVICE_IP, this.servers.same), service('cross', CROSS_SERVICE_IP, this.servers.cross)],
      splits: [],
      version: `00000000000000c${node.index}`,
    });
  }

  desired(node: TopoNode): DesiredState {
    return {
      proxy: { address: node.gateway, outboundPort: OUT, inboundPort: IN, cgroupPath: node.proxyCgroup },
      nodeAddresses: [node.gateway, node.underlayIp],
      proxySources: this.topo.nodes.flatMap((n) => [n.gateway, n.underlayIp]),
      mesh: noExclusions(),
      pods: this.pods.filter((p) => p.node === node).map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive' as const, exclusions: noExclusions() })),
    };
  }

  /** One GET through the proxies; true when it answered 200. */
  async probe(ip: string): Promise<boolean> {
    const r = await this.client.run('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code}', '--max-time', '3', `http://${ip}:${PORT}/`]);
    return r.stdout.trim() === '200';
  }

  async run(o: CrashOptions): Promise<CrashResult> {
    const kills = o.kills ?? 2;
    const gapMs = o.gapMs ?? 2000;
    const path = o.path ?? 'same-node';
    const target = path === 'same-node' ? SERVICE_IP : CROSS_SERVICE_IP;
    // The client's node proxy, or (cross-node, --kill server) the far node's, which takes the tunnels on 15003.
    const victimNode = this.topo.nodes[path === 'cross-node' && o.kill === 'server' ? 1 : 0]!;
    const tag = `${o.mode}-${o.instances}-${Date.now()}`;
    const sups = new Map<TopoNode, ProxySupervisor>();
    const dps = [];
    try {
      for (const node of this.topo.nodes) {
        const stateDir = join(this.work, node.name, tag);
        // The sysctl outlives a run in the node namespace: state it for each.
        await node.run('/bin/sh', ['-c', `echo ${o.migrate === false ? 0 : o.instances > 1 ? 1 : 0} > /proc/sys/net/ipv4/tcp_migrate_req`]);
        const sup = nodeProxy(node, this.policy(node), stateDir, { outboundPort: OUT, inboundPort: IN }, {
          pipy: { bin: this.pipyBin, programDir: join(packageRoot(), 'proxy'), instances: o.instances, threads: o.threads ?? 2 },
          drainMs: 3000,
          migrateRequests: o.migrate !== false,
        });
        sups.set(node, sup);
        await sup.start();
        await sup.waitReady(20_000, { all: true });
        const dp = createDataplane(o.mode, { stateDir, bpffsDir: node.bpffsDir, podsCgroup: node.podsCgroup, proxyCgroup: node.proxyCgroup, netns: node.netns, fastPath: true });
        dps.push(dp);
        await dp.apply(this.desired(node));
      }
      if (!(await this.probe(target))) throw new Error(`no answer through the proxy (${o.mode}, ${path}, ${o.instances} instances) before the kill`);
      const sup = sups.get(victimNode)!;
      const pids = (): number[] => sup.status().instances.map((i) => i.pid ?? 0);
      const rssIdle = pids().map(rssKb);
      const client = this.client.exec(process.execPath, ['-e', LOAD_CLIENT, target, String(PORT), String(o.connections ?? 8), '120000'], { stdio: ['pipe', 'pipe', 'pipe'] });
      let text = '';
      client.stdout!.setEncoding('utf8').on('data', (d: string) => (text += d));
      const exited = once(client, 'exit');
      while (!text.includes('started')) {
        if (client.exitCode !== null) throw new Error('load client exited before starting');
        await sleep(5);
      }
      const warmMs = o.warmMs ?? 1000;
      await sleep(warmMs * 0.8);
      const rssLoad = pids().map(rssKb);
      await sleep(warmMs * 0.2);
      const killAt: number[] = [];
      const relisten: number[] = [];
      for (let k = 0; k < kills; k++) {
        if (o.action === 'handover') {
          const t = nowUs();
          killAt.push(t);
          await sup.deliver(renderProxyConfig({ ...this.policy(victimNode), version: `00000000000000h${k + 1}` }, { outboundPort: OUT, inboundPort: IN }));
          relisten.push(round((nowUs() - t) / 1000, 0));
          const rest = gapMs - (nowUs() - t) / 1000;
          if (rest > 0) await sleep(rest);
          continue;
        }
        const slot = k % o.instances;
        const victim = sup.status().instances[slot]!.pid!;
        // The time of the kill itself: a connection is in flight at a kill when it spans this instant.
        const t = nowUs();
        process.kill(victim, 'SIGKILL');
        killAt.push(t);
        const deadline = Date.now() + 10_000;
        for (;;) {
          const st = sup.status().instances[slot]!;
          if ((st.listening && st.pid !== victim) || Date.now() > deadline) break;
          await sleep(20);
        }
        relisten.push(round((nowUs() - t) / 1000, 0));
        const rest = gapMs - (nowUs() - t) / 1000;
        if (rest > 0) await sleep(rest);
      }
      client.stdin!.end();
      await exited;
      if (o.action === 'handover') await waitUntil(() => sup.status().draining === 0, 10_000);
      // The client's node proxy was not killed (--kill server) or its counters are summed across restarts.
      const clientMetrics = (await sups.get(this.topo.nodes[0]!)!.metrics()) ?? '';
      const retries = [...clientMetrics.matchAll(/^fsmn_proxy_tunnel_retries_total\{[^}]*\} (\S+)$/gm)].reduce((a, m) => a + Number(m[1]), 0);
      const load = JSON.parse(text.split('\n').find((l) => l.startsWith('{')) ?? 'null') as LoadOutput | null;
      if (!load) throw new Error(`load client printed no result: ${text.slice(-300)}`);
      const { failedNew, brokenInFlight, kinds, newAfterKillMs } = classifyFailures(load.failures, killAt);
      const firstKillBucket = Math.floor((killAt[0]! - load.t0) / 100_000);
      const before = load.okPer100ms.slice(2, Math.max(3, firstKillBucket));
      return {
        mode: o.mode,
        path,
        killed: path === 'same-node' ? 'client node proxy' : o.kill === 'server' ? 'server node proxy (tunnel end)' : 'client node proxy',
        instances: o.instances,
        threads_per_instance: sup.status().instances.map((i) => i.threads),
        tcp_migrate_req: Number((await victimNode.run('cat', ['/proc/sys/net/ipv4/tcp_migrate_req'])).stdout.trim()),
        kills,
        requests_ok: load.ok,
        failed_new_connections: failedNew,
        broken_in_flight: brokenInFlight,
        failure_kinds: kinds,
        failed_new_after_kill_ms: newAfterKillMs,
        tunnel_retries: retries,
        rps_before_kill: round((before.reduce((a, b) => a + b, 0) / Math.max(1, before.length)) * 10, 0),
        relisten_ms: relisten,
        rss_kb_idle: rssIdle,
        rss_kb_load: rssLoad,
        kill_at_ms: killAt.map((k) => round((k - load.t0) / 1000, 0)),
        ...(o.action === 'handover' ? { drain_ends: drainEnds(join(this.work, victimNode.name, tag)) } : {}),
      };
    } finally {
      for (const dp of dps) {
        await dp.cleanup().catch(() => undefined);
        await dp.close().catch(() => undefined);
      }
      for (const sup of sups.values()) await sup.stop(3000);
    }
  }
}

async function waitUntil(ok: () => boolean, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (!ok() && Date.now() < deadline) await sleep(20);
}

function listFlag(flags: BenchFlags, name: string, dflt: number[]): number[] {
  const v = flags[name];
  if (v === undefined) return dflt;
  const xs = String(v).split(',').map(Number);
  if (typeof v !== 'string' || xs.some((x) => !Number.isInteger(x) || x < 1)) throw new Error(`--${name} must be a comma-separated list of positive integers, got ${JSON.stringify(v)}`);
  return xs;
}

export async function* run(flags: BenchFlags): AsyncGenerator<object> {
  const pipy = pipyBinary();
  if (pipy === undefined) {
    yield { bench: 'proxy-crash', skipped: 'no Pipy binary found (set PIPY_BIN or put pipy on PATH)' };
    return;
  }
  const bpfBuilt = existsSync(join(packageRoot(), 'bpf', 'build', 'connect4.o'));
  const modes = (flags.mode ? [String(flags.mode)] : ['ebpf', 'iptables']).filter((m): m is InterceptionMode => m === 'iptables' || (m === 'ebpf' && bpfBuilt));
  const instances = listFlag(flags, 'instances', [1, DEFAULT_PIPY_INSTANCES]);
  const paths = String(flags.path ?? 'same-node,cross-node').split(',');
  for (const p of paths) if (p !== 'same-node' && p !== 'cross-node') throw new Error(`--path takes same-node and/or cross-node, got ${JSON.stringify(p)}`);
  const kill = flags.kill === 'client' ? 'client' : 'server';
  const action = flags.action === 'handover' ? ('handover' as const) : ('kill' as const);
  if (flags.action !== undefined && flags.action !== 'handover' && flags.action !== 'kill') throw new Error(`--action takes kill or handover, got ${JSON.stringify(flags.action)}`);
  const opts = { action, migrate: flags['no-migrate'] !== true, warmMs: intFlag(flags, 'warm-ms', 1000), kills: intFlag(flags, 'kills', 2), gapMs: intFlag(flags, 'gap-ms', 2000), connections: intFlag(flags, 'connections', 8), threads: intFlag(flags, 'threads', 2) };
  const rig = await CrashRig.create(`fsmbench${process.pid}c`, pipy);
  try {
    for (const mode of modes) {
      for (const path of paths as Array<'same-node' | 'cross-node'>) {
        for (const n of instances) {
          const r = await rig.run({ mode, path, kill, instances: n, ...opts });
          yield { bench: 'proxy-crash', ...r, rss_kb_idle_p50: quantile(r.rss_kb_idle, 0.5), rss_kb_load_p50: quantile(r.rss_kb_load, 0.5) };
        }
      }
    }
  } finally {
    await rig.destroy();
  }
}
