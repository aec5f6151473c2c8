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
import { cpuTicks, startProxy, stop } from './mesh.js';
import { intFlag, round } from './util.js';

/**
 * ingress: requests/s and latency from a client outside the mesh (the
 * underlay namespace, as a device at an edge site) to a pod, through the
 * node proxy's Gateway listener against straight to the pod, side by side in
 * one run: HTTP and HTTPS (TLS terminated by the gateway; the direct case
 * terminates in the pod's own server with the same certificate), each with
 * keep-alive connections and with a new connection per request
 * (`Connection: close`). Rounds alternate the order; the summary rows give
 * medians over rounds and the gateway/direct ratios. Every row carries the
 * machine's load average (a shared machine: compare ratios, not absolutes).
 *   npm run bench -- ingress [--duration 5] [--connections 20] [--rounds 2]
 */

const POD_PORT = 8080;
const POD_TLS_PORT = 8443;
const GW_PORT = 18080;
const GW_TLS_PORT = 18443;

const SERVER = `
const http = require('node:http');
const https = require('node:https');
const fs = require('node:fs');
const [cert, key] = process.argv.slice(1);
const h = (req, res) => { res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '2' }); res.end('ok'); };
http.createServer(h).listen(${POD_PORT}, '0.0.0.0', () =>
  https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) }, h).listen(${POD_TLS_PORT}, '0.0.0.0', () => console.log('listening')));
`;

type Path = 'direct' | 'gateway';
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

    const url = (path: Path, scheme: Scheme): string =>
      path === 'direct' ? `${scheme}://${pod.ip}:${scheme === 'http' ? POD_PORT : POD_TLS_PORT}/` : `${scheme}://${node.underlayIp}:${scheme === 'http' ? GW_PORT : GW_TLS_PORT}/`;
    // Warm up and check every path answers.
    for (const path of ['direct', 'gateway'] as const) {
      for (const scheme of ['http', 'https'] as const) {
        const r = await topo.underlay.run('curl', ['-sk', '-m', '3', '-o', '/dev/null', '-w', '%{http_code}', url(path, scheme)]);
        if (r.stdout !== '200') throw new Error(`${path} ${scheme} did not answer 200 (got ${r.stdout || r.stderr}) at ${url(path, scheme)}`);
      }
    }
    const wrk = async (path: Path, scheme: Scheme, shape: Shape): Promise<WrkResult> => {
      const headers = shape === 'conn-per-request' ? ['-H', 'Connection: close'] : [];
      const r = await topo.underlay.run('wrk', ['-t', '1', '-c', String(opts.connections), '-d', `${opts.duration}s`, '--latency', ...headers, url(path, scheme)]);
      if (r.code !== 0) throw new Error(`wrk failed (exit ${r.code}): ${r.stderr.trim()}`);
      return parseWrk(r.stdout);
    };
    const rows = new Map<string, WrkResult[]>();
    for (let round_ = 1; round_ <= opts.rounds; round_++) {
      const order: Path[] = round_ % 2 ? ['direct', 'gateway'] : ['gateway', 'direct'];
      for (const scheme of ['http', 'https'] as const) {
        for (const shape of ['keep-alive', 'conn-per-request'] as const) {
          for (const path of order) {
            const t0 = Date.now();
            const before = cpuTicks(proxy.child.pid!);
            const res = await wrk(path, scheme, shape);
            const cpu = round((cpuTicks(proxy.child.pid!) - before) / ((Date.now() - t0) / 1000), 1);
            const key = `${scheme}/${shape}/${path}`;
            rows.set(key, [...(rows.get(key) ?? []), res]);
            yield { ...base, case: key, round: round_, ...res, proxy_cpu_pct: cpu, loadavg_1m: round(loadavg()[0]!, 2) };
          }
        }
      }
    }
    for (const scheme of ['http', 'https'] as const) {
      for (const shape of ['keep-alive', 'conn-per-request'] as const) {
        const m = (path: Path, f: 'rps' | 'p50_us' | 'p99_us') => median((rows.get(`${scheme}/${shape}/${path}`) ?? []).map((r) => r[f]));
        yield {
          ...base,
          case: `${scheme}/${shape}/summary`,
          direct_rps: m('direct', 'rps'),
          gateway_rps: m('gateway', 'rps'),
          rps_ratio: round(m('gateway', 'rps') / m('direct', 'rps'), 3),
          direct_p99_us: m('direct', 'p99_us'),
          gateway_p99_us: m('gateway', 'p99_us'),
          p99_added_us: round(m('gateway', 'p99_us') - m('direct', 'p99_us'), 1),
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
