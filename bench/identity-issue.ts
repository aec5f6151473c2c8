import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { Agent, request } from 'node:https';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { stringify } from 'yaml';
import { generateTokens, writeTokensFile } from '../src/controller/auth.js';
import { createCsr, generateKeyPair } from '../src/identity/x509.js';
import { LABEL_MONITORED_BY } from '../src/policy/fsm.js';
import { nodeName } from './synthetic-cluster.js';
import { intFlag, quantile, round } from './util.js';

/**
 * Controller issuing workload certificates (issue 17: 1000 identities in
 * under 2 s, and its memory). A real controller process (the CLI, built-in
 * CA, manifest mode) serves a mesh of --identities service accounts, one pod
 * each, spread over --nodes nodes; this process plays the nodes: it makes
 * one key pair and CSR per identity beforehand (node-side work, timed
 * separately), then sends every CSR over HTTPS with that node's token,
 * --concurrency at a time, and times each answer. Afterwards it reads the
 * controller's RSS (/proc) and heap (its /metrics).
 *
 *   npm run bench -- identity-issue [--identities 1000] [--nodes 50] [--concurrency 32] [--cpu-prof DIR]
 *
 * --cpu-prof writes the controller's V8 CPU profile into DIR (open it in
 * Chrome DevTools) to see where issuing spends its time.
 */

const PORT_BASE = 15_800;

export async function run(flags: Record<string, string | boolean>): Promise<object[]> {
  const n = intFlag(flags, 'identities', 1000);
  const nodes = intFlag(flags, 'nodes', 50);
  const concurrency = Math.max(1, intFlag(flags, 'concurrency', 32));
  const cli = fileURLToPath(new URL('../src/cli/bin.js', import.meta.url));
  if (!existsSync(cli)) throw new Error(`${cli} is missing: run npm run build:ts`);
  const dir = mkdtempSync(join(tmpdir(), 'fsm-bench-identity-'));
  let ctrl: ChildProcess | undefined;
  try {
    // The mesh: one namespace, n service accounts with one pod each, round robin over the nodes.
    const objs: object[] = [{ apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'bench', labels: { [LABEL_MONITORED_BY]: 'fsm' } } }];
    for (let i = 0; i < nodes; i++) objs.push({ apiVersion: 'v1', kind: 'Node', metadata: { name: nodeName(i) }, status: { addresses: [{ type: 'InternalIP', address: `192.168.${i >> 8}.${(i & 255) + 1}` }] } });
    for (let i = 0; i < n; i++) {
      objs.push({
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: `pod-${i}`, namespace: 'bench', uid: `uid-${i}`, labels: { app: `app-${i}` } },
        spec: { nodeName: nodeName(i % nodes), serviceAccountName: `sa-${i}`, containers: [{ ports: [{ name: 'http', containerPort: 8080 }] }] },
        status: { phase: 'Running', podIP: `10.${100 + (i >> 16)}.${(i >> 8) & 255}.${i & 255}`, qosClass: 'Burstable' },
      });
    }
    const manifests = join(dir, 'manifests');
    mkdirSync(manifests);
    writeFileSync(join(manifests, 'mesh.yaml'), objs.map((o) => stringify(o)).join('---\n'));
    const tokens = generateTokens(Array.from({ length: nodes }, (_, i) => nodeName(i)));
    await writeTokensFile(join(dir, 'tokens.json'), tokens);

    // Node side, beforehand: keys and CSRs are made on the nodes, not by the controller.
    let t = performance.now();
    const csrs: { node: string; sa: string; csr: string }[] = [];
    for (let i = 0; i < n; i++) {
      const sa = `sa-${i}`;
      csrs.push({ node: nodeName(i % nodes), sa, csr: await createCsr(await generateKeyPair(), 'cluster.local', { namespace: 'bench', serviceAccount: sa }) });
    }
    const csrMakeMs = performance.now() - t;

    const port = PORT_BASE + (process.pid % 100);
    const state = join(dir, 'state');
    const prof = typeof flags['cpu-prof'] === 'string' ? ['--cpu-prof', '--cpu-prof-dir', flags['cpu-prof']] : [];
    ctrl = spawn(process.execPath, [...prof, cli, 'controller', '--manifests', manifests, '--tokens', join(dir, 'tokens.json'), '--listen', `127.0.0.1:${port}`, '--state-dir', state], {
      stdio: ['ignore', 'ignore', 'inherit'],
      env: { ...process.env, FSMN_LOG_LEVEL: 'warn', FSMN_LOG_FORMAT: 'json' },
    });
    const url = `https://127.0.0.1:${port}`;
    const ca = await until(async () => (existsSync(join(state, 'ca.crt')) ? readFileSync(join(state, 'ca.crt'), 'utf8') : undefined), 20_000);
    await until(async () => ((await call(url, ca, 'GET', '/readyz').catch(() => undefined))?.status === 200 ? true : undefined), 20_000);
    const before = await controllerMemory(ctrl.pid!, url, ca);

    const agent = new Agent({ keepAlive: true, maxSockets: concurrency, ca });
    const latencies: number[] = [];
    const failures = new Map<number, number>();
    let next = 0;
    t = performance.now();
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        for (;;) {
          const i = next++;
          if (i >= csrs.length) return;
          const c = csrs[i]!;
          const s = performance.now();
          const r = await call(url, ca, 'POST', `/v1/nodes/${c.node}/identities`, { namespace: 'bench', serviceAccount: c.sa, csr: c.csr }, tokens[c.node], agent);
          latencies.push(performance.now() - s);
          if (r.status !== 200) failures.set(r.status, (failures.get(r.status) ?? 0) + 1);
        }
      }),
    );
    const totalMs = performance.now() - t;
    agent.destroy();
    const after = await controllerMemory(ctrl.pid!, url, ca);
    return [
      {
        bench: 'identity-issue',
        identities: n,
        nodes,
        concurrency,
        total_ms: round(totalMs, 1),
        target_total_ms: 2000,
        per_s: round((n / totalMs) * 1000, 1),
        p50_ms: round(quantile(latencies, 0.5), 2),
        p99_ms: round(quantile(latencies, 0.99), 2),
        max_ms: round(Math.max(...latencies), 2),
        failed: Object.fromEntries(failures),
        issued_counter: after.issued,
        // CPU the controller spent per certificate: on a shared or loaded machine the wall time says less than this.
        controller_cpu_ms_per_issue: round((after.cpuMs - before.cpuMs) / n, 2),
        load_avg_1m: round(loadavg()[0]!, 1),
        node_csr_make_ms_each: round(csrMakeMs / n, 2),
        controller_rss_mib_before: before.rssMiB,
        controller_rss_mib_after: after.rssMiB,
        controller_heap_used_mib_before: before.heapMiB,
        controller_heap_used_mib_after: after.heapMiB,
      },
    ];
  } finally {
    if (ctrl && ctrl.exitCode === null) {
      const exited = new Promise((r) => ctrl!.once('exit', r));
      ctrl.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
    }
    rmSync(dir, { recursive: true, force: true });
  }
}

