import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { noExclusions, type DesiredState } from '../src/dataplane/types.js';
import { Topology, type TopoNode, type TopoPod } from '../src/lab/topology.js';
import { pipyBinary } from '../src/proxy/pipy.js';
import { run as runMesh } from './mesh.js';
import { selectModes } from './modes.js';
import { intFlag, round } from './util.js';

/**
 * datapath: requests/s and latency of HTTP keep-alive traffic from pod A (wrk)
 * to pod B (a minimal HTTP responder) on one node, for:
 *   direct                       no interception;
 *   <mode>/<variant>/passthrough each dataplane mode and variant (eBPF with and
 *                                without the sockmap fast path) with the
 *                                project's passthrough proxy in the node;
 *   <mode>/<variant>/pipy        the same with Pipy as the proxy, when PIPY_BIN
 *                                or pipy on PATH is found (else one skip row).
 * Every process shares the machine's cores; compare rows of one run.
 *   npm run bench -- datapath [--duration 10] [--connections 50] [--threads 1] [--mode ebpf]
 */

const PORT = 8080;
const PROXY_PORT = 15001;

// Answers every request (wrk sends GETs without bodies) with a fixed 200; keep-alive.
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

// Legacy-style transparent listener (pipy-notes.md: the new-style one loses the original destination in 1.5.18).
const PIPY_L4 = `
pipy({ _target: '' })
.listen(${PROXY_PORT}, { transparent: true })
  .onStart(ib => void (_target = ib.destinationAddress + ':' + ib.destinationPort))
  .connect(() => _target)
`;

export interface WrkResult {
  rps: number;
  p50_us: number;
  p99_us: number;
  requests: number;
  errors: number;
}

function toMicros(value: string, unit: string): number {
  const v = Number(value);
  return unit === 'us' ? v : unit === 'ms' ? v * 1000 : unit === 's' ? v * 1e6 : NaN;
}

/** The numbers out of wrk --latency's text report. */
export function parseWrk(out: string): WrkResult {
  const pct = (p: string): number => {
    const m = new RegExp(`^\\s*${p}%\\s+([\\d.]+)(us|ms|s)\\s*$`, 'm').exec(out);
    return m ? round(toMicros(m[1]!, m[2]!), 1) : NaN;
  };
  const rps = Number(/^Requests\/sec:\s+([\d.]+)/m.exec(out)?.[1] ?? NaN);
  const requests = Number(/^\s*(\d+) requests in/m.exec(out)?.[1] ?? NaN);
  const sock = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out);
  const non2xx = Number(/Non-2xx or 3xx responses: (\d+)/.exec(out)?.[1] ?? 0);
  const errors = (sock ? sock.slice(1).reduce((a, b) => a + Number(b), 0) : 0) + non2xx;
  if (!Number.isFinite(rps)) throw new Error(`cannot parse wrk output:\n${out}`);
  return { rps: round(rps, 0), p50_us: pct('50'), p99_us: pct('99'), requests, errors };
}

async function waitFor(child: ChildProcess, marker: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    let out = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      if (out.includes(marker)) resolve();
    });
    child.once('exit', (code) => reject(new Error(`${child.spawnfile} exited (code ${code}) before "${marker}": ${out.trim()}`)));
  });
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  child.kill('SIGTERM');
  await exited;
}

