import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { noExclusions } from '../src/dataplane/types.js';
import { IptablesDataplane } from '../src/dataplane/iptables/index.js';
import { pipyBinary } from '../src/proxy/pipy.js';
import { packageRoot } from '../src/util/paths.js';
import { Topology, type TopoNode, type TopoPod } from '../src/lab/topology.js';
import { NodePolicySchema, POLICY_API_VERSION, type NodePolicy } from '../src/policy/schema.js';
import { renderProxyConfig, type ProxyConfig } from '../src/proxy/config.js';
import { parseWrk, type WrkResult } from './datapath.js';
import { intFlag, round } from './util.js';

/**
 * mesh (also `datapath --proxy pipy`): HTTP keep-alive requests through the
 * project's Pipy program (proxy/), beside the direct path, in one run:
 *
 *   direct/{same-node,cross-node}   pod a -> pod b (same node) / pod c (other node), no mesh;
 *   shared/{same-node,cross-node}   a's node proxy (iptables interception) -> b, or
 *                                   -> HTTP/2 tunnel -> c's node proxy -> c;
 *   sidecar/{same-node,cross-node}  one Pipy per pod (same program): a's sidecar in a's
 *                                   netns (OUTPUT REDIRECT) -> tunnel -> the server pod's
 *                                   sidecar in its netns -> the server.
 *
 * Each row: wrk req/s, p50/p99, and the proxies' CPU (percent of one core over
 * the run) and RSS after it. Permissive mesh (the data path, not the policy,
 * is measured). Every process shares the machine's cores: compare rows of one run.
 *   npm run bench -- mesh [--duration 10] [--connections 50] [--threads 1]
 */

const PORT = 8080;
const OUT = 15001;
const IN = 15003;
const NS = 'bench';

// A keep-alive HTTP/1.1 responder: 200 "ok" to every request.
const HTTP_SERVER = `
const http = require('node:http');
http.createServer((req, res) => { res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '2' }); res.end('ok'); })
  .listen(${PORT}, '0.0.0.0', () => console.log('listening'));
`;

/** The project's Pipy program, from bench/ (sources) or dist/bench/ (built) alike. */
const proxyProgramDir = (): string => join(packageRoot(), 'proxy');

interface Place {
  /** Proxy name (node or pod) -> where its process runs. */
  name: string;
  exec: TopoNode['exec'];
  run: TopoNode['run'];
}

/** A permissive NodePolicy: `local` pods are served here, other pods reach through `tunnelTo`'s address. */
export function policy(nodeName: string, addresses: string[], local: TopoPod[], remote: Array<{ pod: TopoPod; node: string; address: string }>): NodePolicy {
  const ep = (p: TopoPod, node: string) => ({ ip: p.ip, ports: { http: PORT }, node, pod: { namespace: NS, name: p.name }, serviceAccount: p.name });
  const body = {
    apiVersion: POLICY_API_VERSION,
    kind: 'NodePolicy',
    mesh: { name: 'bench', inbound: 'permissive', interceptionMode: 'iptables', egress: 'allow', trafficPolicy: 'permissive', exclusions: noExclusions() },
    proxies: [{ node: nodeName, addresses }, ...remote.map((r) => ({ node: r.node, addresses: [r.address] }))],
    node: { name: nodeName, addresses, interceptionMode: null },
    meshPods: [...local.map((p) => ({ ip: p.ip, namespace: NS, serviceAccount: p.name, node: nodeName })), ...remote.map((r) => ({ ip: r.pod.ip, namespace: NS, serviceAccount: r.pod.name, node: r.node }))],
    pods: local.map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, serviceAccount: p.name, cgroup: { qosClass: null, path: p.cgroupPath }, exclusions: noExclusions() })),
    access: [],
    services: [
      {
        namespace: NS,
        name: 'server',
        clusterIPs: ['10.96.9.9'],
        ports: [{ name: 'http', port: PORT, protocol: 'TCP' as const, appProtocol: 'http' }],
        endpoints: [...local.map((p) => ep(p, nodeName)), ...remote.map((r) => ep(r.pod, r.node))],
      },
    ],
    splits: [],
    version: '0000000000000000',
  };
  return NodePolicySchema.parse(body);
}

