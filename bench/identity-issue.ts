import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { Agent, request } from 'node:https';
import { loadavg, tmpdir } from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { stringify } from 'yaml';
import { generateTokens, writeTokensFile } from '../src/controller/auth.js';
import { MAX_BATCH } from '../src/controller/identity-batch.js';
import { controllerIssuer } from '../src/identity/agent-certs.js';
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
 * --concurrency at a time, and times each answer. Around the burst it reads
 * the controller's CPU time and heap (its /metrics) and RSS (/proc).
 *
 * On a shared machine the wall time says more about the neighbours than
 * about the controller: controller_cpu_ms_per_issue is the steadier figure
 * (1000 certificates in 2 s needs under 2 ms each on one core). A second
 * row kind, `sign-path`, runs the controller's issuing code (checks and
 * signing, IdentityService.issue) in this process without HTTP or TLS.
 *
 *   npm run bench -- identity-issue [--identities 1000] [--nodes 50] [--concurrency 32]
 *        [--batch 100] [--agent-client] [--baseline DIST] [--rounds N]
 *        [--connection-per-request] [--cpu-prof DIR]
 *
 * Each round issues the same CSRs two ways against a fresh controller of
 * this build, side by side: `https` rows send one certificate per request
 * (as agents did before batching), `https-batch` rows send each node's
 * identities in batch requests of up to --batch (POST .../identities/batch,
 * as agents do now), --concurrency requests in flight in both. With
 * --agent-client the batch rows go through the agent's own client
 * (controllerIssuer, one per node, every identity asked for at once: its
 * coalescing makes the batches) instead of hand-made batch requests.
 *
 * --baseline DIST: another build's dist directory (e.g. main's, copied with
 * its package.json next to a node_modules): its controller issues the same
 * CSRs one per request (an older build has no batch route) in the same
 * rounds. Runs alternate their order each round; --rounds (default 3) times
 * each; a last `summary` row gives the medians side by side and the ratios
 * (batch over single of this build; this build over the baseline). --connection-per-request opens a new TLS connection for every
 * certificate, as agents did before they kept their connection to the
 * controller alive. --cpu-prof writes each controller's V8 CPU profile into
 * DIR (under contention a profile counts time waiting for the CPU, e.g. in
 * writev, as the function's own: read CPU time, not profiles, on a busy machine).
 */

const PORT_BASE = 15_800;
const here = fileURLToPath(new URL('..', import.meta.url)); // this build's dist/

interface Csr {
  node: string;
  sa: string;
  csr: string;
}

interface Program {
  name: 'this' | 'baseline';
  dist: string;
}

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const n = intFlag(flags, 'identities', 1000);
  const nodes = intFlag(flags, 'nodes', 50);
  const concurrency = Math.max(1, intFlag(flags, 'concurrency', 32));
  const programs: Program[] = [{ name: 'this', dist: here }];
  if (typeof flags.baseline === 'string') programs.push({ name: 'baseline', dist: isAbsolute(flags.baseline) ? flags.baseline : resolve(flags.baseline) });
  const rounds = Math.max(1, intFlag(flags, 'rounds', 3));
  const batch = Math.max(1, intFlag(flags, 'batch', MAX_BATCH));
  if (batch > MAX_BATCH) throw new Error(`--batch must be at most ${MAX_BATCH} (the controller's limit per request)`);
  const agentClient = flags['agent-client'] === true;
  for (const p of programs) if (!existsSync(join(p.dist, 'src/cli/bin.js'))) throw new Error(`${join(p.dist, 'src/cli/bin.js')} is missing: run npm run build:ts${p.name === 'baseline' ? ' in the baseline tree' : ''}`);
  const dir = mkdtempSync(join(tmpdir(), 'fsm-bench-identity-'));
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
    const t = performance.now();
    const csrs: Csr[] = [];
    for (let i = 0; i < n; i++) {
      const sa = `sa-${i}`;
      csrs.push({ node: nodeName(i % nodes), sa, csr: await createCsr(await generateKeyPair(), 'cluster.local', { namespace: 'bench', serviceAccount: sa }) });
    }
    const csrMakeMs = performance.now() - t;

    // Every controller run of a round: this build one per request and batched, the baseline one per request.
    const runs: { p: Program; mode: Mode }[] = [{ p: programs[0]!, mode: 'batch' }, { p: programs[0]!, mode: 'single' }, ...programs.slice(1).map((p) => ({ p, mode: 'single' as const }))];
    const rows: { program: string; kind: string; row: Record<string, unknown> }[] = [];
    for (let r = 0; r < rounds; r++) {
      // Alternate the order so no run always goes first (warm caches, a neighbour's burst).
      const order = r % 2 === 0 ? runs : [...runs].reverse();
      for (const { p, mode } of order) {
        const httpsRun = { dir: join(dir, `${p.name}-${mode}-${r}`), manifests, tokens, csrs, nodes, concurrency, cpuProf: flags['cpu-prof'], perRequest: flags['connection-per-request'] === true, mode, batch, agentClient };
        const row = { program: p.name, round: r + 1, ...(await overHttps(p, httpsRun)), node_csr_make_ms_each: round(csrMakeMs / n, 2) };
        rows.push({ program: p.name, kind: mode === 'single' ? 'https' : 'https-batch', row });
        yield row;
      }
      for (const p of r % 2 === 0 ? programs : [...programs].reverse()) {
        const row = { program: p.name, round: r + 1, ...(await signPath(p, csrs)) };
        rows.push({ program: p.name, kind: 'sign-path', row });
        yield row;
      }
    }
    yield summary(rows, programs);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Medians per run of the figures that matter; batch over single (this build), this build over the baseline. */
function summary(rows: { program: string; kind: string; row: Record<string, unknown> }[], programs: Program[]): object {
  const med = (program: string, kind: string, field: string): number => {
    const xs = rows.filter((r) => r.program === program && r.kind === kind).map((r) => Number(r.row[field]));
    return round(quantile(xs, 0.5), 2);
  };
  const https = ['total_ms', 'controller_cpu_ms_per_issue', 'p50_ms', 'p99_ms', 'controller_rss_mib_after', 'controller_rss_growth_mib'];
  const out: Record<string, unknown> = { bench: 'identity-issue', kind: 'summary', rounds: rows.filter((r) => r.program === 'this' && r.kind === 'https').length, identities: rows[0]?.row.identities };
  for (const field of https) {
    out[`${field}_batch`] = med('this', 'https-batch', field);
    for (const p of programs) out[`${field}_${p.name === 'this' ? 'single' : 'baseline_single'}`] = med(p.name, 'https', field);
  }
  for (const p of programs) out[`sign_path_cpu_ms_per_issue_${p.name}`] = med(p.name, 'sign-path', 'cpu_ms_per_issue');
  const ratio = (a: string, b: string) => round((out[a] as number) / (out[b] as number), 3);
  out.total_ms_batch_over_single = ratio('total_ms_batch', 'total_ms_single');
  out.controller_cpu_batch_over_single = ratio('controller_cpu_ms_per_issue_batch', 'controller_cpu_ms_per_issue_single');
  if (programs.length > 1) {
    out.total_ms_batch_over_baseline_single = ratio('total_ms_batch', 'total_ms_baseline_single');
    out.controller_cpu_batch_over_baseline_single = ratio('controller_cpu_ms_per_issue_batch', 'controller_cpu_ms_per_issue_baseline_single');
    out.controller_cpu_single_over_baseline_single = ratio('controller_cpu_ms_per_issue_single', 'controller_cpu_ms_per_issue_baseline_single');
    out.sign_path_cpu_ratio = ratio('sign_path_cpu_ms_per_issue_this', 'sign_path_cpu_ms_per_issue_baseline');
  }
  out.target_total_ms = 2000;
  out.load_avg_1m = round(loadavg()[0]!, 1);
  return out;
}

type Mode = 'single' | 'batch';

interface HttpsRun {
  dir: string;
  manifests: string;
  tokens: Record<string, string>;
  csrs: Csr[];
  nodes: number;
  concurrency: number;
  cpuProf: string | boolean | undefined;
  /** A new TLS connection per request (no keep-alive). */
  perRequest: boolean;
  /** One certificate per request, or each node's in batch requests of up to `batch`. */
  mode: Mode;
  batch: number;
  /** Batch mode through the agent's client (controllerIssuer per node) rather than hand-made batches. */
  agentClient: boolean;
}

/** One controller process of build `p`, issuing every CSR once over HTTPS. */
async function overHttps(p: Program, o: HttpsRun): Promise<Record<string, unknown>> {
  const n = o.csrs.length;
  mkdirSync(o.dir);
  const tokensFile = join(o.dir, 'tokens.json');
  await writeTokensFile(tokensFile, o.tokens);
  const port = PORT_BASE + (process.pid % 100);
  const state = join(o.dir, 'state');
  const prof = typeof o.cpuProf === 'string' ? ['--cpu-prof', '--cpu-prof-dir', o.cpuProf, '--cpu-prof-name', `identity-issue-${p.name}-${Date.now()}.cpuprofile`] : [];
  const ctrl: ChildProcess = spawn(process.execPath, [...prof, join(p.dist, 'src/cli/bin.js'), 'controller', '--manifests', o.manifests, '--tokens', tokensFile, '--listen', `127.0.0.1:${port}`, '--state-dir', state], {
    stdio: ['ignore', 'ignore', 'inherit'],
    env: { ...process.env, FSMN_LOG_LEVEL: 'warn', FSMN_LOG_FORMAT: 'json' },
  });
  try {
    const url = `https://127.0.0.1:${port}`;
    const ca = await until(async () => (existsSync(join(state, 'ca.crt')) ? readFileSync(join(state, 'ca.crt'), 'utf8') : undefined), 20_000);
    await until(async () => ((await call(url, ca, 'GET', '/readyz').catch(() => undefined))?.status === 200 ? true : undefined), 20_000);
    const before = await controllerMemory(ctrl.pid!, url, ca);

    const agent = new Agent({ keepAlive: !o.perRequest, maxSockets: o.concurrency, ca });
    const latencies: number[] = [];
    const failures = new Map<number | string, number>();
    const fail = (why: number | string, k = 1) => failures.set(why, (failures.get(why) ?? 0) + k);
    // What is sent: one CSR per request, or per node its CSRs in chunks of o.batch.
    const jobs: Csr[][] = [];
    if (o.mode === 'single') for (const c of o.csrs) jobs.push([c]);
    else {
      const byNode = new Map<string, Csr[]>();
      for (const c of o.csrs) byNode.set(c.node, [...(byNode.get(c.node) ?? []), c]);
      for (const list of byNode.values()) for (let i = 0; i < list.length; i += o.batch) jobs.push(list.slice(i, i + o.batch));
    }
    const entry = (c: Csr) => ({ namespace: 'bench', serviceAccount: c.sa, csr: c.csr });
    let next = 0;
    const cpu0 = process.cpuUsage();
    const t = performance.now();
    if (o.mode === 'batch' && o.agentClient) {
      // As agents do: every identity asked for at once through the node's client, which coalesces them into batches.
      const issuers = new Map(Object.keys(o.tokens).map((node) => [node, controllerIssuer({ url, node, ca, token: () => o.tokens[node]! })]));
      await Promise.all(
        o.csrs.map(async (c) => {
          const s = performance.now();
          try {
            await issuers.get(c.node)!.issue({ namespace: 'bench', serviceAccount: c.sa }, c.csr);
          } catch (err) {
            fail((err as { reason?: string }).reason ?? 'error');
          }
          latencies.push(performance.now() - s);
        }),
      );
    } else {
      await Promise.all(
        Array.from({ length: o.concurrency }, async () => {
          for (;;) {
            const i = next++;
            if (i >= jobs.length) return;
            const job = jobs[i]!;
            const node = job[0]!.node;
            const s = performance.now();
            const r =
              o.mode === 'single'
                ? await call(url, ca, 'POST', `/v1/nodes/${node}/identities`, entry(job[0]!), o.tokens[node], agent)
                : await call(url, ca, 'POST', `/v1/nodes/${node}/identities/batch`, { requests: job.map(entry) }, o.tokens[node], agent);
            latencies.push(performance.now() - s);
            if (r.status !== 200) fail(r.status, job.length);
            else if (o.mode === 'batch') for (const x of (JSON.parse(r.text) as { results: { status: number }[] }).results) if (x.status !== 200) fail(x.status);
          }
        }),
      );
    }
    const totalMs = performance.now() - t;
    const clientCpu = process.cpuUsage(cpu0);
    agent.destroy();
    const after = await controllerMemory(ctrl.pid!, url, ca);
    return {
      bench: 'identity-issue',
      kind: o.mode === 'single' ? 'https' : 'https-batch',
      identities: n,
      nodes: o.nodes,
      // Requests sent, and how many were in flight at most (the agent client: each node's, up to 4 connections each).
      requests: o.mode === 'batch' && o.agentClient ? 'agent-client' : jobs.length,
      concurrency: o.mode === 'batch' && o.agentClient ? `agent-client x ${o.nodes}` : o.concurrency,
      connections: o.perRequest ? 'per-request' : 'keep-alive',
      total_ms: round(totalMs, 1),
      target_total_ms: 2000,
      per_s: round((n / totalMs) * 1000, 1),
      // Per request (a batch's answer covers all its identities; agent client: per identity).
      p50_ms: round(quantile(latencies, 0.5), 2),
      p99_ms: round(quantile(latencies, 0.99), 2),
      max_ms: round(Math.max(...latencies), 2),
      failed: Object.fromEntries(failures),
      issued_counter: after.issued,
      // CPU the controller spent per certificate: on a shared or loaded machine the wall time says less than this.
      controller_cpu_ms_per_issue: round((after.cpuMs - before.cpuMs) / n, 3),
      // The nodes' side (HTTPS client, this process): shares the machine with the controller here.
      client_cpu_ms_per_issue: round((clientCpu.user + clientCpu.system) / 1000 / n, 3),
      load_avg_1m: round(loadavg()[0]!, 1),
      controller_rss_mib_before: before.rssMiB,
      controller_rss_mib_after: after.rssMiB,
      controller_rss_growth_mib: round(after.rssMiB - before.rssMiB, 1),
      controller_heap_used_mib_before: before.heapMiB,
      controller_heap_used_mib_after: after.heapMiB,
    };
  } finally {
    if (ctrl.exitCode === null) {
      const exited = new Promise((r) => ctrl.once('exit', r));
      ctrl.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
    }
  }
}

interface IssueService {
  issue(node: string, body: unknown): Promise<{ status: number; body: unknown }>;
}

/**
 * Build `p`'s issuing code in this process: IdentityService.issue (request
 * checks, CSR verification, signing by the built-in CA) for every CSR, no
 * HTTP, no TLS. CPU per certificate from process.cpuUsage.
 */
async function signPath(p: Program, csrs: Csr[]): Promise<Record<string, unknown>> {
  const load = (rel: string) => import(pathToFileURL(join(p.dist, rel)).href) as Promise<Record<string, unknown>>;
  const { IdentityService } = (await load('src/controller/identities.js')) as { IdentityService: new (o: unknown) => IssueService };
  const { BuiltinProvider, meshCaFileStore } = (await load('src/identity/providers/builtin.js')) as { BuiltinProvider: { start(o: unknown): Promise<unknown> }; meshCaFileStore(dir: string): unknown };
  const caDir = mkdtempSync(join(tmpdir(), 'fsm-bench-identity-ca-'));
  try {
    const provider = await BuiltinProvider.start({ store: meshCaFileStore(caDir) });
    const pods = new Map<string, { namespace: string; serviceAccount: string }[]>();
    for (const c of csrs) pods.set(c.node, [...(pods.get(c.node) ?? []), { namespace: 'bench', serviceAccount: c.sa }]);
    const service = new IdentityService({
      provider,
      podsOf: (node: string) => pods.get(node),
      settings: () => ({ trustDomain: 'cluster.local', certificateLifetimeMs: null }),
      rate: { perSecond: 1e9, burst: 1e9 },
      maxIdentitiesPerNode: 1e9,
    });
    const once = async (c: Csr) => {
      const a = await service.issue(c.node, { namespace: 'bench', serviceAccount: c.sa, csr: c.csr });
      if (a.status !== 200) throw new Error(`${p.name}: ${c.node} ${c.sa}: ${JSON.stringify(a.body)}`);
    };
    for (const c of csrs.slice(0, 50)) await once(c); // warm up the JIT
    const cpu0 = process.cpuUsage();
    const t = performance.now();
    for (const c of csrs) await once(c);
    const cpu = process.cpuUsage(cpu0);
    const ms = performance.now() - t;
    return {
      bench: 'identity-issue',
      kind: 'sign-path',
      identities: csrs.length,
      cpu_ms_per_issue: round((cpu.user + cpu.system) / 1000 / csrs.length, 3),
      wall_ms_per_issue: round(ms / csrs.length, 3),
      load_avg_1m: round(loadavg()[0]!, 1),
    };
  } finally {
    rmSync(caDir, { recursive: true, force: true });
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
  const rssKb = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? NaN);
  const metrics = (await call(url, ca, 'GET', '/metrics')).text;
  const metric = (name: string) => Number(new RegExp(`^fsm_node_controller_${name} (\\S+)`, 'm').exec(metrics)?.[1] ?? NaN);
  // process.cpuUsage() of the controller (user + system, microsecond resolution), as prom-client reports it.
  const cpuMs = metric('process_cpu_seconds_total') * 1000;
  return { rssMiB: round(rssKb / 1024, 1), heapMiB: round(metric('nodejs_heap_size_used_bytes') / 2 ** 20, 1), issued: metric('certificates_issued_total'), cpuMs };
}