/** The passthrough proxy as a process in the node's netns and proxy cgroup (dist or, under the TS hooks, source). */
function startPassthrough(node: TopoNode, log: string): ChildProcess {
  const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
  const script = fileURLToPath(new URL(`../src/proxy/passthrough${ext}`, import.meta.url));
  return node.exec(process.execPath, [...process.execArgv, script, '--listen', `${node.gateway}:${PROXY_PORT}`, '--log', log], {
    inProxyCgroup: true,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
}

async function startPipy(node: TopoNode, pipy: string, dir: string): Promise<ChildProcess> {
  const script = join(dir, 'l4.js');
  writeFileSync(script, PIPY_L4);
  const child = node.exec(pipy, ['--log-level=warn', script], { inProxyCgroup: true, stdio: ['ignore', 'ignore', 'pipe'] });
  for (let i = 0; i < 100; i++) {
    const ss = await node.run('ss', ['-Hltn', `sport = :${PROXY_PORT}`]);
    if (ss.stdout.trim() !== '') return child;
    if (child.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  await stop(child);
  throw new Error(`pipy (${pipy}) did not listen on ${PROXY_PORT}`);
}

async function wrk(client: TopoPod, server: TopoPod, flags: { duration: number; connections: number; threads: number }): Promise<WrkResult> {
  const r = await client.run('wrk', ['-t', String(flags.threads), '-c', String(flags.connections), '-d', `${flags.duration}s`, '--latency', `http://${server.ip}:${PORT}/`]);
  if (r.code !== 0) throw new Error(`wrk failed (exit ${r.code}): ${r.stderr.trim()}`);
  return parseWrk(r.stdout);
}

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  // --proxy pipy: the project's Pipy program through the mesh (same node, across nodes, sidecars): bench/mesh.ts.
  if (flags.proxy === 'pipy') return yield* runMesh(flags);
  const opts = { duration: intFlag(flags, 'duration', 10), connections: intFlag(flags, 'connections', 50), threads: intFlag(flags, 'threads', 1) };
  const modes = selectModes(flags.mode);
  const pipy = pipyBinary();
  const topo = await Topology.create({ prefix: `fsmbench${process.pid}d`, nodes: 1, podsPerNode: 2 });
  const work = mkdtempSync(join(tmpdir(), 'fsmbench-datapath-'));
  try {
    const node = topo.nodes[0]!;
    const [a, b] = node.pods as [TopoPod, TopoPod];
    const server = b.exec(process.execPath, ['-e', HTTP_SERVER], { stdio: ['ignore', 'pipe', 'pipe'] });
    await waitFor(server, 'listening');
    const base = { bench: 'datapath', ...opts };
    const direct = await wrk(a, b, opts);
    yield { ...base, case: 'direct', ...direct };

    const desired: DesiredState = {
      proxy: { address: node.gateway, outboundPort: PROXY_PORT, inboundPort: 15003, cgroupPath: node.proxyCgroup },
      nodeAddresses: [node.gateway, node.underlayIp],
      proxySources: [node.gateway],
      mesh: noExclusions(),
      pods: [{ uid: 'bench-a', namespace: 'bench', name: 'a', ip: a.ip, cgroupPath: a.cgroupPath, inbound: 'permissive', exclusions: noExclusions() }],
    };
    const proxies: Array<[string, () => Promise<{ child: ChildProcess; proxied(): number | undefined }>]> = [
      [
        'passthrough',
        async () => {
          const log = join(work, 'passthrough.jsonl');
          writeFileSync(log, '');
          const child = startPassthrough(node, log);
          await waitFor(child, 'listening');
          return { child, proxied: () => readFileSync(log, 'utf8').split('\n').filter((l) => l.includes('"event":"open"')).length };
        },
      ],
    ];
    if (pipy !== undefined) proxies.push(['pipy', async () => ({ child: await startPipy(node, pipy, work), proxied: () => undefined })]);

    for (const [mode, impl] of modes) {
      for (const [variant, dpOpts] of Object.entries(impl.variants)) {
        const dp = impl.create(node, dpOpts);
        try {
          await dp.apply(desired);
          for (const [proxyName, start] of proxies) {
            const proxy = await start();
            try {
              const res = await wrk(a, b, opts);
              const proxied = proxy.proxied();
              yield {
                ...base,
                case: `${mode}/${variant}/${proxyName}`,
                ...res,
                rps_vs_direct: round(res.rps / direct.rps, 3),
                ...(proxied === undefined ? {} : { proxied_connections: proxied }),
              };
            } finally {
              await stop(proxy.child);
            }
          }
        } finally {
          await dp.cleanup();
        }
      }
    }
    if (pipy === undefined) yield { ...base, case: 'pipy', skipped: 'no Pipy binary found (set PIPY_BIN or put pipy on PATH)' };
    await stop(server);
  } finally {
    await topo.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}