interface RunningProxy {
  name: string;
  child: ChildProcess;
}

async function startProxy(place: Place, pipy: string, dir: string, config: ProxyConfig, inProxyCgroup: boolean): Promise<RunningProxy> {
  mkdirSync(dir, { recursive: true });
  const src = proxyProgramDir();
  for (const f of readdirSync(src)) if (f.endsWith('.js')) copyFileSync(join(src, f), join(dir, f));
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config));
  const child = place.exec(pipy, ['--log-level=warn', join(dir, 'main.js')], { inProxyCgroup, stdio: ['ignore', 'ignore', 'pipe'] });
  for (let i = 0; i < 100; i++) {
    const ss = await place.run('ss', ['-Hltn', `sport = :${IN}`]);
    if (ss.stdout.trim() !== '') return { name: place.name, child };
    if (child.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  await stop(child);
  throw new Error(`pipy for ${place.name} did not listen on ${IN}`);
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  child.kill('SIGTERM');
  await exited;
}

function cpuTicks(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return Number(f[11]) + Number(f[12]); // utime + stime (fields 14, 15)
}

function rssKiB(pid: number): number {
  return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN);
}

async function wrk(client: TopoPod, url: string, flags: { duration: number; connections: number; threads: number }): Promise<WrkResult> {
  const r = await client.run('wrk', ['-t', String(flags.threads), '-c', String(flags.connections), '-d', `${flags.duration}s`, '--latency', url]);
  if (r.code !== 0) throw new Error(`wrk failed (exit ${r.code}): ${r.stderr.trim()}`);
  return parseWrk(r.stdout);
}

