import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { Agent } from '../src/agent/agent.js';
import type { AgentConfig } from '../src/agent/config.js';
import { probe } from '../src/agent/probe.js';
import { createDataplane, type DataplaneSite } from '../src/dataplane/index.js';
import { noExclusions, type DesiredState } from '../src/dataplane/types.js';
import { errorMessage } from '../src/errors.js';
import { nodeAgentConfig } from '../src/lab/node-agent.js';
import { Topology } from '../src/lab/topology.js';
import type { NodePolicy } from '../src/policy/schema.js';
import { BpfMap } from '../src/ebpf/index.js';
import { syscallValueSize } from '../src/ebpf/map.js';
import { cgroupId, createCgroup } from '../src/util/cgroup.js';
import { run as exec } from '../src/util/exec.js';
import { intFlag, quantile, round } from './util.js';

/**
 * agent-footprint: what the agent costs a node. A real agent process (the
 * Agent class with the eBPF dataplane, in a child process of its own so its
 * RSS and CPU are its own) on a one-node topology, its policy fixed in
 * memory (no controller), N pod cgroups with made-up IPs (the eBPF dataplane
 * needs only cgroups), no proxy process (the proxy is another process; the
 * agent is told it listens). Two cases, `idle` (0 pods) then `pods` (N),
 * each a fresh agent process, each measured the same way:
 *   rss_enrolled   RSS once the agent reports the pods enrolled and ready;
 *   /metrics       10 cold scrapes (1 s apart: the reading cache expired, so
 *                  map walks included), then 100 warm ones back to back;
 *   rss            RSS after those 110 scrapes (and heap, exposition size);
 *   cpu            CPU over --seconds with nobody asking anything (the
 *                  reconcile loop's periodic full sync may fall inside);
 *                  rss_after is RSS at its end.
 * Before measuring, every pod gets counters in fsm_stats (written by the
 * bench as the connect programs would), so every pod has its series.
 * Targets (issue 9): RSS < 80 MiB with 1000 pods, idle CPU < 0.5 % of a core.
 *   npm run bench -- agent-footprint [--pods 1000] [--seconds 60] [--node-flags='...' (default: the DaemonSet's)]
 */

interface ChildSpec {
  config: AgentConfig;
  pods: Array<{ uid: string; namespace: string; name: string; ip: string; cgroupPath: string }>;
}

/** The child: one agent, ready line on stdout, SIGTERM stops it (dataplane left in place, as in production). */
async function agentChild(spec: ChildSpec): Promise<void> {
  const { config, pods } = spec;
  const policy = {
    version: `bench-${pods.length}`,
    node: { name: config.node, addresses: config.nodeAddresses, interceptionMode: 'ebpf' },
    mesh: { interceptionMode: 'ebpf' },
    pods: pods.map(({ uid, namespace, name, ip }) => ({ uid, namespace, name, ip })),
  } as unknown as NodePolicy; // only the fields the agent reads; render below does the rest
  const receivedAt = Date.now();
  const render = (): DesiredState => ({
    proxy: { address: config.proxyAddress, outboundPort: config.outboundPort, inboundPort: config.inboundPort, cgroupPath: config.proxyCgroup },
    nodeAddresses: config.nodeAddresses,
    proxySources: config.nodeAddresses,
    mesh: noExclusions(),
    pods: pods.map((p) => ({ ...p, inbound: 'permissive', exclusions: noExclusions() })),
  });
  const site: DataplaneSite = { stateDir: config.stateDir, bpffsDir: config.bpffsDir, podsCgroup: config.podsCgroup, proxyCgroup: config.proxyCgroup };
  const agent = new Agent(config, {
    policy: { current: () => ({ policy, receivedAt }), onChange: () => undefined, start: () => undefined, stop: async () => undefined, fetchErrors: () => 0 },
    probe: () => probe(config.netns ? { netns: config.netns } : {}),
    dataplane: (mode) => createDataplane(mode, site),
    render,
    proxy: { start: () => undefined, detach: () => undefined, status: () => ({ kind: 'none', up: true, listening: true, restarts: 0 }), ready: () => true },
  });
  await agent.start();
  agent.requestSync('bench');
  process.stdout.write('started\n');
  await new Promise<void>((resolve) => process.once('SIGTERM', () => resolve()));
  await agent.stop();
  process.exit(0);
}

