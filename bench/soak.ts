import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Dataplane } from '../src/dataplane/types.js';
import { Topology, type TopoNode, type TopoPod } from '../src/lab/topology.js';
import { cgroupResolver, desiredState } from '../src/policy/desired.js';
import type { NodePolicy } from '../src/policy/schema.js';
import type { ProxyIdentityFiles, ProxyNodeFacts } from '../src/proxy/config.js';
import { pipyBinary } from '../src/proxy/pipy.js';
import { ProxySupervisor } from '../src/proxy/supervisor.js';
import { cgroup2Root } from '../src/util/cgroup.js';
import { benchCa, benchLeaf } from './certs.js';
import { parseWrk, type WrkResult } from './datapath.js';
import { policy } from './mesh.js';
import { selectModes } from './modes.js';
import { intFlag, nodeProxy, round } from './util.js';

/**
 * soak: does the shared node proxy hold its rate and memory under sustained
 * load? The project's Pipy program with the agent's rendered config, started
 * by the agent's ProxySupervisor (same command line, threads, cgroup, netns),
 * behind the real dataplane of each mode, two nodes:
 *
 *   n1: pod a (client, wrk), pod b (server)     n2: pod c (server)
 *   same-node   a -> n1 proxy -> b
 *   cross-node  a -> n1 proxy -> HTTP/2 tunnel -> n2 proxy -> c
 *
 * Traffic: keep-alive (wrk's default) and close (one connection per request,
 * `Connection: close`), --connections wrk connections, back-to-back windows
 * of --window seconds for --duration seconds per case. Fresh proxies per case.
 * One JSON line per window: req/s, proxy CPU ms per 1000 requests (utime +
 * stime of every Pipy process in both nodes' proxy cgroups, split user/sys),
 * proxy RSS, the proxies' open sockets and Pipy's object counts; then one summary line per
 * case: the largest deviation of a window's req/s from the first window, and
 * the RSS growth from the end of the first window to the end of the last.
 * Targets: every window within 10 % of the first; RSS growth < 5 MiB.
 *
 * Tunnels are mutual TLS 1.3 as the mesh runs them (--tunnel mtls, the
 * default: every pod has its certificate and the nodes share a trust bundle),
 * or the plaintext tunnel of a mesh without a trust bundle (--tunnel plaintext).
 *
 * The server keeps idle connections open for ever (--server keep-alive, the
 * default, as Go services do), or is the lab's echo server (--server echo:
 * `connection: close` on every answer, a new upstream connection per request).
 *
 *   npm run bench -- soak [--duration 300] [--window 30] [--connections 8]
 *                         [--mode ebpf|iptables] [--kind keep-alive|close]
 *                         [--path same-node|cross-node] [--server keep-alive|echo]
 *                         [--tunnel mtls|plaintext]
 *                         [--program DIR]   (another copy of proxy/, e.g. the code before a change)
 */

const PORT = 8080;
const OUT = 15001;
const IN = 15003;
const KINDS = ['keep-alive', 'close'] as const;
const PATHS = ['same-node', 'cross-node'] as const;
const SERVERS = ['keep-alive', 'echo'] as const;
const TUNNELS = ['mtls', 'plaintext'] as const;
type Kind = (typeof KINDS)[number];
type Path = (typeof PATHS)[number];
type Server = (typeof SERVERS)[number];
type Tunnel = (typeof TUNNELS)[number];

// A keep-alive HTTP/1.1 responder that, like Go's net/http by default, never
// closes an idle connection itself: how long an idle upstream connection lives
// is then up to the proxy (Node's own default would close it after 5 s).
const KEEPALIVE_SERVER = `
const http = require('node:http');
const server = http.createServer((req, res) => { res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '2' }); res.end('ok'); });
server.keepAliveTimeout = 0;
server.listen(${PORT}, '0.0.0.0', () => console.log('listening'));
`;

function choose<T extends string>(flags: Record<string, string | boolean>, name: string, all: readonly T[]): T[] {
  const v = flags[name];
  if (v === undefined) return [...all];
  if (typeof v !== 'string' || !(all as readonly string[]).includes(v)) throw new Error(`--${name} must be one of ${all.join(', ')}, got ${JSON.stringify(v)}`);
  return [v as T];
}

/** The Pipy processes in a proxy cgroup (every instance the supervisor runs there). */
function proxyPids(cgroup: string): number[] {
  let text = '';
  try {
    text = readFileSync(join(cgroup, 'cgroup.procs'), 'utf8');
  } catch {
    return [];
  }
  return text
    .split('\n')
    .filter(Boolean)
    .map(Number)
    .filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'pipy';
      } catch {
        return false;
      }
    });
}

