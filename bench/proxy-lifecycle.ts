import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Topology, type TopoNode } from '../src/lab/topology.js';
import { writeConfig } from '../src/proxy/codebase.js';
import { listeningPorts } from '../src/proxy/health.js';
import { findPipy } from '../src/proxy/pipy.js';
import { ProxySupervisor, type ProxySupervisorOptions } from '../src/proxy/supervisor.js';
import { cgroupPids } from '../src/util/cgroup.js';
import { packageRoot } from '../src/util/paths.js';
import type { BenchFlags } from './run.js';
import { intFlag, quantile, round } from './util.js';

/**
 * `npm run bench -- proxy-lifecycle [--changes 100] [--starts 5] [--pods 50] [--instances 1]`
 *
 * The shared Pipy proxy's lifecycle, with real Pipy (PIPY_BIN or PATH) in a
 * private node namespace, running the test responder program
 * (test/fixtures/pipy/main.js: HTTP answering with its config version):
 *  - start: spawn -> ready (both listeners up), p50/max over --starts;
 *  - reload: --changes config changes, three ways:
 *      deliver   the supervisor's API (write + SIGHUP + Pipy's reload log ack),
 *      sighup    write + SIGHUP until a client inside the namespace sees the new version,
 *      repo-push Pipy fed from a loopback repo (ETag + WebSocket "reload"),
 *                until a client sees the new version;
 *  - restart: kill -9 -> ready again;
 *  - rss: the shared proxy idle and under wrk load (50 and 500 connections);
 *  - per-pod: --pods Pipy processes (one per pod, 1 thread each), summed RSS.
 * --instances: the supervisor's instance count (default 1, the single-process
 * numbers docs/proxy.md compares; bench/proxy-crash measures several).
 */

const PROGRAM = (): string => join(packageRoot(), 'test', 'fixtures', 'pipy');
const OUT = 15001;
const IN = 15003;
const cfg = (version: number, out = OUT, inb = IN): object => ({ version, outboundPort: out, inboundPort: inb });
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function rssKb(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : 0;
}

const stats = (xs: number[], unit: string): Record<string, number> => ({
  [`p50_${unit}`]: round(quantile(xs, 0.5), 2),
  [`p99_${unit}`]: round(quantile(xs, 0.99), 2),
  [`max_${unit}`]: round(Math.max(...xs), 2),
});

/**
 * Runs inside the node namespace. Mode "sighup": for each version write
 * config.json, SIGHUP the pids (comma-separated), poll GET until the answer names the version.
 * Mode "repo": serve the codebase as a Pipy repo (listing, files, ETag),
 * accept Pipy's WebSocket, and per version change the ETag, push "reload",
 * poll until the answer names it. Prints {ms: [...]} and, in repo mode,
 * "listening" first so Pipy can be started.
 */
const MEASURER = String.raw`
const http = require('node:http'); const fs = require('node:fs'); const crypto = require('node:crypto');
const [mode, dir, arg, count, outPort, inPort] = process.argv.slice(1);
const get = () => new Promise((res) => { const r = http.get({ host: '127.0.0.1', port: Number(outPort), path: '/', agent: false }, (m) => { let b = ''; m.on('data', (d) => b += d); m.on('end', () => res(b)); }); r.on('error', () => res('')); });
const conf = (v) => JSON.stringify({ version: v, outboundPort: Number(outPort), inboundPort: Number(inPort) });
async function until(v) { for (;;) { if ((await get()) === 'version=' + v + '\n') return; } }
async function measure(apply) {
  const ms = [];
  for (let v = 1; v <= Number(count); v++) { const t0 = performance.now(); apply(v); await until(v); ms.push(performance.now() - t0); await new Promise((r) => setTimeout(r, 10)); }
  process.stdout.write(JSON.stringify({ ms }) + '\n'); process.exit(0);
}
if (mode === 'sighup') {
  measure((v) => { fs.writeFileSync(dir + '/.c', conf(v)); fs.renameSync(dir + '/.c', dir + '/config.json'); for (const pid of arg.split(',')) process.kill(Number(pid), 'SIGHUP'); });
} else {
  let version = 0; let etag = '"0"'; const sockets = new Set();
  const files = { '/main.js': fs.readFileSync(dir + '/main.js') };
  const server = http.createServer((req, res) => {
    const p = req.url.replace(/^\/repo\/fsm/, '');
    if (req.method === 'POST') { req.resume(); return res.end(); }
    res.setHeader('etag', etag);
    if (p === '/' || p === '') return res.end(req.method === 'HEAD' ? undefined : '/main.js\n/config.json\n');
    if (p === '/config.json') return res.end(conf(version));
    if (files[p]) return res.end(files[p]);
    res.statusCode = 404; res.end();
  });
  server.on('upgrade', (req, socket) => {
    const accept = crypto.createHash('sha1').update(req.headers['sec-websocket-key'] + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
    socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ' + accept + '\r\n\r\n');
    socket.on('data', () => {}); socket.on('error', () => {}); sockets.add(socket); socket.on('close', () => sockets.delete(socket));
  });
  server.listen(Number(arg), '127.0.0.1', async () => {
    console.log('listening');
    while (sockets.size === 0 || (await get()) !== 'version=0\n') await new Promise((r) => setTimeout(r, 20));
    const frame = Buffer.from([0x81, 6, ...Buffer.from('reload')]);
    measure((v) => { version = v; etag = '"' + v + '"'; for (const s of sockets) s.write(frame); });
  });
}
`;