const freePort = async (): Promise<number> => {
  const s = createServer().listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as { port: number }).port;
  s.close();
  return port;
};

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function rssBytes(pid: number): { rss: number; hwm: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN) * 1024;
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
}

/** utime + stime of a process in clock ticks (/proc/PID/stat fields 14 and 15). */
function cpuTicks(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]);
}

const MiB = 1024 * 1024;

/**
 * Counters for every pod in fsm_stats, as the connect programs would leave
 * them after each pod connected: so /metrics carries one redirected,
 * excluded and refused series per pod, the worst case for its size and time.
 */
function fillStats(bpffsDir: string, pods: ChildSpec['pods']): void {
  using map = BpfMap.fromPin(join(bpffsDir, 'maps', 'fsm_stats'));
  const value = Buffer.alloc(syscallValueSize(map.type, map.valueSize));
  for (const [i, p] of pods.entries()) {
    const key = Buffer.alloc(8);
    key.writeBigUInt64LE(cgroupId(p.cgroupPath));
    value.writeBigUInt64LE(BigInt(i + 1), 0); // CPU 0: redirected
    map.update(key, value);
  }
}

async function timedGet(url: string): Promise<{ ms: number; bytes: number; status: number }> {
  const t = performance.now();
  const res = await fetch(url);
  const body = await res.text();
  return { ms: performance.now() - t, bytes: body.length, status: res.status };
}

async function startAgent(spec: ChildSpec, specFile: string, nodeFlags: string[]): Promise<ChildProcess> {
  const self = fileURLToPath(import.meta.url);
  writeFileSync(specFile, JSON.stringify(spec));
  const child = spawn(process.execPath, [...process.execArgv, ...nodeFlags, self, '--agent-child', specFile], { stdio: ['ignore', 'pipe', 'inherit'], env: { MALLOC_ARENA_MAX: nodeFlags.length ? '2' : '', ...process.env, FSMN_LOG_LEVEL: 'warn' } });
  let out = '';
  child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  const deadline = Date.now() + 60_000;
  while (!out.includes('started\n')) {
    if (child.exitCode !== null) throw new Error(`agent exited with ${child.exitCode} before starting`);
    if (Date.now() > deadline) throw new Error('agent did not start within 60 s');
    await sleep(50);
  }
  return child;
}

async function stopAgent(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  await once(child, 'exit');
}