interface ProcSample {
  user: number;
  sys: number;
  rssKiB: number;
}

/** utime, stime (clock ticks, 100/s) and RSS of one process; undefined once it is gone. */
function sample(pid: number): ProcSample | undefined {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    const rss = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN);
    return { user: Number(f[11]), sys: Number(f[12]), rssKiB: rss };
  } catch {
    return undefined;
  }
}

type Snapshot = Map<number, ProcSample>;

function snapshot(cgroups: string[]): Snapshot {
  const m: Snapshot = new Map();
  for (const cg of cgroups) {
    for (const pid of proxyPids(cg)) {
      const s = sample(pid);
      if (s) m.set(pid, s);
    }
  }
  return m;
}

/** CPU ms (user, sys) spent between two snapshots by processes present in both; RSS of the later one. */
function delta(a: Snapshot, b: Snapshot): { userMs: number; sysMs: number; rssMiB: number } {
  let user = 0;
  let sys = 0;
  let rss = 0;
  for (const [pid, s] of b) {
    rss += s.rssKiB;
    const p = a.get(pid);
    if (!p) continue;
    user += s.user - p.user;
    sys += s.sys - p.sys;
  }
  return { userMs: user * 10, sysMs: sys * 10, rssMiB: rss / 1024 };
}

/** Open sockets of the Pipy processes in a proxy cgroup (listeners, clients, upstreams, tunnels). */
function proxySockets(cgroup: string): number {
  let n = 0;
  for (const pid of proxyPids(cgroup)) {
    try {
      for (const fd of readdirSync(`/proc/${pid}/fd`)) {
        try {
          if (readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('socket:')) n++;
        } catch {
          // closed meanwhile
        }
      }
    } catch {
      // process gone
    }
  }
  return n;
}

/**
 * Totals of Pipy's own object gauges (admin /metrics), for leak spotting.
 * Not pipy_outbound_count: Pipy 1.5 sums worker gauges without resetting a
 * metric that worker 0 lacks, so with every upstream connection on one worker
 * thread it grows by the real count at every scrape (the sockets say so).
 */
function pipyCounts(text: string | undefined): Record<string, number> | undefined {
  if (text === undefined) return undefined;
  const out: Record<string, number> = {};
  for (const name of ['pipy_object_count', 'pipy_pool_allocated_size']) {
    const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text);
    if (m) out[name.replace(/^pipy_/, '')] = Number(m[1]);
  }
  return out;
}

/** fsmn_proxy_tunnels_total summed by result and transport ("accepted/mtls": n): proof of what carried the cross-node traffic. */
function tunnelCounts(text: string | undefined): Record<string, number> {
  const out: Record<string, number> = {};
  for (const m of (text ?? '').matchAll(/^fsmn_proxy_tunnels_total\{([^}]*)\} (\S+)$/gm)) {
    const label = (k: string) => new RegExp(`${k}="([^"]*)"`).exec(m[1]!)?.[1] ?? '';
    const key = `${label('result')}/${label('transport')}`;
    out[key] = (out[key] ?? 0) + Number(m[2]);
  }
  return out;
}

async function wrk(client: TopoPod, url: string, kind: Kind, connections: number, seconds: number): Promise<WrkResult> {
  const args = ['-t', '1', '-c', String(connections), '-d', `${seconds}s`, '--latency', ...(kind === 'close' ? ['-H', 'Connection: close'] : []), url];
  const r = await client.run('wrk', args);
  if (r.code !== 0) throw new Error(`wrk failed (exit ${r.code}): ${r.stderr.trim()}`);
  return parseWrk(r.stdout);
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  child.kill('SIGTERM');
  await exited;
}

function startServer(pod: TopoPod, server: Server): ChildProcess {
  if (server === 'keep-alive') return pod.exec(process.execPath, ['-e', KEEPALIVE_SERVER], { stdio: ['ignore', 'pipe', 'pipe'] });
  const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
  const script = fileURLToPath(new URL(`../src/lab/echo-server${ext}`, import.meta.url));
  return pod.exec(process.execPath, [...process.execArgv, script, 'serve', '--name', pod.name, '--port', String(PORT)], { stdio: ['ignore', 'pipe', 'pipe'] });
}

interface Mesh {
  n1: TopoNode;
  n2: TopoNode;
  a: TopoPod;
  b: TopoPod;
  c: TopoPod;
  policies: Map<TopoNode, NodePolicy>;
  facts: Map<TopoNode, ProxyNodeFacts>;
}

