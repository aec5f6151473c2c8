import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { noExclusions } from '../src/dataplane/types.js';
import { IptablesDataplane } from '../src/dataplane/iptables/index.js';
import { Topology, type TopoNode, type TopoPod } from '../src/lab/topology.js';
import { pipyBinary } from '../src/proxy/pipy.js';
import { renderProxyConfig, type ProxyConfig, type ProxyIdentityFiles, type ProxyNodeFacts } from '../src/proxy/config.js';
import { benchCa, benchLeaf } from './certs.js';
import { parseWrk, type WrkResult } from './datapath.js';
import { cpuTicks, policy, startProxy, stop, type RunningProxy } from './mesh.js';
import { intFlag, round } from './util.js';

/**
 * mtls: cross-node HTTP through both node proxies with the tunnel in
 * plaintext (before issue 17) and in mutual TLS 1.3 (proxy/tls.js), side by
 * side in one run: pod a (n1, iptables interception) -> n1's proxy -> tunnel
 * -> n2's proxy -> pod c. Two load shapes: keep-alive (wrk, N connections)
 * and a new client connection per request (`Connection: close`; the tunnel
 * connection itself stays pooled either way). Rounds alternate the order of
 * the two modes; the summary rows give medians over rounds and the ratios
 * the issue sets targets for (rps >= 0.85x, p99 <= +0.5 ms, keep-alive).
 *   npm run bench -- mtls [--duration 5] [--connections 50] [--rounds 3]
 */

const PORT = 8080;
const OUT = 15001;
const IN = 15003;

const HTTP_SERVER = `
const http = require('node:http');
http.createServer((req, res) => { res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '2' }); res.end('ok'); })
  .listen(${PORT}, '0.0.0.0', () => console.log('listening'));
`;

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