async function until<T>(probe: () => Promise<T | undefined>, ms: number): Promise<T> {
  const end = performance.now() + ms;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (performance.now() > end) throw new Error('the controller did not come up');
    await new Promise((r) => setTimeout(r, 50));
  }
}

function call(url: string, ca: string, method: string, path: string, body?: unknown, token?: string, agent?: Agent): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = request(new URL(path, url), { method, ca, agent: agent ?? false, headers: { ...(token ? { authorization: `Bearer ${token}` } : {}), ...(body ? { 'content-type': 'application/json' } : {}) } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString() }));
    });
    req.on('error', reject);
    req.end(body ? JSON.stringify(body) : undefined);
  });
}

async function controllerMemory(pid: number, url: string, ca: string): Promise<{ rssMiB: number; heapMiB: number; issued: number; cpuMs: number }> {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  // utime + stime (fields 14, 15 of /proc/pid/stat, after the command name), in clock ticks of 10 ms.
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  const cpuMs = (Number(stat[11]) + Number(stat[12])) * 10;
  const rssKb = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? NaN);
  const metrics = (await call(url, ca, 'GET', '/metrics')).text;
  const heap = Number(/^fsm_node_controller_nodejs_heap_size_used_bytes (\S+)/m.exec(metrics)?.[1] ?? NaN);
  const issued = Number(/^fsm_node_controller_certificates_issued_total (\S+)/m.exec(metrics)?.[1] ?? NaN);
  return { rssMiB: round(rssKb / 1024, 1), heapMiB: round(heap / 2 ** 20, 1), issued, cpuMs };
}