/** The node's proxy as the agent runs it: the supervisor, the program in proxy/, the rendered config. */
async function startProxy(node: TopoNode, pol: NodePolicy, facts: ProxyNodeFacts, stateDir: string, programDir: string | undefined): Promise<ProxySupervisor> {
  const sup = nodeProxy(node, pol, stateDir, facts, {
    drainMs: 1000,
    ...(programDir === undefined ? {} : { pipy: { programDir } }),
  });
  await sup.start();
  await sup.waitReady(15_000);
  return sup;
}

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const opts = { duration: intFlag(flags, 'duration', 300), window: intFlag(flags, 'window', 30), connections: intFlag(flags, 'connections', 8) };
  if (opts.window < 1) throw new Error(`--window must be at least 1 (seconds), got ${opts.window}`);
  if (opts.duration < opts.window) throw new Error(`--duration (${opts.duration}) must be at least one --window (${opts.window})`);
  if (opts.connections < 1) throw new Error(`--connections must be at least 1, got ${opts.connections}`);
  const modes = selectModes(flags.mode);
  const kinds = choose<Kind>(flags, 'kind', KINDS);
  const paths = choose<Path>(flags, 'path', PATHS);
  const [server] = choose<Server>({ server: flags.server ?? 'keep-alive' }, 'server', SERVERS) as [Server];
  const [tunnel] = choose<Tunnel>({ tunnel: flags.tunnel ?? 'mtls' }, 'tunnel', TUNNELS) as [Tunnel];
  const windows = Math.floor(opts.duration / opts.window);
  // Another copy of the Pipy program (e.g. an older one, for a before/after comparison); default proxy/.
  const program = typeof flags.program === 'string' ? flags.program : undefined;
  const base = { bench: 'soak', duration_s: opts.duration, window_s: opts.window, connections: opts.connections, server, tunnel, ...(program === undefined ? {} : { program }) };
  const pipy = pipyBinary();
  if (pipy === undefined) {
    // Not a pass: a soak without the proxy it soaks measured nothing.
    process.exitCode = 2;
    yield { ...base, skipped: 'no Pipy binary found (set PIPY_BIN or put pipy on PATH): nothing measured' };
    return;
  }

  const topo = await Topology.create({ prefix: `fsmbench${process.pid}s`, nodes: 2, podsPerNode: 0 });
  const work = mkdtempSync(join(tmpdir(), 'fsmbench-soak-'));
  const servers: ChildProcess[] = [];
  try {
    const [n1, n2] = topo.nodes as [TopoNode, TopoNode];
    const a = await topo.addPod(n1, 'a');
    const b = await topo.addPod(n1, 'b');
    const c = await topo.addPod(n2, 'c');
    // wrk closes each `Connection: close` connection itself, so TIME_WAIT piles
    // up in the client pod: at ~2k req/s its 14k even ephemeral ports run out
    // in ~20 s and the windows then measure wrk's connect(), not the proxy
    // (seen: 1.9k, 0.2k, 2.1k req/s in successive windows). Let the client
    // reuse TIME_WAIT ports (safe with TCP timestamps); the proxy's node keeps
    // the kernel default, so anything the proxy leaves behind still counts.
    const reuse = await a.run('sysctl', ['-qw', 'net.ipv4.tcp_tw_reuse=1']);
    if (reuse.code !== 0) throw new Error(`sysctl net.ipv4.tcp_tw_reuse=1 in the client pod failed: ${reuse.stderr.trim()}`);
    for (const p of [b, c]) {
      const s = startServer(p, server);
      servers.push(s);
      await once(s.stdout!, 'data');
    }
    const addrs = (n: TopoNode) => [n.underlayIp, n.gateway];
    const ca = tunnel === 'mtls' ? await benchCa() : undefined;
    const facts = async (n: TopoNode, pods: TopoPod[]): Promise<ProxyNodeFacts> => {
      if (ca === undefined) return { outboundPort: OUT, inboundPort: IN };
      const identities: Record<string, ProxyIdentityFiles> = {};
      for (const p of pods) identities[`bench/${p.name}`] = await benchLeaf(ca.signer, 'bench', p.name, join(work, 'ids', n.name));
      return { outboundPort: OUT, inboundPort: IN, trust: ca.trust, identities };
    };
    const mesh: Mesh = {
      n1,
      n2,
      a,
      b,
      c,
      policies: new Map([
        [n1, policy(n1.name, addrs(n1), [a, b], [{ pod: c, node: n2.name, address: n2.underlayIp }])],
        [n2, policy(n2.name, addrs(n2), [c], [{ pod: a, node: n1.name, address: n1.underlayIp }, { pod: b, node: n1.name, address: n1.underlayIp }])],
      ]),
      facts: new Map([
        [n1, await facts(n1, [a, b])],
        [n2, await facts(n2, [c])],
      ]),
    };
    const cgroupPathFor = cgroupResolver(cgroup2Root());

    for (const [mode, impl] of modes) {
      const dps = new Map<TopoNode, Dataplane>();
      try {
        for (const node of [n1, n2]) {
          const dp = impl.create(node, {});
          dps.set(node, dp);
          const facts = { proxy: { address: node.gateway, outboundPort: OUT, inboundPort: IN, cgroupPath: node.proxyCgroup }, nodeAddresses: [node.gateway, node.underlayIp], cgroupPathFor };
          await dp.apply(desiredState(mesh.policies.get(node)!, facts));
        }
        for (const path of paths) {
          for (const kind of kinds) {
            yield* soakCase(mesh, { mode, path, kind, windows, ...opts, program, work, base });
          }
        }
      } finally {
        for (const dp of dps.values()) await dp.cleanup();
      }
    }
  } finally {
    for (const s of servers) await stopChild(s).catch(() => undefined);
    await topo.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}