/** wrk plus the proxies' CPU (% of one core) and RSS, as one row. */
async function measure(client: TopoPod, url: string, proxies: RunningProxy[], flags: { duration: number; connections: number; threads: number }): Promise<Record<string, unknown>> {
  const pids = proxies.map((p) => p.child.pid!);
  const t0 = Date.now();
  const before = pids.map(cpuTicks);
  const res = await wrk(client, url, flags);
  const seconds = (Date.now() - t0) / 1000;
  const cpu = pids.map((pid, i) => round(((cpuTicks(pid) - before[i]!) / 100 / seconds) * 100, 1));
  const rss = pids.map((pid) => round(rssKiB(pid) / 1024, 1));
  return {
    ...res,
    proxies: proxies.length,
    proxy_cpu_pct: round(cpu.reduce((a, b) => a + b, 0), 1),
    proxy_rss_mb: round(rss.reduce((a, b) => a + b, 0), 1),
    per_proxy: Object.fromEntries(proxies.map((p, i) => [p.name, { cpu_pct: cpu[i], rss_mb: rss[i] }])),
  };
}

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const opts = { duration: intFlag(flags, 'duration', 10), connections: intFlag(flags, 'connections', 50), threads: intFlag(flags, 'threads', 1) };
  const base = { bench: 'mesh', ...opts };
  const pipy = pipyBinary();
  if (pipy === undefined) {
    yield { ...base, case: 'pipy', skipped: 'no Pipy binary found (set PIPY_BIN or put pipy on PATH)' };
    return;
  }
  const topo = await Topology.create({ prefix: `fsmbench${process.pid}m`, nodes: 2, podsPerNode: 0 });
  const work = mkdtempSync(join(tmpdir(), 'fsmbench-mesh-'));
  const running: ChildProcess[] = [];
  try {
    const [n1, n2] = topo.nodes as [TopoNode, TopoNode];
    const a = await topo.addPod(n1, 'a');
    const b = await topo.addPod(n1, 'b');
    const c = await topo.addPod(n2, 'c');
    for (const p of [b, c]) {
      const server = p.exec(process.execPath, ['-e', HTTP_SERVER], { stdio: ['ignore', 'pipe', 'pipe'] });
      running.push(server);
      await once(server.stdout!, 'data');
    }
    const same = `http://${b.ip}:${PORT}/`;
    const cross = `http://${c.ip}:${PORT}/`;
    const directSame = await wrk(a, same, opts);
    yield { ...base, case: 'direct/same-node', ...directSame };
    const directCross = await wrk(a, cross, opts);
    yield { ...base, case: 'direct/cross-node', ...directCross };

    // Shared: one proxy per node, iptables interception of pod a.
    const nodeAddrs = (n: TopoNode) => [n.underlayIp, n.gateway];
    const cfg1 = renderProxyConfig(policy(n1.name, nodeAddrs(n1), [a, b], [{ pod: c, node: n2.name, address: n2.underlayIp }]), { outboundPort: OUT, inboundPort: IN });
    const cfg2 = renderProxyConfig(policy(n2.name, nodeAddrs(n2), [c], [{ pod: a, node: n1.name, address: n1.underlayIp }]), { outboundPort: OUT, inboundPort: IN });
    const p1 = await startProxy({ name: n1.name, exec: n1.exec.bind(n1), run: n1.run.bind(n1) }, pipy, join(work, n1.name), cfg1, true);
    const p2 = await startProxy({ name: n2.name, exec: n2.exec.bind(n2), run: n2.run.bind(n2) }, pipy, join(work, n2.name), cfg2, true);
    running.push(p1.child, p2.child);
    const dp = new IptablesDataplane({ netns: n1.netns });
    try {
      await dp.apply({
        proxy: { address: n1.gateway, outboundPort: OUT, inboundPort: IN, cgroupPath: n1.proxyCgroup },
        nodeAddresses: [n1.gateway, n1.underlayIp],
        proxySources: [n1.gateway, n1.underlayIp, n2.gateway, n2.underlayIp],
        mesh: noExclusions(),
        pods: [{ uid: 'uid-a', namespace: NS, name: 'a', ip: a.ip, cgroupPath: a.cgroupPath, inbound: 'permissive', exclusions: noExclusions() }],
      });
      const s = await measure(a, same, [p1], opts);
      yield { ...base, case: 'shared/same-node', ...s, rps_vs_direct: round((s.rps as number) / directSame.rps, 3) };
      const x = await measure(a, cross, [p1, p2], opts);
      yield { ...base, case: 'shared/cross-node', ...x, rps_vs_direct: round((x.rps as number) / directCross.rps, 3) };
    } finally {
      await dp.cleanup();
      await stop(p1.child);
      await stop(p2.child);
    }

    // Sidecars: one proxy per pod, in the pod's netns; the client's sidecar
    // captures its outbound port 8080 (its own tunnel goes to 15003, never
    // re-captured), the server's sidecar is the far end of the tunnel.
    await a.run('iptables', ['-t', 'nat', '-A', 'OUTPUT', '-p', 'tcp', '--dport', String(PORT), '-j', 'REDIRECT', '--to-ports', String(OUT)]);
    for (const server of [b, c]) {
      const sa = renderProxyConfig(policy(`sidecar-${a.name}`, [a.ip], [a], [{ pod: server, node: `sidecar-${server.name}`, address: server.ip }]), { outboundPort: OUT, inboundPort: IN });
      const ss = renderProxyConfig(policy(`sidecar-${server.name}`, [server.ip], [server], [{ pod: a, node: `sidecar-${a.name}`, address: a.ip }]), { outboundPort: OUT, inboundPort: IN });
      const pa = await startProxy({ name: `sidecar-${a.name}`, exec: a.exec.bind(a), run: a.run.bind(a) }, pipy, join(work, `sc-${a.name}-${server.name}`), sa, false);
      const ps = await startProxy({ name: `sidecar-${server.name}`, exec: server.exec.bind(server), run: server.run.bind(server) }, pipy, join(work, `sc-${server.name}`), ss, false);
      running.push(pa.child, ps.child);
      try {
        const direct = server === b ? directSame : directCross;
        const r = await measure(a, `http://${server.ip}:${PORT}/`, [pa, ps], opts);
        yield { ...base, case: `sidecar/${server === b ? 'same-node' : 'cross-node'}`, ...r, rps_vs_direct: round((r.rps as number) / direct.rps, 3) };
      } finally {
        await stop(pa.child);
        await stop(ps.child);
      }
    }
  } finally {
    for (const c of running) await stop(c).catch(() => undefined);
    await topo.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}