type Mode = 'plaintext' | 'mtls';
type Shape = 'keep-alive' | 'conn-per-request';

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const opts = { duration: intFlag(flags, 'duration', 5), connections: intFlag(flags, 'connections', 50), rounds: intFlag(flags, 'rounds', 3) };
  const base = { bench: 'mtls', ...opts };
  const pipy = pipyBinary();
  if (pipy === undefined) {
    yield { ...base, case: 'pipy', skipped: 'no Pipy binary found (set PIPY_BIN or put pipy on PATH)' };
    return;
  }
  const topo = await Topology.create({ prefix: `fsmbench${process.pid}t`, nodes: 2, podsPerNode: 0 });
  const work = mkdtempSync(join(tmpdir(), 'fsmbench-mtls-'));
  const running: ChildProcess[] = [];
  let dp: IptablesDataplane | undefined;
  try {
    const [n1, n2] = topo.nodes as [TopoNode, TopoNode];
    const a = await topo.addPod(n1, 'a');
    const c = await topo.addPod(n2, 'c');
    // wrk's own TIME_WAIT sockets would exhaust the pod's ports in the connection-per-request runs
    // (after one 5 s run at a few thousand connections/s every connect() stalls): reuse them, as soak does.
    const reuse = await a.run('sysctl', ['-qw', 'net.ipv4.tcp_tw_reuse=1']);
    if (reuse.code !== 0) throw new Error(`sysctl net.ipv4.tcp_tw_reuse=1 in the client pod failed: ${reuse.stderr.trim()}`);
    const server = c.exec(process.execPath, ['-e', HTTP_SERVER], { stdio: ['ignore', 'pipe', 'pipe'] });
    running.push(server);
    await once(server.stdout!, 'data');

    const ca = await benchCa();
    const files: Record<string, Record<string, ProxyIdentityFiles>> = {
      [n1.name]: { 'bench/a': await benchLeaf(ca.signer, 'bench', 'a', join(work, 'ids', n1.name)) },
      [n2.name]: { 'bench/c': await benchLeaf(ca.signer, 'bench', 'c', join(work, 'ids', n2.name)) },
    };
    const nodeAddrs = (n: TopoNode) => [n.underlayIp, n.gateway];
    const configs = (mode: Mode): [ProxyConfig, ProxyConfig] => {
      const facts = (n: TopoNode): ProxyNodeFacts => ({
        outboundPort: OUT,
        inboundPort: IN,
        ...(mode === 'mtls' ? { trust: ca.trust, identities: files[n.name] } : {}),
      });
      return [
        renderProxyConfig(policy(n1.name, nodeAddrs(n1), [a], [{ pod: c, node: n2.name, address: n2.underlayIp }]), facts(n1)),
        renderProxyConfig(policy(n2.name, nodeAddrs(n2), [c], [{ pod: a, node: n1.name, address: n1.underlayIp }]), facts(n2)),
      ];
    };

    dp = new IptablesDataplane({ netns: n1.netns });
    await dp.apply({
      proxy: { address: n1.gateway, outboundPort: OUT, inboundPort: IN, cgroupPath: n1.proxyCgroup },
      nodeAddresses: [n1.gateway, n1.underlayIp],
      proxySources: [n1.gateway, n1.underlayIp, n2.gateway, n2.underlayIp],
      mesh: noExclusions(),
      pods: [{ uid: 'uid-a', namespace: 'bench', name: 'a', ip: a.ip, cgroupPath: a.cgroupPath, inbound: 'permissive', exclusions: noExclusions() }],
    });

    const url = `http://${c.ip}:${PORT}/`;
    const wrk = async (client: TopoPod, shape: Shape): Promise<WrkResult> => {
      const headers = shape === 'conn-per-request' ? ['-H', 'Connection: close'] : [];
      const r = await client.run('wrk', ['-t', '1', '-c', String(opts.connections), '-d', `${opts.duration}s`, '--latency', ...headers, url]);
      if (r.code !== 0) throw new Error(`wrk failed (exit ${r.code}): ${r.stderr.trim()}`);
      return parseWrk(r.stdout);
    };
    const rows = new Map<string, Array<WrkResult & { proxy_cpu_pct: number }>>();
    for (let round_ = 1; round_ <= opts.rounds; round_++) {
      const order: Mode[] = round_ % 2 ? ['plaintext', 'mtls'] : ['mtls', 'plaintext'];
      for (const mode of order) {
        const [c1, c2] = configs(mode);
        const proxies: RunningProxy[] = [];
        try {
          proxies.push(await startProxy({ name: n1.name, exec: n1.exec.bind(n1), run: n1.run.bind(n1) }, pipy, join(work, `${n1.name}-${mode}`), c1, true));
          proxies.push(await startProxy({ name: n2.name, exec: n2.exec.bind(n2), run: n2.run.bind(n2) }, pipy, join(work, `${n2.name}-${mode}`), c2, true));
          running.push(...proxies.map((p) => p.child));
          // Warm up: the tunnel connection (and its handshake) exists before the measurement.
          await a.run('curl', ['-sf', '-o', '/dev/null', url]);
          for (const shape of ['keep-alive', 'conn-per-request'] as const) {
            const pids = proxies.map((p) => p.child.pid!);
            const t0 = Date.now();
            const before = pids.map(cpuTicks);
            const res = await wrk(a, shape);
            const seconds = (Date.now() - t0) / 1000;
            const cpu = round(pids.reduce((sum, pid, i) => sum + (cpuTicks(pid) - before[i]!), 0) / seconds, 1); // ticks/s = % of one core
            const row = { ...res, proxy_cpu_pct: cpu };
            const key = `${shape}/${mode}`;
            rows.set(key, [...(rows.get(key) ?? []), row]);
            yield { ...base, case: `cross-node/${key}`, round: round_, ...row };
          }
        } finally {
          for (const p of proxies) await stop(p.child);
        }
      }
    }
    for (const shape of ['keep-alive', 'conn-per-request'] as const) {
      const m = (mode: Mode, f: 'rps' | 'p99_us' | 'p50_us' | 'proxy_cpu_pct') => median((rows.get(`${shape}/${mode}`) ?? []).map((r) => r[f]));
      yield {
        ...base,
        case: `cross-node/${shape}/summary`,
        plaintext_rps: m('plaintext', 'rps'),
        mtls_rps: m('mtls', 'rps'),
        rps_ratio: round(m('mtls', 'rps') / m('plaintext', 'rps'), 3),
        plaintext_p50_us: m('plaintext', 'p50_us'),
        mtls_p50_us: m('mtls', 'p50_us'),
        plaintext_p99_us: m('plaintext', 'p99_us'),
        mtls_p99_us: m('mtls', 'p99_us'),
        p99_delta_ms: round((m('mtls', 'p99_us') - m('plaintext', 'p99_us')) / 1000, 3),
        plaintext_proxy_cpu_pct: m('plaintext', 'proxy_cpu_pct'),
        mtls_proxy_cpu_pct: m('mtls', 'proxy_cpu_pct'),
        errors: [...(rows.get(`${shape}/plaintext`) ?? []), ...(rows.get(`${shape}/mtls`) ?? [])].reduce((s, r) => s + r.errors, 0),
        ...(shape === 'keep-alive' ? { target: 'rps_ratio >= 0.85 and p99_delta_ms <= 0.5' } : {}),
      };
    }
  } finally {
    await dp?.cleanup().catch(() => undefined);
    for (const ch of running) await stop(ch).catch(() => undefined);
    await topo.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}