async function* soakCase(
  mesh: Mesh,
  c: { mode: string; path: Path; kind: Kind; windows: number; window: number; connections: number; program: string | undefined; work: string; base: object },
): AsyncGenerator<object> {
  const name = `${c.mode}/${c.path}/${c.kind}`;
  const dir = mkdtempSync(join(c.work, `${c.mode}-${c.path}-${c.kind}-`));
  const sups: ProxySupervisor[] = [];
  try {
    for (const node of [mesh.n1, mesh.n2]) sups.push(await startProxy(node, mesh.policies.get(node)!, mesh.facts.get(node)!, join(dir, node.name), c.program));
    const cgroups = [mesh.n1.proxyCgroup, mesh.n2.proxyCgroup];
    const url = `http://${c.path === 'same-node' ? mesh.b.ip : mesh.c.ip}:${PORT}/`;
    const idle = delta(new Map(), snapshot(cgroups));
    const rows: Array<{ rps: number; rss: number }> = [];
    const t0 = Date.now();
    for (let w = 0; w < c.windows; w++) {
      const before = snapshot(cgroups);
      const res = await wrk(mesh.a, url, c.kind, c.connections, c.window);
      const after = snapshot(cgroups);
      const d = delta(before, after);
      const counts = await Promise.all(sups.map(async (s) => pipyCounts(await s.metrics().catch(() => undefined))));
      const perK = (ms: number) => (res.requests > 0 ? round((ms / res.requests) * 1000, 1) : null);
      rows.push({ rps: res.rps, rss: d.rssMiB });
      yield {
        ...c.base,
        case: name,
        window: w + 1,
        t_s: round((Date.now() - t0) / 1000, 0),
        rps: res.rps,
        requests: res.requests,
        errors: res.errors,
        p50_us: res.p50_us,
        p99_us: res.p99_us,
        proxy_cpu_ms_per_1k_req: perK(d.userMs + d.sysMs),
        proxy_user_ms_per_1k_req: perK(d.userMs),
        proxy_sys_ms_per_1k_req: perK(d.sysMs),
        proxy_rss_mib: round(d.rssMiB, 1),
        proxy_sockets: { [mesh.n1.name]: proxySockets(mesh.n1.proxyCgroup), [mesh.n2.name]: proxySockets(mesh.n2.proxyCgroup) },
        pipy: { [mesh.n1.name]: counts[0], [mesh.n2.name]: counts[1] },
      };
    }
    const far = await sups[1]!.metrics().catch(() => undefined);
    const first = rows[0]!;
    const maxDev = Math.max(...rows.map((r) => Math.abs(r.rps - first.rps) / first.rps));
    const growth = rows[rows.length - 1]!.rss - first.rss;
    yield {
      ...c.base,
      case: name,
      summary: true,
      windows: rows.length,
      first_rps: first.rps,
      min_rps: Math.min(...rows.map((r) => r.rps)),
      last_rps: rows[rows.length - 1]!.rps,
      max_window_deviation_pct: round(maxDev * 100, 1),
      idle_rss_mib: round(idle.rssMiB, 1),
      rss_first_window_mib: round(first.rss, 1),
      rss_growth_mib: round(growth, 1),
      far_node_tunnels: tunnelCounts(far),
      ok_rate: maxDev <= 0.1,
      ok_rss: growth < 5,
    };
  } finally {
    for (const s of sups) await s.stop(1000).catch(() => undefined);
  }
}