/** Wait until /readyz says ready and the agent reports `pods` enrolled. */
async function waitEnrolled(api: string, pods: number): Promise<void> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const text = await fetch(`${api}/metrics`).then((r) => r.text(), () => '');
    if (new RegExp(`^fsm_node_enrolled_pods ${pods}$`, 'm').test(text) && (await fetch(`${api}/readyz`)).status === 200) return;
    if (Date.now() > deadline) throw new Error(`agent did not enrol ${pods} pods within 60 s`);
    await sleep(200);
  }
}

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const n = intFlag(flags, 'pods', 1000);
  const seconds = intFlag(flags, 'seconds', 60);
  if (n < 1 || n > 8192) throw new Error(`--pods must be from 1 to 8192, got ${n}`);
  if (seconds < 1) throw new Error(`--seconds must be at least 1, got ${seconds}`);
  // Node/V8 flags for the agent process; the default is what the DaemonSet sets (NODE_OPTIONS in
  // daemonset/base/agent.yaml, with MALLOC_ARENA_MAX=2); --node-flags= (empty) measures plain Node.
  const nodeFlags = (typeof flags['node-flags'] === 'string' ? flags['node-flags'] : '--max-semi-space-size=1').split(' ').filter(Boolean);
  const ticksPerSecond = Number((await exec('getconf', ['CLK_TCK'])).stdout.trim());
  const work = mkdtempSync(join(tmpdir(), 'fsmbench-footprint-'));
  const topo = await Topology.create({ prefix: `fsmbench${process.pid}f`, nodes: 1 });
  const node = topo.nodes[0]!;
  const site: DataplaneSite = { stateDir: join(work, 'state'), bpffsDir: node.bpffsDir, podsCgroup: node.podsCgroup, proxyCgroup: node.proxyCgroup };
  try {
    const pods: ChildSpec['pods'] = [];
    for (let i = 0; i < n; i++) {
      const cgroupPath = join(node.podsCgroup, `p${i}`);
      await createCgroup(cgroupPath);
      pods.push({ uid: `bench-${i}`, namespace: 'bench', name: `p${i}`, ip: `10.200.${i >> 8}.${i & 255}`, cgroupPath });
    }
    for (const count of [0, n]) {
      const port = await freePort();
      const api = `http://127.0.0.1:${port}`;
      const config = nodeAgentConfig(node, site.stateDir, { mode: 'ebpf', controller: 'https://127.0.0.1:1', bpffsDir: site.bpffsDir, podsCgroup: site.podsCgroup, proxyCgroup: site.proxyCgroup, listen: `127.0.0.1:${port}` });
      const child = await startAgent({ config, pods: pods.slice(0, count) }, join(work, `agent-${count}.json`), nodeFlags);
      try {
        await waitEnrolled(api, count);
        fillStats(site.bpffsDir, pods.slice(0, count));
        const enrolled = rssBytes(child.pid!);
        const base = { bench: 'agent-footprint', case: count === 0 ? 'idle' : 'pods', pods: count, node_flags: nodeFlags.join(' ') };
        // Cold: the 1 s reading cache has expired, so each scrape walks the maps.
        const cold: number[] = [];
        let bytes = 0;
        for (let i = 0; i < 10; i++) {
          await sleep(1100);
          const r = await timedGet(`${api}/metrics`);
          if (r.status !== 200) throw new Error(`/metrics answered ${r.status}`);
          cold.push(r.ms);
          bytes = r.bytes;
        }
        const warm: number[] = [];
        for (let i = 0; i < 100; i++) warm.push((await timedGet(`${api}/metrics`)).ms);
        const mem = rssBytes(child.pid!);
        const text = await (await fetch(`${api}/metrics`)).text();
        const gauge = (name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1] ?? NaN);
        yield {
          ...base,
          rss_enrolled_mib: round(enrolled.rss / MiB, 1),
          rss_mib: round(mem.rss / MiB, 1),
          rss_peak_mib: round(mem.hwm / MiB, 1),
          heap_used_mib: round(gauge('fsm_node_process_nodejs_heap_size_used_bytes') / MiB, 1),
          heap_total_mib: round(gauge('fsm_node_process_nodejs_heap_size_total_bytes') / MiB, 1),
          metrics_bytes: bytes,
        };
        yield { ...base, metric: '/metrics', cold_p50_ms: round(quantile(cold, 0.5), 2), cold_max_ms: round(Math.max(...cold), 2), warm_p50_ms: round(quantile(warm, 0.5), 2), warm_p99_ms: round(quantile(warm, 0.99), 2) };
        // CPU while nobody asks anything (the reconcile loop's periodic full sync may fall inside).
        const t0 = cpuTicks(child.pid!);
        const w0 = performance.now();
        await sleep(seconds * 1000);
        const cpu = (cpuTicks(child.pid!) - t0) / ticksPerSecond / ((performance.now() - w0) / 1000);
        yield { ...base, idle_seconds: seconds, cpu_percent_of_core: round(cpu * 100, 3), rss_after_mib: round(rssBytes(child.pid!).rss / MiB, 1) };
      } finally {
        await stopAgent(child);
      }
    }
  } finally {
    // The agent leaves its dataplane in place when stopped (traffic keeps flowing); the bench removes it.
    await createDataplane('ebpf', site)
      .cleanup()
      .catch((err: unknown) => process.stderr.write(`agent-footprint: cleanup: ${errorMessage(err)}\n`));
    await topo.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}

if (process.argv[2] === '--agent-child') {
  agentChild(JSON.parse(readFileSync(process.argv[3]!, 'utf8')) as ChildSpec).catch((err: unknown) => {
    process.stderr.write(`agent-footprint child: ${errorMessage(err)}\n`);
    process.exit(2);
  });
}
