import type { ChildProcess } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { CONTROLLER_NAME } from '../src/gateway/objects.js';
import { Topology, type TopoNode } from '../src/lab/topology.js';
import { PolicyCompiler } from '../src/policy/compiler.js';
import { LABEL_MONITORED_BY } from '../src/policy/fsm.js';
import type { Kind } from '../src/policy/objects.js';
import { pipyBinary } from '../src/proxy/pipy.js';
import { renderProxyConfig } from '../src/proxy/config.js';
import { parseWrk, type WrkResult } from './datapath.js';
import { startProxy, stop } from './mesh.js';
import { cgroupCpuUs, intFlag, round } from './util.js';

/**
 * ingress: requests/s and latency from a client outside the mesh (the
 * underlay namespace, as a device at an edge site) to a pod, through the
 * node proxy's Gateway listener against straight to the pod, side by side in
 * one run: HTTP and HTTPS (TLS terminated by the gateway; the direct case
 * terminates in the pod's own server with the same certificate), each with
 * keep-alive connections and with a new connection per request
 * (`Connection: close`). A third path, `pipy`, is the floor of any Pipy hop:
 * a bare Pipy HTTP proxy (demuxHTTP, muxHTTP, connect; TLS terminated the same
 * way) in the node beside the node proxy, so the gateway's own cost (routing,
 * filters, access, metrics) shows apart from the cost of a proxy hop as such.
 *
 * Every row has the CPU time per request of each part, from cgroup v2
 * cpu.stat of its cgroup: the client (wrk, the underlay's cgroup), the
 * server (the pod's cgroup), the node proxy (its proxy cgroup) and the bare
 * Pipy (the node's system cgroup). On a machine where the parts share the
 * cores, requests/s follow the CPU a request costs in total, so the summary
 * also gives `cpu_ratio` = direct total / gateway total: the gateway/direct
 * ratio the CPU cost alone predicts, to set beside the measured one. Rounds
 * alternate the order; the summary rows give medians over rounds. Every row
 * carries the machine's load average (a shared machine: compare ratios, not
 * absolutes).
 *   npm run bench -- ingress [--duration 5] [--connections 20] [--rounds 2]
 */

const POD_PORT = 8080;
const POD_TLS_PORT = 8443;
const GW_PORT = 18080;
const GW_TLS_PORT = 18443;
const BARE_PORT = 19080;
const BARE_TLS_PORT = 19443;

/** The bare Pipy HTTP proxy: the least any Pipy hop costs (pooled upstream connections, as the gateway keeps them). */
const BARE_PIPY = (pod: string, cert: string, key: string): string => `
var tls = { cert: new crypto.CertificateChain(os.readFile('${cert}')), key: new crypto.PrivateKey(os.readFile('${key}')) }
var proxy = $=>$.demuxHTTP().to($=>$.muxHTTP(() => 'pod', { maxIdle: 4 }).to($=>$.connect('${pod}:${POD_PORT}')))
pipy.listen(${BARE_PORT}, proxy)
pipy.listen(${BARE_TLS_PORT}, $=>$.acceptTLS({ certificate: () => tls }).to(proxy))
`;

const SERVER = `
const http = require('node:http');
const https = require('node:https');
const fs = require('node:fs');
const [cert, key] = process.argv.slice(1);
const h = (req, res) => { res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '2' }); res.end('ok'); };
http.createServer(h).listen(${POD_PORT}, '0.0.0.0', () =>
  https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) }, h).listen(${POD_TLS_PORT}, '0.0.0.0', () => console.log('listening')));
`;

type Path = 'direct' | 'gateway' | 'pipy';
const PATHS: Path[] = ['direct', 'gateway', 'pipy'];
type Shape = 'keep-alive' | 'conn-per-request';
type Scheme = 'http' | 'https';

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