function readLine(child: import('node:child_process').ChildProcess, match: (line: string) => boolean): Promise<string> {
  return new Promise((resolve, reject) => {
    let buf = '';
    child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      for (const line of buf.split('\n').slice(0, -1)) if (match(line)) resolve(line);
    });
    child.once('exit', (code) => reject(new Error(`measurer exited ${code}: ${buf.slice(-500)}`)));
  });
}

async function wrkWhile(node: TopoNode, connections: number, seconds: number, during: () => Promise<number>): Promise<{ rssKb: number; rps: number }> {
  const load = node.run('wrk', ['-t1', `-c${connections}`, `-d${seconds}s`, `http://127.0.0.1:${OUT}/`]);
  await sleep((seconds * 1000) / 2);
  const rss = await during();
  const out = (await load).stdout;
  return { rssKb: rss, rps: Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1] ?? NaN) };
}

export async function* run(flags: BenchFlags): AsyncGenerator<object> {
  const changes = intFlag(flags, 'changes', 100);
  const starts = intFlag(flags, 'starts', 5);
  const pods = intFlag(flags, 'pods', 50);
  const instances = intFlag(flags, 'instances', 1);
  const pipyBin = findPipy();
  const topo = await Topology.create({ prefix: `fsmbench${process.pid}p`, nodes: 1 });
  const node = topo.nodes[0]!;
  const dir = mkdtempSync(join(tmpdir(), 'fsm-bench-proxy-'));
  const opts = (stateDir: string): ProxySupervisorOptions => ({
    kind: 'pipy', stateDir, cgroup: node.proxyCgroup, netns: node.netns, address: '127.0.0.1', outboundPort: OUT, inboundPort: IN,
    pipy: { bin: pipyBin, programDir: PROGRAM(), adminPort: 6060, instances }, initialConfig: cfg(0), drainMs: 5000,
  });
  try {
    // start -> ready
    const ready: number[] = [];
    for (let i = 0; i < starts; i++) {
      const sup = new ProxySupervisor(opts(join(dir, `start${i}`)));
      const t0 = performance.now();
      await sup.start();
      await sup.waitReady(20_000, { all: true });
      ready.push(performance.now() - t0);
      await sup.stop(5000);
    }
    yield { case: 'start', runs: starts, ...stats(ready, 'ms'), each_ms: ready.map((x) => round(x, 1)) };

    const sup = new ProxySupervisor(opts(join(dir, 'main')));
    await sup.start();
    await sup.waitReady(20_000);
    const threads = sup.status().threads;

    // reload through the supervisor API: ack from Pipy's reload log lines
    const acks: number[] = [];
    for (let v = 1; v <= changes; v++) {
      acks.push((await sup.deliver(cfg(v))).ms);
      await sleep(10);
    }
    yield { case: 'reload', via: 'deliver (file + SIGHUP, log ack)', changes, threads, ...stats(acks, 'ms') };

    // reload, file + SIGHUP, until a client sees it
    const pids = sup.status().instances.map((i) => i.pid!).join(',');
    const codebase = (JSON.parse(readFileSync(join(dir, 'main', 'proxy.json'), 'utf8')) as { instances: Array<{ codebase: string }> }).instances[0]!.codebase;
    const m1 = node.exec(process.execPath, ['-e', MEASURER, 'sighup', codebase, pids, String(changes), String(OUT), String(IN)], { stdio: ['ignore', 'pipe', 'inherit'] });
    const r1 = JSON.parse(await readLine(m1, (l) => l.startsWith('{'))) as { ms: number[] };
    yield { case: 'reload', via: 'file + SIGHUP, client-observed', changes, threads, ...stats(r1.ms, 'ms') };
    writeConfig(codebase, JSON.stringify(cfg(changes)));

    // restart after kill -9
    const restart: number[] = [];
    for (let i = 0; i < starts; i++) {
      const before = sup.status().instances[0]!.pid!;
      const t0 = performance.now();
      process.kill(before, 'SIGKILL');
      for (;;) {
        const st = sup.status().instances[0]!;
        if (st.listening && st.pid !== before) break;
        await sleep(5);
      }
      restart.push(performance.now() - t0);
      await sleep(10_500); // past stableMs: each kill is a first crash, not a growing backoff
    }
    yield { case: 'restart-after-kill', runs: starts, ...stats(restart, 'ms'), note: 'includes the first backoff: 250 ms +-20 %' };

    // RSS idle and under load
    // Summed over the instances (one by default).
    const shared = sup.status().instances.map((i) => i.pid!);
    const rssSum = (): number => shared.reduce((a, p) => a + rssKb(p), 0);
    yield { case: 'rss', proxy: 'shared', instances, threads, load: 'idle', rss_kb: rssSum() };
    for (const c of [50, 500]) {
      const r = await wrkWhile(node, c, 4, async () => rssSum());
      yield { case: 'rss', proxy: 'shared', instances, threads, load: `wrk ${c} connections`, rss_kb: r.rssKb, rps: round(r.rps, 0) };
    }
    await sup.stop(5000);

    // reload via a loopback repo with ETag + WebSocket push
    const repoPort = 16080;
    const repoDir = join(dir, 'repo');
    rmSync(repoDir, { recursive: true, force: true });
    await import('node:fs').then((fs) => fs.cpSync(PROGRAM(), repoDir, { recursive: true }));
    const m2 = node.exec(process.execPath, ['-e', MEASURER, 'repo', repoDir, String(repoPort), String(changes), String(OUT), String(IN)], { stdio: ['ignore', 'pipe', 'inherit'] });
    const result2 = readLine(m2, (l) => l.startsWith('{'));
    await readLine(m2, (l) => l === 'listening');
    const repoPipy = node.exec(pipyBin, [`http://127.0.0.1:${repoPort}/repo/fsm/`, '--reuse-port', `--threads=${threads}`, '--log-level=warn'], { inProxyCgroup: true, stdio: 'ignore' });
    const r2 = JSON.parse(await result2) as { ms: number[] };
    yield { case: 'reload', via: 'repo + ETag + WebSocket push, client-observed', changes, threads, ...stats(r2.ms, 'ms') };
    repoPipy.kill('SIGKILL');

    // one Pipy per pod
    const perPod: number[] = [];
    const podDirs: string[] = [];
    for (let i = 0; i < pods; i++) {
      const d = join(dir, `pod${i}`);
      await import('node:fs').then((fs) => fs.cpSync(PROGRAM(), d, { recursive: true }));
      writeFileSync(join(d, 'config.json'), JSON.stringify(cfg(0, 20000 + 2 * i, 20001 + 2 * i)));
      podDirs.push(d);
      const child = node.exec(pipyBin, [join(d, 'main.js'), '--threads=1', '--log-level=warn'], { inProxyCgroup: true, stdio: 'ignore' });
      perPod.push(child.pid!);
    }
    const deadline = Date.now() + 60_000;
    while (perPod.some((p, i) => listeningPorts(p, [20000 + 2 * i]).size === 0) && Date.now() < deadline) await sleep(50);
    const each = perPod.map(rssKb);
    yield { case: 'rss', proxy: `one per pod x${pods}`, threads: 1, load: 'idle', rss_kb_sum: each.reduce((a, b) => a + b, 0), rss_kb_each_p50: quantile(each, 0.5), processes: (await cgroupPids(node.proxyCgroup)).length };
    for (const p of perPod) process.kill(p, 'SIGKILL');
  } finally {
    await topo.destroy();
    rmSync(dir, { recursive: true, force: true });
  }
}