function certificate(dir: string): { cert: string; key: string } {
  const cert = join(dir, 'cert.pem');
  const key = join(dir, 'key.pem');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', cert, '-subj', '/CN=bench.example', '-addext', 'subjectAltName=DNS:bench.example', '-days', '1'], { stdio: 'ignore' });
  return { cert, key };
}

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const opts = { duration: intFlag(flags, 'duration', 5), connections: intFlag(flags, 'connections', 20), rounds: intFlag(flags, 'rounds', 2) };
  const base = { bench: 'ingress', ...opts };
  const pipy = pipyBinary();
  if (pipy === undefined) {
    yield { ...base, case: 'pipy', skipped: 'no Pipy binary found (set PIPY_BIN or put pipy on PATH)' };
    return;
  }
  const topo = await Topology.create({ prefix: `fsmbench${process.pid}g`, nodes: 1, podsPerNode: 0 });
  const work = mkdtempSync(join(tmpdir(), 'fsmbench-ingress-'));
  const running: ChildProcess[] = [];
  try {
    const [node] = topo.nodes as [TopoNode];
    const pod = await topo.addPod(node, 'web');
    const tls = certificate(work);
    const server = pod.exec(process.execPath, ['-e', SERVER, tls.cert, tls.key], { stdio: ['ignore', 'pipe', 'pipe'] });
    running.push(server);
    await once(server.stdout!, 'data');

    const b64 = (f: string) => Buffer.from(readFileSync(f)).toString('base64');
    const objs = [
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'bench', labels: { [LABEL_MONITORED_BY]: 'fsm' } } },
      { apiVersion: 'v1', kind: 'Node', metadata: { name: node.name }, status: { addresses: [{ type: 'InternalIP', address: node.underlayIp }] } },
      { apiVersion: 'v1', kind: 'Pod', metadata: { name: 'web', namespace: 'bench', labels: { app: 'web' } }, spec: { nodeName: node.name, serviceAccountName: 'web', containers: [{ ports: [{ name: 'http', containerPort: POD_PORT }] }] }, status: { phase: 'Running', podIP: pod.ip } },
      { apiVersion: 'v1', kind: 'Service', metadata: { name: 'web', namespace: 'bench' }, spec: { clusterIP: '10.96.0.10', selector: { app: 'web' }, ports: [{ name: 'http', port: 80, targetPort: 'http' }] } },
      { apiVersion: 'v1', kind: 'Secret', metadata: { name: 'cert', namespace: 'bench' }, type: 'kubernetes.io/tls', data: { 'tls.crt': b64(tls.cert), 'tls.key': b64(tls.key) } },
      { apiVersion: 'gateway.networking.k8s.io/v1', kind: 'GatewayClass', metadata: { name: 'fsm' }, spec: { controllerName: CONTROLLER_NAME } },
      {
        apiVersion: 'gateway.networking.k8s.io/v1',
        kind: 'Gateway',
        metadata: { name: 'gw', namespace: 'bench' },
        spec: { gatewayClassName: 'fsm', listeners: [{ name: 'http', port: GW_PORT, protocol: 'HTTP' }, { name: 'https', port: GW_TLS_PORT, protocol: 'HTTPS', tls: { certificateRefs: [{ name: 'cert' }] } }] },
      },
      { apiVersion: 'gateway.networking.k8s.io/v1', kind: 'HTTPRoute', metadata: { name: 'web', namespace: 'bench' }, spec: { parentRefs: [{ name: 'gw' }], rules: [{ backendRefs: [{ name: 'web', port: 80 }] }] } },
    ];
    const c = new PolicyCompiler();
    for (const o of objs) if (!c.upsert(o.kind as Kind, o)) throw new Error(`${o.kind} rejected: ${JSON.stringify(c.reporter.active())}`);
    c.compile();
    const cfg = renderProxyConfig(c.get(node.name)!.policy, { outboundPort: 15001, inboundPort: 15003, gatewayCertificates: { 'bench/cert': { certFile: tls.cert, keyFile: tls.key } } });
    writeFileSync(join(work, 'config.preview.json'), JSON.stringify(cfg));
    const proxy = await startProxy({ name: node.name, exec: node.exec.bind(node), run: node.run.bind(node) }, pipy, join(work, 'proxy'), cfg, true);
    running.push(proxy.child);
    writeFileSync(join(work, 'bare.js'), BARE_PIPY(pod.ip, tls.cert, tls.key));
    const bare = node.exec(pipy, ['--log-level=warn', join(work, 'bare.js')], { stdio: ['ignore', 'ignore', 'pipe'] });
    running.push(bare);

    const ports: Record<Path, Record<Scheme, number>> = { direct: { http: POD_PORT, https: POD_TLS_PORT }, gateway: { http: GW_PORT, https: GW_TLS_PORT }, pipy: { http: BARE_PORT, https: BARE_TLS_PORT } };
    const url = (path: Path, scheme: Scheme): string => `${scheme}://${path === 'direct' ? pod.ip : node.underlayIp}:${ports[path][scheme]}/`;
    // Warm up and check every path answers (the bare Pipy may still be starting).
    for (const path of PATHS) {
      for (const scheme of ['http', 'https'] as const) {
        let got = '';
        for (let i = 0; i < 50 && got !== '200'; i++) {
          if (i > 0) await new Promise((r) => setTimeout(r, 100));
          const r = await topo.underlay.run('curl', ['-sk', '-m', '3', '-o', '/dev/null', '-w', '%{http_code}', url(path, scheme)]);
          got = r.stdout || r.stderr;
        }
        if (got !== '200') throw new Error(`${path} ${scheme} did not answer 200 (got ${got}) at ${url(path, scheme)}`);
      }
    }
    // Where each part's CPU time is counted.
    const parts = { client: topo.underlay.cgroup, server: pod.cgroupPath, proxy: node.proxyCgroup, bare_pipy: node.systemCgroup };
    const cpuNow = (): Record<keyof typeof parts, number> => ({ client: cgroupCpuUs(parts.client), server: cgroupCpuUs(parts.server), proxy: cgroupCpuUs(parts.proxy), bare_pipy: cgroupCpuUs(parts.bare_pipy) });
    const wrk = async (path: Path, scheme: Scheme, shape: Shape): Promise<WrkResult> => {
      const headers = shape === 'conn-per-request' ? ['-H', 'Connection: close'] : [];
      const r = await topo.underlay.run('wrk', ['-t', '1', '-c', String(opts.connections), '-d', `${opts.duration}s`, '--latency', ...headers, url(path, scheme)]);
      if (r.code !== 0) throw new Error(`wrk failed (exit ${r.code}): ${r.stderr.trim()}`);
      return parseWrk(r.stdout);
    };
    type Row = WrkResult & { cpu: Record<keyof typeof parts, number>; cpuTotal: number };
    const rows = new Map<string, Row[]>();
    for (let round_ = 1; round_ <= opts.rounds; round_++) {
      const order: Path[] = round_ % 2 ? PATHS : [...PATHS].reverse();
      for (const scheme of ['http', 'https'] as const) {
        for (const shape of ['keep-alive', 'conn-per-request'] as const) {
          for (const path of order) {
            const t0 = Date.now();
            const before = cpuNow();
            const res = await wrk(path, scheme, shape);
            const after = cpuNow();
            const secs = (Date.now() - t0) / 1000;
            const n = Math.max(1, res.requests);
            const cpu = { client: 0, server: 0, proxy: 0, bare_pipy: 0 };
            for (const k of Object.keys(cpu) as (keyof typeof parts)[]) cpu[k] = round((after[k] - before[k]) / n, 1);
            const cpuTotal = round(cpu.client + cpu.server + cpu.proxy + cpu.bare_pipy, 1);
            const key = `${scheme}/${shape}/${path}`;
            rows.set(key, [...(rows.get(key) ?? []), { ...res, cpu, cpuTotal }]);
            yield {
              ...base,
              case: key,
              round: round_,
              ...res,
              proxy_cpu_pct: round(((after.proxy - before.proxy) / 1e4) / secs, 1),
              cpu_us_per_req: cpu,
              cpu_us_per_req_total: cpuTotal,
              loadavg_1m: round(loadavg()[0]!, 2),
            };
          }
        }
      }
    }
    for (const scheme of ['http', 'https'] as const) {
      for (const shape of ['keep-alive', 'conn-per-request'] as const) {
        const list = (path: Path) => rows.get(`${scheme}/${shape}/${path}`) ?? [];
        const m = (path: Path, f: 'rps' | 'p50_us' | 'p99_us' | 'cpuTotal') => median(list(path).map((r) => r[f]));
        const hop = (path: Path) => median(list(path).map((r) => r.cpu.proxy + r.cpu.bare_pipy));
        yield {
          ...base,
          case: `${scheme}/${shape}/summary`,
          direct_rps: m('direct', 'rps'),
          gateway_rps: m('gateway', 'rps'),
          pipy_rps: m('pipy', 'rps'),
          rps_ratio: round(m('gateway', 'rps') / m('direct', 'rps'), 3),
          pipy_rps_ratio: round(m('pipy', 'rps') / m('direct', 'rps'), 3),
          direct_p99_us: m('direct', 'p99_us'),
          gateway_p99_us: m('gateway', 'p99_us'),
          p99_added_us: round(m('gateway', 'p99_us') - m('direct', 'p99_us'), 1),
          // CPU per request (µs, all parts) and the ratio it predicts on shared cores.
          direct_cpu_us_per_req: m('direct', 'cpuTotal'),
          gateway_cpu_us_per_req: m('gateway', 'cpuTotal'),
          pipy_cpu_us_per_req: m('pipy', 'cpuTotal'),
          cpu_ratio: round(m('direct', 'cpuTotal') / m('gateway', 'cpuTotal'), 3),
          // The hop alone: the node proxy's CPU per request against the bare Pipy's.
          gateway_hop_cpu_us_per_req: round(hop('gateway'), 1),
          pipy_hop_cpu_us_per_req: round(hop('pipy'), 1),
          loadavg_1m: round(loadavg()[0]!, 2),
        };
      }
    }
  } finally {
    for (const ch of running) await stop(ch).catch(() => undefined);
    await topo.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}
